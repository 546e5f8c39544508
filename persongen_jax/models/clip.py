"""CLIP text and vision encoders (transformers `models/clip/modeling_clip.py`), Flax NNX.

Used three ways in this project:
  * SDXL's two text encoders: `CLIPTextModel` (OpenAI ViT-L/14 text, quick_gelu) and
    `CLIPTextModelWithProjection` (OpenCLIP bigG text, gelu); SDXL takes
    `hidden_states[-2]` of both and `text_embeds` of the second.
  * PhotoMaker's ID encoder starts from `CLIPVisionModelWithProjection` (ViT-L/14).
  * The CLIP-T metric uses `CLIPModel.get_text_features / get_image_features`.

Attribute names mirror transformers, so an NNX parameter path joined with "." is the
state-dict key of the hub checkpoints (`text_model.encoder.layers.3.self_attn.q_proj.weight`,
`vision_model.pre_layrnorm.weight` (sic), `visual_projection.weight`, ...).

transformers v5 dropped the inner `text_model.` / `vision_model.` level of the bare
`CLIPTextModel` / `CLIPVisionModel` (its `state_dict()` and `save_pretrained` write
`embeddings.token_embedding.weight`); hub checkpoints (SDXL `text_encoder/`) keep it. We keep
the hub layout and `preprocess_torch_state_dict` accepts both.

Layouts: `input_ids` [B, T] int, `attention_mask` [B, T] (1 = token, 0 = padding),
`pixel_values` [B, H, W, C] channels-last (transformers takes NCHW), hidden states [B, T, D].
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Unpack

import jax
import jax.numpy as jnp
from flax import nnx, struct

from persongen_jax.models.layers import Conv, LayerNorm, Linear, ModuleKwargs, activation, dot_product_attention
from persongen_jax.models.modeling import ConfigMixin, ModelConfig, register_model

# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ModelConfig):
    """transformers CLIPTextConfig fields that change the computation (defaults = transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # transformers' default; configs written before transformers PR #24773 (SDXL's, OpenAI's)
    # say 2, which selects the legacy "argmax of input_ids" pooling.
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ModelConfig):
    """transformers CLIPVisionConfig fields that change the computation (defaults = transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """transformers CLIPConfig: both towers, the shared projection width and the initial logit_scale
    (ln of the inverse temperature; 2.6592 = ln(1 / 0.07))."""

    text_config: CLIPTextConfig
    vision_config: CLIPVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


# What the tower modules (attention, MLP, encoder) take: either tower's config.
CLIPTowerConfig = CLIPTextConfig | CLIPVisionConfig


def _square(value, key: str) -> int:
    """image_size / patch_size may be an int or an [h, w] pair; only squares are ported."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{key}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def _parse(dc, config: Mapping[str, Any], where: str):
    """Builds the frozen dataclass `dc` from a transformers config dict.

    Keys that do not change the computation (initializer_range, bos/pad ids, architectures,
    dtype, ...) are ignored; settings we do not port raise ValueError naming the key.
    """
    cfg = dict(config)
    if cfg.get("attention_dropout", 0.0) not in (0, 0.0, None):
        raise ValueError(
            f"{where}attention_dropout={cfg['attention_dropout']!r}: attention dropout "
            "is not ported (every released CLIP uses 0.0)"
        )
    if cfg.get("dropout", 0.0) not in (0, 0.0, None):
        raise ValueError(f"{where}dropout={cfg['dropout']!r}: dropout is not ported")
    names = {f.name for f in dataclasses.fields(dc)}
    kwargs = {k: v for k, v in cfg.items() if k in names and v is not None}
    for key in ("image_size", "patch_size"):
        if key in kwargs:
            kwargs[key] = _square(kwargs[key], where + key)
    if "eos_token_id" in kwargs and not isinstance(kwargs["eos_token_id"], int):
        raise ValueError(
            f"{where}eos_token_id={kwargs['eos_token_id']!r}: only a single integer eos_token_id is supported"
        )
    out = dc(**kwargs)
    try:
        activation(out.hidden_act)
    except ValueError as e:
        raise ValueError(f"{where}hidden_act: {e}") from None
    if out.hidden_size % out.num_attention_heads:
        raise ValueError(
            f"{where}hidden_size={out.hidden_size} is not divisible by num_attention_heads={out.num_attention_heads}"
        )
    if dc is CLIPVisionConfig and out.image_size % out.patch_size:
        raise ValueError(f"{where}image_size={out.image_size} is not divisible by patch_size={out.patch_size}")
    return out


