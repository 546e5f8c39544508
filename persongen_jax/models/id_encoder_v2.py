"""PhotoMaker V2 ID encoder (TencentARC/PhotoMaker `photomaker/model_v2.py`,
`PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken`), Flax NNX.

V2 adds each reference face's 512-d ArcFace embedding (insightface) to the CLIP image features:

    hidden  = vision_model(pixels).last_hidden_state                  [B*N, 1 + P, H_v]  (no post-LN)
    tokens  = token_norm(token_proj(id_embeds).reshape(T, D))         [B*N, T, D]   T = num_tokens (2)
    tokens  = tokens + perceiver_resampler(tokens, hidden)            (QFormerPerceiver, use_residual)
    prompt  = fuse_module(prompt_embeds, tokens [B, N*T, D] image-major, class_tokens_mask)

token_proj = Linear(512, 512*4) -> GELU -> Linear(-> D*T); perceiver_resampler = IP-Adapter's
FacePerceiverResampler: proj_in (H_v -> D), `depth` x [PerceiverAttention (norm1, norm2, to_q, to_kv,
to_out; queries = the tokens, keys/values = concat(image features, tokens)), FeedForward (LayerNorm,
Linear, GELU, Linear; no biases)], proj_out, norm_out. The fuse module is v1's (shared), fusing T tokens
per image: the prompt's class word is repeated N*T times, and the k-th class token takes the k-th
token of the image-major flattening (image 0 token 0, image 0 token 1, image 1 token 0, ...).
`visual_projection` / `visual_projection_2` are in the published checkpoint (its strict load needs
them) but unused by the V2 forward; they are kept so the conversion round trip is exact.

Attribute names mirror the PyTorch module: an NNX path joined with "." is the checkpoint's
`id_encoder` key (`qformer_perceiver.token_proj.0.weight`,
`qformer_perceiver.perceiver_resampler.layers.3.0.to_kv.weight`, `...layers.3.1.1.weight`, ...).

Batching as v1 (`id_encoder.FuseModule`): sample b uses the first n_b image slots, n_b*T =
class_tokens_mask[b].sum(); padded slots never influence the output (the perceiver works per image).
Layouts: id_pixel_values [B, N, H, W, C] channels-last, id_embeds [B, N, 512] (the raw ArcFace
embedding, as the official pipeline passes `faces[0]['embedding']`), prompt_embeds [B, T, D],
class_tokens_mask [B, T] bool.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Unpack

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models import clip
from persongen_jax.models.id_encoder import PhotoMakerCLIPEncoder, id_encoder_config_from_state_dict
from persongen_jax.models.layers import Identity, LayerNorm, Linear, ModuleKwargs, dot_product_attention
from persongen_jax.models.modeling import check_field_types, register_model

MODEL_TYPE = "photomaker_v2_id_encoder"
# The published perceiver's head width (`dim_head=128, heads=cross_attention_dim // 128`).
PUBLISHED_DIM_HEAD = 128


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)  # torch nn.GELU(): exact erf


@dataclasses.dataclass(frozen=True)
class PhotoMakerV2Config:
    """The V2 encoder's sizes (published values as defaults; every one is read from a checkpoint's shapes).

    vision: the CLIP tower; projection_dim_2: `visual_projection_2` width (kept, unused in V2);
    id_embeddings_dim: ArcFace width (512); cross_attention_dim: D, the ID token / fuse width (the
    prompt embedding width, 2048 for SDXL); num_tokens: T ID tokens per image; token_proj_dim: hidden
    width of token_proj (512 * 4); perceiver_depth / perceiver_heads / perceiver_dim_head /
    perceiver_ff_dim: the FacePerceiverResampler (4, D / 128, 128, 4 * D).
    """

    vision: clip.CLIPVisionConfig
    projection_dim_2: int = 1280
    id_embeddings_dim: int = 512
    cross_attention_dim: int = 2048
    num_tokens: int = 2
    token_proj_dim: int = 2048
    perceiver_depth: int = 4
    perceiver_heads: int = 16
    perceiver_dim_head: int = PUBLISHED_DIM_HEAD
    perceiver_ff_dim: int = 8192

    def __post_init__(self):
        check_field_types(self)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and v <= 0:
                raise ValueError(f"PhotoMakerV2IDEncoder config: {f.name}={v} must be a positive int")

    @property
    def embed_dim(self) -> int:
        """D: the ID token and fuse-module width."""
        return self.cross_attention_dim


_V2_FIELDS = (
    "projection_dim_2",
    "id_embeddings_dim",
    "cross_attention_dim",
    "num_tokens",
    "token_proj_dim",
    "perceiver_depth",
    "perceiver_heads",
    "perceiver_dim_head",
    "perceiver_ff_dim",
)


def parse_config(config: Mapping[str, Any] | PhotoMakerV2Config) -> PhotoMakerV2Config:
    """{"vision_config": <CLIPVisionConfig dict>, the PhotoMakerV2Config int fields} -> PhotoMakerV2Config."""
    if isinstance(config, PhotoMakerV2Config):
        return config
    if "vision_config" not in config:
        raise ValueError("PhotoMakerV2IDEncoder config: missing 'vision_config' (a transformers CLIPVisionConfig dict)")
    try:
        vision = clip.parse_vision_config(dict(config["vision_config"]))
    except ValueError as e:
        raise ValueError(f"PhotoMakerV2IDEncoder config: vision_config.{e}") from None
    return PhotoMakerV2Config(vision=vision, **{k: config[k] for k in _V2_FIELDS if k in config})


# PhotoMaker V2 (`photomaker-v2.bin`): ViT-L/14 tower, D = 2048, 2 tokens, token_proj 512 -> 2048 -> 4096,
# perceiver depth 4, 16 heads of 128, FeedForward 2048 -> 8192.
_PRESETS = {
    "photomaker_v2": dict(
        model_type=MODEL_TYPE,
        vision_config=clip._VIT_L14_VISION,
        projection_dim_2=1280,
        id_embeddings_dim=512,
        cross_attention_dim=2048,
        num_tokens=2,
        token_proj_dim=2048,
        perceiver_depth=4,
        perceiver_heads=16,
        perceiver_dim_head=128,
        perceiver_ff_dim=8192,
    ),
    # The tiny SDXL's prompt width 64 is under one published head (128): one head of 64 (`config_from_state_dict`
    # infers the same); hidden 128 = 2 vision heads of 64, as v1's tiny preset; ArcFace width 16 = the tiny
    # test ArcFace's (`testing.tiny_eval.TINY_ARCFACE`), token_proj 4x as published.
    "tiny": dict(
        model_type=MODEL_TYPE,
        vision_config=dict(clip._TINY_VISION, hidden_size=128, num_attention_heads=2),
        projection_dim_2=40,
        id_embeddings_dim=16,
        cross_attention_dim=64,
        num_tokens=2,
        token_proj_dim=64,
        perceiver_depth=2,
        perceiver_heads=1,
        perceiver_dim_head=64,
        perceiver_ff_dim=256,
    ),
}


# ----------------------------------------------------------------------------- modules


class PerceiverAttention(nnx.Module):
    """IP-Adapter PerceiverAttention: latents attend to concat(x, latents); no biases.

    Scale: the reference multiplies q and k each by dim_head**-0.25 (the same 1/sqrt(dim_head) overall);
    softmax in float32.
    """

    def __init__(self, dim: int, *, dim_head: int, heads: int, **kw: Unpack[ModuleKwargs]):
        inner = dim_head * heads
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = LayerNorm(dim, **kw)
        self.norm2 = LayerNorm(dim, **kw)
        self.to_q = Linear(dim, inner, use_bias=False, **kw)
        self.to_kv = Linear(dim, 2 * inner, use_bias=False, **kw)
        self.to_out = Linear(inner, dim, use_bias=False, **kw)

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        """x [B, S, dim] (image features), latents [B, L, dim] -> [B, L, dim]."""
        x, latents = self.norm1(x), self.norm2(latents)
        b, n_lat, _ = latents.shape
        q = self.to_q(latents).reshape(b, n_lat, self.heads, self.dim_head)
        k, v = jnp.split(self.to_kv(jnp.concatenate([x, latents], axis=-2)), 2, axis=-1)
        k = k.reshape(b, -1, self.heads, self.dim_head)
        v = v.reshape(b, -1, self.heads, self.dim_head)
        out = dot_product_attention(q, k, v, scale=self.dim_head**-0.5, implementation="xla")
        return self.to_out(out.reshape(b, n_lat, -1))


def feed_forward(dim: int, inner_dim: int, **kw: Unpack[ModuleKwargs]) -> nnx.List:
    """IP-Adapter FeedForward `nn.Sequential(LayerNorm, Linear, GELU, Linear)` (no biases) as a list indexed as
    torch's: `[0]` norm, `[1]`, `[3]` linears, `[2]` the parameter-free GELU (keys `layers.i.1.{0,1,3}`)."""
    return nnx.List(
        [
            LayerNorm(dim, **kw),
            Linear(dim, inner_dim, use_bias=False, **kw),
            Identity(),
            Linear(inner_dim, dim, use_bias=False, **kw),
        ]
    )


def apply_feed_forward(ff: Any, x: jax.Array) -> jax.Array:
    """x [..., dim] -> [..., dim]: ff[3](gelu(ff[1](ff[0](x))))."""
    return ff[3](_gelu(ff[1](ff[0](x))))


class FacePerceiverResampler(nnx.Module):
    """IP-Adapter FacePerceiverResampler: latents [B, L, D] refined by attending to proj_in(x).

    Sized by the V2 config as PhotoMaker builds it: dim = output_dim = D (cross_attention_dim), embedding_dim =
    the CLIP tower's hidden_size, perceiver_depth layers of perceiver_heads heads of perceiver_dim_head, each with
    a FeedForward of width perceiver_ff_dim.
    """

    def __init__(self, config: PhotoMakerV2Config, **kw: Unpack[ModuleKwargs]):
        c, dim = config, config.cross_attention_dim
        self.proj_in = Linear(c.vision.hidden_size, dim, **kw)
        self.proj_out = Linear(dim, dim, **kw)
        self.norm_out = LayerNorm(dim, **kw)
        # torch: layers[i] = ModuleList([PerceiverAttention, FeedForward]) -> keys layers.i.0.*, layers.i.1.*
        self.layers = nnx.List(
            [
                nnx.List(
                    [
                        PerceiverAttention(dim, dim_head=c.perceiver_dim_head, heads=c.perceiver_heads, **kw),
                        feed_forward(dim, c.perceiver_ff_dim, **kw),
                    ]
                )
                for _ in range(c.perceiver_depth)
            ]
        )

    def __call__(self, latents: jax.Array, x: jax.Array) -> jax.Array:
        """latents [B, L, D], x [B, S, hidden_size of the CLIP tower] -> [B, L, D]."""
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = apply_feed_forward(ff, latents) + latents
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nnx.Module):
    """PhotoMaker V2 QFormerPerceiver: ArcFace embedding -> T tokens, refined from the CLIP features."""

    def __init__(self, config: PhotoMakerV2Config, **kw: Unpack[ModuleKwargs]):
        c = config
        self.num_tokens, self.cross_attention_dim = c.num_tokens, c.cross_attention_dim
        self.token_proj = nnx.List(
            [
                Linear(c.id_embeddings_dim, c.token_proj_dim, **kw),
                Identity(),
                Linear(c.token_proj_dim, c.cross_attention_dim * c.num_tokens, **kw),
            ]
        )
        self.token_norm = LayerNorm(c.cross_attention_dim, **kw)
        self.perceiver_resampler = FacePerceiverResampler(c, **kw)

    def __call__(self, x: jax.Array, last_hidden_state: jax.Array) -> jax.Array:
        """x [M, id_embeddings_dim] (ArcFace), last_hidden_state [M, S, H_v] -> [M, T, D]."""
        x = self.token_proj[2](_gelu(self.token_proj[0](x)))
        x = self.token_norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))
        return x + self.perceiver_resampler(x, last_hidden_state)  # use_residual (always True in V2)


