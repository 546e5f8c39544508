"""The training loop: `train_and_evaluate(config, workdir)`, and the train step it compiles.

`train_and_evaluate` reads as setup (mesh, model, trainable/frozen split, optimizer, sharded state, data)
-> restore (latest complete checkpoint in WORKDIR/checkpoints, data iterator position included) -> AOT
compile of the one jitted `train_step` (memory and cost analysis logged) -> loop (metrics, checkpoints,
validation, SIGTERM) -> final save.

Validation (`training/validation.py`) runs every `config.eval_every` steps: sample images of the validation
sets (or of training identities) to WORKDIR/samples/<step>/ and TensorBoard, scored when scoring models
are configured (the protocol of `python -m persongen_jax.evaluate` with the current parameters).

A "step" is one call of the train step on one global batch; with `optim.grad_accum_steps = k` the
optimizer updates every k steps (optax.MultiSteps), so the effective batch is k x global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from persongen_jax import conditions as conditions_lib
from persongen_jax.data.pipeline import IdInputs
from persongen_jax.models import lora as lora_lib
from persongen_jax.models.modeling import path_str
from persongen_jax.pipeline import prompt as prompt_lib
from persongen_jax.training import checkpoint as ckpt_lib
from persongen_jax.training import data as data_lib
from persongen_jax.training import distributed, run_folder
from persongen_jax.training import optimizer as optim_lib
from persongen_jax.training import sharding as shard_lib
from persongen_jax.training import state as state_lib
from persongen_jax.training.loss import compute_loss
from persongen_jax.training.metrics import MetricWriter
from persongen_jax.training.model import build_model, id_inputs
from persongen_jax.training.state import ModelSplit, TrainState
from persongen_jax.training.validation import Validator
from persongen_jax.utils.xla_stats import compiled_flops, compiled_memory_mib

log = logging.getLogger("persongen_jax.train")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: training stops (the last good checkpoint stays)."""


# ---------------------------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of the jitted step
class StepSpec:
    """The static part of the train step: how to rebuild the model, the optimizer, the loss
    (model, batch, key) -> (loss, aux metrics)."""

    split: ModelSplit
    tx: optax.GradientTransformation
    loss: Callable[..., tuple[jax.Array, dict]]


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, spec: StepSpec) -> tuple[TrainState, dict]:
    """One optimizer step on one global batch -> (new state, metrics: loss, grad/param/update norms, aux).
    Randomness comes from `fold_in(rng, state.step)`: a resumed run draws the same numbers."""
    key = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        return spec.loss(spec.split.merge(params, state.frozen, state.rest), batch, key)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "update_norm": optax.tree.norm(updates),
        **aux,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---------------------------------------------------------------------------------------------- helpers


