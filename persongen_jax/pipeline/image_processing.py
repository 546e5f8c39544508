"""Image loading and CLIP preprocessing (host side, numpy / PIL).

`CLIPImageProcessor` reproduces transformers' `CLIPImageProcessor` (PIL backend)
with the settings of a model folder's processor config (`from_pretrained`), or
its defaults: convert to RGB (transparency composited onto white,
`convert_to_rgb`; 16-bit and float greyscale scaled to 8 bits, `to_8bit`),
resize the shortest edge to `size` with PIL bicubic (long edge
`int(size * long / short)`), center crop `crop_size` (top = (h - crop) // 2,
zero-padded when the image is smaller), rescale by 1/255, normalise with the
OpenAI CLIP mean/std. Output is channels-last float32 [H, W, 3], what our CLIP
vision models take. `clip_preprocess(image, size)` is the default processor at
one size (PhotoMaker's ID encoder input).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from persongen_jax.io import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # transformers' ViTImageProcessor defaults
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' file names: a processor's `processor_config.json` (its "image_processor" entry wins, as in
# transformers' get_image_processor_dict) and the image processor's own `preprocessor_config.json`.
PROCESSOR_CONFIG = "processor_config.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def to_8bit(image: Image.Image) -> Image.Image:
    """A PIL image of more than 8 bits per sample -> mode "L" with the same brightness; other modes are
    returned as they are. PIL's own `.convert("RGB" | "L")` clips such samples at 255, so a 16-bit
    greyscale PNG of mean 117 (in 8-bit terms) becomes all white. Scaling, by mode:
    `I;16`, `I;16B`, `I;16L` (16-bit PNG / TIFF): x >> 8, as PIL's own 16-bit -> 8-bit readers;
    `I` (32-bit int, what PIL gives 16-bit PGM and some TIFFs): the 16-bit range, clipped to [0, 65535], >> 8;
    `F` (32-bit float): the [0, 1] range of float images, round(255 x) clipped to [0, 255] (NaN -> 0)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")
    if image.mode == "F":
        arr = np.nan_to_num(np.asarray(image, np.float64), nan=0.0)
        return Image.fromarray(np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    return image


def convert_to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """-> RGB uint8 [H, W, 3] with transparency composited onto white, as transformers'
    `image_transforms.convert_to_rgb` (the first step of its CLIP image processing): a PIL image with an
    alpha band or a `transparency` entry (palette or colour-key PNG) is alpha-composited over opaque
    white by PIL; an array [H, W, 4] becomes round(a * rgb + (1 - a) * 255), a = alpha / 255; grey
    [H, W] or [H, W, 1] is repeated to 3 channels. (PIL's plain `.convert("RGB")` and cv2.imread instead
    drop alpha and keep the colours under it, which no viewer sees.)"""
    if isinstance(image, Image.Image):
        image = to_8bit(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ImageError(f"expected an image array [H, W, 3] (or [H, W], 1 or 4 channels), got shape {arr.shape}")
    # 16-bit samples as `to_8bit`; a plain astype would wrap them around (256 -> 0).
    arr = (arr >> 8).astype(np.uint8) if arr.dtype == np.uint16 else arr.astype(np.uint8, copy=False)
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] == 4:
        alpha = arr[..., 3:4] / 255
        return np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return arr


def load_image(path: str | os.PathLike, *, composite_on_white: bool = False) -> Image.Image:
    """Opens an image as RGB, with a one-line error naming the file when it is missing or unreadable.

    Transparency: dropped by default (the colours under it kept), as diffusers' `load_image` that
    PhotoMaker's scripts read reference faces with; `composite_on_white=True` composites it onto white
    (`convert_to_rgb`), as the evaluation scores an image: what transformers' CLIP processing sees."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            return Image.fromarray(convert_to_rgb(im)) if composite_on_white else to_8bit(im).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _size(value, name: str, source: str, *, int_is_square: bool) -> int | tuple[int, int]:
    """transformers' get_size_dict for the forms CLIP uses: an int (CLIP's `size`: the shortest edge;
    `crop_size`: a square), [height, width], {"shortest_edge"} or {"height", "width"}."""

    def pos_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if pos_int(value):
        return (value, value) if int_is_square else value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(pos_int, value)):
        return value[0], value[1]
    if isinstance(value, dict):
        keys = {k for k, v in value.items() if v is not None}
        if keys == {"shortest_edge"} and not int_is_square and pos_int(value["shortest_edge"]):
            return value["shortest_edge"]
        if keys == {"height", "width"} and pos_int(value["height"]) and pos_int(value["width"]):
            return value["height"], value["width"]
    what = "{'height', 'width'}" + ("" if int_is_square else " or {'shortest_edge'}")
    raise ValueError(f"{source}: {name} {value!r} is not supported; expected an int, [height, width] or {what}")


@dataclass(frozen=True)
class CLIPImageProcessor:
    """transformers' CLIPImageProcessor (PIL backend): its attributes (the keys of a processor config)
    and defaults; `__call__` runs it on one image -> float32 [H, W, 3].

    size: int = the shortest edge (the long edge becomes int(size * long / short)), or (height, width).
    crop_size: (height, width). resample: a PIL filter number (3 = bicubic)."""

    size: int | tuple[int, int] = 224
    crop_size: tuple[int, int] = (224, 224)
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    # How a processor config's int `size` reads: CLIP's is the shortest edge, ViT's a square.
    size_int_is_square = False

    @classmethod
    def at_size(cls, size: int) -> "CLIPImageProcessor":
        """The defaults at another image size (shortest edge = crop = size)."""
        return cls(size=size, crop_size=(size, size))

    @classmethod
    def from_dict(cls, config: dict, source: str = "image processor config") -> "CLIPImageProcessor":
        """From the keys of a processor config; missing keys keep transformers' CLIP defaults. A value
        this port cannot reproduce (a size form CLIP does not use, do_pad) is an error naming `source`;
        keys that do not change the pixels (processor class names) are ignored."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if config.get("do_pad"):
            raise ValueError(f"{source}: do_pad is not supported for CLIP preprocessing")
        kw: dict[str, Any] = {}
        if config.get("size") is not None:
            kw["size"] = _size(config["size"], "size", source, int_is_square=cls.size_int_is_square)
        if config.get("crop_size") is not None:
            kw["crop_size"] = _size(config["crop_size"], "crop_size", source, int_is_square=True)
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if config.get(key) is not None:
                if not isinstance(config[key], bool):
                    raise ValueError(f"{source}: {key} must be true or false, got {config[key]!r}")
                kw[key] = config[key]
        if config.get("resample") is not None:
            if config["resample"] not in [int(r) for r in Image.Resampling]:
                raise ValueError(
                    f"{source}: resample {config['resample']!r} is not a PIL filter number "
                    f"({[int(r) for r in Image.Resampling]})"
                )
            kw["resample"] = int(config["resample"])
        if config.get("rescale_factor") is not None:
            if isinstance(config["rescale_factor"], bool) or not isinstance(config["rescale_factor"], (int, float)):
                raise ValueError(f"{source}: rescale_factor must be a number, got {config['rescale_factor']!r}")
            kw["rescale_factor"] = float(config["rescale_factor"])
        for key in ("image_mean", "image_std"):
            value = config.get(key)
            if value is None:
                continue
            value = [value] * 3 if isinstance(value, (int, float)) else value
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
                raise ValueError(f"{source}: {key} must be 3 numbers (RGB), got {config[key]!r}")
            kw[key] = tuple(float(v) for v in value)
        return cls(**kw)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, default_size: int = 224) -> "CLIPImageProcessor":
        """The processor config of a model folder as transformers reads it (processor_config.json's
        "image_processor" entry, else preprocessor_config.json); without either, the defaults at
        `default_size` (the vision model's image size)."""
        directory = Path(directory)
        for name, entry in ((PROCESSOR_CONFIG, "image_processor"), (IMAGE_PROCESSOR_CONFIG, None)):
            path = directory / name
            if not path.is_file():
                continue
            data = read_json(path)
            if entry is None:
                return cls.from_dict(data, str(path))
            if isinstance(data, dict) and entry in data:
                return cls.from_dict(data[entry], f"{path} ({entry})")
        return cls.at_size(default_size)

    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output, or None when it depends on the image (no crop, shortest edge)."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and not isinstance(self.size, int):
            return self.size
        return None

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if not isinstance(self.size, int):
            return self.size
        # transformers' get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image (PIL, or uint8 [H, W, 3|4]) -> normalised float32 [H, W, 3], as transformers."""
        if self.do_convert_rgb:
            arr = convert_to_rgb(image)
        else:
            arr = np.asarray(image)
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise ImageError(
                    f"the processor config has do_convert_rgb false: expected an RGB image, got shape {arr.shape}"
                )
            arr = arr.astype(np.uint8, copy=False)
        if self.do_resize:
            h, w = self._resized_shape(*arr.shape[:2])
            arr = np.asarray(Image.fromarray(arr).resize((w, h), resample=self.resample))
        if self.do_center_crop:
            arr = _center_crop(arr, *self.crop_size)
        out = arr
        if self.do_rescale:
            out = (out.astype(np.float64) * self.rescale_factor).astype(np.float32)
        out = out.astype(np.float32, copy=False)
        if self.do_normalize:
            out = (out - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return out


@dataclass(frozen=True)
class ViTImageProcessor(CLIPImageProcessor):
    """transformers' ViTImageProcessor (PIL backend; DINO's folders): the same steps with its defaults --
    resize to size (height, width) = 224 x 224 without keeping the aspect ratio (an int `size` in a config is
    a square), bilinear, no center crop, rescale 1/255, mean = std = 0.5. `from_pretrained` reads the
    folder's preprocessor_config.json. One difference: an image with transparency is composited onto white
    first (as every metric here scores it); transformers would keep 4 channels and fail."""

    size: int | tuple[int, int] = (224, 224)
    resample: int = 2
    do_center_crop: bool = False
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD
    size_int_is_square = True

    @classmethod
    def at_size(cls, size: int) -> "ViTImageProcessor":
        """The defaults at another image size (size x size)."""
        return cls(size=(size, size), crop_size=(size, size))


def check_output_size(processor: CLIPImageProcessor, image_size: int, what: str, model: str) -> None:
    """ValueError unless `processor` gives image_size x image_size images, what `model` takes."""
    out = processor.output_size()
    if out != (image_size, image_size):
        got = "images of varying size (no center crop)" if out is None else f"{out[1]}x{out[0]} images"
        raise ValueError(f"{what} gives {got}; {model} takes {image_size}x{image_size}")


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' center_crop: top = (h - crop) // 2; an image smaller than the crop is zero-padded
    around (ceil of half the difference before)."""
    h, w = arr.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    canvas = np.zeros((new_h, new_w, arr.shape[2]), arr.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = arr
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return canvas[top : top + crop_h, left : left + crop_w]


def clip_preprocess(
    image: Image.Image | np.ndarray,
    size: int = 224,
    crop_size: int | None = None,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
) -> np.ndarray:
    """Image -> normalised float32 [crop, crop, 3] exactly as a default CLIPImageProcessor at `size`."""
    crop_size = crop_size or size
    return CLIPImageProcessor(
        size=size, crop_size=(crop_size, crop_size), image_mean=tuple(mean), image_std=tuple(std)
    )(image)
