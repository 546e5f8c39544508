"""Training: the real loop on tiny models and synthetic / demo data.

Runs use config.model="micro" (the tiny model with a one-layer-per-block UNet) to halve compile
times. One-step CLI run + SIGTERM, loss falling on the demo dataset, data parallel 1 vs 4 devices, resume
after a kill, per-group learning rates with warmup, the masked loss, and every config in configs/.
A persistent XLA cache in a temp dir, shared with the CLI subprocesses, lets runs of identical programs (resume)
skip recompiling.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import helpers  # tests/ is on sys.path (rootdir conftest, no package)
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


def _cli_env() -> dict:
    """Environment of a training CLI subprocess: one CPU device and this module's persistent XLA cache, so
    the CLI runs of one program (the same config) compile it once."""
    return helpers.cli_env(
        JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )


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
    mask = jnp.zeros((2, 4, 4, 1)).at[:, :2, :2, :].set(1.0)  # top-left quarter: all error 4
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
    proc = _start(wd, *UNTIL_STOPPED)
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


def test_second_sigterm_during_the_final_save_is_ignored(tmp_path):
    """The real CLI: SIGTERM, then SIGTERM again while the final checkpoint is being written (its
    `*.orbax-checkpoint-tmp` folder exists): the second is logged and ignored, the save completes (exit 0, no
    temp folder left) and a rerun resumes from that step. Before, the second signal killed the save (exit
    143) and the rerun started from step 0."""
    wd = tmp_path / "run"
    env = _cli_env()
    proc = _start(wd, *UNTIL_STOPPED)
    second = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not _metric_lines(wd):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if list((wd / "checkpoints").glob("*.orbax-checkpoint-tmp*")):
                second = time.time()
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.002)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert second is not None, "the final save was not seen in progress: " + out[-2000:]
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM again: ignored" in out, out[-3000:]
    n = _metric_lines(wd)[-1]["step"]
    assert _complete_checkpoints(wd) == [n] and not list((wd / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    rerun = subprocess.run(
        _cli(wd, f"--config.total_steps={n + 1}", "--config.checkpoint_every=100000"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (
        f"resumed from {(wd / 'checkpoints').absolute()} at step {n}" in rerun.stderr
        and _metric_lines(wd)[-1]["step"] == n + 1
    ), rerun.stderr[-3000:]


def _metric_lines(wd) -> list[dict]:
    path = wd / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def test_cli_unknown_override_names_the_key(tmp_path):
    proc = subprocess.run(
        helpers.train_cmd(CONFIGS / "demo.py", tmp_path, "--config.optim.warmup_stepz=3"),
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode != 0
    assert "warmup_stepz" in proc.stderr + proc.stdout


def test_logged_img_per_s_is_the_rate_seen_from_outside(tmp_path, monkeypatch):
    """At log_every=1 the logged img/s is the rate at which metrics.jsonl lines arrive (within 10%, medians
    over 30 steps: robust on a loaded machine). Reading the clock before the step had finished timed its
    asynchronous dispatch: 4.5x too high."""
    from persongen_jax.training import train_loop

    arrivals = []

    class TimedWriter(train_loop.MetricWriter):
        def write(self, step, scalars):
            super().write(step, scalars)
            arrivals.append(time.perf_counter())

    monkeypatch.setattr(train_loop, "MetricWriter", TimedWriter)
    c = tiny_config(total_steps=31, log_every=1, checkpoint_every=1000)
    out = train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    assert len(arrivals) == 31
    logged = float(np.median([h["img_per_s"] for h in out["history"][1:]]))
    seen = c.data.global_batch_size / float(np.median(np.diff(arrivals)))
    assert abs(logged / seen - 1) < 0.10, (logged, seen)


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
            np.testing.assert_allclose(
                np.asarray(four["params"][k]), np.asarray(one["params"][k]), atol=1e-5, rtol=0, err_msg=f"{name}: {k}"
            )
        np.testing.assert_allclose(
            [h["loss"] for h in four["history"]], [h["loss"] for h in one["history"]], rtol=1e-5, err_msg=name
        )


# ----------------------------------------------------------------------------- resume


# The CLI runs' config: the micro model on synthetic data, a log line every step.
MICRO_ARGS = (
    "--config.model=micro",
    "--config.data.source=synthetic",
    "--config.data.global_batch_size=2",
    "--config.log_every=1",
    "--config.progress_bar=False",
)


# A run that goes on until it is signalled or killed, with no checkpoint of its own before.
UNTIL_STOPPED = ("--config.total_steps=100000", "--config.checkpoint_every=100000")


def _cli(wd, *overrides):
    return helpers.train_cmd(CONFIGS / "demo.py", wd, *MICRO_ARGS, *overrides)


def _start(wd, *overrides: str, output=subprocess.PIPE) -> subprocess.Popen:
    """`_cli` started in the background; its stdout and stderr both go to OUTPUT."""
    cmd = _cli(wd, *overrides)
    return subprocess.Popen(cmd, cwd=REPO, env=_cli_env(), stdout=output, stderr=subprocess.STDOUT, text=True)


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

    env = _cli_env()
    run = lambda wd, *o: subprocess.run(_cli(wd, *o), cwd=REPO, env=env, capture_output=True, text=True)
    killed = tmp_path / "killed"
    proc = _start(
        killed,
        "--config.total_steps=100000",
        "--config.checkpoint_every=2",
        "--config.keep_checkpoints=100",
        output=subprocess.DEVNULL,
    )
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
    from flax import nnx

    from persongen_jax.models.modeling import path_str
    from persongen_jax.training.model import build_model

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


def test_bad_record_warnings_name_training_failures_only(tmp_path, caplog):
    """A dataset whose writer left out two inputs (an undecodable image, a line without caption; in
    index.json "bad", as data.build lists its rejects) plus a record that fails only when training decodes
    it: training runs to the end; the epoch and end reports warn about the failing record alone; the
    writer's list is one info line (it was reported when the dataset was made)."""
    import logging

    from persongen_jax.data.make_demo import make_demo
    from tests.helpers import add_damaged_record

    data = make_demo(tmp_path / "data", persons=3, images_per_person=2, resolution=32, corrupt=True, progress=False)
    add_damaged_record(data, "p001", "persons/p001/damaged.jpg")  # 7 records: an epoch is 4 steps of 2
    c = tiny_config(total_steps=4, checkpoint_every=4, log_every=1)
    c.data.source, c.data.dir = "grain", str(data)
    c.data.global_batch_size, c.data.resolution, c.data.num_refs = 2, 32, 1
    with caplog.at_level(logging.INFO, logger="persongen_jax"):
        out = train_and_evaluate(c, tmp_path / "run", devices=jax.devices()[:1])
    assert out["step"] == 4 and all(np.isfinite(h["loss"]) for h in out["history"])
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "persongen_jax.train" and "bad record" in r.getMessage()
    ]
    assert [w.split(":")[0] for w in warnings] == ["epoch 1 done (step 4)", "end of training (step 4)"], warnings
    for w in warnings:
        assert "1 bad record: persons/p001/damaged.jpg (cannot decode image" in w and "corrupt.jpg" not in w, w
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "corrupt.jpg" in r.getMessage()]
    assert f"{data}: 2 input(s) left out when the dataset was written" in caplog.text


