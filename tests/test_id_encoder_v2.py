"""PhotoMaker V2 ID encoder: parity with a PyTorch reference of the published V2 modules (fp32, random
weights ~ N(0, 1)-scaled, highest precision), at two small non-default sizes (the tiny preset: fuse width 64,
one perceiver head of 64, depth 2; and width 256: two heads of 128 as published), the published key layout
and shapes, config inference from shapes, and the converted synthetic `photomaker-v2.bin`.

Tolerance: rtol = atol = 1e-4 on the updated prompt embeddings.
"""

from __future__ import annotations

import math

import helpers  # tests/ is on sys.path (rootdir conftest, no package)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from persongen_jax.models import id_encoder_v2 as v2
from persongen_jax.models import modeling
from weights_conversion import core

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn

from test_id_encoder import FuseModule  # noqa: E402  (PhotoMaker's FuseModule, identical in model_v2.py)

T = 12  # prompt length of the tiny tests


# ----------------------------------------------------------------------------- PyTorch reference
# TencentARC/PhotoMaker `photomaker/model_v2.py` + IP-Adapter's resampler (FacePerceiverResampler,
# PerceiverAttention, FeedForward), with the sizes taken from the config instead of the hard-coded
# 2048 / 2 tokens / depth 4 / 128-wide heads, so small models can be built.


def FeedForward(dim, mult=4):
    inner_dim = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner_dim, bias=False), nn.GELU(), nn.Linear(inner_dim, dim, bias=False)
    )


def reshape_tensor(x, heads):
    bs, length, width = x.shape
    x = x.view(bs, length, heads, -1)
    x = x.transpose(1, 2)
    return x.reshape(bs, heads, length, -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.scale = dim_head**-0.5
        self.dim_head = dim_head
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        kv_input = torch.cat((x, latents), dim=-2)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        q = reshape_tensor(q, self.heads)
        k = reshape_tensor(k, self.heads)
        v = reshape_tensor(v, self.heads)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = weight @ v
        out = out.permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


class FacePerceiverResampler(nn.Module):
    def __init__(self, *, dim=768, depth=4, dim_head=64, heads=16, embedding_dim=1280, output_dim=768, ff_mult=4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(
                nn.ModuleList(
                    [PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim=dim, mult=ff_mult)]
                )
            )

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        latents = self.proj_out(latents)
        return self.norm_out(latents)


class QFormerPerceiver(nn.Module):
    def __init__(
        self,
        id_embeddings_dim,
        cross_attention_dim,
        num_tokens,
        embedding_dim=1024,
        use_residual=True,
        ratio=4,
        depth=4,
        dim_head=128,
        ff_mult=4,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.use_residual = use_residual
        self.token_proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, id_embeddings_dim * ratio),
            nn.GELU(),
            nn.Linear(id_embeddings_dim * ratio, cross_attention_dim * num_tokens),
        )
        self.token_norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=cross_attention_dim,
            depth=depth,
            dim_head=dim_head,
            heads=cross_attention_dim // dim_head,
            embedding_dim=embedding_dim,
            output_dim=cross_attention_dim,
            ff_mult=ff_mult,
        )

    def forward(self, x, last_hidden_state):
        x = self.token_proj(x)
        x = x.reshape(-1, self.num_tokens, self.cross_attention_dim)
        x = self.token_norm(x)
        out = self.perceiver_resampler(x, last_hidden_state)
        if self.use_residual:
            out = x + 1.0 * out
        return out


