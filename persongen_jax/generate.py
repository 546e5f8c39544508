r"""Generate images of a person from reference face photos and a prompt.

    python -m persongen_jax.generate --model weights/sdxl --photomaker weights/photomaker \
        --ref face1.jpg --ref face2.jpg --prompt "a photo of a man img wearing a red hat" \
        --seeds 0-4 --out outputs/
    python -m persongen_jax.generate --checkpoint runs/final_method [--step 4000] \
        --ref face1.jpg --prompt "a photo of a man img" --cond bg="in the mountains" --out outputs/

Writes OUT/seed_<s>.png for each seed and OUT/settings.json (every setting, so a
run can be repeated). Without --ref it is plain SDXL text-to-image. With an
adapter folder (--adapters), `--cond NAME=TEXT` feeds the text condition NAME of the
split-prompt method (e.g. --cond bg="in the mountains"); --prompt-bg / --prompt-body
are aliases of --cond bg=... / --cond body=....

Spatial control and styles (persongen_jax/pipeline/control.py): --controlnet DIR --control-image PATH
[--control-scale S] (repeatable pairs; --control-preprocess canny turns a photo into edges), --t2i-adapter DIR
--adapter-image PATH [--adapter-scale S --adapter-factor F], --style NAME
(PhotoMaker's templates), --aspect W:H (SDXL presets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from persongen_jax.pipeline import DEFAULT_START_MERGE, MAX_SEED, id_unused_warning
from persongen_jax.pipeline.control import (add_control_arguments, apply_style, aspect_size, control_arguments,
                                            style_settings)
from persongen_jax.pipeline.schedulers import SCHEDULER_NAMES


MAX_SEEDS = 100_000     # a typo such as 0-4000000000 must not build a list of billions


def parse_seeds(text: str) -> list[int]:
    """"0-4" -> [0, 1, 2, 3, 4]; "1,5,9" -> [1, 5, 9]; "7" -> [7]. Seeds are integers in [0, 2**32 - 1]
    (argparse type: a bad value is a usage error naming --seeds)."""
    seeds = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, None)
                lo, hi = int(a), int(b)
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


def parse_condition(text: str) -> tuple[str, str]:
    """"bg=in the mountains" -> ("bg", "in the mountains")."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"bad --cond {text!r}: expected NAME=TEXT, e.g. bg=\"in the mountains\"")
    return name.strip(), value


def condition_texts(args) -> dict[str, str]:
    """{name: text} from --cond and the --prompt-bg / --prompt-body aliases; a name given twice is an error."""
    pairs = list(args.cond) + [(n, t) for n, t in (("bg", args.prompt_bg), ("body", args.prompt_body))
                               if t is not None]
    out = {}
    for name, text in pairs:
        if name in out:
            raise ValueError(f"condition {name!r} given twice (--cond {name}=... / --prompt-{name})")
        out[name] = text
    return out


def check_output_folder(out: Path) -> None:
    """Creates `out` and proves it writable (a real write: root and read-only mounts answer honestly);
    ValueError naming it otherwise."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror})") from None


def parse_start_merge_step(text: str) -> int | float:
    """"10" -> step index 10; "0.2" -> a fraction of the steps (argparse type)."""
    try:
        value = int(text) if text.strip().lstrip("-").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --start-merge-step {text!r}: expected a step index (e.g. 10) or a "
                                         "fraction of --steps (e.g. 0.2)") from None
    return value


MERGE_HELP = ("step after which the reference faces' ID embedding is used: a step index (e.g. 10) or a fraction "
              "of --steps (e.g. 0.2 = step 10 of 50, the PhotoMaker / research setting); default %(default)s")


def add_model_arguments(p: argparse.ArgumentParser, *, tiny_help: str | None = None) -> None:
    """The options naming the model, shared by generate and the web app: --model (converted folders) or
    --checkpoint (a training run) [or --tiny, with `tiny_help`], and the settings of a --model load."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="converted SDXL folder (weights_conversion sdxl)")
    src.add_argument("--checkpoint", type=Path, metavar="RUN",
                     help="a training run folder (python -m persongen_jax.train): its model with the trained weights")
    if tiny_help:
        src.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--step", type=int, help="with --checkpoint: the checkpoint step (default: the latest)")
    p.add_argument("--photomaker", type=Path, help="converted PhotoMaker folder (id_encoder/ [+ lora/]); "
                                                   "default: look in --model")
    p.add_argument("--lora", type=Path, help="an extra LoRA folder (weights_conversion lora); default: none")
    p.add_argument("--adapters", type=Path, help="adapter folder (bg / body / id cross-attentions); default: none")
    p.add_argument("--trigger-word", default="img", help="the word after the class word that marks the ID tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the stored params' dtype)")
    p.add_argument("--attention", choices=["xla", "cudnn"], default="xla",
                   help="attention implementation (cudnn: GPU flash attention)")


