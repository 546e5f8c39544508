"""Sampling: schedulers (pure-functional, loop-friendly) and prompt handling (tokenizers, SDXL encode,
the PhotoMaker trigger word)."""
