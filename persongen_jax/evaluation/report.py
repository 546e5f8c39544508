"""Evaluation outputs: per-image scores -> summary metrics, CSV, JSON, an HTML report, comparison plots.

Evaluation produces one score row per generated image, a dict with the keys

    set           validation set name ("in_train", ...; manifest mode: the manifest's "set" or "all")
    reference     identity name (protocol mode) or reference image path (manifest mode)
    prompt_index  int | None
    prompt        str
    seed          int | None
    image         generated image path, relative to the output folder (or absolute)
    step          int | None (training step of the parameters that generated the image)
    <metric>      per metric name (`metrics.py`; by default clip_t and face_sim): float, or None when the
                  row is left out of that metric's mean (Face-Sim's "skip" convention)
    <found_key>   per metric that can miss (Face-Sim: face_found): bool

and this module turns them into files (`names`: the metric names, in column order):

    metrics = aggregate(rows, names)
    write_scores_csv(rows, out / "scores.csv", names)
    write_metrics_json(metrics, out / "metrics.json", step=step, checkpoint=str(ckpt))
    write_report_html(out / "report.html", rows, metrics, references=refs, title="step 2000",
                      settings={"steps": 30, "cfg": 5.0}, metric_names=names)

    # each metric against the training step, one line per run:
    plot_compare(["runs/a", "runs/b"], "compare/")

A run given to `plot_compare` / `load_history` is either a training workdir (its
`eval/history.jsonl`, one JSON object per evaluation and set) or an evaluate output
folder (its `metrics.json`, which must carry the "step" it was evaluated at).

Only numpy, Pillow, matplotlib and the standard library are used (and `metrics.py`'s display attributes,
which import no model): no JAX import, so reports and plots can be made on any machine.
"""

from __future__ import annotations

import csv
import html
import json
import numbers
import os
import re
import tempfile
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from persongen_jax.evaluation.metrics import DEFAULT_METRICS, display
from persongen_jax.io import chmod_as_created, loads_json

ROW_COLUMNS = ("set", "reference", "prompt_index", "prompt", "seed", "image")


def csv_columns(names: Sequence[str] = DEFAULT_METRICS) -> tuple[str, ...]:
    """scores.csv's header: the row columns, each metric's value (and found column), the step."""
    cols = [c for n in names for c in (n, display(n).found_key) if c]
    return ROW_COLUMNS + tuple(cols) + ("step",)


# --------------------------------------------------------------------------------------------------
# Aggregation


def _mean(values: list[float]) -> float | None:
    # Plain Python floats: the result goes into JSON, where numpy scalars are not serializable.
    return float(sum(values) / len(values)) if values else None


def _summary(rows: list[dict], names: Sequence[str]) -> dict:
    out = {"n_images": len(rows)}
    for name in names:
        # Rows with a None value are skipped, not counted as 0: that is what Face-Sim's "skip" convention
        # means. Under the other convention the no-face value (0.0) is already in the row and is averaged.
        out[name] = _mean([float(r[name]) for r in rows if r.get(name) is not None])
        m = display(name)
        if m.found_key:
            out[m.missing_key] = sum(1 for r in rows if not r[m.found_key])
            out[f"{m.missing_key}_images"] = [r["image"] for r in rows if not r[m.found_key]]
    return out


def _missing(row: dict, names: Sequence[str]) -> list[str]:
    """Labels of the metrics that found nothing to score in this row's image (e.g. ["no face"])."""
    return [display(n).missing_label for n in names if display(n).found_key and not row[display(n).found_key]]


def _group_by_set(rows: Iterable[dict]) -> dict[str, list[dict]]:
    # A dict keeps first-appearance order, which is the order the sets were evaluated in.
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["set"], []).append(row)
    return groups


def aggregate(rows: Sequence[dict], names: Sequence[str] = DEFAULT_METRICS) -> dict:
    """Means (and missing counts) of the metrics `names` per validation set and over all rows.

    Returns {"sets": {set: summary}, "all": summary} where a summary is {"n_images", <name>: mean, ...}
    plus, per metric that can miss, {<missing_key>: count, "<missing_key>_images": [...]} (Face-Sim:
    "no_face", "no_face_images"); a mean over no values is None.
    """
    rows = list(rows)
    return {
        "sets": {name: _summary(group, names) for name, group in _group_by_set(rows).items()},
        "all": _summary(rows, names),
    }


# --------------------------------------------------------------------------------------------------
# CSV / JSON


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    # numbers.Real minus Integral: Python and numpy floats (np.float32 is not a float subclass), not bools/ints.
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{value:.6f}"
    return str(value)


