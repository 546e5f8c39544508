"""PhotoMaker's metric table through `python -m persongen_jax.evaluate`: CLIP-I, DINO and FID (a per-set
metric) beside CLIP-T in mode A, their place in metrics.json / scores.csv / report.html, `--compare ...
--table`, and the one-line error for a metric whose model folder is missing or of another kind."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _inception_folder(path):
    """A random FIDInceptionV3 folder (running variances kept positive); no torch needed."""
    from persongen_jax.models import modeling
    from persongen_jax.models.inception import FIDInceptionV3

    config = {"resize_input": True, "normalize_input": True}
    model = modeling.random_init(FIDInceptionV3, config, 0)
    flat = {p: (abs(v) + 0.5 if str(p[-1]) == "running_var" else v) for p, v in modeling.flat_params(model).items()}
    modeling.save_pretrained(modeling.assign_params(model, flat), config, path)
    return path


@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    from persongen_jax.models import modeling
    from persongen_jax.models.vit import ViTModel
    from persongen_jax.testing.tiny_eval import make_tiny_clip

    root = tmp_path_factory.mktemp("paper_metrics")
    make_tiny_clip(root / "clip")
    vit = ViTModel.preset_config("tiny")
    modeling.save_pretrained(modeling.random_init(ViTModel, vit, 1), vit, root / "dino")
    _inception_folder(root / "inception")
    from persongen_jax.models.lpips import LPIPS
    from persongen_jax.testing.tiny_eval import make_tiny_detector

    lp = modeling.random_init(LPIPS, {"net": "alex"}, 2)  # positive linear layers, as released (a distance)
    flat = {p: (abs(v) if str(p[0]).startswith("lin") else v) for p, v in modeling.flat_params(lp).items()}
    modeling.save_pretrained(modeling.assign_params(lp, flat), {"net": "alex"}, root / "lpips")
    make_tiny_detector(root / "faces")
    rng = np.random.default_rng(0)
    for i in range(3):
        (root / "fid_ref").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(root / "fid_ref" / f"{i}.png")
    lines = []
    for i, s in enumerate("aaaa"):  # one set: FID's 2048-d matrix square root once ("all" is that set)
        Image.fromarray(rng.integers(0, 256, (48, 40, 3)).astype(np.uint8)).save(root / f"gen{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)).save(root / f"ref{i % 2}.png")
        lines.append(
            {"image": f"gen{i}.png", "prompt": "a photo of a person", "reference": f"ref{i % 2}.png", "set": s}
        )
    (root / "m.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return root


def _args(root, *extra):
    return [
        "--manifest",
        str(root / "m.jsonl"),
        "--clip",
        str(root / "clip"),
        "--dino",
        str(root / "dino"),
        "--inception",
        str(root / "inception"),
        "--fid-reference",
        str(root / "fid_ref"),
        "--lpips",
        str(root / "lpips"),
        "--face-models",
        str(root / "faces"),
        "--batch-size",
        "4",
        *extra,
    ]


def test_clip_i_dino_fid_in_every_output_and_the_table(scoring, tmp_path, capsys):
    from persongen_jax.evaluate import main
    from persongen_jax.evaluation import metrics
    from persongen_jax.evaluation.table import comparison

    root = scoring
    out = tmp_path / "run_a"
    assert main(_args(root, "--metrics", "clip_t,clip_i,dino,fid,face_div", "--out", str(out))) == 0, (
        capsys.readouterr().err
    )
    capsys.readouterr()
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric_names"] == ["clip_t", "clip_i", "dino", "fid", "face_div"]
    # Face Div.: ref0 (gen0, gen2: a value) + ref1 (gen1, gen3: a value); FID of the set = FID of all.
    assert m["sets"]["a"]["face_div"] > 0 and m["sets"]["a"]["face_div_na"] == 0
    assert m["sets"]["a"]["fid"] > 0 and m["all"]["fid"] == m["sets"]["a"]["fid"]
    assert m["fid_reference"] == str(root / "fid_ref")

    # Per-image CLIP-I / DINO as the scorers compute them (mean over the row's references), FID per set only.
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["fid"] for r in rows] == [""] * 4
    clip_i, dino = metrics.build(["clip_i", "dino"], {"clip": root / "clip", "dino": root / "dino"})
    gens = [Image.open(root / f"gen{i}.png") for i in range(4)]
    refs = {k: [Image.open(root / f"ref{k}.png")] for k in (0, 1)}
    for metric in (clip_i, dino):
        prepared = {k: metric.prepare_references(v, ["r"]) for k, v in refs.items()}
        want = metric(gens, [""] * 4, [prepared[i % 2] for i in range(4)]).values
        np.testing.assert_allclose([float(r[metric.name]) for r in rows], want, atol=1e-4)
        assert m["all"][metric.name] == pytest.approx(np.mean(want), abs=1e-4)
    page = (out / "report.html").read_text()
    assert "<th class='num'>CLIP-I</th>" in page and "<th class='num'>FID</th>" in page
    assert "FID –" not in page and "Face Div. –" not in page  # no per-image value of a per-set metric

    # A second method, then the comparison table.
    assert main(_args(root, "--metrics", "clip_t,dino", "--out", str(tmp_path / "run_b"))) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "--compare",
                str(out),
                str(tmp_path / "run_b"),
                "--table",
                "--labels",
                "Ours,Baseline",
                "--out",
                str(tmp_path / "table"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    md = (tmp_path / "table" / "table.md").read_text()
    assert md in text
    lines = md.splitlines()
    assert lines[0] == "| Method | CLIP-T | CLIP-I | DINO | FID | Face Div. | images | gen s/img | eval s/img |"
    assert lines[2].startswith(f"| Ours | {m['all']['clip_t']:.2f} | {m['all']['clip_i']:.2f} | ")
    assert lines[3].startswith("| Baseline |") and "| – | – | 4 | – |" in lines[3]  # no FID etc., no generation
    table = list(csv.DictReader(open(tmp_path / "table" / "table.csv")))
    assert [r["run"] for r in table] == ["Ours", "Baseline"] and float(table[0]["fid"]) == m["all"]["fid"]
    assert float(table[0]["eval s/img"]) > 0
    assert comparison([out])[1] == ["clip_t", "clip_i", "dino", "fid", "face_div"]


class _FakePipe:
    """What run_protocol calls on a pipeline (mode B / validation): random images per seed."""

    id_encoder = object()
    default_size = 48  # the size of its images (run_protocol records it in metrics.json)
    text_conditions: tuple = ()

    def __call__(self, text, refs, *, seeds, **kw):
        return [np.random.default_rng(s).integers(40, 256, (48, 48, 3)).astype(np.uint8) for s in seeds]


def test_protocol_mode_and_config_eval_metrics(scoring, tmp_path):
    """Mode B's (and validation's) path: run_protocol with the new metrics named in config.eval.metrics."""
    import ml_collections

    from persongen_jax.evaluation import protocol
    from persongen_jax.training.validation import scoring_metrics

    root = scoring
    # FID's path through run_protocol is Face Div.'s (per-set values); left out here for time (its network).
    ev = ml_collections.ConfigDict(
        {
            "metrics": ("clip_i", "dino", "face_div"),
            "clip": str(root / "clip"),
            "dino": str(root / "dino"),
            "inception": str(root / "inception"),
            "fid_reference": str(root / "fid_ref"),
            "lpips": str(root / "lpips"),
            "face_detector": str(root / "faces"),
            "arcface": "",
            "no_face": "zero",
            "det_thresh": 0.5,
            "face_select": "largest",
        }
    )
    chosen = scoring_metrics(ev)
    assert [m.name for m in chosen] == ["clip_i", "dino", "face_div"]
    sets = {"s": {"alice": [root / "ref0.png"]}}
    prompts = protocol.load_prompts()[:1]
    result = protocol.run_protocol(
        _FakePipe(), sets, prompts, chosen, tmp_path / "b", protocol.ProtocolSettings(seeds=(0, 1, 2))
    )
    s = result.metrics["sets"]["s"]
    assert s["n_images"] == 3 and s["clip_i"] is not None and s["dino"] is not None
    assert s["face_div"] > 0 and s["face_div_na"] == 0 and result.metrics["all"]["face_div"] == s["face_div"]


def test_fid_of_a_set_with_one_image_is_na_with_the_count():
    from persongen_jax.evaluation.fid import FeatureStats
    from persongen_jax.evaluation.metrics import FID

    fid = FID.__new__(FID)  # the per-set bookkeeping only: no network, no reference read
    stats = FeatureStats(4)
    stats.update(np.ones((1, 4)))
    fid.stats = {"b": stats, "all": stats}
    assert fid.set_values()["b"] == {"fid": None, "fid_note": "n/a (1 image; FID needs 2)"}


def test_a_metric_model_folder_missing_or_of_another_kind_is_one_line(scoring, tmp_path, capsys):
    from persongen_jax.evaluate import main

    root = scoring
    for flag, value, want in (
        ("--dino", tmp_path / "nowhere", "error: metric dino: "),
        ("--dino", root / "clip", "error: metric dino: " + str(root / "clip") + ": DINO needs a ViT folder"),
        (
            "--inception",
            root / "dino",
            "error: metric fid: " + str(root / "dino") + ": FID needs an InceptionV3 folder",
        ),
    ):
        args = _args(root, "--metrics", "dino,fid", "--out", str(tmp_path / "o"))
        args[args.index(flag) + 1] = str(value)
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith(want) and "Traceback" not in err, err
        assert not (tmp_path / "o" / "metrics.json").exists()
    with pytest.raises(SystemExit):  # argparse's usage error: --table goes with --compare
        main(["--manifest", str(root / "m.jsonl"), "--table", "--out", str(tmp_path / "t")])
    assert "--table goes with --compare" in capsys.readouterr().err