@register_model
class PhotoMakerV2IDEncoder(PhotoMakerCLIPEncoder):
    """PhotoMaker V2 ID encoder.

    encoder(id_pixel_values [B, N, H, W, C], prompt_embeds [B, T, D], class_tokens_mask [B, T],
            id_embeds [B, N, 512]) -> prompt_embeds with the class tokens fused [B, T, D]
    encoder.id_tokens(id_pixel_values, id_embeds) -> [B, N * num_tokens, D] (image-major)
    encoder.fuse(prompt_embeds, id_tokens, class_tokens_mask) -> [B, T, D]
    """

    version = "v2"
    _parse_config = staticmethod(parse_config)  # from_config / preset_config: ConfigMixin
    _presets = _PRESETS
    _perceiver = QFormerPerceiver
    qformer_perceiver: QFormerPerceiver

    def id_tokens(self, id_pixel_values: jax.Array, id_embeds: jax.Array) -> jax.Array:
        """id_pixel_values [B, N, H, W, C] (CLIP-normalised), id_embeds [B, N, E] (ArcFace)
        -> [B, N * num_tokens, D], image-major."""
        if id_pixel_values.ndim != 5:
            raise ValueError(f"id_pixel_values must be [B, N, H, W, C], got shape {id_pixel_values.shape}")
        b, n = id_pixel_values.shape[:2]
        if id_embeds.shape[:2] != (b, n) or id_embeds.ndim != 3:
            raise ValueError(
                f"id_embeds {id_embeds.shape} must be [B, N, {self.config.id_embeddings_dim}] with "
                f"the B, N of id_pixel_values {id_pixel_values.shape}"
            )
        hidden = self.vision_model(id_pixel_values.reshape(b * n, *id_pixel_values.shape[2:])).last_hidden_state
        dtype = hidden.dtype
        tokens = self.qformer_perceiver(id_embeds.reshape(b * n, -1).astype(dtype), hidden)
        return tokens.reshape(b, n * self.num_tokens, -1)

    def fuse(self, prompt_embeds: jax.Array, id_tokens: jax.Array, class_tokens_mask: jax.Array) -> jax.Array:
        """prompt_embeds [B, T, D], id_tokens [B, N * num_tokens, D], class_tokens_mask [B, T] -> [B, T, D]."""
        return self.fuse_module(prompt_embeds, id_tokens, class_tokens_mask)

    def __call__(
        self, id_pixel_values: jax.Array, prompt_embeds: jax.Array, class_tokens_mask: jax.Array, id_embeds: jax.Array
    ) -> jax.Array:
        """See the class docstring: fuse(prompt_embeds, id_tokens(id_pixel_values, id_embeds), class_tokens_mask)."""
        return self.fuse(prompt_embeds, self.id_tokens(id_pixel_values, id_embeds), class_tokens_mask)


