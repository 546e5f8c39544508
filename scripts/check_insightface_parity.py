"""Face-Sim path vs the insightface package itself: detection, alignment, ArcFace embedding, similarity.

    pip install insightface==2.1 scikit-image    # not a project dependency (it pulls opencv-python + GUI libs)
    python scripts/check_insightface_parity.py [--onnx-detector DIR_OR_FILE] [--arcface-onnx FILE]

Without arguments the models are made here: a random network with SCRFD's exact head layout and a
dynamic input size (`testing.tiny_eval.make_random_scrfd`: hundreds of overlapping candidates per
image, so thresholding, ordering, NMS and rescaling are all exercised) and a random IResNet ONNX file
(converted with `weights_conversion arcface`). With real files (antelopev2 / buffalo_l) it checks those.

Compared on random images of several sizes and aspect ratios (insightface reads BGR, we RGB):
  detections: insightface SCRFD.detect(input_size=(640, 640))  vs  evaluation.faces.FaceDetector.detect
  crops:      insightface face_align.norm_crop                  vs  evaluation.faces.norm_crop
  embeddings: insightface ArcFaceONNX.get_feat (onnxruntime)    vs  our JAX IResNet (FaceSimScorer)
  Face-Sim:   insightface compute_sim of the largest faces     vs  FaceSimScorer
Exits 1 if anything differs beyond tolerance.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx-detector", type=Path, help="an insightface model folder or SCRFD .onnx")
    p.add_argument("--arcface-onnx", type=Path, help="an insightface recognition .onnx (w600k_r50, glintr100)")
    p.add_argument("--images", type=int, default=6)
    args = p.parse_args()
    try:
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX
        from insightface.model_zoo.scrfd import SCRFD
        from insightface.utils import face_align
    except ImportError as e:
        print(f"insightface is not installed ({e}); pip install insightface==2.1 scikit-image", file=sys.stderr)
        return 2
    import onnxruntime as ort

    from persongen_jax.evaluation.face_sim import FaceSimScorer
    from persongen_jax.evaluation.faces import FaceDetector, find_detector_file, norm_crop
    from persongen_jax.models import modeling
    from persongen_jax.testing import tiny_eval
    from weights_conversion.onnx_arcface import convert_arcface

    tmp = Path(tempfile.mkdtemp(prefix="insightface_parity_"))
    det_file = find_detector_file(args.onnx_detector) if args.onnx_detector else tiny_eval.make_random_scrfd(tmp)
    rec_file = args.arcface_onnx or tiny_eval.make_arcface_onnx(tmp / "arcface.onnx", **tiny_eval.TINY_ARCFACE)
    convert_arcface(rec_file, tmp / "arcface")

    cpu = ["CPUExecutionProvider"]
    theirs = SCRFD(model_file=str(det_file), session=ort.InferenceSession(str(det_file), providers=cpu))
    theirs.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    rec = ArcFaceONNX(model_file=str(rec_file), session=ort.InferenceSession(str(rec_file), providers=cpu))
    ours = FaceDetector(det_file, det_size=(640, 640), det_thresh=0.5, providers=cpu)
    scorer = FaceSimScorer(ours, modeling.from_pretrained(tmp / "arcface"), batch_size=8)

    rng = np.random.default_rng(0)
    worst = {"boxes": 0.0, "kps": 0.0, "scores": 0.0, "crop": 0, "embedding": 0.0, "face_sim": 0.0}
    n_faces, ok = 0, True
    images = []
    for i in range(args.images):
        h, w = [(480, 640), (640, 480), (300, 300), (720, 1280), (250, 400), (1024, 1024)][i % 6]
        # Smooth random blobs (not pixel noise): resizing changes them little, like photos.
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        import cv2

        rgb = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        images.append(rgb)
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        det_t, kps_t = theirs.detect(bgr, input_size=(640, 640))
        faces = ours.detect(rgb)
        if len(faces) != len(det_t):
            print(f"image {i} ({h}x{w}): {len(faces)} faces vs insightface {len(det_t)}")
            ok = False
            continue
        n_faces += len(faces)
        if not len(faces):
            continue
        worst["boxes"] = max(worst["boxes"], float(np.abs(faces.boxes - det_t[:, :4]).max()))
        worst["scores"] = max(worst["scores"], float(np.abs(faces.scores - det_t[:, 4]).max()))
        worst["kps"] = max(worst["kps"], float(np.abs(faces.kps - kps_t).max()))
        for k in range(min(len(faces), 5)):
            c_ours = norm_crop(rgb, faces.kps[k])
            c_theirs = face_align.norm_crop(bgr, landmark=kps_t[k])[..., ::-1]
            worst["crop"] = max(worst["crop"], int(np.abs(c_ours.astype(int) - c_theirs.astype(int)).max()))
        # Embedding of the largest face (our selection) both ways.
        j = faces.largest()
        e_theirs = rec.get_feat(face_align.norm_crop(bgr, landmark=kps_t[j])).ravel()
        e_theirs = e_theirs / np.linalg.norm(e_theirs)
        e_ours, found = scorer.embed([rgb])
        worst["embedding"] = max(worst["embedding"], float(np.abs(e_ours[0] - e_theirs).max()))
        if i:  # Face-Sim against the previous image, both ways
            prev = images[i - 1]
            d_prev, k_prev = theirs.detect(np.ascontiguousarray(prev[..., ::-1]), input_size=(640, 640))
            if len(d_prev):
                a = (d_prev[:, 2] - d_prev[:, 0]) * (d_prev[:, 3] - d_prev[:, 1])
                f_prev = rec.get_feat(
                    face_align.norm_crop(np.ascontiguousarray(prev[..., ::-1]), landmark=k_prev[int(np.argmax(a))])
                ).ravel()
                sim_theirs = rec.compute_sim(e_theirs, f_prev)
                ref = scorer.reference_embeddings([prev])
                sim_ours = scorer.scores(e_ours, found, [ref])[0]
                worst["face_sim"] = max(worst["face_sim"], abs(sim_ours - float(sim_theirs)))
    tol = {"boxes": 1e-3, "kps": 1e-3, "scores": 1e-6, "crop": 0, "embedding": 1e-4, "face_sim": 1e-4}
    for k, v in worst.items():
        good = v <= tol[k]
        ok &= good
        print(f"  {k:10s} max abs diff {v:.3g} (tolerance {tol[k]:g}) {'OK' if good else 'ABOVE'}")
    print(
        f"{args.images} images, {n_faces} detections; detector {det_file.name}, recognition {Path(rec_file).name}: "
        f"{'MATCH' if ok else 'MISMATCH'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
