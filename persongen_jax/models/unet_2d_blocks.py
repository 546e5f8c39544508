"""UNet blocks used by SDXL (diffusers `models/unets/unet_2d_blocks.py`).

Channels-last [B, H, W, C]. Every block takes `(hidden_states, temb, encoder_hidden_states)` (up
blocks: `(hidden_states, skips, temb, encoder_hidden_states, upsample_size)`); the plain blocks
ignore the context so the UNet can loop over blocks uniformly.

Down blocks return `(hidden_states, skips)`, one skip per resnet(+attention) plus one after the
downsampler. Up blocks pop skips from the end of the tuple they are given and concatenate
`[hidden_states, skip]` on the channel axis before each resnet, as diffusers does.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from persongen_jax.models.transformer_2d import Transformer2DModel


def _per_layer(value: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """diffusers broadcasts an int `transformer_layers_per_block` to one entry per resnet."""
    if isinstance(value, int):
        return (value,) * num_layers
    value = tuple(value)
    if len(value) != num_layers:
        raise ValueError(f"transformer_layers_per_block {value} must have {num_layers} entries (one per layer)")
    return value


def _transformers(
    num_layers,
    out_channels,
    num_attention_heads,
    transformer_layers_per_block,
    cross_attention_dim,
    groups,
    use_linear_projection,
    attention_impl,
    kw,
):
    layers = _per_layer(transformer_layers_per_block, num_layers)
    return nnx.List(
        [
            Transformer2DModel(
                num_attention_heads,
                out_channels // num_attention_heads,
                out_channels,
                num_layers=layers[i],
                norm_num_groups=groups,
                cross_attention_dim=cross_attention_dim,
                use_linear_projection=use_linear_projection,
                attention_impl=attention_impl,
                **kw,
            )
            for i in range(num_layers)
        ]
    )


class DownBlock2D(nnx.Module):
    """diffusers DownBlock2D: ResnetBlock2D x num_layers, then an optional stride-2 Downsample2D."""

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    eps=resnet_eps,
                    groups=resnet_groups,
                    non_linearity=resnet_act_fn,
                    output_scale_factor=output_scale_factor,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)])
            if add_downsample
            else None
        )

    def __call__(
        self, hidden_states: jax.Array, temb: jax.Array, encoder_hidden_states: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """[B, H, W, Cin] -> ([B, H', W', Cout], skips); H' = ceil(H / 2) with a downsampler
        (downsample_padding=1, SDXL; floor(H / 2) with 0)."""
        skips: tuple[jax.Array, ...] = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnDownBlock2D(nnx.Module):
    """diffusers CrossAttnDownBlock2D: (ResnetBlock2D -> Transformer2DModel) x num_layers, then an
    optional stride-2 Downsample2D."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        add_downsample: bool = True,
        use_linear_projection: bool = False,
        attention_impl: str = "xla",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    eps=resnet_eps,
                    groups=resnet_groups,
                    non_linearity=resnet_act_fn,
                    output_scale_factor=output_scale_factor,
                    **kw,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = _transformers(
            num_layers,
            out_channels,
            num_attention_heads,
            transformer_layers_per_block,
            cross_attention_dim,
            resnet_groups,
            use_linear_projection,
            attention_impl,
            kw,
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, **kw)])
            if add_downsample
            else None
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        additional_residuals: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """hidden_states [B, H, W, Cin], temb [B, temb_channels], encoder_hidden_states [B, S, D] or a
        CrossAttentionContext -> ([B, H', W', Cout], skips); H' = ceil(H / 2) with a downsampler
        (downsample_padding=1, SDXL; floor(H / 2) with 0). additional_residuals [B, H, W, Cout]: a
        T2I-Adapter feature, added to the last resnet+attention output (diffusers' place for it)."""
        skips: tuple[jax.Array, ...] = ()
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states)
            if i == last and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals.astype(hidden_states.dtype)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet -> (attention -> resnet) x num_layers, channels unchanged."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        output_scale_factor: float = 1.0,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        attention_impl: str = "xla",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        res_kw = dict(
            temb_channels=temb_channels,
            eps=resnet_eps,
            groups=resnet_groups,
            non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
            **kw,
        )
        self.resnets = nnx.List([ResnetBlock2D(in_channels, in_channels, **res_kw) for _ in range(num_layers + 1)])
        self.attentions = _transformers(
            num_layers,
            in_channels,
            num_attention_heads,
            transformer_layers_per_block,
            cross_attention_dim,
            resnet_groups,
            use_linear_projection,
            attention_impl,
            kw,
        )

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


