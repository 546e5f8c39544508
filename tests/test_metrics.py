"""Pluggable metrics (persongen_jax/evaluation/metrics.py): a metric registered by name flows through
scoring, metrics.json, scores.csv, report.html and the --compare plots without touching them."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from persongen_jax.evaluation import metrics, protocol, report


@pytest.fixture
def brightness():
    """A metric a researcher adds: mean brightness, 'nothing to score' for an all-black image."""

    @metrics.register
    class Brightness(metrics.Metric):
        name, title, axis_label, digits, card_digits = "brightness", "Brightness", "mean pixel / 255", 3, 2
        found_key, missing_key, missing_label, missing_title = "lit", "dark", "dark", "Dark images"

        @classmethod
        def from_options(cls, options):
            return cls()

        def prepare_references(self, images, names):
            return float(np.mean([np.asarray(im) for im in images]) / 255)

        def __call__(self, images, prompts, references):
            values = [float(np.asarray(im).mean() / 255) for im in images]
            return metrics.MetricResult([v if v > 0 else None for v in values], [v > 0 for v in values])

    yield Brightness
    del metrics.REGISTRY["brightness"]


def test_a_registered_metric_runs_through_every_output(brightness, tmp_path):
    for name, value in (("grey", 128), ("white", 255), ("black", 0)):
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "m.jsonl").write_text(
        "".join(
            json.dumps({"image": f"{n}.png", "prompt": "a photo", "reference": "grey.png", "set": s}) + "\n"
            for n, s in (("grey", "a"), ("white", "a"), ("black", "b"))
        )
    )
    chosen = metrics.build(["brightness"], {})
    result = protocol.score_manifest(tmp_path / "m.jsonl", chosen, tmp_path / "out", trigger_word=None)

    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["metric_names"] == ["brightness"]
    assert m["sets"]["a"]["brightness"] == pytest.approx((128 / 255 + 1.0) / 2)
    assert m["sets"]["b"] == {"n_images": 1, "brightness": None, "dark": 1, "dark_images": ["../black.png"]}
    assert "clip_t" not in m["all"] and result.metrics == {k: m[k] for k in ("sets", "all")}
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(report.csv_columns(["brightness"]))
    assert [r["lit"] for r in table] == ["True", "True", "False"]
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th class='num'>Brightness</th>" in page and "Brightness 1.00" in page and "Dark images (1)" in page

    # --compare plots whatever metric names the history carries.
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "history.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "set": "a", "brightness": 0.1 * s, "metric_names": ["brightness"]}) + "\n"
            for s in (1, 2)
        )
    )
    written = report.plot_compare([run], tmp_path / "plots")
    assert [p.name for p in written] == ["brightness_a.png"]


def test_build_names_what_is_missing():
    with pytest.raises(ValueError, match=r"clip_t needs clip .*face_sim needs face_detector .*face_sim needs arcface"):
        metrics.build(["clip_t", "face_sim"], {})
    with pytest.raises(ValueError, match="unknown metric 'kid'"):
        metrics.build(["kid"], {})
