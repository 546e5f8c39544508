"""diffusers `Attention` (models/attention_processor.py) with its behaviour in a processor object.

Self- or cross-attention with `to_q, to_k, to_v, to_out[0]`. The VAE variant (`group_norm` +
`residual_connection`, spatial input) is the same module with those options on, as in diffusers.

What the attention computes between the projections is the job of `attn.processor`, an NNX module
called as `processor(attn, hidden_states, context, mask)` (diffusers' `AttnProcessor2_0` /
`IPAdapterAttnProcessor2_0` pattern: swapping the processor swaps the behaviour):

    AttnProcessor                 the plain attention: to_out(attn(q, to_k(ctx), to_v(ctx)))
    ParallelAdapterProcessor      IP-Adapter wiring (diffusers IPAdapterAttnProcessor2_0):
        out = to_out(attn(q, to_k(text), to_v(text)) + sum_c s_c * attn(q, to_k[c](cond_c), to_v[c](cond_c)))
    SequentialAdapterProcessor    the target method's wiring, conditions in `names` order (bg -> body -> id):
        y = to_out(attn(q, to_k(text), to_v(text)))
        for c in names, if c is given:  y = y + s_c * to_out(attn(to_q(y), to_k[c](cond_c), to_v[c](cond_c)))

The adapter processors own the extra projections per condition name c, `processor.to_k[c]` /
`processor.to_v[c]` (copies of `to_k` / `to_v`, added by `persongen_jax.models.lora.add_adapters`), so
their parameter paths are `...attn2.processor.to_k.<c>.kernel`. A new wiring mode is a subclass of
`AdapterProcessor` registered in `ADAPTER_PROCESSORS`.

With adapters, `encoder_hidden_states` is a `CrossAttentionContext(text, conditions, scales)` instead of
an array. A condition missing from `conditions` is skipped; s_c may be a scalar or a [B] array (s_c[b] = 0:
condition absent for sample b, e.g. condition dropout in training). In sequential mode a skipped condition
passes y through unchanged, so with no conditions both adapter processors give exactly the plain output.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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


class AttnProcessor(nnx.Module):
    """The plain (self- or cross-) attention; holds no parameters."""

    def __call__(
        self, attn: "Attention", hidden_states: jax.Array, context: CrossAttentionContext | None, mask: jax.Array | None
    ) -> jax.Array:
        """hidden_states: [B, T, C] (already group-normed); context: None for self-attention -> [B, T, C]."""
        return attn.to_out[0](self.attention(attn, attn.to_q(hidden_states), hidden_states, context, mask))

    @staticmethod
    def attention(
        attn: "Attention",
        q: jax.Array,
        hidden_states: jax.Array,
        context: CrossAttentionContext | None,
        mask: jax.Array | None,
    ) -> jax.Array:
        """attn(q, to_k(ctx), to_v(ctx)) before `to_out`; ctx = the text, or the hidden states themselves."""
        kv = hidden_states if context is None else context.text
        return attn.attend(q, attn.to_k(kv), attn.to_v(kv), mask)


class AdapterProcessor(AttnProcessor):
    """Base of the adapter wirings: the per-condition projections `to_k[c]` / `to_v[c]` and default scales.

    names: condition names in wiring order; scales: their default scales (same order).
    to_k / to_v: {name: Linear} projecting the condition tokens [B, S, D] to the attention width.
    """

    mode: str = ""

    def __init__(
        self, names: Sequence[str], scales: Sequence[float], to_k: Mapping[str, Linear], to_v: Mapping[str, Linear]
    ):
        self.names = tuple(names)
        self.scales = tuple(float(s) for s in scales)
        self.to_k = nnx.Dict({n: to_k[n] for n in self.names})
        self.to_v = nnx.Dict({n: to_v[n] for n in self.names})

    def conditions(self, context: CrossAttentionContext | None) -> list[tuple[str, jax.Array, Any]]:
        """[(name, cond [B, S, D], scale)] of the given conditions, in wiring order."""
        if context is None or not context.conditions:
            return []
        unknown = sorted(set(context.conditions) - set(self.names))
        if unknown:
            raise ValueError(
                f"Attention: conditions {unknown} have no adapter layers (adapters: "
                f"{list(self.names)}); add them with lora.add_adapters"
            )
        scales = dict(zip(self.names, self.scales))
        scales.update(context.scales or {})
        # A static scale of 0 skips the work; a traced one (or a [B] array) is applied as is.
        return [
            (n, context.conditions[n], scales[n])
            for n in self.names
            if n in context.conditions and not (isinstance(scales[n], (int, float)) and scales[n] == 0)
        ]

    def project(self, name: str, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Condition tokens -> (keys, values) of adapter `name`."""
        return self.to_k[name](cond), self.to_v[name](cond)