def check_model_arguments(args) -> None:
    """ValueError for model options that do not go together (before anything loads): a run (--checkpoint) or
    --tiny brings its own model and settings, --step needs --checkpoint."""
    own = "--tiny" if getattr(args, "tiny", False) else "--checkpoint" if args.checkpoint else None
    if own and (args.photomaker or args.lora or args.adapters):
        raise ValueError(f"{own} brings its own model: drop --photomaker / --lora / --adapters")
    if own and (args.dtype or args.attention != "xla"):
        raise ValueError("--dtype / --attention go with --model (a run's config sets them)")
    if args.step is not None and not args.checkpoint:
        raise ValueError("--step goes with --checkpoint")


def model_settings(args) -> dict:
    """The settings.json keys naming the model (generate and the web app write the same ones)."""
    path = lambda p: str(p) if p else None  # noqa: E731
    return {"model": path(args.model), "checkpoint": path(args.checkpoint), "step": args.step,
            "photomaker": path(args.photomaker), "lora": path(args.lora), "adapters": path(args.adapters),
            "dtype": args.dtype, "attention": args.attention}


def load_pipeline(args, config=None):
    """The pipeline of --model / --checkpoint (checked by `check_model_arguments`) -> (pipeline, step,
    config): a run's checkpoint step and training config (`config` instead of RUN/config.json when given),
    None and None for --model."""
    if args.checkpoint:
        from persongen_jax.training.run_folder import load_trained_pipeline

        return load_trained_pipeline(args.checkpoint, config, args.step)
    import jax.numpy as jnp

    from persongen_jax.pipeline.pipeline import PersonGenPipeline

    return PersonGenPipeline.from_pretrained(
        args.model, photomaker=args.photomaker, lora=args.lora, adapters=args.adapters,
        dtype=getattr(jnp, args.dtype) if args.dtype else None, attention_impl=args.attention,
        trigger_word=args.trigger_word), None, None


def build_parser() -> argparse.ArgumentParser:
    from persongen_jax.cli import parser

    p = parser("python -m persongen_jax.generate", __doc__)
    add_model_arguments(p)
    p.add_argument("--ref", type=Path, action="append", default=[],
                   help="reference face image (repeatable); none: plain SDXL text-to-image")
    p.add_argument("--prompt", required=True, help='must contain the class word followed by the trigger word '
                                                   'when --ref is given, e.g. "a man img"')
    p.add_argument("--cond", type=parse_condition, action="append", default=[], metavar="NAME=TEXT",
                   help="text of the model's text condition NAME (its adapter), e.g. bg=\"in the mountains\"; "
                        "repeatable")
    p.add_argument("--prompt-bg", help="background prompt (P_bg): alias of --cond bg=TEXT")
    p.add_argument("--prompt-body", help="body prompt (P_body): alias of --cond body=TEXT")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: none, SDXL's zero embedding)")
    p.add_argument("--seeds", type=parse_seeds, default=[0], help="e.g. 0-4 or 1,5,9; one image per seed (default 0)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--start-merge-step", type=parse_start_merge_step, default=DEFAULT_START_MERGE, help=MERGE_HELP)
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's, 1024 for SDXL)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's, 1024 for SDXL)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULER_NAMES), default="euler", help="sampler")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (created): seed_<s>.png per seed and settings.json")
    add_control_arguments(p)
    return p


