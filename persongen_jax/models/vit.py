"""ViT image encoder (transformers `models/vit/modeling_vit.py` `ViTModel` without its pooler), Flax NNX.

The DINO metric's model: DINO v1 checkpoints on the hub (facebook/dino-vits16, -vits8, -vitb16, -vitb8) are
transformers `ViTModel` folders; the DINO embedding of an image is `last_hidden_state[:, 0]`, the CLS token
after the final LayerNorm (DreamBooth's protocol), which `ViTModel.__call__` returns with the sequence.
Any size is read from config.json (hidden_size, layers, heads, intermediate_size, image_size, patch_size,
layer_norm_eps, qkv_bias, hidden_act).

Attribute names mirror transformers v5 (`layers.3.attention.q_proj`, `layers.3.mlp.fc1`,
`layers.3.layernorm_before`, `layernorm`); `preprocess_torch_state_dict` also reads the hub's (and
transformers' saved) layout (`encoder.layer.3.attention.attention.query`, `...attention.output.dense`,
`...intermediate.dense`, `...output.dense`) and drops the `pooler.*` head, which the embedding does not use.
Dropout is ignored (inference only). No position-embedding interpolation: inputs are image_size x image_size.

Layouts: `pixel_values` [B, H, W, C] channels-last (transformers takes NCHW), hidden states [B, T, D] with
T = 1 + (H / patch) * (W / patch), CLS first then patches row-major.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Unpack

import jax
import jax.numpy as jnp
from flax import nnx, struct

from persongen_jax.models.layers import (
    AttentionImpl,
    Conv,
    LayerNorm,
    Linear,
    ModuleKwargs,
    activation,
    dot_product_attention,
)
from persongen_jax.models.modeling import ConfigMixin, ModelConfig, register_model


@dataclasses.dataclass(frozen=True)
class ViTConfig(ModelConfig):
    """transformers ViTConfig fields that change the computation (defaults = transformers')."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True


def _square(value, key: str):
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{key}={value!r}: only square sizes are supported")
        return value[0]
    return value


def parse_vit_config(config: Mapping[str, Any] | ViTConfig) -> ViTConfig:
    """transformers ViTConfig dict (model_type "vit" or none) -> ViTConfig. Keys that do not change the
    inference computation (dropout, initializer_range, pooler_*, encoder_stride) are ignored; ValueError
    naming the key for a non-square size, a patch size not dividing the image, heads not dividing the width,
    an unknown activation, or an explicit head_dim."""
    if isinstance(config, ViTConfig):
        return config
    mt = config.get("model_type")
    if mt not in (None, "vit"):
        raise ValueError(f"model_type={mt!r}: expected a ViT config ('vit')")
    if config.get("head_dim") not in (None, config.get("hidden_size", 768) // config.get("num_attention_heads", 12)):
        raise ValueError(f"head_dim={config['head_dim']!r}: only hidden_size / num_attention_heads is supported")
    names = {f.name for f in dataclasses.fields(ViTConfig)}
    kw = {k: v for k, v in config.items() if k in names and v is not None}
    for key in ("image_size", "patch_size"):
        if key in kw:
            kw[key] = _square(kw[key], key)
    out = ViTConfig(**kw)
    activation(out.hidden_act)
    if out.image_size % out.patch_size:
        raise ValueError(f"patch_size={out.patch_size} does not divide image_size={out.image_size}")
    if out.hidden_size % out.num_attention_heads:
        raise ValueError(f"num_attention_heads={out.num_attention_heads} does not divide hidden_size={out.hidden_size}")
    return out


@struct.dataclass
class ViTOutput:
    """last_hidden_state [B, T, D] (after the final LayerNorm); `cls` = last_hidden_state[:, 0] [B, D]."""

    last_hidden_state: jax.Array

    @property
    def cls(self) -> jax.Array:
        """The CLS token after the final LayerNorm [B, D]: DINO's embedding."""
        return self.last_hidden_state[:, 0]


class ViTPatchEmbeddings(nnx.Module):
    """A patch x patch conv with stride patch (with bias) -> [B, (H/p)*(W/p), D]."""

    def __init__(self, config: ViTConfig, **kw: Unpack[ModuleKwargs]):
        self.projection = Conv(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size, **kw
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, H, W, C] -> patch tokens [B, (H/p) * (W/p), D]."""
        x = self.projection(pixel_values)  # [B, h, w, D]
        return x.reshape(x.shape[0], -1, x.shape[-1])


class ViTEmbeddings(nnx.Module):
    """[CLS, patch tokens] + position_embeddings ([1, 1 + N, D], learned)."""

    def __init__(self, config: ViTConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.dtype = dtype
        self.image_size = config.image_size
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d), param_dtype))
        self.patch_embeddings = ViTPatchEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = (config.image_size // config.patch_size) ** 2
        self.position_embeddings = nnx.Param(jax.random.normal(rngs.params(), (1, n + 1, d), param_dtype))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [B, H, W, C] -> [B, 1 + N, D]."""
        b, h, w, _ = pixel_values.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"input image size ({h}*{w}) doesn't match the model ({self.image_size}*"
                f"{self.image_size}); position interpolation is not ported"
            )
        dtype = self.dtype or self.patch_embeddings.projection.kernel.dtype
        patches = self.patch_embeddings(pixel_values.astype(dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (b, 1, patches.shape[-1]))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embeddings[...].astype(patches.dtype)


class ViTAttention(nnx.Module):
    """Multi-head self-attention (q/k/v with `qkv_bias`, o_proj with bias), scale head_dim**-0.5."""

    def __init__(self, config: ViTConfig, *, attention_impl: AttentionImpl = "xla", **kw: Unpack[ModuleKwargs]):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.attention_impl = attention_impl
        self.q_proj = Linear(d, d, use_bias=config.qkv_bias, **kw)
        self.k_proj = Linear(d, d, use_bias=config.qkv_bias, **kw)
        self.v_proj = Linear(d, d, use_bias=config.qkv_bias, **kw)
        self.o_proj = Linear(d, d, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        out = dot_product_attention(
            self.q_proj(x).reshape(shape),
            self.k_proj(x).reshape(shape),
            self.v_proj(x).reshape(shape),
            scale=self.head_dim**-0.5,
            implementation=self.attention_impl,
        )
        return self.o_proj(out.reshape(b, t, -1))


class ViTMLP(nnx.Module):
    """fc1 -> hidden_act -> fc2."""

    def __init__(self, config: ViTConfig, **kw: Unpack[ModuleKwargs]):
        self.activation_fn = activation(config.hidden_act)
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> fc2(act(fc1(x))) [B, T, D]."""
        return self.fc2(self.activation_fn(self.fc1(x)))


class ViTLayer(nnx.Module):
    """Pre-LN block: x + attention(layernorm_before(x)), then + mlp(layernorm_after(.))."""

    def __init__(self, config: ViTConfig, *, attention_impl: AttentionImpl = "xla", **kw: Unpack[ModuleKwargs]):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.attention = ViTAttention(config, attention_impl=attention_impl, **kw)
        self.layernorm_before = LayerNorm(d, epsilon=eps, **kw)
        self.layernorm_after = LayerNorm(d, epsilon=eps, **kw)
        self.mlp = ViTMLP(config, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]: pre-norm attention and MLP, each with its residual."""
        x = x + self.attention(self.layernorm_before(x))
        return x + self.mlp(self.layernorm_after(x))


# Hub / saved layout -> transformers v5 (our) names, per layer.
_LEGACY = [
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
]

# facebook/dino-vits16 config.json (DINO ViT-S/16, the DINO metric's model in DreamBooth / PhotoMaker).
DINO_VITS16 = dict(
    architectures=["ViTModel"],
    model_type="vit",
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    image_size=224,
    patch_size=16,
    num_channels=3,
    qkv_bias=True,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.02,
)
_PRESETS = {
    "tiny": dict(
        model_type="vit",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    ),
    "dino_vits16": DINO_VITS16,
}


@register_model
class ViTModel(ConfigMixin, nnx.Module):
    """pixel_values [B, H, W, C] -> ViTOutput (last_hidden_state after the final `layernorm`)."""

    _parse_config = staticmethod(parse_vit_config)
    _presets = _PRESETS  # "tiny", "dino_vits16"

    def __init__(self, config: ViTConfig, *, attention_impl: AttentionImpl = "xla", **kw: Unpack[ModuleKwargs]):
        self.config = config
        self.embeddings = ViTEmbeddings(config, **kw)
        self.layers = nnx.List(
            [ViTLayer(config, attention_impl=attention_impl, **kw) for _ in range(config.num_hidden_layers)]
        )
        self.layernorm = LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)

    @classmethod
    def preprocess_torch_state_dict(cls, sd: dict, config) -> dict:
        """Hub layout -> ours (see the module docstring); the pooler head is dropped (unused)."""
        out = {}
        for k, v in sd.items():
            if k.startswith("pooler."):
                continue
            for pattern, repl in _LEGACY:
                k, n = re.subn(pattern, repl, k)
                if n:
                    break
            out[k] = v
        return out

    def __call__(self, pixel_values: jax.Array) -> ViTOutput:
        """pixel_values [B, H, W, C] (channels-last, normalised by the folder's image processor)."""
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return ViTOutput(last_hidden_state=self.layernorm(x))
