"""Stage "decode": read, hash, decode (EXIF orientation applied, RGB) and the size filter.

Rejected: a path that resolves, symlinks followed, outside SRC; anything but a regular file (a FIFO,
a folder named like an image); a file that cannot be read or is over the size limit
(`common.read_source`); a file PIL cannot decode; an image whose shorter side is below `min_side`
(research: 512). The header is checked before the pixels are
decoded, so small images cost almost nothing.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from persongen_jax.data.build.common import FileStageDoFn, Item, sha256_bytes
from persongen_jax.pipeline.image_processing import to_8bit


class DecodeError(ValueError):
    """The bytes are not an image PIL can decode (reason "cannot decode image")."""
    pass


def decode_rgb(data: bytes, min_side: int = 0) -> np.ndarray:
    """Image bytes -> RGB uint8 [H, W, 3] with the EXIF orientation applied; DecodeError("cannot decode
    image ...") or ValueError("... < min_side ...")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size  # header only: cheap
                rgb = None if min(w, h) < min_side else np.asarray(to_8bit(ImageOps.exif_transpose(im)).convert("RGB"))
    except Exception as e:  # PIL raises many types for broken or hostile files
        raise DecodeError(f"cannot decode image ({type(e).__name__})") from None
    if rgb is None:
        raise ValueError(f"shorter side {min(w, h)} px < min_side {min_side} ({w}x{h})")
    return rgb


class DecodeImages(FileStageDoFn):
    """Items -> Items with `rgb`, `sha256`, `width`, `height`; rejects unreadable, undecodable and small images."""
    stage = "decode"

    def run_file(self, item: Item, data: bytes):
        """Hashes and decodes one image (see the module doc)."""
        try:
            rgb = decode_rgb(data, self.settings.min_side)
        except DecodeError as e:
            yield self.rejected(item, "cannot decode image", str(e))
            return
        except ValueError as e:
            yield self.rejected(item, "image too small", str(e))
            return
        self.kept()
        yield dataclasses.replace(item, sha256=sha256_bytes(data), rgb=rgb, height=rgb.shape[0], width=rgb.shape[1])
