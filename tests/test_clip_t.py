"""CLIP-T in JAX vs the PyTorch computation (transformers CLIPModel + CLIPImageProcessor)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import helpers  # noqa: E402

from persongen_jax.testing.tiny_eval import feature_extractor_config  # noqa: E402

PROMPTS = [
    "a photo of a man wearing a red hat",
    "a woman in the city",
    "a portrait of a person smiling",
    "a boy",
    "a photo of a girl looking at the camera",
]


# The model folder's image preprocessing (not transformers' defaults at the model's size, 32): resize the
# shortest edge to 40, crop 32, other mean / std and filter. OpenAI's legacy int form, as on the hub.
PREPROCESSOR = feature_extractor_config(
    "CLIPFeatureExtractor", 40, [0.3, 0.5, 0.7], [0.2, 0.3, 0.25], 2, crop_size=32, do_center_crop=True
)


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    import json

    from persongen_jax.testing.tiny_eval import make_tiny_clip

    helpers.torch_precise()
    root = tmp_path_factory.mktemp("clip_t")
    model = make_tiny_clip(root / "dst", source=root / "src", convert=False)
    (root / "src" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    helpers.run_cli("clip", root / "src", root / "dst")  # converted through the CLI
    return root, model


def _reference_scores(root, model, images, prompts, proc) -> np.ndarray:
    """transformers: CLIPModel image / text features of `proc`'s pixels, 100 * cosine."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(root / "src")
    with torch.no_grad():
        pix = torch.from_numpy(proc(images, return_tensors="np").pixel_values)
        ids = torch.from_numpy(tok(prompts, padding="max_length", max_length=77, return_tensors="np").input_ids)
        img = model.get_image_features(pixel_values=pix)
        txt = model.get_text_features(input_ids=ids)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return 100 * torch.nn.functional.cosine_similarity(img, txt).numpy()


def test_clip_t_matches_pytorch(clip_dirs):
    """With the folder's preprocessor_config.json (carried over by the converter) and, on a scorer built
    without one, transformers' defaults at the model's image size."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from persongen_jax.evaluation.clip_t import CLIPTScorer

    root, model = clip_dirs
    carried = root / "dst" / "preprocessor_config.json"
    assert carried.read_text() == (root / "src" / "preprocessor_config.json").read_text()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3)).astype(np.uint8)) for i in range(5)]
    scorer = CLIPTScorer.from_pretrained(root / "dst", batch_size=4)  # 2 batches, padded, sharded on 4 devices
    ref = _reference_scores(root, model, images, PROMPTS, CLIPImageProcessorPil.from_pretrained(root / "src"))
    np.testing.assert_allclose(scorer(images, PROMPTS), ref, atol=1e-3, rtol=0)
    assert scorer.batch_size % len(scorer.batches.mesh.devices.flat) == 0

    default = CLIPTScorer(scorer.model, scorer.tokenizer, batch_size=4)  # no processor config: today's values
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref_default = _reference_scores(root, model, images, PROMPTS, proc)
    np.testing.assert_allclose(default(images, PROMPTS), ref_default, atol=1e-3, rtol=0)
    assert np.abs(ref_default - ref).max() > 0.1  # the folder's preprocessing does change the scores


def test_clip_t_of_transparent_images_matches_pytorch(clip_dirs):
    """RGBA / LA / palette PNGs with transparency: composited onto white as transformers does."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from persongen_jax.evaluation.clip_t import CLIPTScorer

    root, model = clip_dirs
    rgba = np.random.default_rng(3).integers(0, 256, (48, 40, 4)).astype(np.uint8)
    rgba[:24, :, 3] = 0  # the top half transparent, its hidden colours random
    images = [Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., [0, 3]], "LA"), rgba]
    scorer = CLIPTScorer.from_pretrained(root / "dst", batch_size=4)
    ref = _reference_scores(root, model, images, PROMPTS[:3], CLIPImageProcessorPil.from_pretrained(root / "src"))
    np.testing.assert_allclose(scorer(images, PROMPTS[:3]), ref, atol=1e-3, rtol=0)


def test_clip_t_errors(clip_dirs, tmp_path):
    from persongen_jax.evaluation.clip_t import CLIPTScorer

    root, _ = clip_dirs
    scorer = CLIPTScorer.from_pretrained(root / "dst")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer([np.zeros((8, 8, 3), np.uint8)] * 2, ["a"])
    from persongen_jax.pipeline.image_processing import CLIPImageProcessor

    with pytest.raises(ValueError, match="gives 24x24 images; the CLIP vision model takes 32x32"):
        CLIPTScorer(scorer.model, scorer.tokenizer, image_processor=CLIPImageProcessor.at_size(24))


def test_clip_i_matches_pytorch(clip_dirs):
    """CLIP-I through the metric registry (sharing CLIP-T's model) vs transformers: 100 x the mean over the
    references of the cosine of `get_image_features`, the folder's preprocessing, within 1e-3 score units."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from persongen_jax.evaluation import metrics

    root, model = clip_dirs
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (40 + 5 * i, 44, 3)).astype(np.uint8)) for i in range(3)]
    refs = [Image.fromarray(rng.integers(0, 256, (50, 40 + 3 * i, 3)).astype(np.uint8)) for i in range(2)]
    clip_t, clip_i = metrics.build(["clip_t", "clip_i"], {"clip": root / "dst", "batch_size": 2})
    assert clip_i.scorer is clip_t.scorer  # one CLIP in memory for both metrics
    prepared = clip_i.prepare_references(refs, ["r0", "r1"])
    got = clip_i(images, PROMPTS[:3], [prepared] * 3).values

    proc = CLIPImageProcessorPil.from_pretrained(root / "src")
    with torch.no_grad():
        feats = model.get_image_features(
            pixel_values=torch.from_numpy(proc(images + refs, return_tensors="np").pixel_values)
        )
        feats = torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1)
    ref = 100 * (feats[:3] @ feats[3:].T).mean(dim=1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    assert np.ptp(ref) > 0.1  # the images score differently: a constant would not pass
