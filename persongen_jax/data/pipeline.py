"""grain input pipeline: one training example = a target image of person X + K reference face crops
of *other* images of X, tokenized captions, the face mask. See docs/DATASET.md.

    it = make_train_iterator(data_dir, tokenizers=load_tokenizers(model_dir), global_batch_size=8, seed=0)
    batch = next(it)               # dict of host numpy arrays, this process's B = global // process_count
    state = it.get_state()         # save with the checkpoint; it.set_state(state) resumes exactly
    print(bad_records_report(data_dir))   # "2 bad records: persons/p3/img2.jpg (cannot decode image), ..."

Determinism: element i of the stream is global step i. Global example g (= step * global_batch_size +
position in the global batch) is a pure function of (seed, g): the target is the (g mod N)-th entry
of epoch (g // N)'s permutation of the N records, and every random choice (references, crop, flip) is
drawn from `np.random.default_rng([seed, g])`. Process p of P computes positions [p*B, (p+1)*B) of
each global batch, so the union over processes is exactly the single-process batch. A bad record is
counted, named, and replaced by a random record drawn from (seed, g, attempt).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from persongen_jax import conditions as conditions_lib
from persongen_jax.data import format as fmt
from persongen_jax.evaluation.faces import arcface_input
from persongen_jax.pipeline.image_processing import clip_preprocess, to_8bit
from persongen_jax.pipeline.prompt import DEFAULT_TRIGGER_WORD, make_prompt_batch, tokenize

log = logging.getLogger(__name__)

# Fraction of the face box added on each side before cropping a reference face.
REF_MARGIN = 0.25
# The random training crop is a square whose side is at least this fraction of the short image side.
MIN_CROP_FRACTION = 0.6
# Bad records drawn in a row for one example before giving up (a dataset of almost only bad records).
MAX_ATTEMPTS = 100

# Every batch has these; each text condition adds its own (`conditions.text_keys`).
BASE_KEYS = (
    "pixel_values",
    "face_mask",
    "id_pixel_values",
    "num_id_images",
    "ids_1",
    "ids_2",
    "class_tokens_mask",
    "text_only_ids_1",
    "text_only_ids_2",
    "original_size",
    "crop_top_left",
)
# (name, captions field) of the text conditions a batch carries unless told otherwise: configs/default.py's.
DEFAULT_TEXT_CONDITIONS = tuple(
    (c.name, c.source) for c in conditions_lib.text_conditions(conditions_lib.parse(conditions_lib.DEFAULTS))
)


def batch_keys(text_conditions=DEFAULT_TEXT_CONDITIONS) -> tuple[str, ...]:
    """The keys of a batch carrying `text_conditions` ((name, captions field) pairs)."""
    return BASE_KEYS + tuple(k for name, _ in text_conditions for k in conditions_lib.text_keys(name))


# PhotoMaker V2's extra batch keys (`IdInputs.keys`).
ID_INPUT_KEYS = ("id_embeds", "has_id_embeds", "arcface_pixel_values")


class IdEmbedsError(ValueError):
    """A record without the ArcFace embedding PhotoMaker V2 training needs, and no ArcFace to compute it: an
    error of the run (the dataset and the config do not go together), never a skipped record."""


@dataclasses.dataclass(frozen=True)
class IdInputs:
    """What the ID encoder reads besides the CLIP crops of the references.

    PhotoMaker v1: `IdInputs()` (one ID token per reference image, nothing more). PhotoMaker V2: `num_tokens`
    ID tokens per image (the class word is repeated K x num_tokens times), and per reference its raw ArcFace
    embedding (`id_embeds` [K, embed_dim]) from the record's `arcface_embedding` (what `data.build` stores;
    `has_id_embeds` [K] says which slots have one); with `arcface_size` > 0 the references lacking it get
    their ArcFace input crop (`arcface_pixel_values` [K, A, A, 3] uint8, `evaluation.faces.arcface_input`),
    embedded in the train step by the model's frozen ArcFace. arcface_size 0 and a record without the
    embedding: IdEmbedsError."""

    num_tokens: int = 1
    embed_dim: int = 0  # 0: no id_embeds (PhotoMaker v1)
    arcface_size: int = 0  # 0: no ArcFace crops

    def keys(self) -> tuple[str, ...]:
        """The batch keys these inputs add."""
        if not self.embed_dim:
            return ()
        return ID_INPUT_KEYS if self.arcface_size else ID_INPUT_KEYS[:2]

    def arrays(self, k: int) -> dict[str, np.ndarray]:
        """Empty per-example arrays for K reference slots (zeros: padded slots and stored embeddings)."""
        out: dict[str, np.ndarray] = {}
        if self.embed_dim:
            out.update(id_embeds=np.zeros((k, self.embed_dim), np.float32), has_id_embeds=np.zeros((k,), bool))
        if self.embed_dim and self.arcface_size:
            out["arcface_pixel_values"] = np.zeros((k, self.arcface_size, self.arcface_size, 3), np.uint8)
        return out

    def fill(self, arrays: dict, j: int, header: dict | None, image, where: str) -> None:
        """Slot j of `arrays` from a reference: its record's stored embedding (header), else the ArcFace crop of
        `image` (the record image when the header has `face_kps`, else a face crop), else IdEmbedsError."""
        if not self.embed_dim:
            return
        stored = (header or {}).get("arcface_embedding")
        if stored is not None:
            emb = fmt.unpack_float32(stored).reshape(-1)
            if emb.shape != (self.embed_dim,):
                raise IdEmbedsError(
                    f"{where}: arcface_embedding of width {emb.shape[0]}, but the ID encoder takes "
                    f"{self.embed_dim} (the dataset was built with another ArcFace)"
                )
            arrays["id_embeds"][j], arrays["has_id_embeds"][j] = emb, True
        elif self.arcface_size:
            arrays["arcface_pixel_values"][j] = arcface_input(image, self.arcface_size, (header or {}).get("face_kps"))
        else:
            raise IdEmbedsError(
                f"{where}: no arcface_embedding in the record (build the dataset with "
                "`python -m persongen_jax.data.build`, which stores it), and no ArcFace to compute "
                "it (set config.init.arcface to a converted ArcFace folder)"
            )


BATCH_KEYS = batch_keys()


# ---------------------------------------------------------------------------------------- bad records


@dataclasses.dataclass
class BadRecords:
    """Bad inputs by image path -> reason: those the writer refused (index.json) plus those that failed
    in this process's transforms. `str()` is the one-line report the training loop prints."""

    entries: dict[str, str] = dataclasses.field(default_factory=dict)
    failures: dict[str, int] = dataclasses.field(default_factory=dict)  # runtime: path -> times skipped

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        if not self.entries:
            return "0 bad records"
        items = ", ".join(f"{k} ({v})" for k, v in self.entries.items())
        return f"{len(self.entries)} bad record{'s' if len(self.entries) != 1 else ''}: {items}"


