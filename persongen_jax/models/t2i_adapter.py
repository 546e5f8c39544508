"""SDXL T2I-Adapter (diffusers `models/adapter.py`, `T2IAdapter` with adapter_type="full_adapter_xl") in NNX.

    features = adapter(image [B, H, W, Cin] in [0, 1])      one [B, h_i, w_i, C_i] per entry of `channels`
    unet(..., down_intrablock_additional_residuals=[f * adapter_conditioning_scale for f in features])

FullAdapterXL: pixel-unshuffle by `downscale_factor` (16), conv_in, then one AdapterBlock per entry of
`channels` (block 1 changes the width, block 2 also average-pools by 2), each a stack of AdapterResnetBlocks
(conv3x3 -> ReLU -> conv1x1, plus the input). The features are computed once per image (not per step) and
added by the UNet where diffusers adds them (`unet.UNetEncoderMixin._encode`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Unpack

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.layers import Conv, ModuleKwargs
from persongen_jax.models.modeling import ConfigMixin, check_field_types, register_model


@dataclasses.dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers T2IAdapter config (same names and defaults); only the SDXL adapter type is ported."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 16
    adapter_type: str = "full_adapter_xl"

    def __post_init__(self):
        check_field_types(self)
        if self.adapter_type != "full_adapter_xl":
            raise ValueError(
                f"T2IAdapter config: adapter_type={self.adapter_type!r}; only 'full_adapter_xl' (SDXL) is ported"
            )
        if len(self.channels) < 3:
            raise ValueError(f"T2IAdapter config: channels={list(self.channels)}; full_adapter_xl needs at least 3")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "T2IAdapterConfig":
        """diffusers config.json dict -> config; ValueError naming an unknown key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in fields:
                raise ValueError(f"T2IAdapter config: unknown key {key!r} (supported: {sorted(fields)})")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    @property
    def total_downscale_factor(self) -> int:
        """Image pixels per pixel of the last features (XL: one average pool after the unshuffle)."""
        return self.downscale_factor * 2


def check_adapter_matches_unet(
    config: T2IAdapterConfig, unet_config, vae_factor: int | None = None, name: str = "T2I-Adapter"
) -> None:
    """ValueError (one line, listing both shapes) when the adapter's features do not fit the UNet: one feature
    per down block with its width (then, optionally, one more of the mid block's width), and, given the VAE's
    factor, the first features at half the latent size (the first down block's output)."""
    boc = list(unet_config.block_out_channels)
    expected = boc + [boc[-1]]
    ch = list(config.channels)
    bad = []
    if not (ch == expected[: len(ch)] and len(boc) <= len(ch) <= len(expected)):
        bad.append(f"feature channels {ch} vs the UNet's {boc} (+ mid {boc[-1]})")
    if vae_factor is not None and config.downscale_factor != 2 * vae_factor:
        bad.append(f"downscale_factor {config.downscale_factor} vs the {2 * vae_factor} the VAE's x{vae_factor} needs")
    if bad:
        raise ValueError(f"{name} was made for another UNet: " + "; ".join(bad))


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
    """torch.nn.PixelUnshuffle(r) on channels-last: [B, H*r, W*r, C] -> [B, H, W, C*r*r], channel c*r*r + i*r + j
    holding pixel (i, j) of each r x r patch, as torch orders them."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def avg_pool_ceil(x: jax.Array) -> jax.Array:
    """torch AvgPool2d(2, 2, ceil_mode=True) on [B, H, W, C]: windows that run off an odd edge average only the
    pixels inside it."""
    b, h, w, c = x.shape
    ph, pw = h % 2, w % 2
    pad = ((0, 0), (0, ph), (0, pw), (0, 0))
    total = jnp.pad(x, pad).reshape(b, (h + ph) // 2, 2, (w + pw) // 2, 2, c).sum(axis=(2, 4))
    count = jnp.pad(jnp.ones((1, h, w, 1), x.dtype), pad).reshape(1, (h + ph) // 2, 2, (w + pw) // 2, 2, 1)
    return total / count.sum(axis=(2, 4))


class AdapterResnetBlock(nnx.Module):
    """conv3x3 -> ReLU -> conv1x1, plus the input."""

    def __init__(self, channels: int, **kw: Unpack[ModuleKwargs]):
        self.block1 = Conv(channels, channels, 3, padding=1, **kw)
        self.block2 = Conv(channels, channels, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H, W, C]."""
        return self.block2(jax.nn.relu(self.block1(x))) + x


class AdapterBlock(nnx.Module):
    """Optional 2x average pool, optional 1x1 width change (in_conv), then num_res_blocks AdapterResnetBlocks."""

    def __init__(
        self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool = False, **kw: Unpack[ModuleKwargs]
    ):
        self.down = down
        self.in_conv = Conv(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        self.resnets = nnx.List([AdapterResnetBlock(out_channels, **kw) for _ in range(num_res_blocks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, Cin] -> [B, H', W', Cout] (H' = ceil(H / 2) when down)."""
        if self.down:
            x = avg_pool_ceil(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        for resnet in self.resnets:
            x = resnet(x)
        return x


class FullAdapterXL(nnx.Module):
    """diffusers FullAdapterXL (the `adapter` submodule of T2IAdapter)."""

    def __init__(self, c: T2IAdapterConfig, **kw: Unpack[ModuleKwargs]):
        ch = c.channels
        self.downscale_factor = c.downscale_factor
        self.conv_in = Conv(c.in_channels * c.downscale_factor**2, ch[0], 3, padding=1, **kw)
        body = []
        for i in range(len(ch)):
            if i == 1:
                body.append(AdapterBlock(ch[0], ch[1], c.num_res_blocks, **kw))
            elif i == 2:
                body.append(AdapterBlock(ch[1], ch[2], c.num_res_blocks, down=True, **kw))
            else:
                body.append(AdapterBlock(ch[i], ch[i], c.num_res_blocks, **kw))
        self.body = nnx.List(body)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """[B, H, W, Cin] -> one feature [B, h_i, w_i, C_i] per block (T2IAdapter.__call__ gives the sizes)."""
        x = self.conv_in(pixel_unshuffle(x, self.downscale_factor))
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


@register_model
class T2IAdapter(ConfigMixin, nnx.Module):
    """diffusers T2IAdapter (full_adapter_xl); parameter paths are the diffusers state-dict keys."""

    _parse_config = staticmethod(T2IAdapterConfig.from_dict)  # from_config: a diffusers config.json dict

    def __init__(self, config: T2IAdapterConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        # No attention in the adapter: no attention_impl (from_config takes one and leaves it out).
        self.config = config
        self.dtype = dtype
        self.adapter = FullAdapterXL(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """image [B, H, W, in_channels] in [0, 1] (H, W multiples of total_downscale_factor) -> features, one
        [B, H / 16, W / 16, C_i] (after the pool: / 32) per entry of config.channels."""
        return self.adapter(x.astype(self.dtype or x.dtype))
