"""A two-process run on 127.0.0.1 (CPU, 2 fake devices each, gloo collectives) trains like one
process with 4 devices: same losses, same parameters, checkpoints written once per step by both processes
together (tests/multihost_worker.py is one process). A SIGTERM that only process 1 sees, during step 1 of a
5-step run, stops both processes after the same step (2: the flags are agreed one step later) and both save
that step."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from tests.helpers import cli_env

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
OVERRIDES = {
    "total_steps": STEPS,
    "checkpoint_every": STEPS,
    "data.global_batch_size": 4,
    # FSDP over the 4 devices of the 2 hosts: the batch and the params / optimizer state both span the
    # hosts (the cross-host gather of the final params too); data parallel is the same path replicated.
    "sharding.logical_axis_rules": (("batch", "data"), ("params", "data")),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    import json

    from tests.multihost_worker import run

    env = cli_env(2, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO))
    two_args = {**OVERRIDES, "total_steps": 5}
    port, args = _free_port(), [f"{k}={json.dumps(v)}" for k, v in two_args.items()] + ["sigterm_at=1:1"]
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "tests/multihost_worker.py",
                str(outs[i]),
                str(tmp_path / "two"),
                str(i),
                "2",
                str(port),
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        assert len(jax.devices()) >= 4, "conftest sets --xla_force_host_platform_device_count=4"
        one = run(tmp_path / "one", OVERRIDES, devices=jax.devices()[:4])  # meanwhile, the reference here
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    for out in outs:  # both processes return the whole (gathered) parameters
        got = dict(np.load(out))
        assert int(got["step"]) == STEPS
        np.testing.assert_allclose(got["losses"], [h["loss"] for h in one["history"]], rtol=1e-5)
        assert {k[len("param/") :] for k in got if k.startswith("param/")} == set(one["params"])
        for k, v in one["params"].items():
            np.testing.assert_allclose(got[f"param/{k}"], np.asarray(v), atol=1e-5, rtol=0, err_msg=k)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [str(STEPS)]
    assert "SIGTERM: saving step 2" in logs[0] and "SIGTERM: saving step 2" in logs[1]


def test_distributed_initialize_from_config_and_environment(monkeypatch):
    """When the run joins a job and with which arguments (jax.distributed.initialize recorded, not called)."""
    import ml_collections
    import pytest

    from persongen_jax.training import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = lambda **kw: ml_collections.ConfigDict(
        dict(  # noqa: E731
            dict(initialize="auto", coordinator_address="", num_processes=0, process_id=-1), **kw
        )
    )
    assert not distributed.initialize(cfg()) and calls == []  # a single process: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed.initialize(cfg()) and calls == []  # a one-task SLURM job neither
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.initialize(cfg()) and calls == [{}]  # JAX reads SLURM's variables itself
    assert distributed.initialize(cfg(coordinator_address="h:1234", num_processes=2, process_id=1))
    assert calls[-1] == {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
    assert not distributed.initialize(cfg(initialize="never")) and len(calls) == 2
    with pytest.raises(ValueError, match=r"config.distributed.initialize='yes'; expected one of"):
        distributed.initialize(cfg(initialize="yes"))
