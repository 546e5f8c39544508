"""`python -m persongen_jax.evaluate` end to end on tiny models, and validation during training.

Models built here: a tiny SDXL folder + PhotoMaker (converted), a tiny CLIP (converted), the test SCRFD
detector and a tiny ArcFace (`testing.tiny_eval`). Counts: sets x identities x prompts x seeds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persongen_jax.train import load_config

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

REPO = Path(__file__).resolve().parents[1]


def _face_image(path: Path, seed: int, size=(40, 36), low: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(low, 256, (*size, 3)).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from persongen_jax.testing.tiny_eval import make_tiny_arcface, make_tiny_clip, make_tiny_detector
    from persongen_jax.testing.tiny_photomaker import make_tiny_photomaker
    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl
    from weights_conversion.convert import convert_sdxl
    from weights_conversion.lora import convert_photomaker

    root = tmp_path_factory.mktemp("evaluate")
    convert_sdxl(make_tiny_sdxl(root / "sdxl_src"), root / "sdxl")
    convert_photomaker(make_tiny_photomaker(root / "pm.bin"), root / "photomaker", unet=root / "sdxl" / "unet")
    make_tiny_clip(root / "clip")
    make_tiny_detector(root / "faces")
    make_tiny_detector(root / "faces_strict", threshold=0.85)  # faces only in near-white images
    make_tiny_arcface(root / "arcface")
    # Validation sets: in_train = 2 identities as single files; out_of_domain = 1 identity folder of 2 images.
    _face_image(root / "val" / "in_train" / "alice.png", 1)
    _face_image(root / "val" / "in_train" / "bob.png", 2)
    _face_image(root / "val" / "ood" / "carol" / "a.png", 3)
    _face_image(root / "val" / "ood" / "carol" / "b.png", 4, (48, 48))
    _face_image(root / "val" / "bright" / "dave.png", 5, (40, 40), low=250)  # square: no padding
    return root


def _model(root):
    return ["--model", str(root / "sdxl"), "--photomaker", str(root / "photomaker")]


def _protocol(sets: str, num_prompts: int, seeds: str) -> list[str]:
    """The protocol flags of these runs: SETS, the first NUM_PROMPTS validation prompts, SEEDS, 2 steps."""
    return ["--sets", sets, "--num-prompts", str(num_prompts), "--seeds", seeds, "--steps", "2"]


def _scoring(root):
    return ["--clip", str(root / "clip"), "--face-models", str(root / "faces"), "--arcface", str(root / "arcface")]


def test_mode_b_and_mode_a(models, tmp_path, capsys):
    from persongen_jax.evaluate import main
    from persongen_jax.evaluation.faces import FaceDetector

    root = models
    out = tmp_path / "b"
    sets = f"in_train={root / 'val' / 'in_train'},out_of_domain={root / 'val' / 'ood'}"
    argv = [*_model(root), *_protocol(sets, 2, "0-1"), "--start-merge-step", "0", "--batch-size", "4"]
    argv += ["--out", str(out), *_scoring(root)]
    assert main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sets"]["in_train"]["n_images"] == 2 * 2 * 2  # identities x prompts x seeds
    assert metrics["sets"]["out_of_domain"]["n_images"] == 1 * 2 * 2
    assert metrics["all"]["n_images"] == 12 and metrics["settings"]["seeds"] == [0, 1]
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 12
    assert {(r["set"], r["reference"]) for r in rows} == {
        ("in_train", "alice"),
        ("in_train", "bob"),
        ("out_of_domain", "carol"),
    }
    # No-face images are counted, scored 0 and listed: exactly those where the detector finds nothing.
    det = FaceDetector.from_folder(root / "faces")
    no_face = {r["image"] for r in rows if not len(det.detect(np.asarray(Image.open(out / r["image"]))))}
    assert {r["image"] for r in rows if r["face_found"] == "False"} == no_face
    assert metrics["all"]["no_face"] == len(no_face)
    assert all(float(r["face_sim"]) == 0.0 for r in rows if r["image"] in no_face)
    assert all(np.isfinite(float(r["clip_t"])) for r in rows)
    html = (out / "report.html").read_text()
    for r in rows:
        assert r["image"] in html
    assert "images/in_train/alice/reference_0.png" in html and "Neon Bank" in html
    prompts = json.loads((REPO / "persongen_jax" / "evaluation" / "validation_prompts.json").read_text())["prompts"]
    assert {r["prompt"] for r in rows} == {p["prompt"] for p in prompts[:2]}  # CLIP-T text: no trigger word
    assert "without the trigger word" in metrics["clip_t_text"]

    # A detector that finds no face in any generation: every image counted and listed; "skip" -> no mean.
    strict = tmp_path / "strict"
    argv = [
        *_model(root),
        *_protocol(f"bright={root / 'val' / 'bright'}", 1, "0-2"),
        "--no-face",
        "skip",
        "--out",
        str(strict),
        "--clip",
        str(root / "clip"),
        "--face-models",
        str(root / "faces_strict"),
        "--arcface",
        str(root / "arcface"),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    ms = json.loads((strict / "metrics.json").read_text())
    assert ms["sets"]["bright"]["n_images"] == 3 and ms["sets"]["bright"]["no_face"] == 3
    assert ms["sets"]["bright"]["face_sim"] is None and ms["no_face"] == "skip"
    assert len(ms["sets"]["bright"]["no_face_images"]) == 3
    assert "no face" in (strict / "report.html").read_text()

    # Mode A on two of those images, the reference itself (Face-Sim 1) and a black image (no face).
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(black)
    alice = root / "val" / "in_train" / "alice.png"
    lines = [
        {"image": str(out / rows[0]["image"]), "prompt": rows[0]["prompt"], "reference": str(alice)},
        {"image": str(alice), "prompt": "a photo", "reference": [str(alice)], "set": "self"},
        {"image": str(black), "prompt": "a photo", "reference": str(alice), "set": "self"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    assert main(["--manifest", str(manifest), "--out", str(tmp_path / "a"), *_scoring(root)]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["sets"]["all"]["n_images"] == 1 and m["sets"]["self"]["n_images"] == 2
    assert m["sets"]["self"]["no_face"] == 1 and m["all"]["no_face"] == 1
    arows = list(csv.DictReader(open(tmp_path / "a" / "scores.csv")))
    assert abs(float(arows[1]["face_sim"]) - 1.0) < 1e-5 and float(arows[2]["face_sim"]) == 0.0
    assert abs(float(arows[0]["clip_t"]) - float(rows[0]["clip_t"])) < 1e-3  # same image, same prompt
    assert "black.png" in (tmp_path / "a" / "report.html").read_text()

    # Errors name what is wrong; nothing half-written is reported as success.
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": str(alice), "prompt": "x"}) + "\n")
    assert main(["--manifest", str(bad), "--out", str(tmp_path / "c"), *_scoring(root)]) == 1
    assert "line 1" in capsys.readouterr().err
    noface_ref = tmp_path / "nf.jsonl"
    noface_ref.write_text(json.dumps({"image": str(alice), "prompt": "x", "reference": str(black)}) + "\n")
    assert main(["--manifest", str(noface_ref), "--out", str(tmp_path / "d"), *_scoring(root)]) == 1
    assert "no face found in reference" in capsys.readouterr().err
    assert (
        main(
            [
                "--model",
                str(root / "sdxl"),
                "--sets",
                f"x={tmp_path / 'missing'}",
                "--out",
                str(tmp_path / "e"),
                *_scoring(root),
            ]
        )
        == 1
    )
    assert "missing" in capsys.readouterr().err


def test_mode_a_scores_the_prompt_without_the_trigger_word(models, tmp_path, capsys):
    """Mode A removes the trigger word before CLIP-T, as mode B scores its prompts (--trigger-word applies
    to both; '' keeps prompts as written); metrics.json says which text was scored; a trigger word glued
    to another word is an error naming the manifest line. A transparent PNG is scored on white."""
    from persongen_jax.evaluate import main
    from persongen_jax.evaluation.clip_t import CLIPTScorer
    from persongen_jax.pipeline.image_processing import convert_to_rgb

    root = models
    alice = root / "val" / "in_train" / "alice.png"
    rgba = np.asarray(Image.open(alice).convert("RGBA")).copy()
    rgba[:12, :, 3] = 0  # a transparent top band over alice's colours
    cutout = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(cutout)
    with_trigger, plain = "a photo of a man img wearing a red hat", "a photo of a man wearing a red hat"
    lines = [
        {"image": str(alice), "prompt": with_trigger, "reference": str(alice)},
        {"image": str(alice), "prompt": plain, "reference": str(alice)},
        {"image": str(cutout), "prompt": with_trigger, "reference": str(cutout)},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(e) for e in lines) + "\n")

    assert main(["--manifest", str(manifest), "--out", str(tmp_path / "a"), *_scoring(root)]) == 0, (
        capsys.readouterr().err
    )
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["trigger_word"] == "img" and "without the trigger word 'img'" in m["clip_t_text"]
    rows = list(csv.DictReader(open(tmp_path / "a" / "scores.csv")))
    assert [r["prompt"] for r in rows] == [plain] * 3
    clip = CLIPTScorer.from_pretrained(root / "clip")
    face = Image.open(alice)
    expected = clip([face, face, convert_to_rgb(Image.open(cutout))], [plain, with_trigger, plain])
    assert abs(expected[1] - expected[0]) > 0.1  # scoring the trigger word changes CLIP-T
    np.testing.assert_allclose([float(r["clip_t"]) for r in rows], expected[[0, 0, 2]], atol=1e-3)
    assert abs(float(rows[2]["face_sim"]) - 1.0) < 1e-5  # the cut-out against itself, both on white

    assert main(["--manifest", str(manifest), "--trigger-word", "", "--out", str(tmp_path / "b"), *_scoring(root)]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["trigger_word"] is None and m["clip_t_text"] == "the manifest prompt as written"
    rows = list(csv.DictReader(open(tmp_path / "b" / "scores.csv")))
    assert rows[0]["prompt"] == with_trigger and abs(float(rows[0]["clip_t"]) - expected[1]) < 1e-3

    glued = tmp_path / "glued.jsonl"
    glued.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[0], "prompt": "a photo of a man imgur"}) + "\n")
    capsys.readouterr()
    assert main(["--manifest", str(glued), "--out", str(tmp_path / "c"), *_scoring(root)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "glued.jsonl, line 2: prompt 'a photo of a man imgur'" in err
    assert "'img' must be a separate word" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "metrics.json").exists()


def _demo_config(**eval_overrides):
    c = load_config(str(REPO / "configs" / "demo.py"))
    c.model = "micro"
    c.data.source = "synthetic"
    c.data.global_batch_size = 4
    c.total_steps = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_every = 1
    c.progress_bar = False
    for k, v in eval_overrides.items():
        c.eval[k] = v
    return c


def test_validation_during_training_then_checkpoint_evaluation_and_compare(models, tmp_path, capsys):
    from persongen_jax.evaluate import main
    from persongen_jax.sources import load_trained_model
    from persongen_jax.training import train_and_evaluate

    root = models
    sets = f"in_train={root / 'val' / 'in_train'}"
    c = _demo_config(
        sets=sets,
        clip=str(root / "clip"),
        face_detector=str(root / "faces"),
        arcface=str(root / "arcface"),
        num_prompts=1,
        seeds=(0, 1),
        num_steps=2,
    )
    wd = tmp_path / "run"
    result = train_and_evaluate(c, wd)
    logged = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in logged if "eval/in_train/clip_t" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert all("eval/in_train/face_sim" in r and "eval/in_train/no_face" in r for r in evals)
    history = [json.loads(line) for line in (wd / "eval" / "history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["set"], h["n_images"]) for h in history] == [(1, "in_train", 4), (2, "in_train", 4)]
    step2 = json.loads((wd / "samples" / "2" / "metrics.json").read_text())
    assert step2["step"] == 2 and step2["sets"]["in_train"]["n_images"] == 2 * 1 * 2
    assert (wd / "samples" / "2" / "report.html").is_file()
    assert np.isclose(step2["sets"]["in_train"]["clip_t"], evals[1]["eval/in_train/clip_t"])

    # The checkpoint comes back with exactly the trained parameters ...
    from persongen_jax.models import modeling

    model, _, step = load_trained_model(wd)
    flat = {".".join(map(str, k)): np.asarray(v) for k, v in modeling.flat_params(model).items()}
    assert step == 2
    for k, v in result["params"].items():
        np.testing.assert_array_equal(flat[k], np.asarray(v), err_msg=k)
    # ... and `evaluate --checkpoint` reproduces the step-2 validation (LoRA merged: float rounding only).
    out = tmp_path / "ckpt_eval"
    argv = [
        "--checkpoint",
        str(wd),
        *_protocol(sets, 1, "0-1"),
        "--resolution",
        "32",
        "--out",
        str(out),
        *_scoring(root),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["step"] == 2 and m["sets"]["in_train"]["n_images"] == 4
    assert abs(m["sets"]["in_train"]["clip_t"] - step2["sets"]["in_train"]["clip_t"]) < 0.05

    plots = tmp_path / "plots"
    assert main(["--compare", str(wd), str(out), "--out", str(plots)]) == 0
    for name in ("face_sim_in_train.png", "clip_t_in_train.png"):
        with Image.open(plots / name) as im:
            assert im.size[0] > 200 and im.size[1] > 200


def test_validation_config_errors(models, tmp_path):
    from persongen_jax.training.validation import Validator

    # No scoring models: images only; some of a metric's models but not all: an error naming the missing key.
    c = _demo_config(sets=f"in_train={models / 'val' / 'in_train'}")
    assert Validator.from_config(c, tmp_path, None).metrics == []
    c = _demo_config(sets=f"in_train={models / 'val' / 'in_train'}", face_detector=str(models / "faces"))
    with pytest.raises(ValueError, match=r"config.eval: .*face_sim needs arcface"):
        Validator.from_config(c, tmp_path, None)
    assert Validator.from_config(_demo_config(), tmp_path, None).sets is None  # training identities, read later
    # A reference without a face fails when the validator is built (before training), naming the file.
    bad = tmp_path / "val"
    bad.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad / "nobody.png")
    _face_image(bad / "alice.png", 1)
    c = _demo_config(
        sets=f"in_train={bad}",
        clip=str(models / "clip"),
        face_detector=str(models / "faces"),
        arcface=str(models / "arcface"),
    )
    with pytest.raises(ValueError, match="nobody.png"):
        Validator.from_config(c, tmp_path, None)


def test_manifest_errors_name_the_file_and_line(models, tmp_path, capsys):
    """`"reference": []` (NaN in metrics.json before), `"image": 5` and non-UTF-8
    bytes are one `error:` line naming the manifest and the line; exit 1, no metrics.json."""
    from persongen_jax.evaluate import main
    from persongen_jax.evaluation.protocol import read_manifest

    alice = str(models / "val" / "in_train" / "alice.png")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image": alice, "prompt": "a photo", "reference": []}) + "\n")
    assert main(["--manifest", str(empty), "--out", str(tmp_path / "out"), *_scoring(models)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "loading" not in line]  # progress lines
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"{empty}, line 1: reference=[]" in err[0] and not (tmp_path / "out" / "metrics.json").exists()
    # An unreadable image names the manifest line as well as the file.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_text(
        "".join(
            json.dumps({"image": im, "prompt": "a photo", "reference": alice}) + "\n" for im in (alice, str(broken))
        )
    )
    assert main(["--manifest", str(unreadable), "--out", str(tmp_path / "out2"), *_scoring(models)]) == 1
    err = capsys.readouterr().err
    assert f"error: {unreadable}, line 2: {broken}" in err, err
    cases = {
        "image5": (json.dumps({"image": 5, "prompt": "x", "reference": alice}) + "\n").encode(),
        "refs": (json.dumps({"image": alice, "prompt": "x", "reference": [alice, None]}) + "\n").encode(),
        "latin1": b'{"image": "a.png", "prompt": "caf\xe9", "reference": "b.png"}\n',
    }
    for name, data in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        with pytest.raises(
            ValueError,
            match=f"{path}, line 1: "
            + ("not UTF-8" if name == "latin1" else "image=5" if name == "image5" else "reference="),
        ):
            read_manifest(path)


def test_smoke_evaluate_identities_differ(models, tmp_path, capsys):
    """scripts/smoke_evaluate.py's evaluate arguments (4 steps, the default start merge step): every identity's
    images differ from the others' (a fixed merge step 10 of 4 steps made them pixel-identical)."""
    import importlib.util

    from persongen_jax.evaluate import main

    spec = importlib.util.spec_from_file_location("smoke_evaluate", REPO / "scripts" / "smoke_evaluate.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    root = tmp_path / "models"
    root.mkdir()
    for name in ("sdxl", "photomaker", "clip", "faces", "arcface"):  # the fixture's models; the sets are the smoke's
        (root / name).symlink_to(models / name)
    sets = smoke.build(root)
    argv = smoke.evaluate_argv(root, sets, tmp_path / "eval", 4)
    assert main(argv + ["--num-prompts", "1", "--seeds", "0"]) == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err
    images = {p.parent.name: np.asarray(Image.open(p)) for p in (tmp_path / "eval" / "images").glob("*/*/*_s0.png")}
    assert sorted(images) == ["alice", "bob", "carol"]
    names = sorted(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(images[a].astype(int) - images[b].astype(int)).max() > 0, (a, b)
