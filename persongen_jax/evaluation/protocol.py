"""The validation protocol: validation sets x identities x prompts x seeds -> images -> metrics (CLIP-T, Face-Sim).

    sets = load_sets({"in_train": "val/in_train", "out_of_domain": "val/ood"})
    prompts = load_prompts()                       # the research's 4 prompts (validation_prompts.json)
    metrics = evaluation.metrics.build(["clip_t", "face_sim"], {"clip": "weights/clip-vit-large-patch14",
                            "face_detector": "weights/antelopev2", "arcface": "weights/arcface_r100"})
    result = run_protocol(pipe, sets, prompts, metrics, "eval_out/", ProtocolSettings(seeds=(0, 1)))
    result.metrics["sets"]["in_train"]["face_sim"]

A validation set is a folder; each image file in it is one identity (its only reference face), each
sub-folder is one identity with all the images inside as reference faces. Every identity is generated
with every prompt and every seed (one compiled call per prompt: all seeds together), scored by each
chosen metric (`metrics.py`: CLIP-T against the prompt text without the trigger word, Face-Sim against the
identity's reference faces), then written as OUT/images/<set>/<identity>/<prompt>_s<seed>.png, metrics.json,
scores.csv and report.html (`report.py`).

Split prompts: a prompt may have a split version, P_general plus the texts of text conditions keyed by
condition name (the research's: P_bg under "bg"). With a pipeline that has adapters for all of a prompt's
conditions (the split-prompt methods) the prompt is generated as P_general (+ trigger word) with each
condition text through its adapter (`split="auto"`, the default); `split="never"` always uses the full
prompt, `split="always"` fails for a model that lacks one of the adapters.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from persongen_jax.evaluation import report
from persongen_jax.evaluation.metrics import Metric
from persongen_jax.io import loads_json
from persongen_jax.pipeline.image_processing import ImageError, load_image
from persongen_jax.pipeline.prompt import DEFAULT_TRIGGER_WORD, strip_trigger_word
from persongen_jax.pipeline.settings import SamplingSettings

DEFAULT_PROMPTS = Path(__file__).with_name("validation_prompts.json")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLIT_MODES = ("auto", "never", "always")


@dataclass(frozen=True)
class ValidationPrompt:
    """One validation prompt: the full text, its class word, and its optional split version."""

    name: str
    prompt: str  # full text: what CLIP-T scores against
    class_word: str  # the trigger word goes right after its first occurrence
    general: str = ""  # split version: P_general ...
    conditions: dict = field(default_factory=dict)  # ... and {condition name: text}, e.g. {"bg": P_bg}

    def with_trigger(self, text: str, trigger: str) -> str:
        new, n = re.subn(rf"\b{re.escape(self.class_word)}\b", f"{self.class_word} {trigger}", text, count=1)
        if not n:
            raise ValueError(f"validation prompt {self.name!r}: class word {self.class_word!r} not in {text!r}")
        return new


PROMPT_FIELDS = ("name", "prompt", "class_word", "general")


def _prompt(item: dict) -> ValidationPrompt:
    """A prompts-file entry: the PROMPT_FIELDS, and every other (non-"_") key is a condition's text."""
    item = {k: v for k, v in item.items() if not k.startswith("_")}
    conditions = {k: item.pop(k) for k in list(item) if k not in PROMPT_FIELDS}
    bad = [k for k, v in conditions.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"prompt {item.get('name')!r}: condition texts {bad} must be strings")
    return ValidationPrompt(**item, conditions=conditions)


