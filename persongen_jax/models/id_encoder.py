"""PhotoMaker v1 ID encoder (TencentARC/PhotoMaker `photomaker/model.py`), Flax NNX.

PhotoMaker's `PhotoMakerIDEncoder(CLIPVisionModelWithProjection)`:

    pooled = vision_model(pixels).pooler_output                      [B*N, H_v]
    id     = concat(visual_projection(pooled),                        [B*N, P1]
                    visual_projection_2(pooled))                      [B*N, P2]  -> [B, N, D], D = P1 + P2
    fuse_fn(c, i) = layer_norm(mlp2(mlp1(concat[c, i]) + c))          c: class-word token embedding [D]
    MLP(x)        = fc2(gelu(fc1(layernorm(x)))) (+ x if use_residual)

and the k-th True position of `class_tokens_mask[b]` receives fuse_fn(prompt_embeds[b, pos],
id[b, k]); every other prompt position is unchanged. (PhotoMaker v1: ViT-L/14 tower, P1 = 768,
P2 = 1280, D = 2048 = the SDXL prompt embedding width.)

Attribute names mirror the PyTorch module, so an NNX path joined with "." is the key in the
checkpoint's `id_encoder` state dict (`vision_model.encoder.layers.0.self_attn.q_proj.weight`,
`visual_projection_2.weight`, `fuse_module.mlp1.fc1.weight`, `fuse_module.layer_norm.bias`, ...).

Batching: PhotoMaker's torch FuseModule is only correct for batch 1. Here any number of reference
images 1..N per sample is batched with static shapes: sample b uses the first
n_b = class_tokens_mask[b].sum() of its N image slots; the remaining slots are padding and never
influence the output. Layouts: `id_pixel_values` [B, N, H, W, C] channels-last (PhotoMaker takes
[B, N, C, H, W]), `prompt_embeds` [B, T, D], `class_tokens_mask` [B, T] bool.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Mapping, Protocol, Unpack

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models import clip
from persongen_jax.models.layers import LayerNorm, Linear, ModuleKwargs
from persongen_jax.models.modeling import register_model

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PhotoMakerIDEncoderConfig:
    """vision: the CLIP vision tower; projection_dim_2: width of `visual_projection_2`.

    The fuse module's width is embed_dim = vision.projection_dim + projection_dim_2 and must
    equal the prompt embedding width it fuses into (2048 for SDXL).
    """

    vision: clip.CLIPVisionConfig
    projection_dim_2: int = 1280

    @property
    def embed_dim(self) -> int:
        """D = vision.projection_dim + projection_dim_2: the ID embedding and fuse-module width."""
        return self.vision.projection_dim + self.projection_dim_2

    @property
    def num_tokens(self) -> int:
        """ID tokens per reference image: v1 fuses one (its stacked embedding)."""
        return 1


def parse_config(config: Mapping[str, Any] | PhotoMakerIDEncoderConfig) -> PhotoMakerIDEncoderConfig:
    """{"vision_config": <transformers CLIPVisionConfig dict>, "projection_dim_2": int,
    optional "embed_dim": int (checked)} -> PhotoMakerIDEncoderConfig."""
    if isinstance(config, PhotoMakerIDEncoderConfig):
        return config
    if "vision_config" not in config:
        raise ValueError("PhotoMakerIDEncoder config: missing 'vision_config' (a transformers CLIPVisionConfig dict)")
    vision_cfg = dict(config["vision_config"])
    try:
        vision = clip.parse_vision_config(vision_cfg)
    except ValueError as e:
        raise ValueError(f"PhotoMakerIDEncoder config: vision_config.{e}") from None
    p2 = config.get("projection_dim_2", 1280)
    if not isinstance(p2, int) or p2 <= 0:
        raise ValueError(f"PhotoMakerIDEncoder config: projection_dim_2={p2!r} must be a positive int")
    out = PhotoMakerIDEncoderConfig(vision=vision, projection_dim_2=p2)
    if config.get("embed_dim") is not None and config["embed_dim"] != out.embed_dim:
        raise ValueError(
            f"PhotoMakerIDEncoder config: embed_dim={config['embed_dim']} != "
            f"vision_config.projection_dim ({vision.projection_dim}) + projection_dim_2 ({p2})"
        )
    return out


# PhotoMaker v1 `VISION_CONFIG_DICT` = openai/clip-vit-large-patch14's vision tower (image 224 and
# quick_gelu are the transformers defaults it relies on) + `visual_projection_2` 1024 -> 1280.
_PRESETS = {
    "photomaker_v1": dict(
        model_type="photomaker_id_encoder", vision_config=clip._VIT_L14_VISION, projection_dim_2=1280
    ),
    # hidden 128 = 2 heads of 64, so `id_encoder_config_from_state_dict` infers the head count;
    # 24 + 40 = 64 is the prompt embedding width of the tiny test models.
    "tiny": dict(
        model_type="photomaker_id_encoder",
        vision_config=dict(clip._TINY_VISION, hidden_size=128, num_attention_heads=2),
        projection_dim_2=40,
    ),
}


# ----------------------------------------------------------------------------- modules


class MLP(nnx.Module):
    """PhotoMaker MLP: fc2(gelu(fc1(layernorm(x)))) (+ x). GELU is torch's exact-erf nn.GELU()."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, *, use_residual: bool = True, **kw: Unpack[ModuleKwargs]
    ):
        if use_residual and in_dim != out_dim:
            raise ValueError(f"MLP: a residual needs in_dim == out_dim, got {in_dim} -> {out_dim}")
        self.use_residual = use_residual
        self.layernorm = LayerNorm(in_dim, **kw)
        self.fc1 = Linear(in_dim, hidden_dim, **kw)
        self.fc2 = Linear(hidden_dim, out_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in_dim] -> [..., out_dim]."""
        y = self.fc2(jax.nn.gelu(self.fc1(self.layernorm(x)), approximate=False))
        return y + x if self.use_residual else y


class FuseModule(nnx.Module):
    """Mixes a class-word token embedding with an ID embedding (both [..., D])."""

    def __init__(self, embed_dim: int, **kw: Unpack[ModuleKwargs]):
        self.embed_dim = embed_dim
        self.mlp1 = MLP(2 * embed_dim, embed_dim, embed_dim, use_residual=False, **kw)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True, **kw)
        self.layer_norm = LayerNorm(embed_dim, **kw)

    def fuse_fn(self, prompt_embeds: jax.Array, id_embeds: jax.Array) -> jax.Array:
        """[..., D], [..., D] -> [..., D]."""
        x = self.mlp1(jnp.concatenate([prompt_embeds, id_embeds], axis=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(x))

    def __call__(self, prompt_embeds: jax.Array, id_embeds: jax.Array, class_tokens_mask: jax.Array) -> jax.Array:
        """prompt_embeds [B, T, D], id_embeds [B, N, D], class_tokens_mask [B, T] -> [B, T, D].

        The k-th class token of row b (k < N) is replaced by fuse_fn(its embedding, id_embeds[b, k]).
        Only the B*N class-token vectors go through the MLPs: their positions are found with a
        stable argsort (class tokens first, in order), the fused vectors are scattered back by
        gathering with each position's rank (cumsum of the mask). Class tokens beyond the N-th
        (an invalid input; PhotoMaker asserts) are left unchanged.
        """
        b, t, d = prompt_embeds.shape
        n = id_embeds.shape[1]
        if id_embeds.shape[0] != b or id_embeds.shape[-1] != d or class_tokens_mask.shape != (b, t):
            raise ValueError(
                f"fuse: prompt_embeds {prompt_embeds.shape}, id_embeds {id_embeds.shape} and "
                f"class_tokens_mask {class_tokens_mask.shape} must be [B, T, D], [B, N, D], [B, T]"
            )
        if d != self.embed_dim:
            raise ValueError(f"fuse: embedding width {d} != the fuse module's embed_dim {self.embed_dim}")
        mask = class_tokens_mask.astype(bool)
        if not isinstance(mask, jax.core.Tracer):  # eager call: the input can be checked
            counts = jnp.sum(mask, axis=1)
            if bool(jnp.any(counts > n)):
                raise ValueError(
                    f"fuse: class_tokens_mask has {int(jnp.max(counts))} class tokens in a row "
                    f"but only {n} ID embedding slots"
                )
        id_embeds = id_embeds.astype(prompt_embeds.dtype)
        # Positions of the first N class tokens per row (padding rows get non-class positions,
        # whose fused vectors are never used).
        k = min(n, t)
        pos = jnp.argsort(~mask, axis=1, stable=True)[:, :k]  # [B, k]
        class_embeds = jnp.take_along_axis(prompt_embeds, pos[..., None], axis=1)  # [B, k, D]
        fused = self.fuse_fn(class_embeds, id_embeds[:, :k]).astype(prompt_embeds.dtype)
        rank = jnp.cumsum(mask, axis=1) - 1  # [B, T]: k for the k-th class token
        use = mask & (rank < k)
        gathered = jnp.take_along_axis(fused, jnp.clip(rank, 0, k - 1)[..., None], axis=1)  # [B, T, D]
        return jnp.where(use[..., None], gathered, prompt_embeds)


class IDEncoderConfig(Protocol):
    """What the shared encoder reads of v1's and V2's configs (V2's module imports this one, so it names the
    fields rather than V2's class)."""

    vision: clip.CLIPVisionConfig
    projection_dim_2: int

    @property
    def embed_dim(self) -> int:
        """The ID embedding and fuse-module width."""
        ...

    @property
    def num_tokens(self) -> int:
        """ID tokens per reference image."""
        ...


class PhotoMakerCLIPEncoder(clip.CLIPTowerModel):
    """What the PhotoMaker v1 and V2 ID encoders share: PhotoMaker's encoders extend
    CLIPVisionModelWithProjection (`vision_model`, `visual_projection`) with a second projection head
    (`visual_projection_2`), the fuse MLP (`fuse_module`, of width config.embed_dim) and, in V2, the
    `qformer_perceiver` (the `_perceiver` class) that turns each image into num_tokens ID tokens."""

    _tower = "vision_model"
    _projection = "visual_projection"
    _perceiver: ClassVar[Any] = None
    vision_model: clip.CLIPVisionTransformer
    visual_projection: Linear

    def __init__(
        self,
        config: IDEncoderConfig,
        *,
        attention_impl: str = "xla",
        **kw: Unpack[ModuleKwargs],
    ):
        super().__init__(config.vision, attention_impl=attention_impl, **kw)
        self.config = config
        self.visual_projection_2 = Linear(config.vision.hidden_size, config.projection_dim_2, use_bias=False, **kw)
        self.fuse_module = FuseModule(config.embed_dim, **kw)
        if self._perceiver is not None:
            self.qformer_perceiver = self._perceiver(config, **kw)
        # ID tokens per reference image (the class word is repeated num_images * num_tokens times).
        self.num_tokens = config.num_tokens


@register_model
class PhotoMakerIDEncoder(PhotoMakerCLIPEncoder):
    """PhotoMaker v1 stacked-ID encoder.

    encoder(id_pixel_values [B, N, H, W, C], prompt_embeds [B, T, D], class_tokens_mask [B, T])
        -> prompt_embeds with the class tokens fused with the ID embeddings [B, T, D]
    encoder.id_embeds(id_pixel_values) -> [B, N, D]
    encoder.fuse(prompt_embeds, id_embeds, class_tokens_mask) -> [B, T, D]
    """

    version = "v1"
    _parse_config = staticmethod(parse_config)  # from_config / preset_config: ConfigMixin
    _presets = _PRESETS

    def id_embeds(self, id_pixel_values: jax.Array) -> jax.Array:
        """id_pixel_values [B, N, H, W, C] (CLIP-normalised) -> [B, N, P1 + P2]."""
        if id_pixel_values.ndim != 5:
            raise ValueError(f"id_pixel_values must be [B, N, H, W, C], got shape {id_pixel_values.shape}")
        b, n = id_pixel_values.shape[:2]
        pooled = self.vision_model(id_pixel_values.reshape(b * n, *id_pixel_values.shape[2:])).pooler_output
        emb = jnp.concatenate([self.visual_projection(pooled), self.visual_projection_2(pooled)], axis=-1)
        return emb.reshape(b, n, -1)

    def fuse(self, prompt_embeds: jax.Array, id_embeds: jax.Array, class_tokens_mask: jax.Array) -> jax.Array:
        """prompt_embeds [B, T, D], id_embeds [B, N, D], class_tokens_mask [B, T] -> [B, T, D]."""
        return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask)

    def __call__(self, id_pixel_values: jax.Array, prompt_embeds: jax.Array, class_tokens_mask: jax.Array) -> jax.Array:
        """id_pixel_values [B, N, H, W, C] (CLIP-normalised), prompt_embeds [B, T, D], class_tokens_mask
        [B, T] -> [B, T, D]: fuse(prompt_embeds, id_embeds(id_pixel_values), class_tokens_mask)."""
        return self.fuse(prompt_embeds, self.id_embeds(id_pixel_values), class_tokens_mask)


# ----------------------------------------------------------------------------- conversion

_LAYER_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def id_encoder_config_from_state_dict(sd: Mapping[str, Any], vision_config: Mapping[str, Any] | None = None) -> dict:
    """The PhotoMakerIDEncoder config of a PhotoMaker `id_encoder` state dict, from tensor shapes.

    Inferred: hidden size, layers, intermediate size, channels, patch size (conv kernel), image
    size (number of position embeddings), both projection widths. Not visible in shapes:
    num_attention_heads (default hidden // 64, the head width of every released CLIP ViT),
    hidden_act (default quick_gelu), layer_norm_eps (default 1e-5); `vision_config` overrides
    those (and any other CLIPVisionConfig field, checked against the shapes). Raises ValueError
    naming the key when the state dict is not a PhotoMaker v1 ID encoder.
    """

    def shape(key: str) -> tuple:
        if key not in sd:
            raise ValueError(f"not a PhotoMaker v1 id_encoder state dict: missing {key!r}")
        return tuple(sd[key].shape)

    patch = shape("vision_model.embeddings.patch_embedding.weight")  # [hidden, C, p, p]
    if len(patch) != 4 or patch[2] != patch[3]:
        raise ValueError(
            f"vision_model.embeddings.patch_embedding.weight: shape {patch}, expected a square "
            "[hidden, channels, patch, patch] conv kernel"
        )
    hidden, channels, patch_size = patch[0], patch[1], patch[2]
    num_positions = shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = math.isqrt(max(num_positions - 1, 0))
    if grid * grid != num_positions - 1 or grid == 0:
        raise ValueError(
            f"vision_model.embeddings.position_embedding.weight: {num_positions} positions is not "
            "1 + a square number of patches"
        )
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"vision_model.encoder.layers: expected layers 0..L-1, found indices {layers[:30]}")
    intermediate = shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0]
    proj1 = shape("visual_projection.weight")[0]
    proj2 = shape("visual_projection_2.weight")[0]
    fc1 = shape("fuse_module.mlp1.fc1.weight")  # [D, 2D]
    if fc1 != (proj1 + proj2, 2 * (proj1 + proj2)):
        raise ValueError(
            f"fuse_module.mlp1.fc1.weight: shape {fc1}, expected {(proj1 + proj2, 2 * (proj1 + proj2))} "
            f"(embed_dim = visual_projection ({proj1}) + visual_projection_2 ({proj2}))"
        )

    inferred = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=proj1,
        num_hidden_layers=len(layers),
        num_channels=channels,
        image_size=grid * patch_size,
        patch_size=patch_size,
    )
    given = dict(vision_config or {})
    given.pop("model_type", None)
    for key, value in inferred.items():
        if key in given and given[key] is not None and clip._square(given[key], key) != value:
            raise ValueError(f"vision_config.{key}={given[key]!r} contradicts the checkpoint's shapes ({value})")
    vc = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0)
    vc.update(given)
    vc.update(inferred)
    if vc.get("num_attention_heads") is None:
        if hidden % 64:
            raise ValueError(
                f"cannot infer num_attention_heads: hidden size {hidden} is not a multiple of 64 "
                "(the head width of released CLIP towers); pass it in vision_config"
            )
        vc["num_attention_heads"] = hidden // 64
    vc["model_type"] = "clip_vision_model"
    config = dict(model_type="photomaker_id_encoder", vision_config=vc, projection_dim_2=proj2)
    parse_config(config)  # validates (heads divide hidden, image divisible by patch, activation)
    return config
