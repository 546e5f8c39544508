r"""Batch evaluation: CLIP-T and Face-Sim, reports and comparison plots.

Mode A, score existing images listed in a manifest (JSONL: image, prompt, reference[, set]); CLIP-T
scores each prompt without the trigger word (--trigger-word, default img), as mode B does:

    python -m persongen_jax.evaluate --manifest gen/manifest.jsonl --clip weights/clip-vit-large-patch14 \
        --face-models weights/antelopev2 --arcface weights/arcface_r100 --out eval/gen

Mode B, the validation protocol (sets x identities x prompts x seeds) on a model folder ...

    python -m persongen_jax.evaluate --model weights/sdxl --photomaker weights/photomaker \
        --sets in_train=val/in_train,out_of_train=val/out,out_of_domain=val/ood --seeds 0-4 \
        --clip ... --face-models ... --arcface ... --out eval/photomaker

... or on a training run's checkpoint (the run folder's config.json rebuilds the model):

    python -m persongen_jax.evaluate --checkpoint runs/final_method [--step 4000] --sets ... --out eval/final

(--metrics none: the images and report.html without scores, no scoring models needed.)

Both write OUT/metrics.json (means per set), OUT/scores.csv (one row per image), OUT/report.html
(reference | generations grid per set with scores, the table of means, the images without a face).
A validation set folder holds one image per identity, or one sub-folder of images per identity.
Prompts: the research's 4 validation prompts (persongen_jax/evaluation/validation_prompts.json, with
P_general / P_bg split versions used when the model has a bg adapter) or --prompts FILE.json.

Compare runs (training run folders with eval/history.jsonl, or evaluate outputs with a step):

    python -m persongen_jax.evaluate --compare runs/a runs/b --out plots/
    python -m persongen_jax.evaluate --compare eval/photomaker eval/final --table --out tables/   (Table 1 layout)

writes plots/face_sim_<set>.png and plots/clip_t_<set>.png (metric over training steps, a line per run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from persongen_jax.cli import parser as make_parser
from persongen_jax.cli.config import load_config
from persongen_jax.cli.options import (
    add_load_arguments,
    add_output_arguments,
    add_sampling_arguments,
    add_scheduler_argument,
    load_metrics,
    metric_names,
    model_source,
    parse_seeds,
    warn_if_id_unused,
)
from persongen_jax.cli.outputs import OutputFolder
from persongen_jax.evaluation import metrics as metrics_lib
from persongen_jax.evaluation import protocol, report
from persongen_jax.evaluation.faces import FaceModelError
from persongen_jax.evaluation.table import write_table
from persongen_jax.pipeline.image_processing import ImageError
from persongen_jax.pipeline.settings import PipelineError
from persongen_jax.sources import load_pipeline

OUTPUT_FILES = ("metrics.json", "scores.csv", "report.html")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m persongen_jax.evaluate", __doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--manifest", type=Path, help="mode A: JSONL of image / prompt / reference [/ set]")
    mode.add_argument("--model", type=Path, help="mode B: converted SDXL folder (weights_conversion sdxl)")
    mode.add_argument(
        "--checkpoint", type=Path, metavar="RUN", help="mode B: a training run folder (checkpoints/ + config.json)"
    )
    mode.add_argument("--compare", type=Path, nargs="+", help="plot Face-Sim / CLIP-T over steps for these runs")
    g = p.add_argument_group("mode B model")
    g.add_argument("--photomaker", type=Path, help="converted PhotoMaker folder (default: look in --model)")
    g.add_argument("--lora", type=Path, help="an extra LoRA folder (default: none)")
    g.add_argument("--adapters", type=Path, help="adapter folder (bg / body / id; default: none)")
    g.add_argument("--step", type=int, help="--checkpoint: which checkpoint (default: the latest)")
    g.add_argument("--config", type=Path, help="--checkpoint: a config .py/.json instead of RUN/config.json")
    add_load_arguments(g)
    b = p.add_argument_group("mode B protocol")
    b.add_argument("--sets", help="validation sets NAME=FOLDER,NAME=FOLDER (e.g. in_train=val/a,out_of_domain=val/b)")
    b.add_argument("--prompts", type=Path, help="prompts JSON (default: the research's 4 validation prompts)")
    b.add_argument("--num-prompts", type=int, default=0, help="use only the first N prompts (0: all)")
    b.add_argument(
        "--seeds",
        type=parse_seeds,
        default=list(protocol.ProtocolSettings.seeds),
        help="seeds per identity and prompt, e.g. 0-4 or 1,5,9 (default 0-4)",
    )
    add_sampling_arguments(b)
    b.add_argument("--resolution", type=int, help="image height = width (default: the model's)")
    add_scheduler_argument(b)
    b.add_argument(
        "--split",
        choices=["auto", "never", "always"],
        default="auto",
        help="P_general + P_bg through the bg adapter (auto: when the model has one)",
    )
    s = p.add_argument_group("scoring")
    s.add_argument(
        "--metrics",
        default="clip_t,face_sim",
        help="comma-separated metric names (persongen_jax/evaluation/metrics.py: clip_t, face_sim, clip_i, "
        "dino, face_div, fid; default: %(default)s); "
        "'none': mode B writes the images and the report without scores (no scoring models needed)",
    )
    s.add_argument(
        "--trigger-word",
        default="img",
        help="mode B: written after the class word of each prompt; mode A: removed from the manifest "
        "prompts before CLIP-T ('' keeps them as written). CLIP-T scores the prompt without it",
    )
    metrics_lib.add_scoring_arguments(s)
    s.add_argument(
        "--no-face",
        choices=["zero", "skip"],
        default="zero",
        help="a generation without a detected face: scores 0 (zero, the research) or is left out",
    )
    s.add_argument("--batch-size", type=int, default=32, help="images per CLIP / ArcFace batch")
    p.add_argument("--labels", help="--compare: comma-separated run labels (default: folder names)")
    p.add_argument(
        "--table",
        action="store_true",
        help="--compare: instead of plots, the method-comparison table of evaluate output folders "
        "(PhotoMaker's Table 1 layout: a row per run, a column per metric, seconds per image); "
        "printed and written as OUT/table.md and OUT/table.csv",
    )
    add_output_arguments(
        p, "evaluate", out_help="output folder: metrics.json, scores.csv, report.html (--compare: the plots)"
    )
    return p


def _metrics(args, parser):
    """The chosen metrics (--metrics) built from the scoring options; [] for 'none' (mode B only)."""
    names = metric_names(args.metrics)
    if names == ["none"]:
        if args.manifest:
            parser.error("--metrics none: mode A (--manifest) only scores; choose metrics")
        return []
    try:
        for n in names:
            metrics_lib.get(n)
    except ValueError as e:
        parser.error(str(e))
    if not names:
        parser.error("--metrics names no metric")
    return load_metrics(names, args, no_face=args.no_face, batch_size=args.batch_size)


def protocol_settings(args) -> protocol.ProtocolSettings:
    """The ProtocolSettings of the mode B options (the others carry the fields' names)."""
    size = args.resolution
    return protocol.ProtocolSettings.from_attributes(
        args, seeds=tuple(args.seeds), num_steps=args.steps, height=size, width=size
    )


def _summary(summary: dict, metrics) -> str:
    lines = []
    for name, m in [*summary["sets"].items(), ("all", summary["all"])]:
        cells = [f"images {m['n_images']:>5}"]
        for metric in metrics:
            value = m[metric.name]
            shown = m.get(f"{metric.name}_note", "n/a") if value is None else f"{value:.{metric.digits}f}"
            cells.append(f"{metric.title} {shown:>7}")
            if metric.missing_key:
                cells.append(f"{metric.missing_label} {m[metric.missing_key]}")
        lines.append(f"  {name:<16} " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = OutputFolder(args.out, "evaluate", overwrite=args.overwrite)
    try:
        if args.table and not args.compare:
            parser.error("--table goes with --compare RUN_A RUN_B ...")
        out.check()  # before reading or loading anything
        if args.compare and args.table:
            with out:
                text, paths = write_table(
                    args.compare, args.out, labels=args.labels.split(",") if args.labels else None
                )
                out.finish([Path(p).name for p in paths])
            print(text + "wrote " + ", ".join(str(p) for p in paths))
            return 0
        if args.compare:
            labels = args.labels.split(",") if args.labels else None
            with out:
                paths = report.plot_compare(args.compare, args.out, labels=labels)
                out.finish(paths)
            print("wrote " + ", ".join(str(p) for p in paths))
            return 0
        if args.manifest:
            metrics = _metrics(args, parser)
            with out:
                result = protocol.score_manifest(args.manifest, metrics, args.out, trigger_word=args.trigger_word)
                out.finish(OUTPUT_FILES)
        else:
            if not args.sets:
                parser.error("mode B needs --sets NAME=FOLDER[,NAME=FOLDER...]")
            settings = protocol_settings(args)
            settings.check()
            warn_if_id_unused(settings, True)  # every protocol image has reference faces
            sets = protocol.load_sets(protocol.parse_sets(args.sets))
            prompts = protocol.load_prompts(args.prompts)
            if args.num_prompts:
                prompts = prompts[: args.num_prompts]
            metrics = _metrics(args, parser)  # before the big model: a bad scoring path fails fast
            refs = protocol.load_references(sets, metrics)  # and a reference without a face
            print(f"loading {args.model or args.checkpoint} ...", file=sys.stderr, flush=True)
            config = load_config(str(args.config)) if args.checkpoint and args.config else None
            source = model_source(args, config=config)
            with out:
                pipe, step, config = load_pipeline(source, settings)
                if args.model:
                    extra = {
                        "model": str(args.model),
                        "photomaker": str(args.photomaker or ""),
                        "lora": str(args.lora or ""),
                        "adapters": str(args.adapters or ""),
                    }
                else:
                    settings = settings.replace(trigger_word=config.data.trigger_word)
                    extra = {"checkpoint": str(args.checkpoint)}
                n = sum(len(i) for i in sets.values()) * len(prompts) * len(settings.seeds)
                print(
                    f"generating {n} images: { ({k: len(v) for k, v in sets.items()}) } identities x "
                    f"{len(prompts)} prompts x {len(settings.seeds)} seeds",
                    file=sys.stderr,
                    flush=True,
                )
                title = f"{extra.get('model') or extra['checkpoint']}" + (
                    f" at step {step}" if step is not None else ""
                )
                result = protocol.run_protocol(
                    pipe,
                    sets,
                    prompts,
                    metrics,
                    args.out,
                    settings,
                    step=step,
                    title=title,
                    extra=extra,
                    progress=True,
                    references=refs,
                )
                out.finish([*OUTPUT_FILES, "images"])
    except (ImageError, PipelineError, FaceModelError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_summary(result.metrics, metrics))
    print(
        f"wrote {args.out / 'metrics.json'}, scores.csv, report.html ({len(result.rows)} images, "
        f"{time.perf_counter() - t0:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
