"""The face models of the build (SCRFD detector + ArcFace IResNet), loaded once per worker process.

The detect and embed stages run in the same worker process (usually fused); both use one
`evaluation.face_sim.FaceSimScorer`, the object Face-Sim evaluation uses, so a face is detected,
aligned and embedded exactly as the metric does it.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_SCORERS: dict = {}


def face_scorer(settings):
    """The process-wide FaceSimScorer for the settings' detector / ArcFace (loaded on first use)."""
    from persongen_jax.evaluation.face_sim import FaceSimScorer

    key = (settings.detector, settings.arcface, settings.det_size, settings.det_thresh, settings.embed_batch_size)
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = FaceSimScorer.from_pretrained(
                settings.detector, settings.arcface, det_size=(settings.det_size, settings.det_size),
                det_thresh=settings.det_thresh, batch_size=settings.embed_batch_size)
        return _SCORERS[key]
