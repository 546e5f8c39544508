"""Training (issue 4 points 4-5): the real loop on tiny models and synthetic / demo data.

Runs use config.model="micro" (the tiny model with a one-layer-per-block UNet) to halve compile
times. One-step CLI run + SIGTERM, loss falling on the demo dataset, data parallel 1 vs 4 devices, resume
after a kill, per-group learning rates with warmup, the masked loss, and every config in configs/.
A persistent XLA cache in a temp dir lets runs of identical programs (resume) skip recompiling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from persongen_jax import train as train_cli
from persongen_jax.training import train_and_evaluate
from persongen_jax.training.loss import masked_mse

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("default", "__init__"))


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def load_config(name: str, arg: str | None = None):
    """configs/NAME.py[:ARG] as `python -m persongen_jax.train --config` loads it."""
    return train_cli.load_config(str(CONFIGS / f"{name}.py") + (f":{arg}" if arg else ""))


def tiny_config(**overrides):
    c = default.tiny(default.get_config())
    c.model = "micro"  # the tiny model with a shallower UNet: half the compile time
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5, lora=1e-4)
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


# ----------------------------------------------------------------------------- loss


def test_masked_loss_known_values():
    pred = jnp.zeros((2, 4, 4, 2))
    target = jnp.zeros((2, 4, 4, 2)).at[:, :2, :, :].set(2.0)  # error 4 in the top half, 0 below
    mask = jnp.zeros((2, 4, 4, 1)).at[:, :2, :2, :].set(1.0)    # top-left quarter: all error 4
    # sample 0 masked: mean over mask pixels = 4; sample 1 unmasked: mean over all = 2
    got = masked_mse(pred, target, mask, jnp.array([True, False]))
    np.testing.assert_allclose(float(got), (4.0 + 2.0) / 2, rtol=1e-6)
    # a mask over the bottom half (zero error) gives 0 for that sample
    low = jnp.zeros((2, 4, 4, 1)).at[:, 2:, :, :].set(1.0)
    np.testing.assert_allclose(float(masked_mse(pred, target, low, jnp.array([True, True]))), 0.0)
    # an empty mask falls back to the full mean
    np.testing.assert_allclose(float(masked_mse(pred, target, jnp.zeros_like(mask), jnp.array([True, True]))), 2.0)


# ----------------------------------------------------------------------------- CLI + SIGTERM


def test_cli_one_step_then_sigterm_saves_and_exits(tmp_path):
    """The real CLI: artifacts after the first step, SIGTERM -> checkpoint of the current step, exit 0."""
    wd = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "persongen_jax.train", "--config", str(CONFIGS / "demo.py"), "--workdir", str(wd),
         "--config.model=micro", "--config.data.source=synthetic", "--config.data.global_batch_size=2",
         "--config.total_steps=100000",
         "--config.log_every=1", "--config.checkpoint_every=100000", "--config.progress_bar=False"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        metrics = wd / "metrics.jsonl"
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().strip():
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[0]["step"] == 1 and np.isfinite(rows[0]["loss"])
    for key in ("lr/lora", "lr/heads", "grad_norm", "param_norm", "update_norm", "img_per_s", "step_time_s"):
        assert key in rows[0], key
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == rows[-1]["step"], (steps, rows[-1])
    assert list((wd / "tb").glob("events.out.tfevents.*"))
    assert "SIGTERM" in out


def test_cli_unknown_override_names_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "persongen_jax.train", "--config", str(CONFIGS / "demo.py"),
                           "--workdir", str(tmp_path), "--config.optim.warmup_stepz=3"],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0
    assert "warmup_stepz" in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- loss falls (demo data)


def test_demo_loss_decreases(tmp_path):
    from persongen_jax.data.make_demo import make_demo

    data = make_demo(tmp_path / "data", persons=6, images_per_person=3, resolution=32, progress=False)
    c = load_config("demo")
    c.data.dir = str(data)
    c.model = "micro"
    c.total_steps, c.log_every, c.checkpoint_every, c.progress_bar = 40, 1, 40, False
    out = train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    losses = [h["loss"] for h in out["history"]]
    assert len(losses) == 40
    k = 8
    assert np.mean(losses[-k:]) < np.mean(losses[:k]), losses
    assert (tmp_path / "run" / "checkpoints" / "40").is_dir()


# ----------------------------------------------------------------------------- data parallel


def test_data_parallel_and_fsdp_1_vs_4_devices(tmp_path):
    """Same 3 steps, global batch 4: 1 device; 4 devices data parallel; 4 devices FSDP (one rule changed)."""
    assert len(jax.devices()) >= 4, "conftest sets --xla_force_host_platform_device_count=4"
    c = tiny_config(total_steps=3, checkpoint_every=3)
    one = train_and_evaluate(c, tmp_path / "one", devices=jax.devices()[:1])
    runs = {"dp4": train_and_evaluate(c, tmp_path / "four", devices=jax.devices()[:4])}
    c.sharding.logical_axis_rules = (("batch", "data"), ("params", "data"))
    runs["fsdp4"] = train_and_evaluate(c, tmp_path / "fsdp", devices=jax.devices()[:4])
    for name, four in runs.items():
        assert one["params"].keys() == four["params"].keys()
        for k in one["params"]:
            np.testing.assert_allclose(np.asarray(four["params"][k]), np.asarray(one["params"][k]), atol=1e-5,
                                       rtol=0, err_msg=f"{name}: {k}")
        np.testing.assert_allclose([h["loss"] for h in four["history"]], [h["loss"] for h in one["history"]],
                                   rtol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- resume


def _cli(wd, *overrides):
    return [sys.executable, "-m", "persongen_jax.train", "--config", str(CONFIGS / "demo.py"), "--workdir", str(wd),
            "--config.model=micro", "--config.data.source=synthetic", "--config.data.global_batch_size=2",
            "--config.log_every=1", "--config.progress_bar=False", *overrides]


def _complete_checkpoints(wd) -> list[int]:
    d = wd / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _last_losses(wd) -> dict[int, float]:
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a re-run step keeps its last value


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    """The real CLI killed with SIGKILL mid-run (possibly mid-save), resumed to N+2 steps, equals a straight
    N+2-step run: bitwise params and optimizer state, and the same losses (same data order)."""
    import orbax.checkpoint as ocp

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run = lambda wd, *o: subprocess.run(_cli(wd, *o), cwd=REPO, env=env, capture_output=True, text=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, "--config.total_steps=100000", "--config.checkpoint_every=2",
                                 "--config.keep_checkpoints=100"),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(_complete_checkpoints(killed)) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    n = _complete_checkpoints(killed)[-1]  # the last complete checkpoint; a half-written one is ignored
    total = f"--config.total_steps={n + 2}"
    resumed = run(killed, total, "--config.checkpoint_every=2", "--config.keep_checkpoints=100")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run(tmp_path / "straight", total, "--config.checkpoint_every=2", "--config.keep_checkpoints=100")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _complete_checkpoints(killed)[-1] == _complete_checkpoints(tmp_path / "straight")[-1] == n + 2
    a = ocp.StandardCheckpointer().restore((killed / "checkpoints" / str(n + 2) / "state").absolute())
    b = ocp.StandardCheckpointer().restore((tmp_path / "straight" / "checkpoints" / str(n + 2) / "state").absolute())
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b and leaves_a
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    la, lb = _last_losses(killed), _last_losses(tmp_path / "straight")
    assert [la[s] for s in range(n + 1, n + 3)] == [lb[s] for s in range(n + 1, n + 3)]


# ----------------------------------------------------------------------------- per-group LR + warmup


def test_per_group_lr_and_warmup(tmp_path):
    from persongen_jax.training.model import build_model
    from persongen_jax.models.modeling import path_str
    from flax import nnx

    warmup = 10
    c = tiny_config(**{"optim.warmup_steps": warmup, "total_steps": 1, "checkpoint_every": 1})
    model, _, _ = build_model(c, tmp_path / "init")
    init = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    for k, v in out["frozen"].items():  # frozen: unchanged, bitwise
        np.testing.assert_array_equal(np.asarray(v), init[k], k)
    assert set(out["params"]) | set(out["frozen"]) == set(init)
    factor = 1 / warmup  # first optimizer step: lr * (0 + 1) / warmup
    seen = {"lora": 0, "heads": 0}
    for k, v in out["params"].items():
        group = "lora" if ".lora_" in k else "heads" if "visual_projection" in k else None
        if group is None:
            continue
        lr = {"lora": 1e-4, "heads": 1e-5}[group] * factor
        delta = np.abs(np.asarray(v) - init[k]).ravel()
        if not delta.any():  # lora_A: zero gradient while lora_B == 0
            continue
        seen[group] += 1
        # Adam's first step is lr * g / (|g| + eps): |update| <= lr, and ~= lr wherever |g| >> eps
        # (up to the float32 rounding of param - update: one ulp of the param)
        ulp = np.spacing(np.abs(init[k]).astype(np.float32)).ravel()
        assert np.all(delta <= lr + ulp), (k, delta.max(), lr)
        assert np.median(np.abs(delta - lr) - ulp) < 0.01 * lr, (k, np.median(delta), lr)
    assert seen["lora"] and seen["heads"], seen
    assert out["history"][0]["lr/lora"] == pytest.approx(1e-4 * factor)
    assert out["history"][0]["lr/heads"] == pytest.approx(1e-5 * factor)


# ----------------------------------------------------------------------------- every config


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_and_steps(name, tmp_path):
    c = load_config(name, "tiny") if name != "demo" else load_config("demo")
    if name == "demo":
        c.model, c.data.source = "tiny", "synthetic"
    c.total_steps, c.checkpoint_every, c.log_every, c.progress_bar = 1, 1, 1, False
    c.data.global_batch_size, c.data.resolution, c.data.num_refs = 2, 32, 2
    assert c.model == "tiny"
    c.model = "micro"  # same wiring (LoRA, adapters, id injection), shallower UNet: faster compile
    out = train_and_evaluate(c, tmp_path, devices=jax.devices()[:1])
    assert out["step"] == 1 and np.isfinite(out["history"][0]["loss"])
    assert out["params"], "no trainable params"


# ----------------------------------------------------------------------------- bad data


def test_training_on_bad_data_reports_both_by_name(tmp_path, caplog):
    """A dataset with an undecodable image and a record without caption: training runs to the end and
    the epoch report names both files with their reasons."""
    import logging

    from persongen_jax.data.make_demo import make_demo

    data = make_demo(tmp_path / "data", persons=3, images_per_person=2, resolution=32, corrupt=True,
                     progress=False)
    c = tiny_config(total_steps=3, checkpoint_every=3, log_every=1)
    c.data.source, c.data.dir = "grain", str(data)
    c.data.global_batch_size, c.data.resolution, c.data.num_refs = 2, 32, 1
    with caplog.at_level(logging.WARNING):
        out = train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    assert out["step"] == 3 and all(np.isfinite(h["loss"]) for h in out["history"])
    reports = [r.getMessage() for r in caplog.records if "bad record" in r.getMessage()]
    assert any(r.startswith("epoch 1 done") for r in reports), reports
    last = reports[-1]
    assert "2 bad records" in last and "corrupt.jpg (cannot decode image" in last \
        and "nocaption.jpg (missing caption)" in last, last
