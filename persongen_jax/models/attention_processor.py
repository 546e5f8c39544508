"""diffusers `Attention` (models/attention_processor.py), default processor only.

Self- or cross-attention with `to_q, to_k, to_v, to_out[0]`. The VAE variant
(`group_norm` + `residual_connection`, spatial input) is the same module with
those options on, as in diffusers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.layers import GroupNorm, Identity, Linear, dot_product_attention


class Attention(nnx.Module):
    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, *, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True,
                 norm_num_groups: int | None = None, eps: float = 1e-5,
                 residual_connection: bool = False, rescale_output_factor: float = 1.0,
                 attention_impl: str = "xla", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.attention_impl = attention_impl
        self.group_norm = GroupNorm(norm_num_groups, query_dim, epsilon=eps, **kw) if norm_num_groups else None
        self.to_q = Linear(query_dim, inner, use_bias=bias, **kw)
        self.to_k = Linear(kv_dim, inner, use_bias=bias, **kw)
        self.to_v = Linear(kv_dim, inner, use_bias=bias, **kw)
        # to_out = [Linear, Dropout] in diffusers: index 1 is a placeholder.
        self.to_out = nnx.List([Linear(inner, query_dim, use_bias=out_bias, **kw), Identity()])

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """q: [B, Tq, heads*dim_head], k/v: [B, Tk, heads*dim_head] -> [B, Tq, heads*dim_head]."""
        b, tq, _ = q.shape
        tk = k.shape[1]
        split = lambda t, n: t.reshape(b, n, self.heads, self.dim_head)
        out = dot_product_attention(split(q, tq), split(k, tk), split(v, tk), mask=mask,
                                    scale=self.scale, implementation=self.attention_impl)
        return out.reshape(b, tq, self.heads * self.dim_head)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """hidden_states: [B, T, C] or [B, H, W, C] (VAE); encoder_hidden_states: [B, S, D] or None."""
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, h, w, c = hidden_states.shape
            hidden_states = hidden_states.reshape(b, h * w, c)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = self.attend(self.to_q(hidden_states), self.to_k(context), self.to_v(context), mask)
        out = self.to_out[0](out)
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
