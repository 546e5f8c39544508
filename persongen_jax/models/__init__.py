"""Flax NNX ports of the SDXL UNet, VAE and CLIP encoders (names mirror diffusers/transformers)."""

from persongen_jax.models.modeling import from_pretrained, save_pretrained, register_model  # noqa: F401
