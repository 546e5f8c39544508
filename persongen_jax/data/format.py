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
    DST/index.json   {"version": 2, "num_records": n,
                      "shards": [{"path", "num_records", "nbytes", "sha256"}, ...],
                      "persons": {person_id: [global record indices]},
                      "bad": [{"image": path, "reason": why}, ...]}

A record is `MAGIC | uint32 header length | JSON header | image bytes | mask bytes`: the image
bytes are the file as stored (no re-encoding). Global record indices count through the shards
in order, which is the order grain's `ArrayRecordDataSource(shard paths)` reads them in.

Bad inputs (missing or undecodable image, missing caption, caption without the trigger word,
missing, empty or non-finite face box, unreadable face mask, a field of the wrong type, a line that
is not UTF-8 JSON, a path that leaves SRC, a file over the size limit, a second spelling of an image)
are not written as records but listed in `index["bad"]` with the reason, so training reports them
by name (`pipeline.bad_records_report`).

Safety (docs/RELIABILITY.md): every path from the JSONL must resolve, symlinks followed, inside SRC;
only regular files are read, at most `max_file_bytes` each. DST is written through
`persongen_jax.io.atomic_dir` (a temp folder renamed into place), so a killed writer leaves the previous
dataset or the new one, never a mix; an existing DST is replaced only when it is a dataset this
writer made, and never when it holds SRC or the captions file. Readers (`read_records`, the training
pipeline) call `check_shards`, which refuses shards whose size, record count or sha256 differ from
index.json, naming the shard.

    python -m persongen_jax.data.format SRC CAPTIONS.jsonl DST [--num-shards 4]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import stat
import struct
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from persongen_jax import conditions as conditions_lib
from persongen_jax.io import loads_json

MAGIC = b"PGJ1"
INDEX_FILE = "index.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_TRIGGER_WORD = "img"
# The captions fields of configs/default.py's text conditions (P_bg, P_body).
DEFAULT_CAPTION_FIELDS = tuple(
    c.source for c in conditions_lib.text_conditions(conditions_lib.parse(conditions_lib.DEFAULTS))
)
# 2: shards carry nbytes + sha256 (checked by every reader). 1: counts only (still read, unverified).
FORMAT_VERSION = 2
# The largest image or mask file the writer reads: far above any photo, and a `/dev/zero`-like
# input cannot exhaust memory.
MAX_FILE_BYTES = 256 << 20
REBUILD_HINT = "rebuild it with `python -m persongen_jax.data.format SRC CAPTIONS.jsonl DST`"

log = logging.getLogger(__name__)


def pack_float32(a) -> dict:
    """A float32 array as a JSON-able {"shape", "float32": base64 of its bytes} (exact; a record header's
    `arcface_embedding`, the build's caches)."""
    import base64

    import numpy as np

    a = np.ascontiguousarray(a, np.float32)
    return dict(shape=list(a.shape), float32=base64.b64encode(a.tobytes()).decode())


def unpack_float32(d: dict):
    """Inverse of `pack_float32` -> numpy float32 array."""
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(d["float32"]), np.float32).reshape(d["shape"])


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
    header = json.loads(raw[8 : 8 + n])
    start = 8 + n
    image = raw[start : start + header["image_nbytes"]]
    mask = raw[start + header["image_nbytes"] : start + header["image_nbytes"] + header["mask_nbytes"]]
    return header, image, mask


# ------------------------------------------------------------------------------------ index + shards


def load_index(data_dir: str | os.PathLike) -> dict[str, Any]:
    """index.json of a dataset folder; FileNotFoundError / ValueError naming the folder or file."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"{data_dir}: no such dataset folder; build one with "
            "`python -m persongen_jax.data.format SRC CAPTIONS.jsonl DST`"
        )
    path = data_dir / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{data_dir}: no {INDEX_FILE}; build the dataset with "
            "`python -m persongen_jax.data.format SRC CAPTIONS.jsonl DST`"
        )
    try:
        index = loads_json(path.read_bytes(), path)
    except ValueError as e:
        raise ValueError(f"{e}; {REBUILD_HINT}") from None
    ok = (
        isinstance(index, dict)
        and isinstance(index.get("shards"), list)
        and isinstance(index.get("persons"), dict)
        and isinstance(index.get("num_records"), int)
        and all(
            isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("num_records"), int)
            for s in index["shards"]
        )
    )
    if not ok:
        raise ValueError(
            f"{path}: not a persongen_jax dataset index (needs version, num_records, shards "
            f"[{{path, num_records, ...}}], persons); {REBUILD_HINT}"
        )
    return index


def _shard_file(data_dir: Path, name: str) -> Path:
    """A shard's path; the index may only name files directly inside the dataset folder."""
    if not name or name != posixpath.basename(name) or name in (".", ".."):
        raise ValueError(
            f"{data_dir / INDEX_FILE}: shard path {name!r} is not a file name inside the dataset folder; {REBUILD_HINT}"
        )
    return data_dir / name


