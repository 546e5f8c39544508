"""Control images (ControlNet inputs), PhotoMaker's style templates and the SDXL aspect-ratio presets.

Host side, numpy / PIL / OpenCV. Used by `PersonGenPipeline`, `generate` and the web app:

    image = prepare_control_image(pil_image, height, width)        [1, H, W, 3] float32 in [0, 1]
    edges = PREPROCESSORS["canny"](pil_image)                        PIL RGB edge map (OpenCV Canny)
    prompt, negative = apply_style("Cinematic", prompt, negative)   PhotoMaker demo's templates
    width, height = aspect_size("16:9", base=1024, multiple=8)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------- control images


def prepare_control_image(image: Image.Image | np.ndarray, height: int, width: int, mode: str = "RGB") -> np.ndarray:
    """A control image as diffusers' ControlNet pipelines prepare it (`VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False).preprocess(image, height, width)`; the T2I-Adapter pipeline's `_preprocess_adapter_image`
    is the same): RGB (mode "L": one grey channel, for 1-channel adapters), resized to the output size with PIL
    Lanczos (aspect ratio not kept), scaled to [0, 1] -> [1, height, width, 3 (or 1)] float32."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"control image array: expected uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
        image = Image.fromarray(arr)
    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    arr = np.asarray(image, np.float32) / 255.0
    return (arr[..., None] if arr.ndim == 2 else arr)[None]