class TorchPhotoMakerV2IDEncoder(transformers.CLIPVisionModelWithProjection):
    """`PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken` with its sizes from our config dict."""

    def __init__(self, cfg: dict):
        super().__init__(transformers.CLIPVisionConfig(**cfg["vision_config"]))
        d = cfg["cross_attention_dim"]
        self.fuse_module = FuseModule(d)
        self.visual_projection_2 = nn.Linear(self.config.hidden_size, cfg["projection_dim_2"], bias=False)
        self.num_tokens = cfg["num_tokens"]
        self.cross_attention_dim = d
        assert cfg["perceiver_heads"] * cfg["perceiver_dim_head"] == d
        self.qformer_perceiver = QFormerPerceiver(
            cfg["id_embeddings_dim"],
            d,
            self.num_tokens,
            embedding_dim=self.config.hidden_size,
            ratio=cfg["token_proj_dim"] // cfg["id_embeddings_dim"],
            depth=cfg["perceiver_depth"],
            dim_head=cfg["perceiver_dim_head"],
            ff_mult=cfg["perceiver_ff_dim"] // d,
        )

    def forward(self, id_pixel_values, prompt_embeds, class_tokens_mask, id_embeds):
        b, num_inputs, c, h, w = id_pixel_values.shape
        id_pixel_values = id_pixel_values.view(b * num_inputs, c, h, w)
        last_hidden_state = self.vision_model(id_pixel_values)[0]
        id_embeds = id_embeds.view(b * num_inputs, -1)
        id_embeds = self.qformer_perceiver(id_embeds, last_hidden_state)
        id_embeds = id_embeds.view(b, num_inputs, self.num_tokens, -1)
        return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask)


def _reference(cfg: dict, seed: int):
    helpers.torch_precise()
    ref = TorchPhotoMakerV2IDEncoder(cfg).eval()
    helpers.randomize_(ref, seed=seed)
    return ref


# A second small size: width 256 = two heads of the published 128, 3 tokens, depth 1, 512-d ArcFace.
WIDE = dict(
    v2.PhotoMakerV2IDEncoder.preset_config("tiny"),
    cross_attention_dim=256,
    projection_dim_2=232,
    id_embeddings_dim=512,
    num_tokens=3,
    token_proj_dim=1024,
    perceiver_depth=1,
    perceiver_heads=2,
    perceiver_dim_head=128,
    perceiver_ff_dim=512,
)


@pytest.fixture(scope="module")
def tiny():
    """(torch reference, our model converted from its state dict, config) at the tiny preset."""
    cfg = v2.PhotoMakerV2IDEncoder.preset_config("tiny")
    ref = _reference(cfg, seed=3)
    sd = dict(ref.state_dict())
    inferred = v2.config_from_state_dict(sd)
    assert v2.parse_config(inferred) == v2.parse_config(cfg)
    model = core.load_from_torch_state_dict(v2.PhotoMakerV2IDEncoder, inferred, sd)
    return ref, model, cfg


@nnx.jit
def _encode(model, pixels, prompt, mask, id_embeds):
    return model(pixels, prompt, mask, id_embeds)


def _inputs(cfg: dict, n_slots: int, class_positions: list[list[int]], seed: int = 0):
    """pixels [B, N, C, H, W] (torch layout), prompt [B, T, D], mask [B, T] bool, id_embeds [B, N, 512]."""
    rng = np.random.default_rng(seed)
    b, size, d = len(class_positions), cfg["vision_config"]["image_size"], cfg["cross_attention_dim"]
    pixels = rng.standard_normal((b, n_slots, 3, size, size)).astype(np.float32)
    prompt = rng.standard_normal((b, T, d)).astype(np.float32)
    # ArcFace embeddings are raw (norm ~ 20-30), as the official pipeline passes them.
    id_embeds = (4 * rng.standard_normal((b, n_slots, cfg["id_embeddings_dim"]))).astype(np.float32)
    mask = np.zeros((b, T), bool)
    for i, pos in enumerate(class_positions):
        mask[i, pos] = True
    return pixels, prompt, mask, id_embeds


def _ours(model, pixels, prompt, mask, id_embeds):
    with jax.default_matmul_precision("highest"):
        return np.asarray(
            _encode(
                model,
                jnp.asarray(pixels.transpose(0, 1, 3, 4, 2)),
                jnp.asarray(prompt),
                jnp.asarray(mask),
                jnp.asarray(id_embeds),
            )
        )


def _reference_per_sample(ref, pixels, prompt, mask, id_embeds):
    """The published FuseModule handles batch 1 only: sample by sample, each with its used image slots
    (2 class tokens per image), as the official pipeline calls it."""
    outs = []
    with torch.no_grad():
        for i in range(len(pixels)):
            n = int(mask[i].sum()) // ref.num_tokens
            outs.append(
                ref(
                    torch.from_numpy(pixels[i : i + 1, :n]),
                    torch.from_numpy(prompt[i : i + 1]).clone(),
                    torch.from_numpy(mask[i : i + 1]),
                    torch.from_numpy(id_embeds[i : i + 1, :n]),
                )[0].numpy()
            )
    return np.stack(outs)


