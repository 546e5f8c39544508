"""Issue 12: a two-process run on 127.0.0.1 (CPU, 2 fake devices each, gloo collectives) trains like one
process with 4 devices: same losses, same parameters (data parallel and FSDP across the two hosts),
checkpoints written once per step by both processes together."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp, name, processes, devices_each, overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO))
    port = _free_port()
    outs = [tmp / f"{name}{i}.npz" for i in range(processes)]
    procs = [subprocess.Popen([sys.executable, "tests/multihost_worker.py", str(outs[i]), str(tmp / name), str(i),
                               str(processes), str(port), *overrides], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [dict(np.load(o)) for o in outs]


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    """FSDP over the 4 devices of 2 hosts: the batch and the parameters / optimizer state both span the
    hosts, so this covers the data shards, the cross-host gather of the final params and the checkpoint
    written by both processes (data parallel is the same path with replicated params)."""
    overrides = [f"total_steps={STEPS}", f"checkpoint_every={STEPS}", "data.global_batch_size=4",
                 'sharding.logical_axis_rules=[["batch", "data"], ["params", "data"]]']
    (one,) = _run(tmp_path, "one", 1, 4, overrides)
    two = _run(tmp_path, "two", 2, 2, overrides)
    for got in two:  # both processes return the whole (gathered) parameters
        assert int(got["step"]) == STEPS and got.keys() == one.keys()
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-5)
        for k in one:
            if k.startswith("param/"):
                np.testing.assert_allclose(got[k], one[k], atol=1e-5, rtol=0, err_msg=k)
    assert (tmp_path / "two" / "checkpoints" / str(STEPS) / "state").is_dir()
