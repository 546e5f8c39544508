"""Fixed-size, data-sharded batches for the evaluation models (CLIP-T, ArcFace).

    runner = ShardedBatches(batch_size=64)          # all devices on one `data` axis
    runner.replicate(model)                          # parameters on every device
    out = runner.run(jitted_fn, model, array_a, array_b)   # -> numpy, first axis = len(array_a)

Every call of `fn` sees the same shapes (the last batch is padded by repeating its first row and the
padding is cut from the result), so it compiles once; the batch size is rounded up to a multiple of
the device count so each device gets an equal slice.

`ShardedScorer` is the base of the metrics' scorers (CLIP-T, DINO, FID, Face-Sim, Face Div.): the model
replicated onto a `ShardedBatches`, and `load`, which reads the converted model a metric needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from persongen_jax.models import modeling


class ShardedBatches:
    def __init__(self, batch_size: int, devices=None):
        devices = list(devices or jax.devices())
        self.mesh = Mesh(np.asarray(devices), ("data",))
        self.batch_size = -(-max(1, int(batch_size)) // len(devices)) * len(devices)
        self.sharding = NamedSharding(self.mesh, P("data"))

    def replicate(self, model) -> None:
        """Puts the NNX module's state on every device of the mesh (the batch is what gets split)."""
        nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(self.mesh, P())))

    def run(self, fn: Callable, model, *arrays: np.ndarray) -> np.ndarray:
        """fn(model, *batches) -> [B, ...] for every batch of `arrays` (same first axis) -> concatenated."""
        n = len(arrays[0])
        out = []
        for start in range(0, n, self.batch_size):
            chunk = [np.asarray(a[start : start + self.batch_size]) for a in arrays]
            pad = self.batch_size - len(chunk[0])
            if pad:
                chunk = [np.concatenate([c, np.repeat(c[:1], pad, axis=0)]) for c in chunk]
            res = fn(model, *(jax.device_put(c, self.sharding) for c in chunk))
            out.append(np.asarray(res)[: self.batch_size - pad])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


class ShardedScorer:
    """A metric's model, replicated on every device and run in fixed-size batches (`self.batches`)."""

    def __init__(self, model, *, batch_size: int = 32, devices=None):
        self.model = model
        self.batches = ShardedBatches(batch_size, devices)
        self.batch_size = self.batches.batch_size
        self.batches.replicate(model)

    @staticmethod
    def load(directory: str | os.PathLike, model_class: type, needs: str):
        """The converted model in `directory`; ValueError "DIR: <needs>; found <class>" when it holds another
        model, so a wrong folder is named with what the metric expected."""
        directory = Path(directory)
        model = modeling.from_pretrained(directory)
        if not isinstance(model, model_class):
            raise ValueError(f"{directory}: {needs}; found {type(model).__name__}")
        return model