# ----------------------------------------------------------------------------- parity


def test_v2_fused_prompt_matches_reference_with_padded_slots(tiny):
    """Row 0: 3 images (6 class tokens); row 1: 1 image (2 class tokens), slots 1-2 padding."""
    ref, model, cfg = tiny
    pixels, prompt, mask, ids = _inputs(cfg, 3, [[2, 3, 4, 5, 6, 7], [8, 9]], seed=1)
    out = _ours(model, pixels, prompt, mask, ids)
    helpers.assert_close(out, _reference_per_sample(ref, pixels, prompt, mask, ids), name="V2 fused prompt")
    np.testing.assert_array_equal(out[~mask], prompt[~mask])  # non-class tokens untouched
    assert np.abs(out[mask] - prompt[mask]).max(-1).min() > 1e-2  # every class token changed
    # Padded slots (pixels and ArcFace) never influence the output.
    pixels2, ids2 = pixels.copy(), ids.copy()
    pixels2[1, 1:], ids2[1, 1:] = 100.0, -50.0
    np.testing.assert_allclose(_ours(model, pixels2, prompt, mask, ids2), out, rtol=0, atol=1e-6)
    # The ArcFace embedding matters: changing image 1's moves exactly its 2 tokens (image-major: 4, 5).
    ids3 = ids.copy()
    ids3[0, 1] += 1.0
    diff = np.abs(_ours(model, pixels, prompt, mask, ids3) - out).max(-1)
    assert set(np.flatnonzero(diff[0] > 1e-4)) == {4, 5} and diff[1].max() == 0


def test_v2_published_head_rule_at_width_256():
    """Two heads of 128 (heads = width / 128 as published), 3 tokens, depth 1: inferred from the shapes."""
    ref = _reference(WIDE, seed=5)
    sd = dict(ref.state_dict())
    inferred = v2.config_from_state_dict(sd)
    assert (
        inferred["perceiver_heads"],
        inferred["perceiver_dim_head"],
        inferred["num_tokens"],
        inferred["perceiver_depth"],
    ) == (2, 128, 3, 1)
    model = core.load_from_torch_state_dict(v2.PhotoMakerV2IDEncoder, inferred, sd)
    pixels, prompt, mask, ids = _inputs(WIDE, 2, [[1, 2, 3, 4, 5, 6]], seed=2)
    helpers.assert_close(
        _ours(model, pixels, prompt, mask, ids),
        _reference_per_sample(ref, pixels, prompt, mask, ids),
        name="V2 fused prompt (width 256)",
    )


def test_v2_published_key_layout_and_shapes():
    """The published size (meta device, no memory): our parameters are exactly the reference's state-dict
    keys and shapes, and the config inferred from those shapes is the preset."""
    from transformers.initialization import no_init_weights

    cfg = v2.PhotoMakerV2IDEncoder.preset_config("photomaker_v2")
    with torch.device("meta"), no_init_weights():
        tm = TorchPhotoMakerV2IDEncoder(cfg)
    sd = tm.state_dict()
    ours = {
        core.torch_key(p): core.to_torch_layout(p, np.empty(s.shape, bool)).shape
        for p, s in modeling.flat_params(modeling.abstract_model(v2.PhotoMakerV2IDEncoder, cfg)).items()
    }
    assert ours == {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("position_ids")}
    assert "qformer_perceiver.perceiver_resampler.layers.3.1.3.weight" in ours
    assert v2.parse_config(v2.config_from_state_dict(sd)) == v2.parse_config(cfg)
    c = v2.parse_config(cfg)
    assert (c.perceiver_heads, c.num_tokens, c.embed_dim) == (16, 2, 2048)