def parse_text_config(config: Mapping[str, Any] | CLIPTextConfig) -> CLIPTextConfig:
    """transformers CLIPTextConfig dict (model_type "clip_text_model" or none) -> CLIPTextConfig; a
    CLIPTextConfig passes through. Keys that do not change the computation are ignored; ValueError naming
    the key for (attention_)dropout != 0, an unknown hidden_act, a non-int eos_token_id, or
    num_attention_heads not dividing hidden_size."""
    if isinstance(config, CLIPTextConfig):
        return config
    mt = config.get("model_type")
    if mt not in (None, "clip_text_model"):
        raise ValueError(f"model_type={mt!r}: expected a CLIP text config ('clip_text_model')")
    return _parse(CLIPTextConfig, config, "")


def parse_vision_config(config: Mapping[str, Any] | CLIPVisionConfig) -> CLIPVisionConfig:
    """transformers CLIPVisionConfig dict (model_type "clip_vision_model" or none) -> CLIPVisionConfig;
    a CLIPVisionConfig passes through. Checks as `parse_text_config`, plus: image_size / patch_size
    are ints or square [h, w] pairs, and patch_size divides image_size."""
    if isinstance(config, CLIPVisionConfig):
        return config
    mt = config.get("model_type")
    if mt not in (None, "clip_vision_model"):
        raise ValueError(f"model_type={mt!r}: expected a CLIP vision config ('clip_vision_model')")
    return _parse(CLIPVisionConfig, config, "")


def parse_clip_config(config: Mapping[str, Any] | CLIPConfig) -> CLIPConfig:
    """transformers CLIPConfig dict (model_type "clip" or none) -> CLIPConfig; a CLIPConfig passes
    through. text_config / vision_config are checked as in `parse_text_config` / `parse_vision_config`,
    with the legacy `text_config_dict` / `vision_config_dict` entries winning, as in transformers."""
    if isinstance(config, CLIPConfig):
        return config
    mt = config.get("model_type")
    if mt not in (None, "clip"):
        raise ValueError(f"model_type={mt!r}: expected a CLIPModel config ('clip')")
    subs = {}
    for name in ("text_config", "vision_config"):
        # Old configs (openai/clip-vit-*) also carry `<name>_dict`, which transformers lets win.
        sub = dict(config.get(name) or {})
        sub.update(config.get(name + "_dict") or {})
        sub.pop("model_type", None)
        subs[name] = _parse(CLIPTextConfig if name == "text_config" else CLIPVisionConfig, sub, name + ".")
    kw = {k: config[k] for k in ("projection_dim", "logit_scale_init_value") if config.get(k) is not None}
    return CLIPConfig(**subs, **kw)


# Reference configs (transformers config.json dicts), see `preset_config`. The towers differ in their sizes (one
# row each here) and in a few keys of their own; every CLIP's layer_norm_eps is 1e-5.
_SIZE_KEYS = ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads")
_SIZES = {
    "tiny": (32, 37, 24, 2, 4),
    "vit_l14_text": (768, 3072, 768, 12, 12),  # OpenAI CLIP ViT-L/14's text tower
    "bigg14_text": (1280, 5120, 1280, 32, 20),  # OpenCLIP ViT-bigG/14's text tower (laion2b_s39b_b160k)
    "vit_l14_vision": (1024, 4096, 768, 24, 16),  # OpenAI CLIP ViT-L/14's vision tower
}
# The hub's configs also carry transformers' dropout and initialisation keys (`_parse` checks / ignores them) and,
# for the text towers, OpenAI's tokenizer (49408 ids, 77 positions) with the token ids of configs written before
# transformers PR #24773 (eos 2: argmax pooling, see `_eos_positions`).
_HUB_KEYS: dict[str, Any] = dict(attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02)
_HUB_TEXT: dict[str, Any] = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1
)


def _tower(model_type: str, size: str, *, hidden_act: str = "quick_gelu", **keys) -> dict:
    """A tower's config.json: model_type, its `_SIZES` row, hidden_act (OpenAI's quick_gelu by default),
    layer_norm_eps, then `keys`."""
    sizes = dict(zip(_SIZE_KEYS, _SIZES[size], strict=True))
    return dict(model_type=model_type, **sizes, hidden_act=hidden_act, layer_norm_eps=1e-5, **keys)


