"""The conversion CLI's strictness: wrong checkpoints fail loudly, naming the key/file, and
nothing is written to DST unless conversion succeeded."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from helpers import randomize_, run_cli  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from persongen_jax.testing.tiny_eval import transformer_sizes  # noqa: E402


@pytest.fixture(scope="module")
def text_src(tmp_path_factory):
    """A tiny transformers CLIPTextModelWithProjection saved with save_pretrained."""
    src = tmp_path_factory.mktemp("clip_src")
    sizes = transformer_sizes(hidden=16, mlp=32, layers=2, heads=2)
    cfg = transformers.CLIPTextConfig(
        **sizes, vocab_size=99, max_position_embeddings=20, hidden_act="quick_gelu", projection_dim=8
    )
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
    import jax.numpy as jnp

    from persongen_jax.models import from_pretrained

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
    # --overwrite replaces only a folder this tool wrote, or an empty one.
    _fails(run_cli("clip", text_src, dst, "--overwrite", check=False), "not a folder written by", "keep.txt")
    assert (dst / "keep.txt").read_text() == "precious"
    (dst / "keep.txt").unlink()
    run_cli("clip", text_src, dst, "--overwrite")
    assert (dst / "config.json").is_file()


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
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("verify")][0]
    diffs = [float(tok.split("=")[1].rstrip(",")) for tok in line.split() if "max|diff|=" in tok]
    assert diffs and max(diffs) < 1e-4, line


# ----------------------------------------------------------------------------- reliability


def _main(*args):
    """The CLI's `main` in-process (the subprocess path is covered above): (exit code, stderr)."""
    import contextlib
    import io

    from weights_conversion.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def _one_error_line(code, err, *needles):
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_overwrite_never_deletes_the_source_or_a_foreign_folder(text_src, tmp_path):
    """`sdxl W/raw/x W --overwrite` (DST contains the source), DST == source, DST inside the source,
    and --overwrite onto a folder this tool did not write: all refused, nothing touched. --overwrite still
    replaces a folder the tool wrote."""
    w = tmp_path / "W"
    shutil.copytree(text_src, w / "raw" / "clip")
    (w / "other.txt").write_text("unrelated")
    before = _tree(w)
    _one_error_line(*_main("sdxl", w / "raw" / "clip", w, "--overwrite"), "contains the source")
    _one_error_line(*_main("sdxl", w / "raw" / "clip", w / "raw" / "clip", "--overwrite"), "is the source")
    _one_error_line(*_main("clip", w / "raw" / "clip", w / "raw" / "clip" / "out"), "is inside the source")
    _one_error_line(*_main("sdxl", w / "raw" / "clip", tmp_path, "--overwrite"), "contains the source")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _one_error_line(*_main("clip", w / "raw" / "clip", foreign, "--overwrite"), "not a folder written by", "notes.txt")
    assert _tree(w) == before and (w / "other.txt").read_text() == "unrelated"
    assert (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert _main("clip", w / "raw" / "clip", out)[0] == 0
    assert _main("clip", w / "raw" / "clip", out, "--overwrite")[0] == 0 and (out / "params").is_dir()


def test_non_finite_weights_warned_and_verify_fails(text_src, tmp_path, caplog):
    """An fp16 checkpoint with NaN / Inf: conversion names the tensors, --verify exits 1."""
    import logging

    src = _copy_with(
        text_src,
        tmp_path / "src",
        lambda sd: sd.update(
            {k: v.half() for k, v in sd.items()},
            **{
                "text_model.encoder.layers.0.mlp.fc1.weight": torch.full((32, 16), float("nan"), dtype=torch.float16),
                "text_projection.weight": torch.full((8, 16), float("inf"), dtype=torch.float16),
            },
        ),
    )
    with caplog.at_level(logging.WARNING):
        code, err = _main("clip", src, tmp_path / "out", "--verify")
    assert code == 1 and "--verify" in err and "NaN/Inf" in err, err
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "2 tensor(s) hold NaN or Inf" in warned
        and "text_model.encoder.layers.0.mlp.fc1.weight" in warned
        and "text_projection.weight" in warned
    ), warned