def shard_paths(data_dir: str | os.PathLike, index: dict[str, Any] | None = None) -> list[str]:
    index = index if index is not None else load_index(data_dir)
    return [str(_shard_file(Path(data_dir), s["path"])) for s in index["shards"]]


def _count_records(path: Path) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return int(reader.num_records())
    finally:
        reader.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)  # hashlib releases the GIL on large buffers: shards hash in parallel threads
    return h.hexdigest()


def _map_threads(fn, items):
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def index_shards(data_dir: str | os.PathLike, shard_names) -> list[dict[str, Any]]:
    """The index.json "shards" entries {"path", "num_records", "nbytes", "sha256"} of shard files already
    written in `data_dir` (in the given order, which is the global record order).

    sha256 is of the whole file: each shard is read once here (about 1.7 GB/s per core, shards in
    parallel threads) and once by `check_shards` when a reader opens the dataset. A plain file hash
    (not the writer's run id) so any writer -- this one, the Beam pipeline, a copy -- produces the
    same index for the same bytes."""
    data_dir = Path(data_dir)
    paths = [_shard_file(data_dir, n) for n in shard_names]

    def entry(path: Path) -> dict[str, Any]:
        return {
            "path": path.name,
            "num_records": _count_records(path),
            "nbytes": path.stat().st_size,
            "sha256": _sha256(path),
        }

    return _map_threads(entry, paths)


def check_shards(data_dir: str | os.PathLike, index: dict[str, Any], *, verify_hashes: bool = True) -> None:
    """Raises ValueError (one line, naming the shard) unless every shard of `index` is present with the
    size, record count and sha256 that index.json records, the counts add up to num_records and every
    person's record indices are in range. Version-1 indexes (no sizes or hashes) are checked for
    presence and record counts only, with a warning that they are unverified. verify_hashes=False skips
    the sha256 (a shard's every byte is read otherwise)."""
    data_dir = Path(data_dir)
    where = data_dir / INDEX_FILE
    version = index.get("version")
    if version == 1:
        log.warning(
            "%s: version-1 index without shard sizes or hashes: shards are checked for presence and "
            "record counts only (unverified); %s to get full checks",
            where,
            REBUILD_HINT,
        )
    elif version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: index version {version!r}; this persongen_jax reads versions 1 and "
            f"{FORMAT_VERSION}; {REBUILD_HINT}"
        )
    entries = index["shards"]
    paths = [_shard_file(data_dir, s["path"]) for s in entries]
    for s, path in zip(entries, paths):
        if not path.is_file():
            raise ValueError(f"{path}: shard listed in {where} is missing; {REBUILD_HINT}")
        if version != 1:
            if not isinstance(s.get("nbytes"), int) or not isinstance(s.get("sha256"), str):
                raise ValueError(
                    f"{where}: shard {s['path']} has no nbytes/sha256 (a version-2 index needs them); {REBUILD_HINT}"
                )
            size = path.stat().st_size
            if size != s["nbytes"]:
                raise ValueError(
                    f"{path}: {size} bytes, {where} says {s['nbytes']}: the shard changed after "
                    f"the index was written (or the write was interrupted); {REBUILD_HINT}"
                )
        n = _count_records(path)
        if n != s["num_records"]:
            raise ValueError(
                f"{path}: {n} records, {where} says {s['num_records']}: the shard changed after "
                f"the index was written; {REBUILD_HINT}"
            )
    if version != 1 and verify_hashes:
        for s, path, digest in zip(entries, paths, _map_threads(_sha256, paths)):
            if digest != s["sha256"]:
                raise ValueError(
                    f"{path}: sha256 {digest[:12]}..., {where} says {s['sha256'][:12]}...: the "
                    f"shard's content changed after the index was written; {REBUILD_HINT}"
                )
    total = sum(s["num_records"] for s in entries)
    if total != index["num_records"]:
        raise ValueError(
            f"{where}: shards hold {total} records, num_records says {index['num_records']}; {REBUILD_HINT}"
        )
    for pid, recs in index["persons"].items():
        if not isinstance(recs, list) or not all(isinstance(r, int) and 0 <= r < total for r in recs):
            raise ValueError(f"{where}: person {pid!r} has record indices outside [0, {total}); {REBUILD_HINT}")


