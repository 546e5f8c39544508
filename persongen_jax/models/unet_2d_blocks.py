"""UNet blocks used by SDXL (diffusers `models/unets/unet_2d_blocks.py`).

Channels-last [B, H, W, C]. Every block takes `(hidden_states, temb, encoder_hidden_states)` (up
blocks: `(hidden_states, skips, temb, encoder_hidden_states, upsample_size)`); the plain blocks
ignore the context so the UNet can loop over blocks uniformly.

The arguments every block of a model shares come as one `ResnetSettings` (the resnets' keywords, dtype,
param_dtype) and, for the cross-attention blocks, one `CrossAttentionSettings` per block, instead of the
same keywords spelled out at every level; the attribute names (resnets, attentions, downsamplers,
upsamplers) are diffusers', so the parameter paths are its state-dict keys.

Down blocks return `(hidden_states, skips)`, one skip per resnet(+attention) plus one after the
downsampler. Up blocks pop skips from the end of the tuple they are given and concatenate
`[hidden_states, skip]` on the channel axis before each resnet, as diffusers does.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.resnet import Downsample2D, ResnetSettings, Upsample2D
from persongen_jax.models.transformer_2d import Transformer2DModel


def _per_layer(value: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """diffusers broadcasts an int `transformer_layers_per_block` to one entry per resnet."""
    if isinstance(value, int):
        return (value,) * num_layers
    value = tuple(value)
    if len(value) != num_layers:
        raise ValueError(f"transformer_layers_per_block {value} must have {num_layers} entries (one per layer)")
    return value


@dataclasses.dataclass(frozen=True)
class CrossAttentionSettings:
    """The Transformer2DModel arguments of one cross-attention block (diffusers' names)."""

    num_attention_heads: int = 1
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | Sequence[int] = 1
    use_linear_projection: bool = False
    attention_impl: str = "xla"

    def transformers(self, num_layers: int, channels: int, resnet: ResnetSettings, rngs: nnx.Rngs) -> nnx.List:
        """A block's attentions: one Transformer2DModel on `channels` per resnet (GroupNorm groups: the
        resnets', as in diffusers)."""
        layers = _per_layer(self.transformer_layers_per_block, num_layers)
        return nnx.List(
            [
                Transformer2DModel(
                    self.num_attention_heads,
                    channels // self.num_attention_heads,
                    channels,
                    num_layers=layers[i],
                    norm_num_groups=resnet.groups,
                    cross_attention_dim=self.cross_attention_dim,
                    use_linear_projection=self.use_linear_projection,
                    attention_impl=self.attention_impl,
                    **resnet.module_kwargs(rngs),
                )
                for i in range(num_layers)
            ]
        )


class DownBlock2D(nnx.Module):
    """diffusers DownBlock2D: ResnetBlock2D x num_layers, then an optional stride-2 Downsample2D.

    With `attention` (CrossAttnDownBlock2D) a Transformer2DModel follows each resnet.
    """

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resnet: ResnetSettings,
        *,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        attention: CrossAttentionSettings | None = None,
        rngs: nnx.Rngs,
    ):
        self.resnets = resnet.resnets([in_channels] + [out_channels] * (num_layers - 1), out_channels, rngs)
        self.attentions = attention.transformers(num_layers, out_channels, resnet, rngs) if attention else None
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, **resnet.module_kwargs(rngs))])
            if add_downsample
            else None
        )

    def __call__(
        self, hidden_states: jax.Array, temb: jax.Array | None, encoder_hidden_states: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """[B, H, W, Cin] -> ([B, H', W', Cout], skips); H' = ceil(H / 2) with a downsampler
        (downsample_padding=1, SDXL; floor(H / 2) with 0)."""
        skips: tuple[jax.Array, ...] = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips += (hidden_states,)
        return self._downsample(hidden_states, skips)

    def _downsample(self, hidden_states: jax.Array, skips: tuple[jax.Array, ...]):
        """The downsampler (when there is one) on the block's last output, which is one more skip."""
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """diffusers CrossAttnDownBlock2D: (ResnetBlock2D -> Transformer2DModel) x num_layers, then an
    optional stride-2 Downsample2D. Built as DownBlock2D with `attention`."""

    has_cross_attention = True

    def __call__(
        self,
        hidden_states: jax.Array,
        temb: jax.Array | None,
        encoder_hidden_states: jax.Array | None = None,
        additional_residuals: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """hidden_states [B, H, W, Cin], temb [B, temb_channels], encoder_hidden_states [B, S, D] or a
        CrossAttentionContext -> ([B, H', W', Cout], skips); H' = ceil(H / 2) with a downsampler
        (downsample_padding=1, SDXL; floor(H / 2) with 0). additional_residuals [B, H, W, Cout]: a
        T2I-Adapter feature, added to the last resnet+attention output (diffusers' place for it)."""
        assert self.attentions is not None  # set: the UNet builds cross-attention blocks with `attention`
        skips: tuple[jax.Array, ...] = ()
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states)
            if i == last and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals.astype(hidden_states.dtype)
            skips += (hidden_states,)
        return self._downsample(hidden_states, skips)


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet -> (attention -> resnet) x num_layers, channels unchanged."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        resnet: ResnetSettings,
        attention: CrossAttentionSettings,
        *,
        num_layers: int = 1,
        rngs: nnx.Rngs,
    ):
        self.resnets = resnet.resnets([in_channels] * (num_layers + 1), in_channels, rngs)
        self.attentions = attention.transformers(num_layers, in_channels, resnet, rngs)

    def __call__(
        self, hidden_states: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array | None = None
    ) -> jax.Array:
        """hidden_states [B, H, W, C], temb [B, temb_channels], encoder_hidden_states [B, S, D] or a
        CrossAttentionContext -> [B, H, W, C]."""
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class UpBlock2D(nnx.Module):
    """diffusers UpBlock2D: ResnetBlock2D x num_layers on [hidden_states, skip], then an optional Upsample2D.

    With `attention` (CrossAttnUpBlock2D) a Transformer2DModel follows each resnet. Positional order
    (in_channels, prev_output_channel, out_channels) is UpBlock2D's in diffusers for both (its
    CrossAttnUpBlock2D swaps the last two).
    """

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        resnet: ResnetSettings,
        *,
        num_layers: int = 1,
        add_upsample: bool = True,
        attention: CrossAttentionSettings | None = None,
        rngs: nnx.Rngs,
    ):
        # Resnet i sees [previous output, skip]: the last skip comes from the block's input level
        # (in_channels), the others from this level (out_channels).
        inputs = [prev_output_channel] + [out_channels] * (num_layers - 1)
        skips = [out_channels] * (num_layers - 1) + [in_channels]
        self.resnets = resnet.resnets([i + s for i, s in zip(inputs, skips)], out_channels, rngs)
        self.attentions = attention.transformers(num_layers, out_channels, resnet, rngs) if attention else None
        self.upsamplers = nnx.List([Upsample2D(out_channels, **resnet.module_kwargs(rngs))]) if add_upsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states_tuple: tuple[jax.Array, ...],
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """hidden_states [B, h, w, C], res_hidden_states_tuple (one skip per resnet, consumed from the end),
        temb [B, temb_channels], encoder_hidden_states [B, S, D] or a CrossAttentionContext (read by the
        attentions of CrossAttnUpBlock2D) -> [B, 2h, 2w, Cout] (upsample_size [H, W] when given; [B, h, w, Cout]
        without an upsampler)."""
        attentions = self.attentions if self.attentions is not None else [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            res = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(jnp.concatenate([hidden_states, res], axis=-1), temb)
            if attn is not None:
                hidden_states = attn(hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(UpBlock2D):
    """diffusers CrossAttnUpBlock2D: (ResnetBlock2D on [hidden_states, skip] -> Transformer2DModel) x
    num_layers, then an optional Upsample2D. Built as UpBlock2D with `attention`."""

    has_cross_attention = True
