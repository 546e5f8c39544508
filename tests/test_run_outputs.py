"""From a training run to pictures, and CLIs that explain themselves.

One micro demo run (synthetic data, 2 steps, validation at step 2 without scoring models) feeds: the
validation images under WORKDIR/samples/ and in the TensorBoard event file (read back), `generate
--checkpoint`, and export-lora / export-adapter straight from the run folder. The CLI checks stop before
any model is loaded, so they cost a process start each.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from persongen_jax.pipeline import DEFAULT_START_MERGE, id_unused_warning, resolve_start_merge_step
from persongen_jax.train import load_config
from tests.helpers import GENERATE_TWO_SEEDS, assert_two_different_images, cli_env

REPO = Path(__file__).resolve().parents[1]
ENV = cli_env()


def read_tb_images(tb_dir: Path) -> dict[tuple[str, int], np.ndarray]:
    """{(tag, step): uint8 image} of the image summaries in a TensorBoard folder's event files (TFRecord framing:
    u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    images = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    images[(v.tag, event.step)] = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
    return images


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """configs/demo.py shrunk: micro model, synthetic data, 2 steps; validation at step 2 on 2 training
    identities x 1 prompt x 2 seeds, and no scoring models."""
    from persongen_jax.training import train_and_evaluate

    c = load_config(str(REPO / "configs" / "demo.py"))
    c.model, c.data.source, c.data.global_batch_size = "micro", "synthetic", 4
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every, c.progress_bar = 2, 1, 2, 2, False
    c.eval.num_prompts, c.eval.seeds, c.eval.num_steps, c.eval.num_identities = 1, (0, 1), 2, 2
    assert not (c.eval.sets or c.eval.clip or c.eval.face_detector or c.eval.arcface)
    wd = tmp_path_factory.mktemp("demo") / "run"
    result = train_and_evaluate(c, wd, devices=jax.devices()[:1])
    return wd, result


def test_validation_images_without_scoring_models(demo_run):
    wd, _ = demo_run
    folder = wd / "samples" / "2" / "images" / "train"
    people = sorted(p.name for p in folder.iterdir())
    assert people == ["person0", "person1"]
    generated = {p: [np.asarray(Image.open(folder / p / f"castle_s{s}.png")) for s in (0, 1)] for p in people}
    assert all(im.shape == (32, 32, 3) for ims in generated.values() for im in ims)
    assert (wd / "samples" / "2" / "report.html").is_file()
    assert not (wd / "eval" / "history.jsonl").exists()  # no scores: nothing to plot
    logged = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/seconds" in r and r["step"] == 2 for r in logged)
    # TensorBoard: one grid per set, a row per (identity, prompt): the reference, then one image per seed.
    tb = read_tb_images(wd / "tb")
    assert list(tb) == [("samples/train", 2)], list(tb)
    grid = tb[("samples/train", 2)]
    assert grid.shape == (2 * 32, 3 * 32, 3)
    np.testing.assert_array_equal(grid[:32, 32:64], generated["person0"][0])
    np.testing.assert_array_equal(grid[32:, 64:], generated["person1"][1])


def test_training_identities_of_a_dataset(tmp_path):
    """Validation without sets on a grain dataset: persons spread over the sorted ids, up to data.num_refs
    reference faces each, cropped around the face box as training crops them."""
    from persongen_jax.data.make_demo import make_demo
    from persongen_jax.training.data import sample_identities

    data = make_demo(tmp_path / "data", persons=5, images_per_person=3, resolution=32, progress=False)
    c = load_config(str(REPO / "configs" / "demo.py"))
    c.data.dir, c.data.num_refs = str(data), 2
    faces = sample_identities(c, tmp_path, 3)
    assert list(faces) == ["p000", "p002", "p004"]
    assert all(len(f) == 2 and f[0].mode == "RGB" and 0 < f[0].width <= 32 for f in faces.values())
    assert sample_identities(c, tmp_path, 9).keys() == {f"p{i:03d}" for i in range(5)}  # fewer persons than asked


