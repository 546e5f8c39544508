"""persongen_jax: personalized face generation on SDXL in JAX/Flax NNX."""

__version__ = "0.1.0"
