"""SDXL ControlNet: parity of the down/mid residuals with diffusers' ControlNetModel (fp32, random
weights, zero convolutions randomised too, a non-default small size), the UNet taking the residuals, config
errors, and the conversion CLI (strict, --verify, a ControlNet made for another UNet).

Tolerance: rtol = atol = 1e-4 on every residual and on the UNet's output with residuals.
"""

from __future__ import annotations

import json

import helpers
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models.controlnet import ControlNetConfig, ControlNetModel, check_matches_unet
from persongen_jax.models.unet import UNetConfig

torch = pytest.importorskip("torch")
helpers.allow_torchvision_import()
diffusers = pytest.importorskip("diffusers")

B = 2
# Non-default: 3 levels of the parity UNet, a 3-step conditioning embedding (cond at 4x the latent size).
CN_KEYS = dict(conditioning_embedding_out_channels=[8, 16, 24])


def _config(**extra) -> dict:
    return ControlNetModel.config_for_unet(helpers.parity_unet_config(), **{**CN_KEYS, **extra})


def _torch_controlnet(cfg: dict, seed: int):
    helpers.torch_precise()
    model = diffusers.ControlNetModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    helpers.randomize_(model, seed=seed)
    return model


def _inputs(h: int, w: int, f: int, seed: int):
    rng = np.random.default_rng(seed)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "sample": n(B, h, w, 4),
        "timesteps": np.array([3, 871], np.int64),
        "encoder_hidden_states": n(B, 7, 32),
        "controlnet_cond": rng.random((B, f * h, f * w, 3)).astype(np.float32),
        "text_embeds": n(B, 32),
        "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 48, 640, 832]], np.float32),
    }


