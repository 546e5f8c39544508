"""DINO metric: the NNX ViT vs transformers ViTModel, the folder's ViTImageProcessor preprocessing, the
`weights_conversion dino` command (strict, --verify, copied preprocessor_config.json) and the registered metric."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import helpers  # noqa: E402

from persongen_jax.testing.tiny_eval import feature_extractor_config, transformer_sizes  # noqa: E402

# A small size unlike transformers' defaults: odd width/heads, no q/k/v bias, eps 1e-6, 40 px / 8 px patches.
SMALL = dict(
    transformer_sizes(hidden=48, mlp=80, layers=2, heads=3),
    image_size=40,
    patch_size=8,
    layer_norm_eps=1e-6,
    qkv_bias=False,
    hidden_act="gelu",
)
# DINO's own preprocessing differs from ViTImageProcessor's defaults (ImageNet mean / std); a 3rd filter here.
PREPROCESSOR = feature_extractor_config("ViTFeatureExtractor", 40, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 3)


def _torch_vit(config: dict, seed: int):
    helpers.torch_precise()
    model = transformers.ViTModel(transformers.ViTConfig(**config), add_pooling_layer=True).eval()
    g = helpers.randomize_(model, seed)
    with torch.no_grad():  # N(0, 1) CLS token and positions: they must matter
        for p in (model.embeddings.cls_token, model.embeddings.position_embeddings):
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def _cls(model, pixel_values: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixel_values)).last_hidden_state[:, 0].numpy()


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def dino_dirs(tmp_path_factory):
    from weights_conversion.__main__ import main

    root = tmp_path_factory.mktemp("dino")
    model = _torch_vit(SMALL, seed=1)
    model.save_pretrained(root / "src")  # with the pooler: the converter drops it
    (root / "src" / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    # In-process (the CLI's main): a subprocess could not import transformers' ViTModel (torchvision shim).
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["dino", str(root / "src"), str(root / "dst"), "--verify"]) == 0
    return root, model, out.getvalue()


def test_dino_embeddings_and_scores_match_pytorch(dino_dirs):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from persongen_jax.evaluation import metrics

    root, model, printed = dino_dirs
    diff = float(printed.split("verify dst: last_hidden_state max|diff|=")[1].split()[0])
    assert diff < 1e-4
    assert (root / "dst" / "preprocessor_config.json").read_text() == json.dumps(PREPROCESSOR)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (36 + 9 * i, 50, 3)).astype(np.uint8)) for i in range(3)]
    refs = [Image.fromarray(rng.integers(0, 256, (60, 44, 3)).astype(np.uint8)) for _ in range(2)]
    (dino,) = metrics.build(["dino"], {"dino": root / "dst", "batch_size": 2})  # padded, sharded batches

    proc = ViTImageProcessorPil.from_pretrained(root / "src")
    pix = proc(images + refs, return_tensors="np").pixel_values
    ours_pix = np.stack([dino.scorer.image_processor(im) for im in images + refs])
    np.testing.assert_allclose(ours_pix, pix.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
    ref = _cls(model, pix)
    ours = dino.scorer.embeddings(images + refs)
    unit = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    assert _rel(ours, unit) < 1e-4

    got = dino(images, ["p"] * 3, [dino.prepare_references(refs, ["a", "b"])] * 3).values
    want = 100 * (unit[:3] @ unit[3:].T).mean(axis=1)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)
    assert np.ptp(want) > 0.1


def test_vit_matches_pytorch_at_dino_vits16_shape():
    """ViT-S/16 (facebook/dino-vits16's config.json): 12 layers, 384 wide, 6 heads, 224 px, eps 1e-6."""
    import jax.numpy as jnp
    from flax import nnx

    from persongen_jax.models.vit import DINO_VITS16, ViTModel
    from weights_conversion.core import load_from_torch_state_dict

    config = {k: v for k, v in DINO_VITS16.items() if k not in ("architectures", "model_type")}
    model = _torch_vit(config, seed=2)
    ours = load_from_torch_state_dict(ViTModel, DINO_VITS16, model.state_dict())  # hub layout + pooler in
    pix = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda m, x: m(x).cls)(ours, jnp.asarray(pix.transpose(0, 2, 3, 1))))
    assert _rel(got, _cls(model, pix)) < 1e-4


def test_dino_conversion_and_loading_errors(dino_dirs, tmp_path, capsys):
    from persongen_jax.evaluation import metrics
    from persongen_jax.models.vit import parse_vit_config
    from weights_conversion.__main__ import main

    root, model, _ = dino_dirs
    # A CLIP folder is not a DINO source.
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"]}))
    assert main(["dino", str(tmp_path / "clip"), str(tmp_path / "x")]) == 1
    assert "model class 'CLIPModel' is not supported; expected one of ViTModel" in capsys.readouterr().err
    # Strict: a missing tensor is named, nothing is written.
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    sd = load_file(bad / "model.safetensors")
    del sd["encoder.layer.1.output.dense.weight"]
    save_file(sd, bad / "model.safetensors")
    assert main(["dino", str(bad), str(tmp_path / "y")]) == 1
    assert "missing keys (1): layers.1.mlp.fc2.weight" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    # A converted folder of another kind given as --dino.
    (arc := tmp_path / "arc").mkdir()
    from persongen_jax.testing.tiny_eval import make_tiny_arcface

    make_tiny_arcface(arc / "m")
    with pytest.raises(ValueError, match=r"arc/m: DINO needs a ViT folder .* found IResNet"):
        metrics.build(["dino"], {"dino": arc / "m"})
    with pytest.raises(ValueError, match="scoring options missing: dino needs dino"):
        metrics.build(["dino"], {})
    with pytest.raises(ValueError, match="patch_size=7 does not divide image_size=40"):
        parse_vit_config({**SMALL, "patch_size": 7})
