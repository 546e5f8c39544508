r"""Generate images of a person from reference face photos and a prompt.

    python -m persongen_jax.generate --model weights/sdxl --photomaker weights/photomaker \
        --ref face1.jpg --ref face2.jpg --prompt "a photo of a man img wearing a red hat" \
        --seeds 0-4 --out outputs/
    python -m persongen_jax.generate --model weights/sdxl --photomaker weights/photomaker_v2 \
        --face-models ~/.insightface/models/buffalo_l --arcface weights/arcface_r50 \
        --ref face1.jpg --prompt "a photo of a woman img" --out outputs/          (PhotoMaker V2)
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

from PIL import Image

from persongen_jax.cli import parser
from persongen_jax.cli.options import (
    add_face_model_arguments,
    add_model_arguments,
    add_output_arguments,
    add_sampling_arguments,
    add_scheduler_argument,
    model_source,
    parse_seeds,
    warn_if_id_unused,
)
from persongen_jax.cli.outputs import OutputFolder
from persongen_jax.pipeline.control import (
    add_control_arguments,
    apply_style,
    aspect_size,
    control_arguments,
    style_settings,
)
from persongen_jax.pipeline.image_processing import ImageError, load_image
from persongen_jax.pipeline.pipeline import reference_id_embeds
from persongen_jax.pipeline.settings import MAX_BATCH, PipelineError, SamplingSettings, default_batch_size, seed_batches
from persongen_jax.sources import load_pipeline


def parse_condition(text: str) -> tuple[str, str]:
    """ "bg=in the mountains" -> ("bg", "in the mountains")."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f'bad --cond {text!r}: expected NAME=TEXT, e.g. bg="in the mountains"')
    return name.strip(), value


def condition_texts(args) -> dict[str, str]:
    """{name: text} from --cond and the --prompt-bg / --prompt-body aliases; a name given twice is an error."""
    pairs = list(args.cond) + [(n, t) for n, t in (("bg", args.prompt_bg), ("body", args.prompt_body)) if t is not None]
    out = {}
    for name, text in pairs:
        if name in out:
            raise ValueError(f"condition {name!r} given twice (--cond {name}=... / --prompt-{name})")
        out[name] = text
    return out