def test_checksums_catch_changed_parameters(text_src, tmp_path, monkeypatch):
    """A flipped-bytes data file or a parameter swapped after conversion fails to load, naming the
    parameter; verify_checksums=False (or PERSONGEN_VERIFY_CHECKSUMS=0) loads anyway."""
    import jax.numpy as jnp

    from persongen_jax.models import modeling
    from persongen_jax.models.modeling import from_pretrained

    out = tmp_path / "out"
    assert _main("clip", text_src, out)[0] == 0
    sums = json.loads((out / "params" / "checksums.json").read_text())["arrays"]
    assert "text_projection.kernel" in sums and len(sums) == len(modeling.flat_params(from_pretrained(out)))
    # A parameter replaced (same shape and dtype) under the old checksums: named.
    model = from_pretrained(out)
    flat = modeling.flat_params(model)
    flat[("text_projection", "kernel")] = flat[("text_projection", "kernel")].at[0, 0].add(1.0)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.rmtree(mixed / "params")
    modeling.save_params(flat, mixed / "params")
    shutil.copy(out / "params" / "checksums.json", mixed / "params" / "checksums.json")
    with pytest.raises(ValueError, match=r"params: checksum mismatch for \['text_projection.kernel'\]"):
        from_pretrained(mixed)
    # Without the check (argument or environment) the load gives exactly the replaced parameters.
    changed = {k: np.asarray(v) for k, v in flat.items()}

    def same_as_changed(m):
        got = {k: np.asarray(v) for k, v in modeling.flat_params(m).items()}
        return got.keys() == changed.keys() and all(np.array_equal(got[k], changed[k]) for k in got)

    assert same_as_changed(from_pretrained(mixed, verify_checksums=False))
    monkeypatch.setenv("PERSONGEN_VERIFY_CHECKSUMS", "0")
    assert same_as_changed(from_pretrained(mixed))
    monkeypatch.delenv("PERSONGEN_VERIFY_CHECKSUMS")
    # Flipped bytes in each data file of params/ (copies): the load fails naming the folder, or -- where the
    # bytes are not read (superseded OCDBT nodes) -- gives the very same parameters; never other values.
    reference = {k: np.asarray(v) for k, v in modeling.flat_params(from_pretrained(out)).items()}
    names = sorted(p.relative_to(out) for p in (out / "params").glob("ocdbt.process_*/d/*"))
    failed = 0
    for i, name in enumerate(names):
        flipped = tmp_path / f"flipped{i}"
        shutil.copytree(out, flipped)
        raw = bytearray((flipped / name).read_bytes())
        mid = len(raw) // 2
        raw[mid : mid + 16] = bytes(b ^ 0xFF for b in raw[mid : mid + 16])
        (flipped / name).write_bytes(bytes(raw))
        try:
            got = modeling.flat_params(from_pretrained(flipped, param_dtype=jnp.float32))
        except ValueError as e:
            assert re.search(r"params: (checksum mismatch for \[|cannot read the parameters)", str(e)), e
            failed += 1
            continue
        for k, v in got.items():
            np.testing.assert_array_equal(np.asarray(v), reference[k], err_msg=f"{name}: {k} changed silently")
    assert failed, names


