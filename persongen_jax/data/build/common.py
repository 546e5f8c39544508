"""What the stages share: the element type, rejection, the DST/_work cache, progress, file reading.

Every image is one frozen `Item`; each stage derives a new one with its results (`dataclasses.replace`:
Beam's rule that a DoFn never mutates its input, which a runner that fuses stages or retries a bundle
relies on) or drops the image into the "rejected" output with its stage, a short reason and the
details. Large arrays live on an item only between two
adjacent stages (the decoded image between decode and detect, aligned face crops between detect and
embed), so nothing that grows with the image count crosses a shuffle.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np

from persongen_jax.data import format as fmt

REJECTED = "rejected"   # tagged output: {"image", "person_id", "stage", "reason", "detail"}
NOTES = "notes"         # tagged output: kept images with a remark (a caption split that did not parse)
FAILED = "failed"       # tagged output: requests the endpoint failed {"image", "stage", "endpoint", "error", "sent"}
STAGES = ("decode", "detect", "verify", "crop", "caption", "split", "mark")
WORK_DIR = "_work"      # DST/_work: stage caches (faces, embeddings, captions, splits)


@dataclass(frozen=True)
class Item:
    """One source image on its way through the stages (see the module doc for which stage fills what);
    frozen: a stage returns `dataclasses.replace(item, ...)`, and never changes the lists, dicts or arrays
    it holds either."""
    image: str                       # "persons/<person_id>/<file>", relative to SRC: the record's "image"
    person_id: str
    path: str                        # full path or URL (a URL is read through Beam's FileSystems)
    sha256: str = ""                 # of the file's bytes (decode)
    width: int = 0                   # decoded size, EXIF orientation applied (decode)
    height: int = 0
    rgb: np.ndarray | None = None    # [H, W, 3] uint8, decode -> detect only
    faces: list[dict] = field(default_factory=list)  # {"box": [x0, y0, x1, y1], "kps": [[x, y] x 5], "score"}
    crops: np.ndarray | None = None  # [n, 112, 112, 3] aligned faces, detect -> embed only
    embeddings: np.ndarray | None = None  # [n, D] unit ArcFace embeddings of `faces` (embed -> verify)
    face: dict | None = None         # the verified face (verify), then mapped into the crop (crop)
    crop_box: list[int] | None = None  # [left, top, right, bottom] of the square crop in the source image
    jpeg: bytes = b""                # the crop, encoded (crop)
    mask: bytes = b""                # PNG face mask of the crop, or b"" when the mask is the box (crop)
    crop_sha256: str = ""
    caption: str = ""                # P_general (caption; the trigger word is inserted by mark)
    # The split's texts of the text conditions: captions field (`settings.split_fields`, e.g. the
    # P_bg / P_body fields of conditions.DEFAULTS) -> text, None where empty; {} when the split failed.
    captions: dict[str, str | None] = field(default_factory=dict)


def reject(item: Item, stage: str, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
    """The rejected-output element for `item`: `reason` is a short fixed phrase (summary counts group by
    it), `detail` the specifics of this image."""
    return beam.pvalue.TaggedOutput(REJECTED, dict(image=item.image, person_id=item.person_id, stage=stage,
                                                   reason=reason, detail=detail))


def failed_request(item: Item, stage: str, error) -> beam.pvalue.TaggedOutput:
    """The failed-output element of a request the endpoint failed (`vlm.EndpointError`): not a reject, the
    run's error (see pipeline.build_dataset)."""
    return beam.pvalue.TaggedOutput(FAILED, dict(image=item.image, person_id=item.person_id, stage=stage,
                                                 endpoint=error.endpoint, error=str(error), sent=error.sent))


