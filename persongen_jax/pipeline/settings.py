"""Sampling settings as data: `SamplingSettings` owns every sampling default once, and its `check()`.

    settings = SamplingSettings(seeds=(0, 1, 2), num_steps=30, height=1024, width=1024)
    settings.check()                            # PipelineError naming the first unusable value
    images = pipe(prompt, refs, **settings.call_kwargs())

generate, evaluate mode B, the web app, the validation protocol (`evaluation.protocol.ProtocolSettings`,
which adds the protocol's own fields) and the config's eval section (configs/default.py) build one instead
of declaring their own defaults. Host-side only (numpy, no JAX): the CLIs check their options with it before
loading a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Self, Sequence

import numpy as np

from persongen_jax.pipeline import DEFAULT_START_MERGE, MAX_SEED, resolve_start_merge_step

# Seeds of one compiled sampling call: at most this many pixels (4 SDXL images of 1024x1024) and this many
# images, so thousands of seeds run in bounded memory (the UNet activations grow with the batch).
MAX_BATCH_PIXELS = 4 * 1024 * 1024
MAX_BATCH = 16
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "cudnn")


class PipelineError(ValueError):
    """A model folder, an input or a setting that cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How images are sampled. seeds: one image per seed; start_merge_step: the step index after which the
    reference faces' ID embedding is used, or a fraction of num_steps (`resolve_start_merge_step`);
    height / width: pixels (None: the model's size); negative_prompt None: SDXL's zero embedding;
    dtype (None: the stored params') and attention: how a converted model (`--model`) is loaded."""

    seeds: tuple[int, ...] = (0,)
    num_steps: int = 50
    guidance_scale: float = 5.0
    scheduler: str = "euler"
    start_merge_step: int | float = DEFAULT_START_MERGE
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    dtype: str | None = None
    attention: str = "xla"

    @classmethod
    def from_attributes(cls, source: Any, **changes) -> Self:
        """The settings `source` carries under the fields' names (an argparse Namespace, the web app's request,
        a config's eval section: whatever it names otherwise, e.g. --steps, is in `changes`), the others at
        their defaults."""
        named = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if hasattr(source, f.name)}
        return cls(**{**named, **changes})

    def check(self, downscale_factor: int | None = None) -> None:
        """PipelineError naming the first unusable setting (the CLIs call this before loading a model; the
        pipeline again with the VAE's `downscale_factor`)."""
        seeds, num_steps, guidance_scale = self.seeds, self.num_steps, self.guidance_scale
        start_merge_step = self.start_merge_step
        if not seeds:
            raise PipelineError("no seeds given")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED:
                raise PipelineError(f"seed {s!r} is out of range: seeds are integers in [0, {MAX_SEED}]")
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise PipelineError(f"steps={num_steps!r}: expected an integer >= 1")
        if not isinstance(guidance_scale, (int, float, np.floating)) or not math.isfinite(guidance_scale):
            raise PipelineError(f"guidance scale {guidance_scale!r}: expected a finite number")
        is_int = isinstance(start_merge_step, (int, np.integer)) and not isinstance(start_merge_step, bool)
        is_float = isinstance(start_merge_step, (float, np.floating)) and math.isfinite(start_merge_step)
        if not (
            (is_int and start_merge_step >= 0)
            or (is_float and (0 <= start_merge_step < 1 or float(start_merge_step).is_integer()))
        ):
            raise PipelineError(
                f"start merge step {start_merge_step!r}: expected a step index (an integer >= 0) or a "
                "fraction of the steps in [0, 1)"
            )
        for name, v in (("height", self.height), ("width", self.width)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise PipelineError(f"{name}={v!r}: expected a positive number of pixels")
            if downscale_factor and v % downscale_factor:
                raise PipelineError(
                    f"{name}={v}: must be a multiple of {downscale_factor} (the VAE's downscale factor)"
                )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise PipelineError(f"dtype {self.dtype!r}: expected one of {list(DTYPES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise PipelineError(f"attention {self.attention!r}: expected one of {list(ATTENTION_IMPLS)}")

    @property
    def merge_step_index(self) -> int:
        """The step index of `start_merge_step` for `num_steps` steps."""
        return resolve_start_merge_step(self.start_merge_step, self.num_steps)

    def call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `PersonGenPipeline.__call__` these settings give (all but seeds)."""
        return {
            "num_steps": self.num_steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "start_merge_step": self.start_merge_step,
            "height": self.height,
            "width": self.width,
            "negative_prompt": self.negative_prompt,
        }

    def replace(self, **changes) -> "SamplingSettings":
        """A copy with `changes` (e.g. the styled negative prompt, the aspect preset's size)."""
        return dataclasses.replace(self, **changes)


def default_batch_size(height: int, width: int) -> int:
    """Seeds per compiled sampling call for images of height x width: 4 at 1024x1024, 16 at 512x512 or less."""
    return max(1, min(MAX_BATCH, MAX_BATCH_PIXELS // (height * width)))


def seed_batches(seeds: Sequence[int], batch_size: int) -> list[tuple[list[int], int]]:
    """[(seeds of one call, how many of them are real)]: when the seeds take several calls, the last one is
    padded with its last seed to `batch_size`, so every call runs the same compiled program (a seed's image
    does not depend on the others in its batch)."""
    if len(seeds) <= batch_size:
        return [(list(seeds), len(seeds))]
    out = []
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i : i + batch_size])
        out.append((chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)))
    return out
