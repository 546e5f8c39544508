"""FID: the Fréchet distance between InceptionV3 pool features of the generated images and of a reference set.

    scorer = FIDScorer.from_pretrained("weights/fid-inception")     # `weights_conversion inception`
    stats = scorer.statistics(images)                              # FeatureStats, streamed batch by batch
    ref = scorer.reference_statistics("data/ffhq_1k")              # an image folder, or pytorch-fid's .npz
    fid = frechet_distance(*stats.mean_cov(), *ref)

As pytorch-fid (`fid_score.py`): each image is read as RGB (transparency composited onto white, as every
metric here scores it; pytorch-fid's `.convert("RGB")` drops alpha), scaled to [0, 1], resized to 299 x 299
bilinearly inside the network and mapped to [-1, 1] (`models/inception.py`); mu is the mean of the 2048-d
pool features and sigma their unbiased covariance (np.cov(rowvar=False)); a reference statistics file is
pytorch-fid's `--save-stats` output (`np.savez_compressed(path, mu=mu, sigma=sigma)`).

Streaming: `FeatureStats` merges per-batch means and centred co-moments (Chan et al.'s pairwise update, in
float64 on the host), so N images need the memory of one batch of features plus two 2048 x 2048 float64
matrices, whatever N is (pytorch-fid keeps all N x 2048 activations). The distance is computed in float64
on the host: d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), the trace of the matrix
square root taken from the eigenvalues of the symmetric PSD product -- the same trace as pytorch-fid's
scipy sqrtm(S1 S2), without its complex round-off.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from flax import nnx

from persongen_jax.evaluation.batching import ShardedScorer
from persongen_jax.evaluation.face_sim import _as_rgb  # the pixels every metric scores (alpha onto white)
from persongen_jax.models.inception import FEATURES, FIDInceptionV3

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FeatureStats:
    """Running mean and covariance of feature rows, updated one batch at a time (float64)."""

    def __init__(self, dim: int = FEATURES):
        self.n = 0
        self.mean = np.zeros((dim,), np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)  # sum of outer products of deviations from the mean

    def update(self, features: np.ndarray) -> None:
        """features [B, D]."""
        f = np.asarray(features, np.float64)
        if not len(f):
            return
        nb = len(f)
        mean_b = f.mean(axis=0)
        centred = f - mean_b
        m2_b = centred.T @ centred
        delta = mean_b - self.mean
        total = self.n + nb
        self.m2 += m2_b + np.outer(delta, delta) * (self.n * nb / total)
        self.mean += delta * (nb / total)
        self.n = total

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) with the unbiased covariance (n - 1), as np.cov."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d^2 between N(mu1, sigma1) and N(mu2, sigma2), float64 on the host (see the module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"FID statistics of different shapes: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}"
        )
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2 (symmetric PSD)
    inner = half @ s2 @ half
    tr_covmean = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid's .npz (mu [2048], sigma [2048, 2048]); ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"], f["sigma"]
    except KeyError as e:
        raise ValueError(
            f"{path}: FID statistics need arrays 'mu' and 'sigma' (pytorch-fid --save-stats); missing {e}"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz of FID statistics ({type(e).__name__}: {e})") from None
    if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
        raise ValueError(
            f"{path}: FID statistics have mu {mu.shape} and sigma {sigma.shape}; expected "
            f"({FEATURES},) and ({FEATURES}, {FEATURES}) (InceptionV3 pool features)"
        )
    return mu.astype(np.float64), sigma.astype(np.float64)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The images of a reference folder (recursively, sorted); ValueError when there are fewer than 2."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(
            f"{folder}: FID reference folder holds {len(files)} image(s) "
            f"({', '.join(IMAGE_EXTENSIONS)}); it needs at least 2"
        )
    return files


@nnx.jit(graph_updates=False)  # read-only: no copy of the module state as an output
def _trunk(model, x):
    return model.trunk(x)


@nnx.jit(graph_updates=False)
def _prepare(model, images):
    return model.prepare(images)


class FIDScorer(ShardedScorer):
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kw) -> "FIDScorer":
        """A folder written by `python -m weights_conversion inception`; ValueError naming it otherwise."""
        needs = (
            "FID needs an InceptionV3 folder "
            "(`python -m weights_conversion inception pt_inception-2015-12-05-6726825d.pth DST`)"
        )
        return cls(cls.load(directory, FIDInceptionV3, needs), **kw)

    def features(self, images: Sequence) -> np.ndarray:
        """images (PIL, uint8 arrays or paths) of one size -> pool features [N, 2048] (float32)."""
        if not len(images):
            return np.zeros((0, FEATURES), np.float32)
        arrays = [_as_rgb(im) for im in images]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError("FIDScorer.features: images of different sizes; use `statistics`")
        out = []
        for start in range(0, len(arrays), self.batch_size):
            # The resize to 299 compiles once per image size (small); the network once, at 299 x 299.
            x = np.stack(arrays[start : start + self.batch_size]).astype(np.float32) / 255.0
            out.append(self.batches.run(_trunk, self.model, np.asarray(_prepare(self.model, x))))
        return np.concatenate(out)

    def features_of(self, images: Sequence) -> np.ndarray:
        """Pool features [N, 2048] of images of any sizes, in input order (each size batched apart)."""
        arrays = [_as_rgb(im) for im in images]
        out = np.zeros((len(arrays), FEATURES), np.float32)
        for shape in {a.shape for a in arrays}:
            idx = [i for i, a in enumerate(arrays) if a.shape == shape]
            out[idx] = self.features([arrays[i] for i in idx])
        return out

    def statistics(self, images: Iterable, stats: FeatureStats | None = None) -> FeatureStats:
        """Streams images (PIL, arrays or paths) batch by batch into `stats` (new by default): at most one
        batch is decoded at a time; images of one size are batched together."""
        stats = stats or FeatureStats()
        pending: dict[tuple, list] = {}
        for image in images:
            arr = _as_rgb(image)
            group = pending.setdefault(arr.shape, [])
            group.append(arr)
            if len(group) == self.batch_size:
                stats.update(self.features(group))
                group.clear()
        for group in pending.values():
            if group:
                stats.update(self.features(group))
        return stats

    def reference_statistics(self, reference: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
        """`--fid-reference`: an image folder (features computed here) or pytorch-fid's .npz -> (mu, sigma)."""
        reference = Path(reference)
        if reference.is_dir():
            return self.statistics(image_files(reference)).mean_cov()
        if reference.suffix == ".npz" and reference.is_file():
            return load_statistics(reference)
        raise ValueError(
            f"{reference}: the FID reference must be an image folder or a .npz of statistics (pytorch-fid --save-stats)"
        )