def write_scores_csv(rows: Sequence[dict], path: str | os.PathLike, names: Sequence[str] = DEFAULT_METRICS) -> Path:
    """One line per generated image (`csv_columns(names)`); None becomes an empty cell, floats get 6 decimals."""
    columns = csv_columns(names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # newline="" is what the csv module asks for: it writes its own line endings.
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(column)) for column in columns])
    return path


def write_metrics_json(metrics: dict, path: str | os.PathLike, **extra: Any) -> Path:
    """json.dump({**extra, **metrics}) atomically: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file is in the same folder so that os.replace is a rename on one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); metrics.json gets the mode open() gives (the umask's).
        chmod_as_created(tmp, directory=False)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({**extra, **metrics}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------
# HTML report

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; background: #fafafa; }
h1 { margin: 0 0 12px 0; font-size: 24px; }
h2 { margin: 32px 0 8px 0; padding-bottom: 4px; border-bottom: 2px solid #ccc; font-size: 20px; }
h3 { margin: 16px 0 6px 0; font-size: 15px; font-weight: 600; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0 16px 0; background: #fff; }
th, td { border: 1px solid #ccc; padding: 4px 10px; font-size: 14px; text-align: left; }
th { background: #eee; }
th.num { text-align: right; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.all td { font-weight: 600; background: #f3f3f3; }
.settings td:first-child { color: #555; }
/* One row per identity: the reference column stays on the left, generations wrap to its right, so
   the same prompt/seed lands in the same column for every identity. */
.identity { display: flex; gap: 14px; align-items: flex-start; }
.grid { flex: 1; display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.card { width: 160px; background: #fff; border: 1px solid #ddd; border-radius: 4px; padding: 4px;
        box-sizing: border-box; font-size: 12px; line-height: 1.35; }
.card img { width: 150px; height: 150px; object-fit: cover; display: block; background: #eee; }
.card.reference { flex: 0 0 160px; border: 2px solid #4a7bd0; background: #eef3fc; }
/* Further reference images as small thumbnails under the first, keeping the column 160px wide. */
.card.reference .more { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 4px; }
.card.reference .more img { width: 71px; height: 71px; }
.label { font-weight: 600; color: #2a56a8; }
.meta { color: #555; }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; background: #d32f2f; color: #fff;
         font-weight: 600; }
.card.noface { border: 2px solid #d32f2f; }
ul.noface { font-size: 13px; }
"""


def _href(image: str | os.PathLike, html_dir: Path) -> str:
    """URL of an image as seen from the HTML page: relative when possible, else a file:// URI."""
    image = Path(image)
    if image.is_absolute():
        try:
            # os.path.relpath (not Path.relative_to) also climbs with "..", so images next to the output
            # folder still get a relative, portable link.
            relative = os.path.relpath(image, html_dir.resolve())
        except ValueError:
            # Windows: a different drive has no relative path.
            return image.as_uri()
        return urllib.parse.quote(Path(relative).as_posix())
    return urllib.parse.quote(image.as_posix())


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _settings_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _cell(summary: dict, metric) -> str:
    """A means-table cell: the value, or the per-set metric's note when it has none ("n/a (1 of 3 ...)")."""
    if summary.get(metric.name) is None and summary.get(f"{metric.name}_note"):
        return html.escape(summary[f"{metric.name}_note"])
    return _fmt(summary.get(metric.name), metric.digits)


def _means_table(metrics: dict, names: Sequence[str]) -> list[str]:
    shown = [display(n) for n in names]
    titles = ["images"] + [m.title for m in shown] + [m.missing_label for m in shown if m.missing_key]
    header = "".join(f"<th class='num'>{html.escape(t)}</th>" for t in titles)
    out = ["<table class='means'>", f"<tr><th>set</th>{header}</tr>"]
    entries = [(name, summary, "") for name, summary in metrics.get("sets", {}).items()]
    if "all" in metrics:
        entries.append(("all", metrics["all"], " class='all'"))
    for name, s, cls in entries:
        cells = (
            [str(s["n_images"])]
            + [_cell(s, m) for m in shown]
            + [str(s[m.missing_key]) for m in shown if m.missing_key]
        )
        out.append(
            f"<tr{cls}><td>{html.escape(name)}</td>" + "".join(f"<td class='num'>{c}</td>" for c in cells) + "</tr>"
        )
    out.append("</table>")
    return out