def build_parser() -> argparse.ArgumentParser:
    p = parser("python -m persongen_jax.generate", __doc__)
    add_model_arguments(p)
    p.add_argument(
        "--ref",
        type=Path,
        action="append",
        default=[],
        help="reference face image (repeatable); none: plain SDXL text-to-image",
    )
    p.add_argument(
        "--prompt",
        required=True,
        help='must contain the class word followed by the trigger word when --ref is given, e.g. "a man img"',
    )
    p.add_argument(
        "--cond",
        type=parse_condition,
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help='text of the model\'s text condition NAME (its adapter), e.g. bg="in the mountains"; repeatable',
    )
    p.add_argument("--prompt-bg", help="background prompt (P_bg): alias of --cond bg=TEXT")
    p.add_argument("--prompt-body", help="body prompt (P_body): alias of --cond body=TEXT")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: none, SDXL's zero embedding)")
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=list(SamplingSettings.seeds),
        help="e.g. 0-4 or 1,5,9; one image per seed (default 0)",
    )
    add_sampling_arguments(p)
    p.add_argument("--height", type=int, help="image height in pixels (default: the model's, 1024 for SDXL)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the model's, 1024 for SDXL)")
    add_scheduler_argument(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="seeds per compiled sampling call (default: from the image size, 4 at 1024x1024, at most "
        f"{MAX_BATCH}); bounds the memory of many seeds",
    )
    add_output_arguments(p, "generate", out_help="output folder (created): seed_<s>.png per seed and settings.json")
    add_face_model_arguments(p)
    add_control_arguments(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    out = OutputFolder(args.out, "generate", overwrite=args.overwrite)
    try:
        # Everything that can be checked without the model is, before minutes of loading and sampling.
        settings = SamplingSettings.from_attributes(args, seeds=tuple(args.seeds), num_steps=args.steps)
        settings.check()
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: expected an integer >= 1")
        warn_if_id_unused(settings, bool(args.ref))
        out.check()
        source = model_source(args)
        source.check(settings)
        texts = condition_texts(args)
        refs = [load_image(p) for p in args.ref]  # fail on a bad image before loading any model
        control = control_arguments(args)  # the control images read and preprocessed, before any model loads
        prompt = args.prompt
        if args.style:  # PhotoMaker's style template around the prompt, its negative prompt before the user's
            prompt, negative = apply_style(args.style, args.prompt, args.negative_prompt)
            settings = settings.replace(negative_prompt=negative)
        ref_names = [str(p) for p in args.ref]
        # PhotoMaker V2: the references' ArcFace embeddings (a photo without a face fails before loading SDXL).
        id_embeds = (
            reference_id_embeds(args.photomaker or args.model, refs, ref_names, args.face_models, args.arcface)
            if args.ref and args.model
            else None
        )
        with out:
            print(f"loading {args.model or args.checkpoint} ...", file=sys.stderr, flush=True)
            pipe, step, _ = load_pipeline(source, settings)
            version = getattr(pipe.id_encoder, "version", "v1") if pipe.id_encoder is not None else None
            if version:
                print(f"ID encoder: PhotoMaker {version}", file=sys.stderr)
            pipe.add_controlnets(args.controlnet)
            if args.t2i_adapter:
                pipe.add_t2i_adapter(args.t2i_adapter)
            if args.aspect:
                width, height = aspect_size(args.aspect, pipe.default_size, pipe.vae.downscale_factor)
                settings = settings.replace(height=height, width=width)
            height, width = settings.height or pipe.default_size, settings.width or pipe.default_size
            batch_size = args.batch_size or default_batch_size(height, width)
            files = []
            # One compiled call per batch of seeds (the last one padded: the same program); the bar counts
            # denoising steps. Each batch is written before the next runs: host memory holds one batch.
            for seeds, n in seed_batches(args.seeds, batch_size):
                images = pipe(
                    prompt,
                    refs,
                    seeds=seeds,
                    conditions=texts,
                    progress=True,
                    ref_names=ref_names,
                    id_embeds=id_embeds,
                    control_images=control["images"] or None,
                    control_scales=control["scales"],
                    control_guidance_start=control["start"],
                    control_guidance_end=control["end"],
                    adapter_image=control["adapter_image"],
                    adapter_conditioning_scale=args.adapter_scale,
                    adapter_conditioning_factor=args.adapter_factor,
                    **settings.call_kwargs(),
                )
                for seed, img in zip(seeds[:n], images[:n]):
                    path = args.out / f"seed_{seed}.png"
                    Image.fromarray(img).save(path)
                    files.append(path.name)
            call = {k: v for k, v in settings.call_kwargs().items() if k not in ("height", "width")}
            record = {
                **source.settings_json(settings),
                "step": step,
                "photomaker_version": version,
                "refs": [str(p) for p in args.ref],
                "prompt": args.prompt,
                "seeds": args.seeds,
                "height": height,
                "width": width,
                "trigger_word": args.trigger_word,
                "images": files,
                "batch_size": batch_size,
                "seconds": round(time.perf_counter() - t0, 2),
                **call,
                "negative_prompt": args.negative_prompt,
                "conditions": texts,
                "aspect": args.aspect,
                **style_settings(args.style, args.prompt, args.negative_prompt),
                "controlnets": [str(p) for p in args.controlnet],
                "control_images": [str(p) for p in args.control_image],
                "control_scales": control["scales"],
                "control_preprocess": control["preprocess"],
                "control_guidance_start": control["start"],
                "control_guidance_end": control["end"],
                "t2i_adapter": str(args.t2i_adapter) if args.t2i_adapter else None,
                "adapter_image": str(args.adapter_image) if args.adapter_image else None,
                "adapter_conditioning_scale": args.adapter_scale,
                "adapter_conditioning_factor": args.adapter_factor,
            }
            (args.out / "settings.json").write_text(json.dumps(record, indent=2))
            out.finish([*files, "settings.json"])
    except (ImageError, PipelineError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} image(s) and settings.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