_RUNTIME: dict[str, dict[str, str]] = {}
_RUNTIME_COUNTS: dict[str, dict[str, int]] = {}
_LOCK = threading.Lock()


def _key(data_dir) -> str:
    return str(Path(data_dir).resolve())


def _record_failure(data_dir: str, image: str, reason: str) -> None:
    with _LOCK:
        if image not in _RUNTIME.setdefault(data_dir, {}):
            # Visible even from grain worker processes, whose counters the main process cannot see.
            log.warning("skipping bad record %s (%s)", image, reason)
        _RUNTIME[data_dir][image] = reason
        counts = _RUNTIME_COUNTS.setdefault(data_dir, {})
        counts[image] = counts.get(image, 0) + 1


def bad_records_report(data_dir: str | os.PathLike) -> BadRecords:
    """The writer's bad inputs (index.json "bad") + records skipped by this process's transforms
    (runtime failures in grain worker processes are logged by the workers, not counted here)."""
    index = fmt.load_index(data_dir)
    entries = {b["image"]: b["reason"] for b in index.get("bad", [])}
    with _LOCK:
        entries.update(_RUNTIME.get(_key(data_dir), {}))
        failures = dict(_RUNTIME_COUNTS.get(_key(data_dir), {}))
    return BadRecords(entries=entries, failures=failures)


# ------------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_records: int
    person_of: tuple[str, ...]  # record index -> person id
    persons: dict[str, tuple[int, ...]]  # person id -> record indices