def _reference_card(images: list[str], html_dir: Path) -> str:
    def img(p: str) -> str:
        href = html.escape(_href(p, html_dir))
        return f"<a href='{href}'><img src='{href}' alt='reference' title='{html.escape(str(p))}'></a>"

    if not images:
        body = "<div class='meta'>(no reference image)</div>"
    else:
        body = img(images[0])
        if len(images) > 1:
            body += "<div class='more'>" + "".join(img(p) for p in images[1:]) + "</div>"
    return f"<div class='card reference'>{body}<div class='label'>reference</div></div>"


def _generation_card(row: dict, html_dir: Path, names: Sequence[str]) -> str:
    href = html.escape(_href(row["image"], html_dir))
    prompt = html.escape(row.get("prompt") or "")
    ident = []
    if row.get("prompt_index") is not None:
        ident.append(f"prompt {row['prompt_index']}")
    if row.get("seed") is not None:
        ident.append(f"seed {row['seed']}")
    lines = [html.escape(" · ".join(ident)) if ident else ""]
    for name in names:
        m = display(name)
        if m.per_set:  # no value per image
            continue
        if m.found_key and not row[m.found_key]:
            lines.append(f"<span class='badge'>{html.escape(m.missing_label)}</span>")
        else:
            lines.append(f"{html.escape(m.title)} {_fmt(row.get(name), m.card_digits)}")
    cls = "card noface" if _missing(row, names) else "card"
    caption = "<br>".join(line for line in lines if line)
    return (
        f"<div class='{cls}'><a href='{href}'><img src='{href}' alt='{prompt}' title='{prompt}' "
        f"loading='lazy'></a><div class='meta'>{caption}</div></div>"
    )