def warn_if_id_unused(args, refs_given: bool) -> None:
    """Prints a warning when reference faces are given but start merge step >= steps - 1 leaves them unused."""
    message = id_unused_warning(args.start_merge_step, args.steps) if refs_given else None
    if message:
        print(f"warning: {message.replace('start merge step', '--start-merge-step', 1)}", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from PIL import Image

    from persongen_jax.pipeline.image_processing import ImageError, load_image
    from persongen_jax.pipeline.pipeline import PipelineError, check_settings

    t0 = time.perf_counter()
    try:
        # Everything that can be checked without the model is, before minutes of loading and sampling.
        check_settings(seeds=args.seeds, num_steps=args.steps, guidance_scale=args.guidance_scale,
                       start_merge_step=args.start_merge_step, height=args.height, width=args.width)
        warn_if_id_unused(args, bool(args.ref))
        check_output_folder(args.out)
        check_model_arguments(args)
        texts = condition_texts(args)
        refs = [load_image(p) for p in args.ref]  # fail on a bad image before loading any model
        control = control_arguments(args)
        prompt, negative = (apply_style(args.style, args.prompt, args.negative_prompt) if args.style
                            else (args.prompt, args.negative_prompt))
        print(f"loading {args.model or args.checkpoint} ...", file=sys.stderr, flush=True)
        pipe, step, _ = load_pipeline(args)
        pipe.add_controlnets(args.controlnet)
        if args.t2i_adapter:
            pipe.add_t2i_adapter(args.t2i_adapter)
        height, width = args.height, args.width
        if args.aspect:
            width, height = aspect_size(args.aspect, pipe.default_size, pipe.vae.downscale_factor)
        common = dict(num_steps=args.steps, guidance_scale=args.guidance_scale,
                      start_merge_step=args.start_merge_step, height=height, width=width,
                      negative_prompt=negative, conditions=texts, scheduler=args.scheduler)
        files = []
        # One compiled call for all seeds; the bar counts denoising steps.
        images = pipe(prompt, refs, seeds=args.seeds, progress=True, control_images=control["images"] or None,
                      control_scales=control["scales"], control_guidance_start=control["start"],
                      control_guidance_end=control["end"], adapter_image=control["adapter_image"],
                      adapter_conditioning_scale=args.adapter_scale, adapter_conditioning_factor=args.adapter_factor,
                      **common)
        for seed, img in zip(args.seeds, images):
            path = args.out / f"seed_{seed}.png"
            Image.fromarray(img).save(path)
            files.append(path.name)
    except (ImageError, PipelineError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    settings = {**model_settings(args), "step": step,
                "refs": [str(p) for p in args.ref], "prompt": args.prompt, "seeds": args.seeds,
                "height": images.shape[1], "width": images.shape[2], "trigger_word": args.trigger_word,
                "images": files,
                "seconds": round(time.perf_counter() - t0, 2), **{k: v for k, v in common.items()
                                                                   if k not in ("height", "width")},
                "negative_prompt": args.negative_prompt, "aspect": args.aspect,
                **style_settings(args.style, args.prompt, args.negative_prompt),
                "controlnets": args.controlnet, "control_images": args.control_image,
                "control_scales": control["scales"], "control_preprocess": control["preprocess"],
                "control_guidance_start": control["start"], "control_guidance_end": control["end"],
                "t2i_adapter": args.t2i_adapter, "adapter_image": args.adapter_image,
                "adapter_conditioning_scale": args.adapter_scale, "adapter_conditioning_factor": args.adapter_factor}
    (args.out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {len(files)} image(s) and settings.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