def _clip(text: dict, vision: dict) -> dict:
    """A CLIPConfig of two towers: their projection_dim, transformers' default logit_scale_init_value."""
    return dict(
        model_type="clip",
        text_config=text,
        vision_config=vision,
        projection_dim=vision["projection_dim"],
        logit_scale_init_value=2.6592,
    )


_TINY_TEXT = _tower(
    "clip_text_model",
    "tiny",
    vocab_size=1000,
    max_position_embeddings=16,
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=1,
)
_TINY_VISION = _tower("clip_vision_model", "tiny", num_channels=3, image_size=30, patch_size=6)
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder/config.json and text_encoder_2/config.json.
_SDXL_TEXT_ENCODER = _tower(
    "clip_text_model", "vit_l14_text", architectures=["CLIPTextModel"], **_HUB_TEXT, **_HUB_KEYS
)
_SDXL_TEXT_ENCODER_2 = _tower(
    "clip_text_model",
    "bigg14_text",
    hidden_act="gelu",
    architectures=["CLIPTextModelWithProjection"],
    **_HUB_TEXT,
    **_HUB_KEYS,
)
# openai/clip-vit-large-patch14 config.json, `text_config` and `vision_config` (the vision tower is also
# PhotoMaker's ID-encoder backbone).
_VIT_L14_TEXT = _tower("clip_text_model", "vit_l14_text", **_HUB_TEXT, **_HUB_KEYS)
_VIT_L14_VISION = _tower(
    "clip_vision_model", "vit_l14_vision", num_channels=3, image_size=224, patch_size=14, **_HUB_KEYS
)

_TEXT_PRESETS = {
    "tiny": _TINY_TEXT,
    "sdxl_text_encoder": _SDXL_TEXT_ENCODER,
    "sdxl_text_encoder_2": _SDXL_TEXT_ENCODER_2,
}
_TEXT_PROJ_PRESETS = {"tiny": dict(_TINY_TEXT, hidden_act="gelu"), "sdxl_text_encoder_2": _SDXL_TEXT_ENCODER_2}
_VISION_PRESETS = {"tiny": _TINY_VISION, "vit_large_patch14": _VIT_L14_VISION}
# openai/clip-vit-large-patch14 config.json: the CLIP-T metric model.
_CLIP_PRESETS = {
    "tiny": _clip(_TINY_TEXT, _TINY_VISION),
    "clip_vit_large_patch14": _clip(_VIT_L14_TEXT, _VIT_L14_VISION),
}


# ----------------------------------------------------------------------------- outputs


@struct.dataclass
class CLIPTextOutput:
    """CLIPTextModel output (transformers BaseModelOutputWithPooling).

    last_hidden_state: [B, T, D] after final_layer_norm. pooler_output: [B, D] (EOS token).
    hidden_states: num_hidden_layers + 1 arrays [B, T, D]: embeddings, then each layer's output
    (the last one before final_layer_norm), as transformers returns them.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple


@struct.dataclass
class CLIPTextModelOutput:
    """CLIPTextModelWithProjection output; text_embeds = text_projection(pooler_output) [B, P]."""

    text_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple
    pooler_output: jax.Array


@struct.dataclass
class CLIPVisionOutput:
    """CLIPVisionModel output. last_hidden_state: [B, 1 + (S/p)^2, D] (no post_layernorm);
    pooler_output: post_layernorm(CLS token) [B, D]; hidden_states: pre_layrnorm output, then each layer's."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple


@struct.dataclass
class CLIPVisionModelOutput:
    """CLIPVisionModelWithProjection output; image_embeds = visual_projection(pooler_output) [B, P]."""

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: tuple
    pooler_output: jax.Array


@struct.dataclass
class CLIPOutput:
    """CLIPModel output: L2-normalised embeddings and exp(logit_scale)-scaled cosine logits."""

    logits_per_image: jax.Array
    logits_per_text: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array


# ----------------------------------------------------------------------------- blocks