class _Preemption:
    """SIGTERM -> save and exit cleanly after the current step. Installed until the final save has been
    written: a second SIGTERM (a user pressing twice, a supervisor repeating its signal) is logged and
    ignored instead of killing the save half-way (SIGKILL still forces an exit)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            log.warning(
                "SIGTERM again: ignored; the run saves its current step and exits once that checkpoint "
                "is written (kill -9 forces an exit and loses the steps since the last checkpoint)"
            )
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class _Setup:
    """Everything `train_and_evaluate` builds before the first step."""

    mesh: Any
    state: TrainState
    spec: StepSpec
    groups: dict
    tokenizers: tuple
    text_fields: tuple
    validator: Validator | None
    id_image_size: int
    id_inputs: IdInputs  # PhotoMaker V2's extra data (model.id_inputs)


def make_loss(config, model, tokenizers, scheduler) -> Callable[..., tuple[jax.Array, dict]]:
    """The loss (model, batch, key) -> (loss, aux) of `config` (model: concrete or abstract, only its
    static structure is read)."""
    empty_ids = (
        jnp.asarray(prompt_lib.tokenize(tokenizers[0], [""])),
        jnp.asarray(prompt_lib.tokenize(tokenizers[1], [""])),
    )
    return functools.partial(
        compute_loss,
        scheduler=scheduler,
        loss_cfg=dict(config.loss),
        conditions=conditions_lib.from_config(config),
        id_injection=config.id_injection,
        adapters=lora_lib.adapter_config(model.unet),
        empty_ids=empty_ids,
        compute_dtype=jnp.bfloat16 if config.dtype == "bfloat16" else None,
    )


def _setup(config, workdir: Path, devices) -> _Setup:
    """Mesh, model (its trainable/frozen split), optimizer, the sharded initial state, the loss, validation."""
    mesh = shard_lib.make_mesh(config.sharding, devices)
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    if config.data.global_batch_size % mesh.shape[shard_lib.rule(config.sharding, "batch")]:
        raise ValueError(
            f"config.data.global_batch_size={config.data.global_batch_size} is not divisible by the "
            f"{dict(mesh.shape)} mesh's batch axis"
        )
    model, tokenizers, scheduler = build_model(config, workdir)
    # Validation sets and scoring models load now: a wrong path fails before any training.
    validator = Validator.from_config(config, workdir, tokenizers) if config.eval_every else None
    if validator is None:
        log.info("no validation during training (config.eval_every is 0)")
    groups = {g: dict(spec) for g, spec in config.trainable.items() if spec.lr > 0}
    split, params, frozen, rest = state_lib.split_model(model, groups)
    frozen = state_lib.cast_frozen(frozen, config.frozen_dtype)
    counts = optim_lib.check_groups(params, groups)
    n_train = sum(int(np.prod(v.shape)) for v in params.values())
    n_frozen = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(frozen))
    log.info(
        "trainable groups %s: %.2fM params trainable (float32), %.2fM frozen (%s)",
        counts,
        n_train / 1e6,
        n_frozen / 1e6,
        config.frozen_dtype,
    )
    tx = optim_lib.make_optimizer(params, groups, config.optim)
    state = state_lib.create_state(params, frozen, rest, tx, mesh, config.sharding)
    spec = StepSpec(split, tx, make_loss(config, model, tokenizers, scheduler))
    return _Setup(
        mesh,
        state,
        spec,
        groups,
        tokenizers,
        data_lib.text_condition_fields(config),
        validator,
        model.id_encoder.config.vision.image_size,
        id_inputs(model),
    )


def _compile(step_fn, state: TrainState, batch: dict, rng: jax.Array):
    """AOT-compiles the step (nothing runs) -> (compiled, facts: compile_s, flops_per_step, memory_mib)."""
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    info: dict[str, Any] = {"compile_s": time.perf_counter() - t0, "flops_per_step": compiled_flops(compiled)}
    log.info("train step compiled in %.1fs", info["compile_s"])
    mem = compiled_memory_mib(compiled)
    if mem is None:
        log.info("compiled memory analysis unavailable")
    else:
        info["memory_mib"] = {k: mem[k] for k in ("args", "temp", "output")}
        log.info(
            "compiled memory: args %.1f MiB, temp %.1f MiB, outputs %.1f MiB, generated code %.1f MiB",
            mem["args"],
            mem["temp"],
            mem["output"],
            mem["code"],
        )
    return compiled, info


def _check_finite(metrics, step: int, workdir) -> dict:
    """The step's metrics on the host; a non-finite loss, gradient norm or parameter norm stops training.
    Called before every checkpoint too, so a saved step never holds NaN/Inf parameters."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])]
    if bad:
        raise NonFiniteLossError(
            f"{bad[0]} is {m[bad[0]]} at step {step}: stopping (loss {m['loss']}, grad_norm {m['grad_norm']}, "
            f"param_norm {m['param_norm']}); lower the learning rates, enable optim.grad_clip_norm, or use "
            f"float32; the last good checkpoint is in {workdir / 'checkpoints'}"
        )
    return m


