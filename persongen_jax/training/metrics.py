"""One writer for process 0: JSON lines (WORKDIR/metrics.jsonl) + TensorBoard scalars and images (WORKDIR/tb)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax


class MetricWriter:
    """Writes scalars per step to WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tb); a no-op on processes
    other than 0, so every process can call it."""

    def __init__(self, workdir, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl: Any = None  # the open metrics.jsonl (process 0)
        self._tb = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tb"))
        except ImportError:  # optional: the JSONL file has everything
            self._tb = None

    def write(self, step: int, scalars: dict) -> None:
        """One JSON line {"step", **scalars} (flushed) and one TensorBoard scalar per finite value."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def write_images(self, step: int, images: dict) -> None:
        """TensorBoard images {tag: uint8 [H, W, 3]} at `step` (the validation samples)."""
        if not self.enabled or self._tb is None:
            return
        for tag, image in images.items():
            self._tb.add_image(tag, image, int(step), dataformats="HWC")
        self._tb.flush()

    def close(self) -> None:
        """Closes both files."""
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
