"""Sampling: schedulers (pure-functional, loop-friendly) and prompt handling (tokenizers, SDXL encode,
the PhotoMaker trigger word)."""

# Seeds are integers in [0, MAX_SEED]: jax.random.key keeps 32 bits, so 2**32 would repeat seed 0's image.
MAX_SEED = 2**32 - 1
