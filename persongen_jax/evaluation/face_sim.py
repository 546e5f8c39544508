"""Face-Sim: cosine between ArcFace embeddings of the generated face and the reference face(s).

    scorer = FaceSimScorer.from_pretrained("weights/antelopev2", "weights/arcface_r100")    # detector, ArcFace
    refs = scorer.reference_embeddings(["faces/alice_1.jpg", "faces/alice_2.jpg"])   # [R, D]
    scores, found = scorer(generated_images, [refs] * len(generated_images))

Per image (transparency composited onto white, as for CLIP-T): detect faces (SCRFD, host), keep the
largest (`select="score"`: the most confident, insightface's faces[0]), align it to the ArcFace
template (`faces.norm_crop`), embed all crops in jitted fixed-size batches sharded over the `data`
axis (the IResNet converted by `weights_conversion arcface`), L2-normalise. The score of a generated
image is the mean cosine to its identity's reference embeddings.

No face in a generated image: the research scores it 0 and counts it (`no_face="zero"`, the default);
`no_face="skip"` leaves it out of the means instead (score None). Either way `found` says which images
had no face, and the report lists them. A reference image without a face is an error naming the file:
it would silently change what the identity is.
"""

from __future__ import annotations

import functools
import os
from typing import Self, Sequence

import numpy as np
from flax import nnx

from persongen_jax.evaluation.batching import ShardedScorer
from persongen_jax.evaluation.faces import FACE_SELECT, FaceDetector, norm_crop
from persongen_jax.models import iresnet
from persongen_jax.pipeline.image_processing import convert_to_rgb, load_image

NO_FACE_MODES = ("zero", "skip")


class NoFaceError(ValueError):
    """A reference image in which no face was found."""


@nnx.jit(graph_updates=False, static_argnames="normalize")  # read-only: no copy of the module state as an output
def _embed(model, crops, normalize=True):
    return iresnet.embed(model, crops, normalize=normalize)


def _as_rgb(image) -> np.ndarray:
    # Transparency is composited onto white, as CLIP-T's input (transformers' convert_to_rgb), so both
    # metrics score the same picture: the one a viewer sees. insightface itself has no rule -- it takes
    # the BGR array its caller read, and cv2.imread (IMREAD_COLOR) or PIL's .convert("RGB") drop alpha
    # and keep the colours under it (often black, or the background that was cut out). Opaque images,
    # all that SDXL generates, are unchanged either way; for a transparent PNG a table computed on
    # cv2.imread pixels can differ from ours.
    if isinstance(image, (str, os.PathLike)):
        return np.asarray(load_image(image, composite_on_white=True))
    return convert_to_rgb(image)


class FaceScorer(ShardedScorer):
    """A scorer of the faces SCRFD finds (`detector`, on the host) with a converted network (`model`, on the
    devices): Face-Sim's ArcFace, Face Div.'s LPIPS. `from_pretrained` loads both from their folders."""

    model_class: type = object  # what the network folder must hold
    needs = ""  # the ValueError's words for a folder that holds another model

    def __init__(self, detector: FaceDetector, model, *, batch_size: int = 32, devices=None):
        self.detector = detector
        super().__init__(model, batch_size=batch_size, devices=devices)

    @classmethod
    def from_pretrained(
        cls,
        detector: str | os.PathLike,
        model: str | os.PathLike,
        *,
        det_size=(640, 640),
        det_thresh: float = 0.5,
        providers=None,
        session_options=None,
        **kw,
    ) -> Self:
        """detector: an insightface folder with an SCRFD detector or its .onnx (`FaceDetector.from_folder`, with
        these detector settings); model: the network's converted folder; kw: the scorer's own settings."""
        det = FaceDetector.from_folder(
            detector, det_size=det_size, det_thresh=det_thresh, providers=providers, session_options=session_options
        )
        return cls(det, cls.load(model, cls.model_class, cls.needs), **kw)


class FaceSimScorer(FaceScorer):
    model_class = iresnet.IResNet
    needs = "Face-Sim needs an ArcFace IResNet folder (`python -m weights_conversion arcface w600k_r50.onnx DST`)"

    def __init__(
        self,
        detector: FaceDetector,
        arcface,
        *,
        batch_size: int = 64,
        devices=None,
        no_face: str = "zero",
        select: str = "largest",
    ):
        if no_face not in NO_FACE_MODES:
            raise ValueError(f"no_face={no_face!r}; expected one of {list(NO_FACE_MODES)}")
        if select not in FACE_SELECT:
            raise ValueError(f"select={select!r}; expected one of {list(FACE_SELECT)}")
        self.select = select
        self.arcface = arcface
        self.no_face = no_face
        self.crop_size = arcface.config.input_size
        super().__init__(detector, arcface, batch_size=batch_size, devices=devices)

    def align(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """-> (crops [N, S, S, 3] uint8, found [N] bool); a black crop where no face was found."""
        s = self.crop_size
        crops = np.zeros((len(images), s, s, 3), np.uint8)
        found = np.zeros((len(images),), bool)
        for i, image in enumerate(images):
            rgb = _as_rgb(image)
            faces = self.detector.detect(rgb)
            if len(faces):
                crops[i] = norm_crop(rgb, faces.kps[faces.select(self.select)], s)
                found[i] = True
        return crops, found

    def embed_crops(self, crops: np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """Aligned RGB crops [N, S, S, 3] -> unit embeddings [N, D] (float32; normalize=False: the raw ArcFace
        outputs)."""
        if not len(crops):
            return np.zeros((0, self.arcface.config.num_features), np.float32)
        fn = _embed if normalize else functools.partial(_embed, normalize=False)
        return self.batches.run(fn, self.arcface, np.asarray(crops, np.uint8))

    def embed(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """-> (unit embeddings [N, D], zeros where no face; found [N])."""
        crops, found = self.align(images)
        emb = self.embed_crops(crops)
        return np.where(found[:, None], emb, 0.0).astype(np.float32), found

    def reference_embeddings(self, images: Sequence, names: Sequence[str] | None = None) -> np.ndarray:
        """Reference faces (paths or images) -> [R, D]; NoFaceError names each image without a face."""
        names = (
            list(names)
            if names is not None
            else [str(im) if isinstance(im, (str, os.PathLike)) else f"reference #{i}" for i, im in enumerate(images)]
        )
        emb, found = self.embed(images)
        if not found.all():
            missing = [n for n, f in zip(names, found) if not f]
            raise NoFaceError(
                f"no face found in reference image(s) {missing} (detector {self.detector.model_file}, "
                f"det_thresh {self.detector.det_thresh}); use a clear frontal photo"
            )
        return emb

    def scores(self, embeddings: np.ndarray, found: np.ndarray, references: Sequence[np.ndarray]) -> list:
        """Mean cosine of each embedding to its references [R_i, D]; no face -> 0.0 or None (no_face)."""
        out = []
        for e, f, ref in zip(embeddings, found, references):
            if not f:
                out.append(0.0 if self.no_face == "zero" else None)
            else:
                out.append(float(np.mean(np.asarray(ref, np.float32) @ e)))
        return out

    def __call__(self, images: Sequence, references: Sequence[np.ndarray]) -> tuple[list, np.ndarray]:
        """images + one reference-embedding array per image -> (scores, found)."""
        if len(images) != len(references):
            raise ValueError(f"Face-Sim: {len(images)} images but {len(references)} reference sets")
        emb, found = self.embed(images)
        return self.scores(emb, found, references), found