def canny(image: Image.Image | np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """OpenCV Canny edges of the image as a 3-channel RGB image (white edges on black), the preprocessing of
    diffusers' canny ControlNet examples (thresholds 100 / 200)."""
    import cv2

    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    edges = cv2.Canny(np.ascontiguousarray(rgb), low_threshold, high_threshold)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


PREPROCESSORS: dict[str, Callable[[Image.Image], Image.Image]] = {"none": lambda im: im, "canny": canny}


def check_preprocessor(name: str) -> None:
    """ValueError listing the names when `name` is not a control-image preprocessor."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown control preprocessor {name!r}; expected one of {sorted(PREPROCESSORS)}")


# ---------------------------------------------------------------------------------------------- styles

# PhotoMaker's gradio_demo/style_template.py: name -> (prompt template with {prompt}, negative prompt).
STYLES: dict[str, tuple[str, str]] = {
    "(No style)": ("{prompt}", ""),
    "Cinematic": (
        "cinematic still {prompt} . emotional, harmonious, vignette, highly detailed, high budget, bokeh, "
        "cinemascope, moody, epic, gorgeous, film grain, grainy",
        "anime, cartoon, graphic, text, painting, crayon, graphite, abstract, glitch, deformed, mutated, "
        "ugly, disfigured",
    ),
    "Disney Charactor": (
        "A Pixar animation character of {prompt} . pixar-style, studio anime, Disney, high-quality",
        "lowres, bad anatomy, bad hands, text, bad eyes, bad arms, bad legs, error, missing fingers, "
        "extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg "
        "artifacts, signature, watermark, blurry, grayscale, noisy, sloppy, messy, grainy, highly "
        "detailed, ultra textured, photo",
    ),
    "Digital Art": (
        "concept art {prompt} . digital artwork, illustrative, painterly, matte painting, highly detailed",
        "photo, photorealistic, realism, ugly",
    ),
    "Photographic (Default)": (
        "cinematic photo {prompt} . 35mm photograph, film, bokeh, professional, 4k, highly detailed",
        "drawing, painting, crayon, sketch, graphite, impressionist, noisy, blurry, soft, deformed, ugly",
    ),
    "Fantasy art": (
        "ethereal fantasy concept art of  {prompt} . magnificent, celestial, ethereal, painterly, epic, "
        "majestic, magical, fantasy art, cover art, dreamy",
        "photographic, realistic, realism, 35mm film, dslr, cropped, frame, text, deformed, glitch, noise, "
        "noisy, off-center, deformed, cross-eyed, closed eyes, bad anatomy, ugly, disfigured, sloppy, "
        "duplicate, mutated, black and white",
    ),
    "Neonpunk": (
        "neonpunk style {prompt} . cyberpunk, vaporwave, neon, vibes, vibrant, stunningly beautiful, crisp, "
        "detailed, sleek, ultramodern, magenta highlights, dark purple shadows, high contrast, cinematic, "
        "ultra detailed, intricate, professional",
        "painting, drawing, illustration, glitch, deformed, mutated, cross-eyed, ugly, disfigured",
    ),
    "Enhance": (
        "breathtaking {prompt} . award-winning, professional, highly detailed",
        "ugly, deformed, noisy, blurry, distorted, grainy",
    ),
    "Comic book": (
        "comic {prompt} . graphic illustration, comic art, graphic novel art, vibrant, highly detailed",
        "photograph, deformed, glitch, noisy, realistic, stock photo",
    ),
    "Lowpoly": (
        "low-poly style {prompt} . low-poly game art, polygon mesh, jagged, blocky, wireframe edges, centered "
        "composition",
        "noisy, sloppy, messy, grainy, highly detailed, ultra textured, photo",
    ),
    "Line art": (
        "line art drawing {prompt} . professional, sleek, modern, minimalist, graphic, line art, vector graphics",
        "anime, photorealistic, 35mm film, deformed, glitch, blurry, noisy, off-center, deformed, cross-eyed, "
        "closed eyes, bad anatomy, ugly, disfigured, mutated, realism, realistic, impressionism, "
        "expressionism, oil, acrylic",
    ),
}
NO_STYLE = "(No style)"


def check_style(name: str) -> None:
    """ValueError (one line, listing the names) when `name` is not one of STYLES."""
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; expected one of: " + ", ".join(repr(n) for n in STYLES))


def apply_style(name: str, prompt: str, negative_prompt: str | None = None) -> tuple[str, str | None]:
    """(styled prompt, merged negative prompt), as PhotoMaker's demo: the template's {prompt} replaced, and
    `style negative + " " + user negative` (stripped, so no style and no negative stays "no negative": None)."""
    check_style(name)
    template, style_negative = STYLES[name]
    merged = f"{style_negative} {negative_prompt or ''}".strip()
    return template.replace("{prompt}", prompt), merged or negative_prompt


# ---------------------------------------------------------------------------------------------- aspect ratios

# PhotoMaker's gradio_demo/aspect_ratio_template.py (SDXL sizes at 1024): ratio -> (name, width, height).
ASPECT_RATIOS: dict[str, tuple[str, int, int]] = {
    "1:1": ("Instagram (1:1)", 1024, 1024),
    "3:2": ("35mm film / Landscape (3:2)", 1024, 680),
    "2:3": ("35mm film / Portrait (2:3)", 680, 1024),
    "4:3": ("CRT Monitor / Landscape (4:3)", 1024, 768),
    "3:4": ("CRT Monitor / Portrait (3:4)", 768, 1024),
    "16:9": ("Widescreen TV / Landscape (16:9)", 1024, 576),
    "9:16": ("Widescreen TV / Portrait (9:16)", 576, 1024),
    "16:10": ("Widescreen Monitor / Landscape (16:10)", 1024, 640),
    "10:16": ("Widescreen Monitor / Portrait (10:16)", 640, 1024),
    "2.39:1": ("Cinemascope (2.39:1)", 1024, 424),
    "1.85:1": ("Widescreen Movie (1.85:1)", 1024, 552),
    "1.37:1": ("Academy Movie (1.37:1)", 1024, 744),
    "297:210": ("Sheet-print (A-series) / Landscape (297:210)", 1024, 720),
    "210:297": ("Sheet-print (A-series) / Portrait (210:297)", 720, 1024),
}


def check_aspect(ratio: str) -> None:
    """ValueError (one line, listing the presets) when `ratio` is not a key of ASPECT_RATIOS."""
    if ratio not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect {ratio!r}; expected one of: {', '.join(ASPECT_RATIOS)}")


def aspect_size(ratio: str, base: int = 1024, multiple: int = 8) -> tuple[int, int]:
    """(width, height) of the preset `ratio` for a model whose square size is `base` pixels: the SDXL preset
    itself at base 1024, scaled by base / 1024 otherwise (a tiny model), rounded to a multiple of the VAE
    factor `multiple` (at least one)."""
    check_aspect(ratio)
    _, w, h = ASPECT_RATIOS[ratio]
    fit = lambda v: max(multiple, int(round(v * base / 1024 / multiple)) * multiple)  # noqa: E731
    return fit(w), fit(h)


# ---------------------------------------------------------------------------------------------- command line


def add_control_arguments(p) -> None:
    """The options of spatial control, styles and sizes (generate; the web app takes --controlnet)."""

    def per_controlnet(flag: str, metavar: str, help: str, type=str) -> None:
        """A repeatable option: one value per --controlnet, in the same order."""
        p.add_argument(flag, type=type, action="append", default=[], metavar=metavar, help=help)

    per_controlnet(
        "--controlnet",
        "DIR",
        "a converted ControlNet folder (weights_conversion controlnet); repeatable, each with its "
        "--control-image (in the same order)",
    )
    per_controlnet(
        "--control-image",
        "PATH",
        "the control image of each --controlnet (pose / depth / edges ...), resized to the output size",
    )
    per_controlnet(
        "--control-scale",
        "S",
        "conditioning scale: once for all ControlNets or once per --controlnet (default 1.0)",
        type=float,
    )
    p.add_argument(
        "--control-preprocess",
        choices=sorted(PREPROCESSORS),
        action="append",
        default=[],
        help="turn the control image into the ControlNet's input first (canny: OpenCV edges); once for "
        "all or once per --controlnet (default none)",
    )
    p.add_argument(
        "--control-guidance-start",
        type=float,
        default=0.0,
        help="fraction of the steps at which the ControlNets start acting (default 0)",
    )
    p.add_argument(
        "--control-guidance-end",
        type=float,
        default=1.0,
        help="fraction of the steps at which the ControlNets stop acting (default 1)",
    )
    p.add_argument(
        "--t2i-adapter",
        default=None,
        metavar="DIR",
        help="a converted T2I-Adapter folder (weights_conversion t2i-adapter; SDXL full_adapter_xl), with "
        "--adapter-image",
    )
    p.add_argument(
        "--adapter-image",
        default=None,
        metavar="PATH",
        help="the T2I-Adapter's input image (sketch, "
        "lineart, depth ...), resized to the output size (--control-preprocess canny applies to it too "
        "when it is given once and there is no --controlnet)",
    )
    p.add_argument("--adapter-scale", type=float, default=1.0, help="adapter_conditioning_scale (default 1.0)")
    p.add_argument(
        "--adapter-factor",
        type=float,
        default=1.0,
        help="adapter_conditioning_factor: the fraction of the steps the adapter acts on (default 1.0)",
    )
    p.add_argument("--style", default=None, help="a PhotoMaker style template: " + ", ".join(map(repr, STYLES)))
    p.add_argument(
        "--aspect",
        default=None,
        metavar="W:H",
        help="an SDXL aspect preset (scaled to the model's size): " + ", ".join(ASPECT_RATIOS),
    )


def _per_controlnet(values: list, n: int, flag: str, default):
    if len(values) not in (0, 1, n):
        raise ValueError(
            f"{flag} given {len(values)} times for {n} --controlnet: give it once for all, or once per --controlnet"
        )
    return list(values) * n if len(values) == 1 else (list(values) or [default] * n)


def control_arguments(args) -> dict:
    """Checks the options of `add_control_arguments` before any model loads and reads the control images
    (ValueError / ImageError naming the flag or file) -> {"images": [PIL RGB], "scales", "preprocess",
    "start", "end"}: the images already preprocessed."""
    from persongen_jax.pipeline.image_processing import ImageError, load_image

    n = len(args.controlnet)
    if len(args.control_image) != n:
        raise ValueError(
            f"{len(args.control_image)} --control-image for {n} --controlnet: give one image per ControlNet"
        )
    if args.style is not None:
        check_style(args.style)
    if args.aspect is not None:
        check_aspect(args.aspect)
        if args.height is not None or args.width is not None:
            raise ValueError("--aspect sets the size: drop --height / --width")
    scales = _per_controlnet(args.control_scale, n, "--control-scale", 1.0)
    preprocess = _per_controlnet(args.control_preprocess, n, "--control-preprocess", "none")
    if not 0.0 <= args.control_guidance_start < args.control_guidance_end <= 1.0:
        raise ValueError(
            f"--control-guidance-start {args.control_guidance_start} / --control-guidance-end "
            f"{args.control_guidance_end}: expected 0 <= start < end <= 1"
        )
    try:
        images = [PREPROCESSORS[pre](load_image(path)) for path, pre in zip(args.control_image, preprocess)]
    except ImageError as e:
        raise ImageError(f"--control-image {e}") from None
    if (args.t2i_adapter is None) != (args.adapter_image is None):
        raise ValueError("--t2i-adapter and --adapter-image go together")
    if not 0.0 <= args.adapter_factor <= 1.0:
        raise ValueError(f"--adapter-factor {args.adapter_factor}: expected a fraction of the steps in [0, 1]")
    adapter_image = None
    if args.adapter_image is not None:
        pre = args.control_preprocess[0] if len(args.control_preprocess) == 1 and not n else "none"
        try:
            adapter_image = PREPROCESSORS[pre](load_image(args.adapter_image))
        except ImageError as e:
            raise ImageError(f"--adapter-image {e}") from None
    return {
        "images": images,
        "scales": scales,
        "preprocess": preprocess,
        "start": args.control_guidance_start,
        "end": args.control_guidance_end,
        "adapter_image": adapter_image,
    }


def style_settings(style: str | None, prompt: str, negative_prompt: str | None) -> dict:
    """settings.json entries of a style: the template text and the prompts it produced (empty without one)."""
    if style is None:
        return {}
    template, negative = STYLES[style]
    styled, merged = apply_style(style, prompt, negative_prompt)
    return {
        "style": style,
        "style_template": {"prompt": template, "negative_prompt": negative},
        "styled_prompt": styled,
        "styled_negative_prompt": merged,
    }
