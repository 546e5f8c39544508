"""AutoencoderKL (SDXL VAE) port vs diffusers, fp32, randomised weights, tolerance 1e-4."""

from __future__ import annotations

import json

import helpers  # tests/ is on sys.path (rootdir conftest, no package)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import modeling
from persongen_jax.models.vae import AutoencoderKL, DiagonalGaussianDistribution
from weights_conversion import core, io

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Two levels (one asymmetric-padded downsample, one upsample), two resnets per encoder block
# (three per decoder block), a mid block with attention; channels chosen so 8 groups split them.
TINY = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.13025,
}
B, H, W = 2, 32, 48  # non-square, so a transposed H/W would fail
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@jax.jit
def _encode(graphdef, state, x):
    post = nnx.merge(graphdef, state).encode(x)
    return post.mean, post.logvar, post.std, post.kl()


@jax.jit
def _decode(graphdef, state, z):
    return nnx.merge(graphdef, state).decode(z)


def run_flax(model, images, latents):
    """(mean, logvar, std, kl, decoded) with one compilation per model structure (shared across tests)."""
    graphdef, state = nnx.split(model)
    return (*_encode(graphdef, state, jnp.asarray(images)), _decode(graphdef, state, jnp.asarray(latents)))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The randomised diffusers VAE, its saved folder, inputs and its outputs."""
    helpers.torch_precise()
    tmp = tmp_path_factory.mktemp("vae")
    tm = diffusers.AutoencoderKL(**TINY).eval()
    helpers.randomize_(tm, seed=0)
    tm.save_pretrained(tmp / "src" / "vae")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (B, H, W, 3)).astype(np.float32)
    latents = rng.standard_normal((B, H // 2, W // 2, 4)).astype(np.float32)
    with torch.no_grad():
        post = tm.encode(nchw(images)).latent_dist
        out = dict(
            mean=nhwc(post.mean),
            logvar=nhwc(post.logvar),
            std=nhwc(post.std),
            kl=post.kl().numpy(),
            decoded=nhwc(tm.decode(nchw(latents)).sample),
        )
    return dict(torch_model=tm, tmp=tmp, images=images, latents=latents, out=out)


@pytest.fixture(scope="module")
def flax_vae(ref):
    # Through the real CLI on the save_pretrained folder, as a user would.
    return helpers.convert_and_load("sdxl", ref["tmp"] / "src", ref["tmp"] / "dst", component="vae")


def check_outputs(got, want):
    for name, value in zip(("mean", "logvar", "std", "kl", "decoded"), got):
        helpers.assert_close(value, want[name], rtol=1e-4, atol=1e-4, name=name)


def test_encode_decode_match_diffusers(flax_vae, ref):
    got = run_flax(flax_vae, ref["images"], ref["latents"])
    assert got[0].shape == (B, H // 2, W // 2, 4)
    assert got[4].shape == (B, H, W, 3)
    check_outputs(got, ref["out"])
    assert flax_vae.scaling_factor == pytest.approx(0.13025)
    assert flax_vae.shift_factor == 0.0


def test_legacy_attention_keys(flax_vae, ref):
    """Old checkpoints name the mid-block attention query/key/value/proj_attn, some as 1x1 convs."""
    from safetensors.torch import save_file

    sd = ref["torch_model"].state_dict()
    legacy = {}
    for k, v in sd.items():
        for new, old in LEGACY.items():
            if ".mid_block.attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if k.endswith("weight") and k.startswith("decoder"):
                    v = v[:, :, None, None]  # LDM's 1x1-conv layout
        legacy[k] = v.contiguous()
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert legacy["decoder.mid_block.attentions.0.proj_attn.weight"].ndim == 4
    path = ref["tmp"] / "legacy.safetensors"
    save_file(legacy, str(path))
    model = core.load_from_torch_state_dict(AutoencoderKL, TINY, io.read_checkpoint(path))  # lazy tensors
    want = modeling.flat_params(flax_vae)
    got = modeling.flat_params(model)
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=modeling.path_str(p))
    check_outputs(run_flax(model, ref["images"], ref["latents"]), ref["out"])


def test_save_and_from_pretrained_roundtrip(flax_vae, ref, tmp_path):
    cfg = dict(TINY, _class_name="AutoencoderKL", _diffusers_version="0.42.1")
    modeling.save_pretrained(flax_vae, cfg, tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_persongen_class"] == "AutoencoderKL"
    loaded = modeling.from_pretrained(tmp_path / "vae")
    assert loaded.config == flax_vae.config
    mean = run_flax(loaded, ref["images"], ref["latents"])[0]
    helpers.assert_close(mean, ref["out"]["mean"], name="mean")


def test_sdxl_preset_matches_diffusers_parameter_count():
    cfg = AutoencoderKL.preset_config("sdxl")
    model = modeling.abstract_model(AutoencoderKL, cfg)
    shapes = {core.torch_key(p): v.shape for p, v in modeling.flat_params(model).items()}
    with torch.device("meta"):
        tm = diffusers.AutoencoderKL(**cfg)
    torch_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert shapes.keys() == torch_shapes.keys()
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == sum(p.numel() for p in tm.parameters()) == 83_653_863
    assert model.config.scaling_factor == 0.13025 and model.downscale_factor == 8
    assert AutoencoderKL.preset_config("tiny")["block_out_channels"] == [32, 64]


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"], "down_block_types"),
        ("up_block_types", ["UpDecoderBlock2D"], "up_block_types"),
        ("norm_type", "spatial", "norm_type"),
        ("norm_num_groups", 12, "norm_num_groups"),
    ],
)
def test_unsupported_config_raises(key, value, needle):
    with pytest.raises(ValueError, match=needle):
        AutoencoderKL.from_config(dict(TINY, **{key: value}), rngs=nnx.Rngs(0))


def test_posterior_sample_and_mode():
    mean = jnp.zeros((2, 3, 5, 4))
    post = DiagonalGaussianDistribution.from_moments(jnp.concatenate([mean + 1.0, jnp.full_like(mean, 50.0)], -1))
    assert float(post.logvar.max()) == 20.0  # clamped as in diffusers
    assert post.mode().shape == (2, 3, 5, 4)
    post = DiagonalGaussianDistribution.from_moments(jnp.concatenate([mean + 1.0, mean], -1))
    s = post.sample(jax.random.key(0))
    assert s.shape == mean.shape and not np.allclose(s, 1.0)
    np.testing.assert_array_equal(s, post.sample(jax.random.key(0)))