def test_v2_config_inference_errors(tiny):
    ref, _, _ = tiny
    sd = dict(ref.state_dict())
    with pytest.raises(ValueError, match="token_proj.2.weight"):
        v2.config_from_state_dict({k: v for k, v in sd.items() if k != "qformer_perceiver.token_proj.2.weight"})
    gap = {k.replace("perceiver_resampler.layers.1.", "perceiver_resampler.layers.2."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="layers"):
        v2.config_from_state_dict(gap)
    odd = dict(
        sd,
        **{f"qformer_perceiver.perceiver_resampler.layers.{i}.0.to_q.weight": torch.zeros(200, 64) for i in range(2)},
    )
    with pytest.raises(ValueError, match="multiple of 128"):
        v2.config_from_state_dict(odd)
    with pytest.raises(core.ConversionError, match="missing keys.*token_norm.bias"):
        core.convert_state_dict(
            v2.PhotoMakerV2IDEncoder,
            v2.config_from_state_dict(sd),
            {k: v for k, v in sd.items() if k != "qformer_perceiver.token_norm.bias"},
        )
    assert v2.is_v2_state_dict(sd) and not v2.is_v2_state_dict({"fuse_module.layer_norm.weight": 0})


# ----------------------------------------------------------------------------- conversion CLI


@pytest.fixture(scope="module")
def converted_v2(tiny, tmp_path_factory):
    """The reference's weights as a synthetic `photomaker-v2.bin` (official key names + a PEFT LoRA for the tiny
    SDXL UNet), converted through the real CLI."""
    import json

    from persongen_jax.testing.tiny_photomaker import unet_lora_state_dict
    from persongen_jax.testing.tiny_sdxl import UNET

    ref, _, _ = tiny
    root = tmp_path_factory.mktemp("photomaker_v2")
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps(dict(UNET, _class_name="UNet2DConditionModel")))
    src = root / "photomaker-v2.bin"
    torch.save({"id_encoder": dict(ref.state_dict()), "lora_weights": unet_lora_state_dict()}, src)
    proc = helpers.run_cli("photomaker", src, root / "converted", "--unet", root / "unet")
    assert "PhotoMaker v2" in proc.stdout
    return root, src, root / "converted"


def test_v2_checkpoint_converts_through_the_cli_and_matches(tiny, converted_v2, capsys):
    ref, _, cfg = tiny
    root, src, dst = converted_v2
    model = modeling.from_pretrained(dst / "id_encoder")
    assert type(model) is v2.PhotoMakerV2IDEncoder and model.version == "v2"
    pixels, prompt, mask, ids = _inputs(cfg, 2, [[3, 4, 5, 6]], seed=4)
    helpers.assert_close(
        _ours(model, pixels, prompt, mask, ids),
        _reference_per_sample(ref, pixels, prompt, mask, ids),
        name="converted V2 fused prompt",
    )
    # --version insists: a V2 file read as v1 is a one-line error naming the file.
    from weights_conversion.__main__ import main

    assert main(["photomaker", str(src), str(root / "as_v1"), "--unet", str(root / "unet"), "--version", "v1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(src) in err and "PhotoMaker v2" in err and not (root / "as_v1").exists()


def test_v2_export_is_the_official_layout_bitwise(converted_v2):
    """export-photomaker writes the source checkpoint back key for key, bit for bit (.bin through the CLI, the
    official pipeline's flat .safetensors layout in-process); converting the export gives the same folder."""
    from safetensors.torch import load_file

    from weights_conversion.lora import convert_photomaker, export_photomaker

    root, src, dst = converted_v2
    helpers.run_cli("export-photomaker", dst, root / "exported.bin")
    export_photomaker(dst, root / "exported.safetensors")
    source = torch.load(src, weights_only=True)
    flat = load_file(root / "exported.safetensors")
    for exported in (
        torch.load(root / "exported.bin", weights_only=True),
        {
            s: {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(s + ".")}
            for s in ("id_encoder", "lora_weights")
        },
    ):
        for section in ("id_encoder", "lora_weights"):
            assert set(exported[section]) == set(source[section]), section
            for k, v in source[section].items():
                assert torch.equal(exported[section][k], v), f"{section}.{k}"
    first = modeling.flat_params(modeling.from_pretrained(dst / "id_encoder"))
    for suffix in (".bin", ".safetensors"):
        again = root / f"again{suffix.replace('.', '_')}"
        convert_photomaker(root / f"exported{suffix}", again, unet=root / "unet")
        second = modeling.flat_params(modeling.from_pretrained(again / "id_encoder"))
        assert all(np.array_equal(first[p], second[p]) for p in first)