def _read_only(folder):
    """Makes `folder` unwritable, even for root (immutable attribute); skips where neither works."""
    import os
    import subprocess

    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a read-only folder")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_errors_are_one_line_naming_the_file(text_src, tmp_path, monkeypatch):
    """Read-only and dangling-symlink destinations (refused before converting), malformed
    safetensors headers and lora_adapter_metadata, a PhotoMaker section that is not a dict, export-lora onto
    a folder, a config.json value of the wrong type: one `error:` line naming the file / key, exit 1."""
    import os
    import struct

    from persongen_jax.models import lora as L
    from persongen_jax.models.modeling import from_pretrained
    from weights_conversion import core

    def no_conversion(*a, **k):
        raise AssertionError("converted before checking the destination")

    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _read_only(ro)
    try:
        with monkeypatch.context() as m:
            m.setattr(core, "convert_state_dict", no_conversion)
            m.setattr("weights_conversion.convert.convert_state_dict", no_conversion)
            _one_error_line(*_main("clip", text_src, ro / "out"), str(ro / "out"), "cannot write")
    finally:
        undo()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _one_error_line(*_main("clip", text_src, tmp_path / "dangling"), "symlink", "does not exist")

    def safetensors(path, header, data=b""):
        h = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(h)) + h + data)
        return path

    for name, header in [
        ("list", [1, 2]),
        ("shape", {"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}),
        ("offsets", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}),
        ("meta", {"__metadata__": {"format": 5}}),
    ]:
        src = tmp_path / f"bad_{name}"
        shutil.copytree(text_src, src)
        safetensors(src / "model.safetensors", header, b"\0" * 16)
        _one_error_line(*_main("clip", src, tmp_path / f"out_{name}"), str(src / "model.safetensors"))
    lora = safetensors(
        tmp_path / "lora.safetensors",
        {
            "__metadata__": {"lora_adapter_metadata": "{not json"},
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": {
                "dtype": "F32",
                "shape": [1, 4],
                "data_offsets": [0, 16],
            },
        },
        b"\0" * 16,
    )
    _one_error_line(*_main("lora", lora, tmp_path / "lora_out"), str(lora), "lora_adapter_metadata")
    lora = safetensors(
        tmp_path / "lora2.safetensors",
        {"__metadata__": {"lora_adapter_metadata": json.dumps({"unet.r": "8", "unet.lora_alpha": 8})}},
        b"",
    )
    _one_error_line(*_main("lora", lora, tmp_path / "lora_out"), "lora_adapter_metadata", "r='8'")
    torch.save({"id_encoder": torch.zeros(2), "lora_weights": {}}, tmp_path / "pm.bin")
    _one_error_line(*_main("photomaker", tmp_path / "pm.bin", tmp_path / "pm"), "section 'id_encoder'", "Tensor")
    lora_dir = tmp_path / "lora_dir"
    L.write_folder(
        lora_dir,
        L.lora_config({"a.to_q": (1, 1.0)}),
        {
            ("a", "to_q", "lora_A", "kernel"): np.zeros((4, 1), np.float32),
            ("a", "to_q", "lora_B", "kernel"): np.zeros((1, 4), np.float32),
        },
    )
    (tmp_path / "existing").mkdir()
    for extra in ([], ["--overwrite"]):
        _one_error_line(*_main("export-lora", lora_dir, tmp_path / "existing", *extra), str(tmp_path / "existing"))
    assert os.listdir(tmp_path / "existing") == []
    out = tmp_path / "out"
    assert _main("clip", text_src, out)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, hidden_size="16")))
    with pytest.raises(ValueError, match=r"config.json: CLIPTextConfig: hidden_size='16' has type str, expected int"):
        from_pretrained(out)


def test_stale_temp_folders_of_killed_conversions_are_removed(text_src, tmp_path, caplog):
    """`.DST.tmp-*` folders left by a killed conversion are removed on the next run (and said);
    one of a process still running is left alone."""
    import logging
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.tmp-{dead.pid}@{host}-abcd1234"
    live = tmp_path / f".out.tmp-{os.getpid()}@{host}-efgh5678"
    for d in (stale, live):
        (d / "unet" / "params").mkdir(parents=True)
        (d / "unet" / "params" / "big").write_bytes(b"\0" * 1000)
    with caplog.at_level(logging.WARNING):
        assert _main("clip", text_src, tmp_path / "out")[0] == 0
    assert not stale.exists() and live.exists()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"removed {stale}" in said and str(live) not in said, said


def test_deeply_nested_json_is_one_error_line_naming_the_file(text_src, tmp_path):
    """2 MB of `[[[...` (json's RecursionError) in a safetensors header, in its
    lora_adapter_metadata, in a source config.json, a sharded index, a --unet config: one `error:` line
    naming the file, exit 1, nothing written; the same nesting in every JSON file a loader reads (converted
    config.json, checksums.json, model_index.json, a dataset index, validation prompts, metrics history)
    is a ValueError naming the file."""
    import struct

    deep = b"[" * (2 << 20)

    def safetensors(path, header: bytes):
        path.write_bytes(struct.pack("<Q", len(header)) + header)
        return path

    proc = run_cli("lora", safetensors(tmp_path / "deep.safetensors", deep), tmp_path / "o1", check=False)
    _fails(proc, str(tmp_path / "deep.safetensors"), "corrupt safetensors header", "nested too deeply")
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    meta = json.dumps({"__metadata__": {"lora_adapter_metadata": "[" * 100_000}}).encode()
    _one_error_line(
        *_main("lora", safetensors(tmp_path / "meta.safetensors", meta), tmp_path / "o2"),
        str(tmp_path / "meta.safetensors"),
        "lora_adapter_metadata",
        "nested too deeply",
    )
    src = tmp_path / "src"
    shutil.copytree(text_src, src)
    (src / "config.json").write_bytes(deep)
    _one_error_line(*_main("clip", src, tmp_path / "o3"), str(src / "config.json"), "nested too deeply")
    (tmp_path / "model.safetensors.index.json").write_bytes(b'{"weight_map": ' + deep)
    from weights_conversion import io as wio
    from weights_conversion.core import ConversionError

    with pytest.raises(ConversionError, match="model.safetensors.index.json: not a valid sharded-checkpoint index"):
        wio.read_checkpoint(tmp_path / "model.safetensors.index.json")
    lora = tmp_path / "lora.safetensors"
    shutil.copy(text_src / "model.safetensors", lora)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_bytes(deep)
    _one_error_line(
        *_main("lora", lora, tmp_path / "o4", "--unet", tmp_path / "unet"),
        str(tmp_path / "unet" / "config.json"),
        "nested too deeply",
    )
    assert not any(tmp_path.glob("o*")), sorted(tmp_path.iterdir())

    from persongen_jax.data.format import load_index
    from persongen_jax.evaluation.protocol import load_prompts
    from persongen_jax.evaluation.report import read_jsonl
    from persongen_jax.models.modeling import from_pretrained
    from persongen_jax.pipeline.prompt import read_force_zeros_for_empty_prompt

    out = tmp_path / "out"
    assert _main("clip", text_src, out)[0] == 0
    (out / "params" / "checksums.json").write_bytes(deep)
    with pytest.raises(ValueError, match=r"checksums.json.*nested too deeply"):
        from_pretrained(out)
    (out / "config.json").write_bytes(deep)
    for path, load in [
        (out / "config.json", lambda p: from_pretrained(p.parent)),
        (tmp_path / "model_index.json", lambda p: read_force_zeros_for_empty_prompt(p.parent)),
        (tmp_path / "data" / "index.json", lambda p: load_index(p.parent)),
        (tmp_path / "prompts.json", load_prompts),
        (tmp_path / "history.jsonl", read_jsonl),
    ]:
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            path.write_bytes(deep)
        with pytest.raises(ValueError, match="nested too deeply") as e:
            load(path)
        assert str(path) in str(e.value), e.value
    # A captions JSONL line nested as deep is one bad line (listed with its reason), the others kept.
    from persongen_jax.data.format import read_captions

    captions = tmp_path / "captions.jsonl"
    captions.write_bytes(b'{"image": "a.png", "caption": "a man img"}\n' + deep + b"\n")
    entries, bad = read_captions(captions)
    assert list(entries) == ["a.png"] and bad == [
        {"image": f"{captions}:2", "reason": "unparsable JSONL line (nested too deeply)"}
    ], bad


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_outputs_get_the_users_umask(text_src, tmp_path, umask):
    """Every file and folder the tools write has the mode a plain open() / mkdir()
    gives under the user's umask -- converted folders (atomic_dir, also the dataset writers' and the build's
    DST), exported .safetensors, evaluate's metrics.json -- not mkdtemp's 0700 / mkstemp's 0600."""
    import os
    import stat

    from persongen_jax.evaluation.report import write_metrics_json
    from persongen_jax.models import lora as L

    old = os.umask(umask)
    try:
        assert _main("clip", text_src, tmp_path / "clip")[0] == 0
        L.write_folder(
            tmp_path / "lora",
            L.lora_config({"a.to_q": (1, 1.0)}),
            {
                ("a", "to_q", "lora_A", "kernel"): np.ones((4, 1), np.float32),
                ("a", "to_q", "lora_B", "kernel"): np.ones((1, 4), np.float32),
            },
        )
        assert _main("export-lora", tmp_path / "lora", tmp_path / "lora.safetensors")[0] == 0
        write_metrics_json({"sets": {}}, tmp_path / "eval" / "metrics.json")
    finally:
        os.umask(old)
    written = [
        tmp_path / "clip",
        *(tmp_path / "clip").rglob("*"),
        tmp_path / "lora",
        *(tmp_path / "lora").rglob("*"),
        tmp_path / "lora.safetensors",
        tmp_path / "eval" / "metrics.json",
    ]
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    want = {str(p.relative_to(tmp_path)): oct((0o777 if p.is_dir() else 0o666) & ~umask) for p in written}
    assert modes == want


def test_readme_conversion_commands_parse():
    """Every `python -m weights_conversion ...` command in a code block of the
    README (the real-weights table's block included; `[--opt x]` read as given) names a subcommand and
    options the CLI has; the block covers each conversion the table names."""
    import shlex
    from pathlib import Path

    from weights_conversion.__main__ import build_parser

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python -m weights_conversion "):
                commands.append(re.sub(r"\[([^\]]*)\]", r"\1", line))
    parser = build_parser()
    seen = set()
    for command in commands:
        try:
            args = parser.parse_args(shlex.split(command)[3:])
        except SystemExit:
            raise AssertionError(f"README command does not parse: {command}") from None
        seen.add(args.command)
    assert {"sdxl", "photomaker", "clip", "arcface"} <= seen, (seen, commands)
