"""diffusers `Attention` (models/attention_processor.py): the default processor, plus adapter
cross-attentions (IP-Adapter style, DESIGN point 4).

Self- or cross-attention with `to_q, to_k, to_v, to_out[0]`. The VAE variant
(`group_norm` + `residual_connection`, spatial input) is the same module with
those options on, as in diffusers.

Adapters (added by `persongen_jax.models.lora.add_adapters`, cross-attention only): per
condition name c (e.g. "bg", "body", "id") the extra projections `to_k_<c>`, `to_v_<c>`, and
`encoder_hidden_states` is a `CrossAttentionContext(text, conditions, scales)` instead of an
array. With q = to_q(x), attn(q, k, v) the multi-head attention before `to_out`:

    parallel (IP-Adapter, diffusers IPAdapterAttnProcessor2_0):
        out = to_out(attn(q, to_k(text), to_v(text)) + sum_c s_c * attn(q, to_k_c(cond_c), to_v_c(cond_c)))

    sequential (the target method; conditions in `adapter_names` order, e.g. bg -> body -> id):
        y = to_out(attn(q, to_k(text), to_v(text)))
        for c in names, if c is given:
            y = y + s_c * to_out(attn(to_q(y), to_k_c(cond_c), to_v_c(cond_c)))
        out = y

A condition missing from `conditions` is skipped; s_c may be a scalar or a [B] array
(s_c[b] = 0: condition absent for sample b, e.g. condition dropout in training). In sequential
mode a skipped condition passes y through unchanged, so with no conditions the output is
exactly that of the plain attention.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

from persongen_jax.models.layers import GroupNorm, Identity, Linear, dot_product_attention


@struct.dataclass
class CrossAttentionContext:
    """What the UNet's cross-attentions attend to; passed through the blocks as `encoder_hidden_states`.

    text: [B, T, D] prompt embedding. conditions: {name: [B, S_c, D]} adapter conditions
    (text embeddings of P_bg / P_body, or projected identity tokens). scales: {name: scalar or [B]};
    a name missing here uses the adapter's default scale. Self-attention ignores all of it.
    """

    text: jax.Array
    conditions: Mapping[str, jax.Array] = struct.field(default_factory=dict)
    scales: Mapping[str, Any] = struct.field(default_factory=dict)


ADAPTER_MODES = ("parallel", "sequential")


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
        # Adapter cross-attentions (see the module docstring); set by lora.add_adapters.
        self.adapter_names: tuple[str, ...] = ()
        self.adapter_mode: str | None = None
        self.adapter_scales: tuple[float, ...] = ()

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """q: [B, Tq, heads*dim_head], k/v: [B, Tk, heads*dim_head] -> [B, Tq, heads*dim_head]."""
        b, tq, _ = q.shape
        tk = k.shape[1]
        split = lambda t, n: t.reshape(b, n, self.heads, self.dim_head)
        out = dot_product_attention(split(q, tq), split(k, tk), split(v, tk), mask=mask,
                                    scale=self.scale, implementation=self.attention_impl)
        return out.reshape(b, tq, self.heads * self.dim_head)

    def __call__(self, hidden_states: jax.Array,
                 encoder_hidden_states: jax.Array | CrossAttentionContext | None = None,
                 mask: jax.Array | None = None) -> jax.Array:
        """hidden_states: [B, T, C] or [B, H, W, C] (VAE); encoder_hidden_states: [B, S, D], a
        CrossAttentionContext, or None (self-attention)."""
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, h, w, c = hidden_states.shape
            hidden_states = hidden_states.reshape(b, h * w, c)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        ctx = encoder_hidden_states if isinstance(encoder_hidden_states, CrossAttentionContext) else None
        text = ctx.text if ctx is not None else encoder_hidden_states
        context = hidden_states if text is None else text
        q = self.to_q(hidden_states)
        out = self.attend(q, self.to_k(context), self.to_v(context), mask)
        conditions = self._conditions(ctx)
        if self.adapter_mode == "parallel":
            for name, cond, scale in conditions:
                k, v = getattr(self, f"to_k_{name}")(cond), getattr(self, f"to_v_{name}")(cond)
                out = out + _bcast(scale, out) * self.attend(q, k, v)
            out = self.to_out[0](out)
        else:
            out = self.to_out[0](out)
            for name, cond, scale in conditions:  # sequential
                k, v = getattr(self, f"to_k_{name}")(cond), getattr(self, f"to_v_{name}")(cond)
                out = out + _bcast(scale, out) * self.to_out[0](self.attend(self.to_q(out), k, v))
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    def _conditions(self, ctx: CrossAttentionContext | None) -> list[tuple[str, jax.Array, Any]]:
        """[(name, cond [B, S, D], scale)] of the given conditions, in adapter order."""
        if ctx is None or not ctx.conditions:
            return []
        unknown = sorted(set(ctx.conditions) - set(self.adapter_names))
        if unknown:
            raise ValueError(f"Attention: conditions {unknown} have no adapter layers (adapters: "
                             f"{list(self.adapter_names)}); add them with lora.add_adapters")
        scales = dict(zip(self.adapter_names, self.adapter_scales))
        scales.update(ctx.scales or {})
        # A static scale of 0 skips the work; a traced one (or a [B] array) is applied as is.
        return [(n, ctx.conditions[n], scales[n]) for n in self.adapter_names
                if n in ctx.conditions and not (isinstance(scales[n], (int, float)) and scales[n] == 0)]


def _bcast(scale, like: jax.Array):
    """A scalar or per-sample [B] scale, broadcast against [B, T, C]."""
    scale = jnp.asarray(scale, dtype=like.dtype)
    return scale.reshape(scale.shape + (1,) * (like.ndim - scale.ndim)) if scale.ndim else scale
