"""The conversion CLI's strictness: wrong checkpoints fail loudly, naming the key/file, and
nothing is written to DST unless conversion succeeded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from helpers import randomize_, run_cli  # noqa: E402

TINY_TEXT = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=20, hidden_act="quick_gelu",
                 projection_dim=8)


@pytest.fixture(scope="module")
def text_src(tmp_path_factory):
    """A tiny transformers CLIPTextModelWithProjection saved with save_pretrained."""
    src = tmp_path_factory.mktemp("clip_src")
    cfg = transformers.CLIPTextConfig(**TINY_TEXT)
    model = transformers.CLIPTextModelWithProjection(cfg).eval()
    randomize_(model, seed=1)
    model.save_pretrained(src)
    return src


def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})
    return dst


def _fails(proc, *needles):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    for n in needles:
        assert n in proc.stderr, f"{n!r} not in:\n{proc.stderr}"


def test_converts_and_writes_loadable_folder(text_src, tmp_path):
    from persongen_jax.models import from_pretrained

    # The image preprocessing files go along (CLIP-T reads them from the converted folder): the image
    # processor's own file and transformers 5's processor file.
    src = shutil.copytree(text_src, tmp_path / "src")
    (src / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224, "size": 224}))
    (src / "processor_config.json").write_text(json.dumps({"image_processor": {"size": {"shortest_edge": 336}}}))
    dst = tmp_path / "out"
    proc = run_cli("clip", src, dst)
    assert "converted CLIPTextModelWithProjection" in proc.stdout
    for name in ("preprocessor_config.json", "processor_config.json"):
        assert (dst / name).read_text() == (src / name).read_text()
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["_persongen_class"] == "CLIPTextModelWithProjection"
    model = from_pretrained(dst)
    ids = np.array([[0, 5, 6, 7, 98]], np.int32)
    assert model(ids).text_embeds.shape == (1, 8)


def test_missing_key(text_src, tmp_path):
    src = _copy_with(text_src, tmp_path / "src", lambda sd: sd.pop("text_model.final_layer_norm.bias"))
    dst = tmp_path / "out"
    proc = run_cli("clip", src, dst, check=False)
    _fails(proc, "missing keys", "text_model.final_layer_norm.bias", str(src / "model.safetensors"))
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_unexpected_key(text_src, tmp_path):
    def add(sd):
        sd["text_model.encoder.layers.9.mlp.fc1.weight"] = torch.zeros(32, 16)

    src = _copy_with(text_src, tmp_path / "src", add)
    proc = run_cli("clip", src, tmp_path / "out", check=False)
    _fails(proc, "unexpected keys", "text_model.encoder.layers.9.mlp.fc1.weight")
    assert not (tmp_path / "out").exists()


def test_wrong_shape(text_src, tmp_path):
    def bad(sd):
        sd["text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 15)

    src = _copy_with(text_src, tmp_path / "src", bad)
    proc = run_cli("clip", src, tmp_path / "out", check=False)
    _fails(proc, "shape mismatches", "text_model.encoder.layers.0.self_attn.q_proj.weight", "(16, 15)")
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(text_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(text_src, src)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    proc = run_cli("clip", src, tmp_path / "out", check=False)
    _fails(proc, str(path), "truncated")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_bin(text_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(text_src, src)
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    path = src / "pytorch_model.bin"
    torch.save(sd, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    proc = run_cli("clip", src, tmp_path / "out", check=False)
    _fails(proc, str(path), "cannot read PyTorch checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bin_and_half_precision_sources(text_src, tmp_path):
    """.bin files and fp16/bf16 sources convert; --dtype sets the stored dtype."""
    from persongen_jax.models import from_pretrained
    import jax.numpy as jnp

    ref = from_pretrained(_convert(run_cli, "clip", text_src, tmp_path / "ref"))
    ids = np.array([[0, 5, 6, 7, 98]], np.int32)
    expected = np.asarray(ref(ids).text_embeds)
    for dtype in (torch.float16, torch.bfloat16):
        src = tmp_path / f"src_{dtype}"
        shutil.copytree(text_src, src)
        sd = {k: v.to(dtype) for k, v in load_file(src / "model.safetensors").items()}
        (src / "model.safetensors").unlink()
        torch.save(sd, src / "pytorch_model.bin")
        kept = from_pretrained(_convert(run_cli, "clip", src, tmp_path / f"kept_{dtype}"))
        q = kept.text_model.encoder.layers[0].self_attn.q_proj.kernel[...]
        assert q.dtype == (jnp.float16 if dtype == torch.float16 else jnp.bfloat16)
        up = from_pretrained(_convert(run_cli, "clip", src, tmp_path / f"f32_{dtype}", "--dtype", "float32"))
        assert up.text_model.encoder.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        np.testing.assert_allclose(np.asarray(up(ids).text_embeds), expected, atol=tol, rtol=tol)


def _convert(run, kind, src, dst, *extra):
    run(kind, src, dst, *extra)
    return dst


def test_existing_destination_is_kept(text_src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    proc = run_cli("clip", text_src, dst, check=False)
    _fails(proc, "already exists", "--overwrite")
    assert (dst / "keep.txt").read_text() == "precious"
    run_cli("clip", text_src, dst, "--overwrite")
    assert (dst / "config.json").is_file() and not (dst / "keep.txt").exists()


def test_unsupported_model_class(text_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(text_src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["BertModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("clip", src, tmp_path / "out", check=False)
    _fails(proc, "BertModel", "not supported", str(src / "config.json"))


def test_verify_flag_prints_diff(text_src, tmp_path):
    proc = run_cli("clip", text_src, tmp_path / "out", "--verify")
    line = [l for l in proc.stdout.splitlines() if l.startswith("verify")][0]
    diffs = [float(tok.split("=")[1].rstrip(",")) for tok in line.split() if "max|diff|=" in tok]
    assert diffs and max(diffs) < 1e-4, line