# ----------------------------------------------------------------------------- reliability


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A micro run of 2 steps with a checkpoint after each: the starting point of the resume tests (copied)."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    train_and_evaluate(
        tiny_config(total_steps=2, checkpoint_every=1, keep_checkpoints=5), wd, devices=jax.devices()[:1]
    )
    return wd


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _metric_steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_refuses_shape_changes_and_keeps_config_versions(trained_run, tmp_path):
    """Defects 4 + 11: a rank-8 resume of a rank-4 run is refused before anything is written (config.json
    intact, the run still loads for evaluation); harmless changes resume and are recorded with the step
    they start at; metric lines a killed run logged after its last checkpoint are set aside, not repeated;
    --config.resume=false starts over and keeps the previous run."""
    from persongen_jax.sources import load_trained_model

    run = _copy_run(trained_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    rank8 = tiny_config(total_steps=3, checkpoint_every=1, **{"lora.rank": 8, "lora.alpha": 8.0})
    with pytest.raises(ValueError, match=r"lora.alpha: 4.0 -> 8.0; lora.rank: 4 -> 8\); use a new --workdir"):
        train_and_evaluate(rank8, run, devices=jax.devices()[:1])
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert load_trained_model(run)[2] == 2  # what `evaluate --checkpoint RUN` does
    with open(run / "metrics.jsonl", "a") as f:  # a run killed after logging steps 3 and 4, checkpoint at 2
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n" + json.dumps({"step": 4, "loss": 9.0}) + "\n")
    out = train_and_evaluate(
        tiny_config(total_steps=3, checkpoint_every=1, keep_checkpoints=4), run, devices=jax.devices()[:1]
    )
    assert [h["step"] for h in out["history"]] == [3]
    assert _metric_steps(run / "metrics.jsonl") == [1, 2, 3]
    assert _metric_steps(run / "metrics.superseded.jsonl") == [3, 4]
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 2]
    assert history[1]["changes"] == {"keep_checkpoints": [5, 4], "total_steps": [2, 3]}
    assert json.loads((run / "config.json").read_text())["total_steps"] == 3
    out = train_and_evaluate(
        tiny_config(total_steps=1, checkpoint_every=1, resume=False), run, devices=jax.devices()[:1]
    )
    assert out["step"] == 1 and _complete_checkpoints(run) == [1]
    (previous,) = (run / "previous").iterdir()
    assert _complete_checkpoints(previous) == [1, 2, 3] and _metric_steps(previous / "metrics.jsonl") == [1, 2, 3]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(trained_run, tmp_path, caplog):
    """The latest checkpoint's data files truncated (TensorStore OUT_OF_RANGE): the run resumes from
    the one before, with a warning naming the damaged checkpoint, which is kept (moved aside), not deleted."""
    import logging

    run = _copy_run(trained_run, tmp_path / "run")
    for data in (run / "checkpoints" / "2" / "state").glob("ocdbt.process_*/d/*"):  # a copy cut short
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        out = train_and_evaluate(
            tiny_config(total_steps=2, checkpoint_every=1, keep_checkpoints=5), run, devices=jax.devices()[:1]
        )
    assert [h["step"] for h in out["history"]] == [2]  # step 2 computed again from checkpoint 1
    said = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(said) == 1 and f"checkpoint {run / 'checkpoints' / '2'} does not restore" in said[0], said
    assert "OUT_OF_RANGE" in said[0] and "checkpoints_unreadable" in said[0]
    assert (run / "checkpoints_unreadable" / "2" / "state").is_dir() and _complete_checkpoints(run) == [1, 2]


