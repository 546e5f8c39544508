"""Face Div. (PhotoMaker's Table 1): how different the faces of the images generated for one identity and
one prompt are from each other -- the mean LPIPS distance over all pairs of their detected face regions
(higher: more diverse). Our reading of the PhotoMaker paper (Sec. 4, metrics: LPIPS on the detected face
regions between generated images); the paper does not fix the crop, so it is stated here:

- each image: SCRFD faces (`faces.FaceDetector`, `--face-models`), the largest box; its region is the square
  centred on the box with side = the box's longer edge (zero-padded where it leaves the image), resized to
  `size` x `size` (128) with PIL bilinear -- the same crop for every method compared;
- per (set, identity, prompt) group: the mean LPIPS (`models/lpips.py`, the lpips package's AlexNet v0.1 by
  default; `weights_conversion lpips`) over all pairs of its images that have a face;
- a group with fewer than 2 images with a face has no value ("n/a", counted and listed, never a number);
  a set's Face Div. is the mean over its groups that have one, "all" the mean over every such group.

    scorer = FaceDivScorer.from_pretrained("weights/antelopev2", "weights/lpips_alex")   # detector, LPIPS
    crop = scorer.face_region(image)              # uint8 [128, 128, 3] or None (no face)
    d = scorer.distances(crops_a, crops_b)        # LPIPS [N]
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

# _as_rgb: the pixels every metric scores (alpha onto white)
from persongen_jax.evaluation.face_sim import FaceScorer, _as_rgb
from persongen_jax.evaluation.faces import FaceDetector
from persongen_jax.models.lpips import LPIPS


@nnx.jit(graph_updates=False)  # read-only: no copy of the module state as an output
def _lpips(model, a, b):
    # lpips.im2tensor: uint8 -> [-1, 1]
    return model(a.astype(jnp.float32) / 127.5 - 1.0, b.astype(jnp.float32) / 127.5 - 1.0)


def square_region(rgb: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """The square around `box` (x1, y1, x2, y2), side = its longer edge, zero-padded outside the image,
    resized to size x size (PIL bilinear) -> uint8 [size, size, 3]."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1, 1.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    n = int(round(side))
    canvas = np.zeros((n, n, 3), np.uint8)
    h, w = rgb.shape[:2]
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(left + n, w), min(top + n, h)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = rgb[sy0:sy1, sx0:sx1]
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BILINEAR))


class FaceDivScorer(FaceScorer):
    model_class = LPIPS
    needs = "Face Div. needs an LPIPS folder (`python -m weights_conversion lpips lpips_alex.pth DST`)"

    def __init__(self, detector: FaceDetector, model: LPIPS, *, size: int = 128, batch_size: int = 32, devices=None):
        self.size = size
        super().__init__(detector, model, batch_size=batch_size, devices=devices)

    def face_region(self, image) -> np.ndarray | None:
        """The largest face's square region (uint8 [size, size, 3]); None when no face is found."""
        rgb = _as_rgb(image)
        faces = self.detector.detect(rgb)
        if not len(faces):
            return None
        return square_region(rgb, faces.boxes[faces.largest()], self.size)

    def distances(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """LPIPS between uint8 crops a[i] and b[i] ([N, S, S, 3] each) -> [N] float32."""
        if not len(a):
            return np.zeros((0,), np.float32)
        return self.batches.run(_lpips, self.model, np.asarray(a, np.uint8), np.asarray(b, np.uint8))

    def group_diversity(self, crops: Sequence[np.ndarray]) -> float:
        """Mean pairwise LPIPS of >= 2 face regions."""
        if len(crops) < 2:
            raise ValueError(f"Face Div. needs 2 face regions, got {len(crops)}")
        pairs = list(itertools.combinations(range(len(crops)), 2))
        a = np.stack([crops[i] for i, _ in pairs])
        b = np.stack([crops[j] for _, j in pairs])
        return float(np.mean(self.distances(a, b)))
