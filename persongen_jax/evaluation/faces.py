"""Face detection (SCRFD through onnxruntime) and ArcFace 5-point alignment, as insightface does it.

    detector = FaceDetector.from_folder("weights/antelopev2")      # or buffalo_l, or one .onnx file
    faces = detector.detect(rgb_uint8)                              # Faces(boxes, scores, kps), best first
    crop = norm_crop(rgb_uint8, faces.kps[faces.largest()])        # 112 x 112 aligned RGB crop

This mirrors insightface's `SCRFD.detect` (model_zoo/scrfd.py) and `face_align.norm_crop` so Face-Sim
numbers are comparable to tables computed with `FaceAnalysis(...).get(img)`:

- the image is resized (cv2 INTER_LINEAR) into the detector's input size keeping its aspect ratio and
  zero-padded at the bottom/right, normalised as (x - 127.5) / 128 (RGB; insightface reads BGR and
  swaps, so feed RGB here);
- per stride: anchor centres on the feature grid (num_anchors per cell), boxes = centre -/+ distances
  x stride, keypoints = centre + offsets x stride; candidates with score >= det_thresh; NMS at 0.4
  (insightface's +1 pixel area convention); coordinates divided by the resize scale;
- alignment: the similarity transform (Umeyama, as skimage's SimilarityTransform.estimate) from the 5
  landmarks to the ArcFace template, then cv2.warpAffine with a black border.

The detector only runs on the host (onnxruntime, CPU unless CUDA is available); the recognition
network is ported to JAX (`models/iresnet.py`) and runs batched on the accelerator (`face_sim.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# insightface utils/face_align.py: landmark positions (eyes, nose, mouth corners) in a 112 x 112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# Number of ONNX outputs -> (strides, anchors per cell, has keypoints); insightface's SCRFD._init_vars.
SCRFD_LAYOUTS = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}


FACE_SELECT = ("largest", "score")


class FaceModelError(ValueError):
    """A detector folder / file that cannot be used; the message names it and says why."""


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("face detection needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def default_providers() -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


@dataclass
class Faces:
    """Detections in original image pixels, sorted by score (best first) after NMS."""

    boxes: np.ndarray  # [n, 4] x1, y1, x2, y2
    scores: np.ndarray  # [n]
    kps: np.ndarray  # [n, 5, 2] x, y: left eye, right eye, nose, left mouth, right mouth

    def __len__(self) -> int:
        return len(self.scores)

    def largest(self) -> int:
        """Index of the face with the largest box (the subject of a portrait)."""
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(np.argmax(area))

    def select(self, how: str) -> int:
        """ "largest" box, or "score": the most confident (insightface's faces[0])."""
        if how not in FACE_SELECT:
            raise ValueError(f"face selection {how!r}; expected one of {list(FACE_SELECT)}")
        return self.largest() if how == "largest" else 0


def _nms(dets: np.ndarray, thresh: float) -> list[int]:
    """insightface SCRFD.nms: greedy, areas with the +1 pixel convention. dets: [n, 5] sorted by score."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def _num_outputs(file: Path) -> int:
    """Outputs of an ONNX graph, through onnxruntime (a base dependency; the `onnx` package is only in the
    [torch] extra). Graph optimisations off: the session is only asked for its signature."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise FaceModelError(f"{file}: not a readable ONNX file ({type(e).__name__}: {e})") from None
    return len(session.get_outputs())


def find_detector_file(path: str | os.PathLike) -> Path:
    """An .onnx file, or the SCRFD file of an insightface model folder (the .onnx with >= 6 outputs:
    det_10g.onnx in buffalo_l, scrfd_10g_bnkps.onnx in antelopev2)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FaceModelError(f"{path}: no such face model folder or .onnx file")
    files = sorted(path.glob("*.onnx"))
    # Detector-looking names first: recognition files (glintr100.onnx, 250 MB) are loaded only if needed.
    for f in sorted(files, key=lambda f: not any(k in f.name.lower() for k in ("det", "scrfd"))):
        if _num_outputs(f) in SCRFD_LAYOUTS:
            return f
    raise FaceModelError(
        f"{path}: no SCRFD face detector among {[f.name for f in files] or 'no .onnx files'} "
        "(expected an insightface model folder such as antelopev2 or buffalo_l, with "
        "scrfd_10g_bnkps.onnx / det_10g.onnx)"
    )


class FaceDetector:
    """SCRFD with 5 keypoints through onnxruntime; `detect(rgb)` -> Faces."""

    def __init__(
        self,
        model_file: str | os.PathLike,
        *,
        det_size: tuple[int, int] = (640, 640),
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
        providers=None,
        session_options=None,
    ):
        import onnxruntime as ort

        self.model_file = Path(model_file)
        try:
            # session_options: an ort.SessionOptions, e.g. one intra-op thread per process when several
            # worker processes share the cores (the dataset build's workers).
            self.session = ort.InferenceSession(
                str(self.model_file), sess_options=session_options, providers=providers or default_providers()
            )
        except Exception as e:
            raise FaceModelError(f"{self.model_file}: onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        outputs = self.session.get_outputs()
        if len(outputs) not in SCRFD_LAYOUTS:
            raise FaceModelError(
                f"{self.model_file}: {len(outputs)} outputs; an SCRFD detector has one of {sorted(SCRFD_LAYOUTS)}"
            )
        self.strides, self.num_anchors, has_kps = SCRFD_LAYOUTS[len(outputs)]
        if not has_kps:
            raise FaceModelError(
                f"{self.model_file}: this SCRFD has no keypoint outputs; ArcFace alignment needs "
                "the 5 landmarks (use a *_bnkps / det_10g model)"
            )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in outputs]
        # A file with a fixed input size is run at that size (insightface does the same).
        h, w = inp.shape[2], inp.shape[3]
        self.det_size = (w, h) if isinstance(h, int) and isinstance(w, int) else tuple(det_size)
        self.det_thresh = float(det_thresh)
        self.nms_thresh = float(nms_thresh)
        self._centers: dict = {}

    @classmethod
    def from_folder(cls, path: str | os.PathLike, **kw) -> "FaceDetector":
        return cls(find_detector_file(path), **kw)

    def _anchor_centers(self, height: int, width: int, stride: int) -> np.ndarray:
        key = (height, width, stride)
        if key not in self._centers:
            c = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)  # (x, y) per cell
            c = (c * stride).reshape(-1, 2)
            if self.num_anchors > 1:
                c = np.repeat(c, self.num_anchors, axis=0)
            self._centers[key] = c
        return self._centers[key]

    def detect(self, image: np.ndarray) -> Faces:
        """image: RGB uint8 [H, W, 3] -> Faces in image pixels (empty when none passes det_thresh)."""
        cv2 = _cv2()
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"face detection expects an RGB image [H, W, 3], got shape {image.shape}")
        in_w, in_h = self.det_size
        im_ratio = image.shape[0] / image.shape[1]
        if im_ratio > in_h / in_w:
            new_h = in_h
            new_w = int(new_h / im_ratio)
        else:
            new_w = in_w
            new_h = int(new_w * im_ratio)
        scale = new_h / image.shape[0]
        canvas = np.zeros((in_h, in_w, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(np.ascontiguousarray(image, np.uint8), (new_w, new_h))
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(blob)})
        n = len(self.strides)
        all_scores, all_boxes, all_kps = [], [], []
        for i, stride in enumerate(self.strides):
            # Some exports keep a leading batch axis ([1, N, C]); others are [N, C].
            scores, box_d, kps_d = (o[0] if o.ndim == 3 else o for o in (outs[i], outs[i + n], outs[i + 2 * n]))
            centers = self._anchor_centers(in_h // stride, in_w // stride, stride)
            if len(scores) != len(centers):
                raise FaceModelError(
                    f"{self.model_file}: stride {stride} output has {len(scores)} anchors, expected "
                    f"{len(centers)} for a {in_w}x{in_h} input"
                )
            pos = np.where(scores.reshape(-1) >= self.det_thresh)[0]
            box_d, kps_d = box_d * stride, kps_d * stride
            boxes = np.concatenate([centers - box_d[:, :2], centers + box_d[:, 2:4]], axis=1)
            kps = (np.tile(centers, (1, 5)) + kps_d).reshape(-1, 5, 2)
            all_scores.append(scores.reshape(-1)[pos])
            all_boxes.append(boxes[pos])
            all_kps.append(kps[pos])
        scores = np.concatenate(all_scores).astype(np.float32)
        if scores.size == 0:
            return Faces(np.zeros((0, 4), np.float32), scores, np.zeros((0, 5, 2), np.float32))
        order = np.argsort(-scores, kind="stable")
        dets = np.hstack([np.concatenate(all_boxes) / scale, scores[:, None]]).astype(np.float32)[order]
        kps = (np.concatenate(all_kps) / scale).astype(np.float32)[order]
        keep = _nms(dets, self.nms_thresh)
        return Faces(dets[keep, :4], dets[keep, 4], kps[keep])


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """[5, 2] landmarks -> the 2 x 3 similarity matrix onto the ArcFace template (insightface
    `estimate_norm`: Umeyama least squares with scale, as skimage's SimilarityTransform.estimate).

    The arithmetic follows insightface's exactly, float32 inputs included (the detector's landmarks and
    the float32 template: skimage then works partly in float32): the matrix differs from a float64
    solution by ~1e-4, enough for cv2.warpAffine to round some pixels differently."""
    if image_size % 112 == 0:
        dst = ARCFACE_TEMPLATE * (image_size / 112.0)
    elif image_size % 128 == 0:
        dst = ARCFACE_TEMPLATE * (image_size / 128.0)
        dst[:, 0] += 8.0 * image_size / 128.0
    else:
        raise ValueError(f"ArcFace alignment needs a crop size that is a multiple of 112 or 128, got {image_size}")
    src = np.asarray(landmarks, np.float32).reshape(5, 2)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_d, dst_d = src - src_mean, dst - dst_mean
    a = dst_d.T @ src_d / len(src)  # covariance (Umeyama eq. 38)
    d = np.ones((2,), np.float64)
    if np.linalg.det(a) < 0:  # reflection guard (eq. 39)
        d[1] = -1
    u, sv, vt = np.linalg.svd(a)
    rank = np.count_nonzero(sv > sv.max() * 2 * np.finfo(float).eps)
    if rank == 0:
        raise ValueError(f"degenerate face landmarks (all at one point): {src.tolist()}")
    r = np.eye(2)
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) <= 0:  # eq. 40 / 43
        r[:, :] = u @ np.diag([d[0], -1.0]) @ vt
    elif rank == 1:
        r[:, :] = u @ vt
    else:
        r[:, :] = u @ np.diag(d) @ vt
    scale = 1.0 / src_d.var(axis=0).sum() * (sv @ d)  # eq. 41-42
    m = np.zeros((2, 3))
    m[:, 2] = dst_mean - scale * (r @ src_mean.T)
    m[:, :2] = r * scale
    return m


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The aligned face crop [image_size, image_size, 3] (insightface face_align.norm_crop)."""
    m = estimate_norm(landmarks, image_size)
    return _cv2().warpAffine(np.ascontiguousarray(image), m, (image_size, image_size), borderValue=0.0)


def arcface_input(image, size: int, landmarks=None) -> np.ndarray:
    """A face image -> the ArcFace input [size, size, 3] uint8 RGB, without detection (PhotoMaker V2 training
    and the references of a trained run): with the face's 5 `landmarks` (in `image` pixels; a built dataset's
    `face_kps`), aligned as the build and Face-Sim align (`norm_crop` at 112, resized when the network takes
    another size); without them, `image` is taken as a face crop and resized (BICUBIC) to size x size (the
    demo / `data.format` datasets store only a face box, and a trained run's references are face crops)."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    pil = pil.convert("RGB")
    if landmarks is not None:
        aligned = norm_crop(np.asarray(pil), np.asarray(landmarks, np.float32), 112)
        if size == 112:
            return aligned
        pil = Image.fromarray(aligned)
    return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), np.uint8)
