"""The memory / speed features for research-scale training, each checked on the micro/tiny sizes.

frozen_dtype (frozen params bf16, trainable + optimizer state fp32), remat (same gradients, fewer saved
residuals), attention cudnn (falls back on CPU with one log line, same numbers as xla), asynchronous
checkpoints (save returns before the files are complete). Resume and SIGTERM with async checkpoints are
covered by tests/test_training.py (test_sigkill_then_resume_is_bitwise_identical, test_cli_one_step_then_...).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # what print_saved_residuals prints, as data

from configs import default
from persongen_jax import train as train_cli
from persongen_jax.models import layers, modeling, presets
from persongen_jax.models.unet import REMAT_CHOICES, UNet2DConditionModel
from persongen_jax.training import checkpoint as ckpt_lib
from persongen_jax.training import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]


def test_frozen_bf16_state_dtypes_and_loss_close_to_fp32(tmp_path):
    """The demo config (micro, synthetic data) for 3 steps: with frozen_dtype=bfloat16 every frozen float
    param is bf16, trainable params fp32, and each step's loss is within 1e-2 (relative) of the fp32 run.
    The bf16 run also rematerialises (remat=full: the train loop with jax.checkpoint'ed UNet blocks; remat
    itself does not change the numbers, test_remat_same_gradients_fewer_saved_residuals)."""
    runs = {}
    for dt, remat in (("float32", "none"), ("bfloat16", "full")):
        c = train_cli.load_config(str(REPO / "configs" / "demo.py"))
        c.model, c.data.source, c.frozen_dtype, c.remat = "micro", "synthetic", dt, remat
        c.data.global_batch_size, c.total_steps, c.log_every, c.checkpoint_every = 2, 3, 1, 3
        c.progress_bar = False
        runs[dt] = train_and_evaluate(c, tmp_path / dt, devices=jax.devices()[:1])
    bf16 = runs["bfloat16"]
    floats = [v for v in bf16["frozen"].values() if np.issubdtype(v.dtype, np.floating) or v.dtype == jnp.bfloat16]
    assert floats and all(v.dtype == jnp.bfloat16 for v in floats)
    assert all(v.dtype == np.float32 for v in bf16["params"].values())
    assert all(v.dtype == np.float32 for v in runs["float32"]["frozen"].values() if v.dtype.kind == "f")
    a = np.array([h["loss"] for h in runs["float32"]["history"]])
    b = np.array([h["loss"] for h in bf16["history"]])
    assert len(a) == 3
    np.testing.assert_allclose(b, a, rtol=1e-2)


def _unet_grads_and_residuals(size: str, mode: str, b: int = 2, r: int = 16, grads: bool = True):
    cfg = presets.get(size).unet
    unet = modeling.random_init(UNet2DConditionModel, cfg, 0)
    unet.remat = mode
    x = jax.random.normal(jax.random.key(1), (b, r, r, 4))
    ctx = jax.random.normal(jax.random.key(2), (b, 8, cfg["cross_attention_dim"]))
    te = jax.random.normal(
        jax.random.key(3), (b, cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"])
    )
    tid = jnp.tile(jnp.array([[r * 8, r * 8, 0, 0, r * 8, r * 8]], jnp.float32), (b, 1))
    graphdef, params, rest = nnx.split(unet, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(x, jnp.arange(b) * 300 + 10, ctx, text_embeds=te, time_ids=tid)
        return jnp.mean(out**2)

    # What the backward pass keeps (the list jax.ad_checkpoint.print_saved_residuals prints), traced only.
    saved = sum(aval.size * aval.dtype.itemsize for aval, _ in saved_residuals(loss, params))
    return (jax.jit(jax.grad(loss))(params) if grads else None), saved


def test_remat_same_gradients_fewer_saved_residuals():
    """Every remat setting: gradients equal to no remat (1e-5) and fewer bytes kept for the backward pass
    than no remat (full < dots_saveable < none). The figure is JAX's saved-residual set (what
    jax.ad_checkpoint.print_saved_residuals lists): XLA:CPU's memory analysis does not show remat savings
    (its scheduler places the recomputation early), see docs/BENCHMARKS.md."""
    grads, saved = {}, {}
    modes = ("none", "full", "dots_saveable")
    for mode in modes:
        grads[mode], saved[mode] = _unet_grads_and_residuals("micro", mode)
    for mode in set(REMAT_CHOICES) - set(modes):  # the other policies: residuals only (no compile)
        saved[mode] = _unet_grads_and_residuals("micro", mode, grads=False)[1]
    ref = jax.tree.leaves(grads["none"])
    for mode in modes[1:]:
        for g, r in zip(jax.tree.leaves(grads[mode]), ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5, err_msg=mode)
    for mode in REMAT_CHOICES[1:]:
        assert saved[mode] < saved["none"], (mode, saved)
    assert saved["full"] < saved["dots_saveable"] < saved["none"], saved


def test_remat_unknown_policy_names_the_key(tmp_path):
    from persongen_jax.training.model import build_model

    c = default.tiny(default.get_config())
    c.remat = "dots"
    with pytest.raises(ValueError, match=r"config.remat='dots'; expected one of \['none', 'full', 'dots_saveable'"):
        build_model(c, tmp_path)


def test_cudnn_attention_falls_back_on_cpu_with_one_log_line(caplog):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8)) for i in range(3))
    layers._CUDNN_FALLBACKS_LOGGED.clear()
    with caplog.at_level(logging.WARNING, logger="persongen_jax"):
        out = [layers.dot_product_attention(q, k, v, implementation="cudnn") for _ in range(3)]
    said = [r.getMessage() for r in caplog.records if "cudnn" in r.getMessage()]
    assert said == ["attention: cudnn unsupported (backend cpu, not gpu); using the XLA attention"], said
    ref = layers.dot_product_attention(q, k, v, implementation="xla")
    for o in out:
        np.testing.assert_array_equal(np.asarray(o), np.asarray(ref))


def test_async_checkpoint_save_returns_before_the_write_completes(tmp_path):
    """`save` returns while orbax still writes (the loop goes on); the checkpoint is complete after
    `wait_until_finished` and restores bitwise."""
    mngr = ckpt_lib.make_manager(tmp_path, keep=2, asynchronous=True)
    state = {
        "params": {"w": jnp.arange(16 * 2**20, dtype=jnp.float32).reshape(4096, -1)},
        "opt_state": {"m": jnp.ones((1024, 1024))},
        "step": np.int64(1),
    }
    t0 = time.perf_counter()
    ckpt_lib.save(mngr, 1, state, {"state": {"step": 1}})
    returned = time.perf_counter() - t0
    in_flight = mngr.is_saving_in_progress()
    mngr.wait_until_finished()
    total = time.perf_counter() - t0
    assert in_flight, (returned, total)
    assert (tmp_path / "checkpoints" / "1" / "state").is_dir()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
    restored, data = ckpt_lib.restore(mngr, 1, target)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))
    assert data == {"state": {"step": 1}}
    mngr.close()