def dataset_info(data_dir: str | os.PathLike) -> DatasetInfo:
    index = fmt.load_index(data_dir)
    person_of = [""] * index["num_records"]
    for pid, recs in index["persons"].items():
        for r in recs:
            person_of[r] = pid
    return DatasetInfo(
        index["num_records"], tuple(person_of), {pid: tuple(recs) for pid, recs in index["persons"].items()}
    )


def num_records(data_dir: str | os.PathLike) -> int:
    """Good records (= targets per epoch)."""
    return int(fmt.load_index(data_dir)["num_records"])


def epochs_completed(steps: int, global_batch_size: int, num_records: int) -> int:
    """Epochs (passes over all records as targets) finished after `steps` global steps; the training loop
    prints `bad_records_report` when this increases: `epochs_completed(s + 1, ...) > epochs_completed(s, ...)`."""
    return steps * global_batch_size // num_records


def _num_refs_range(num_refs) -> tuple[int, int]:
    lo, hi = (num_refs, num_refs) if isinstance(num_refs, int) else tuple(num_refs)
    if not 1 <= lo <= hi:
        raise ValueError(f"num_refs must be K >= 1 or (lo, hi) with 1 <= lo <= hi, got {num_refs!r}")
    return int(lo), int(hi)


def _square_crop(rng: np.random.Generator, width: int, height: int, box) -> tuple[int, int, int]:
    """(left, top, side) of a random square crop inside the image that contains the face box
    (as much of it as fits when the box is larger than the short side)."""
    x0, y0, x1, y1 = box
    short = min(width, height)
    need = int(np.ceil(max(x1 - x0, y1 - y0)))
    lo = min(short, max(need, int(MIN_CROP_FRACTION * short)))
    side = int(rng.integers(lo, short + 1))

    def place(a0, a1, size):
        lo_, hi_ = max(0, int(np.ceil(a1)) - side), min(int(a0), size - side)
        if lo_ > hi_:  # box wider than the crop: centre the crop on the box
            return int(np.clip(round((a0 + a1 - side) / 2), 0, size - side))
        return int(rng.integers(lo_, hi_ + 1))

    return place(x0, x1, width), place(y0, y1, height), side


