"""Face-Sim: SCRFD decoding + ArcFace alignment + batched JAX ArcFace embeddings.

The detector folder is built by the test (`testing.tiny_eval.make_tiny_detector`: insightface's SCRFD
output layout, one known face per non-dark image); the ArcFace model is a random IResNet exported to
ONNX and converted by `weights_conversion arcface`.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def face_models(tmp_path_factory):
    from persongen_jax.testing.tiny_eval import make_tiny_arcface, make_tiny_detector

    root = tmp_path_factory.mktemp("faces")
    make_tiny_detector(root / "det")
    make_tiny_arcface(root / "arcface")
    return root


def _image(seed, h=96, w=96):
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, (h, w, 3)).astype(np.uint8)


def test_detector_decodes_boxes_and_landmarks_in_image_pixels(face_models):
    from persongen_jax.evaluation.faces import FaceDetector, FaceModelError, find_detector_file
    from persongen_jax.testing.tiny_eval import detector_face

    det = FaceDetector.from_folder(face_models / "det")
    assert det.det_size == (64, 64)  # the file's fixed input size wins over the default 640
    box, kps = detector_face(64)
    # 128 x 96 (h x w): resized to 64 x 48 (scale 0.5) and padded on the right.
    faces = det.detect(_image(0, 128, 96))
    assert len(faces) == 1 and faces.scores[0] > 0.99
    np.testing.assert_allclose(faces.boxes[0], box / 0.5, atol=1e-4)
    np.testing.assert_allclose(faces.kps[0], kps / 0.5, atol=1e-4)
    # A black image: the detector's score is ~0 -> no face.
    assert len(det.detect(np.zeros((64, 64, 3), np.uint8))) == 0
    with pytest.raises(FaceModelError, match="no SCRFD face detector"):
        find_detector_file(face_models)  # arcface.onnx only (1 output), det/ is a sub-folder
    with pytest.raises(ValueError, match=r"RGB image \[H, W, 3\]"):
        det.detect(np.zeros((64, 64), np.uint8))


def test_nms_keeps_best_of_overlapping_boxes():
    from persongen_jax.evaluation.faces import _nms

    dets = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [50, 50, 60, 60, 0.7]], np.float32)
    assert _nms(dets, 0.4) == [0, 2]


def test_many_overlapping_detections_nms_and_face_selection(tmp_path):
    """A random network with SCRFD's head layout and a dynamic input size: hundreds of candidates.
    (Bitwise agreement with insightface's own SCRFD / norm_crop: scripts/check_insightface_parity.py.)"""
    from persongen_jax.evaluation.faces import FaceDetector
    from persongen_jax.testing.tiny_eval import make_random_scrfd

    det = FaceDetector.from_folder(make_random_scrfd(tmp_path).parent, det_size=(320, 320))
    assert det.det_size == (320, 320)  # dynamic input: the requested size
    faces = det.detect(_image(0, 200, 300))
    assert len(faces) > 10
    assert np.all(np.diff(faces.scores) <= 0) and faces.scores.min() >= 0.5
    b = faces.boxes
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    for i in range(len(b)):  # no kept pair overlaps more than nms_thresh (insightface's +1 pixel areas)
        w = np.clip(np.minimum(b[i, 2], b[:, 2]) - np.maximum(b[i, 0], b[:, 0]) + 1, 0, None)
        h = np.clip(np.minimum(b[i, 3], b[:, 3]) - np.maximum(b[i, 1], b[:, 1]) + 1, 0, None)
        iou = w * h / (area[i] + area - w * h)
        iou[i] = 0
        assert iou.max() <= 0.4 + 1e-6
    assert faces.select("score") == 0 and faces.select("largest") == int(np.argmax(area))
    det.det_thresh = 1.01
    assert len(det.detect(_image(0, 200, 300))) == 0


def test_alignment_recovers_a_similarity_transform():
    from persongen_jax.evaluation.faces import ARCFACE_TEMPLATE, estimate_norm, norm_crop

    ang, scale, shift = np.deg2rad(25.0), 2.3, np.array([40.0, -7.0])
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    lmk = (ARCFACE_TEMPLATE @ rot.T) * scale + shift  # the template moved into a bigger, rotated image
    m = estimate_norm(lmk)
    np.testing.assert_allclose(np.c_[lmk, np.ones(5)] @ m.T, ARCFACE_TEMPLATE, atol=1e-4)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    np.testing.assert_allclose(inv[:2, :2], scale * rot, atol=1e-5)  # float32 landmarks, as insightface
    img = _image(1, 400, 400)
    crop = norm_crop(img, lmk)
    assert crop.shape == (112, 112, 3)
    np.testing.assert_array_equal(crop, cv2.warpAffine(img, m, (112, 112), borderValue=0.0))
    with pytest.raises(ValueError, match="multiple of 112 or 128"):
        estimate_norm(lmk, 100)


def test_face_sim_of_an_image_with_itself_is_one(face_models, tmp_path):
    from PIL import Image

    from persongen_jax.evaluation.face_sim import FaceSimScorer, NoFaceError

    scorer = FaceSimScorer.from_pretrained(face_models / "det", face_models / "arcface", batch_size=3)
    assert scorer.batches.batch_size == 4  # rounded up to the 4 fake devices
    imgs = [_image(s, 96 + 16 * s, 96) for s in range(5)]
    ref_path = tmp_path / "ref.png"
    Image.fromarray(imgs[0]).save(ref_path)
    ref = scorer.reference_embeddings([ref_path])
    assert ref.shape == (1, 16)
    black = np.zeros((80, 80, 3), np.uint8)
    scores, found = scorer(imgs + [black], [ref] * 6)  # 6 images: 2 batches, the last one padded
    assert found.tolist() == [True] * 5 + [False]
    assert abs(scores[0] - 1.0) < 1e-5, scores[0]
    assert all(s < 0.9999 for s in scores[1:5]), scores  # other images, other faces
    assert scores[5] == 0.0  # the research convention: no face scores 0

    skip = FaceSimScorer(scorer.detector, scorer.arcface, no_face="skip")
    s2, _ = skip(imgs[:1] + [black], [ref] * 2)
    assert abs(s2[0] - 1.0) < 1e-5 and s2[1] is None

    black_path = tmp_path / "black.png"
    Image.fromarray(black).save(black_path)
    with pytest.raises(NoFaceError, match="black.png"):
        scorer.reference_embeddings([ref_path, black_path])
    with pytest.raises(ValueError, match="no_face='drop'"):
        FaceSimScorer(scorer.detector, scorer.arcface, no_face="drop")


def test_batched_embeddings_match_onnxruntime(face_models):
    from persongen_jax.evaluation.face_sim import FaceSimScorer

    scorer = FaceSimScorer.from_pretrained(face_models / "det", face_models / "arcface", batch_size=4)
    crops = np.random.default_rng(2).integers(0, 256, (6, 112, 112, 3)).astype(np.uint8)
    sess = ort.InferenceSession(str(face_models / "arcface.onnx"), providers=["CPUExecutionProvider"])
    x = ((crops.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    np.testing.assert_allclose(scorer.embed_crops(crops), ref, atol=1e-4, rtol=0)


def test_face_sim_without_the_onnx_package(face_models, tmp_path, monkeypatch):
    """The base install has onnxruntime but not `onnx` (the [torch] extra): finding the detector in a
    model folder and scoring work with `import onnx` blocked."""
    import shutil
    import sys

    from PIL import Image

    from persongen_jax.evaluation.face_sim import FaceSimScorer
    from persongen_jax.evaluation.faces import FaceModelError, find_detector_file

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    with pytest.raises(ImportError):
        import onnx  # noqa: F401
    # An insightface-like folder: a recognition file with a detector-looking name is looked at first.
    folder = tmp_path / "antelope"
    folder.mkdir()
    shutil.copy(face_models / "arcface.onnx", folder / "2d106det.onnx")
    shutil.copy(face_models / "det" / "det_tiny.onnx", folder / "scrfd_tiny.onnx")
    assert find_detector_file(folder) == folder / "scrfd_tiny.onnx"
    scorer = FaceSimScorer.from_pretrained(folder, face_models / "arcface")
    ref_path = tmp_path / "ref.png"
    Image.fromarray(_image(0)).save(ref_path)
    scores, found = scorer([_image(0), _image(1)], [scorer.reference_embeddings([ref_path])] * 2)
    assert found.all() and abs(scores[0] - 1.0) < 1e-5
    (folder / "scrfd_tiny.onnx").unlink()
    with pytest.raises(FaceModelError, match="no SCRFD face detector among"):
        find_detector_file(folder)
    (folder / "det_broken.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(FaceModelError, match="det_broken.onnx: not a readable ONNX file"):
        find_detector_file(folder)


def test_transparent_images_are_composited_on_white_for_detection(face_models, tmp_path):
    """A cut-out PNG (transparent background whose hidden colours are black): the detector sees it on
    white, as CLIP-T does -- the picture a viewer sees -- not the black that dropping alpha (cv2.imread,
    PIL .convert("RGB")) would show it."""
    from PIL import Image

    from persongen_jax.evaluation.face_sim import FaceSimScorer
    from persongen_jax.pipeline.image_processing import convert_to_rgb

    scorer = FaceSimScorer.from_pretrained(face_models / "det", face_models / "arcface")
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[24:72, 24:72] = np.concatenate([_image(2, 48, 48), np.full((48, 48, 1), 255, np.uint8)], axis=-1)
    rgba[20:24, 20:76, 3] = 128  # a half-transparent band
    on_white = convert_to_rgb(rgba)
    assert len(scorer.detector.detect(rgba[..., :3])) == 0  # alpha dropped: mostly black, no face
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    crops, found = scorer.align([rgba, Image.open(path), path, on_white])
    assert found.all()
    for crop in crops[:3]:
        np.testing.assert_array_equal(crop, crops[3])
    ref = scorer.reference_embeddings([path])  # references too
    np.testing.assert_allclose(ref, scorer.reference_embeddings([on_white]), atol=0)
