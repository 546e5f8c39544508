"""The training loop: `train_and_evaluate(config, workdir)`.

Sections: setup (mesh, model, trainable/frozen split, optimizer, shardings) -> restore (latest complete
checkpoint in WORKDIR/checkpoints, data iterator position included) -> AOT compile of the one jitted
train step (memory analysis logged) -> loop (metrics, checkpoints, eval hook, SIGTERM) -> final save.

Validation (`training/validation.py`) runs every `config.eval_every` steps when `config.eval.sets` names
validation folders: the protocol of `python -m persongen_jax.evaluate` with the current parameters.

A "step" is one call of the train step on one global batch; with `optim.grad_accum_steps = k` the
optimizer updates every k steps (optax.MultiSteps), so the effective batch is k x global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from persongen_jax.pipeline import prompt as prompt_lib
from persongen_jax.training import checkpoint as ckpt_lib
from persongen_jax.training import data as data_lib
from persongen_jax.training import optimizer as optim_lib
from persongen_jax.training import run_folder
from persongen_jax.training import sharding as shard_lib
from persongen_jax.training.loss import compute_loss
from persongen_jax.training.metrics import MetricWriter
from persongen_jax.training.model import build_model
from persongen_jax.training.validation import Validator
from persongen_jax.models import lora as lora_lib

log = logging.getLogger("persongen_jax.train")


class NonFiniteLossError(FloatingPointError):
    pass


def _split_model(model, groups):
    def trainable(path, value):
        return isinstance(value, nnx.Param) and optim_lib.group_of(optim_lib.path_str(path), groups) is not None

    graphdef, train_state, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    flat = list(nnx.to_flat_state(train_state))
    params = {optim_lib.path_str(p): v.get_value() for p, v in flat}
    template = [(p, optim_lib.path_str(p), v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)))
                for p, v in flat]
    return graphdef, params, template, frozen, rest


def _merge_model(graphdef, template, params: dict, frozen, rest):
    """The inverse of `_split_model`: the model with trainable params {path: array} put back in."""
    train_state = nnx.from_flat_state([(p, v.replace(params[k])) for p, k, v in template])
    return nnx.merge(graphdef, train_state, frozen, rest)


class _Preemption:
    """SIGTERM -> save and exit cleanly after the current step."""

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
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _result(step, params, frozen, history, compiled_info=None) -> dict:
    """Host copies: trainable params {path: array}, frozen params {path: array}, the logged metrics,
    and facts about the compiled step (compile_s, flops_per_step, memory)."""
    flat_frozen = {optim_lib.path_str(p): v.get_value() for p, v in nnx.to_flat_state(frozen)}
    return {"step": step, "params": jax.device_get(params), "frozen": jax.device_get(flat_frozen),
            "history": history, "compiled": dict(compiled_info or {})}


def train_and_evaluate(config, workdir: str | Path, *, devices=None, stop_after_steps: int | None = None) -> dict:
    """Trains per `config` in `workdir`; returns {"step", "params" (host numpy, flat), "history"}.

    devices: the mesh devices (default: all). stop_after_steps: return right after that step
    without the final save (tests: simulates a kill after a periodic checkpoint).

    The run folder is locked for the whole run (process 0; a second trainer fails naming the holder), and
    the config is checked -- types, then against the run's saved config when resuming -- before anything
    is written (`training/run_folder.py`)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    with run_folder.RunLock(workdir) if is_main else contextlib.nullcontext():
        run_folder.check_config_types(config)
        changes = run_folder.check_resume(config, workdir, is_main=is_main)
        return _train(config, workdir, devices, stop_after_steps, changes)