def load_prompts(path: str | os.PathLike | None = None) -> list[ValidationPrompt]:
    """A JSON file {"prompts": [{name, prompt, class_word, general?, <condition>?...}, ...]} (default: the
    research's 4, with P_bg as "bg")."""
    path = Path(path) if path else DEFAULT_PROMPTS
    try:
        data = loads_json(path.read_bytes(), path)
        items = data["prompts"]
        prompts = [_prompt(p) for p in items]
    except FileNotFoundError:
        raise ValueError(f"{path}: no such prompts file") from None
    except (KeyError, TypeError) as e:
        raise ValueError(
            f'{path}: expected {{"prompts": [{{"name", "prompt", "class_word", "general", '
            f"condition texts}}, ...]}} ({type(e).__name__}: {e})"
        ) from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    names = [p.name for p in prompts]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: prompt names must be unique, got {names}")
    for p in prompts:
        p.with_trigger(p.prompt, "img")  # class word present: fail now, not after hours of generation
        if bool(p.general) != bool(p.conditions):
            raise ValueError(
                f"{path}: prompt {p.name!r} needs both 'general' and condition texts (e.g. 'bg') for the split version"
            )
    return prompts


def parse_sets(text: str) -> dict[str, str]:
    """ "in_train=val/a,out_of_domain=val/b" -> {"in_train": "val/a", ...} (also ';' separated)."""
    sets = {}
    for part in filter(None, (p.strip() for p in re.split(r"[,;]", text or ""))):
        name, sep, folder = part.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise ValueError(f"bad validation set {part!r}: expected NAME=FOLDER")
        sets[name.strip()] = folder.strip()
    return sets


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_sets(spec: Mapping[str, str | os.PathLike]) -> dict[str, dict[str, list[Path]]]:
    """{set: folder} -> {set: {identity: [reference image paths]}}; empty or missing folders are errors."""
    sets = {}
    for name, folder in spec.items():
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"validation set {name!r}: {folder} is not a folder")
        ids = {p.stem: [p] for p in _images_in(folder)}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            imgs = _images_in(sub)
            if not imgs:
                raise ValueError(f"validation set {name!r}: {sub} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            if sub.name in ids:
                raise ValueError(f"validation set {name!r}: identity {sub.name!r} is both a file and a folder")
            ids[sub.name] = imgs
        if not ids:
            raise ValueError(f"validation set {name!r}: {folder} has no reference images or identity folders")
        sets[name] = ids
    return sets


@dataclass(frozen=True)
class ProtocolSettings(SamplingSettings):
    """The sampling settings of the protocol (its own default seeds: the research's 5 per identity and
    prompt), the split-prompt mode and the trigger word written after each prompt's class word."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    split: str = "auto"
    trigger_word: str = DEFAULT_TRIGGER_WORD


@dataclass
class ProtocolResult:
    rows: list
    metrics: dict
    out_dir: Path
    seconds: dict = field(default_factory=dict)


def scoring_info(metrics: Sequence[Metric]) -> dict:
    """What metrics.json records about the scoring: the metric names and each metric's settings."""
    info = {"metric_names": [m.name for m in metrics]}
    for m in metrics:
        info.update(m.settings())
    return info


def shown_settings(metrics: Sequence[Metric]) -> dict:
    """The scoring conventions the report's settings table shows (e.g. "no face": "zero")."""
    return {m.missing_label: m.settings().get(m.missing_key) for m in metrics if m.missing_key}


def empty_row(**fields) -> dict:
    """A score row (report.py) with no scores yet."""
    return {"prompt_index": None, "seed": None, "step": None, **fields}


def score_rows(rows: list[dict], images: Sequence, metrics: Sequence[Metric], references: Sequence[dict]) -> None:
    """Fills each metric's value (and found column) of `rows` (one per image) in place; references: per image,
    {metric name: the identity's prepared references}."""
    prompts = [r["prompt"] for r in rows]
    for m in metrics:
        if m.per_set:  # FID, Face Div.: gathered here, one value per set at the end (`add_set_values`)
            m.accumulate(images, [(r["set"], r["reference"], r.get("prompt_index", r["prompt"])) for r in rows])
            for r in rows:
                r[m.name] = None
            continue
        result = m(images, prompts, [ref.get(m.name) for ref in references])
        for i, r in enumerate(rows):
            r[m.name] = result.values[i]
            if m.found_key:
                r[m.found_key] = bool(result.found[i])


def reset_set_metrics(metrics: Sequence[Metric]) -> None:
    """A new evaluation: the per-set metrics forget earlier images."""
    for m in metrics:
        if m.per_set:
            m.reset()


def add_set_values(summary: dict, metrics: Sequence[Metric]) -> dict:
    """Writes each per-set metric's values (FID, Face Div.) into `report.aggregate`'s summary, in place."""
    for m in metrics:
        if m.per_set:
            values = m.set_values()
            for name, entry in [*summary["sets"].items(), ("all", summary["all"])]:
                entry.update(values.get(name, {m.name: None}))
    return summary


def prepare_references(metrics: Sequence[Metric], images: Sequence, names: Sequence[str]) -> dict:
    """{metric name: what it prepared from one identity's reference images} (e.g. Face-Sim's embeddings)."""
    return {m.name: m.prepare_references(images, names) for m in metrics}


def _use_split(pipe, prompt: ValidationPrompt, mode: str) -> bool:
    """Whether `prompt` is generated in its split version (P_general + condition texts) on `pipe`."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"split={mode!r}; expected one of {list(SPLIT_MODES)}")
    missing = sorted(set(prompt.conditions) - set(pipe.text_conditions))
    if mode == "always" and (missing or not prompt.general):
        raise ValueError(
            f"split='always': prompt {prompt.name!r} needs a split version and a model with "
            f"adapters for {sorted(prompt.conditions) or 'its conditions'} (missing: {missing}; "
            "--adapters)"
        )
    return bool(prompt.general) and not missing and mode != "never"


def load_references(sets: dict[str, dict[str, list[Path]]], metrics: Sequence[Metric]) -> dict:
    """{(set, identity): (reference images, {metric name: prepared references})}, each file read once; a
    reference a metric cannot use (Face-Sim: no face) fails here, naming the file, before anything is
    generated."""
    out = {}
    for name, ids in sets.items():
        for ident, paths in ids.items():
            images = [load_image(p, composite_on_white=True) for p in paths]
            out[(name, ident)] = images, prepare_references(metrics, images, [str(p) for p in paths])
    return out


def run_protocol(
    pipe,
    sets: dict[str, dict[str, list[Path]]],
    prompts: Sequence[ValidationPrompt],
    metrics: Sequence[Metric],
    out_dir: str | os.PathLike,
    settings: ProtocolSettings | None = None,
    *,
    step: int | None = None,
    title: str = "validation",
    extra: dict | None = None,
    progress: bool = False,
    score_every: int = 256,
    references: dict | None = None,
) -> ProtocolResult:
    """Generates, scores and writes the whole protocol into out_dir (see module doc). Images are scored
    in chunks of about `score_every` (bounded host memory at 1024 x 1024). metrics: `metrics.build(...)`;
    none: the images and the report without scores. references: from `load_references` (loaded here when
    not given)."""
    settings = settings or ProtocolSettings()
    # The size the images get, recorded in metrics.json (not None: "the model's" is not a size).
    settings = replace(settings, height=settings.height or pipe.default_size, width=settings.width or pipe.default_size)
    if pipe.id_encoder is None:
        raise ValueError(
            "the validation protocol generates identities: the model needs an ID encoder (--photomaker DIR)"
        )
    references = references if references is not None else load_references(sets, metrics)
    reset_set_metrics(metrics)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, ref_paths = [], {}  # ref_paths: the report's reference column
    pending: list[tuple[dict, np.ndarray, dict]] = []  # (row, image, prepared references) to score
    gen_s = score_s = 0.0

    def flush():
        # Scored in chunks: full batches for CLIP / ArcFace without holding every image in memory.
        nonlocal score_s
        if pending:
            t = time.perf_counter()
            score_rows([p[0] for p in pending], [p[1] for p in pending], metrics, [p[2] for p in pending])
            score_s += time.perf_counter() - t
            pending.clear()

    for set_name, identities in sets.items():
        ref_paths[set_name] = {}
        for ident in identities:
            refs, emb = references[(set_name, ident)]
            ref_dir = out_dir / "images" / set_name / ident
            ref_dir.mkdir(parents=True, exist_ok=True)
            ref_paths[set_name][ident] = []
            for k, im in enumerate(refs):  # a copy next to the generations: the report folder stands alone
                im.save(ref_dir / f"reference_{k}.png")
                ref_paths[set_name][ident].append(f"images/{set_name}/{ident}/reference_{k}.png")
            for pi, vp in enumerate(prompts):
                split = _use_split(pipe, vp, settings.split)
                text = vp.with_trigger(vp.general if split else vp.prompt, settings.trigger_word)
                t = time.perf_counter()
                gen = pipe(
                    text,
                    refs,
                    seeds=list(settings.seeds),
                    conditions=vp.conditions if split else None,
                    progress=progress,
                    **settings.call_kwargs(),
                )
                gen_s += time.perf_counter() - t
                for seed, img in zip(settings.seeds, gen):
                    rel = f"images/{set_name}/{ident}/{vp.name}_s{seed}.png"
                    Image.fromarray(img).save(out_dir / rel)
                    rows.append(
                        empty_row(
                            set=set_name,
                            reference=ident,
                            prompt_index=pi,
                            prompt=vp.prompt,
                            seed=int(seed),
                            image=rel,
                            step=step,
                        )
                    )
                    pending.append((rows[-1], img, emb))
                if len(pending) >= score_every:
                    flush()
    flush()
    names = [m.name for m in metrics]
    summary = add_set_values(report.aggregate(rows, names), metrics)
    seconds = {"generate": round(gen_s, 2), "score": round(score_s, 2), "total": round(time.perf_counter() - t0, 2)}
    info = {
        "step": step,
        **scoring_info(metrics),
        "settings": {**asdict(settings), "seeds": list(settings.seeds)},
        "clip_t_text": "the validation prompt without the trigger word (prompts[].prompt)",
        "prompts": [asdict(p) for p in prompts],
        "seconds": seconds,
        **(extra or {}),
    }
    report.write_scores_csv(rows, out_dir / "scores.csv", names)
    report.write_metrics_json(summary, out_dir / "metrics.json", **info)
    shown = {
        "step": step,
        "seeds": list(settings.seeds),
        "steps": settings.num_steps,
        "guidance": settings.guidance_scale,
        **shown_settings(metrics),
        **(extra or {}),
    }
    shown = {k: v for k, v in shown.items() if v not in (None, "")}
    report.write_report_html(
        out_dir / "report.html", rows, summary, references=ref_paths, title=title, settings=shown, metric_names=names
    )
    return ProtocolResult(rows, summary, out_dir, seconds)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """JSONL, one generated image per line: {"image", "prompt", "reference" (a path or a list of paths),
    "set" (optional, default "all")}. Relative paths are relative to the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such manifest file")
    entries = []
    for n, e in report.read_jsonl(path):
        missing = [k for k in ("image", "prompt", "reference") if not isinstance(e, dict) or k not in e]
        if missing:
            raise ValueError(f"{path}, line {n}: missing {missing} (expected image, prompt, reference[, set])")
        refs = e["reference"] if isinstance(e["reference"], list) else [e["reference"]]
        text = lambda v: isinstance(v, str) and v.strip()  # noqa: E731
        for key, ok, want in (
            ("image", text(e["image"]), "a path string"),
            ("prompt", text(e["prompt"]), "a string"),
            (
                "reference",
                refs and all(text(r) for r in refs),
                "a path string or a non-empty list of them (Face-Sim needs a reference face)",
            ),
            ("set", e.get("set") is None or isinstance(e["set"], str), "a string"),
        ):
            if not ok:
                raise ValueError(
                    f"{path}, line {n}: {key}={e.get(key)!r} (a {type(e.get(key)).__name__}): expected {want}"[:400]
                )
        entries.append(
            {
                "image": (path.parent / e["image"]).resolve(),
                "prompt": str(e["prompt"]),
                "references": tuple((path.parent / r).resolve() for r in refs),
                "set": str(e.get("set") or "all"),
                "line": n,
            }
        )
    if not entries:
        raise ValueError(f"{path}: empty manifest")
    return entries


def _clip_t_prompts(manifest, entries: list[dict], trigger_word: str | None) -> None:
    """Sets e["clip_t_prompt"]: the manifest prompt without the trigger word, as mode B scores its prompts."""
    for e in entries:
        try:
            e["clip_t_prompt"] = strip_trigger_word(e["prompt"], trigger_word) if trigger_word else e["prompt"]
        except ValueError as err:
            raise ValueError(f"{manifest}, line {e['line']}: {err} (--trigger-word names it)") from None


def _manifest_image(manifest, entry: dict, path: Path):
    """An image of a manifest entry, as evaluation scores it; an unreadable one is an ImageError naming the
    manifest line too (as the manifest's other errors)."""
    try:
        return load_image(path, composite_on_white=True)
    except ImageError as e:
        raise ImageError(f"{manifest}, line {entry['line']}: {e}") from None


def score_manifest(
    manifest: str | os.PathLike,
    metrics: Sequence[Metric],
    out_dir: str | os.PathLike,
    *,
    title: str | None = None,
    extra: dict | None = None,
    trigger_word: str | None = DEFAULT_TRIGGER_WORD,
) -> ProtocolResult:
    """Mode A: scores existing images listed in a manifest; writes metrics.json, scores.csv, report.html.
    CLIP-T scores each prompt without `trigger_word` (None or "": the prompt as written); scores.csv's
    "prompt" is the text scored."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = read_manifest(manifest)
    _clip_t_prompts(manifest, entries, trigger_word)
    images = [_manifest_image(manifest, e, e["image"]) for e in entries]  # all read before any model runs
    ref_cache: dict[tuple, dict] = {}
    references: dict[str, dict[str, list[str]]] = {}
    for e in entries:
        key = e["references"]
        if key not in ref_cache:
            ref_cache[key] = prepare_references(
                metrics, [_manifest_image(manifest, e, p) for p in key], [str(p) for p in key]
            )
        name = ", ".join(p.name for p in key)
        references.setdefault(e["set"], {})[name] = [os.path.relpath(p, out_dir) for p in key]
        e["reference_name"] = name
    rows = [
        empty_row(
            set=e["set"],
            reference=e["reference_name"],
            prompt=e["clip_t_prompt"],
            image=os.path.relpath(e["image"], out_dir),
        )
        for e in entries
    ]
    reset_set_metrics(metrics)
    score_rows(rows, images, metrics, [ref_cache[e["references"]] for e in entries])
    names = [m.name for m in metrics]
    summary = add_set_values(report.aggregate(rows, names), metrics)
    scored = (
        f"the manifest prompt without the trigger word {trigger_word!r} (scores.csv 'prompt')"
        if trigger_word
        else "the manifest prompt as written"
    )
    info = {
        "manifest": str(Path(manifest).resolve()),
        "trigger_word": trigger_word or None,
        "clip_t_text": scored,
        **scoring_info(metrics),
        "seconds": {"total": round(time.perf_counter() - t0, 2)},
        **(extra or {}),
    }
    report.write_scores_csv(rows, out_dir / "scores.csv", names)
    report.write_metrics_json(summary, out_dir / "metrics.json", **info)
    report.write_report_html(
        out_dir / "report.html",
        rows,
        summary,
        references=references,
        title=title or f"scores of {Path(manifest).name}",
        settings={"manifest": str(manifest), **shown_settings(metrics), **(extra or {})},
        metric_names=names,
    )
    return ProtocolResult(rows, summary, out_dir, info["seconds"])
