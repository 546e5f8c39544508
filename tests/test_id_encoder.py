"""PhotoMaker v1 ID encoder: parity with a PyTorch reference of PhotoMaker's module (fp32, random
weights, tiny config), batched reference-image masks, config inference and strict conversion.

Tolerance: rtol = atol = 1e-4 on every compared output.
"""

from __future__ import annotations

import math

import helpers  # tests/ is on sys.path (rootdir conftest, no package)
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import id_encoder as ie
from persongen_jax.models import modeling
from weights_conversion import core

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn

T, D = 12, 64  # tiny prompt: 12 tokens of width 24 + 40
SIZE = 30  # tiny vision tower image size


# ----------------------------------------------------------------------------- PyTorch reference
# TencentARC/PhotoMaker `photomaker/model.py` (v1), with the dims taken from the config instead of
# the hard-coded 1024 -> 1280 / 2048 so a tiny model can be built.


class MLP(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, use_residual=True):
        super().__init__()
        if use_residual:
            assert in_dim == out_dim
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x):
        residual = x
        x = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        if self.use_residual:
            x = x + residual
        return x


class FuseModule(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, prompt_embeds, id_embeds):
        stacked_id_embeds = torch.cat([prompt_embeds, id_embeds], dim=-1)
        stacked_id_embeds = self.mlp1(stacked_id_embeds) + prompt_embeds
        stacked_id_embeds = self.mlp2(stacked_id_embeds)
        return self.layer_norm(stacked_id_embeds)

    def forward(self, prompt_embeds, id_embeds, class_tokens_mask):
        # PhotoMaker's code verbatim (correct for batch 1 only: num_inputs sums the whole batch).
        id_embeds = id_embeds.to(prompt_embeds.dtype)
        num_inputs = class_tokens_mask.sum().unsqueeze(0)
        batch_size, max_num_inputs = id_embeds.shape[:2]
        seq_length = prompt_embeds.shape[1]
        flat_id_embeds = id_embeds.view(-1, id_embeds.shape[-2], id_embeds.shape[-1])
        valid_id_mask = torch.arange(max_num_inputs, device=flat_id_embeds.device)[None, :] < num_inputs[:, None]
        valid_id_embeds = flat_id_embeds[valid_id_mask.flatten()]
        prompt_embeds = prompt_embeds.view(-1, prompt_embeds.shape[-1])
        class_tokens_mask = class_tokens_mask.view(-1)
        valid_id_embeds = valid_id_embeds.view(-1, valid_id_embeds.shape[-1])
        image_token_embeds = prompt_embeds[class_tokens_mask]
        stacked_id_embeds = self.fuse_fn(image_token_embeds, valid_id_embeds)
        assert class_tokens_mask.sum() == stacked_id_embeds.shape[0]
        prompt_embeds.masked_scatter_(class_tokens_mask[:, None], stacked_id_embeds.to(prompt_embeds.dtype))
        return prompt_embeds.view(batch_size, seq_length, -1)


class TorchPhotoMakerIDEncoder(transformers.CLIPVisionModelWithProjection):
    def __init__(self, vision_config, projection_dim_2):
        super().__init__(transformers.CLIPVisionConfig(**vision_config))
        self.visual_projection_2 = nn.Linear(self.config.hidden_size, projection_dim_2, bias=False)
        self.fuse_module = FuseModule(self.config.projection_dim + projection_dim_2)

    def id_embeds(self, id_pixel_values):
        b, num_inputs, c, h, w = id_pixel_values.shape
        shared_id_embeds = self.vision_model(id_pixel_values.view(b * num_inputs, c, h, w)).pooler_output
        id_embeds = self.visual_projection(shared_id_embeds).view(b, num_inputs, 1, -1)
        id_embeds_2 = self.visual_projection_2(shared_id_embeds).view(b, num_inputs, 1, -1)
        return torch.cat((id_embeds, id_embeds_2), dim=-1)  # [b, N, 1, D]

    def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask):
        return self.fuse_module(prompt_embeds, self.id_embeds(id_pixel_values), class_tokens_mask)


def _torch_reference(config: dict, seed: int = 0):
    helpers.torch_precise()
    ref = TorchPhotoMakerIDEncoder(config["vision_config"], config["projection_dim_2"]).eval()
    helpers.randomize_(ref, seed=seed)
    return ref


def _np(t):
    return t.detach().cpu().numpy()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_config():
    cfg = ie.PhotoMakerIDEncoder.preset_config("tiny")
    assert ie.parse_config(cfg).embed_dim == D
    return cfg


