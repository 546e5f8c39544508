"""Stage "detect": SCRFD faces (the project's `evaluation/faces.py` detector), the min_face filter, and
the aligned 112 x 112 crops the verification stage embeds.

Detections are cached in DST/_work/faces (keyed by image path + content hash + detector fingerprint and
settings), so a rerun does not run the detector again. A face counts when both sides of its box, clipped
to the image, are >= `min_face` (research: "a box larger than 256 x 256"). Rejected: no face at all,
or none large enough (the largest is named).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from persongen_jax.data.build.common import Item, StageDoFn, WorkCache
from persongen_jax.data.build.faces import face_scorer
from persongen_jax.data.build.settings import cache_key


def clipped_side(box, width: int, height: int) -> float:
    """The shorter side of a box clipped to the image."""
    x0, y0, x1, y1 = box
    return max(0.0, min(min(x1, width) - max(x0, 0), min(y1, height) - max(y0, 0)))


def detect_faces(detector, rgb: np.ndarray) -> list[dict]:
    """All faces the detector finds, best first: [{"box", "kps", "score"}] (JSON-ready)."""
    found = detector.detect(rgb)
    return [dict(box=[float(v) for v in found.boxes[i]], kps=found.kps[i].astype(float).tolist(),
                 score=float(found.scores[i])) for i in range(len(found))]


def large_faces(faces: list[dict], width: int, height: int, min_face: int) -> list[dict]:
    """The faces whose clipped box has both sides >= `min_face`."""
    return [f for f in faces if clipped_side(f["box"], width, height) >= min_face]


def align(rgb: np.ndarray, faces: list[dict], size: int) -> np.ndarray:
    """[n, size, size, 3] ArcFace-aligned crops of `faces` (insightface's norm_crop)."""
    from persongen_jax.evaluation.faces import norm_crop

    return np.stack([norm_crop(rgb, np.asarray(f["kps"], np.float32), size) for f in faces])


class DetectFaces(StageDoFn):
    """Decoded Items -> Items with `faces` (large enough) and their aligned `crops`; rejects images without one."""
    stage = "detect"

    def setup(self):
        """Once per worker: the detector + ArcFace (faces.face_scorer) and the detections cache."""
        self.scorer = face_scorer(self.settings)
        self.cache = WorkCache(self.settings.dst, "faces")

    def detections(self, item: Item) -> list[dict]:
        """The detector's faces of `item` (cached by path + content hash + detector and its settings)."""
        s = self.settings
        key = cache_key("faces", item.image, item.sha256, s.detector_fingerprint, s.det_size, s.det_thresh)
        faces = self.cache.get(key)
        if faces is None:
            faces = detect_faces(self.scorer.detector, item.rgb)
            self.cache.put(key, faces)
            self.count("computed", group="faces")
        else:
            self.count("cached", group="faces")
        return faces

    def run(self, item: Item):
        """Detects, filters by `min_face`, aligns; drops the pixels (the crop stage reads the file again)."""
        s = self.settings
        faces = self.detections(item)
        big = large_faces(faces, item.width, item.height, s.min_face)
        if not big:
            if not faces:
                yield self.rejected(item, "no face", f"no face detected (det_thresh {s.det_thresh})")
            else:
                side = max(clipped_side(f["box"], item.width, item.height) for f in faces)
                yield self.rejected(item, "face too small",
                                    f"largest face {side:.0f} px < min_face {s.min_face} ({len(faces)} detected)")
            return
        self.kept()
        # The pixels are not needed again until the crop stage re-reads the file: the new Item drops them.
        yield dataclasses.replace(item, crops=align(item.rgb, big, self.scorer.crop_size), faces=big, rgb=None)