def _torch_residuals(model, x: dict, scale: float):
    T = lambda k: torch.from_numpy(x[k])  # noqa: E731
    nchw = lambda k: torch.from_numpy(np.ascontiguousarray(x[k].transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        down, mid = model(
            nchw("sample"),
            T("timesteps"),
            T("encoder_hidden_states"),
            controlnet_cond=nchw("controlnet_cond"),
            conditioning_scale=scale,
            added_cond_kwargs={"text_embeds": T("text_embeds"), "time_ids": T("time_ids")},
            return_dict=False,
        )
    return [d.numpy().transpose(0, 2, 3, 1) for d in down], mid.numpy().transpose(0, 2, 3, 1)


@nnx.jit
def _ours(model, x, scale):
    return model(
        x["sample"],
        x["timesteps"],
        x["encoder_hidden_states"],
        x["controlnet_cond"],
        scale,
        text_embeds=x["text_embeds"],
        time_ids=x["time_ids"],
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(config, diffusers ControlNet, ours converted through the real CLI, the folders)."""
    cfg = _config()
    ref = _torch_controlnet(cfg, seed=0)
    root = tmp_path_factory.mktemp("controlnet")
    ref.save_pretrained(root / "src")
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps(helpers.parity_unet_config()))
    helpers.run_cli("controlnet", root / "src", root / "dst", "--unet", root / "unet")
    from persongen_jax.models import from_pretrained

    model = from_pretrained(root / "dst")
    assert type(model) is ControlNetModel
    return cfg, ref, model, root


def test_residuals_match_diffusers(converted):
    """An odd latent size (9x7: the downsamplers round up) and a scale other than 1."""
    _, ref, model, _ = converted
    scale = 0.45
    x = _inputs(9, 7, f=4, seed=1)
    down_ref, mid_ref = _torch_residuals(ref, x, scale)
    down, mid = _ours(model, {k: jnp.asarray(v) for k, v in x.items()}, jnp.float32(scale))
    assert len(down) == len(down_ref) == 9  # conv_in + 2 per level + 2 downsamplers... as the UNet's skips
    for i, (a, b) in enumerate(zip(down, down_ref)):
        helpers.assert_close(a, b, rtol=1e-4, atol=1e-4, name=f"down residual {i}")
    helpers.assert_close(mid, mid_ref, rtol=1e-4, atol=1e-4, name="mid residual")


def test_bgr_order_and_global_pooling_match_diffusers():
    """The two config switches that change the numerics, in memory (the CLI path is the fixture's)."""
    from weights_conversion import core

    cfg = _config(controlnet_conditioning_channel_order="bgr", global_pool_conditions=True)
    ref = _torch_controlnet(cfg, seed=2)
    model = core.load_from_torch_state_dict(ControlNetModel, cfg, ref.state_dict())
    x = _inputs(4, 4, f=4, seed=3)
    down_ref, mid_ref = _torch_residuals(ref, x, 0.7)
    down, mid = _ours(model, {k: jnp.asarray(v) for k, v in x.items()}, jnp.float32(0.7))
    for i, (a, b) in enumerate(zip(down, down_ref)):
        helpers.assert_close(a, b, rtol=1e-4, atol=1e-4, name=f"down residual {i}")
    helpers.assert_close(mid, mid_ref, rtol=1e-4, atol=1e-4, name="mid residual")


def test_unet_with_residuals_matches_diffusers(converted):
    """The UNet adds the residuals where diffusers does (skips and mid block)."""
    from persongen_jax.models.unet import UNet2DConditionModel
    from weights_conversion import core

    _, ref, model, _ = converted
    ucfg = helpers.parity_unet_config()
    tunet = helpers.parity_unet(seed=5)
    unet = core.load_from_torch_state_dict(UNet2DConditionModel, ucfg, tunet.state_dict())
    x = _inputs(8, 12, f=4, seed=4)
    down_ref, mid_ref = _torch_residuals(ref, x, 0.8)
    T = lambda k: torch.from_numpy(x[k])  # noqa: E731
    with torch.no_grad():
        out_ref = (
            tunet(
                torch.from_numpy(np.ascontiguousarray(x["sample"].transpose(0, 3, 1, 2))),
                T("timesteps"),
                T("encoder_hidden_states"),
                added_cond_kwargs={"text_embeds": T("text_embeds"), "time_ids": T("time_ids")},
                down_block_additional_residuals=[
                    torch.from_numpy(np.ascontiguousarray(d.transpose(0, 3, 1, 2))) for d in down_ref
                ],
                mid_block_additional_residual=torch.from_numpy(np.ascontiguousarray(mid_ref.transpose(0, 3, 1, 2))),
            )
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    J = {k: jnp.asarray(v) for k, v in x.items()}
    down, mid = _ours(model, J, jnp.float32(0.8))
    out = nnx.jit(
        lambda u, d, m: u(
            J["sample"],
            J["timesteps"],
            J["encoder_hidden_states"],
            J["text_embeds"],
            J["time_ids"],
            down_block_additional_residuals=d,
            mid_block_additional_residual=m,
        )
    )(unet, down, mid)
    helpers.assert_close(out, out_ref, rtol=1e-4, atol=1e-4, name="UNet output with ControlNet residuals")


@pytest.mark.parametrize(
    "override, match",
    [
        ({"controlnet_conditioning_channel_order": "rbg"}, "controlnet_conditioning_channel_order"),
        ({"class_embed_type": "timestep"}, "ControlNet config: unsupported class_embed_type"),
        ({"up_block_types": ["UpBlock2D"] * 3}, "up_block_types"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_unsupported_config_raises(override, match):
    with pytest.raises(ValueError, match=match):
        ControlNetModel.from_config(_config(**override), rngs=nnx.Rngs(0))


def test_mismatched_unet_is_one_line_listing_the_shapes():
    cn = ControlNetConfig.from_dict(_config())
    other = dict(helpers.parity_unet_config(), block_out_channels=[32, 64, 128], cross_attention_dim=48)
    with pytest.raises(ValueError) as e:
        check_matches_unet(cn, UNetConfig.from_dict(other))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert "[32, 32, 32, 32, 64, 64, 64, 64, 64, 64]" in msg and "128" in msg and "cross_attention_dim" in msg
    check_matches_unet(cn, UNetConfig.from_dict(helpers.parity_unet_config()))  # its own UNet: fine


def test_cli_verify_and_errors(converted, tmp_path, capsys):
    """--verify prints the max differences (in-process: the torchvision stub is this process's); the default
    --unet (SDXL base) does not fit this ControlNet: one `error:` line listing both shapes, nothing written."""
    from weights_conversion.__main__ import main

    _, _, _, root = converted
    assert main(["controlnet", str(root / "src"), str(tmp_path / "v"), "--unet", str(root / "unet"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify v: down_0 max|diff|=" in out and "mid max|diff|=" in out
    worst = max(float(x.split("=")[1].rstrip(",")) for x in out.split() if x.startswith("max|diff|="))
    assert worst < 1e-3, out

    assert main(["controlnet", str(root / "src"), str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "residual channels [32, 32" in err and "[320, 320" in err and "cross_attention_dim" in err, err
    assert not (tmp_path / "w").exists()
    # Not a ControlNet folder: named, one line.
    assert main(["controlnet", str(root / "unet"), str(tmp_path / "x")]) == 1
    assert "_class_name 'UNet2DConditionModel'" in capsys.readouterr().err