@pytest.fixture(scope="module")
def ref_and_model(tiny_config, tmp_path_factory):
    """Torch reference -> PhotoMaker-style .bin ({'id_encoder', 'lora_weights'}) -> our module."""
    ref = _torch_reference(tiny_config, seed=7)
    sd = dict(ref.state_dict())
    # The released checkpoint was written by an older transformers: it carries the buffer.
    sd["vision_model.embeddings.position_ids"] = torch.arange((SIZE // 6) ** 2 + 1)[None]
    src = tmp_path_factory.mktemp("photomaker") / "photomaker-v1.bin"
    # The LoRA half of the checkpoint, for the tiny SDXL UNet (its config.json is all --unet reads).
    from persongen_jax.testing.tiny_photomaker import unet_lora_state_dict
    from persongen_jax.testing.tiny_sdxl import UNET

    (src.parent / "unet").mkdir()
    (src.parent / "unet" / "config.json").write_text(
        __import__("json").dumps(dict(UNET, _class_name="UNet2DConditionModel"))
    )
    torch.save({"id_encoder": sd, "lora_weights": unet_lora_state_dict()}, src)
    # Through the real CLI, as a user converts the released checkpoint.
    dst = src.parent / "converted"
    helpers.run_cli("photomaker", src, dst, "--unet", src.parent / "unet")
    model = modeling.from_pretrained(dst / "id_encoder")
    assert isinstance(model, ie.PhotoMakerIDEncoder)
    return ref, model


@nnx.jit
def _encode(model, pixels, prompt, mask):
    return model(pixels, prompt, mask)


@nnx.jit
def _id_embeds(model, pixels):
    return model.id_embeds(pixels)


def _inputs(n_slots: int, class_positions: list[list[int]], seed: int = 0):
    """pixels [B, N, C, H, W] (torch layout), prompt [B, T, D], mask [B, T] bool."""
    rng = np.random.default_rng(seed)
    b = len(class_positions)
    pixels = rng.standard_normal((b, n_slots, 3, SIZE, SIZE)).astype(np.float32)
    prompt = rng.standard_normal((b, T, D)).astype(np.float32)
    mask = np.zeros((b, T), bool)
    for i, pos in enumerate(class_positions):
        mask[i, pos] = True
    return pixels, prompt, mask


def _ours(model, pixels, prompt, mask):
    return np.asarray(
        _encode(model, jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)), jnp.asarray(prompt), jnp.asarray(mask))
    )


def _reference_per_sample(ref, pixels, prompt, mask):
    """PhotoMaker's torch FuseModule handles batch 1 only: run it sample by sample (with the
    padded image slots, which it must ignore as well)."""
    outs = []
    with torch.no_grad():
        for i in range(len(pixels)):
            outs.append(
                _np(
                    ref(
                        torch.from_numpy(pixels[i : i + 1]),
                        torch.from_numpy(prompt[i : i + 1]).clone(),
                        torch.from_numpy(mask[i : i + 1]),
                    )
                )[0]
            )
    return np.stack(outs)


# ----------------------------------------------------------------------------- parity


def test_fused_prompt_one_reference_image(ref_and_model):
    ref, model = ref_and_model
    pixels, prompt, mask = _inputs(1, [[3], [7]], seed=1)
    out = _ours(model, pixels, prompt, mask)
    helpers.assert_close(out, _reference_per_sample(ref, pixels, prompt, mask), name="fused prompt (N=1)")
    np.testing.assert_array_equal(out[~mask], prompt[~mask])  # non-class tokens untouched
    assert np.abs(out[mask] - prompt[mask]).max(-1).min() > 1e-2  # every class token changed


def test_fused_prompt_three_reference_images_masked(ref_and_model):
    """Sample 0 uses all 3 slots; sample 1 only 2 (slot 2 is padding)."""
    ref, model = ref_and_model
    pixels, prompt, mask = _inputs(3, [[2, 3, 4], [6, 7]], seed=2)
    out = _ours(model, pixels, prompt, mask)
    helpers.assert_close(out, _reference_per_sample(ref, pixels, prompt, mask), name="fused prompt (N=3)")
    np.testing.assert_array_equal(out[~mask], prompt[~mask])
    # The padded slot never influences the output.
    pixels2 = pixels.copy()
    pixels2[1, 2] = 100.0
    np.testing.assert_allclose(_ours(model, pixels2, prompt, mask), out, rtol=0, atol=1e-6)
    # Each class token gets its own image: swapping sample 0's images permutes its fused tokens.
    swapped = pixels.copy()
    swapped[0, [0, 2]] = pixels[0, [2, 0]]
    out_s = _ours(model, swapped, prompt, mask)
    assert np.abs(out_s[0, 2] - out[0, 2]).max() > 1e-2
    helpers.assert_close(out_s[0, 3], out[0, 3], name="unswapped middle token")


def test_id_embeds(ref_and_model):
    ref, model = ref_and_model
    pixels, _, _ = _inputs(3, [[0], [0]], seed=3)
    with torch.no_grad():
        expected = _np(ref.id_embeds(torch.from_numpy(pixels)))[:, :, 0]
    got = _id_embeds(model, jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)))
    assert got.shape == (2, 3, D)
    helpers.assert_close(got, expected, name="id_embeds")
    # fuse(id_embeds) is the same path as __call__
    _, prompt, mask = _inputs(3, [[1, 2, 3], [5]], seed=4)
    fused = nnx.jit(lambda m, p, i, c: m.fuse(p, i, c))(model, jnp.asarray(prompt), got, jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(fused), _ours(model, pixels, prompt, mask), rtol=1e-6, atol=1e-6)


