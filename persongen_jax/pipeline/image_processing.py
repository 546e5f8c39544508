"""Image loading and CLIP preprocessing (host side, numpy / PIL).

`clip_preprocess` reproduces transformers' `CLIPImageProcessor` (PIL backend):
resize the shortest edge to `size` with PIL bicubic (long edge
`int(size * long / short)`), center crop `crop_size` (top = (h - crop) // 2),
rescale by 1/255, normalise with the OpenAI CLIP mean/std. Output is
channels-last float32 [H, W, 3], what our CLIP vision models take.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image as RGB, with a one-line error naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def clip_preprocess(image: Image.Image | np.ndarray, size: int = 224, crop_size: int | None = None,
                    mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """RGB image -> normalised float32 [crop, crop, 3] exactly as CLIPImageProcessor."""
    crop_size = crop_size or size
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32)
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    if top < 0 or left < 0:
        raise ImageError(f"image of size {new_w}x{new_h} is smaller than the crop {crop_size}")
    arr = arr[top:top + crop_size, left:left + crop_size]
    arr = arr * np.float32(1 / 255)
    return ((arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)
