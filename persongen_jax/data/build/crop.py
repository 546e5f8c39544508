"""Stage "crop": a square around the verified face, resized to `resolution`, with the face box, the 5
landmarks and (optionally) a face mask mapped into it.

The image is read again (the decoded pixels are not carried through the per-person shuffle, so memory
does not grow with the dataset) and must still have the content hash it had at decode. The square is
centred on the face box and shifted as little as needed to stay inside the image: with
`crop_scale` 0 (default, the research's "centred and cropped to a square") it is the largest square the
image holds; with s > 0 its side is s x the box's longer side (at least the box, at most the shorter
image side). It is resized with Lanczos to `resolution` x `resolution` and stored as JPEG
(`jpeg_quality`). `face_mask` "ellipse" stores the ellipse inscribed in the mapped box as a PNG mask
(training otherwise uses the box itself as the mask).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw

from persongen_jax.data.build.common import FileStageDoFn, Item, sha256_bytes
from persongen_jax.data.build.decode import decode_rgb


def square_around(box, width: int, height: int, crop_scale: float) -> tuple[int, int, int]:
    """(left, top, side) of the square crop for a face box [x0, y0, x1, y1] in a width x height image."""
    x0, y0, x1, y1 = box
    short = min(width, height)
    face = max(x1 - x0, y1 - y0)
    side = short if crop_scale <= 0 else min(short, max(face, crop_scale * face))
    side = int(round(max(1.0, side)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side


def crop_face(rgb: np.ndarray, face: dict, resolution: int, crop_scale: float = 0.0, face_mask: str = "none",
              jpeg_quality: int = 95) -> tuple[bytes, bytes, dict, list[int]]:
    """-> (JPEG bytes, PNG mask bytes or b"", the face mapped into the crop {"box", "kps", ...},
    crop box [left, top, right, bottom] in the source image)."""
    h, w = rgb.shape[:2]
    left, top, side = square_around(face["box"], w, h, crop_scale)
    scale = resolution / side
    im = Image.fromarray(rgb[top:top + side, left:left + side]).resize((resolution, resolution), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=jpeg_quality)
    x0, y0, x1, y1 = face["box"]
    box = [float(np.clip((x0 - left) * scale, 0, resolution)), float(np.clip((y0 - top) * scale, 0, resolution)),
           float(np.clip((x1 - left) * scale, 0, resolution)), float(np.clip((y1 - top) * scale, 0, resolution))]
    kps = [[round((x - left) * scale, 2), round((y - top) * scale, 2)] for x, y in face["kps"]]
    mapped = dict(face, box=[round(v, 2) for v in box], kps=kps)
    mask = b""
    if face_mask == "ellipse":
        m = Image.new("L", (resolution, resolution), 0)
        ImageDraw.Draw(m).ellipse(box, fill=255)
        mbuf = io.BytesIO()
        m.save(mbuf, format="PNG")
        mask = mbuf.getvalue()
    return buf.getvalue(), mask, mapped, [left, top, left + side, top + side]


class CropFaces(FileStageDoFn):
    """Verified Items -> Items with the crop JPEG (and mask) and the face mapped into it; rejects a file
    that changed or cannot be read again."""
    stage = "crop"

    def run_file(self, item: Item, data: bytes):
        """Decodes the re-read image, checks its hash, crops (see the module doc)."""
        s = self.settings
        if sha256_bytes(data) != item.sha256:
            yield self.rejected(item, "file changed during the build",
                                "its content hash differs from the one at decode")
            return
        jpeg, mask, face, crop_box = crop_face(decode_rgb(data), item.face, s.resolution, s.crop_scale, s.face_mask,
                                               s.jpeg_quality)
        self.kept()
        yield dataclasses.replace(item, jpeg=jpeg, mask=mask, face=face, crop_box=crop_box,
                                  crop_sha256=sha256_bytes(jpeg))