# ----------------------------------------------------------------------------- conversion

_PERCEIVER = "qformer_perceiver.perceiver_resampler."
_DEPTH_RE = re.compile(r"^qformer_perceiver\.perceiver_resampler\.layers\.(\d+)\.")


def is_v2_state_dict(sd: Mapping[str, Any]) -> bool:
    """Whether a PhotoMaker `id_encoder` state dict is V2's (it has the QFormerPerceiver)."""
    return any(k.startswith("qformer_perceiver.") for k in sd)


def perceiver_heads(inner_dim: int) -> tuple[int, int]:
    """(heads, dim_head) of a perceiver attention of inner width `inner_dim` (= to_q's output): the published
    rule heads = width / 128; a width under 128 (test-sized models) is one head of that width."""
    if inner_dim % PUBLISHED_DIM_HEAD == 0:
        return inner_dim // PUBLISHED_DIM_HEAD, PUBLISHED_DIM_HEAD
    if inner_dim < PUBLISHED_DIM_HEAD:
        return 1, inner_dim
    raise ValueError(
        f"perceiver attention width {inner_dim} is not a multiple of {PUBLISHED_DIM_HEAD} (the published head width)"
    )


def config_from_state_dict(sd: Mapping[str, Any]) -> dict:
    """The PhotoMakerV2IDEncoder config of a PhotoMaker V2 `id_encoder` state dict, every size from the
    shapes: the CLIP tower (as v1: `id_encoder.id_encoder_config_from_state_dict`), D (the fuse width),
    num_tokens (token_proj output / D), token_proj width, ArcFace width, perceiver depth (the layer
    indices), heads (`perceiver_heads`), FeedForward width. ValueError naming the key on a mismatch."""

    def shape(key: str) -> tuple:
        if key not in sd:
            raise ValueError(f"not a PhotoMaker V2 id_encoder state dict: missing {key!r}")
        return tuple(sd[key].shape)

    try:  # CLIP tower + visual projections + fuse width, as v1's (shared) inference reads them
        base = id_encoder_config_from_state_dict(sd)
    except ValueError as e:
        raise ValueError(str(e).replace("PhotoMaker v1", "PhotoMaker V2")) from None
    d = shape("fuse_module.layer_norm.weight")[0]
    tp0, tp2 = shape("qformer_perceiver.token_proj.0.weight"), shape("qformer_perceiver.token_proj.2.weight")
    if tp2[1] != tp0[0] or tp2[0] % d:
        raise ValueError(f"qformer_perceiver.token_proj.2.weight: shape {tp2}, expected [num_tokens * {d}, {tp0[0]}]")
    if shape("qformer_perceiver.token_norm.weight") != (d,):
        raise ValueError(
            f"qformer_perceiver.token_norm.weight: shape {shape('qformer_perceiver.token_norm.weight')}, "
            f"expected ({d},) (the fuse width)"
        )
    depth = sorted({int(m.group(1)) for k in sd if (m := _DEPTH_RE.match(k))})
    if not depth or depth != list(range(len(depth))):
        raise ValueError(f"{_PERCEIVER}layers: expected layers 0..L-1, found indices {depth[:30]}")
    inner = shape(f"{_PERCEIVER}layers.0.0.to_q.weight")[0]
    heads, dim_head = perceiver_heads(inner)
    proj_in = shape(f"{_PERCEIVER}proj_in.weight")
    if proj_in != (d, base["vision_config"]["hidden_size"]):
        raise ValueError(
            f"{_PERCEIVER}proj_in.weight: shape {proj_in}, expected "
            f"{(d, base['vision_config']['hidden_size'])} (fuse width, CLIP hidden size)"
        )
    config = dict(
        base,
        model_type=MODEL_TYPE,
        id_embeddings_dim=tp0[1],
        cross_attention_dim=d,
        num_tokens=tp2[0] // d,
        token_proj_dim=tp0[0],
        perceiver_depth=len(depth),
        perceiver_heads=heads,
        perceiver_dim_head=dim_head,
        perceiver_ff_dim=shape(f"{_PERCEIVER}layers.0.1.1.weight")[0],
    )
    parse_config(config)
    return config