def read_records(data_dir: str | os.PathLike) -> list[tuple[dict, bytes, bytes]]:
    """All records in global index order (for tests and inspection; training reads them through grain),
    after `check_shards`."""
    import grain

    index = load_index(data_dir)
    check_shards(data_dir, index)
    source = grain.sources.ArrayRecordDataSource(shard_paths(data_dir, index))
    return [decode_record(source[i]) for i in range(len(source))]


# ------------------------------------------------------------------------------------ input checks


def _person_id(rel: str) -> str | None:
    parts = Path(rel).parts
    return parts[1] if len(parts) >= 3 and parts[0] == "persons" else None


def _inside(src_real: str, what: str, rel) -> tuple[str, str]:
    """(normalised relative path, real path) of a JSONL path; ValueError unless it is a relative path
    that resolves, symlinks followed, inside SRC (`src_real`, itself resolved)."""
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"{what} must be a non-empty path string, got {type(rel).__name__} {rel!r}"[:200])
    if "\x00" in rel:
        raise ValueError(f"{what} {rel!r} holds a NUL byte")
    if posixpath.isabs(rel) or os.path.isabs(rel):
        raise ValueError(f"{what} {rel!r} is an absolute path; paths are relative to SRC")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise ValueError(f"{what} {rel!r} points outside SRC")
    real = os.path.realpath(os.path.join(src_real, norm))
    if os.path.commonpath([src_real, real]) != src_real:
        raise ValueError(f"{what} {rel!r} resolves outside SRC (symlink to {real})")
    return norm, real


def read_limited(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; ValueError otherwise. Opened non-blocking
    and checked with fstat, so a FIFO or device is refused without reading (or waiting on) it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except OSError as e:
        raise ValueError(f"cannot open ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{st.st_size} bytes, over the {limit}-byte limit")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"over the {limit}-byte limit")
    return data


def _check_box(box, width: int, height: int) -> list[float]:
    if box is None:
        raise ValueError("missing face box")
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError(f"face box {box!r} is not [x0, y0, x1, y1] (4 numbers)"[:200])
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"face box {list(box)} has a non-finite value")
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"empty face box {list(box)} in a {width}x{height} image")
    return [x0, y0, x1, y1]


def _check_types(entry: dict) -> None:
    """ValueError naming the first field of a JSONL entry with the wrong type."""
    for key in ["caption", "face_mask"] + sorted(k for k in entry if k.startswith("caption_")):
        v = entry.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{key} must be a string or null, got {type(v).__name__} {v!r}"[:200])


def _validate(
    src_real: str,
    rel: str,
    real: str,
    entry: dict | None,
    trigger_word: str | None,
    max_file_bytes: int = MAX_FILE_BYTES,
):
    """(header, image bytes, mask bytes) of one good image; ValueError(reason) for a bad one."""
    try:
        data = read_limited(real, max_file_bytes)
    except ValueError as e:
        raise ValueError("no such image file" if str(e) == "no such file" else f"image file: {e}") from None
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
        _, mreal = _inside(src_real, "face_mask", entry["face_mask"])
        try:
            mask = read_limited(mreal, max_file_bytes)
            with Image.open(io.BytesIO(mask)) as m:
                m.load()
                size = m.size
        except ValueError as e:
            raise ValueError(f"cannot read face mask {entry['face_mask']} ({e})") from None
        except Exception as e:  # PIL's many error types
            raise ValueError(f"cannot read face mask {entry['face_mask']} ({type(e).__name__})") from None
        if size != (width, height):
            raise ValueError(f"face mask {size} does not match the image {width}x{height}")
    header = dict(
        person_id=_person_id(rel), image=rel, caption=caption, face_box=box, width=width, height=height, format=fmt
    )
    # Every caption_* field is a text condition's text (P_bg, P_body, ...: conditions.Condition.source; types
    # checked by _check_types); the default conditions' fields are always in the header (None when absent).
    for key in sorted(set(DEFAULT_CAPTION_FIELDS) | {k for k in entry if k.startswith("caption_")}):
        header[key] = (entry.get(key) or "").strip() or None
    return header, data, mask