class ParallelAdapterProcessor(AdapterProcessor):
    """IP-Adapter wiring: each condition's attention output is added, scaled, before `to_out`."""

    mode = "parallel"

    def __call__(self, attn, hidden_states, context, mask):
        """hidden_states [B, T, C] (already group-normed), context with the conditions -> [B, T, C]:
        to_out(attn(q, text) + sum_c s_c * attn(q, to_k[c](cond_c), to_v[c](cond_c)))."""
        q = attn.to_q(hidden_states)
        out = self.attention(attn, q, hidden_states, context, mask)
        for name, cond, scale in self.conditions(context):
            out = out + _bcast(scale, out) * attn.attend(q, *self.project(name, cond))
        return attn.to_out[0](out)


class SequentialAdapterProcessor(AdapterProcessor):
    """The target method's wiring: each condition refines the previous output, with a skip connection."""

    mode = "sequential"

    def __call__(self, attn, hidden_states, context, mask):
        """hidden_states [B, T, C] (already group-normed), context with the conditions -> [B, T, C]: the plain
        output y, then y += s_c * to_out(attn(to_q(y), to_k[c](cond_c), to_v[c](cond_c))) per given condition,
        in `names` order."""
        out = AttnProcessor.__call__(self, attn, hidden_states, context, mask)  # the plain attention
        for name, cond, scale in self.conditions(context):
            out = out + _bcast(scale, out) * attn.to_out[0](attn.attend(attn.to_q(out), *self.project(name, cond)))
        return out


# Adapter wiring modes by their config name (`config.adapters.mode`, the adapter folder's "mode").
ADAPTER_PROCESSORS: dict[str, type[AdapterProcessor]] = {
    cls.mode: cls for cls in (ParallelAdapterProcessor, SequentialAdapterProcessor)
}
ADAPTER_MODES = tuple(ADAPTER_PROCESSORS)


class Attention(nnx.Module):
    """diffusers `Attention`: projections `to_q, to_k, to_v, to_out[0]` and a `processor` that combines them.

    query_dim: width C of the hidden states; cross_attention_dim: width D of the context (None: self-attention).
    heads x dim_head: the attention width. norm_num_groups / residual_connection / rescale_output_factor:
    the VAE mid-block variant. attention_impl: "xla" | "cudnn" (see `layers.dot_product_attention`).
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        *,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        attention_impl: str = "xla",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.attention_impl = attention_impl
        self.group_norm = GroupNorm(norm_num_groups, query_dim, epsilon=eps, **kw) if norm_num_groups else None
        self.to_q = Linear(query_dim, inner, use_bias=bias, **kw)
        self.to_k = Linear(kv_dim, inner, use_bias=bias, **kw)
        self.to_v = Linear(kv_dim, inner, use_bias=bias, **kw)
        # to_out = [Linear, Dropout] in diffusers: index 1 is a placeholder.
        self.to_out = nnx.List([Linear(inner, query_dim, use_bias=out_bias, **kw), Identity()])
        self.processor: AttnProcessor = AttnProcessor()

    def set_processor(self, processor: AttnProcessor) -> None:
        """Swaps what the attention computes (diffusers' `Attention.set_processor`)."""
        self.processor = processor

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """q: [B, Tq, heads*dim_head], k/v: [B, Tk, heads*dim_head] -> [B, Tq, heads*dim_head]."""
        b, tq, _ = q.shape
        tk = k.shape[1]
        split = lambda t, n: t.reshape(b, n, self.heads, self.dim_head)
        out = dot_product_attention(
            split(q, tq),
            split(k, tk),
            split(v, tk),
            mask=mask,
            scale=self.scale,
            implementation=self.attention_impl,  # type: ignore[arg-type]
        )
        return out.reshape(b, tq, self.heads * self.dim_head)

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array | CrossAttentionContext | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """hidden_states: [B, T, C] or [B, H, W, C] (VAE); encoder_hidden_states: [B, S, D], a
        CrossAttentionContext, or None (self-attention)."""
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, h, w, c = hidden_states.shape
            hidden_states = hidden_states.reshape(b, h * w, c)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        context = encoder_hidden_states
        if context is not None and not isinstance(context, CrossAttentionContext):
            context = CrossAttentionContext(text=context)
        out = self.processor(self, hidden_states, context, mask)
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


def _bcast(scale, like: jax.Array):
    """A scalar or per-sample [B] scale, broadcast against [B, T, C]."""
    scale = jnp.asarray(scale, dtype=like.dtype)
    return scale.reshape(scale.shape + (1,) * (like.ndim - scale.ndim)) if scale.ndim else scale
