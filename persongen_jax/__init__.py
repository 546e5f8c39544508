"""persongen_jax: personalized face generation on SDXL in JAX/Flax NNX."""

import os

# transformers is here for its tokenizers only: in the base install (no torch) it advises at import that
# "PyTorch was not found. Models won't be available ...", which is expected and concerns none of our code.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
