"""Small building blocks shared by every model port.

Everything here computes exactly what the PyTorch layer computes (same eps,
same two-pass variance, normalisation statistics in float32), because the
parity tests compare against diffusers/transformers at 1e-4.

Parameter names follow NNX (`kernel`, `scale`, `bias`, `embedding`); the
weight conversion maps them to the PyTorch names (`weight`, `bias`) with one
rule per name, see `weights_conversion/core.py`.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Required, TypedDict

import jax
import jax.numpy as jnp
from flax import nnx

AttentionImpl = Literal["xla", "cudnn"]
_CUDNN_FALLBACKS_LOGGED: set[str] = set()  # one log line per reason, not one per attention layer / trace


class ModuleKwargs(TypedDict, total=False):
    """The construction keywords that a module only hands down to its layers (`**kw: Unpack[ModuleKwargs]`),
    as one typed value instead of three parameters and a `kw = dict(...)` in every such module."""

    dtype: Any  # compute dtype; None (the layers' default): the inputs'
    param_dtype: Any  # the layers' default: float32
    rngs: Required[nnx.Rngs]


class Identity(nnx.Module):
    """Parameter-free placeholder that keeps list indices aligned with PyTorch.

    diffusers' FeedForward is `net = [GEGLU, Dropout, Linear]`; keeping a
    placeholder at index 1 means our `net[2]` is their `net.2`.
    """

    def __call__(self, x):
        """Returns x unchanged."""
        return x


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on channels-last input.

    x: [B, ..., C]. Statistics over (spatial..., C // num_groups) per group,
    biased variance computed as mean((x - mean)^2) in float32, as PyTorch does.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        epsilon: float = 1e-5,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, ..., C] -> same shape, in `dtype` (default: x's dtype)."""
        dtype = self.dtype or x.dtype
        shape = x.shape
        g = self.num_groups
        xg = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
        mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis; statistics in float32."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        use_bias: bool = True,
        elementwise_affine: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.epsilon = epsilon
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype)) if elementwise_affine else None
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype)) if (elementwise_affine and use_bias) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> same shape, in `dtype` (default: x's dtype)."""
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class Linear(nnx.Linear):
    """nnx.Linear (kernel [in, out] = torch's weight.T, bias [out]), optionally with LoRA.

    LoRA (see `persongen_jax.models.lora.add_lora`) adds the children `lora_A` (kernel [in, r]) and
    `lora_B` (kernel [r, out]) and a static `lora_scale` = alpha / r:

        y = x @ kernel + bias + lora_scale * (x @ lora_A.kernel) @ lora_B.kernel

    The child names mirror PEFT, so `...to_q.lora_A.kernel` converts to `...to_q.lora_A.weight`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=None,
            rngs=rngs,
        )
        self.lora_A: Any = nnx.data(None)  # data attributes: LoRA modules (LoRADense) may be attached later
        self.lora_B: Any = nnx.data(None)
        self.lora_scale = 1.0

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]  # no out_sharding
        """x [..., in] -> [..., out], plus the LoRA term when LoRA is attached."""
        y = super().__call__(x)
        if self.lora_A is not None:
            y = y + (self.lora_B(self.lora_A(x)) * self.lora_scale).astype(y.dtype)
        return y


def Conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | str = 0,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """nnx.Conv on NHWC with kernel [kh, kw, in, out]; `padding` as in torch.nn.Conv2d."""
    pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=pad,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def activation(name: str):
    """Activation by its diffusers/transformers config name."""
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "gelu":  # torch default: exact erf GELU
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported activation {name!r}; expected one of silu, gelu, gelu_new, quick_gelu, relu")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: AttentionImpl | None = "xla",
) -> jax.Array:
    """Scaled dot-product attention.

    q: [B, Tq, N, H], k/v: [B, Tk, N, H], mask: boolean, broadcastable to
    [B, N, Tq, Tk] (True = attend). Returns [B, Tq, N, H].

    `implementation="cudnn"` selects the fused cuDNN kernel on GPUs (bf16/fp16
    only); "xla" is the portable reference used on CPU and in parity tests.
    """
    attend = lambda impl: jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        is_causal=is_causal,  # noqa: E731
        scale=scale,
        implementation=impl,
    )
    if implementation != "cudnn":
        return attend(implementation)
    # Fall back to XLA where cuDNN cannot run, so one config runs everywhere (CPU tests, fp32 parity runs).
    reason = _cudnn_unsupported(q)
    if reason is None:
        try:  # jax checks the remaining cuDNN limits (layouts, sequence lengths, masks) while tracing
            return attend("cudnn")
        except (ValueError, NotImplementedError, TypeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if reason not in _CUDNN_FALLBACKS_LOGGED:
        _CUDNN_FALLBACKS_LOGGED.add(reason)
        logging.getLogger("persongen_jax").warning("attention: cudnn unsupported (%s); using the XLA attention", reason)
    return attend("xla")


def _cudnn_unsupported(q: jax.Array) -> str | None:
    """Why cuDNN's fused attention cannot take q [B, T, N, H] here (None: it can): it has no CPU/TPU backend,
    no float32 kernel and no head dim above 128."""
    if jax.default_backend() != "gpu":
        return f"backend {jax.default_backend()}, not gpu"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q.dtype}; cuDNN needs bfloat16/float16 (config.dtype=bfloat16)"
    if q.shape[-1] > 128:
        return f"head dim {q.shape[-1]} > 128"
    return None