def read_captions(
    captions_jsonl: str | os.PathLike, src_dir: str | os.PathLike | None = None
) -> tuple[dict[str, dict], list[dict]]:
    """{normalised image path: entry} and a list of bad lines ({"image", "reason"}) of a captions JSONL.

    A line is bad (listed, the rest go on) when it is not UTF-8, not a JSON object, lacks a string
    'image', holds a field of the wrong type, repeats an image (any spelling of the same path), or --
    with `src_dir` -- names a path outside SRC. Image paths are normalised (`p/../p/1.png` ->
    `p/1.png`)."""
    src_real = os.path.realpath(src_dir) if src_dir is not None else None
    entries, bad, first_line = {}, [], {}
    for n, raw in enumerate(Path(captions_jsonl).read_bytes().split(b"\n"), 1):
        where = f"{captions_jsonl}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(dict(image=where, reason=f"line is not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested thousands of levels deep
            bad.append(dict(image=where, reason=f"unparsable JSONL line ({getattr(e, 'msg', 'nested too deeply')})"))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"].strip():
            got = type(entry.get("image")).__name__ if isinstance(entry, dict) else type(entry).__name__
            bad.append(dict(image=where, reason=f"not a JSON object with a string 'image' path (got {got})"))
            continue
        rel = entry["image"]
        try:
            if src_real is not None:
                rel, _ = _inside(src_real, "image", rel)
            else:
                rel = posixpath.normpath(rel)
            _check_types(entry)
        except ValueError as e:
            bad.append(dict(image=rel, reason=f"{e} ({where})"))
            continue
        if rel in entries:
            bad.append(dict(image=rel, reason=f"duplicate caption line ({where}; line {first_line[rel]} kept)"))
            continue
        entries[rel], first_line[rel] = entry, n
    return entries, bad


def check_inputs(
    src_dir: str | os.PathLike,
    captions_jsonl: str | os.PathLike,
    *,
    trigger_word: str | None = DEFAULT_TRIGGER_WORD,
    max_file_bytes: int = MAX_FILE_BYTES,
    progress: bool = True,
) -> tuple[list[tuple[dict, bytes, bytes]], list[dict]]:
    """(good records sorted by path as (header, image bytes, mask bytes), bad inputs {"image", "reason"}):
    every image file under SRC/persons/ and every JSONL line is accounted for."""
    from tqdm import tqdm

    src = Path(src_dir)
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder")
    if not Path(captions_jsonl).is_file():
        raise ValueError(f"{captions_jsonl}: no such captions file")
    src_real = os.path.realpath(src)
    entries, bad = read_captions(captions_jsonl, src)
    listed = {b["image"] for b in bad}
    files = {
        p.relative_to(src).as_posix() for p in (src / "persons").glob("*/*") if p.suffix.lower() in IMAGE_EXTENSIONS
    }
    good, seen_real = [], {}
    for rel in tqdm(sorted((files - listed) | set(entries)), desc="checking images", disable=not progress, unit="img"):
        if _person_id(rel) is None:
            bad.append(dict(image=rel, reason="not under persons/<person_id>/"))
            continue
        try:
            _, real = _inside(src_real, "image", rel)
            if real in seen_real:  # a second name (symlink) of a file already taken
                raise ValueError(f"same file as {seen_real[real]}")
            seen_real[real] = rel
            good.append(_validate(src_real, rel, real, entries.get(rel), trigger_word, max_file_bytes))
        except ValueError as e:
            bad.append(dict(image=rel, reason=str(e)))
    return good, bad


# ------------------------------------------------------------------------------------ writer


def check_destination(dst: Path, protected: dict[str, Path], allowed_extra: tuple[str, ...] = ()) -> None:
    """ValueError unless `dst` may be (re)placed: it must not be, or hold, any protected input, and an
    existing non-empty `dst` must be a dataset this writer made (index.json + its shards + allowed_extra)."""
    dst_real = os.path.realpath(dst)
    for what, p in protected.items():
        p_real = os.path.realpath(p)
        if os.path.commonpath([dst_real, p_real]) == dst_real:
            raise ValueError(
                f"{dst}: holds the {what} {p}; the dataset replaces DST as a whole, so write it to another folder"
            )
    if os.path.lexists(dst) and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        try:
            ours = {INDEX_FILE, *(s["path"] for s in load_index(dst)["shards"]), *allowed_extra}
        except (OSError, ValueError):
            ours = None
        foreign = sorted(p.name for p in dst.iterdir() if ours is None or p.name not in ours)
        if foreign:
            raise ValueError(
                f"{dst}: not empty and not a dataset written by this tool (holds "
                f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); choose a new "
                "or empty folder (nothing in it is replaced)"
            )