def _train(config, workdir: Path, devices, stop_after_steps, config_changes) -> dict:
    is_main = jax.process_index() == 0
    # ------------------------------------------------------------------ setup
    mesh = shard_lib.make_mesh(config.sharding, devices)
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    if config.data.global_batch_size % mesh.shape[shard_lib.rule(config.sharding, "batch")]:
        raise ValueError(f"config.data.global_batch_size={config.data.global_batch_size} is not divisible by the "
                         f"{dict(mesh.shape)} mesh's batch axis")
    model, tokenizers, scheduler = build_model(config, workdir)
    # Validation sets and scoring models load now: a wrong path fails before any training.
    validator = Validator.from_config(config, workdir, tokenizers) if config.eval_every else None
    if validator is None:
        log.info("no validation during training (set config.eval.sets and config.eval_every to turn it on)")
    groups = {g: dict(spec) for g, spec in config.trainable.items() if spec.lr > 0}
    graphdef, params, template, frozen, rest = _split_model(model, groups)
    counts = optim_lib.check_groups(params, groups)
    n_train = sum(int(np.prod(v.shape)) for v in params.values())
    n_frozen = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(frozen))
    log.info("trainable groups %s: %.2fM params trainable, %.2fM frozen", counts, n_train / 1e6, n_frozen / 1e6)
    adapters = lora_lib.adapter_config(model.unet)
    id_image_size = model.id_encoder.config.vision.image_size
    del model

    tx = optim_lib.make_optimizer(params, groups, config.optim)
    p_sh = shard_lib.tree_shardings(params, mesh, config.sharding)
    params = jax.device_put(params, p_sh)
    frozen = jax.device_put(frozen, shard_lib.tree_shardings(frozen, mesh, config.sharding))
    rest = jax.device_put(rest, NamedSharding(mesh, P()))
    o_sh = shard_lib.tree_shardings(jax.eval_shape(tx.init, params), mesh, config.sharding)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    b_sh = shard_lib.batch_sharding(mesh, config.sharding)
    repl = NamedSharding(mesh, P())

    empty_ids = tuple(jnp.asarray(prompt_lib.tokenize(t, [""])) for t in tokenizers)
    compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else None
    loss_cfg = dict(config.loss)

    def train_step(params, opt_state, frozen, rest, batch, step, key):
        key = jax.random.fold_in(key, step)

        def loss_fn(params):
            m = _merge_model(graphdef, template, params, frozen, rest)
            return compute_loss(m, batch, key, scheduler=scheduler, loss_cfg=loss_cfg,
                                id_injection=config.id_injection, adapters=adapters, empty_ids=empty_ids,
                                compute_dtype=compute_dtype)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(new_params),
                   "update_norm": optax.tree.norm(updates), **aux}
        return new_params, opt_state, metrics

    step_jit = jax.jit(train_step, donate_argnums=(0, 1), out_shardings=(p_sh, o_sh, repl))
    base_key = jax.random.key(config.seed)

    # ------------------------------------------------------------------ restore
    mngr = ckpt_lib.make_manager(workdir, config.keep_checkpoints)
    it, bad_records = data_lib.make_iterator(config, tokenizers, workdir, shard_index=jax.process_index(),
                                shard_count=jax.process_count(), id_image_size=id_image_size)
    start = 0
    latest = None
    if mngr.latest_step() is not None:
        state = {"params": params, "opt_state": opt_state, "step": np.int64(0)}
        shardings = {"params": p_sh, "opt_state": o_sh, "step": None}
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s or repl), state, shardings,
            is_leaf=lambda x: x is None)
        found = ckpt_lib.restore_latest(mngr, abstract, workdir)  # falls back past damaged checkpoints
        if found is not None:
            latest, restored, data_state = found
            params, opt_state, start = restored["params"], restored["opt_state"], int(restored["step"])
            data_lib.restore_iterator(it, data_state)
            log.info("resumed from %s at step %d", mngr.directory, start)
    if is_main:  # only now, with the config checked and the checkpoint restored
        run_folder.record_config(config, workdir, start, config_changes)
        run_folder.supersede_metrics(workdir, start)

    total = config.total_steps
    writer = MetricWriter(workdir)
    history: list[dict] = []
    if start >= total:
        log.info("already at step %d >= total_steps %d: nothing to do", start, total)
        writer.close()
        return _result(start, params, frozen, history)

    # ------------------------------------------------------------------ compile (AOT)
    batch = shard_lib.put_batch(data_lib.model_inputs(next(it)), b_sh)
    t0 = time.perf_counter()
    compiled = step_jit.lower(params, opt_state, frozen, rest, batch, jnp.int32(start), base_key).compile()
    info = {"compile_s": time.perf_counter() - t0}
    log.info("train step compiled in %.1fs", info["compile_s"])
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["flops_per_step"] = float(cost.get("flops", 0.0)) or None
    except Exception:  # best effort on some backends
        info["flops_per_step"] = None
    try:
        mem = compiled.memory_analysis()
        info["memory_mib"] = {"args": mem.argument_size_in_bytes / 2**20, "temp": mem.temp_size_in_bytes / 2**20,
                              "output": mem.output_size_in_bytes / 2**20}
        log.info("compiled memory: args %.1f MiB, temp %.1f MiB, outputs %.1f MiB, generated code %.1f MiB",
                 mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20,
                 mem.output_size_in_bytes / 2**20, mem.generated_code_size_in_bytes / 2**20)
    except Exception as e:  # not every backend implements it
        log.info("compiled memory analysis unavailable: %s", e)

    # ------------------------------------------------------------------ loop
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="train", disable=not is_main or not config.progress_bar)
    gb = config.data.global_batch_size
    accum = max(1, config.optim.grad_accum_steps)
    last_saved = start if latest is not None else None
    t_log, n_log = time.perf_counter(), 0
    step = start
    try:
        with _Preemption() as preempt:
            while step < total:
                if batch is None:
                    batch = shard_lib.put_batch(data_lib.model_inputs(next(it)), b_sh)
                params, opt_state, metrics = compiled(params, opt_state, frozen, rest, batch, jnp.int32(step),
                                                      base_key)
                batch = None
                step += 1
                n_log += 1
                if step % config.log_every == 0 or step == total:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(m["loss"]):
                        raise NonFiniteLossError(
                            f"loss is {m['loss']} at step {step}: stopping (grad_norm {m['grad_norm']}); lower "
                            "the learning rates, enable optim.grad_clip_norm, or use float32; the last good "
                            f"checkpoint is in {workdir / 'checkpoints'}")
                    dt = time.perf_counter() - t_log
                    m["img_per_s"] = n_log * gb / dt
                    m["step_time_s"] = dt / n_log
                    opt_step = (step - 1) // accum
                    for g, spec in groups.items():
                        m[f"lr/{g}"] = float(spec["lr"]) * float(optim_lib.warmup_factor(opt_step,
                                                                                         config.optim.warmup_steps))
                    writer.write(step, m)
                    history.append({"step": step, **m})
                    bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{m['img_per_s']:.1f}")
                    t_log, n_log = time.perf_counter(), 0
                bar.update(1)
                bad_records.after_step(step)
                if step % config.checkpoint_every == 0:
                    ckpt_lib.save(mngr, step, {"params": params, "opt_state": opt_state, "step": np.int64(step)},
                                  data_lib.iterator_state(it))
                    last_saved = step
                if validator is not None and step % config.eval_every == 0:
                    t_eval = time.perf_counter()
                    validator(_merge_model(graphdef, template, params, frozen, rest), step, writer)
                    t_log += time.perf_counter() - t_eval  # img/s and step time count training only
                if stop_after_steps is not None and step >= stop_after_steps:
                    return _result(step, params, frozen, history, info)
                if preempt.requested:
                    log.warning("SIGTERM: saving step %d and exiting", step)
                    break
        if last_saved != step:
            ckpt_lib.save(mngr, step, {"params": params, "opt_state": opt_state, "step": np.int64(step)},
                          data_lib.iterator_state(it), force=True)
        bad_records.report(f"end of training (step {step})")
    finally:
        bar.close()
        writer.close()
        mngr.close()
    return _result(step, params, frozen, history, info)