def _ref_crop(image: Image.Image, box) -> Image.Image:
    """Square crop around the face box with REF_MARGIN on each side, clamped to the image."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * (0.5 + REF_MARGIN)
    half = min(half, max(image.width, image.height) / 2)
    left, top = max(0, int(round(cx - half))), max(0, int(round(cy - half)))
    right, bottom = min(image.width, int(round(cx + half))), min(image.height, int(round(cy + half)))
    return image.crop((left, top, right, bottom))


def _decode(image_bytes: bytes) -> Image.Image:
    with Image.open(io.BytesIO(image_bytes)) as im:
        im.load()
        return to_8bit(im).convert("RGB")


def _reason(e: Exception) -> str:
    if isinstance(e, (OSError, SyntaxError)):  # PIL's errors for broken files (UnidentifiedImageError too)
        return f"cannot decode image ({type(e).__name__})"
    return str(e) or type(e).__name__


class _Example:
    """Picklable transform: global example index -> example dict, or a `_Bad` (skipped and counted)."""

    def __init__(
        self,
        data_dir,
        tokenizers,
        *,
        global_batch_size,
        shard_index,
        shard_count,
        seed,
        resolution,
        num_refs,
        id_image_size,
        trigger_word,
        text_conditions=DEFAULT_TEXT_CONDITIONS,
        id_inputs: IdInputs = IdInputs(),
    ):
        self.data_dir = _key(data_dir)
        self.id_inputs = id_inputs
        self.info = dataset_info(data_dir)
        self.paths = fmt.shard_paths(data_dir)
        # Own copies: the caller's tokenizers may be used by other threads (another iterator's prefetch).
        self.tokenizers = tuple(copy.deepcopy(t) for t in tokenizers)
        self.gbs, self.lbs = global_batch_size, global_batch_size // shard_count
        self.shard_index, self.seed = shard_index, seed
        self.resolution, self.id_image_size, self.trigger_word = resolution, id_image_size, trigger_word
        self.text_conditions = tuple((str(n), str(src)) for n, src in text_conditions)
        self.k_lo, self.k_hi = _num_refs_range(num_refs)
        self._source = None
        self._perms: dict[int, np.ndarray] = {}
        self._empty = {k: tokenize(t, "")[0] for k, t in zip((1, 2), self.tokenizers)}
        # grain's read threads call the transform concurrently; HF fast tokenizers keep padding /
        # truncation state on the shared Rust object, so concurrent calls corrupt each other's ids.
        self._lock = threading.Lock()

    def __getstate__(self):
        return dict(self.__dict__, _source=None, _lock=None)  # reopened / recreated in each worker

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def source(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def target_of(self, g: int, attempt: int = 0) -> int:
        """Record index of global example g: epoch (g // N)'s permutation at g mod N; a replacement drawn
        at random for attempt > 0 (the first pick was a bad record)."""
        if attempt:
            return int(np.random.default_rng([self.seed, 0xBAD, g, attempt]).integers(self.info.num_records))
        epoch, pos = divmod(g, self.info.num_records)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 0x5EED, epoch]).permutation(self.info.num_records)
            # keep the previous epoch too: read threads straddle an epoch boundary
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return int(perm[pos])

    def example(self, g: int, attempt: int = 0):
        """Global example g as a dict of arrays, or a `_Bad` naming the record and the reason."""
        t = self.target_of(g, attempt)
        image = f"record {t}"
        try:
            header, image_bytes, mask_bytes = fmt.decode_record(self.source[t])
            image = header["image"]
            return self._example(g, attempt, t, header, image_bytes, mask_bytes)
        except IdEmbedsError:
            raise  # the dataset does not fit the model: the run's error, not a bad record
        except Exception as e:  # noqa: BLE001 -- a bad record must never stop training
            return _Bad(image, _reason(e))

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of global step `step`: positions [p*B, (p+1)*B) of the global batch.
        A bad example is counted, named and replaced by another random record, so shapes, the step ->
        data mapping and the union over processes do not depend on bad records or on worker counts."""
        rows = []
        for i in range(self.lbs):
            g = step * self.gbs + self.shard_index * self.lbs + i
            for attempt in range(MAX_ATTEMPTS):
                ex = self.example(g, attempt)
                if not isinstance(ex, _Bad):
                    break
                _record_failure(self.data_dir, ex.image, ex.reason)
            else:
                raise RuntimeError(
                    f"{self.data_dir}: {MAX_ATTEMPTS} bad records in a row at step {step}; "
                    f"{bad_records_report(self.data_dir)}"
                )
            rows.append(ex)
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _example(self, g, attempt, t, header, image_bytes, mask_bytes) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, g, attempt] if attempt else [self.seed, g])
        R, S = self.resolution, self.id_image_size
        # References: other images of the same person; the target itself when it is the only one.
        pid = self.info.person_of[t]
        others = [r for r in self.info.persons[pid] if r != t] or [t]
        k = int(rng.integers(self.k_lo, self.k_hi + 1))
        k = min(k, len(others))
        refs = [others[i] for i in sorted(rng.choice(len(others), size=k, replace=False))]

        target = _decode(image_bytes)
        box = header["face_box"]
        left, top, side = _square_crop(rng, target.width, target.height, box)
        flip = bool(rng.integers(2))
        crop_box = (left, top, left + side, top + side)
        pixels = np.asarray(target.resize((R, R), Image.BICUBIC, box=crop_box), np.float32) / 127.5 - 1.0
        if mask_bytes:
            with Image.open(io.BytesIO(mask_bytes)) as m:
                mask = np.asarray(m.convert("L").resize((R, R), Image.NEAREST, box=crop_box)) > 127
        else:  # the face box, in crop pixels at resolution R
            scale = R / side
            bx0, by0 = int(np.floor((box[0] - left) * scale)), int(np.floor((box[1] - top) * scale))
            bx1, by1 = int(np.ceil((box[2] - left) * scale)), int(np.ceil((box[3] - top) * scale))
            mask = np.zeros((R, R), bool)
            mask[max(by0, 0) : max(by1, 0), max(bx0, 0) : max(bx1, 0)] = True
        if flip:
            pixels, mask = pixels[:, ::-1], mask[:, ::-1]

        id_pixels = np.zeros((self.k_hi, S, S, 3), np.float32)
        id_arrays = self.id_inputs.arrays(self.k_hi)

        def add_reference(rh, image):
            face = _ref_crop(image, rh["face_box"])
            id_pixels[len(kept)] = clip_preprocess(face, S)
            # ArcFace input: the whole record image with its landmarks (aligned), else the face crop
            self.id_inputs.fill(id_arrays, len(kept), rh, image if rh.get("face_kps") else face, rh["image"])

        kept: list[int] = []
        for r in refs:
            name = f"record {r}"
            try:
                rh, rb, _ = (header, image_bytes, b"") if r == t else fmt.decode_record(self.source[r])
                name = rh["image"]
                add_reference(rh, _decode(rb))
                kept.append(r)
            except IdEmbedsError:
                raise
            except Exception as e:  # noqa: BLE001 -- the reference's fault, not the target's: name it, go on
                _record_failure(self.data_dir, name, _reason(e))
        if not kept:  # every sampled reference was bad: the target's own face, as for one-image persons
            id_arrays = self.id_inputs.arrays(self.k_hi)
            add_reference(header, target)
            kept = [t]
        refs, k = kept, len(kept)

        with self._lock:
            out = self._tokenize(header, k * self.id_inputs.num_tokens)
        out.update(id_arrays)
        out.update(
            pixel_values=np.ascontiguousarray(pixels, np.float32),
            face_mask=np.ascontiguousarray(mask, np.float32)[..., None],
            id_pixel_values=id_pixels,
            num_id_images=np.int32(k),
            # SDXL micro-conditioning: (height, width) of the stored image, and the crop's top-left corner
            # in the frame where the crop is R x R (diffusers' train_text_to_image_sdxl convention).
            original_size=np.asarray([target.height, target.width], np.int32),
            crop_top_left=np.asarray([round(top * R / side), round(left * R / side)], np.int32),
            # Not model inputs: let tests and logs check what was sampled.
            record_index=np.int32(t),
            ref_record_indices=np.asarray(refs + [-1] * (self.k_hi - k), np.int32),
        )
        return out

    def _tokenize(self, header, n_tokens) -> dict[str, np.ndarray]:
        """n_tokens: ID tokens fused into the class word (images x tokens per image)."""
        prompts = make_prompt_batch(self.tokenizers, [header["caption"]], [n_tokens], self.trigger_word)
        out = dict(
            ids_1=prompts.ids_1[0],
            ids_2=prompts.ids_2[0],
            class_tokens_mask=prompts.class_tokens_mask[0],
            text_only_ids_1=prompts.text_only_ids_1[0],
            text_only_ids_2=prompts.text_only_ids_2[0],
        )
        for name, field in self.text_conditions:
            text = header.get(field)
            k1, k2, has = conditions_lib.text_keys(name)
            out[has] = np.bool_(bool(text))
            for key, tok, empty in ((k1, self.tokenizers[0], self._empty[1]), (k2, self.tokenizers[1], self._empty[2])):
                out[key] = tokenize(tok, text)[0] if text else empty
        return out