def test_too_many_class_tokens_is_an_error_eagerly(ref_and_model):
    _, model = ref_and_model
    with pytest.raises(ValueError, match="class tokens"):
        model.fuse(jnp.zeros((1, T, D)), jnp.zeros((1, 1, D)), jnp.zeros((1, T), bool).at[0, 2:4].set(True))


# ----------------------------------------------------------------------------- config / conversion


def test_config_inferred_from_state_dict(ref_and_model, tiny_config):
    ref, _ = ref_and_model
    sd = dict(ref.state_dict())
    cfg = ie.id_encoder_config_from_state_dict(sd)  # tiny: 128 hidden -> 2 heads of 64
    assert ie.parse_config(cfg) == ie.parse_config(tiny_config)
    assert cfg["vision_config"]["image_size"] == SIZE and cfg["vision_config"]["patch_size"] == 6

    with pytest.raises(ValueError, match="visual_projection_2"):
        ie.id_encoder_config_from_state_dict({k: v for k, v in sd.items() if k != "visual_projection_2.weight"})
    odd = dict(sd, **{"vision_model.embeddings.patch_embedding.weight": torch.zeros(96, 3, 6, 6)})
    with pytest.raises(ValueError, match="num_attention_heads"):
        ie.id_encoder_config_from_state_dict(odd)
    assert (
        ie.id_encoder_config_from_state_dict(odd, {"num_attention_heads": 3})["vision_config"]["num_attention_heads"]
        == 3
    )
    with pytest.raises(ValueError, match="contradicts"):
        ie.id_encoder_config_from_state_dict(sd, {"num_hidden_layers": 5})
    gap = {k.replace("encoder.layers.1.", "encoder.layers.2."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="layers"):
        ie.id_encoder_config_from_state_dict(gap)
    with pytest.raises(ValueError, match="fuse_module.mlp1.fc1.weight"):
        ie.id_encoder_config_from_state_dict(dict(sd, **{"visual_projection_2.weight": torch.zeros(30, 128)}))
    with pytest.raises(ValueError, match="position"):
        ie.id_encoder_config_from_state_dict(
            dict(sd, **{"vision_model.embeddings.position_embedding.weight": torch.zeros(27, 128)})
        )


def test_strict_conversion_errors(ref_and_model, tiny_config):
    ref, _ = ref_and_model
    sd = dict(ref.state_dict())
    with pytest.raises(core.ConversionError, match="unexpected keys.*fuse_module.extra"):
        core.convert_state_dict(ie.PhotoMakerIDEncoder, tiny_config, dict(sd, **{"fuse_module.extra": torch.zeros(1)}))
    with pytest.raises(core.ConversionError, match="missing keys.*fuse_module.layer_norm.bias"):
        core.convert_state_dict(
            ie.PhotoMakerIDEncoder, tiny_config, {k: v for k, v in sd.items() if k != "fuse_module.layer_norm.bias"}
        )


def test_config_errors():
    with pytest.raises(ValueError, match="vision_config"):
        ie.parse_config({"projection_dim_2": 1280})
    with pytest.raises(ValueError, match="embed_dim"):
        ie.parse_config(ie.PhotoMakerIDEncoder.preset_config("photomaker_v1") | {"embed_dim": 1024})
    with pytest.raises(ValueError, match="unknown preset"):
        ie.PhotoMakerIDEncoder.preset_config("v2")


@pytest.mark.parametrize("preset", ["photomaker_v1", "tiny"])
def test_preset_matches_torch_reference(preset):
    """Parameter count and the config inferred from the reference's shapes (meta device)."""
    from transformers.initialization import no_init_weights

    cfg = ie.PhotoMakerIDEncoder.preset_config(preset)
    with torch.device("meta"), no_init_weights():
        tm = TorchPhotoMakerIDEncoder(cfg["vision_config"], cfg["projection_dim_2"])
    shapes = modeling.flat_params(modeling.abstract_model(ie.PhotoMakerIDEncoder, cfg))
    assert sum(math.prod(s.shape) for s in shapes.values()) == sum(p.numel() for p in tm.parameters())
    assert ie.parse_config(ie.id_encoder_config_from_state_dict(tm.state_dict())) == ie.parse_config(cfg)
    if preset == "photomaker_v1":
        assert ie.parse_config(cfg).embed_dim == 2048


def test_save_and_from_pretrained_round_trip(ref_and_model, tiny_config, tmp_path):
    """The folder format the `photomaker` CLI writes: config.json + params/ -> from_pretrained."""
    _, model = ref_and_model
    modeling.save_pretrained(model, tiny_config, tmp_path / "id_encoder")
    loaded = modeling.from_pretrained(tmp_path / "id_encoder")
    assert type(loaded) is ie.PhotoMakerIDEncoder
    pixels, prompt, mask = _inputs(2, [[4, 5], [9]], seed=5)
    np.testing.assert_array_equal(_ours(loaded, pixels, prompt, mask), _ours(model, pixels, prompt, mask))