def test_half_written_checkpoint_of_a_killed_save_is_removed(trained_run, tmp_path, caplog):
    """The temp folder of a save that never finished (the run killed mid-save, a full disk) is removed by
    the next run with a warning naming it; the run resumes from the last complete checkpoint."""
    import logging

    run = _copy_run(trained_run, tmp_path / "run")
    partial = run / "checkpoints" / "3.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "d").write_bytes(b"\0" * 1000)
    with caplog.at_level(logging.WARNING):
        out = train_and_evaluate(
            tiny_config(total_steps=3, checkpoint_every=1, keep_checkpoints=5), run, devices=jax.devices()[:1]
        )
    assert [h["step"] for h in out["history"]] == [3]  # resumed from checkpoint 2
    said = [r.getMessage() for r in caplog.records if "save did not finish" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"removing {partial}:"), said
    assert not partial.exists() and _complete_checkpoints(run) == [1, 2, 3]


def test_resume_whose_shapes_differ_names_parameter_and_checkpoint(trained_run, tmp_path):
    """Checkpoints of rank 4 under a config.json edited to rank 8: the error names the parameter,
    both shapes and the checkpoint (was: `Requested shape (64, 8) is not compatible with (64, 4)`)."""
    run = _copy_run(trained_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["lora"].update(rank=8, alpha=8.0)
    (run / "config.json").write_text(json.dumps(cfg))
    rank8 = tiny_config(total_steps=3, checkpoint_every=1, **{"lora.rank": 8, "lora.alpha": 8.0})
    with pytest.raises(
        ValueError,
        match=rf"{run / 'checkpoints' / '2'}: the checkpoint does not match the model "
        r"this config builds: unet\.\S+\.lora_A\.kernel: stored \(\d+, 4\), the "
        r"config builds \(\d+, 8\)",
    ):
        train_and_evaluate(rank8, run, devices=jax.devices()[:1])
    assert json.loads((run / "config.json").read_text()) == cfg  # nothing written


def test_second_trainer_on_a_run_folder_is_refused(tmp_path):
    """While a trainer runs in WORKDIR, another one fails at once naming the holder (pid, host);
    after the holder is killed (kill -9), its lock file does not block a new run."""
    import socket

    wd = tmp_path / "run"
    proc = _start(wd, *UNTIL_STOPPED, output=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (wd / ".lock").is_file() and f'"pid": {proc.pid}' in (wd / ".lock").read_text():
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the first trainer ended early"
        with pytest.raises(
            ValueError,
            match=rf"another training run is using this folder \(pid {proc.pid} on "
            rf"{socket.gethostname()}, started ",
        ):
            train_and_evaluate(tiny_config(total_steps=1), wd, devices=jax.devices()[:1])
    finally:
        proc.kill()
        proc.wait(timeout=60)
    from persongen_jax.training.run_folder import RunLock

    with RunLock(wd):  # the killed holder's lock is gone with its process
        pass


def test_non_finite_step_stops_before_its_checkpoint(trained_run, tmp_path):
    """A diverged step (here: infinite learning rates, so the updated params are Inf/NaN while the loss of
    that step is still finite) stops training with an error naming the step, and is never checkpointed:
    the checkpoint check runs on steps that were not logged too."""
    from persongen_jax.training.train_loop import NonFiniteLossError

    wd = _copy_run(trained_run, tmp_path / "run")
    inf = float("inf")
    c = tiny_config(total_steps=4, checkpoint_every=1, keep_checkpoints=5, log_every=100)
    c.trainable = default.groups(heads=inf, fuse_mlp=inf, lora=inf)
    with pytest.raises(NonFiniteLossError, match=r"param_norm is (nan|inf) at step 3: stopping .*last good checkpoint"):
        train_and_evaluate(c, wd, devices=jax.devices()[:1])
    assert _complete_checkpoints(wd) == [1, 2]


def test_cli_errors_are_one_line(tmp_path):
    """`--config.lora.targets=5` (was: TypeError deep in LoRA) and a missing data.dir (was: a
    FileNotFoundError traceback): one `error:` line naming the key / folder, exit 1."""
    env = _cli_env()
    proc = subprocess.run(
        _cli(tmp_path / "run", "--config.lora.targets=5"), cwd=REPO, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.lora.targets=(5,): expected a tuple of str (like the default ('to_q', 'to_k', 'to_v', "
        "'to_out.0')), got int 5"
    ), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(ValueError, match=r"config.eval.seeds=\(0, 'a'\): expected a tuple of int"):
        train_and_evaluate(tiny_config(**{"eval.seeds": (0, "a")}), tmp_path / "r2", devices=jax.devices()[:1])
    missing = tmp_path / "no_data"
    with pytest.raises(FileNotFoundError, match=rf"config.data.dir='{missing}': no such folder"):
        train_and_evaluate(
            tiny_config(**{"data.source": "grain", "data.dir": str(missing)}),
            tmp_path / "r3",
            devices=jax.devices()[:1],
        )