@dataclasses.dataclass(frozen=True)
class _Bad:
    image: str
    reason: str


def sample_references(data_dir: str | os.PathLike, count: int, num_refs: int) -> dict[str, list[Image.Image]]:
    """A fixed sample of the dataset's persons -> {person id: up to `num_refs` reference faces}, cropped as the
    training references are (`_ref_crop`). The persons are `count` ids spread evenly over the sorted ids,
    each with its first records: the same sample at every call (validation during training)."""
    import grain

    index = fmt.load_index(data_dir)
    fmt.check_shards(data_dir, index, verify_hashes=False)
    ids = sorted(index["persons"])
    n = min(count, len(ids))
    chosen = [ids[round(i * (len(ids) - 1) / max(1, n - 1))] for i in range(n)]
    source = grain.sources.ArrayRecordDataSource(fmt.shard_paths(data_dir, index))
    out = {}
    for pid in dict.fromkeys(chosen):
        faces = []
        for g in index["persons"][pid][:num_refs]:
            header, image_bytes, _ = fmt.decode_record(source[g])
            faces.append(_ref_crop(_decode(image_bytes), header["face_box"]))
        out[pid] = faces
    return out


def make_train_dataset(
    data_dir: str | os.PathLike,
    *,
    tokenizers: Sequence,
    global_batch_size: int,
    resolution: int = 512,
    num_refs: int | tuple[int, int] = (1, 4),
    id_image_size: int = 224,
    seed: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    trigger_word: str = DEFAULT_TRIGGER_WORD,
    text_conditions=DEFAULT_TEXT_CONDITIONS,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch: int = 2,
    verify_hashes: bool = True,
    id_inputs: IdInputs = IdInputs(),
):
    """The grain `IterDataset` of this process's batches (see `make_train_iterator`)."""
    import grain
    import jax

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the {shard_count} processes")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    # The index must describe these shard files (size, record count, sha256) before any record is read:
    # an index over other shards would pair targets with another person's references.
    fmt.check_shards(data_dir, fmt.load_index(data_dir), verify_hashes=verify_hashes)
    example = _Example(
        data_dir,
        tokenizers,
        global_batch_size=global_batch_size,
        shard_index=shard_index,
        shard_count=shard_count,
        seed=seed,
        resolution=resolution,
        num_refs=num_refs,
        id_image_size=id_image_size,
        trigger_word=trigger_word,
        text_conditions=text_conditions,
        id_inputs=id_inputs,
    )
    # One element = one step's local batch, so the iterator state is the step and grain workers
    # (which split elements between them) cannot change which examples form a batch.
    ds = (
        grain.MapDataset.range(sys.maxsize)
        .map(example)
        .to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a plain script never parsed them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def make_train_iterator(data_dir: str | os.PathLike, **kwargs) -> Any:
    """Endless iterator of this process's training batches; a grain `DatasetIterator` with
    `get_state()` / `set_state(state)` (checkpoint it with the model: a resumed run sees the same data).

    Keyword arguments: tokenizers (the two CLIP tokenizers with the trigger word), global_batch_size,
    resolution=512, num_refs=(1, 4) (an int K or a (lo, hi) range sampled per example), id_image_size=224,
    seed=0, shard_index=jax.process_index(), shard_count=jax.process_count(), trigger_word="img",
    text_conditions=DEFAULT_TEXT_CONDITIONS ((name, captions field) pairs), worker_count=0 (grain worker
    processes), read_threads=2 and prefetch=2 (batches computed ahead by threads of this process),
    verify_hashes=True (`format.check_shards` hashes every shard first; False: sizes and record counts
    only), id_inputs=IdInputs() (PhotoMaker V2's extra inputs: `IdInputs`). Element i of the stream is global
    step i; the state is {"next_index": step}.

    Each batch is a dict of numpy arrays, B = global_batch_size // shard_count, R = resolution,
    S = id_image_size, K = max refs:
      pixel_values [B,R,R,3] f32 in [-1,1]    face_mask [B,R,R,1] f32 {0,1}
      id_pixel_values [B,K,S,S,3] f32 (CLIP-normalised; zeros past num_id_images)   num_id_images [B] i32
      ids_1, ids_2 [B,77] i32, class_tokens_mask [B,77] bool (class token repeated num_id_images times)
      text_only_ids_1, text_only_ids_2 [B,77] i32 (trigger word removed)
      per text condition (name, field) of `text_conditions` (default: P_bg and P_body, configs/default.py):
        <name>_ids_1, <name>_ids_2 [B,77] i32 (the record's `field`; empty-prompt ids when absent), has_<name> [B] bool
      original_size [B,2] i32 (h, w), crop_top_left [B,2] i32 (top, left); target size is (R, R)
      record_index [B] i32, ref_record_indices [B,K] i32 (-1 padded): bookkeeping, not model inputs.
      PhotoMaker V2 (`IdInputs.keys`): id_embeds [B,K,F] f32, has_id_embeds [B,K] bool,
      arcface_pixel_values [B,K,A,A,3] u8; class_tokens_mask then repeats the class token K x num_tokens times.
    """
    return iter(make_train_dataset(data_dir, **kwargs))
