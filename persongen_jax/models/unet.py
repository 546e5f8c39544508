"""SDXL UNet2DConditionModel (diffusers `models/unets/unet_2d_condition.py`) in Flax NNX.

Call contract (channels-last):

    unet(sample [B, H, W, in_channels], timesteps [B] or scalar,
         encoder_hidden_states [B, T, cross_attention_dim],
         text_embeds=[B, P], time_ids=[B, 6]) -> [B, H, W, out_channels]

`text_embeds`/`time_ids` are SDXL's "added conditions" (pooled text embedding and
original size / crop / target size) and are required when the config says
`addition_embed_type="text_time"`.

LoRA and adapter cross-attentions are added to a built UNet by `persongen_jax.models.lora`;
adapter conditions are passed as `unet(..., conditions={name: [B, S, D]},
condition_scales={name: scalar or [B]})` and reach the cross-attentions as a
`CrossAttentionContext` (the blocks pass `encoder_hidden_states` through untouched).

The config is the diffusers `config.json` dict. It is parsed into `UNetConfig`
(kept as `unet.config`); settings the port does not implement raise a ValueError
that names the key, instead of silently computing something else.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.attention_processor import CrossAttentionContext
from persongen_jax.models.embeddings import TimestepEmbedding, Timesteps
from persongen_jax.models.layers import Conv, GroupNorm, activation
from persongen_jax.models.modeling import ConfigMixin, ModelConfig, register_model
from persongen_jax.models.resnet import ResnetSettings
from persongen_jax.models.unet_2d_blocks import (
    CrossAttentionSettings,
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

DOWN_BLOCKS = {"DownBlock2D": DownBlock2D, "CrossAttnDownBlock2D": CrossAttnDownBlock2D}
UP_BLOCKS = {"UpBlock2D": UpBlock2D, "CrossAttnUpBlock2D": CrossAttnUpBlock2D}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Rematerialisation of the UNet's down / mid / up blocks (`unet.remat`, config.remat): what each block keeps
# for the backward pass. "none": everything (fastest, most memory); "full": only the block's inputs, the
# rest recomputed; a `jax.checkpoint_policies` name: the intermediates it marks saveable (dots_saveable:
# matmul outputs -- attention projections and the feed-forward -- kept, convolutions / norms recomputed).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def check_remat(name: str, key: str = "config.remat") -> None:
    """ValueError naming `key` when `name` is not one of REMAT_CHOICES."""
    if name not in REMAT_CHOICES:
        raise ValueError(f"{key}={name!r}; expected one of {list(REMAT_CHOICES)}")


# Keys that do not change what the supported blocks compute, so they are accepted and dropped:
# bookkeeping, sample_size (only a pipeline default), upcast_attention (fp16 softmax upcast in torch;
# our attention already keeps its softmax statistics in fp32), and options that diffusers only
# forwards to block types we reject (Simple*/ResnetDownsample* blocks, "text" add-embedding).
IGNORED_KEYS = frozenset(
    {
        "sample_size",
        "upcast_attention",
        "addition_embed_type_num_heads",
        "resnet_skip_time_act",
        "resnet_out_scale_factor",
        "cross_attention_norm",
        "mid_block_only_cross_attention",
    }
)

# Keys whose only supported value is diffusers' default: {key: (allowed values, why)}.
FIXED_KEYS: dict[str, tuple[tuple, str]] = {
    "num_attention_heads": ((None,), "diffusers itself rejects it; set attention_head_dim (= number of heads)"),
    "dropout": ((0, 0.0), "dropout is not ported"),
    "only_cross_attention": ((False,), "only self+cross attention blocks are ported"),
    "dual_cross_attention": ((False,), "DualTransformer2DModel is not ported"),
    "class_embed_type": ((None,), "class embeddings are not ported"),
    "num_class_embeds": ((None,), "class embeddings are not ported"),
    "encoder_hid_dim": ((None,), "encoder_hid_proj is not ported"),
    "encoder_hid_dim_type": ((None,), "encoder_hid_proj is not ported"),
    "resnet_time_scale_shift": (("default",), "only additive time embedding in resnets is ported"),
    "time_embedding_type": (("positional",), "Fourier time embeddings are not ported"),
    "time_cond_proj_dim": ((None,), "timestep_cond (LCM) is not ported"),
    "attention_type": (("default",), "GLIGEN gated attention is not ported"),
    "class_embeddings_concat": ((False,), "class embeddings are not ported"),
}


def _tuple(x):
    """JSON lists -> tuples (nested too), so the config is hashable and immutable."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuple(v) for v in x)
    return x


