"""The ID dataset on disk: ArrayRecord shards of image records + `index.json`.

Input (what a person prepares):

    SRC/persons/<person_id>/<image>.jpg          any PIL-readable image (jpg, png, webp)
    CAPTIONS.jsonl, one line per image:
      {"image": "persons/<person_id>/<image>.jpg",   path relative to SRC
       "caption": "a photo of a man img wearing a red suit",   P_general: class word + trigger word
       "caption_bg": "mountains",                    optional, P_bg
       "caption_body": "wearing a red suit",         optional, P_body (any caption_<x> field is kept: the
                                                     text of a condition with source "caption_<x>")
       "face_box": [x0, y0, x1, y1],                 pixels of the stored image, x1/y1 exclusive
       "face_mask": "masks/<person_id>/<image>.png"} optional; otherwise the mask is the box

Output (`write_dataset`):

    DST/data-00000-of-0000N.array_record     one record per *good* image (see `encode_record`)
    DST/index.json   {"version": 1, "num_records": n, "shards": [{"path", "num_records"}, ...],
                      "persons": {person_id: [global record indices]},
                      "bad": [{"image": path, "reason": why}, ...]}

A record is `MAGIC | uint32 header length | JSON header | image bytes | mask bytes`: the image
bytes are the file as stored (no re-encoding). Global record indices count through the shards
in order, which is the order grain's `ArrayRecordDataSource(shard paths)` reads them in.

Bad inputs (missing or undecodable image, missing caption, caption without the trigger word,
missing or empty face box, unreadable face mask) are not written as records but listed in
`index["bad"]` with the reason, so training reports them by name (`pipeline.bad_records_report`).

    python -m persongen_jax.data.format SRC CAPTIONS.jsonl DST [--num-shards 4]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

from PIL import Image

from persongen_jax import conditions as conditions_lib

MAGIC = b"PGJ1"
INDEX_FILE = "index.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_TRIGGER_WORD = "img"
# The captions fields of configs/default.py's text conditions (P_bg, P_body).
DEFAULT_CAPTION_FIELDS = tuple(c.source for c in conditions_lib.text_conditions(
    conditions_lib.parse(conditions_lib.DEFAULTS)))


def encode_record(header: dict[str, Any], image_bytes: bytes, mask_bytes: bytes = b"") -> bytes:
    """One record: MAGIC, uint32 LE header length, UTF-8 JSON header, image bytes, mask bytes.
    The header gets `image_nbytes` / `mask_nbytes` so the payload can be split again."""
    header = dict(header, image_nbytes=len(image_bytes), mask_nbytes=len(mask_bytes))
    h = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(h)) + h + image_bytes + mask_bytes


def decode_record(raw: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """Inverse of `encode_record`: (header, image bytes, mask bytes; b"" when the mask is the box)."""
    if raw[:4] != MAGIC:
        raise ValueError(f"not a persongen_jax record (magic {raw[:4]!r}, expected {MAGIC!r})")
    (n,) = struct.unpack("<I", raw[4:8])
    header = json.loads(raw[8:8 + n])
    start = 8 + n
    image = raw[start:start + header["image_nbytes"]]
    mask = raw[start + header["image_nbytes"]:start + header["image_nbytes"] + header["mask_nbytes"]]
    return header, image, mask


def load_index(data_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(data_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no {INDEX_FILE}; build the dataset with "
                                "`python -m persongen_jax.data.format SRC CAPTIONS.jsonl DST`")
    return json.loads(path.read_text())


def shard_paths(data_dir: str | os.PathLike, index: dict[str, Any] | None = None) -> list[str]:
    index = index if index is not None else load_index(data_dir)
    return [str(Path(data_dir) / s["path"]) for s in index["shards"]]


def read_records(data_dir: str | os.PathLike) -> list[tuple[dict, bytes, bytes]]:
    """All records in global index order (for tests and inspection; training reads them through grain)."""
    import grain

    source = grain.sources.ArrayRecordDataSource(shard_paths(data_dir))
    return [decode_record(source[i]) for i in range(len(source))]


def _person_id(rel: str) -> str | None:
    parts = Path(rel).parts
    return parts[1] if len(parts) >= 3 and parts[0] == "persons" else None


def _check_box(box, width: int, height: int) -> list[float]:
    if box is None:
        raise ValueError("missing face box")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"face box {box!r} is not [x0, y0, x1, y1]") from None
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"empty face box {list(box)} in a {width}x{height} image")
    return [x0, y0, x1, y1]


def _validate(src: Path, rel: str, entry: dict | None, trigger_word: str | None):
    """(header, image bytes, mask bytes) of one good image; ValueError(reason) for a bad one."""
    path = src / rel
    if not path.is_file():
        raise ValueError("no such image file")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height, fmt = im.width, im.height, im.format
    except Exception:  # PIL raises many types for broken files
        raise ValueError("cannot decode image") from None
    if entry is None or not isinstance(entry.get("caption"), str) or not entry["caption"].strip():
        raise ValueError("missing caption")
    caption = entry["caption"].strip()
    if trigger_word is not None and caption.split().count(trigger_word) != 1:
        raise ValueError(f"caption {caption!r} does not hold the trigger word {trigger_word!r} exactly once")
    box = _check_box(entry.get("face_box"), width, height)
    mask = b""
    if entry.get("face_mask"):
        mpath = src / entry["face_mask"]
        try:
            mask = mpath.read_bytes()
            with Image.open(io.BytesIO(mask)) as m:
                m.load()
                if m.size != (width, height):
                    raise ValueError(f"face mask {m.size} does not match the image {width}x{height}")
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"cannot read face mask {entry['face_mask']} ({type(e).__name__})") from None
    header = dict(person_id=_person_id(rel), image=rel, caption=caption, face_box=box, width=width, height=height,
                  format=fmt)
    # Every caption_* field is a text condition's text (P_bg, P_body, ...: conditions.Condition.source);
    # the default conditions' fields are always in the header (None when absent).
    for key in sorted(set(DEFAULT_CAPTION_FIELDS) | {k for k in entry if k.startswith("caption_")}):
        header[key] = _condition_text(entry, key)
    return header, data, mask


def _condition_text(entry: dict, key: str) -> str | None:
    """A caption_* field: a string (stripped; empty -> None) or null; ValueError naming the key otherwise."""
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} is {type(value).__name__} {value!r}, expected a string")
    return value.strip() or None


def read_captions(captions_jsonl: str | os.PathLike) -> tuple[dict[str, dict], list[dict]]:
    """{image path: entry} and a list of bad lines ({"image", "reason"}) of a captions JSONL."""
    entries, bad = {}, []
    for n, line in enumerate(Path(captions_jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rel = entry["image"]
        except (json.JSONDecodeError, KeyError, TypeError):
            bad.append(dict(image=f"{captions_jsonl}:{n}", reason="unparsable JSONL line (needs an 'image' key)"))
            continue
        rel = str(Path(rel).as_posix())
        if rel in entries:
            bad.append(dict(image=rel, reason=f"duplicate caption line ({captions_jsonl}:{n}), first one kept"))
            continue
        entries[rel] = entry
    return entries, bad


def write_dataset(src_dir: str | os.PathLike, captions_jsonl: str | os.PathLike, dst_dir: str | os.PathLike, *,
                  num_shards: int = 1, trigger_word: str | None = DEFAULT_TRIGGER_WORD,
                  progress: bool = True) -> dict[str, Any]:
    """Builds the ArrayRecord dataset from `src_dir/persons/<id>/*` + the captions JSONL; returns the index.

    Every image file under persons/ and every JSONL line is accounted for: good ones become records
    (sorted by path), bad ones go to index["bad"] with the reason. trigger_word=None skips the
    trigger-word check (the pipeline still checks it when it tokenizes)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    src, dst = Path(src_dir), Path(dst_dir)
    entries, bad = read_captions(captions_jsonl)
    files = {p.relative_to(src).as_posix() for p in (src / "persons").glob("*/*")
             if p.suffix.lower() in IMAGE_EXTENSIONS}
    good = []
    for rel in tqdm(sorted(files | set(entries)), desc="checking images", disable=not progress, unit="img"):
        if _person_id(rel) is None:
            bad.append(dict(image=rel, reason="not under persons/<person_id>/"))
            continue
        try:
            good.append(_validate(src, rel, entries.get(rel), trigger_word))
        except ValueError as e:
            bad.append(dict(image=rel, reason=str(e)))
    if not good:
        raise ValueError(f"{src}: no usable images ({len(bad)} bad: "
                         + "; ".join(f"{b['image']} ({b['reason']})" for b in bad[:5]) + ")")
    num_shards = max(1, min(num_shards, len(good)))
    dst.mkdir(parents=True, exist_ok=True)
    shards, persons = [], {}
    bounds = [round(i * len(good) / num_shards) for i in range(num_shards + 1)]
    with tqdm(total=len(good), desc="writing records", disable=not progress, unit="rec") as bar:
        for s in range(num_shards):
            name = f"data-{s:05d}-of-{num_shards:05d}.array_record"
            # group_size:1 -> every record is its own chunk: cheap random access for the sampler.
            writer = ArrayRecordWriter(str(dst / name), "group_size:1")
            for i in range(bounds[s], bounds[s + 1]):
                header, image, mask = good[i]
                writer.write(encode_record(header, image, mask))
                persons.setdefault(header["person_id"], []).append(i)
                bar.update()
            writer.close()
            shards.append(dict(path=name, num_records=bounds[s + 1] - bounds[s]))
    index = dict(version=1, num_records=len(good), shards=shards, persons=dict(sorted(persons.items())),
                 bad=bad, trigger_word=trigger_word)
    (dst / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m persongen_jax.data.format", description=__doc__.split("\n")[0])
    p.add_argument("src", help="folder holding persons/<person_id>/<image>")
    p.add_argument("captions", help="captions JSONL (image, caption, caption_bg, caption_body, face_box)")
    p.add_argument("dst", help="output folder (ArrayRecord shards + index.json)")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--trigger-word", default=DEFAULT_TRIGGER_WORD)
    a = p.parse_args(argv)
    index = write_dataset(a.src, a.captions, a.dst, num_shards=a.num_shards, trigger_word=a.trigger_word)
    print(f"{a.dst}: {index['num_records']} records of {len(index['persons'])} persons "
          f"in {len(index['shards'])} shard(s)")
    if index["bad"]:
        print(f"{len(index['bad'])} bad input(s), not written: "
              + ", ".join(f"{b['image']} ({b['reason']})" for b in index["bad"]))


if __name__ == "__main__":
    main()
