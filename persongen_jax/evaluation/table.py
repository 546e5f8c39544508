"""The method-comparison table, laid out as PhotoMaker's Table 1: one row per run, one column per metric, and
seconds per image.

    rows, columns = comparison(["eval/photomaker", "eval/final_method"], labels=["PhotoMaker", "Ours"])
    paths = write_table(["eval/photomaker", "eval/final_method"], "tables/")   # table.md, table.csv

A run is an `evaluate` output folder: its metrics.json's "all" summary gives each metric's value (means of
per-image metrics, per-set metrics such as FID over all images) and its "seconds" the time per image:
"gen s/img" = generation seconds / images (mode B; PhotoMaker's "Speed"), "eval s/img" = the whole
evaluation's seconds / images. Metrics appear in first-appearance order over the runs; a run without a
metric has "–" there. `evaluate --compare RUN_A RUN_B ... --table --out DIR` prints the Markdown and writes
DIR/table.md and DIR/table.csv.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

from persongen_jax.evaluation.metrics import display

TIME_COLUMNS = ("gen s/img", "eval s/img")


def _read(run: Path) -> dict:
    path = run / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{run}: --table reads an evaluate output folder (metrics.json); none there")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("all"), dict):
        raise ValueError(f"{path}: expected an evaluate metrics.json with an 'all' summary")
    return data


def comparison(
    run_dirs: Sequence[str | os.PathLike], labels: Sequence[str] | None = None
) -> tuple[list[dict], list[str]]:
    """-> (rows {"run", <metric>: value or None, "gen s/img", "eval s/img", "images"}, metric names)."""
    runs = [Path(d) for d in run_dirs]
    labels = list(labels) if labels is not None else [d.resolve().name or str(d) for d in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    data = [_read(d) for d in runs]
    names: dict[str, None] = {}
    for d in data:
        for n in d.get("metric_names") or [k for k in d["all"] if display(k).title != k]:
            names.setdefault(n, None)
    rows = []
    for label, d in zip(labels, data):
        summary, seconds = d["all"], d.get("seconds") or {}
        n = summary.get("n_images") or 0
        per_image = lambda key: round(seconds[key] / n, 3) if n and seconds.get(key) is not None else None  # noqa
        rows.append(
            {
                "run": label,
                **{m: summary.get(m) for m in names},
                "images": n,
                "gen s/img": per_image("generate"),
                "eval s/img": per_image("total"),
            }
        )
    return rows, list(names)


def _fmt(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict], names: Sequence[str]) -> str:
    """The table as GitHub Markdown (metric titles as headers, each metric at its report digits)."""
    header = ["Method", *(display(n).title for n in names), "images", *TIME_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [
            r["run"],
            *(_fmt(r[n], display(n).digits) for n in names),
            str(r["images"]),
            *(_fmt(r[c], 3) for c in TIME_COLUMNS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(
    run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, labels: Sequence[str] | None = None
) -> tuple[str, list[Path]]:
    """Writes out_dir/table.md and out_dir/table.csv (metric names as CSV columns, full precision);
    returns (the Markdown, [paths])."""
    rows, names = comparison(run_dirs, labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, names)
    (out_dir / "table.md").write_text(text, encoding="utf-8")
    with open(out_dir / "table.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        columns = ["run", *names, "images", *TIME_COLUMNS]
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r[c] is None else r[c] for c in columns])
    return text, [out_dir / "table.md", out_dir / "table.csv"]
