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

    key = (settings.detector, settings.arcface, settings.det_size, settings.det_thresh, settings.embed_batch_size,
           settings.detector_threads)
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = FaceSimScorer.from_pretrained(
                settings.detector, settings.arcface, det_size=(settings.det_size, settings.det_size),
                det_thresh=settings.det_thresh, batch_size=settings.embed_batch_size,
                session_options=detector_session_options(settings.detector_threads))
        return _SCORERS[key]


def detector_session_options(threads: int):
    """onnxruntime options with `threads` intra-op threads and no spin-waiting (None: onnxruntime's default,
    a thread per core). Worker processes that share the cores run faster with one thread each: spinning
    threads of one process take the cores the others need."""
    if threads <= 0:
        return None
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so
