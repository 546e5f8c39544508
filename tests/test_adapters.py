"""Adapter cross-attentions (DESIGN point 4) on a small SDXL-style UNet (Flax only, random init, fp32):
absent conditions / zero scales leave the UNet output exactly unchanged, present ones change it,
per-sample [B] scales act per sample, gradients reach every adapter parameter, and the adapter and
LoRA folders round-trip.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import lora
from persongen_jax.models.unet import UNet2DConditionModel

B, IMG_DIM = 2, 24
NAMES = ("bg", "body", "id")
# Smaller than the "tiny" preset (one cross-attention level) so each compiled variant stays cheap.
CONFIG = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "attention_head_dim": [2, 2],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "transformer_layers_per_block": 1,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
}


def _plain_unet():
    return UNet2DConditionModel.from_config(CONFIG, rngs=nnx.Rngs(0))


@nnx.jit
def _call(model, x, cond, scales):
    return model(
        x["sample"], x["timesteps"], x["ehs"], x["text_embeds"], x["time_ids"], conditions=cond, condition_scales=scales
    )


def _unet(mode, **kw):
    model = _plain_unet()
    plain = _call(model, INPUTS, None, None)
    lora.add_adapters(
        model,
        NAMES,
        mode=mode,
        scales={"bg": 1.0, "body": 0.5, "id": 0.8},
        image_projection={"condition": "id", "image_embed_dim": IMG_DIM, "num_tokens": 4},
        rngs=nnx.Rngs(1),
        **kw,
    )
    return model, plain


def _inputs(seed=0):
    k = iter(jax.random.split(jax.random.key(seed), 8))
    n = lambda *s: jax.random.normal(next(k), s)
    return dict(
        sample=n(B, 8, 8, 4),
        timesteps=jnp.array([5, 600]),
        ehs=n(B, 7, 32),
        text_embeds=n(B, 32),
        time_ids=jnp.tile(jnp.array([[64.0, 64, 0, 0, 64, 64]]), (B, 1)),
        bg=n(B, 5, 32),
        body=n(B, 6, 32),
        image=n(B, 2, IMG_DIM),
    )


INPUTS = _inputs()


def _conditions(model, names=NAMES):
    cond = {"bg": INPUTS["bg"], "body": INPUTS["body"], "id": model.image_proj(INPUTS["image"])}
    return {n: cond[n] for n in names}


@pytest.fixture(scope="module", params=["sequential", "parallel"])
def adapted(request):
    return (request.param,) + _unet(request.param)


def _scales(**kw):
    """[B] scales for every condition (one compiled variant for all the cases below)."""
    return {n: jnp.asarray(kw.get(n, [0.0] * B), jnp.float32) for n in NAMES}


def test_absent_or_zero_scale_is_exactly_the_plain_unet(adapted):
    mode, model, plain = adapted
    np.testing.assert_array_equal(_call(model, INPUTS, None, None), plain)
    np.testing.assert_array_equal(_call(model, INPUTS, _conditions(model), _scales()), plain)


def test_conditions_change_the_output_per_sample(adapted):
    mode, model, plain = adapted
    cond = _conditions(model)
    out = np.asarray(_call(model, INPUTS, cond, _scales(bg=[1.0, 1], body=[0.5, 0.5], id=[0.8, 0.8])))
    assert np.abs(out - plain).max() > 1e-3
    for name in NAMES:  # each condition alone matters
        one = np.asarray(_call(model, INPUTS, cond, _scales(**{name: [1.0, 1.0]})))
        assert np.abs(one - plain).max() > 1e-4, name
    # Per-sample scales: conditions dropped for sample 1 only (condition dropout in training).
    mixed = np.asarray(_call(model, INPUTS, cond, _scales(bg=[1.0, 0], body=[1.0, 0], id=[1.0, 0])))
    np.testing.assert_array_equal(mixed[1], plain[1])
    assert np.abs(mixed[0] - plain[0]).max() > 1e-3


def test_gradients_reach_every_adapter_param(adapted):
    mode, model, _ = adapted

    def loss(m):
        cond = {"bg": INPUTS["bg"], "body": INPUTS["body"], "id": m.image_proj(INPUTS["image"])}
        y = m(
            INPUTS["sample"],
            INPUTS["timesteps"],
            INPUTS["ehs"],
            INPUTS["text_embeds"],
            INPUTS["time_ids"],
            conditions=cond,
        )
        return jnp.mean(jnp.square(y))

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, lora.AdapterParam)))(model)
    flat = {lora.path_str(p): v.get_value() for p, v in nnx.to_flat_state(grads)}
    assert flat and all(not k.endswith(("to_q.kernel", "to_k.kernel")) for k in flat)  # only adapter params
    groups = {}
    for k, g in flat.items():
        m = re.search(r"\.processor\.to_([kv])\.(\w+)\.", k)  # ...attn2.processor.to_k.<name>.kernel
        leaf = f"to_{m[1]}_{m[2]}" if m else "image_proj"
        groups[leaf] = groups.get(leaf, 0.0) + float(jnp.abs(g).sum())
    assert set(groups) == {f"to_{kv}_{n}" for kv in "kv" for n in NAMES} | {"image_proj"}
    assert all(v > 0 for v in groups.values()), groups


def test_adapter_and_lora_folders_round_trip(tmp_path):
    model, _ = _unet("sequential")
    lora.add_lora(model, 2, 4.0, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Any(lora.AdapterParam, lora.LoRAParam))):
        var.set_value(var.get_value() + jnp.asarray(rng.standard_normal(var.get_value().shape), jnp.float32) * 0.05)
    out = _call(model, INPUTS, _conditions(model), None)
    lora.save_adapters(model, tmp_path / "adapters")
    lora.save_lora(model, tmp_path / "lora")

    again = _plain_unet()
    lora.load_adapters(again, tmp_path / "adapters")
    lora.load_lora(again, tmp_path / "lora")
    assert lora.adapter_config(again) == lora.adapter_config(model)
    np.testing.assert_array_equal(_call(again, INPUTS, _conditions(again), None), out)
    with pytest.raises(ValueError, match="already has adapters"):
        lora.load_adapters(again, tmp_path / "adapters")
    # flax's own LoRA filter selects our LoRA factors (LoRAParam subclasses nnx.LoRAParam).
    assert jax.tree.structure(nnx.state(model, nnx.LoRAParam)) == jax.tree.structure(nnx.state(model, lora.LoRAParam))


def test_version_1_folders_load(tmp_path):
    """Folders written before the processor layout (`...attn2.to_k_<name>`, format version 1) still load."""
    from persongen_jax.models import modeling

    model, _ = _unet("parallel", copy_lora=False)
    lora.add_lora(model, 2, 4.0, rngs=nnx.Rngs(3), targets=(r".*\.attn2\.processor\.to_[kv]\.bg",))
    rng = np.random.default_rng(1)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Any(lora.AdapterParam, lora.LoRAParam))):
        var.set_value(var.get_value() + jnp.asarray(rng.standard_normal(var.get_value().shape), jnp.float32) * 0.05)
    out = _call(model, INPUTS, _conditions(model), None)
    old = lambda path: re.sub(r"\.processor\.to_([kv])\.(\w+)", r".to_\1_\2", path)  # the version-1 layout
    for kind, save, param_type in (
        ("adapters", lora.save_adapters, lora.AdapterParam),
        ("lora", lora.save_lora, lora.LoRAParam),
    ):
        save(model, tmp_path / kind)
        cfg = json.loads((tmp_path / kind / "config.json").read_text())
        cfg["version"] = 1
        if kind == "lora":
            cfg["modules"] = {old(p): m for p, m in cfg["modules"].items()}
        flat = {
            tuple(old(lora.path_str(p)).split(".")): v.get_value()
            for p, v in nnx.to_flat_state(nnx.state(model, param_type))
        }
        assert any("to_k_bg" in k for k in flat)
        lora.write_folder(tmp_path / f"{kind}_v1", cfg, flat)
    assert "to_k_bg" in (tmp_path / "lora_v1" / modeling.CONFIG_FILE).read_text()
    again = _plain_unet()
    lora.load_adapters(again, tmp_path / "adapters_v1")
    lora.load_lora(again, tmp_path / "lora_v1")
    np.testing.assert_array_equal(_call(again, INPUTS, _conditions(again), None), out)


def test_copy_lora_into_adapter_layers():
    model = _plain_unet()
    lora.add_lora(model, 2, rngs=nnx.Rngs(1))
    lora.add_adapters(model, ["bg"], mode="parallel", copy_lora=True)
    for attn in lora.cross_attentions(model).values():
        for src, dst in ((attn.to_k, attn.processor.to_k["bg"]), (attn.to_v, attn.processor.to_v["bg"])):
            np.testing.assert_array_equal(dst.kernel[...], src.kernel[...])
            np.testing.assert_array_equal(dst.lora_A.kernel[...], src.lora_A.kernel[...])
            assert isinstance(dst.kernel, lora.AdapterParam) and isinstance(dst.lora_A.kernel, lora.LoRAParam)
    with pytest.raises(ValueError, match="no adapter layers"):
        jax.eval_shape(
            lambda: model(
                INPUTS["sample"],
                INPUTS["timesteps"],
                INPUTS["ehs"],
                INPUTS["text_embeds"],
                INPUTS["time_ids"],
                conditions={"id": INPUTS["bg"]},
            )
        )