class CLIPTextEmbeddings(nnx.Module):
    """transformers CLIPTextEmbeddings: token_embedding(input_ids) + learned position_embedding."""

    def __init__(self, config: CLIPTextConfig, **kw: Unpack[ModuleKwargs]):
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, T] -> [B, T, D]; positions 0..T-1."""
        t = input_ids.shape[-1]
        max_t = self.position_embedding.num_embeddings
        if t > max_t:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings {max_t}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPVisionEmbeddings(nnx.Module):
    """transformers CLIPVisionEmbeddings: [CLS, patch tokens] + learned position_embedding.

    patch_embedding is a patch x patch conv with stride patch and no bias; only image_size x image_size
    inputs (no position interpolation).
    """

    def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.dtype = dtype
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), param_dtype))
        self.patch_embedding = Conv(
            config.num_channels,
            d,
            config.patch_size,
            stride=config.patch_size,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nnx.Embed(num_positions, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, H, W, C] -> [B, 1 + (H/p)*(W/p), D] (CLS first, patches row-major)."""
        b, h, w, _ = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"input image size ({h}*{w}) doesn't match the model "
                f"({self.image_size}*{self.image_size}); position interpolation is not ported"
            )
        dtype = self.dtype or self.patch_embedding.kernel.dtype
        patches = self.patch_embedding(pixel_values.astype(dtype))  # [B, h, w, D]
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        emb = jnp.concatenate([cls, patches], axis=1)
        return emb + self.position_embedding.embedding[...].astype(emb.dtype)[None]


class CLIPAttention(nnx.Module):
    """Multi-head self-attention, scale head_dim**-0.5."""

    def __init__(self, config: CLIPTowerConfig, *, attention_impl: str = "xla", **kw: Unpack[ModuleKwargs]):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim**-0.5
        self.attention_impl = attention_impl
        self.k_proj = Linear(d, d, **kw)
        self.v_proj = Linear(d, d, **kw)
        self.q_proj = Linear(d, d, **kw)
        self.out_proj = Linear(d, d, **kw)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        """x [B, T, D]; mask boolean, broadcastable to [B, N, T, T] (True = attend)."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        out = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            scale=self.scale,
            implementation=self.attention_impl,  # type: ignore[arg-type]  # "xla" or "cudnn"
        )
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    """transformers CLIPMLP: fc1 -> hidden_act -> fc2."""

    def __init__(self, config: CLIPTowerConfig, **kw: Unpack[ModuleKwargs]):
        self.activation_fn = activation(config.hidden_act)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(self, config: CLIPTowerConfig, *, attention_impl: str = "xla", **kw: Unpack[ModuleKwargs]):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = CLIPAttention(config, attention_impl=attention_impl, **kw)
        self.layer_norm1 = LayerNorm(d, epsilon=eps, **kw)
        self.mlp = CLIPMLP(config, **kw)
        self.layer_norm2 = LayerNorm(d, epsilon=eps, **kw)

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        """x [B, T, D] -> [B, T, D]; mask / is_causal as in `CLIPAttention`."""
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """transformers CLIPEncoder: `layers`, num_hidden_layers CLIPEncoderLayer in sequence."""

    def __init__(self, config: CLIPTowerConfig, *, attention_impl: str = "xla", **kw: Unpack[ModuleKwargs]):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, attention_impl=attention_impl, **kw) for _ in range(config.num_hidden_layers)]
        )

    def __call__(
        self, x: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False
    ) -> tuple[jax.Array, tuple]:
        """Returns (last layer output, (input, layer 1 output, ..., layer N output))."""
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask=mask, is_causal=is_causal)
            hidden_states.append(x)
        return x, tuple(hidden_states)


def _eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled (EOS) token per row, exactly as transformers picks it.

    eos_token_id == 2 marks configs written before transformers PR #24773 (SDXL, OpenAI): the
    pooled token is the highest id in the row (the EOT token 49407 is the largest in CLIP's
    vocabulary). Otherwise: the first position holding eos_token_id (pad may equal eos).
    Ties resolve to the first index in both jnp.argmax and torch.argmax.
    """
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nnx.Module):
    """Embeddings -> causal encoder -> final_layer_norm -> EOS pooling.

    (transformers v4 name; v5 folded it into CLIPTextModel, the computation is the same.)
    """

    def __init__(self, config: CLIPTextConfig, *, attention_impl: str = "xla", **kw: Unpack[ModuleKwargs]):
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, attention_impl=attention_impl, **kw)
        self.final_layer_norm = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """input_ids [B, T]; attention_mask [B, T] (nonzero = token) masks padded *keys* on top
        of the causal mask, as transformers' create_causal_mask does."""
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            mask = (attention_mask != 0)[:, None, None, :]  # [B, 1, 1, Tk]
        last, hidden_states = self.encoder(x, mask=mask, is_causal=True)
        last = self.final_layer_norm(last)
        idx = _eos_positions(input_ids, self.eos_token_id)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)