def test_generate_from_checkpoint_of_a_demo_run(demo_run, tmp_path):
    from persongen_jax.generate import main

    wd, _ = demo_run
    ref = wd / "samples" / "2" / "images" / "train" / "person0" / "reference_0.png"
    out = tmp_path / "gen"
    assert (
        main(["--checkpoint", str(wd), "--step", "2", "--ref", str(ref), *GENERATE_TWO_SEEDS, "--out", str(out)]) == 0
    )
    settings = json.loads((out / "settings.json").read_text())
    assert settings["checkpoint"] == str(wd) and settings["step"] == 2 and settings["start_merge_step"] == 0.2
    assert_two_different_images(out)
    assert main(["--checkpoint", str(wd), "--step", "7", "--prompt", "a man", "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()  # the failed run leaves no empty --out behind


def test_evaluate_checkpoint_without_scoring_models(demo_run, tmp_path, capsys):
    """`evaluate --checkpoint RUN --metrics none`: the protocol's images and report, no scoring models needed."""
    from persongen_jax.evaluate import main

    wd, _ = demo_run
    sets = tmp_path / "val"
    sets.mkdir()
    ref = wd / "samples" / "2" / "images" / "train" / "person0" / "reference_0.png"
    (sets / "p0.png").write_bytes(ref.read_bytes())
    out = tmp_path / "eval"
    assert (
        main(
            [
                "--checkpoint",
                str(wd),
                "--sets",
                f"val={sets}",
                "--num-prompts",
                "1",
                "--seeds",
                "0",
                "--steps",
                "2",
                "--metrics",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert (out / "images" / "val" / "p0" / "castle_s0.png").is_file() and (out / "report.html").is_file()
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["metric_names"] == [] and recorded["settings"]["height"] == recorded["settings"]["width"] == 32


def test_export_lora_and_adapter_from_a_run_folder(demo_run, tmp_path):
    """The documented path run -> diffusers: the exported tensors are the checkpoint's trained parameters."""
    from safetensors.numpy import load_file

    from weights_conversion.__main__ import main

    wd, result = demo_run
    params = {k: np.asarray(v) for k, v in result["params"].items()}
    assert main(["export-lora", str(wd), str(tmp_path / "lora.safetensors"), "--step", "2"]) == 0
    lora = load_file(tmp_path / "lora.safetensors")
    lora_keys = [k for k in params if k.endswith(".lora_A.kernel") and ".processor." not in k]
    assert len(lora) == 2 * len(lora_keys) > 0
    for k in lora_keys:
        np.testing.assert_array_equal(lora[k.removesuffix(".kernel") + ".weight"], params[k].T, err_msg=k)
    assert main(["export-adapter", str(wd), str(tmp_path / "bg.safetensors")]) == 0
    adapter = load_file(tmp_path / "bg.safetensors")
    n_kv = len([k for k in params if ".processor.to_k.bg." in k or ".processor.to_v.bg." in k])
    assert len([k for k in adapter if k.startswith("ip_adapter.")]) == n_kv > 0
    # --step with something that is not a run folder: one error, nothing written.
    assert main(["export-lora", str(tmp_path), str(tmp_path / "x.safetensors"), "--step", "2"]) == 1
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- start merge step


def test_start_merge_step_fraction_and_unused_id_warning(tmp_path, capsys, caplog):
    from persongen_jax.pipeline.settings import PipelineError, SamplingSettings
    from persongen_jax.training.validation import Validator

    assert DEFAULT_START_MERGE == 0.2 and resolve_start_merge_step(0.2, 50) == 10  # the research's 10 of 50
    assert [resolve_start_merge_step(0.2, n) for n in (4, 30, 100)] == [0, 6, 20]
    assert resolve_start_merge_step(0.29, 100) == 29 and resolve_start_merge_step(10, 4) == 10
    assert resolve_start_merge_step(10.0, 50) == 10  # an integral float >= 1 is a step (config overrides)
    for ok in (0, 10, 0.2, 10.0):
        SamplingSettings(start_merge_step=ok).check()
    for bad in (-1, 1.5, float("nan"), True):
        with pytest.raises(PipelineError, match="start merge step"):
            SamplingSettings(start_merge_step=bad).check()
    assert id_unused_warning(0.2, 4) is None and id_unused_warning(2, 4) is None
    assert "never used" in id_unused_warning(3, 4) and "never used" in id_unused_warning(10, 4)
    # Every CLI says so, before loading anything (here both fail right after on a bad --out / --sets).
    from persongen_jax.evaluate import main as evaluate_main
    from persongen_jax.generate import main as generate_main

    afile = tmp_path / "afile"
    afile.write_text("")
    late_id = ["--steps", "4", "--start-merge-step", "10", "--out", str(afile)]  # --out: a file, refused
    assert generate_main(["--model", "m", "--ref", "f.png", "--prompt", "a man img", *late_id]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(
        "warning: --start-merge-step 10 (step index 10) >= steps - 1 = 3: the reference "
        "faces (ID embedding) are never used"
    ) and err[1].startswith("error: --out"), err
    assert generate_main(["--model", "m", "--prompt", "a man", *late_id]) == 1  # no --ref: no ID to lose, no warning
    assert not capsys.readouterr().err.startswith("warning")
    no_sets = ["--model", "m", "--sets", f"a={tmp_path / 'none'}"]  # a --sets folder that does not exist
    assert evaluate_main([*no_sets, "--steps", "4", "--clip", "c", "--out", str(tmp_path / "o")]) == 1
    assert "never used" not in capsys.readouterr().err  # the default 0.2 of 4 steps: step 0
    assert evaluate_main([*no_sets, "--steps", "2", "--start-merge-step", "1", "--out", str(tmp_path / "o")]) == 1
    assert "never used" in capsys.readouterr().err.splitlines()[0]
    c = load_config(str(REPO / "configs" / "demo.py"))
    c.eval.num_steps, c.eval.start_merge_step = 4, 10
    with caplog.at_level("WARNING"):
        Validator.from_config(c, tmp_path, None)
    assert any("eval.start_merge_step 10" in r.getMessage() and "never used" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- CLI errors and help


def _train(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "persongen_jax.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def test_train_cli_mistakes_are_one_line_and_create_nothing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    cases = {
        "typo": (
            ["--workdir", "w", "--config.optim.warmup_stepz=3"],
            "error: unknown config key 'optim.warmup_stepz': did you mean 'optim.warmup_steps'? "
            "(--help lists the keys)",
        ),
        "no config": (["--workdir", "w", "--config", "nope.py"], "error: --config nope.py: no such file"),
        "workdir is a file": (["--workdir", str(afile)], f"error: --workdir {afile}: is a file, not a folder"),
        "bad value": (
            ["--workdir", "w", "--config.total_steps=abc"],
            "error: flag --config.total_steps=abc: invalid literal for int() with base 10: 'abc'",
        ),
    }
    for name, (args, expected) in cases.items():
        proc = _train(*args, cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr.splitlines() == [expected], (name, proc.stderr[-2000:])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"], name
    assert afile.read_text() == "keep me"
    # A mistake found after the model is built (no such dataset): one error line, the new run folder removed.
    proc = _train("--workdir", "w", "--config.model=micro", f"--config.data.dir={tmp_path / 'nodata'}", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: config.data.dir="), proc.stderr[
        -2000:
    ]
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_train_help_lists_config_keys():
    proc = _train("--help", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--config.total_steps=150" in proc.stdout and "--config.eval.num_identities=4" in proc.stdout
    proc = _train("--config", "configs/baseline.py", "--help", cwd=REPO)
    assert proc.returncode == 0 and "--config.total_steps=10000" in proc.stdout


def _parsers():
    from persongen_jax.data.make_demo import main as make_demo_main  # noqa: F401 (its parser is built in main)
    from persongen_jax.evaluate import build_parser as evaluate_parser
    from persongen_jax.generate import build_parser as generate_parser
    from weights_conversion.__main__ import build_parser as convert_parser

    convert = convert_parser()
    subs = next(a for a in convert._actions if a.__class__.__name__ == "_SubParsersAction").choices
    return {
        "generate": generate_parser(),
        "evaluate": evaluate_parser(),
        "weights_conversion": convert,
        **{f"weights_conversion {k}": v for k, v in subs.items()},
    }


def test_every_option_has_help_and_examples_keep_line_breaks(capsys):
    from persongen_jax.data import make_demo

    parsers = _parsers()
    with pytest.raises(SystemExit) as e:
        make_demo.main(["--help"])
    assert e.value.code == 0
    demo_help = capsys.readouterr().out
    assert "--persons PERSONS     number of synthetic identities (default: 24)" in demo_help
    for name, p in parsers.items():
        for action in p._actions:
            if action.dest not in ("help", "command"):
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
    text = parsers["generate"].format_help()
    assert (
        "--photomaker weights/photomaker \\\n        --ref face1.jpg" in text
        and "denoising steps (default: 50)" in text
        and "classifier-free guidance scale (default: 5.0)" in text
    )
    assert "--arcface weights/arcface_r100 --out eval/gen\n" in parsers["evaluate"].format_help()


def test_verify_without_torch_fails_before_writing(tmp_path, monkeypatch, capsys):
    import importlib.util

    from weights_conversion.__main__ import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    assert main(["sdxl", str(tmp_path / "src"), str(tmp_path / "dst"), "--verify"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: --verify runs the PyTorch model")
        and not (tmp_path / "dst").exists()
    )


def test_console_scripts():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {
        "persongen-convert": "weights_conversion.__main__:main",
        "persongen-evaluate": "persongen_jax.evaluate:main",
        "persongen-generate": "persongen_jax.generate:main",
        "persongen-train": "persongen_jax.train:run",
    }
