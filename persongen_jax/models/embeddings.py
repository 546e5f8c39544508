"""Timestep embeddings (diffusers `models/embeddings.py`: get_timestep_embedding, Timesteps, TimestepEmbedding)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from persongen_jax.models.layers import Linear, activation


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / diffusers.

    timesteps: [N] -> [N, embedding_dim] float32, laid out [sin | cos]
    ([cos | sin] with flip_sin_to_cos), zero-padded by one column for odd dims.
    Computed in float32 in the same operation order as diffusers so fp32 parity holds.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [N], got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    freqs = jnp.exp(exponent)
    emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class Timesteps(nnx.Module):
    """Parameter-free sinusoidal projection: [N] -> [N, num_channels] float32."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def __call__(self, timesteps: jax.Array) -> jax.Array:
        """timesteps [N] (int or float) -> [N, num_channels] float32 (`get_timestep_embedding`)."""
        return get_timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
        )


class TimestepEmbedding(nnx.Module):
    """linear_1 -> act -> linear_2 (-> post_act): [B, in_channels] -> [B, out_dim or time_embed_dim].

    diffusers' optional `cond_proj` (LCM timestep conditioning) is not ported;
    the UNet config parser rejects `time_cond_proj_dim`.
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Linear(in_channels, time_embed_dim, **kw)
        self.act = activation(act_fn)
        self.linear_2 = Linear(time_embed_dim, out_dim or time_embed_dim, **kw)
        self.post_act = activation(post_act_fn) if post_act_fn is not None else None

    def __call__(self, sample: jax.Array) -> jax.Array:
        """sample [B, in_channels] -> [B, out_dim or time_embed_dim]."""
        sample = self.linear_2(self.act(self.linear_1(sample)))
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample
