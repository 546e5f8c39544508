"""Synthetic ID dataset for offline demos and tests, built in seconds on a CPU.

    python -m persongen_jax.data.make_demo DIR [--persons 24 --images-per-person 6 --resolution 64 --seed 0]

Writes DIR/raw/persons/<id>/<k>.jpg + DIR/raw/captions.jsonl (the input format of docs/DATASET.md) and
then the ArrayRecord dataset in DIR (index.json + shards) with the writer of `format`, all atomically.

A "person" is a stable, learnable pattern: a face ellipse with its own skin colour, stripe texture
(angle, period, colour) and eye spacing/colour, and a class word (man, woman, person, boy, girl).
Each image places the face at a random position and size, draws the background that its `caption_bg`
names (red or black background, mountains, city street, room) and the body its `caption_body` names
(red or black suit, red or black hat); either may be absent, and then the caption does not mention it.
Captions use words of the tiny test tokenizer (persongen_jax.models.presets.WORDS):
"a photo of a man img wearing a red suit in the mountains".

--corrupt adds two bad inputs for the bad-data path: persons/<first>/corrupt.jpg (not an image) and
persons/<first>/nocaption.jpg (its JSONL line has no caption).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from persongen_jax.conditions import CLASS_WORDS
from persongen_jax.data import format as fmt

DEMO_CLASS_WORDS = CLASS_WORDS[:5]  # man, woman, person, boy, girl: words of the tiny test tokenizer
# caption_bg -> the phrase in the caption
BACKGROUNDS = {
    "red background": "on a red background",
    "black background": "on a black background",
    "mountains": "in the mountains",
    "city street": "in the city street",
    "room": "in a room",
}
BODIES = ("wearing a red suit", "wearing a black suit", "wearing a red hat", "wearing a black hat")
RED, BLACK = (200, 30, 30), (25, 25, 25)


def face_pattern(rng: np.random.Generator, period: tuple[float, float] = (0.15, 0.45)) -> dict:
    """A synthetic identity's stripes and eyes, in units of the face's half-size: the stripes' angle and
    period (drawn from PERIOD), the eyes' horizontal offset and height (also the test sources' faces,
    persongen_jax/testing/tiny_build.py)."""
    angle, period = float(rng.uniform(0, np.pi)), float(rng.uniform(*period))
    return dict(
        angle=angle, period=period, eye_dx=float(rng.uniform(0.15, 0.32)), eye_y=float(rng.uniform(-0.25, 0.05))
    )


def _person(rng: np.random.Generator, i: int) -> dict:
    return dict(
        id=f"p{i:03d}",
        class_word=DEMO_CLASS_WORDS[i % len(DEMO_CLASS_WORDS)],
        skin=tuple(int(v) for v in rng.integers(60, 255, 3)),
        stripe=tuple(int(v) for v in rng.integers(0, 255, 3)),
        **face_pattern(rng),
        eye=tuple(int(v) for v in rng.integers(0, 255, 3)),
        aspect=float(rng.uniform(0.75, 1.0)),
    )


def _background(draw: ImageDraw.ImageDraw, rng, bg: str | None, R: int) -> None:
    if bg is None:  # unspecified: a random muted colour
        draw.rectangle([0, 0, R, R], fill=tuple(int(v) for v in rng.integers(90, 170, 3)))
    elif bg == "red background":
        draw.rectangle([0, 0, R, R], fill=RED)
    elif bg == "black background":
        draw.rectangle([0, 0, R, R], fill=BLACK)
    elif bg == "mountains":
        for y in range(R):  # sky gradient
            draw.line([0, y, R, y], fill=(90 + y * 100 // R, 150 + y * 60 // R, 255))
        for _ in range(3):
            cx, h = rng.uniform(0, R), rng.uniform(0.3, 0.6) * R
            draw.polygon([(cx - h, R), (cx, R - h), (cx + h, R)], fill=(90, 100, 110))
    elif bg == "city street":
        draw.rectangle([0, 0, R, R], fill=(150, 150, 160))
        x = 0.0
        while x < R:
            w, h = rng.uniform(0.1, 0.25) * R, rng.uniform(0.4, 0.9) * R
            draw.rectangle([x, R - h, x + w, R], fill=tuple(int(v) for v in rng.integers(50, 110, 3)))
            x += w + 1
    elif bg == "room":
        draw.rectangle([0, 0, R, R * 0.7], fill=(225, 205, 165))
        draw.rectangle([0, R * 0.7, R, R], fill=(130, 85, 50))
    else:
        raise ValueError(f"unknown background {bg!r}")


def _draw_image(rng, person: dict, bg: str | None, body: str | None, R: int) -> tuple[Image.Image, list[int]]:
    im = Image.new("RGB", (R, R))
    draw = ImageDraw.Draw(im)
    _background(draw, rng, bg, R)
    fh = rng.uniform(0.28, 0.42) * R
    fw = fh * person["aspect"]
    cx, cy = rng.uniform(fw / 2 + 1, R - fw / 2 - 1), rng.uniform(fh / 2 + fh * 0.3, R - fh)
    box = [int(np.floor(cx - fw / 2)), int(np.floor(cy - fh / 2)), int(np.ceil(cx + fw / 2)), int(np.ceil(cy + fh / 2))]
    suit = RED if body and "red" in body else BLACK if body and "black" in body else (100, 100, 140)
    # body: a trapezoid from under the face to the bottom edge
    draw.polygon(
        [(cx - fw * 0.4, cy + fh * 0.45), (cx + fw * 0.4, cy + fh * 0.45), (cx + fw * 1.1, R), (cx - fw * 1.1, R)],
        fill=suit if body and "suit" in body else (100, 100, 140),
    )
    # face: ellipse filled with the person's stripes
    yy, xx = np.mgrid[0:R, 0:R].astype(np.float32)
    u, v = (xx - cx) / (fw / 2), (yy - cy) / (fh / 2)
    inside = u * u + v * v <= 1.0
    phase = (np.cos(person["angle"]) * u + np.sin(person["angle"]) * v) / person["period"]
    stripes = np.floor(phase) % 2 == 0
    arr = np.asarray(im).copy()
    arr[inside & ~stripes] = person["skin"]
    arr[inside & stripes] = person["stripe"]
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    er = max(1.0, fw * 0.09)
    for sx in (-1, 1):
        ex, ey = cx + sx * person["eye_dx"] * fw, cy + person["eye_y"] * fh
        draw.ellipse([ex - er, ey - er, ex + er, ey + er], fill=person["eye"])
    if body and "hat" in body:
        hat = RED if "red" in body else BLACK
        draw.rectangle([cx - fw * 0.45, cy - fh * 0.75, cx + fw * 0.45, cy - fh * 0.4], fill=hat)
    return im, box


def make_demo(
    dst: str | Path,
    *,
    persons: int = 24,
    images_per_person: int = 6,
    resolution: int = 64,
    seed: int = 0,
    corrupt: bool = False,
    num_shards: int = 2,
    progress: bool = True,
) -> Path:
    """Builds the demo dataset in `dst` (raw folder tree in dst/raw, ArrayRecord dataset in dst); returns dst.

    The whole folder is written through `atomic_dir`, so a killed run leaves no half-built demo (the
    training loop builds it when its index.json is missing); an existing `dst` is replaced only when
    it is a demo dataset (index.json, its shards and raw/)."""
    from persongen_jax.io import atomic_dir

    dst = Path(dst)
    fmt.check_destination(dst, {}, allowed_extra=("raw",))
    with atomic_dir(dst, overwrite=True) as tmp:
        _write_demo(
            tmp,
            persons=persons,
            images_per_person=images_per_person,
            resolution=resolution,
            seed=seed,
            corrupt=corrupt,
            num_shards=num_shards,
            progress=progress,
        )
    return dst


def _write_demo(out: Path, *, persons, images_per_person, resolution, seed, corrupt, num_shards, progress):
    raw = out / "raw"
    rng = np.random.default_rng(seed)
    people = [_person(rng, i) for i in range(persons)]
    lines = []
    bg_names = list(BACKGROUNDS)
    for p in people:
        (raw / "persons" / p["id"]).mkdir(parents=True, exist_ok=True)
        for k in range(images_per_person):
            bg = bg_names[int(rng.integers(len(bg_names)))] if rng.random() < 0.8 else None
            body = BODIES[int(rng.integers(len(BODIES)))] if rng.random() < 0.8 else None
            im, box = _draw_image(rng, p, bg, body, resolution)
            rel = f"persons/{p['id']}/{k}.jpg"
            im.save(raw / rel, quality=95)
            caption = " ".join(
                x for x in ("a photo of a", p["class_word"], "img", body, BACKGROUNDS[bg] if bg else None) if x
            )
            lines.append(dict(image=rel, caption=caption, caption_bg=bg, caption_body=body, face_box=box))
    if corrupt:
        first = people[0]["id"]
        (raw / "persons" / first / "corrupt.jpg").write_bytes(b"this is not a jpeg")
        lines.append(
            dict(
                image=f"persons/{first}/corrupt.jpg",
                caption=f"a photo of a {people[0]['class_word']} img",
                face_box=[0, 0, 8, 8],
            )
        )
        im, box = _draw_image(rng, people[0], None, None, resolution)
        im.save(raw / "persons" / first / "nocaption.jpg", quality=95)
        lines.append(dict(image=f"persons/{first}/nocaption.jpg", face_box=box))
    with open(raw / "captions.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    good, bad = fmt.check_inputs(raw, raw / "captions.jsonl", progress=progress)
    fmt.write_records(out, good, bad, num_shards=num_shards, progress=progress)


def main(argv=None) -> None:
    from persongen_jax.cli import parser

    p = parser("python -m persongen_jax.data.make_demo", __doc__)
    p.add_argument("dir", help="output folder: DIR/raw (images + captions.jsonl) and the dataset (index.json, shards)")
    p.add_argument("--persons", type=int, default=24, help="number of synthetic identities")
    p.add_argument("--images-per-person", type=int, default=6, help="images of each identity")
    p.add_argument("--resolution", type=int, default=64, help="image height = width in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed of the persons and images")
    p.add_argument("--num-shards", type=int, default=2, help="ArrayRecord shards of the dataset")
    p.add_argument("--corrupt", action="store_true", help="add an undecodable image and an image without caption")
    a = p.parse_args(argv)
    make_demo(
        a.dir,
        persons=a.persons,
        images_per_person=a.images_per_person,
        resolution=a.resolution,
        seed=a.seed,
        corrupt=a.corrupt,
        num_shards=a.num_shards,
    )
    index = fmt.load_index(a.dir)
    print(
        f"{a.dir}: {index['num_records']} records of {len(index['persons'])} persons; "
        f"{len(index['bad'])} bad input(s)"
        + (": " + ", ".join(f"{b['image']} ({b['reason']})" for b in index["bad"]) if index["bad"] else "")
    )


if __name__ == "__main__":
    main()
