"""`weights_conversion sdxl` on a whole (tiny, random) diffusers SDXL folder."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import helpers  # noqa: E402


@pytest.fixture(scope="module")
def sdxl_src(tmp_path_factory):
    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "src")


def test_whole_pipeline_folder_with_verify(sdxl_src, tmp_path):
    from transformers import CLIPTokenizer

    from persongen_jax.models import (
        AutoencoderKL,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        UNet2DConditionModel,
        from_pretrained,
    )

    dst = tmp_path / "sdxl"
    proc = helpers.run_cli("sdxl", sdxl_src, dst, "--verify")
    # --verify prints one line per component with the max abs difference of each output.
    diffs = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+) max\|diff\|=([0-9.e+-]+)", proc.stdout)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("verify ")]
    assert len(lines) == 4, proc.stdout
    assert diffs and max(diffs.values()) < 1e-4, proc.stdout
    expected = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    for name, cls in expected.items():
        cfg = json.loads((dst / name / "config.json").read_text())
        assert cfg["_persongen_class"] == cls.__name__
    assert isinstance(from_pretrained(dst / "text_encoder_2"), CLIPTextModelWithProjection)
    assert (dst / "model_index.json").read_text() == (sdxl_src / "model_index.json").read_text()
    for tok in ("tokenizer", "tokenizer_2"):
        a = CLIPTokenizer.from_pretrained(sdxl_src / tok)("a photo of a man img")
        b = CLIPTokenizer.from_pretrained(dst / tok)("a photo of a man img")
        assert a.input_ids == b.input_ids
    assert (dst / "scheduler" / "scheduler_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_single_component_folders(sdxl_src, tmp_path):
    from persongen_jax.models import UNet2DConditionModel, from_pretrained

    # A folder holding just unet/ ...
    only_unet = tmp_path / "only_unet"
    shutil.copytree(sdxl_src / "unet", only_unet / "unet")
    helpers.run_cli("sdxl", only_unet, tmp_path / "out1")
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == ["unet"]
    # ... and the component folder itself.
    helpers.run_cli("sdxl", sdxl_src / "unet", tmp_path / "out2")
    a = from_pretrained(tmp_path / "out1" / "unet")
    b = from_pretrained(tmp_path / "out2")
    assert isinstance(b, UNet2DConditionModel)
    ka = a.conv_in.kernel[...]
    np.testing.assert_array_equal(np.asarray(ka), np.asarray(b.conv_in.kernel[...]))


def test_fp16_variant_and_missing_weights(sdxl_src, tmp_path):
    """`--variant fp16` picks *.fp16.safetensors; without it the error says what to pass."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(sdxl_src / "vae", src / "vae")
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    save_file(
        {k: v.half() for k, v in load_file(weights).items()}, src / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    )
    weights.unlink()
    proc = helpers.run_cli("sdxl", src, tmp_path / "no", check=False)
    assert proc.returncode == 1 and "--variant fp16" in proc.stderr and "no weights found" in proc.stderr
    helpers.run_cli("sdxl", src, tmp_path / "yes", "--variant", "fp16")
    from persongen_jax.models import from_pretrained

    vae = from_pretrained(tmp_path / "yes" / "vae")
    assert vae.quant_conv.kernel[...].dtype == np.float16
    del torch


def test_not_an_sdxl_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = helpers.run_cli("sdxl", tmp_path / "empty", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "no SDXL components found" in proc.stderr
    proc = helpers.run_cli("sdxl", tmp_path / "nope", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "no such folder" in proc.stderr


def test_tiny_tokenizer_words_are_single_tokens(tmp_path):
    """The tiny vocabulary's whole words (class words, the trigger word) are one token each."""
    from transformers import CLIPTokenizer

    from persongen_jax.testing.tiny_sdxl import VOCAB_SIZE, WORDS, write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path / "tok")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert [w for w in WORDS if len(tok(w).input_ids) != 3] == []
    assert tok.eos_token_id == VOCAB_SIZE - 1  # legacy argmax pooling needs EOS to be the largest id
