"""Evaluation report: aggregation, CSV/JSON, HTML page, run histories and comparison plots (no JAX)."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from persongen_jax.evaluation.report import (
    aggregate,
    load_history,
    plot_compare,
    write_metrics_json,
    write_report_html,
    write_scores_csv,
)

NEON_PROMPT = 'a man in front of the "Neon Bank" sign, 3 < 4'


def _row(set_name, reference, prompt_index, seed, clip_t, face_sim, face_found, prompt="a photo of a person"):
    return {
        "set": set_name,
        "reference": reference,
        "prompt_index": prompt_index,
        "prompt": prompt,
        "seed": seed,
        "image": f"images/{set_name}/{reference}_p{prompt_index}_s{seed}.png",
        "clip_t": clip_t,
        "face_sim": face_sim,
        "face_found": face_found,
        "step": 1000,
    }


@pytest.fixture
def rows():
    return [
        _row("in_train", "alice", 0, 1, 30.0, 0.6, True),
        _row("in_train", "alice", 1, 1, 20.0, 0.0, False, prompt=NEON_PROMPT),  # no face, counted as 0.0
        _row("in_train", "bob", 0, 2, 25.0, 0.4, True),
        _row("held_out", "carol", 0, 1, 28.0, 0.5, True),
        _row("held_out", "carol", 1, 1, 22.0, None, False),  # no face, skipped
    ]


def test_aggregate_two_sets(rows):
    m = aggregate(rows)
    assert list(m["sets"]) == ["in_train", "held_out"]  # first appearance

    in_train = m["sets"]["in_train"]
    assert in_train["n_images"] == 3
    assert in_train["clip_t"] == pytest.approx(25.0)
    assert in_train["face_sim"] == pytest.approx((0.6 + 0.0 + 0.4) / 3)
    assert in_train["no_face"] == 1
    assert in_train["no_face_images"] == ["images/in_train/alice_p1_s1.png"]

    held_out = m["sets"]["held_out"]
    assert held_out["n_images"] == 2
    assert held_out["clip_t"] == pytest.approx(25.0)
    assert held_out["face_sim"] == pytest.approx(0.5)  # the None row is left out, not averaged as 0
    assert held_out["no_face"] == 1

    total = m["all"]
    assert total["n_images"] == 5
    assert total["clip_t"] == pytest.approx(125.0 / 5)
    assert total["face_sim"] == pytest.approx((0.6 + 0.0 + 0.4 + 0.5) / 4)
    assert total["no_face"] == 2
    assert type(total["clip_t"]) is float and type(total["face_sim"]) is float
    json.dumps(m)  # plain Python types only


def test_aggregate_no_face_sim_at_all():
    m = aggregate([_row("all", "x", 0, 0, 10.0, None, False)])
    assert m["all"]["face_sim"] is None and m["all"]["no_face"] == 1


def test_scores_csv_round_trip(rows, tmp_path):
    path = write_scores_csv(rows, tmp_path / "scores.csv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [
            "set",
            "reference",
            "prompt_index",
            "prompt",
            "seed",
            "image",
            "clip_t",
            "face_sim",
            "face_found",
            "step",
        ]
        read = list(reader)
    assert len(read) == len(rows)
    assert read[0]["clip_t"] == "30.000000" and read[0]["face_sim"] == "0.600000"
    assert read[1]["prompt"] == NEON_PROMPT  # quotes and commas survive
    assert read[1]["face_found"] == "False"
    assert read[4]["face_sim"] == ""  # None -> empty cell
    for original, back in zip(rows, read):
        assert back["image"] == original["image"]
        assert int(back["seed"]) == original["seed"] and int(back["step"]) == original["step"]
        assert float(back["clip_t"]) == pytest.approx(original["clip_t"])


def test_metrics_json(rows, tmp_path):
    path = write_metrics_json(aggregate(rows), tmp_path / "out" / "metrics.json", step=1000, checkpoint="c")
    data = json.loads(path.read_text())
    assert data["step"] == 1000 and data["checkpoint"] == "c"
    assert data["all"]["n_images"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_report_html(rows, tmp_path):
    references = {
        "in_train": {"alice": ["refs/alice_0.png", "refs/alice_1.png"], "bob": ["refs/bob.png"]},
        "held_out": {"carol": ["refs/carol.png"]},
    }
    path = write_report_html(
        tmp_path / "report.html",
        rows,
        aggregate(rows),
        references=references,
        title="step <1000>",
        settings={"steps": 30, "cfg": 5.0},
    )
    text = path.read_text(encoding="utf-8")
    assert text.count("<img ") == len(rows) + 4  # every generation + every reference image
    for row in rows:
        assert f"src='{row['image']}'" in text
    assert "src='refs/alice_1.png'" in text
    assert text.count(">reference<") == 3  # one reference cell per identity
    assert text.count("class='badge'>no face<") == 2
    assert "&quot;Neon Bank&quot;" in text and "3 &lt; 4" in text
    assert '"Neon Bank"' not in text and "3 < 4" not in text
    assert "step &lt;1000&gt;" in text
    assert "<td>steps</td><td>30</td>" in text
    assert "CLIP-T 30.0" in text and "Face-Sim 0.600" in text


def test_report_html_absolute_image_paths(tmp_path):
    row = _row("all", "/data/ref.png", None, None, 25.0, 0.5, True)
    row["image"] = str(tmp_path / "elsewhere" / "gen 1.png")
    out = tmp_path / "out" / "report.html"
    text = write_report_html(out, [row], aggregate([row]), references={}, title="t").read_text()
    assert "src='../elsewhere/gen%201.png'" in text  # relative to the page, URL-quoted


def test_load_history_bad_line(tmp_path):
    (tmp_path / "eval").mkdir()
    good = json.dumps({"step": 100, "set": "in_train", "clip_t": 25.0, "face_sim": 0.4})
    (tmp_path / "eval" / "history.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"history\.jsonl, line 2"):
        load_history(tmp_path)


def test_load_history_missing(tmp_path):
    with pytest.raises(ValueError, match="history.jsonl.*metrics.json"):
        load_history(tmp_path)


def test_load_history_metrics_json_needs_step(tmp_path):
    write_metrics_json({"sets": {}, "all": {}}, tmp_path / "metrics.json")
    with pytest.raises(ValueError, match="'step'"):
        load_history(tmp_path)


def _training_run(root, name, sets, steps, offset):
    run = root / name
    (run / "eval").mkdir(parents=True)
    lines = [
        json.dumps({"step": step, "set": s, "clip_t": 25.0 + offset + i, "face_sim": 0.3 + offset / 10 + i / 20})
        for i, step in enumerate(steps)
        for s in sets
    ]
    (run / "eval" / "history.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_plot_compare(rows, tmp_path):
    a = _training_run(tmp_path, "run_a", ["in_train", "held_out"], [500, 1000, 1500], 0.0)
    b = _training_run(tmp_path, "run_b", ["in_train"], [500, 1000], 1.0)
    # An evaluate output folder: metrics.json with the step it was evaluated at.
    c = tmp_path / "eval_c"
    write_metrics_json(aggregate(rows), c / "metrics.json", step=1000)
    assert {r["set"] for r in load_history(c)} == {"in_train", "held_out"}

    written = plot_compare([a, b, c], tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["clip_t_held_out.png", "clip_t_in_train.png", "face_sim_held_out.png", "face_sim_in_train.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert 400 <= image.width <= 2000 and 300 <= image.height <= 1500


def test_plot_compare_labels_and_empty(tmp_path):
    empty = tmp_path / "empty"
    (empty / "eval").mkdir(parents=True)
    (empty / "eval" / "history.jsonl").write_text("")
    with pytest.raises(ValueError, match="no evaluation history"):
        plot_compare([empty], tmp_path / "plots")

    only = tmp_path / "only"
    write_metrics_json(aggregate([_row("all", "x", 0, 0, 20.0, 0.5, True)]), only / "metrics.json", step=42)
    written = plot_compare([only, empty], tmp_path / "plots", labels=["only", "empty"])
    assert sorted(p.name for p in written) == ["clip_t_all.png", "face_sim_all.png"]
    with pytest.raises(ValueError, match="labels"):
        plot_compare([only], tmp_path / "plots", labels=["a", "b"])