def _per_block(name: str, value, n: int) -> tuple:
    """diffusers' int-or-list broadcasting: an int applies to every down block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNet config: {name}={list(value)} must have one entry per down block ({n})")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig(ModelConfig):
    """The numerics-relevant subset of diffusers' UNet2DConditionModel config (same names, same defaults)."""

    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    attention_head_dim: int | tuple[int, ...] = 8  # really the number of heads (diffusers naming)
    use_linear_projection: bool = False
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """diffusers UNet2DConditionModel config.json dict -> validated UNetConfig. Keys starting with "_"
        and IGNORED_KEYS are dropped, FIXED_KEYS must hold their one supported value, and any other unknown
        key raises ValueError naming it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in IGNORED_KEYS:
                continue
            if key in FIXED_KEYS:
                allowed, why = FIXED_KEYS[key]
                ok = value in allowed or (
                    key == "only_cross_attention" and isinstance(value, (list, tuple)) and not any(value)
                )
                if not ok:
                    raise ValueError(
                        f"UNet config: unsupported {key}={value!r}; expected {' or '.join(map(repr, allowed))} ({why})"
                    )
                continue
            if key not in fields:
                raise ValueError(
                    f"UNet config: unknown key {key!r}; it may change the numerics, so it is "
                    f"rejected (supported keys: {sorted(fields | set(FIXED_KEYS))})"
                )
            kwargs[key] = _tuple(value)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises ValueError naming the key for: an unsupported down/up/mid block type; up_block_types or
        block_out_channels not one per down block; addition_embed_type other than "text_time" / None, or
        "text_time" without its two dims; norm_num_groups None; nested transformer_layers_per_block
        without reverse_transformer_layers_per_block; a per-block list of the wrong length."""
        n = len(self.down_block_types)
        for t in self.down_block_types:
            if _strip(t) not in DOWN_BLOCKS:
                raise ValueError(
                    f"UNet config: unsupported down block type {t!r} in down_block_types; "
                    f"expected one of {sorted(DOWN_BLOCKS)}"
                )
        for t in self.up_block_types:
            if _strip(t) not in UP_BLOCKS:
                raise ValueError(
                    f"UNet config: unsupported up block type {t!r} in up_block_types; "
                    f"expected one of {sorted(UP_BLOCKS)}"
                )
        if self.mid_block_type not in MID_BLOCKS:
            raise ValueError(
                f"UNet config: unsupported mid_block_type {self.mid_block_type!r}; "
                f"expected 'UNetMidBlock2DCrossAttn' or None"
            )
        if len(self.up_block_types) != n:
            raise ValueError(f"UNet config: {n} down_block_types but {len(self.up_block_types)} up_block_types")
        if len(self.block_out_channels) != n:
            raise ValueError(
                f"UNet config: block_out_channels {list(self.block_out_channels)} must have one "
                f"entry per down block ({n})"
            )
        if self.addition_embed_type not in ("text_time", None):
            raise ValueError(
                f"UNet config: unsupported addition_embed_type {self.addition_embed_type!r}; "
                "expected 'text_time' or None"
            )
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                "UNet config: addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        if self.norm_num_groups is None:
            raise ValueError("UNet config: norm_num_groups=None is not supported; expected an int (e.g. 32)")
        tl = self.transformer_layers_per_block
        if (
            isinstance(tl, tuple)
            and any(isinstance(x, tuple) for x in tl)
            and self.reverse_transformer_layers_per_block is None
        ):
            raise ValueError(
                "UNet config: nested transformer_layers_per_block (asymmetrical UNet) needs "
                "reverse_transformer_layers_per_block"
            )
        for name in ("layers_per_block", "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block"):
            _per_block(name, getattr(self, name), n)

    # Per-block values, broadcast as diffusers does.
    @property
    def num_blocks(self) -> int:
        """Number of down blocks (= up blocks)."""
        return len(self.down_block_types)

    def per_block(self, name: str) -> tuple:
        """Field `name` as one value per down block (an int is broadcast, as diffusers does)."""
        return _per_block(name, getattr(self, name), self.num_blocks)


def _strip(block_type: str) -> str:
    # diffusers accepts "UNetResDownBlock2D" as an alias of "DownBlock2D".
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


class UNetEncoderMixin:
    """The half of the UNet that a ControlNet copies (diffusers builds both from one config): conv_in, the
    time and added-condition embeddings, the down blocks and the mid block. Module names are diffusers'."""

    def _init_encoder(self, c: UNetConfig, kw: dict, attention_impl: str) -> ResnetSettings:
        """Builds conv_in, time_proj, time_embedding, add_time_proj, add_embedding, time_embed_act, down_blocks
        and mid_block; returns the resnet settings the blocks share (the up blocks take them too)."""
        boc = c.block_out_channels
        n = c.num_blocks
        heads = c.per_block("attention_head_dim")
        cross = c.per_block("cross_attention_dim")
        layers = c.per_block("layers_per_block")
        tlayers = c.per_block("transformer_layers_per_block")

        self.conv_in = Conv(c.in_channels, boc[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2, **kw)

        # Time: sinusoidal projection (no params) -> MLP; the added conditions go into the same vector.
        time_embed_dim = c.time_embedding_dim or boc[0] * 4
        self.time_proj = Timesteps(boc[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(
            boc[0], time_embed_dim, act_fn=c.act_fn, post_act_fn=c.timestep_post_act, **kw
        )
        self.add_time_proj: Timesteps | None
        self.add_embedding: TimestepEmbedding | None
        if c.addition_embed_type == "text_time":
            if c.addition_time_embed_dim is None or c.projection_class_embeddings_input_dim is None:
                raise ValueError(
                    "addition_embed_type 'text_time' needs addition_time_embed_dim and "
                    "projection_class_embeddings_input_dim"
                )
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, time_embed_dim, **kw)
        else:
            self.add_time_proj = None
            self.add_embedding = None
        self.time_embed_act = activation(c.time_embedding_act_fn) if c.time_embedding_act_fn else None

        resnet = ResnetSettings(
            time_embed_dim, c.norm_eps, c.norm_num_groups, c.act_fn, dtype=kw["dtype"], param_dtype=kw["param_dtype"]
        )
        attention = _attention_args(tlayers, heads, cross, c.use_linear_projection, attention_impl)

        down: list[DownBlock2D] = []
        out_ch = boc[0]
        for i, block_type in enumerate(c.down_block_types):
            in_ch, out_ch = out_ch, boc[i]
            block = DOWN_BLOCKS[_strip(block_type)]
            down.append(
                block(
                    in_ch,
                    out_ch,
                    resnet,
                    num_layers=layers[i],
                    add_downsample=i < n - 1,
                    downsample_padding=c.downsample_padding,
                    attention=attention[i] if block.has_cross_attention else None,
                    rngs=kw["rngs"],
                )
            )
        self.down_blocks = nnx.List(down)

        self.mid_block: UNetMidBlock2DCrossAttn | None
        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            mid_resnet = dataclasses.replace(resnet, output_scale_factor=c.mid_block_scale_factor)
            self.mid_block = UNetMidBlock2DCrossAttn(boc[-1], mid_resnet, attention[-1], rngs=kw["rngs"])
        else:
            self.mid_block = None
        return resnet

    def _embed(self, c: UNetConfig, timesteps, batch: int, dtype, text_embeds, time_ids) -> jax.Array:
        """timesteps [B] or scalar (+ text_embeds [B, P], time_ids [B, 6]) -> emb [B, time_embed_dim]."""
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = jnp.broadcast_to(timesteps, (batch,))
        emb = self.time_embedding(self.time_proj(timesteps).astype(dtype))

        if self.add_embedding is not None and self.add_time_proj is not None:  # set together
            if text_embeds is None or time_ids is None:
                raise ValueError("addition_embed_type='text_time' needs text_embeds [B, P] and time_ids [B, 6]")
            # Each of the time ids gets its own sinusoidal embedding; they are concatenated per sample.
            time_embeds = self.add_time_proj(time_ids.reshape(-1)).reshape(text_embeds.shape[0], -1)
            add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + self.add_embedding(add_embeds.astype(emb.dtype))
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        return emb

    def _encode(
        self,
        sample: jax.Array,
        emb: jax.Array,
        encoder_hidden_states,
        intrablock_residuals: Sequence[jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple]:
        """Down blocks then mid block on `sample` [B, H, W, C0] (after conv_in) -> (mid output, skips: conv_in's
        output then every down block's). intrablock_residuals: T2I-Adapter features, added as diffusers adds them
        (to the last resnet+attention output of a cross-attention block, to the output of a plain block, and,
        where one is left over with the mid block's shape, to the mid block's output)."""
        pending = list(intrablock_residuals) if intrablock_residuals is not None else []
        skips: tuple = (sample,)
        for block in self.down_blocks:
            if block.has_cross_attention:
                extra = {"additional_residuals": pending.pop(0)} if pending else {}
                sample, res = self._block(block, sample, emb, encoder_hidden_states, **extra)
            else:
                sample, res = self._block(block, sample, emb, encoder_hidden_states)
                if pending:
                    # diffusers adds in place (`sample += ...`): the block's last skip is the same tensor, so
                    # it carries the feature too.
                    sample = sample + pending.pop(0).astype(sample.dtype)
                    res = res[:-1] + (sample,)
            skips += res
        if self.mid_block is not None:
            sample = self._block(self.mid_block, sample, emb, encoder_hidden_states)
            if pending and pending[0].shape == sample.shape:
                sample = sample + pending.pop(0).astype(sample.dtype)
        return sample, skips

    def _block(self, block, *args, **static):
        """block(*args, **static), rematerialised per `self.remat` (static: Python values, e.g. upsample_size;
        an array passed as a static keyword is closed over)."""
        remat = getattr(self, "remat", "none")
        if remat == "none":
            return block(*args, **static)
        check_remat(remat, "unet.remat")
        # Plain jax.checkpoint over the block's state (the blocks keep no state between calls, so nothing
        # needs to flow back out, unlike nnx.remat, which would write the state back into the Variables).
        graphdef, state = nnx.split(block)

        def call(state, *a):
            return nnx.merge(graphdef, state)(*a, **static)

        return jax.checkpoint(call, policy=REMAT_POLICIES[remat])(state, *args)


def _attention_args(
    tlayers, heads, cross, use_linear_projection: bool, attention_impl: str
) -> list[CrossAttentionSettings]:
    """Per block: the CrossAttentionSettings of a CrossAttn block (transformer layers, heads, context width)."""
    return [
        CrossAttentionSettings(h, x, t, use_linear_projection=use_linear_projection, attention_impl=attention_impl)
        for t, h, x in zip(tlayers, heads, cross)
    ]


@register_model
class UNet2DConditionModel(ConfigMixin, UNetEncoderMixin, nnx.Module):
    """SDXL-style conditional UNet; module names mirror diffusers so param paths are state-dict keys."""

    _parse_config = staticmethod(UNetConfig.from_dict)  # from_config: a diffusers config.json dict

    def __init__(
        self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32, attention_impl: str = "xla"
    ):
        c = config
        self.config = c
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc, n = c.block_out_channels, c.num_blocks
        resnet = self._init_encoder(c, kw, attention_impl)

        # The up blocks mirror the down blocks: every per-block setting reversed.
        rev_boc = boc[::-1]
        rev_layers = c.per_block("layers_per_block")[::-1]
        rev_tlayers = c.reverse_transformer_layers_per_block
        if rev_tlayers is None:
            rev_tlayers = c.per_block("transformer_layers_per_block")[::-1]
        rev_heads, rev_cross = c.per_block("attention_head_dim")[::-1], c.per_block("cross_attention_dim")[::-1]
        attention = _attention_args(rev_tlayers, rev_heads, rev_cross, c.use_linear_projection, attention_impl)
        up: list[UpBlock2D] = []
        out_ch = rev_boc[0]
        for i, block_type in enumerate(c.up_block_types):
            prev_out, out_ch = out_ch, rev_boc[i]
            in_ch = rev_boc[min(i + 1, n - 1)]
            block = UP_BLOCKS[_strip(block_type)]
            up.append(
                block(
                    in_ch,
                    prev_out,
                    out_ch,
                    resnet,
                    num_layers=rev_layers[i] + 1,
                    add_upsample=i < n - 1,
                    attention=attention[i] if block.has_cross_attention else None,
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(up)
        self.num_upsamplers = n - 1

        self.conv_norm_out = GroupNorm(c.norm_num_groups, boc[0], epsilon=c.norm_eps, **kw)
        self.conv_act = activation(c.act_fn)
        self.conv_out = Conv(boc[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2, **kw)
        # IP-Adapter image projection of an image condition (lora.ImageProjection); set by lora.add_adapters.
        self.image_proj = nnx.data(None)
        self.remat = "none"  # REMAT_CHOICES; training sets it from config.remat (sampling never needs it)

    @classmethod
    def preset_config(cls, name: str) -> dict:
        """A diffusers-style config dict by model size (`presets.SIZES`): "sdxl_base", "tiny", "micro"."""
        from persongen_jax.models import presets

        return copy.deepcopy(presets.get(name).unet)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: Any,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        *,
        conditions: Mapping[str, jax.Array] | None = None,
        condition_scales: Mapping[str, Any] | None = None,
        down_block_additional_residuals: Sequence[jax.Array] | None = None,
        mid_block_additional_residual: jax.Array | None = None,
        down_intrablock_additional_residuals: Sequence[jax.Array] | None = None,
    ) -> jax.Array:
        """sample [B, H, W, Cin], timesteps [B] or scalar, encoder_hidden_states [B, T, D],
        text_embeds [B, P], time_ids [B, 6] -> noise prediction [B, H, W, Cout].

        down_block_additional_residuals / mid_block_additional_residual: a ControlNet's outputs (one [B, h, w, C]
        per skip connection, and the mid block's), added to the skips and the mid block's output as diffusers
        does; down_intrablock_additional_residuals: a T2I-Adapter's features (`UNetEncoderMixin._encode`).

        conditions: {name: [B, S, D]} for the adapter cross-attentions added by
        `lora.add_adapters` (a name left out = condition absent); condition_scales: {name: scalar
        or [B]} overriding the adapters' default scales (0 for a sample = absent for it).
        """
        c = self.config
        if conditions or condition_scales:
            encoder_hidden_states = CrossAttentionContext(
                encoder_hidden_states, dict(conditions or {}), dict(condition_scales or {})
            )
        b = sample.shape[0]
        dtype = self.dtype or sample.dtype
        # Latent sizes that are not multiples of 2**num_upsamplers: downsampling rounds up, so each
        # upsampler is told the exact size of the skip it will be concatenated with (static shapes).
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(d % factor for d in sample.shape[1:3])

        if c.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self._embed(c, timesteps, b, dtype, text_embeds, time_ids)
        sample = self.conv_in(sample.astype(dtype))
        sample, skips = self._encode(sample, emb, encoder_hidden_states, down_intrablock_additional_residuals)
        if down_block_additional_residuals is not None:  # ControlNet: one residual per skip, then the mid one
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals: {len(down_block_additional_residuals)} "
                    f"residuals, the UNet has {len(skips)} skip connections"
                )
            skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals))
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual.astype(sample.dtype)

        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            upsample_size = None
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = tuple(skips[-1].shape[1:3])
            sample = self._block(block, sample, res, emb, encoder_hidden_states, upsample_size=upsample_size)

        sample = self.conv_act(self.conv_norm_out(sample))
        return self.conv_out(sample)
