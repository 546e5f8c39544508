"""Face Div.: the NNX LPIPS vs the lpips package (AlexNet, random weights), the
`weights_conversion lpips` command, and the per-(identity, prompt) pairwise LPIPS of face regions with "n/a"
(and its count) for a prompt with fewer than 2 images with a face."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lpips")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory):
    from persongen_jax.testing.torch_refs import lpips_model
    from weights_conversion.__main__ import main

    root = tmp_path_factory.mktemp("lpips")
    ref = lpips_model("alex", seed=0)
    torch.save(ref.state_dict(), root / "lpips_alex.pth")
    assert main(["lpips", str(root / "lpips_alex.pth"), str(root / "lpips")]) == 0
    return root, ref


def _lpips_ref(ref, a_uint8, b_uint8) -> np.ndarray:
    import lpips

    with torch.no_grad():
        return (
            ref(lpips.im2tensor(a_uint8), lpips.im2tensor(b_uint8)).reshape(-1).numpy()
            if a_uint8.ndim == 3
            else np.concatenate([_lpips_ref(ref, a, b) for a, b in zip(a_uint8, b_uint8)])
        )


def test_lpips_distances_match_the_lpips_package(lpips_dir):
    import jax.numpy as jnp

    from persongen_jax.models import modeling

    root, ref = lpips_dir
    model = modeling.from_pretrained(root / "lpips")
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (3, 72, 64, 3)).astype(np.uint8) for _ in range(2))
    from persongen_jax.evaluation.face_div import _lpips

    want = _lpips_ref(ref, a, b)
    np.testing.assert_allclose(np.asarray(_lpips(model, jnp.asarray(a), jnp.asarray(b))), want, atol=1e-4, rtol=0)
    assert np.ptp(want) > 1e-3


def test_face_div_per_prompt_with_na_counts(lpips_dir, tmp_path):
    from persongen_jax.evaluation import metrics
    from persongen_jax.testing.tiny_eval import make_tiny_detector

    root, ref = lpips_dir
    make_tiny_detector(tmp_path / "faces")
    (fd,) = metrics.build(["face_div"], {"lpips": root / "lpips", "face_detector": tmp_path / "faces", "batch_size": 2})
    rng = np.random.default_rng(1)
    face = lambda: rng.integers(60, 256, (64, 64, 3)).astype(np.uint8)  # noqa: E731  (the tiny detector: a face)
    black = np.zeros((64, 64, 3), np.uint8)  # no face
    images = [face(), face(), face(), face(), black, black, face()]
    groups = [("a", "alice", 0)] * 3 + [("a", "alice", 1)] * 2 + [("b", "bob", 0)] * 2
    fd.reset()
    fd.accumulate(images[:4], groups[:4])  # in chunks, as the evaluation scores
    fd.accumulate(images[4:], groups[4:])
    values = fd.set_values()

    crops = [fd.scorer.face_region(im) for im in images[:3]]
    assert crops[0].shape == (128, 128, 3) and fd.scorer.face_region(black) is None
    pairs = [(0, 1), (0, 2), (1, 2)]
    firsts, seconds = np.stack([crops[i] for i, _ in pairs]), np.stack([crops[j] for _, j in pairs])
    want = float(np.mean(_lpips_ref(ref, firsts, seconds)))
    assert values["a"]["face_div"] == pytest.approx(want, abs=1e-4)
    assert values["a"]["face_div_na"] == 1 and values["a"]["face_div_groups"] == 2
    assert values["a"]["face_div_na_groups"] == ["alice / prompt 1: 1 of 2 images with a face"]
    assert values["b"]["face_div"] is None  # one face in two images: n/a, never a number
    assert values["b"]["face_div_note"] == "n/a (1 of 1 prompts with < 2 face images)"
    assert values["all"]["face_div"] == pytest.approx(want, abs=1e-4) and values["all"]["face_div_na"] == 2

    from persongen_jax.evaluation import protocol

    summary = {"sets": {"a": {"n_images": 5}, "b": {"n_images": 2}}, "all": {"n_images": 7}}
    protocol.add_set_values(summary, [fd])
    assert summary["sets"]["b"]["face_div"] is None and "n/a" in summary["sets"]["b"]["face_div_note"]
    with pytest.raises(ValueError, match="metric face_div: .*Face Div. needs an LPIPS folder .* found ViTModel"):
        from persongen_jax.models import modeling
        from persongen_jax.models.vit import ViTModel

        vit = ViTModel.preset_config("tiny")
        modeling.save_pretrained(modeling.random_init(ViTModel, vit, 0), vit, tmp_path / "vit")
        metrics.build(["face_div"], {"lpips": tmp_path / "vit", "face_detector": tmp_path / "faces"})
