"""Sampling settings shared by every entry point that samples (generate, evaluate, the web app, validation).

Host-side only (no JAX): the CLIs import it to check their options before loading a model.
"""

from __future__ import annotations

# Seeds of one compiled sampling call: at most this many pixels (4 SDXL images of 1024x1024) and this many
# images, so thousands of seeds run in bounded memory (the UNet activations grow with the batch).
MAX_BATCH_PIXELS = 4 * 1024 * 1024
MAX_BATCH = 16


def default_batch_size(height: int, width: int) -> int:
    """Seeds per compiled sampling call for images of height x width: 4 at 1024x1024, 16 at 512x512 or less."""
    return max(1, min(MAX_BATCH, MAX_BATCH_PIXELS // (height * width)))


def seed_batches(seeds: list[int], batch_size: int) -> list[tuple[list[int], int]]:
    """[(seeds of one call, how many of them are real)]: when the seeds take several calls, the last one is
    padded with its last seed to `batch_size`, so every call runs the same compiled program (a seed's image
    does not depend on the others in its batch)."""
    if len(seeds) <= batch_size:
        return [(list(seeds), len(seeds))]
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i:i + batch_size])
        out.append((chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)))
    return out
