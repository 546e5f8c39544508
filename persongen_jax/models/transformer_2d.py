"""Spatial transformer of the SDXL UNet (diffusers `attention.py` BasicTransformerBlock/FeedForward,
`activations.py` GEGLU, `transformers/transformer_2d.py` Transformer2DModel, continuous input only).

Channels-last: Transformer2DModel maps [B, H, W, C] -> [B, H, W, C]; the blocks work on tokens [B, H*W, C].
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.attention_processor import Attention
from persongen_jax.models.layers import Conv, GroupNorm, Identity, LayerNorm, Linear


class GEGLU(nnx.Module):
    """proj -> split in (value, gate) halves -> value * gelu(gate); exact erf GELU like torch's F.gelu."""

    def __init__(
        self, dim_in: int, dim_out: int, *, bias: bool = True, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.proj = Linear(dim_in, dim_out * 2, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim_in] -> [..., dim_out]."""
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """net = [GEGLU(dim, inner), Dropout, Linear(inner, dim_out)]; index 1 is a placeholder so that
    our `net.2` is diffusers' `ff.net.2` (dropout is 0 in every SDXL config)."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        *,
        mult: int = 4,
        activation_fn: str = "geglu",
        inner_dim: int | None = None,
        bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation_fn != "geglu":
            raise ValueError(f"FeedForward: activation_fn={activation_fn!r} is not ported; expected 'geglu'")
        inner_dim = inner_dim or int(dim * mult)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List(
            [GEGLU(dim, inner_dim, bias=bias, **kw), Identity(), Linear(inner_dim, dim_out or dim, use_bias=bias, **kw)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., dim] -> [..., dim_out or dim]."""
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm block: x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).

    Only diffusers' `norm_type="layer_norm"` with self-attention in attn1 (the UNet's setting).
    `cross_attention_dim=None` drops attn2/norm2 (None, as in diffusers).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        *,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        norm_eps: float = 1e-5,
        norm_elementwise_affine: bool = True,
        activation_fn: str = "geglu",
        attention_impl: str = "xla",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn_kw = dict(
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            bias=attention_bias,
            attention_impl=attention_impl,
            **kw,
        )
        ln_kw = dict(epsilon=norm_eps, elementwise_affine=norm_elementwise_affine, **kw)
        self.norm1 = LayerNorm(dim, **ln_kw)
        self.attn1 = Attention(dim, None, **attn_kw)
        self.norm2: LayerNorm | None
        self.attn2: Attention | None
        if cross_attention_dim is not None:
            self.norm2 = LayerNorm(dim, **ln_kw)
            self.attn2 = Attention(dim, cross_attention_dim, **attn_kw)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = LayerNorm(dim, **ln_kw)
        self.ff = FeedForward(dim, activation_fn=activation_fn, **kw)

    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        """x: [B, T, dim], encoder_hidden_states: [B, S, cross_attention_dim] -> [B, T, dim]."""
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None and self.norm2 is not None:  # set together
            # diffusers falls back to self-attention when no context is given; so does Attention.
            x = self.attn2(self.norm2(x), encoder_hidden_states) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """GroupNorm(eps=1e-6) -> proj_in -> BasicTransformerBlock x num_layers -> proj_out, plus residual.

    proj_in/proj_out are Linear with `use_linear_projection` (SDXL) and 1x1 convs otherwise (SD1.x);
    the two differ only in whether the projection happens before or after flattening to tokens.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        out_channels: int | None = None,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        use_linear_projection: bool = False,
        norm_eps: float = 1e-5,
        attention_impl: str = "xla",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner_dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, epsilon=1e-6, **kw)  # eps fixed in diffusers
        self.proj_in: Any  # Linear | nnx.Conv (layers.Conv builds one)
        self.proj_out: Any
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner_dim, **kw)
        else:
            self.proj_in = Conv(in_channels, inner_dim, 1, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    attention_bias=attention_bias,
                    norm_eps=norm_eps,
                    attention_impl=attention_impl,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )
        if use_linear_projection:
            self.proj_out = Linear(inner_dim, out_channels, **kw)
        else:
            self.proj_out = Conv(inner_dim, out_channels, 1, **kw)

    def __call__(self, x: jax.Array, encoder_hidden_states: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, C], encoder_hidden_states: [B, S, D] or a CrossAttentionContext (passed through to
        attn2) -> [B, H, W, C]."""
        b, h, w, _ = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.reshape(b, h * w, -1))
        else:
            x = self.proj_in(x)
            x = x.reshape(b, h * w, x.shape[-1])
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1))
        return x + residual