class CLIPVisionTransformer(nnx.Module):
    """Embeddings -> pre_layrnorm -> encoder; pooled = post_layernorm(CLS)."""

    def __init__(self, config: CLIPVisionConfig, *, attention_impl: str = "xla", **kw: Unpack[ModuleKwargs]):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, **kw)
        self.pre_layrnorm = LayerNorm(d, epsilon=eps, **kw)  # sic, transformers' name
        self.encoder = CLIPEncoder(config, attention_impl=attention_impl, **kw)
        self.post_layernorm = LayerNorm(d, epsilon=eps, **kw)

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        """pixel_values [B, H, W, C] (channels-last, CLIP-normalised)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        last, hidden_states = self.encoder(x)
        pooled = self.post_layernorm(last[:, 0])
        return CLIPVisionOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)


# ----------------------------------------------------------------------------- models


def _add_prefix(sd: dict, prefix: str) -> dict:
    """transformers v5 bare CLIPText/VisionModel state dicts lack the hub's `text_model.` level."""
    return {k if k.startswith(prefix) else prefix + k: v for k, v in sd.items()}


def _drop_buffers(sd: dict) -> dict:
    # `position_ids` are non-persistent buffers; checkpoints from older transformers contain them.
    return {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


class CLIPTowerModel(ConfigMixin, nnx.Module):
    """What CLIP{Text,Vision}Model(WithProjection) share (and the PhotoMaker ID encoders, which extend
    CLIPVisionModelWithProjection as PhotoMaker's do): `config`, one tower named `_tower` (`text_model`, a
    CLIPTextTransformer, or `vision_model`, a CLIPVisionTransformer) and, in the WithProjection classes, its
    projection head named `_projection` (`text_projection` / `visual_projection`: hidden_size -> projection_dim,
    no bias). The names are transformers', so parameter paths are the checkpoints' keys."""

    _tower: ClassVar[str] = "text_model"
    _projection: ClassVar[str | None] = None
    config: Any  # the model's config: a CLIP{Text,Vision}Config here, the ID encoders' own

    def __init__(self, config: CLIPTowerConfig, *, attention_impl: str = "xla", **kw: Unpack[ModuleKwargs]):
        self.config = config
        tower: Any = {"text_model": CLIPTextTransformer, "vision_model": CLIPVisionTransformer}[self._tower]
        setattr(self, self._tower, tower(config, attention_impl=attention_impl, **kw))
        if self._projection is not None:
            setattr(self, self._projection, Linear(config.hidden_size, config.projection_dim, use_bias=False, **kw))

    @classmethod
    def preprocess_torch_state_dict(cls, sd: dict, config) -> dict:
        """Drops the `position_ids` buffers that checkpoints of older transformers carry; the bare models also
        get the `text_model.` / `vision_model.` level that transformers v5 omits from their state dicts."""
        sd = _drop_buffers(sd)
        return sd if cls._projection is not None else _add_prefix(sd, cls._tower + ".")


def _projected(output_cls, out, **embeds):
    """A WithProjection output: the tower's output `out` plus the projected embedding (text/image_embeds)."""
    return output_cls(
        **embeds,
        last_hidden_state=out.last_hidden_state,
        hidden_states=out.hidden_states,
        pooler_output=out.pooler_output,
    )


@register_model
class CLIPTextModel(CLIPTowerModel):
    """SDXL `text_encoder`: input_ids [B, T] -> CLIPTextOutput."""

    _parse_config = staticmethod(parse_text_config)
    _presets = _TEXT_PRESETS
    text_model: CLIPTextTransformer

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """input_ids [B, T] int, attention_mask [B, T] (1 = token) or None -> CLIPTextOutput."""
        return self.text_model(input_ids, attention_mask)


@register_model
class CLIPTextModelWithProjection(CLIPTowerModel):
    """SDXL `text_encoder_2`: input_ids [B, T] -> CLIPTextModelOutput (text_embeds [B, projection_dim])."""

    _parse_config = staticmethod(parse_text_config)
    _presets = _TEXT_PROJ_PRESETS
    _projection = "text_projection"
    text_model: CLIPTextTransformer
    text_projection: Linear

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextModelOutput:
        """input_ids [B, T] int, attention_mask [B, T] or None -> CLIPTextModelOutput
        (text_embeds = text_projection(pooler_output) [B, projection_dim])."""
        out = self.text_model(input_ids, attention_mask)
        return _projected(CLIPTextModelOutput, out, text_embeds=self.text_projection(out.pooler_output))


@register_model
class CLIPVisionModel(CLIPTowerModel):
    """pixel_values [B, H, W, C] -> CLIPVisionOutput."""

    _parse_config = staticmethod(parse_vision_config)
    _presets = _VISION_PRESETS
    _tower = "vision_model"
    vision_model: CLIPVisionTransformer

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        """pixel_values [B, H, W, C] channels-last, CLIP-normalised, H = W = image_size -> CLIPVisionOutput."""
        return self.vision_model(pixel_values)


@register_model
class CLIPVisionModelWithProjection(CLIPTowerModel):
    """PhotoMaker ID-encoder backbone: pixel_values [B, H, W, C] -> CLIPVisionModelOutput."""

    _parse_config = staticmethod(parse_vision_config)
    _presets = _VISION_PRESETS
    _tower = "vision_model"
    _projection = "visual_projection"
    vision_model: CLIPVisionTransformer
    visual_projection: Linear

    def __call__(self, pixel_values: jax.Array) -> CLIPVisionModelOutput:
        """pixel_values [B, H, W, C] channels-last, CLIP-normalised -> CLIPVisionModelOutput
        (image_embeds = visual_projection(pooler_output) [B, projection_dim])."""
        out = self.vision_model(pixel_values)
        return _projected(CLIPVisionModelOutput, out, image_embeds=self.visual_projection(out.pooler_output))


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x||_2 over the last axis; no epsilon, as in transformers' CLIPModel (a zero vector gives NaN)."""
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


@register_model
class CLIPModel(ConfigMixin, nnx.Module):
    """Dual encoder for the CLIP-T metric; config has `text_config` / `vision_config`."""

    _parse_config = staticmethod(parse_clip_config)
    _presets = _CLIP_PRESETS

    def __init__(
        self, config: CLIPConfig, *, dtype=None, param_dtype=jnp.float32, attention_impl: str = "xla", rngs: nnx.Rngs
    ):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        tc, vc = config.text_config, config.vision_config
        self.text_model = CLIPTextTransformer(tc, attention_impl=attention_impl, **kw)
        self.vision_model = CLIPVisionTransformer(vc, attention_impl=attention_impl, **kw)
        self.visual_projection = Linear(vc.hidden_size, config.projection_dim, use_bias=False, **kw)
        self.text_projection = Linear(tc.hidden_size, config.projection_dim, use_bias=False, **kw)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, param_dtype))

    @classmethod
    def preprocess_torch_state_dict(cls, sd: dict, config) -> dict:
        """Drops the `position_ids` buffers that checkpoints of older transformers carry."""
        return _drop_buffers(sd)

    def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """[B, T] -> text_projection(pooled) [B, projection_dim] (not normalised)."""
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] -> visual_projection(pooled) [B, projection_dim] (not normalised)."""
        return self.visual_projection(self.vision_model(pixel_values).pooler_output)

    def __call__(
        self, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array | None = None
    ) -> CLIPOutput:
        """input_ids [Bt, T], pixel_values [Bi, H, W, C], attention_mask [Bt, T] or None -> CLIPOutput:
        L2-normalised text_embeds [Bt, P] and image_embeds [Bi, P], logits_per_text [Bt, Bi] =
        exp(logit_scale) * cosine similarity, logits_per_image = its transpose [Bi, Bt]."""
        image_embeds = l2_normalize(self.get_image_features(pixel_values))
        text_embeds = l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = (text_embeds @ image_embeds.T) * jnp.exp(self.logit_scale[...]).astype(text_embeds.dtype)
        return CLIPOutput(
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )
