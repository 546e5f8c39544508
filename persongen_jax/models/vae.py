"""diffusers `AutoencoderKL` (the SDXL VAE) in Flax NNX.

Ported from diffusers `models/autoencoders/autoencoder_kl.py`, `autoencoders/vae.py`
(Encoder, Decoder, DiagonalGaussianDistribution) and `unets/unet_2d_blocks.py`
(UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D). Attribute names mirror
diffusers, so the NNX parameter path joined with "." is the diffusers key
(`encoder.down_blocks.0.resnets.1.conv1`, `decoder.mid_block.attentions.0.to_q`, ...).

Layout: channels-last everywhere. `encode` takes images [B, H, W, in_channels]
(diffusers' convention: values in [-1, 1]) and returns a DiagonalGaussianDistribution
over latents [B, H/f, W/f, latent_channels], f = 2 ** (len(block_out_channels) - 1);
`decode` maps latents [B, h, w, latent_channels] back to images [B, h*f, w*f, out_channels].
Neither applies `scaling_factor`/`shift_factor`: like diffusers, the caller does
`z = (latents - shift) * scaling_factor` before the UNet and the inverse before `decode`.

Not ported (SDXL does not use them): tiling, slicing, the "spatial" norm of the
MoVQ decoder, Attn*EncoderBlock2D variants.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from persongen_jax.models.attention_processor import Attention
from persongen_jax.models.layers import Conv, GroupNorm, activation
from persongen_jax.models.modeling import ConfigMixin, ModelConfig, register_model
from persongen_jax.models.resnet import ResnetSettings, Upsample2D
from persongen_jax.models.unet_2d_blocks import DownBlock2D

# diffusers hard-codes eps=1e-6 for every norm in the VAE (Encoder/Decoder pass
# resnet_eps=1e-6 to all blocks, the mid-block attention reuses it, and
# conv_norm_out is GroupNorm(eps=1e-6)).
VAE_EPS = 1e-6

# cuDNN's fused attention supports head dims up to 128 here; the VAE mid block
# uses a single head of dim block_out_channels[-1] (512 for SDXL), so it always
# takes the XLA path (whose softmax is in float32, matching diffusers'
# upcast_softmax=True).
_CUDNN_MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------- blocks


class UNetMidBlock2D(nnx.Module):
    """resnets[0] -> (attentions[i] -> resnets[i+1]) for i < num_layers, without time embedding.

    The attention is diffusers' `_from_deprecated_attn_block` VAE attention: GroupNorm on the
    input, heads = in_channels // attention_head_dim, q/k/v/out with bias, residual added.
    x: [B, H, W, C] -> [B, H, W, C].
    """

    def __init__(
        self,
        in_channels: int,
        resnet: ResnetSettings,
        *,
        num_layers: int = 1,
        add_attention: bool = True,
        attention_head_dim: int | None = None,
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        attention_head_dim = attention_head_dim or in_channels  # diffusers' fallback for None
        if attention_head_dim > _CUDNN_MAX_HEAD_DIM:
            attention_impl = "xla"
        # Built in diffusers' order (resnet, then attention and resnet per layer), which is the order the
        # parameters draw their initial values in.
        resnets = [resnet.resnet(in_channels, in_channels, rngs)]
        attentions = []
        for _ in range(num_layers):
            attentions.append(
                Attention(
                    in_channels,
                    heads=in_channels // attention_head_dim,
                    dim_head=attention_head_dim,
                    bias=True,
                    norm_num_groups=resnet.groups,
                    eps=resnet.eps,
                    residual_connection=True,
                    attention_impl=attention_impl,
                    **resnet.module_kwargs(rngs),
                )
                if add_attention
                else None
            )
            resnets.append(resnet.resnet(in_channels, in_channels, rngs))
        self.attentions = nnx.List(attentions)
        self.resnets = nnx.List(resnets)

    @classmethod
    def for_config(cls, c: AutoencoderKLConfig, resnet: ResnetSettings, attention_impl: str, rngs: nnx.Rngs):
        """The mid block of the Encoder and of the Decoder: one head over all block_out_channels[-1] channels."""
        channels = c.block_out_channels[-1]
        return cls(channels, resnet, add_attention=c.mid_block_add_attention, attention_impl=attention_impl, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                x = attn(x)
            x = resnet(x)
        return x


class DownEncoderBlock2D(DownBlock2D):
    """num_layers ResnetBlock2D (no temb), then an optional stride-2 Downsample2D: the UNet's DownBlock2D
    without time embedding and without skips.

    The encoder builds it with downsample_padding=0: one zero row/column is padded at the
    bottom/right before a padding-0 conv (diffusers' asymmetric padding, kept for weight
    compatibility). x: [B, H, W, Cin] -> [B, H', W', Cout]: H' = floor(H/2) with
    downsample_padding=0, ceil(H/2) with 1, H without a downsampler.
    """

    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        """x [B, H, W, Cin] -> [B, H', W', Cout]; H' as in the class docstring."""
        return super().__call__(x, None)[0]