def write_report_html(
    path: str | os.PathLike,
    rows: Sequence[dict],
    metrics: dict,
    *,
    references: dict[str, dict[str, list[str]]],
    title: str,
    settings: dict | None = None,
    metric_names: Sequence[str] = DEFAULT_METRICS,
) -> Path:
    """One HTML page: settings, means per set, then per set and identity the reference and its generations
    (each with its score per metric of `metric_names`), and the images a metric found nothing in.

    Images are linked, not embedded (the page stays small; keep it next to its images).
    references[set][identity] lists the reference image paths relative to the HTML file's folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    html_dir = path.parent
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        "<html lang='en'>",
        "<head>",
        "<meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]

    if settings:
        out.append("<table class='settings'>")
        for key, value in settings.items():
            out.append(f"<tr><td>{esc(str(key))}</td><td>{esc(_settings_value(value))}</td></tr>")
        out.append("</table>")

    out.extend(_means_table(metrics, metric_names))

    for set_name, set_rows in _group_by_set(rows).items():
        out.append(f"<h2>{esc(set_name)}</h2>")
        set_refs = references.get(set_name, {})
        by_identity: dict[str, list[dict]] = {}
        for row in set_rows:
            by_identity.setdefault(row["reference"], []).append(row)
        for identity, identity_rows in by_identity.items():
            out.append(f"<h3>{esc(str(identity))} <span class='meta'>({len(identity_rows)} images)</span></h3>")
            out.append("<div class='identity'>")
            out.append(_reference_card(set_refs.get(identity, []), html_dir))
            out.append("<div class='grid'>")
            out.extend(_generation_card(row, html_dir, metric_names) for row in identity_rows)
            out.append("</div></div>")

        for m in (display(n) for n in metric_names):
            if not m.found_key:
                continue
            missed = [row for row in set_rows if not row[m.found_key]]
            out.append(f"<h3>{esc(m.missing_title)} ({len(missed)})</h3>")
            if missed:
                out.append("<ul class='noface'>")
                for row in missed:
                    href = esc(_href(row["image"], html_dir))
                    out.append(
                        f"<li><a href='{href}'>{esc(str(row['image']))}</a> <span class='meta'>— "
                        f"{esc(str(row['reference']))}: {esc(row.get('prompt') or '')}</span></li>"
                    )
                out.append("</ul>")
            else:
                out.append("<p class='meta'>none</p>")

    out.extend(["</body>", "</html>", ""])
    path.write_text("\n".join(out), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# History of a run and comparison plots


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line; ValueError naming the file and line otherwise."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                # A trailing blank line (or one left by an interrupted append) carries nothing.
                continue
            out.append((lineno, loads_json(line, f"{path}, line {lineno}")))
    return out


def _read_history_jsonl(path: Path) -> list[dict]:
    records = []
    for lineno, record in read_jsonl(path):
        if not isinstance(record, dict) or "step" not in record or "set" not in record:
            raise ValueError(f"{path}, line {lineno}: expected a JSON object with 'step' and 'set'")
        records.append(record)
    return records


def _read_metrics_json(path: Path) -> list[dict]:
    metrics = loads_json(path.read_bytes(), path)
    if not isinstance(metrics, dict) or metrics.get("step") is None:
        # Without a step an evaluation cannot be placed on the training-step axis.
        raise ValueError(f"{path}: expected an evaluate metrics.json with a 'step' field")
    if not isinstance(metrics.get("sets"), dict):
        # A malformed file, not a caller's type error: ValueError like every other "not a run" case.
        raise ValueError(f"{path}: expected a 'sets' mapping of per-set metrics")  # noqa: TRY004
    names = metrics.get("metric_names") or list(DEFAULT_METRICS)
    return [
        {
            **{k: v for k, v in summary.items() if not k.endswith("_images")},
            "step": metrics["step"],
            "set": name,
            "metric_names": names,
        }
        for name, summary in metrics["sets"].items()
    ]


def load_history(run_dir: str | os.PathLike) -> list[dict]:
    """Evaluation records {"step", "set", "metric_names", <metric>: mean, ...} of a training workdir or evaluate
    output (records written before "metric_names" existed carry CLIP-T and Face-Sim).

    A training workdir's eval/history.jsonl wins over a metrics.json in the same folder.
    """
    run_dir = Path(run_dir)
    history = run_dir / "eval" / "history.jsonl"
    metrics = run_dir / "metrics.json"
    if history.is_file():
        return _read_history_jsonl(history)
    if metrics.is_file():
        return _read_metrics_json(metrics)
    raise ValueError(
        f"{run_dir}: expected a training workdir with eval/history.jsonl or an evaluate output "
        "folder with metrics.json; found neither"
    )


def _safe_filename(name: str) -> str:
    # Set names become part of a file name: keep it to characters every filesystem accepts.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "set"


def _series(records: list[dict], set_name: str, metric: str) -> tuple[list, list]:
    # Keyed by step so a step evaluated twice (e.g. a resumed run) is drawn once, with its latest value.
    points: dict[int, float] = {}
    for record in records:
        if record.get("set") == set_name and record.get("step") is not None and record.get(metric) is not None:
            points[int(record["step"])] = float(record[metric])
    steps = sorted(points)
    return steps, [points[step] for step in steps]


def plot_compare(
    run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, labels: Sequence[str] | None = None
) -> list[Path]:
    """One PNG per metric and validation set, `out_dir/{metric}_{set}.png`: metric against step, a line per run.

    A run without a set is absent from that set's plots; a metric with no value in any run
    (e.g. Face-Sim never computed) gets no plot. Returns the written paths.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if labels is None:
        # resolve(): "." or "runs/a/" still get a readable name.
        labels = [d.resolve().name or str(d) for d in run_dirs]
    elif len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    histories = [load_history(d) for d in run_dirs]
    if not any(histories):
        raise ValueError(f"no evaluation history in any of the runs: {', '.join(str(d) for d in run_dirs)}")

    set_names: dict[str, None] = {}  # first-appearance order over all runs
    for records in histories:
        for record in records:
            set_names.setdefault(str(record["set"]), None)

    # Agg: files only, no display needed. Selected here, not at import, so importing this module has no
    # effect on the matplotlib backend of a caller that shows figures.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric_names: dict[str, None] = {}  # first-appearance order over all runs
    for records in histories:
        for record in records:
            for name in record.get("metric_names") or DEFAULT_METRICS:
                metric_names.setdefault(name, None)
    written = []
    for metric in metric_names:
        shown = display(metric)
        for set_name in set_names:
            # A fixed color per run ("C0", "C1", ... by position) so a run looks the same in every plot,
            # also in the plots of a set some runs lack.
            series = [
                (f"C{i % 10}", label, *_series(records, set_name, metric))
                for i, (label, records) in enumerate(zip(labels, histories))
            ]
            series = [s for s in series if s[2]]
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
            try:
                for color, label, steps, values in series:
                    ax.plot(steps, values, marker="o", markersize=4, color=color, label=label)
                ax.set_title(f"{shown.title} — {set_name}")
                ax.set_xlabel("training step")
                ax.set_ylabel(shown.axis_label)
                # Round step ticks (500, 1000, ...) rather than the 600s MaxNLocator picks by default.
                ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
                ax.grid(True, alpha=0.3)
                ax.legend()
                fig.tight_layout()
                out = out_dir / f"{metric}_{_safe_filename(set_name)}.png"
                fig.savefig(out)
            finally:
                # pyplot keeps every figure alive until closed; many sets would otherwise pile up memory.
                plt.close(fig)
            written.append(out)
    return written
