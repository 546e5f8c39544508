"""SDXL UNet2DConditionModel: parity with diffusers (fp32, randomised weights, tiny configs),
the SDXL base parameter count, and config validation.

Tolerance: rtol = atol = 1e-4 on the noise prediction.
"""

from __future__ import annotations

import helpers  # tests/ is on sys.path (rootdir conftest, no package)
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import modeling
from persongen_jax.models.unet import UNet2DConditionModel, UNetConfig
from weights_conversion import core

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B = 2
SDXL_BASE_PARAMS = 2_567_463_684  # counted from diffusers' own model on the meta device below


def _torch_unet(cfg: dict, seed: int):
    helpers.torch_precise()
    kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    model = diffusers.UNet2DConditionModel(**kwargs).eval()
    helpers.randomize_(model, seed=seed)
    return model


@nnx.jit
def _call(model, *args):
    return model(*args)


def _inputs(cfg: dict, h: int, w: int, seed: int, timesteps=(0, 999)):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    out = {
        "sample": f(B, cfg.get("in_channels", 4), h, w),
        "timesteps": np.asarray(timesteps, np.int64),
        "encoder_hidden_states": f(B, 7, np.atleast_1d(cfg["cross_attention_dim"])[0]),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        out["text_embeds"] = f(B, pooled)
        out["time_ids"] = np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 48, 640, 832]], np.float32)
    return out


def _compare(torch_model, flax_model, inputs: dict):
    T = lambda k: torch.from_numpy(inputs[k])
    added = {k: T(k) for k in ("text_embeds", "time_ids") if k in inputs}
    with torch.no_grad():
        ref = torch_model(
            T("sample"), T("timesteps"), T("encoder_hidden_states"), added_cond_kwargs=added or None
        ).sample.numpy()
    args = [
        jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)),
        jnp.asarray(inputs["timesteps"]),
        jnp.asarray(inputs["encoder_hidden_states"]),
    ]
    args += [jnp.asarray(inputs[k]) for k in ("text_embeds", "time_ids") if k in inputs]
    out = np.asarray(_call(flax_model, *args)).transpose(0, 3, 1, 2)
    helpers.assert_close(out, ref, rtol=1e-4, atol=1e-4, name="noise prediction")


# ----------------------------------------------------------------------------- tiny SDXL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, diffusers model, our model converted through the real CLI)."""
    cfg = helpers.parity_unet_config()
    torch_model = _torch_unet(cfg, seed=0)
    root = tmp_path_factory.mktemp("unet")
    torch_model.save_pretrained(root / "src" / "unet")  # an SDXL folder holding only the unet
    model = helpers.convert_and_load("sdxl", root / "src", root / "dst", component="unet")
    assert type(model) is UNet2DConditionModel
    return cfg, torch_model, model


@pytest.mark.parametrize("hw", [(32, 48), (34, 45)], ids=["32x48", "34x45-not-divisible-by-4"])
def test_tiny_sdxl_parity(tiny, hw):
    cfg, torch_model, model = tiny
    assert model.num_upsamplers == 2  # so 34x45 exercises the explicit upsample sizes
    _compare(torch_model, model, _inputs(cfg, *hw, seed=1))


def test_text_time_requires_added_conditions(tiny):
    cfg, _, model = tiny
    x = _inputs(cfg, 8, 8, seed=2)
    with pytest.raises(ValueError, match="text_embeds"):
        model(
            jnp.asarray(x["sample"].transpose(0, 2, 3, 1)),
            jnp.asarray(x["timesteps"]),
            jnp.asarray(x["encoder_hidden_states"]),
        )


def test_conv_projection_variant_parity():
    """SD1.x-style options: conv proj_in/out, cross-attention blocks first, per-block lists,
    asymmetric transformer depths, no added conditions, sin-first embedding with freq_shift 1,
    unpadded downsampling, centred input, a scalar timestep."""
    cfg = {
        "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": [1, 1],
        "attention_head_dim": [2, 4],
        "cross_attention_dim": [24, 24],
        "norm_num_groups": 4,
        "transformer_layers_per_block": [[2], [1]],
        "reverse_transformer_layers_per_block": [[1, 1], [1, 2]],
        "use_linear_projection": False,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "center_input_sample": True,
        "mid_block_scale_factor": 1.5,
    }
    torch_model = _torch_unet(cfg, seed=3)
    # In memory: the CLI path is covered by the tiny SDXL fixture.
    model = core.load_from_torch_state_dict(UNet2DConditionModel, cfg, torch_model.state_dict())
    _compare(torch_model, model, _inputs(cfg, 13, 18, seed=4, timesteps=500))


# ----------------------------------------------------------------------------- SDXL base


def test_sdxl_base_preset_shapes_and_keys():
    cfg = UNet2DConditionModel.preset_config("sdxl_base")
    parsed = UNetConfig.from_dict(cfg)
    assert parsed.transformer_layers_per_block == (1, 2, 10) and parsed.attention_head_dim == (5, 10, 20)
    ours = {
        core.torch_key(p): tuple(v.shape)
        for p, v in modeling.flat_params(modeling.abstract_model(UNet2DConditionModel, cfg)).items()
    }
    with torch.device("meta"):  # shapes only, no memory
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sorted(ours) == sorted(ref_shapes)
    assert sum(np.prod(s) for s in ref_shapes.values()) == SDXL_BASE_PARAMS
    assert sum(np.prod(s) for s in ours.values()) == SDXL_BASE_PARAMS


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "override, match",
    [
        ({"down_block_types": ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]}, "AttnDownBlock2D"),
        (
            {"up_block_types": ["SimpleCrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]},
            "SimpleCrossAttnUpBlock2D",
        ),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"addition_embed_type": "text"}, "addition_embed_type"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"num_attention_heads": 8}, "num_attention_heads"),
        ({"attention_type": "gated"}, "attention_type"),
        ({"time_cond_proj_dim": 16}, "time_cond_proj_dim"),
        ({"some_new_option": 1}, "some_new_option"),
        ({"attention_head_dim": [2, 4]}, "attention_head_dim"),
        ({"transformer_layers_per_block": [[1, 1], [2, 2], [2, 2]]}, "reverse_transformer_layers_per_block"),
    ],
)
def test_unsupported_config_raises(override, match):
    cfg = helpers.parity_unet_config()
    cfg.update(override)
    with pytest.raises(ValueError, match=match):
        UNet2DConditionModel.from_config(cfg, rngs=nnx.Rngs(0))


def test_unknown_preset():
    with pytest.raises(ValueError, match="sdxl_base"):
        UNet2DConditionModel.preset_config("sd3")