class UpDecoderBlock2D(nnx.Module):
    """num_layers ResnetBlock2D (no temb), then an optional nearest-2x Upsample2D.

    x: [B, H, W, Cin] -> [B, 2H, 2W, Cout] (or [B, H, W, Cout]).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resnet: ResnetSettings,
        num_layers: int,
        *,
        add_upsample: bool,
        rngs: nnx.Rngs,
    ):
        self.resnets = resnet.resnets([in_channels] + [out_channels] * (num_layers - 1), out_channels, rngs)
        self.upsamplers = nnx.List([Upsample2D(out_channels, **resnet.module_kwargs(rngs))]) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, Cin] -> [B, 2H, 2W, Cout] ([B, H, W, Cout] without an upsampler)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


class Encoder(nnx.Module):
    """conv_in -> down_blocks -> mid_block -> GroupNorm -> SiLU -> conv_out.

    Built from the AutoencoderKL config (diffusers passes its fields one by one): x [B, H, W, in_channels] ->
    moments [B, H/f, W/f, 2 * latent_channels] (diffusers' double_z, which AutoencoderKL always sets).
    """

    def __init__(self, c: AutoencoderKLConfig, resnet: ResnetSettings, *, attention_impl: str = "xla", rngs: nnx.Rngs):
        kw = resnet.module_kwargs(rngs)
        boc = c.block_out_channels
        self.conv_in = Conv(c.in_channels, boc[0], 3, padding=1, **kw)
        # Block i maps boc[i - 1] (boc[0] for the first) to boc[i]; all but the last halve the resolution.
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    cin,
                    cout,
                    resnet,
                    num_layers=c.layers_per_block,
                    add_downsample=i < len(boc) - 1,
                    downsample_padding=0,
                    rngs=rngs,
                )
                for i, (cin, cout) in enumerate(zip((boc[0], *boc), boc))
            ]
        )
        self.mid_block = UNetMidBlock2D.for_config(c, resnet, attention_impl, rngs)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, boc[-1], epsilon=VAE_EPS, **kw)
        self.conv_out = Conv(boc[-1], 2 * c.latent_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * latent_channels]."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        # diffusers uses nn.SiLU() here whatever act_fn says.
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """conv_in -> mid_block -> up_blocks (layers_per_block + 1 resnets each) -> GroupNorm -> SiLU -> conv_out.

    Built from the AutoencoderKL config: z [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels].
    """

    def __init__(self, c: AutoencoderKLConfig, resnet: ResnetSettings, *, attention_impl: str = "xla", rngs: nnx.Rngs):
        kw = resnet.module_kwargs(rngs)
        boc = c.block_out_channels
        self.conv_in = Conv(c.latent_channels, boc[-1], 3, padding=1, **kw)
        self.mid_block = UNetMidBlock2D.for_config(c, resnet, attention_impl, rngs)
        # Up block i maps rev[i - 1] (rev[0] for the first) to rev[i], rev = boc reversed; all but the last
        # double the resolution.
        rev = boc[::-1]
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(cin, cout, resnet, c.layers_per_block + 1, add_upsample=i < len(rev) - 1, rngs=rngs)
                for i, (cin, cout) in enumerate(zip((rev[0], *rev), rev))
            ]
        )
        self.conv_norm_out = GroupNorm(c.norm_num_groups, boc[0], epsilon=VAE_EPS, **kw)
        self.conv_out = Conv(boc[0], c.out_channels, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        """z [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels], f = 2^(len(block_out_channels) - 1)."""
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        # diffusers uses nn.SiLU() here whatever act_fn says.
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------- posterior


@struct.dataclass
class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, exp(logvar)), channels-last.

    mean, logvar: [B, h, w, latent_channels]. A pytree, so it can leave a jitted function.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussianDistribution":
        """moments: [B, h, w, 2*C], mean first then logvar (torch.chunk on the channel axis)."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        # Same clamp as diffusers: keeps exp() finite for untrained/degenerate channels.
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        """exp(logvar / 2), [B, h, w, C]."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        """exp(logvar), [B, h, w, C]."""
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """mean + std * eps, eps ~ N(0, 1) drawn from `key`."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The mean [B, h, w, C] (diffusers' `mode()`: the deterministic latent)."""
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> jax.Array:
        """KL(self || other) (other = N(0, 1) by default), summed over [h, w, C] -> [B]."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            axis=axes,
        )

    def nll(self, sample: jax.Array) -> jax.Array:
        """Negative log-likelihood of `sample` [B, h, w, C], summed over [h, w, C] -> [B]."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(np.log(2.0 * np.pi) + self.logvar + jnp.square(sample - self.mean) / self.var, axis=axes)


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """The diffusers AutoencoderKL config.json fields (diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # Read by pipelines, not by the model: run the VAE in float32 when the rest is fp16/bf16.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "AutoencoderKLConfig":
        """diffusers AutoencoderKL config.json dict -> validated AutoencoderKLConfig; keys starting with "_"
        are bookkeeping and ignored, any other unknown key raises ValueError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        # "_class_name", "_diffusers_version", "_name_or_path", "_persongen_class": bookkeeping only.
        unknown = sorted(k for k in config if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"AutoencoderKL config: unsupported keys {unknown}; known keys: {sorted(fields)}")
        kw: dict[str, Any] = {}
        for k, v in config.items():
            if k in fields:
                kw[k] = tuple(v) if isinstance(v, list) else v
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises ValueError for: empty block_out_channels; a block type other than DownEncoderBlock2D /
        UpDecoderBlock2D; down/up_block_types not one per block_out_channels entry; a block_out_channels
        entry not divisible by norm_num_groups; an unsupported act_fn."""
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("AutoencoderKL config: block_out_channels must not be empty")
        for key, types, want in (
            ("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", self.up_block_types, "UpDecoderBlock2D"),
        ):
            bad = sorted({t for t in types if t != want})
            if bad:
                raise ValueError(f"AutoencoderKL config: {key} {bad} not supported (only {want!r} is ported)")
            if len(types) != n:
                raise ValueError(f"AutoencoderKL config: {key} has {len(types)} entries but block_out_channels has {n}")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderKL config: block_out_channels entry {ch} is not divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )
        activation(self.act_fn)  # raises ValueError naming the activation


# --------------------------------------------------------------------------- model


@register_model
class AutoencoderKL(ConfigMixin, nnx.Module):
    """SDXL's KL autoencoder: images [B, H, W, 3] <-> latents [B, H/8, W/8, 4] (for the sdxl preset)."""

    _parse_config = staticmethod(AutoencoderKLConfig.from_dict)  # from_config: a diffusers config.json dict

    def __init__(
        self,
        config: AutoencoderKLConfig,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        c = config
        self.config = c
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Every resnet of the VAE: no time embedding, diffusers' fixed eps.
        resnet = ResnetSettings(None, VAE_EPS, c.norm_num_groups, c.act_fn, dtype=dtype, param_dtype=param_dtype)
        self.encoder = Encoder(c, resnet, attention_impl=attention_impl, rngs=rngs)
        self.decoder = Decoder(c, resnet, attention_impl=attention_impl, rngs=rngs)
        self.quant_conv = Conv(2 * c.latent_channels, 2 * c.latent_channels, 1, **kw) if c.use_quant_conv else None
        self.post_quant_conv = Conv(c.latent_channels, c.latent_channels, 1, **kw) if c.use_post_quant_conv else None

    @staticmethod
    def preset_config(name: str) -> dict:
        """A diffusers-style config dict by model size (`presets.SIZES`): "sdxl_base" (alias "sdxl"), "tiny"."""
        from persongen_jax.models import presets

        return dict(presets.get("sdxl_base" if name == "sdxl" else name).vae)

    @property
    def scaling_factor(self) -> float:
        """The config's scaling_factor (SDXL: 0.13025): the UNet sees (z - shift_factor) * scaling_factor."""
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        """0.0 when the config has none (SDXL), so `(z - shift) * scale` works unconditionally."""
        return self.config.shift_factor or 0.0

    @property
    def downscale_factor(self) -> int:
        """f = 2^(len(block_out_channels) - 1): image side / latent side (8 for SDXL)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images: jax.Array) -> DiagonalGaussianDistribution:
        """images: [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels]."""
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussianDistribution.from_moments(h)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents: [B, h, w, latent_channels] (unscaled) -> images [B, h*f, w*f, out_channels]."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode(posterior.sample(key)) if key is given, else decode(posterior.mode())."""
        posterior = self.encode(images)
        return self.decode(posterior.sample(key) if key is not None else posterior.mode())

    # ------------------------------------------------------------------ conversion

    @classmethod
    def preprocess_torch_state_dict(cls, sd: dict, config: Mapping[str, Any]) -> dict:
        """Renames the legacy VAE attention keys of old checkpoints.

        Mirrors diffusers' `ModelMixin._fix_state_dict_keys_on_load` for attention blocks built
        with `_from_deprecated_attn_block=True` (the mid-block attentions of Encoder and Decoder):
        query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0. Weights stored as 1x1 convs
        ([C, C, 1, 1], the original LDM layout) are squeezed to Linear [C, C].
        """
        cfg = AutoencoderKLConfig.from_dict(config)
        if not cfg.mid_block_add_attention:
            return sd
        legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
        out = dict(sd)
        for part in ("encoder", "decoder"):
            for i in range(1):  # UNetMidBlock2D is built with num_layers=1 in the VAE
                path = f"{part}.mid_block.attentions.{i}"
                for old, new in legacy.items():
                    for leaf in ("weight", "bias"):
                        if f"{path}.{old}.{leaf}" in out:
                            out[f"{path}.{new}.{leaf}"] = out.pop(f"{path}.{old}.{leaf}")
                for new in legacy.values():
                    k = f"{path}.{new}.weight"
                    if k in out and len(out[k].shape) == 4 and tuple(out[k].shape[2:]) == (1, 1):
                        out[k] = _squeeze_1x1(out[k])
        return out


class _Squeezed1x1:
    """[O, I, 1, 1] -> [O, I] for tensors without slicing (lazy safetensors entries); read on np.asarray."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape[:2])
        self.dtype = getattr(tensor, "dtype", None)

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self.tensor)[:, :, 0, 0]
        return arr if dtype is None else arr.astype(dtype)


def _squeeze_1x1(tensor):
    if hasattr(tensor, "detach") or isinstance(tensor, np.ndarray):  # torch tensor / numpy: slice directly
        return tensor[:, :, 0, 0]
    return _Squeezed1x1(tensor)