def _up_resnets(
    num_layers,
    in_channels,
    prev_output_channel,
    out_channels,
    temb_channels,
    resnet_eps,
    resnet_act_fn,
    resnet_groups,
    output_scale_factor,
    kw,
):
    # Resnet i sees [previous output, skip]: the last skip comes from the block's input level
    # (in_channels), the others from this level (out_channels).
    return nnx.List(
        [
            ResnetBlock2D(
                (prev_output_channel if i == 0 else out_channels)
                + (in_channels if i == num_layers - 1 else out_channels),
                out_channels,
                temb_channels=temb_channels,
                eps=resnet_eps,
                groups=resnet_groups,
                non_linearity=resnet_act_fn,
                output_scale_factor=output_scale_factor,
                **kw,
            )
            for i in range(num_layers)
        ]
    )


class UpBlock2D(nnx.Module):
    """diffusers UpBlock2D: ResnetBlock2D x num_layers on [hidden_states, skip], then an optional Upsample2D.

    Positional order (in_channels, prev_output_channel, out_channels) is diffusers' (CrossAttnUpBlock2D
    swaps the last two).
    """

    has_cross_attention = False

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = _up_resnets(
            num_layers,
            in_channels,
            prev_output_channel,
            out_channels,
            temb_channels,
            resnet_eps,
            resnet_act_fn,
            resnet_groups,
            output_scale_factor,
            kw,
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states_tuple: tuple[jax.Array, ...],
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """hidden_states [B, h, w, C]; skips consumed from the end; upsample to `upsample_size`
        ([H, W]) when given, else 2x."""
        for resnet in self.resnets:
            res = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(jnp.concatenate([hidden_states, res], axis=-1), temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(nnx.Module):
    """diffusers CrossAttnUpBlock2D: (ResnetBlock2D on [hidden_states, skip] -> Transformer2DModel) x
    num_layers, then an optional Upsample2D.

    Positional order (in_channels, out_channels, prev_output_channel) is diffusers' (UpBlock2D swaps the
    last two).
    """

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        temb_channels: int,
        *,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        use_linear_projection: bool = False,
        attention_impl: str = "xla",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = _up_resnets(
            num_layers,
            in_channels,
            prev_output_channel,
            out_channels,
            temb_channels,
            resnet_eps,
            resnet_act_fn,
            resnet_groups,
            output_scale_factor,
            kw,
        )
        self.attentions = _transformers(
            num_layers,
            out_channels,
            num_attention_heads,
            transformer_layers_per_block,
            cross_attention_dim,
            resnet_groups,
            use_linear_projection,
            attention_impl,
            kw,
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, out_channels, **kw)]) if add_upsample else None

    def __call__(
        self,
        hidden_states: jax.Array,
        res_hidden_states_tuple: tuple[jax.Array, ...],
        temb: jax.Array,
        encoder_hidden_states: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        """hidden_states [B, h, w, C], res_hidden_states_tuple (one skip per resnet, consumed from the end),
        temb [B, temb_channels], encoder_hidden_states [B, S, D] or a CrossAttentionContext ->
        [B, 2h, 2w, Cout] (upsample_size when given; [B, h, w, Cout] without an upsampler)."""
        for resnet, attn in zip(self.resnets, self.attentions):
            res = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(jnp.concatenate([hidden_states, res], axis=-1), temb)
            hidden_states = attn(hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states
