"""SDXL T2I-Adapter (full_adapter_xl): features vs diffusers' T2IAdapter (fp32, random weights, a small
non-default size, an odd feature size that exercises the ceil-mode pool), the UNet adding them as diffusers
does, and the conversion CLI (strict, --verify, an adapter for another UNet). Tolerance: rtol = atol = 1e-4."""

from __future__ import annotations

import json

import helpers
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models.t2i_adapter import T2IAdapter

torch = pytest.importorskip("torch")
helpers.allow_torchvision_import()
diffusers = pytest.importorskip("diffusers")

# For the parity UNet (widths 32, 64, 64; VAE factor 2 assumed): features at half the latent size.
CONFIG = {
    "_class_name": "T2IAdapter",
    "in_channels": 3,
    "channels": [32, 64, 64, 64],
    "num_res_blocks": 2,
    "downscale_factor": 4,
    "adapter_type": "full_adapter_xl",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from weights_conversion.__main__ import main as convert

    helpers.torch_precise()
    ref = diffusers.T2IAdapter(**{k: v for k, v in CONFIG.items() if not k.startswith("_")}).eval()
    helpers.randomize_(ref, seed=0)
    root = tmp_path_factory.mktemp("t2i")
    ref.save_pretrained(root / "src")
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps(helpers.parity_unet_config()))
    assert convert(["t2i-adapter", str(root / "src"), str(root / "dst"), "--unet", str(root / "unet")]) == 0
    from persongen_jax.models import from_pretrained

    model = from_pretrained(root / "dst")
    assert type(model) is T2IAdapter
    return ref, model, root


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_features_match_diffusers(converted):
    ref, model, _ = converted
    image = np.random.default_rng(1).random((2, 4 * 7, 4 * 6, 3)).astype(np.float32)  # 7x6 -> pooled 4x3
    with torch.no_grad():
        expected = [f.numpy().transpose(0, 2, 3, 1) for f in ref(_nchw(image))]
    ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(image))
    assert [f.shape for f in ours] == [(2, 7, 6, 32), (2, 7, 6, 64), (2, 4, 3, 64), (2, 4, 3, 64)]
    for i, (a, b) in enumerate(zip(ours, expected)):
        helpers.assert_close(a, b, rtol=1e-4, atol=1e-4, name=f"feature {i}")


def test_unet_with_adapter_features_matches_diffusers(converted):
    """down_intrablock_additional_residuals: after the plain block (in place: its last skip too), inside the
    cross-attention blocks, and on the mid block's output."""
    from persongen_jax.models.unet import UNet2DConditionModel
    from weights_conversion import core

    ref, model, _ = converted
    ucfg = helpers.parity_unet_config()
    tunet = diffusers.UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")}).eval()
    helpers.randomize_(tunet, seed=3)
    unet = core.load_from_torch_state_dict(UNet2DConditionModel, ucfg, tunet.state_dict())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    pooled = rng.standard_normal((2, 32)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024]] * 2, np.float32)
    image = rng.random((2, 16, 24, 3)).astype(np.float32)
    with torch.no_grad():
        feats = [f * 0.8 for f in ref(_nchw(image))]
        expected = tunet(
            _nchw(x),
            torch.tensor([10, 900]),
            torch.from_numpy(ctx),
            added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)},
            down_intrablock_additional_residuals=[f.clone() for f in feats],
        ).sample
    ours_feats = [f * 0.8 for f in model(jnp.asarray(image))]
    out = nnx.jit(
        lambda u, f: u(
            jnp.asarray(x),
            jnp.asarray([10, 900]),
            jnp.asarray(ctx),
            jnp.asarray(pooled),
            jnp.asarray(time_ids),
            down_intrablock_additional_residuals=f,
        )
    )(unet, ours_feats)
    helpers.assert_close(out, expected.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4, name="UNet output")


def test_cli_verify_and_mismatched_unet(converted, tmp_path, capsys):
    from weights_conversion.__main__ import main

    _, _, root = converted
    assert main(["t2i-adapter", str(root / "src"), str(tmp_path / "v"), "--unet", str(root / "unet"), "--verify"]) == 0
    out = capsys.readouterr().out
    worst = max(float(x.split("=")[1].rstrip(",")) for x in out.split() if x.startswith("max|diff|="))
    assert "feature_3 max|diff|=" in out and worst < 1e-3, out
    assert main(["t2i-adapter", str(root / "src"), str(tmp_path / "w")]) == 1  # default --unet: SDXL base
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "feature channels [32, 64, 64, 64] vs the UNet's [320, 640, 1280]" in err and not (tmp_path / "w").exists()
