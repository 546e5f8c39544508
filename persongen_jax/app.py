"""The web app for generation (Gradio): reference photos + P_general / P_bg / P_body in, images with their
Face-Sim and CLIP-T out.

    python -m persongen_jax.app --tiny                   # tiny random models made on the fly: no weights needed
    python -m persongen_jax.app --model weights/sdxl --photomaker weights/photomaker [--adapters DIR] \
        [--clip weights/clip-l --face-models ~/.insightface/models/antelopev2 --arcface weights/arcface_r100]
    python -m persongen_jax.app --checkpoint runs/final_method [--step 4000] [--clip ... --face-models ... ...]

then open http://127.0.0.1:7860 (--host / --port). Needs the `[app]` extra (`pip install -e '.[app]'`).

The page takes 1-4 reference photos of one person, the prompt (the class word followed by the trigger word:
"a photo of a man img ..."), one text field per text condition the model has an adapter for (P_bg,
P_body, ...: `PersonGenPipeline.text_conditions`), a negative prompt and the sampling settings; it shows
the images with their seeds and, when scoring models are given, each image's scores by the metrics of
`--metrics` (`evaluation/metrics.py`, as `evaluate`; by default CLIP-T against the prompt and Face-Sim
against the references), and offers a zip of the images + settings.json as the generate CLI writes
them. The same endpoint is the API (`/generate`, see "Use via API" at the bottom of the page, or
`gradio_client`).

One device, one request at a time: requests wait in Gradio's queue. The model loads and the sampling
program compiles at start-up for the default request (`--num-images`, `--steps`, `--scheduler`, the
model's resolution or --height/--width); a request of another image count, size, step count or
scheduler compiles its program once, on its first use (the page says when a request compiled).
Whether a condition field is filled or left empty does not change the program: an empty one is fed
with scale 0, which adds exactly nothing (`out + 0 * attention`), the same images as no condition.

`--tiny` uses the demo training's models (configs/demo.py: tiny SDXL + PhotoMaker ID encoder + LoRA +
a `bg` adapter, random weights, 32x32); scores then need real scoring model folders (--clip,
--face-models, --arcface), or tiny random ones built by `scripts/smoke_evaluate.py` (README).
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import inspect
import io
import json
import logging
import os
import random
import signal
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from persongen_jax import conditions as conditions_lib
from persongen_jax.cli import parser as make_parser
from persongen_jax.cli.config import DEMO_CONFIG, load_config
from persongen_jax.cli.options import (
    MERGE_HELP,
    add_model_arguments,
    add_sampling_arguments,
    add_scheduler_argument,
    metric_names,
    model_source,
)
from persongen_jax.cli.options import load_metrics as build_metrics
from persongen_jax.evaluation import metrics as metrics_lib
from persongen_jax.evaluation import protocol
from persongen_jax.evaluation.face_sim import NoFaceError
from persongen_jax.evaluation.faces import FaceModelError
from persongen_jax.pipeline import MAX_SEED, id_unused_warning, resolve_start_merge_step
from persongen_jax.pipeline.control import (
    ASPECT_RATIOS,
    NO_STYLE,
    STYLES,
    apply_style,
    aspect_size,
    check_aspect,
    check_style,
    style_settings,
)
from persongen_jax.pipeline.image_processing import ImageError, convert_to_rgb, to_8bit
from persongen_jax.pipeline.prompt import strip_trigger_word
from persongen_jax.pipeline.schedulers import SCHEDULER_NAMES
from persongen_jax.pipeline.settings import PipelineError, SamplingSettings
from persongen_jax.sources import load_pipeline as load_source

log = logging.getLogger("persongen_jax.app")

MAX_REFS = 4  # reference photos per request; the ID encoder is compiled for each count at start-up
MAX_IMAGES = 8  # images per request
CUSTOM_SIZE = "custom (Height / Width)"  # the aspect dropdown's entry that keeps the sliders' size


# Uploaded reference photos are downscaled to this long side before anything else: a face crop needs far
# less (the ID encoder sees 224x224), and a 12000x12000 upload would otherwise cost GBs in every copy.
MAX_REF_SIDE = 1024


def read_control_image(path: str | os.PathLike) -> Image.Image:
    """An uploaded control image (the ControlNet's input) -> RGB."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def read_reference(path: str | os.PathLike) -> tuple[str, Image.Image]:
    """An uploaded reference photo -> (file name, PIL image of at most MAX_REF_SIDE px on the long side, the
    aspect ratio kept). JPEGs are decoded at a reduced scale (`draft`), so a huge one never lands in memory
    at full size."""
    with Image.open(path) as im:
        im.draft("RGB", (MAX_REF_SIDE, MAX_REF_SIDE))
        im.load()
        small = to_8bit(im)  # a 16-bit greyscale PNG keeps its brightness (PIL's convert clips it to white)
        small = small.copy() if small is im else small
    small.thumbnail((MAX_REF_SIDE, MAX_REF_SIDE), Image.Resampling.LANCZOS)
    return Path(path).name, small


class InputError(ValueError):
    """A request the app cannot run; the message is shown in the page."""


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    """One generation request: what the page's fields hold."""

    prompt: str = ""
    conditions: dict = field(default_factory=dict)  # {condition name: text}; "" = not used
    negative_prompt: str = ""
    num_images: int = 2
    seed: int = 0
    num_steps: int = SamplingSettings.num_steps
    guidance_scale: float = SamplingSettings.guidance_scale
    start_merge_step: int = SamplingSettings().merge_step_index  # the page shows a step index
    scheduler: str = SamplingSettings.scheduler
    height: int = 1024
    width: int = 1024
    style: str = NO_STYLE  # persongen_jax.pipeline.control.STYLES (PhotoMaker's templates)
    aspect: str = ""  # an ASPECT_RATIOS key ("16:9"): overrides height / width; "": use them
    control_scale: float = 1.0  # the ControlNet's conditioning scale (with a control image)


@dataclass
class Result:
    """What a request produced: the images, their seeds and scores, the download's settings, timings."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    seeds: list[int]
    scores: list[dict] | None  # per image: {metric name: value, its found_key: bool}; None without metrics
    settings: dict  # settings.json of the download (the generate CLI's keys)
    seconds: float
    compiles: int  # XLA programs built during the request (0 for every shape compiled at start-up)
    compile_seconds: float
    notes: list[str]


class CompileWatch:
    """Counts the XLA programs built (compiled, or read from the persistent compilation cache) while
    active, through jax.monitoring: how the page tells a request that compiled from one that did not."""

    _active: "CompileWatch | None" = None
    _registered = False

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    @classmethod
    def _listen(cls, event: str, duration: float = 0.0, **_):
        watch = cls._active
        if watch is not None and event in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/cache_retrieval_time_sec",
        ):
            watch.count += 1
            watch.seconds += duration

    def __enter__(self):
        if not CompileWatch._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileWatch._listen)
            CompileWatch._registered = True
        CompileWatch._active = self
        return self

    def __exit__(self, *exc):
        CompileWatch._active = None


# ---------------------------------------------------------------------------------------------- scoring


def load_metrics(args):
    """The metrics of --metrics (evaluation/metrics.py, as evaluate) built from --clip / --face-models /
    --arcface; None when no scoring option is given (the page then shows no scores)."""
    if not (args.metrics or args.clip or args.face_models or args.arcface):
        return None
    names = metric_names(args.metrics)
    per_set = [n for n in names if n in metrics_lib.REGISTRY and metrics_lib.get(n).per_set]
    if per_set:  # FID, Face Div.: a value of a whole set of images, not of one request's images
        raise InputError(
            f"--metrics {','.join(per_set)}: scored over a whole set of images by "
            "`python -m persongen_jax.evaluate`, not per request in the app"
        )
    # no_face "skip": an image without a face has no Face-Sim value (the page says "no face"), not a 0.
    return build_metrics(names, args, no_face="skip", batch_size=MAX_IMAGES)


# ---------------------------------------------------------------------------------------------- generation


class Generator:
    """The model (+ metrics) behind the page: `generate(refs, request)`; no Gradio in here."""

    def __init__(self, pipe, metrics=None, *, source: dict, defaults: Request, workdir: Path):
        if pipe.id_encoder is None:
            raise InputError(
                "the app generates a person from reference photos: the model needs an ID encoder "
                "(--photomaker DIR, converted by `weights_conversion photomaker`)"
            )
        self.pipe, self.metrics = pipe, metrics
        self.source = source
        self.defaults = defaults
        self.workdir = Path(workdir)
        self.text_conditions = list(pipe.text_conditions)
        self.trigger_word = pipe.trigger_word
        f = pipe.vae.downscale_factor
        # Height / width: whole latents through every UNet down-sampling.
        self.size_step = f * 2 ** (len(pipe.unet.config.down_block_types) - 1)
        self._requests = 0

    def sized(self, req: Request) -> Request:
        """The request with height / width of its aspect preset (scaled to the model, on its latent grid)."""
        if not req.aspect:
            return req
        try:
            check_aspect(req.aspect)
        except ValueError as e:
            raise InputError(str(e)) from None
        width, height = aspect_size(req.aspect, self.pipe.default_size, self.size_step)
        return dataclasses.replace(req, height=height, width=width)

    def check(self, req: Request) -> None:
        """InputError (PipelineError for a sampling setting) for a request the model cannot run, before any work."""
        try:
            check_style(req.style)
        except ValueError as e:
            raise InputError(str(e)) from None
        if not 1 <= req.num_images <= MAX_IMAGES:
            raise InputError(f"number of images {req.num_images}: expected 1-{MAX_IMAGES}")
        self.sampling(req).check()
        for name, value in (("height", req.height), ("width", req.width)):
            if value < self.size_step or value % self.size_step:
                raise InputError(f"{name} {value}: expected a multiple of {self.size_step} (the model's latent grid)")
        unknown = sorted(set(req.conditions) - set(self.text_conditions))
        if unknown:
            raise InputError(f"conditions {unknown}: the model has text conditions {self.text_conditions}")
        if req.scheduler not in SCHEDULER_NAMES:
            raise InputError(f"scheduler {req.scheduler!r}: expected one of {sorted(SCHEDULER_NAMES)}")

    def sampling(self, req: Request) -> SamplingSettings:
        """The SamplingSettings of a request."""
        seeds = tuple(self.seeds(req))
        return SamplingSettings.from_attributes(req, seeds=seeds, negative_prompt=req.negative_prompt or None)

    @staticmethod
    def seeds(req: Request) -> list[int]:
        """Image k of a request uses seed + k."""
        return [req.seed + i for i in range(req.num_images)]

    def clip_text(self, req: Request) -> str:
        """What CLIP-T scores: the prompt without the trigger word, then the condition texts, joined by '. '
        (the research's full prompt is P_general + P_bg)."""
        parts = [strip_trigger_word(req.prompt.strip(), self.trigger_word).rstrip(". ")]
        parts += [req.conditions[n].strip() for n in self.text_conditions if req.conditions.get(n, "").strip()]
        return ". ".join(p for p in parts if p)

    def generate(self, refs: list[tuple[str, object]], req: Request, progress=None, control_image=None) -> Result:
        """refs: [(name, PIL image)] as uploaded; progress(steps_done) after each denoising step;
        control_image: a PIL image for the loaded ControlNet (None: no spatial control)."""
        if not refs:
            raise InputError(f"upload 1-{MAX_REFS} reference photos of the person's face")
        if len(refs) > MAX_REFS:
            raise InputError(f"{len(refs)} reference photos: at most {MAX_REFS}")
        if control_image is not None and not self.pipe.controlnets:
            raise InputError(
                "a control image was given but no ControlNet is loaded (start the app with --controlnet DIR)"
            )
        req = self.sized(req)
        self.check(req)
        prompt, negative = apply_style(req.style, req.prompt, req.negative_prompt or None)
        t0 = time.perf_counter()
        names = [n for n, _ in refs]
        images_in = [im.convert("RGB") for _, im in refs]  # what the generate CLI feeds (alpha dropped)
        notes = []
        unused = id_unused_warning(req.start_merge_step, req.num_steps)
        if unused:
            notes.append(unused)
        seeds = self.seeds(req)
        # Every text condition is always fed (an empty one with scale 0: exactly no contribution), so
        # filling a field or not keeps the same compiled program.
        texts = {n: req.conditions.get(n, "").strip() for n in self.text_conditions}
        with CompileWatch() as watch:
            references = None
            if self.metrics is not None:  # before generating: a reference without a face is reported now
                scored = [Image.fromarray(convert_to_rgb(im)) for _, im in refs]  # as evaluate: alpha on white
                references = protocol.prepare_references(self.metrics, scored, names)
            controls = (
                [control_image.convert("RGB")] if control_image is not None else [None] * len(self.pipe.controlnets)
            )
            images = self.pipe(
                prompt,
                images_in,
                seeds=seeds,
                conditions=texts,
                adapter_scales={n: 0.0 for n, t in texts.items() if not t},
                progress=progress or (lambda n: None),
                ref_names=names,
                control_images=controls if self.pipe.controlnets else None,
                control_scales=req.control_scale,
                **self.sampling(req).replace(negative_prompt=negative).call_kwargs(),
            )
            scores = None
            if self.metrics is not None:
                scores = [{"prompt": self.clip_text(req)} for _ in images]
                protocol.score_rows(scores, list(images), self.metrics, [references] * len(images))
                for row in scores:
                    del row["prompt"]
        seconds = time.perf_counter() - t0
        self._requests += 1
        settings = self.settings(req, names, seeds, images, seconds, scores)
        if control_image is not None:
            settings.update(
                controlnets=list(self.source.get("controlnets") or []),
                control_images=["control.png"],
                control_scales=[req.control_scale],
            )
        return Result(images, seeds, scores, settings, seconds, watch.count, watch.seconds, notes)

    def settings(self, req: Request, ref_names, seeds, images, seconds, scores) -> dict:
        """settings.json of a request: the generate CLI's keys (refs: the references' files in the zip),
        plus the scores when computed."""
        s = {
            **self.source,
            "refs": [f"ref_{k}.png" for k in range(len(ref_names))],
            "ref_names": list(ref_names),
            "prompt": req.prompt,
            "seeds": seeds,
            "height": int(images.shape[1]),
            "width": int(images.shape[2]),
            "trigger_word": self.trigger_word,
            "images": [f"seed_{s}.png" for s in seeds],
            "seconds": round(seconds, 2),
            "num_steps": req.num_steps,
            "guidance_scale": req.guidance_scale,
            "start_merge_step": req.start_merge_step,
            "negative_prompt": req.negative_prompt or None,
            "conditions": {n: t for n, t in req.conditions.items() if t.strip()},
            "scheduler": req.scheduler,
        }
        s["aspect"] = req.aspect or None
        if req.style != NO_STYLE:
            s.update(style_settings(req.style, req.prompt, req.negative_prompt or None))
        if scores is not None:
            s["clip_t_text"] = self.clip_text(req)
            s["scores"] = [{"seed": sd, **sc} for sd, sc in zip(seeds, scores)]
        return s

    def write_zip(self, result: Result, refs, control_image=None) -> Path:
        """WORKDIR/<n>/persongen_seed<first>.zip: seed_<s>.png per image, ref_<k>.png, settings.json
        (+ control.png)."""
        folder = self.workdir / f"request_{self._requests:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"persongen_seed{result.seeds[0]}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for seed, img in zip(result.seeds, result.images):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                zf.writestr(f"seed_{seed}.png", buf.getvalue())
            for k, (_, im) in enumerate(refs):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                zf.writestr(f"ref_{k}.png", buf.getvalue())
            if control_image is not None:
                buf = io.BytesIO()
                control_image.save(buf, format="PNG")
                zf.writestr("control.png", buf.getvalue())
            zf.writestr("settings.json", json.dumps(result.settings, indent=2))
        return path

    def warm_up(self) -> float:
        """Compiles what a default request runs: the ID encoder for 1..MAX_REFS photos, the sampling loop +
        VAE decode for the default image count / size / steps / scheduler, the metrics. -> seconds."""
        t0 = time.perf_counter()
        d = self.defaults
        face = Image.new("RGB", (64, 64), (160, 130, 110))  # only the shapes matter here
        prompt = f"a photo of a person {self.trigger_word}"
        texts = {n: "" for n in self.text_conditions}
        scales = {n: 0.0 for n in self.text_conditions}
        enc = self.pipe.id_encoder
        # PhotoMaker V2: stand-in ArcFace embeddings of the right shape (the flat face has no face to detect).
        ids = (
            (lambda n: np.zeros((n, enc.config.id_embeddings_dim), np.float32))
            if getattr(enc, "version", None) == "v2"
            else (lambda n: None)
        )
        for n in range(1, MAX_REFS + 1):
            self.pipe.encode(
                prompt,
                [face] * n,
                conditions=texts,
                adapter_scales=scales,
                height=d.height,
                width=d.width,
                id_embeds=ids(n),
            )
        t1 = time.perf_counter()
        self.pipe(
            prompt,
            [face],
            seeds=self.seeds(d),
            conditions=texts,
            adapter_scales=scales,
            progress=lambda n: None,
            id_embeds=ids(1),
            **self.sampling(d).call_kwargs(),
        )
        t2 = time.perf_counter()
        for metric in self.metrics or ():
            metric.warm_up()
        t3 = time.perf_counter()
        log.info(
            "warm-up: text + ID encoders for 1-%d photos %.1f s, sampling + decode %.1f s, metrics %.1f s",
            MAX_REFS,
            t1 - t0,
            t2 - t1,
            t3 - t2,
        )
        return t3 - t0


# ---------------------------------------------------------------------------------------------- the page


def _value(metric, score: dict, digits: int) -> str | None:
    """One metric's value of an image as the page shows it; None where it found nothing to score (no face)."""
    if metric.found_key and not score[metric.found_key]:
        return None
    value = score[metric.name]
    return "n/a" if value is None else f"{value:.{digits}f}"


def _caption(seed: int, score: dict | None, metrics) -> str:
    """ "seed 3 · CLIP-T 24.1 · Face-Sim 0.412" (or "no face" in place of the Face-Sim)."""
    parts = [f"seed {seed}"]
    for m in metrics if score is not None else ():
        value = _value(m, score, m.card_digits)
        parts.append(m.missing_label if value is None else f"{m.title} {value}")
    return " · ".join(parts)


def _score_table(seeds, scores, metrics) -> list[list]:
    return [
        [k + 1, seed, *[_value(m, sc, m.digits) or m.missing_label for m in metrics]]
        for k, (seed, sc) in enumerate(zip(seeds, scores))
    ]


def _status(result: Result, req: Request) -> str:
    n = len(result.seeds)
    compiled = (
        "no compilation"
        if not result.compiles
        else f"compiled {result.compiles} new program(s) in {result.compile_seconds:.1f} s: the first request of "
        "this image count / size / steps / scheduler"
    )
    lines = [
        f"**{n} image(s)** of {req.width}x{req.height}, {req.num_steps} steps, seeds "
        f"{result.seeds[0]}-{result.seeds[-1]}: {result.seconds:.2f} s ({result.seconds / n:.2f} s per image, "
        f"{compiled})."
    ]
    lines += [f"Note: {x}" for x in result.notes]
    return "\n\n".join(lines)


def _about(gen: Generator) -> str:
    d = gen.defaults
    src = ", ".join(
        f"{k} `{gen.source[k]}`"
        for k in ("tiny", "model", "checkpoint", "step", "photomaker", "lora", "adapters")
        if gen.source.get(k) not in (None, "")
    )
    conds = ", ".join(gen.text_conditions) or "none (no text adapters)"
    scoring = (
        ", ".join(m.title for m in gen.metrics) + " per image (evaluate's metrics; the text scored is the "
        "prompt without the trigger word, then the condition texts)"
        if gen.metrics
        else "off: start the app with `--clip DIR --face-models DIR --arcface DIR` to score each image"
    )
    return (
        f"# persongen_jax\n"
        f"Model: {src}. Text conditions: {conds}. Scores: {scoring}.\n\n"
        f"Compiled at start-up: {d.num_images} image(s) of {d.width}x{d.height}, {d.num_steps} steps, "
        f"{d.scheduler}. Another image count, size, step count or scheduler compiles once, on its first "
        f"request; requests run one at a time (queue)."
    )


def build_ui(gen: Generator):
    """The Gradio Blocks of the page; the generate event is also the `/generate` API endpoint."""
    import gradio as gr  # the optional [app] extra

    d = gen.defaults
    trig = gen.trigger_word
    with gr.Blocks(title="persongen_jax", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(_about(gen), elem_id="about")
        with gr.Row():
            with gr.Column():
                refs = gr.File(
                    label=f"Reference photos of one person (1-{MAX_REFS})",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="refs",
                )
                prompt = gr.Textbox(
                    label="Prompt (P_general)",
                    elem_id="prompt",
                    lines=2,
                    value=f"a photo of a person {trig}",
                    info=f"the class word followed by the trigger word '{trig}', e.g. "
                    f"'a photo of a man {trig} wearing a red hat' (one '{trig}', right after "
                    "man / woman / person / ...)",
                )
                cond_boxes = []
                for name in gen.text_conditions:  # the loaded model's: P_bg / P_body for the research model
                    cond_boxes.append(
                        gr.Textbox(
                            label=conditions_lib.label(name),
                            value="",
                            elem_id=f"cond_{name}",
                            info=f"{conditions_lib.describe(name)}; empty: not used",
                        )
                    )
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                with gr.Row():
                    num_images = gr.Slider(
                        1, MAX_IMAGES, value=d.num_images, step=1, label="Images", elem_id="num_images"
                    )
                    seed = gr.Number(
                        value=d.seed,
                        precision=0,
                        minimum=0,
                        maximum=MAX_SEED,
                        label="Seed",
                        info="image k uses seed + k",
                        elem_id="seed",
                    )
                    randomize = gr.Checkbox(value=False, label="Random seed", elem_id="randomize")
                with gr.Accordion("Sampling", open=False):
                    steps = gr.Slider(1, 100, value=d.num_steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(
                        0.0, 20.0, value=d.guidance_scale, step=0.5, label="Guidance scale", elem_id="guidance"
                    )
                    merge = gr.Slider(
                        0,
                        100,
                        value=d.start_merge_step,
                        step=1,
                        label="start_merge_step",
                        info="the identity tokens are used after this step (PhotoMaker v1)",
                        elem_id="start_merge_step",
                    )
                    scheduler = gr.Radio(
                        sorted(SCHEDULER_NAMES), value=d.scheduler, label="Scheduler", elem_id="scheduler"
                    )
                    hi = max(2048, d.height, d.width)
                    height = gr.Slider(
                        gen.size_step, hi, value=d.height, step=gen.size_step, label="Height", elem_id="height"
                    )
                    width = gr.Slider(
                        gen.size_step, hi, value=d.width, step=gen.size_step, label="Width", elem_id="width"
                    )
                with gr.Row():
                    style = gr.Dropdown(
                        list(STYLES),
                        value=NO_STYLE,
                        label="Style template",
                        elem_id="style",
                        interactive=True,
                        info="PhotoMaker's styles: the prompt goes into the template, the style's "
                        "negative prompt joins yours",
                    )
                    aspect = gr.Dropdown(
                        [(CUSTOM_SIZE, "")] + [(v[0], k) for k, v in ASPECT_RATIOS.items()],
                        value="",
                        label="Aspect ratio",
                        elem_id="aspect",
                        interactive=True,
                        info="an SDXL preset scaled to the model's size; custom: Height / Width",
                    )
                control_inputs = []
                if gen.pipe.controlnets:  # spatial control only when a ControlNet is loaded
                    control_inputs = [
                        gr.File(
                            label="Control image (pose / depth / edges for the ControlNet; empty: none)",
                            file_count="single",
                            file_types=["image"],
                            elem_id="control_image",
                        ),
                        gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control scale", elem_id="control_scale"),
                    ]
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Generated", columns=2, format="png", elem_id="gallery", interactive=False)
                status = gr.Markdown(label="Status", elem_id="status")
                scores = gr.Dataframe(
                    headers=["image", "seed", *[m.title for m in gen.metrics or ()]],
                    label="Scores",
                    interactive=False,
                    visible=bool(gen.metrics),
                    elem_id="scores",
                )
                download = gr.File(
                    label="Download: images + settings.json (zip)", interactive=False, elem_id="download"
                )

        def read_upload(file, what: str, read):
            """read(path) of an uploaded file (a path, or Gradio's file object); a gr.Error naming the file
            (`what`: "reference photo") when it is not a readable image."""
            path = file if isinstance(file, str) else getattr(file, "name", file)
            try:
                return read(path)
            except Exception as e:  # PIL raises several types for a non-image
                raise gr.Error(
                    f"{what} {Path(path).name!r} is not a readable image ({type(e).__name__})",
                    duration=None,
                    print_exception=False,
                ) from None

        def on_generate(*values):
            (
                files,
                prompt_v,
                negative_v,
                n_v,
                seed_v,
                random_v,
                steps_v,
                guidance_v,
                merge_v,
                sched_v,
                height_v,
                width_v,
                style_v,
                aspect_v,
                *rest,
                progress,
            ) = values
            control_v, scale_v = rest[: len(control_inputs)] if control_inputs else (None, 1.0)
            cond_v = rest[len(control_inputs) :]
            control_image = None
            if control_v:
                control_image = read_upload(control_v, "control image", read_control_image)
            loaded = [read_upload(f, "reference photo", read_reference) for f in (files or [])]
            seed_used = random.randint(0, MAX_SEED - MAX_IMAGES) if random_v else int(seed_v or 0)
            req = Request(
                prompt=prompt_v or "",
                conditions={n: t or "" for n, t in zip(gen.text_conditions, cond_v)},
                negative_prompt=negative_v or "",
                num_images=int(n_v),
                seed=seed_used,
                num_steps=int(steps_v),
                guidance_scale=float(guidance_v),
                start_merge_step=int(merge_v),
                scheduler=sched_v,
                height=int(height_v),
                width=int(width_v),
                style=style_v or NO_STYLE,
                aspect=aspect_v or "",
                control_scale=float(scale_v),
            )
            # The step callback may come from a runtime thread: run it in this request's context, where
            # Gradio finds the event to report progress to.
            ctx = contextvars.copy_context()
            total = req.num_steps

            def on_step(done: int) -> None:
                ctx.run(progress, (done, total), desc="denoising", unit="steps")

            try:
                result = gen.generate(loaded, req, progress=on_step, control_image=control_image)
            except (InputError, PipelineError, NoFaceError, ValueError) as e:
                log.info("request refused: %s", e)
                raise gr.Error(str(e), duration=None, print_exception=False) from None
            req = gen.sized(req)
            log.info(
                "%d image(s) %dx%d, %d steps: %.2f s, %d compile(s)",
                len(result.seeds),
                req.width,
                req.height,
                req.num_steps,
                result.seconds,
                result.compiles,
            )
            zip_path = gen.write_zip(result, loaded, control_image)
            items = [
                (img, _caption(s, sc, gen.metrics))
                for s, img, sc in zip(result.seeds, result.images, result.scores or [None] * len(result.seeds))
            ]
            table = _score_table(result.seeds, result.scores, gen.metrics) if result.scores else None
            return items, _status(result, req), table, str(zip_path), seed_used

        inputs = [
            refs,
            prompt,
            negative,
            num_images,
            seed,
            randomize,
            steps,
            guidance,
            merge,
            scheduler,
            height,
            width,
            style,
            aspect,
            *control_inputs,
            *cond_boxes,
        ]
        # The API's parameter names (gradio_client, "Use via API"); one `p_<name>` per text condition. Gradio
        # reads them, and where to pass its progress tracker, from the signature.
        names = [
            "reference_photos",
            "prompt",
            "negative_prompt",
            "num_images",
            "seed",
            "random_seed",
            "steps",
            "guidance_scale",
            "start_merge_step",
            "scheduler",
            "height",
            "width",
            "style",
            "aspect",
            *(["control_image", "control_scale"] if control_inputs else []),
            *[f"p_{n}" for n in gen.text_conditions],
        ]
        param = inspect.Parameter
        on_generate.__signature__ = inspect.Signature(
            [param(n, param.POSITIONAL_OR_KEYWORD) for n in names]
            + [param("progress", param.POSITIONAL_OR_KEYWORD, default=gr.Progress())]
        )
        run.click(
            on_generate,
            inputs=inputs,
            outputs=[gallery, status, scores, download, seed],
            api_name="generate",
            concurrency_limit=1,
            show_progress_on=[gallery],
        )
    demo.queue(default_concurrency_limit=1)
    return demo


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m persongen_jax.app`."""
    p = make_parser("python -m persongen_jax.app", __doc__)
    add_model_arguments(
        p, tiny_help="tiny random models made on the fly (the demo training's: configs/demo.py), no weights"
    )
    s = p.add_argument_group("scoring (optional, as evaluate: the model folders the metrics need)")
    s.add_argument(
        "--metrics",
        help="comma-separated metric names (persongen_jax/evaluation/metrics.py; default "
        "when a scoring folder is given: clip_t,face_sim)",
    )
    metrics_lib.add_scoring_arguments(s)
    d = p.add_argument_group("the page's defaults (the request compiled at start-up)")
    d.add_argument("--num-images", type=int, default=2, help="images per request")
    add_sampling_arguments(d, merge_help=MERGE_HELP + " (the page shows it as a step index)")
    add_scheduler_argument(d, help="sampling scheduler")
    d.add_argument("--height", type=int, help="default: the model's (sample_size x VAE factor)")
    d.add_argument("--width", type=int, help="default: the model's")
    p.add_argument(
        "--controlnet",
        default=None,
        metavar="DIR",
        help="a converted ControlNet folder (weights_conversion controlnet): the page then takes a control "
        "image and its scale",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    return p


def load_pipeline(args, workdir: Path):
    """-> (pipeline, source: the settings.json keys naming the model, as the generate CLI writes them)."""
    settings = SamplingSettings(dtype=args.dtype, attention=args.attention)
    source = model_source(args, tiny=load_config(DEMO_CONFIG) if args.tiny else None)
    source.check(settings)
    record = source.settings_json(settings)
    pipe, step, _ = load_source(source, settings, workdir=workdir)  # --tiny: tokenizer files in workdir
    if args.tiny:
        return pipe, {**record, "tiny": "configs/demo.py (random weights)"}
    if pipe.id_encoder is not None:
        print(f"ID encoder: PhotoMaker {getattr(pipe.id_encoder, 'version', 'v1')}", file=sys.stderr, flush=True)
    return pipe, {**record, "step": step}


def main(argv=None) -> int:
    """Loads the model (+ metrics), compiles the default request, serves the page until stopped -> exit code
    (1 with an `error:` line for a bad argument or model folder)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the app needs Gradio: pip install -e '.[app]'", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    workdir = tempfile.TemporaryDirectory(prefix="persongen_app_")
    try:
        metrics = load_metrics(args)  # before the big model: a bad scoring path fails fast
        print(f"loading {args.model or args.checkpoint or 'tiny random models'} ...", file=sys.stderr, flush=True)
        pipe, source = load_pipeline(args, Path(workdir.name))
        if args.controlnet:
            pipe.add_controlnets([args.controlnet])
            source["controlnets"] = [args.controlnet]
        size = pipe.default_size
        defaults = Request(
            prompt="",
            num_images=args.num_images,
            num_steps=args.steps,
            guidance_scale=args.guidance_scale,
            start_merge_step=resolve_start_merge_step(args.start_merge_step, args.steps),
            scheduler=args.scheduler,
            height=args.height or size,
            width=args.width or size,
        )
        gen = Generator(pipe, metrics, source=source, defaults=defaults, workdir=Path(workdir.name) / "out")
        gen.check(defaults)  # the defaults are a valid request
        t_load = time.perf_counter() - t0
        print(
            f"loaded in {t_load:.1f} s; compiling the default request ({defaults.num_images} image(s) "
            f"{defaults.width}x{defaults.height}, {defaults.num_steps} steps, {defaults.scheduler}) ...",
            file=sys.stderr,
            flush=True,
        )
        with CompileWatch() as watch:
            t_warm = gen.warm_up()
        print(
            f"compiled {watch.count} program(s) in {t_warm:.1f} s (compile {watch.seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    except (InputError, ImageError, PipelineError, FaceModelError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        workdir.cleanup()
        return 1
    demo = build_ui(gen)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            show_error=True,
            ssr_mode=False,
            allowed_paths=[workdir.name],
            prevent_thread_lock=True,
            quiet=True,
        )
    except OSError as e:
        print(f"error: cannot serve on {args.host}:{args.port} ({e}); pick another --port", file=sys.stderr)
        workdir.cleanup()
        return 1
    print(f"ready in {time.perf_counter() - t0:.1f} s: http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill`: close the server, remove WORKDIR
    try:
        demo.block_thread()
    finally:
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
