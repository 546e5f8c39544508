"""Dataset construction on Apache Beam: raw person folders -> filtered, verified, cropped, captioned
(P_general / P_bg / P_body) ArrayRecord training set, in the format of `persongen_jax.data.format`.

    python -m persongen_jax.data.build SRC DST --detector weights/antelopev2 --arcface weights/arcface_r100 \\
        --caption-model weights/Qwen2.5-VL-7B-Instruct [options] [-- beam pipeline options]

    from persongen_jax.data.build import BuildSettings, ModelSpec, build_dataset

One small module per stage (each a Beam DoFn / PTransform): source (input listing), decode (+ size
filter), detect (SCRFD), verify (ArcFace + per-person dominant identity), crop, caption, split (P_bg /
P_body), mark (trigger word), write (ArrayRecord sink + index.json); `vlm` holds the captioning
backends, `pipeline` wires the graph and runs it. See docs/DATASET.md.
"""

import logging


class _QuietBeamImport(logging.Filter):
    """Beam logs a warning on import about Google Cloud client libraries that only its BigQuery IO uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


logging.getLogger().addFilter(_QuietBeamImport())

from persongen_jax.data.build.pipeline import build_dataset  # noqa: E402
from persongen_jax.data.build.settings import BuildSettings, ModelSpec  # noqa: E402

__all__ = ["BuildSettings", "ModelSpec", "build_dataset"]
