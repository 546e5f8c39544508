"""The option groups the entry points share (generate, evaluate, the web app): the model, the sampling
settings and the scoring models, declared once with their help, and read back as library objects
(`ModelSource`, `SamplingSettings`, metrics). No entry point imports another; they all import this."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persongen_jax.evaluation import metrics as metrics_lib
from persongen_jax.pipeline import MAX_SEED, id_unused_warning
from persongen_jax.pipeline.schedulers import SCHEDULER_NAMES
from persongen_jax.pipeline.settings import ATTENTION_IMPLS, DTYPES, SamplingSettings
from persongen_jax.sources import ModelSource

MAX_SEEDS = 100_000  # a typo such as 0-4000000000 must not build a list of billions
DEFAULTS = SamplingSettings()


# ---------------------------------------------------------------------------------------------- value types


def parse_seeds(text: str) -> list[int]:
    """ "0-4" -> [0, 1, 2, 3, 4]; "1,5,9" -> [1, 5, 9]; "7" -> [7]. Seeds are integers in [0, 2**32 - 1]
    (argparse type: a bad value is a usage error naming --seeds)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, None)
                lo, hi = int(a), int(b)  # type: ignore[arg-type]  (None: a TypeError, reported below)
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
            if not 0 <= lo <= hi <= MAX_SEED:
                raise argparse.ArgumentTypeError(f"bad --seeds {text!r}: seeds are integers in [0, {MAX_SEED}]")
            if len(seeds) + hi - lo + 1 > MAX_SEEDS:
                raise argparse.ArgumentTypeError(f"bad --seeds {text!r}: more than {MAX_SEEDS} seeds")
            seeds.extend(range(lo, hi + 1))
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"bad --seeds {text!r}: expected e.g. 0-4, 1,5,9 or 7") from None
    return seeds


def parse_start_merge_step(text: str) -> int | float:
    """ "10" -> step index 10; "0.2" -> a fraction of the steps (argparse type)."""
    try:
        value = int(text) if text.strip().lstrip("-").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --start-merge-step {text!r}: expected a step index (e.g. 10) or a fraction of --steps (e.g. 0.2)"
        ) from None
    return value


MERGE_HELP = (
    "step after which the reference faces' ID embedding is used: a step index (e.g. 10) or a fraction "
    "of --steps (e.g. 0.2 = step 10 of 50, the PhotoMaker / research setting); default %(default)s"
)


# ---------------------------------------------------------------------------------------------- the model


def add_load_arguments(group) -> None:
    """--dtype / --attention: how a converted model (--model) is loaded."""
    group.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=DEFAULTS.dtype,
        help="compute dtype (default: the stored params' dtype)",
    )
    group.add_argument(
        "--attention",
        choices=list(ATTENTION_IMPLS),
        default=DEFAULTS.attention,
        help="attention implementation (cudnn: GPU flash attention)",
    )


def add_model_arguments(p: argparse.ArgumentParser, *, tiny_help: str | None = None) -> None:
    """The options naming the model, shared by generate and the web app: --model (converted folders) or
    --checkpoint (a training run) [or --tiny, with `tiny_help`], and the settings of a --model load."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="converted SDXL folder (weights_conversion sdxl)")
    src.add_argument(
        "--checkpoint",
        type=Path,
        metavar="RUN",
        help="a training run folder (python -m persongen_jax.train): its model with the trained weights",
    )
    if tiny_help:
        src.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--step", type=int, help="with --checkpoint: the checkpoint step (default: the latest)")
    p.add_argument(
        "--photomaker", type=Path, help="converted PhotoMaker folder (id_encoder/ [+ lora/]); default: look in --model"
    )
    p.add_argument("--lora", type=Path, help="an extra LoRA folder (weights_conversion lora); default: none")
    p.add_argument("--adapters", type=Path, help="adapter folder (bg / body / id cross-attentions); default: none")
    p.add_argument("--trigger-word", default="img", help="the word after the class word that marks the ID tokens")
    add_load_arguments(p)


def add_face_model_arguments(p: argparse.ArgumentParser) -> None:
    """--face-models / --arcface for an entry point without the scoring options (generate): the models of the
    references' ArcFace embeddings that PhotoMaker V2 takes (the scoring options declare the same two)."""
    p.add_argument(
        "--face-models",
        type=Path,
        help="PhotoMaker V2: insightface model folder with an SCRFD detector (buffalo_l, as the official pipeline; "
        "or antelopev2)",
    )
    p.add_argument("--arcface", type=Path, help="PhotoMaker V2: converted ArcFace folder (weights_conversion arcface)")


def model_source(args, *, config=None, tiny=None) -> ModelSource:
    """The ModelSource of the model options (`config`: a run's config instead of RUN/config.json; `tiny`: the
    config of --tiny's random models)."""
    # The options carry the ModelSource fields' names; --face-models / --arcface only where declared.
    paths = ("model", "checkpoint", "step", "photomaker", "lora", "adapters", "face_models", "arcface")
    return ModelSource(
        **{name: getattr(args, name, None) for name in paths},
        config=config,
        trigger_word=getattr(args, "trigger_word", None) or "img",
        tiny=tiny if getattr(args, "tiny", False) else None,
    )


# ---------------------------------------------------------------------------------------------- sampling


def add_sampling_arguments(group, *, merge_help: str = MERGE_HELP) -> None:
    """--steps, --guidance-scale, --start-merge-step with SamplingSettings' defaults."""
    group.add_argument("--steps", type=int, default=DEFAULTS.num_steps, help="denoising steps")
    group.add_argument(
        "--guidance-scale", type=float, default=DEFAULTS.guidance_scale, help="classifier-free guidance scale"
    )
    group.add_argument(
        "--start-merge-step", type=parse_start_merge_step, default=DEFAULTS.start_merge_step, help=merge_help
    )


def add_scheduler_argument(group, *, help: str = "sampler") -> None:
    group.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), default=DEFAULTS.scheduler, help=help)


def warn_if_id_unused(settings: SamplingSettings, refs_given: bool) -> None:
    """Prints a warning when reference faces are given but start merge step >= steps - 1 leaves them unused."""
    message = id_unused_warning(settings.start_merge_step, settings.num_steps) if refs_given else None
    if message:
        print(f"warning: {message.replace('start merge step', '--start-merge-step', 1)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- outputs


def add_output_arguments(p: argparse.ArgumentParser, command: str, *, out_help: str) -> None:
    """--out and --overwrite of a command that writes files (`cli.outputs.OutputFolder`)."""
    p.add_argument("--out", type=Path, required=True, help=out_help)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the output of an earlier {command} in --out, or write into a folder that holds "
        "other files (default: refuse a non-empty --out)",
    )


# ---------------------------------------------------------------------------------------------- scoring


def metric_names(text: str | None) -> list[str]:
    """--metrics "clip_t, face_sim" -> ["clip_t", "face_sim"] (None: the default metrics)."""
    text = ",".join(metrics_lib.DEFAULT_METRICS) if text is None else text
    return [n.strip() for n in text.split(",") if n.strip()]


def load_metrics(names: list[str], args, *, no_face: str, batch_size: int) -> list:
    """The metrics `names` built from the scoring options (`metrics.add_scoring_arguments`); ValueError for
    an unknown name or a missing scoring model folder."""
    if not names:
        raise ValueError("--metrics names no metric")
    for n in names:
        metrics_lib.get(n)  # an unknown name: ValueError listing the known ones
    options = metrics_lib.scoring_options(args, no_face=no_face, batch_size=batch_size)
    print("loading scoring models ...", file=sys.stderr, flush=True)
    return metrics_lib.build(names, options)