def _host_metrics(metrics, step: int, n_steps: int, seconds: float, config, groups, workdir) -> dict:
    """The logged scalars: the step's metrics (stops on a non-finite loss), img/s, step time, learning rates."""
    m = _check_finite(metrics, step, workdir)
    m["img_per_s"] = n_steps * config.data.global_batch_size / seconds
    m["step_time_s"] = seconds / n_steps
    opt_step = (step - 1) // max(1, config.optim.grad_accum_steps)
    for g, spec in groups.items():
        m[f"lr/{g}"] = float(spec["lr"]) * float(optim_lib.warmup_factor(opt_step, config.optim.warmup_steps))
    return m


def _result(step: int, state: TrainState, history, compiled_info=None) -> dict:
    """Host copies: trainable params {path: array}, frozen params {path: array}, the logged metrics,
    and facts about the compiled step (compile_s, flops_per_step, memory)."""
    flat_frozen = {path_str(p): v.get_value() for p, v in nnx.to_flat_state(state.frozen)}
    return {
        "step": step,
        "params": distributed.to_host(state.params),
        "frozen": distributed.to_host(flat_frozen),
        "history": history,
        "compiled": dict(compiled_info or {}),
    }


# ---------------------------------------------------------------------------------------------- the loop


def train_and_evaluate(
    config,
    workdir: str | Path,
    *,
    devices=None,
    stop_after_steps: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Trains per `config` in `workdir`; returns {"step", "params" (host numpy, flat), "frozen", "history",
    "compiled"}. devices: the mesh devices (default: all). stop_after_steps: return right after that step
    without the final save (tests: simulates a kill after a periodic checkpoint). on_step(step, metrics):
    called right after each step is dispatched, with its metrics as device arrays (benchmarks block on
    them with `jax.block_until_ready` and read their own clock).

    The run folder is locked for the whole run (process 0; a second trainer fails naming the holder), and
    the config is checked -- types, then against the run's saved config when resuming -- before anything
    is written (`training/run_folder.py`)."""
    distributed.initialize(config.distributed)  # multi-host: join the job before any device is used
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    with run_folder.RunLock(workdir) if is_main else contextlib.nullcontext():
        run_folder.check_config_types(config)
        changes = run_folder.check_resume(config, workdir, is_main=is_main)
        return _train(config, workdir, devices, stop_after_steps, changes, on_step)


def _train(config, workdir: Path, devices, stop_after_steps, config_changes, on_step) -> dict:
    """The run itself: setup -> restore -> compile -> loop (see the module docstring)."""
    is_main = jax.process_index() == 0
    # ------------------------------------------------------------------ setup
    s = _setup(config, workdir, devices)
    state, mesh = s.state, s.mesh
    state_sh = state_lib.state_shardings(state, mesh, config.sharding)
    step_fn = jax.jit(
        functools.partial(train_step, spec=s.spec), donate_argnums=0, out_shardings=(state_sh, NamedSharding(mesh, P()))
    )
    batch_sh = shard_lib.batch_sharding(mesh, config.sharding)
    # Replicated once, explicitly (made on the devices: a multi-host safe way to place a key array).
    rng = jax.jit(lambda: jax.random.key(config.seed), out_shardings=NamedSharding(mesh, P()))()
    mngr = ckpt_lib.make_manager(workdir, config.keep_checkpoints, asynchronous=config.async_checkpointing)
    it, bad_records = data_lib.make_iterator(
        config,
        s.tokenizers,
        workdir,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        id_image_size=s.id_image_size,
        id_inputs=s.id_inputs,
    )
    next_batch = lambda: shard_lib.put_batch(data_lib.model_inputs(next(it), s.text_fields), batch_sh)  # noqa: E731
    # ------------------------------------------------------------------ restore
    start, latest = 0, None
    target = state_lib.abstract_checkpoint(state.params, s.spec.tx, mesh, config.sharding)
    found = ckpt_lib.restore_latest(mngr, target, workdir)  # falls back past damaged checkpoints
    if found is not None:
        latest, restored, data_state = found
        state, start = state_lib.restore_state(state, restored), int(restored["step"])
        data_lib.restore_iterator(it, data_state)
        log.info("resumed from %s at step %d", mngr.directory, start)
    if is_main:  # only now, with the config checked and the checkpoint restored
        run_folder.record_config(config, workdir, start, config_changes)
        run_folder.supersede_metrics(workdir, start)
    total, writer = config.total_steps, MetricWriter(workdir)
    history: list[dict] = []
    if start >= total:
        log.info("already at step %d >= total_steps %d: nothing to do", start, total)
        writer.close()
        return _result(start, state, history)
    # ------------------------------------------------------------------ compile (AOT)
    batch: Any = next_batch()  # None between a step and the next fetch
    compiled, info = _compile(step_fn, state, batch, rng)
    # ------------------------------------------------------------------ loop
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", disable=not is_main or not config.progress_bar)
    last_saved = start if latest is not None else None
    t_log, n_log, step = time.perf_counter(), 0, start
    stop_agreed = distributed.StopAgreement(mesh)
    try:
        with _Preemption() as preempt:
            while step < total:
                batch = batch if batch is not None else next_batch()
                # Every host<->device copy in the loop is explicit (put_batch, device_get): an implicit one
                # (a Python scalar or numpy argument) would be a silent per-step transfer, so it is an error.
                with jax.transfer_guard("disallow"):
                    state, metrics = compiled(state, batch, rng)
                batch, step, n_log = None, step + 1, n_log + 1
                if on_step is not None:
                    on_step(step, metrics)
                logged = step % config.log_every == 0 or step == total
                if logged:
                    # Dispatch is asynchronous: the clock is read once the step has finished, not when it was
                    # queued (which timed the dispatch: img/s 4.5x too high at log_every=1). From one reading
                    # to the next, so logging, batches and checkpoints count: the rate seen from outside.
                    jax.block_until_ready(metrics)
                    now = time.perf_counter()
                    m = _host_metrics(metrics, step, n_log, now - t_log, config, s.groups, workdir)
                    writer.write(step, m)
                    history.append({"step": step, **m})
                    bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['img_per_s']:.1f}")
                    t_log, n_log = now, 0
                bar.update(1)
                bad_records.after_step(step)
                if step % config.checkpoint_every == 0:
                    if not logged:  # a logged step was checked already; a saved step is never non-finite
                        _check_finite(metrics, step, workdir)
                    ckpt_lib.save(mngr, step, state_lib.checkpoint_tree(state), data_lib.iterator_state(it))
                    last_saved = step
                if s.validator is not None and step % config.eval_every == 0:
                    jax.block_until_ready(metrics)  # the step's own time is not counted as validation
                    t_eval = time.perf_counter()
                    s.validator(s.spec.split.merge(state.params, state.frozen, state.rest), step, writer)
                    t_log += time.perf_counter() - t_eval  # img/s and step time count training only
                if stop_after_steps is not None and step >= stop_after_steps:
                    return _result(step, state, history, info)
                if stop_agreed(preempt.requested):  # all processes stop at the same step
                    log.warning("SIGTERM: saving step %d and exiting", step)
                    break
            # Still inside `_Preemption`: a SIGTERM now must not kill the save.
            if last_saved != step:
                if not logged:
                    _check_finite(metrics, step, workdir)
                ckpt_lib.save(
                    mngr, step, state_lib.checkpoint_tree(state), data_lib.iterator_state(it), force=True, wait=True
                )
            mngr.wait_until_finished()  # a periodic save may still be writing
        bad_records.report(f"end of training (step {step})")
    finally:
        bar.close()
        writer.close()
        mngr.close()
    return _result(step, state, history, info)
