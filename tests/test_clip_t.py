"""CLIP-T in JAX vs the PyTorch computation (transformers CLIPModel + CLIPImageProcessor)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import helpers  # noqa: E402

PROMPTS = ["a photo of a man wearing a red hat", "a woman in the city", "a portrait of a person smiling",
           "a boy", "a photo of a girl looking at the camera"]


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    from persongen_jax.testing.tiny_eval import make_tiny_clip

    helpers.torch_precise()
    root = tmp_path_factory.mktemp("clip_t")
    model = make_tiny_clip(root / "dst", source=root / "src", convert=False)
    helpers.run_cli("clip", root / "src", root / "dst")  # converted through the CLI
    return root, model


def test_clip_t_matches_pytorch(clip_dirs):
    from transformers import CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from persongen_jax.evaluation.clip_t import CLIPTScorer

    root, model = clip_dirs
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3)).astype(np.uint8)) for i in range(5)]
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tok = CLIPTokenizer.from_pretrained(root / "src")
    with torch.no_grad():
        pix = torch.from_numpy(proc(images, return_tensors="np").pixel_values)
        ids = torch.from_numpy(tok(PROMPTS, padding="max_length", max_length=77, return_tensors="np").input_ids)
        img = model.get_image_features(pixel_values=pix)
        txt = model.get_text_features(input_ids=ids)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        ref = 100 * torch.nn.functional.cosine_similarity(img, txt).numpy()

    scorer = CLIPTScorer.from_pretrained(root / "dst", batch_size=4)  # 2 batches, padded, sharded on 4 devices
    ours = scorer(images, PROMPTS)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
    assert scorer.batch_size % len(scorer.batches.mesh.devices.flat) == 0


def test_clip_t_errors(clip_dirs, tmp_path):
    from persongen_jax.evaluation.clip_t import CLIPTScorer

    root, _ = clip_dirs
    scorer = CLIPTScorer.from_pretrained(root / "dst")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer([np.zeros((8, 8, 3), np.uint8)] * 2, ["a"])
