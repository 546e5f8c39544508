"""SDXL ControlNet (diffusers `models/controlnets/controlnet.py`, `ControlNetModel`) in Flax NNX.

Call contract (channels-last, like the UNet it steers):

    down, mid = controlnet(sample [B, h, w, 4], timesteps [B] or scalar, encoder_hidden_states [B, T, D],
                           controlnet_cond [B, f*h, f*w, 3] in [0, 1], conditioning_scale=1.0,
                           text_embeds=[B, P], time_ids=[B, 6])
    down: one [B, h_i, w_i, C_i] per skip connection of the UNet; mid: [B, h/2^k, w/2^k, C_last]
    unet(..., down_block_additional_residuals=down, mid_block_additional_residual=mid)

f = 2 ** (len(conditioning_embedding_out_channels) - 1) is the factor of the conditioning embedding's
stride-2 convolutions; it must equal the VAE's downscale factor (8 for SDXL).

The encoder half (conv_in, time and added embeddings, down blocks, mid block) is the UNet's own code
(`unet.UNetEncoderMixin`), built from the same config keys; the ControlNet adds the conditioning embedding
(`controlnet_cond_embedding`) and one 1x1 "zero convolution" per output (`controlnet_down_blocks`,
`controlnet_mid_block`). Guess mode is not ported (PhotoMaker's and diffusers' SDXL pipelines default to off).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.layers import Conv
from persongen_jax.models.modeling import ConfigMixin, check_field_types, register_model
from persongen_jax.models.unet import UNetConfig, UNetEncoderMixin

# The ControlNet's own config keys (everything else is read as the UNet's same-named key).
CONTROLNET_KEYS = (
    "conditioning_channels",
    "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
)
# UNet keys that diffusers' ControlNetModel does not take (it always builds the defaults): rejected by name.
_UNET_ONLY_KEYS = frozenset(
    {
        "out_channels",
        "up_block_types",
        "center_input_sample",
        "time_embedding_dim",
        "time_embedding_act_fn",
        "timestep_post_act",
        "conv_in_kernel",
        "conv_out_kernel",
        "reverse_transformer_layers_per_block",
        "time_embedding_type",
        "time_cond_proj_dim",
        "resnet_skip_time_act",
        "resnet_out_scale_factor",
        "cross_attention_norm",
        "mid_block_only_cross_attention",
        "dropout",
        "dual_cross_attention",
        "attention_type",
        "class_embeddings_concat",
    }
)


def _mirror_up_blocks(down_block_types: Sequence[str]) -> list[str]:
    """The up blocks a UNet with these down blocks has (only so that UNetConfig validates; never built)."""
    return ["CrossAttnUpBlock2D" if "CrossAttn" in t else "UpBlock2D" for t in reversed(down_block_types)]


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers ControlNetModel config: the UNet-shared keys as a UNetConfig plus the ControlNet's own."""

    unet: UNetConfig
    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def __post_init__(self):
        check_field_types(self)
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                f"ControlNet config: controlnet_conditioning_channel_order="
                f"{self.controlnet_conditioning_channel_order!r}; expected 'rgb' or 'bgr'"
            )
        if not self.conditioning_embedding_out_channels:
            raise ValueError("ControlNet config: conditioning_embedding_out_channels is empty")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "ControlNetConfig":
        """diffusers ControlNetModel config.json dict -> validated config; ValueError naming the key for an
        unknown or unsupported one (the UNet's rules: `UNetConfig.from_dict`)."""
        own: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in CONTROLNET_KEYS
        }
        rest = {k: v for k, v in config.items() if k not in CONTROLNET_KEYS}
        for key in rest:
            if key in _UNET_ONLY_KEYS:
                raise ValueError(
                    f"ControlNet config: unknown key {key!r} (a UNet key that diffusers' ControlNetModel does not take)"
                )
        rest["up_block_types"] = _mirror_up_blocks(rest.get("down_block_types", UNetConfig.down_block_types))
        try:
            unet = UNetConfig.from_dict(rest)
        except ValueError as e:
            raise ValueError(str(e).replace("UNet config:", "ControlNet config:", 1)) from None
        return cls(unet=unet, **own)

    @property
    def downscale_factor(self) -> int:
        """Pixels of controlnet_cond per latent pixel: 2 ** (number of stride-2 convolutions)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def residual_channels(self) -> list[int]:
        """Channels of the down residuals, in order (= the UNet's skip connections), then the mid one."""
        c = self.unet
        boc = c.block_out_channels
        layers = c.per_block("layers_per_block")
        out = [boc[0]]
        for i in range(c.num_blocks):
            out += [boc[i]] * layers[i] + ([boc[i]] if i < c.num_blocks - 1 else [])
        return out + [boc[-1]]


def unet_residual_channels(unet_config: UNetConfig) -> list[int]:
    """What a UNet accepts: the channels of its skip connections, in order, then its mid block's."""
    return ControlNetConfig(unet=unet_config).residual_channels()


def check_matches_unet(controlnet_config: ControlNetConfig, unet_config: UNetConfig, name: str = "ControlNet") -> None:
    """ValueError (one line, listing both shapes) when the ControlNet's residuals or inputs do not fit the UNet:
    residual channels, cross-attention width, added-condition width or latent channels differ."""
    cn, un = controlnet_config.unet, unet_config
    pairs = [
        ("residual channels", controlnet_config.residual_channels(), unet_residual_channels(un)),
        ("cross_attention_dim", list(cn.per_block("cross_attention_dim")), list(un.per_block("cross_attention_dim"))),
        (
            "projection_class_embeddings_input_dim",
            cn.projection_class_embeddings_input_dim,
            un.projection_class_embeddings_input_dim,
        ),
        ("in_channels", cn.in_channels, un.in_channels),
    ]
    bad = [f"{what} {a} vs the UNet's {b}" for what, a, b in pairs if a != b]
    if bad:
        raise ValueError(f"{name} was made for another UNet: " + "; ".join(bad))


class ControlNetConditioningEmbedding(nnx.Module):
    """conv_in -> (conv, stride-2 conv) per width step -> conv_out; SiLU between (diffusers' module)."""

    def __init__(
        self,
        conditioning_embedding_channels: int,
        conditioning_channels: int = 3,
        block_out_channels: Sequence[int] = (16, 32, 96, 256),
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc = tuple(block_out_channels)
        self.conv_in = Conv(conditioning_channels, boc[0], 3, padding=1, **kw)
        blocks = []
        for i in range(len(boc) - 1):
            blocks.append(Conv(boc[i], boc[i], 3, padding=1, **kw))
            blocks.append(Conv(boc[i], boc[i + 1], 3, padding=1, stride=2, **kw))
        self.blocks = nnx.List(blocks)
        self.conv_out = Conv(boc[-1], conditioning_embedding_channels, 3, padding=1, **kw)

    def __call__(self, conditioning: jax.Array) -> jax.Array:
        """[B, H, W, Ccond] -> [B, H / f, W / f, conditioning_embedding_channels] (f = 2 ** (len(boc) - 1))."""
        x = jax.nn.silu(self.conv_in(conditioning))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


@register_model
class ControlNetModel(ConfigMixin, UNetEncoderMixin, nnx.Module):
    """diffusers ControlNetModel (SDXL form); parameter paths are the diffusers state-dict keys."""

    _parse_config = staticmethod(ControlNetConfig.from_dict)  # from_config: a diffusers config.json dict

    def __init__(
        self,
        config: ControlNetConfig,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
    ):
        self.config = config
        self.dtype = dtype
        self.remat = "none"  # sampling only
        c = config.unet
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._init_encoder(c, kw, attention_impl)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c.block_out_channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels, **kw
        )
        channels = config.residual_channels()
        self.controlnet_down_blocks = nnx.List([Conv(ch, ch, 1, **kw) for ch in channels[:-1]])
        self.controlnet_mid_block = Conv(channels[-1], channels[-1], 1, **kw)

    @staticmethod
    def config_for_unet(unet_config: Mapping[str, Any], **controlnet_keys) -> dict:
        """A diffusers ControlNetModel config dict for a UNet config dict (diffusers' `ControlNetModel.from_unet`:
        the shared keys copied), plus ControlNet keys (e.g. conditioning_embedding_out_channels)."""
        shared = (
            "in_channels",
            "flip_sin_to_cos",
            "freq_shift",
            "down_block_types",
            "mid_block_type",
            "block_out_channels",
            "layers_per_block",
            "downsample_padding",
            "mid_block_scale_factor",
            "act_fn",
            "norm_num_groups",
            "norm_eps",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "attention_head_dim",
            "use_linear_projection",
            "addition_embed_type",
            "addition_time_embed_dim",
            "projection_class_embeddings_input_dim",
            "upcast_attention",
        )
        out = {k: copy.deepcopy(v) for k, v in unet_config.items() if k in shared}
        return {"_class_name": "ControlNetModel", **out, **controlnet_keys}

    @property
    def downscale_factor(self) -> int:
        """Pixels of controlnet_cond per latent pixel."""
        return self.config.downscale_factor

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        controlnet_cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """sample [B, h, w, Cin], timesteps [B] or scalar, encoder_hidden_states [B, T, D], controlnet_cond
        [B, f*h, f*w, Ccond] in [0, 1], conditioning_scale scalar (or [B]), text_embeds [B, P], time_ids [B, 6]
        -> (down residuals: one [B, h_i, w_i, C_i] per UNet skip connection, mid residual [B, h', w', C_last])."""
        c = self.config.unet
        dtype = self.dtype or sample.dtype
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        emb = self._embed(c, timesteps, sample.shape[0], dtype, text_embeds, time_ids)
        sample = self.conv_in(sample.astype(dtype))
        sample = sample + self.controlnet_cond_embedding(controlnet_cond.astype(dtype))
        sample, skips = self._encode(sample, emb, encoder_hidden_states)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if scale.ndim == 1:  # one scale per sample
            scale = scale[:, None, None, None]
        down = tuple(block(s) * scale.astype(s.dtype) for s, block in zip(skips, self.controlnet_down_blocks))
        mid = self.controlnet_mid_block(sample) * scale.astype(sample.dtype)
        if self.config.global_pool_conditions:
            down = tuple(jnp.mean(d, axis=(1, 2), keepdims=True) for d in down)
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid
