"""ResnetBlock2D, Downsample2D, Upsample2D (diffusers `models/resnet.py`, `downsampling.py`, `upsampling.py`).

All tensors are channels-last: [B, H, W, C].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.layers import Conv, GroupNorm, Linear, activation


class ResnetBlock2D(nnx.Module):
    """norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2, plus shortcut.

    `temb_channels=None` gives the VAE variant (no time embedding).
    Only diffusers' `time_embedding_norm="default"` and output_scale_factor 1 are ported
    (the SDXL UNet and VAE use nothing else).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "silu",
        output_scale_factor: float = 1.0,
        conv_shortcut_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = out_channels or in_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(non_linearity)
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, epsilon=eps, **kw)
        self.conv1 = Conv(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = Linear(temb_channels, out_channels, **kw) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups_out or groups, out_channels, epsilon=eps, **kw)
        self.conv2 = Conv(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = (
            Conv(in_channels, out_channels, 1, use_bias=conv_shortcut_bias, **kw)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, Cin], temb: [B, temb_channels] or None -> [B, H, W, Cout]."""
        h = self.conv1(self.act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


@dataclasses.dataclass(frozen=True)
class ResnetSettings:
    """The ResnetBlock2D keyword arguments that every resnet of a UNet or VAE block shares (same names).

    diffusers hands them down one by one (the model to each block as temb_channels, resnet_eps, resnet_groups,
    resnet_act_fn, ..., each block to each resnet); here they travel as one value. `temb_channels=None`: the VAE.
    """

    temb_channels: int | None
    eps: float
    groups: int
    non_linearity: str
    output_scale_factor: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def resnet(self, in_channels: int, out_channels: int, rngs: nnx.Rngs) -> ResnetBlock2D:
        """One ResnetBlock2D(in_channels, out_channels) with these settings."""
        return ResnetBlock2D(in_channels, out_channels, **dataclasses.asdict(self), rngs=rngs)

    def resnets(self, in_channels: Sequence[int], out_channels: int, rngs: nnx.Rngs) -> nnx.List:
        """A block's resnets: one ResnetBlock2D(c, out_channels) per entry c of in_channels."""
        return nnx.List([self.resnet(c, out_channels, rngs) for c in in_channels])

    def module_kwargs(self, rngs: nnx.Rngs) -> dict[str, Any]:
        """dtype, param_dtype and rngs, for the block's other modules (samplers, attentions)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)


class Downsample2D(nnx.Module):
    """Strided 3x3 conv. padding=1 in the UNet; padding=0 in the VAE encoder, which
    instead pads one zero row/column at the bottom/right first (diffusers does the same)."""

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        padding: int = 1,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.padding = padding
        self.conv = Conv(
            channels,
            out_channels or channels,
            3,
            stride=2,
            padding=padding,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H', W', out_channels]; H' = ceil(H / 2) with padding 1, floor(H / 2) with
        padding 0."""
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """F.interpolate(mode="nearest") on [B, H, W, C]: 2x by default, or to `size`.

    PyTorch's nearest picks source index floor(dst * in / out); for exact 2x that is
    a repeat, which is what XLA lowers best.
    """
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    oh, ow = size
    rows = jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32)
    cols = jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32)
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest 2x (or to `output_size`) then 3x3 conv."""

    def __init__(
        self, channels: int, out_channels: int | None = None, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.conv = Conv(
            channels, out_channels or channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        """x [B, H, W, C] -> [B, 2H, 2W, out_channels], or [B, *output_size, out_channels] when given."""
        return self.conv(upsample_nearest(x, output_size))
