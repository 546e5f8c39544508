"""PhotoMaker V2's `id_embeds`: the ArcFace embedding of each reference photo, computed as the official
pipeline computes it, with the project's own SCRFD + IResNet (`faces.py`, `models/iresnet.py`).

    embedder = ReferenceFaceEmbedder.from_pretrained("weights/buffalo_l", "weights/arcface_r50")
    id_embeds = embedder(images, names=["face1.jpg", "face2.jpg"])        # [N, 512] float32, raw

What the official code does (TencentARC/PhotoMaker `inference_scripts/inference_pmv2.py`,
`gradio_demo/app_v2.py`, `photomaker/insightface_package.py`), mirrored here:

- `FaceAnalysis2(providers=..., allowed_modules=['detection', 'recognition'])` without a model-pack name:
  insightface's default pack, buffalo_l (det_10g.onnx SCRFD + w600k_r50.onnx ArcFace R50); prepared
  with det_size (640, 640). `--face-models` names the folder (antelopev2 works too: SCRFD-10G + R100).
- `analyze_faces`: detect at the current size, then (none found) at 640, 576, ..., 320, then 256, and
  take the first size that finds a face. The "current size" is whatever the previous call left in the
  detector (insightface keeps `det_model.input_size`), so the size that found the last face is tried
  first; kept here per embedder, as there.
- `faces[0]`: insightface's `FaceAnalysis.get` (max_num=0) keeps SCRFD's order, highest detection score
  first: the most confident face, not the largest (`Faces.select("score")`).
- `faces[0]['embedding']`: the raw ArcFace output of the aligned 112 x 112 crop, NOT L2-normalised
  (`normed_embedding` is the normalised one); so `iresnet.embed(..., normalize=False)`.
- The official scripts skip a photo without a face (and fail only if none has one); here a reference
  without a face is an error naming it (`NoFaceError`): silently dropping it would change the identity
  and the number of ID tokens the prompt was built for.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from flax import nnx

from persongen_jax.evaluation.face_sim import FaceSimScorer, NoFaceError, _as_rgb
from persongen_jax.evaluation.faces import Faces, arcface_input, norm_crop
from persongen_jax.models import iresnet

# analyze_faces' fallbacks after the current size: 640, 576, ..., 320, then 256.
FALLBACK_DET_SIZES = tuple((s, s) for s in range(640, 256, -64)) + ((256, 256),)
OFFICIAL_DET_SIZE = (640, 640)


@nnx.jit(graph_updates=False)  # read-only module: no copy of its state as an output
def _embed_raw(model, crops):
    return iresnet.embed(model, crops, normalize=False)


class ReferenceFaceEmbedder:
    """Reference photos -> raw ArcFace embeddings [N, F], as PhotoMaker V2's pipeline computes `id_embeds`."""

    def __init__(self, scorer: FaceSimScorer):
        # The Face-Sim scorer owns the detector and the ArcFace network (one loader, one device placement).
        self.detector, self.arcface = scorer.detector, scorer.arcface
        self.crop_size = scorer.crop_size
        inp = self.detector.session.get_inputs()[0]
        # A detector file with a fixed input size runs at that size only (insightface does the same).
        self.resizable = not (isinstance(inp.shape[2], int) and isinstance(inp.shape[3], int))
        self.det_size = tuple(self.detector.det_size)

    @classmethod
    def from_pretrained(
        cls, face_models: str | os.PathLike, arcface: str | os.PathLike, *, providers=None
    ) -> "ReferenceFaceEmbedder":
        """face_models: an insightface folder with an SCRFD detector (buffalo_l, as the official pipeline;
        or antelopev2) or its .onnx; arcface: a converted IResNet folder (`weights_conversion arcface`)."""
        return cls(
            FaceSimScorer.from_pretrained(
                face_models, arcface, det_size=OFFICIAL_DET_SIZE, providers=providers, select="score"
            )
        )

    @property
    def num_features(self) -> int:
        """F: the ArcFace embedding width (512 for the insightface networks)."""
        return int(self.arcface.config.num_features)

    def detect(self, rgb: np.ndarray) -> Faces:
        """`analyze_faces`: the current size, then the fallback sizes, until a face is found."""
        sizes = [self.det_size] + (list(FALLBACK_DET_SIZES) if self.resizable else [])
        faces = None
        for size in sizes:
            self.detector.det_size = self.det_size = tuple(size)
            faces = self.detector.detect(rgb)
            if len(faces):
                break
        assert faces is not None
        return faces

    def __call__(self, images: Sequence, names: Sequence[str] | None = None) -> np.ndarray:
        """Reference photos (paths, PIL images or RGB arrays) -> raw embeddings [N, F] float32 of each photo's
        most confident face. NoFaceError names every photo without a face."""
        names = (
            list(names)
            if names is not None
            else [
                str(im) if isinstance(im, (str, os.PathLike)) else f"reference image #{i + 1}"
                for i, im in enumerate(images)
            ]
        )
        crops = np.zeros((len(images), self.crop_size, self.crop_size, 3), np.uint8)
        missing = []
        for i, image in enumerate(images):
            rgb = _as_rgb(image)
            faces = self.detect(rgb)
            if not len(faces):
                missing.append(names[i])
                continue
            crops[i] = norm_crop(rgb, faces.kps[faces.select("score")], self.crop_size)
        if missing:
            raise NoFaceError(
                f"no face found in reference image(s) {', '.join(missing)} (detector "
                f"{self.detector.model_file}, det_thresh {self.detector.det_thresh}, sizes 640 down to "
                "256); PhotoMaker V2 needs each reference's face: use a clear photo of the face"
            )
        if not len(images):
            return np.zeros((0, self.num_features), np.float32)
        return np.asarray(_embed_raw(self.arcface, crops), np.float32)


class CropEmbedder:
    """Reference images taken as face crops -> raw ArcFace embeddings [N, F], with no detection: each image is
    resized to the network's input (`faces.arcface_input`). A PhotoMaker V2 training run's own references are
    embedded this way (`training.model.inference_pipeline`), as training embeds records that carry no
    embedding, so a run trained with a random tiny ArcFace samples coherently."""

    def __init__(self, arcface):
        self.arcface = arcface

    @property
    def num_features(self) -> int:
        """F: the ArcFace embedding width."""
        return int(self.arcface.config.num_features)

    def __call__(self, images: Sequence, names: Sequence[str] | None = None) -> np.ndarray:
        """Reference images (paths, PIL images or RGB arrays) -> [N, F] float32 (names: unused, no face can be
        missing)."""
        if not len(images):
            return np.zeros((0, self.num_features), np.float32)
        size = self.arcface.config.input_size
        crops = np.stack([arcface_input(_as_rgb(im), size) for im in images])
        return np.asarray(_embed_raw(self.arcface, crops), np.float32)