def write_records(
    out_dir: str | os.PathLike,
    good,
    bad,
    *,
    num_shards: int = 1,
    trigger_word: str | None = DEFAULT_TRIGGER_WORD,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes shards + index.json into the existing folder `out_dir` (not atomic by itself: `write_dataset`
    and `make_demo` call it inside `atomic_dir`); returns the index."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    out_dir = Path(out_dir)
    num_shards = max(1, min(num_shards, len(good)))
    names, persons = [], {}
    bounds = [round(i * len(good) / num_shards) for i in range(num_shards + 1)]
    with tqdm(total=len(good), desc="writing records", disable=not progress, unit="rec") as bar:
        for s in range(num_shards):
            name = f"data-{s:05d}-of-{num_shards:05d}.array_record"
            # group_size:1 -> every record is its own chunk: cheap random access for the sampler.
            writer = ArrayRecordWriter(str(out_dir / name), "group_size:1")
            for i in range(bounds[s], bounds[s + 1]):
                header, image, mask = good[i]
                writer.write(encode_record(header, image, mask))
                persons.setdefault(header["person_id"], []).append(i)
                bar.update()
            writer.close()
            names.append(name)
    index = dict(
        version=FORMAT_VERSION,
        num_records=len(good),
        shards=index_shards(out_dir, names),
        persons=dict(sorted(persons.items())),
        bad=bad,
        trigger_word=trigger_word,
    )
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index


def write_dataset(
    src_dir: str | os.PathLike,
    captions_jsonl: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    num_shards: int = 1,
    trigger_word: str | None = DEFAULT_TRIGGER_WORD,
    progress: bool = True,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Builds the ArrayRecord dataset from `src_dir/persons/<id>/*` + the captions JSONL; returns the index.

    Every image file under persons/ and every JSONL line is accounted for: good ones become records
    (sorted by path), bad ones go to index["bad"] with the reason. trigger_word=None skips the
    trigger-word check (the pipeline still checks it when it tokenizes). DST is written atomically
    (see the module doc); ValueError when DST holds SRC or the captions, or is a foreign folder."""
    from persongen_jax.io import atomic_dir

    src, dst = Path(src_dir), Path(dst_dir)
    check_destination(dst, {"source folder": src, "captions file": Path(captions_jsonl)})
    good, bad = check_inputs(
        src, captions_jsonl, trigger_word=trigger_word, max_file_bytes=max_file_bytes, progress=progress
    )
    if not good:
        raise ValueError(
            f"{src}: no usable images ({len(bad)} bad: "
            + "; ".join(f"{b['image']} ({b['reason']})" for b in bad[:5])
            + ")"
        )
    with atomic_dir(dst, overwrite=True) as tmp:
        return write_records(tmp, good, bad, num_shards=num_shards, trigger_word=trigger_word, progress=progress)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m persongen_jax.data.format", description=__doc__.split("\n")[0])
    p.add_argument("src", help="folder holding persons/<person_id>/<image>")
    p.add_argument("captions", help="captions JSONL (image, caption, caption_bg, caption_body, face_box)")
    p.add_argument("dst", help="output folder (ArrayRecord shards + index.json)")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--trigger-word", default=DEFAULT_TRIGGER_WORD)
    p.add_argument(
        "--max-file-mb",
        type=float,
        default=MAX_FILE_BYTES / 2**20,
        help="largest image / mask file read (default %(default)g MiB)",
    )
    a = p.parse_args(argv)
    try:
        index = write_dataset(
            a.src,
            a.captions,
            a.dst,
            num_shards=a.num_shards,
            trigger_word=a.trigger_word,
            max_file_bytes=int(a.max_file_mb * 2**20),
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{a.dst}: {index['num_records']} records of {len(index['persons'])} persons in {len(index['shards'])} shard(s)"
    )
    if index["bad"]:
        print(
            f"{len(index['bad'])} bad input(s), not written: "
            + ", ".join(f"{b['image']} ({b['reason']})" for b in index["bad"])
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