class SourceError(ValueError):
    """A source file the build does not read: `reason` is the reject's reason, the message its detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_source(item: Item, src: str, limit: int) -> bytes:
    """The bytes of the item's file, at most `limit`; SourceError otherwise. In a local SRC the rule of
    `data.format` (its own functions): the path must resolve, symlinks followed, inside SRC ("outside the
    source folder"), and only a regular file is read, opened without blocking ("not a regular file": a
    FIFO would wait for a writer for ever); anything else is "unreadable file". A Beam filesystem URL
    (gs://, s3://: no symlinks, no FIFOs) is read through Beam's FileSystems."""
    if "://" in src:
        try:
            return read_bytes(item.path, limit)
        except ValueError as e:
            raise SourceError("unreadable file", str(e)) from None
    try:
        _, real = fmt._inside(os.path.realpath(src), "image", item.image)  # data.format's rule
    except ValueError as e:
        raise SourceError("outside the source folder", str(e)) from None
    try:
        return fmt.read_limited(real, limit)
    except ValueError as e:
        raise SourceError("not a regular file" if str(e) == "not a regular file" else "unreadable file",
                          str(e)) from None


def read_bytes(path: str, limit: int) -> bytes:
    """The bytes of `path` (any Beam filesystem), at most `limit`; ValueError(reason) otherwise."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read(limit + 1)
    except Exception as e:  # each filesystem raises its own types
        raise ValueError(f"cannot read the file ({type(e).__name__}: {e})"[:300]) from None
    if len(data) > limit:
        raise ValueError(f"file over the {limit}-byte limit")
    return data


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`: the content hash the caches and the crop stage key on."""
    return hashlib.sha256(data).hexdigest()


class WorkCache:
    """JSON entries under DST/_work/<kind>/<key[:2]>/<key>.json, written atomically (temp file + rename),
    so a process killed at any point leaves whole entries only. Entries are never trusted blindly: a
    file that does not parse is treated as missing and rewritten."""

    def __init__(self, dst: str, kind: str):
        self.root = Path(dst) / WORK_DIR / kind

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        """The cached value of `key`, or None (missing or unreadable entry)."""
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: Any) -> None:
        """Stores `value` under `key` atomically (temp file + rename)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)

    def fetch(self, keys: list[str], compute, keep=lambda value: True) -> tuple[list, int]:
        """The cached values of `keys`; the missing ones from `compute(indices) -> values` (stored when
        `keep(value)`: a failed request is returned but not cached). -> (values, how many were computed)."""
        values = [self.get(k) for k in keys]
        todo = [i for i, v in enumerate(values) if v is None]
        if todo:
            for i, v in zip(todo, compute(todo)):
                if keep(v):
                    self.put(keys[i], v)
                values[i] = v
        return values, len(todo)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.is_dir() else 0


class Progress:
    """Per-process stage counts, printed to stderr at most every `every_s` seconds: the progress line of
    a DirectRunner run (each worker process prints its own). The exact per-stage counts of the run are
    Beam counters (namespace "build") and the summary in index.json."""

    _lock = threading.Lock()
    _counts: dict[str, int] = {}
    _last = time.monotonic()

    @classmethod
    def reset(cls) -> None:
        """Clears this process's counts (one build per process in tests and benchmarks)."""
        with cls._lock:
            cls._counts, cls._last = {}, time.monotonic()

    @classmethod
    def add(cls, stage: str, what: str, n: int = 1, every_s: float = 10.0) -> None:
        """Adds `n` to the Beam counter build/<stage>_<what> and to the progress line (printed every `every_s`)."""
        beam.metrics.Metrics.counter("build", f"{stage}_{what}").inc(n)
        with cls._lock:
            key = f"{stage} {what}"
            cls._counts[key] = cls._counts.get(key, 0) + n
            now = time.monotonic()
            if every_s > 0 and now - cls._last >= every_s:
                cls._last = now
                line = ", ".join(f"{k} {v}" for k, v in cls._counts.items())
                print(f"build [pid {os.getpid()}]: {line}", file=sys.stderr, flush=True)


class StageDoFn(beam.DoFn):
    """A stage: `run(element)` yields its outputs; counts what it keeps and rejects (Beam counters + the
    progress line) and the seconds it spends (counter "<stage>_us", in the summary). The outputs are
    collected before they are passed on, so the time is the stage's own, not that of the stages fused
    after it."""

    stage = ""

    def __init__(self, settings):
        self.settings = settings

    def run(self, element):
        """The stage's work on one element: yields kept Items and `rejected(...)` outputs."""
        raise NotImplementedError

    def process(self, element):
        """Beam's entry point: `run`, timed (counter <stage>_us) before its outputs are passed on."""
        t0 = time.perf_counter()
        out = list(self.run(element))
        beam.metrics.Metrics.counter("build", f"{self.stage}_us").inc(int((time.perf_counter() - t0) * 1e6))
        yield from out

    def count(self, what: str, n: int = 1, group: str | None = None) -> None:
        """Counts `n` of `what` for this stage (or `group`: the cache counters faces / embeddings)."""
        Progress.add(group or self.stage, what, n, self.settings.progress_every_s)

    def kept(self, n: int = 1) -> None:
        """Counts `n` kept elements of this stage."""
        self.count("kept", n)

    def rejected(self, item: Item, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
        """Counts a reject and returns its tagged output (see `reject`)."""
        Progress.add(self.stage, "rejected", 1, self.settings.progress_every_s)
        return reject(item, self.stage, reason, detail)


class FileStageDoFn(StageDoFn):
    """A stage that works on the bytes of each item's file (`read_source`, at most `max_file_bytes`): a file
    that may not or cannot be read is rejected (its reason) before `run_file(item, data)`."""

    def run(self, item: Item):
        """Reads the item's file (or rejects the item) and hands the bytes to `run_file`."""
        try:
            data = read_source(item, self.settings.src, self.settings.max_file_bytes)
        except SourceError as e:
            yield self.rejected(item, e.reason, str(e))
            return
        yield from self.run_file(item, data)

    def run_file(self, item: Item, data: bytes):
        """The stage's work on one item and its file's bytes: yields kept Items and `rejected(...)` outputs."""
        raise NotImplementedError
