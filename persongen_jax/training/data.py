"""Training batches: the grain pipeline of `persongen_jax.data`, or a synthetic iterator for tests.

`make_iterator(config, tokenizers, workdir, shard_index, shard_count)` returns an iterator of host
numpy dicts (the keys documented in `loss.compute_loss`) with `get_state()` / `set_state(state)`, so
its position is checkpointed with the model.

`config.data.source`: "grain" (persongen_jax.data.pipeline.make_train_iterator on config.data.dir;
an empty dir builds the demo dataset into WORKDIR/demo_data with `persongen_jax.data.make_demo`) or
"synthetic" (`SyntheticIterator`: deterministic per (seed, index), no files; a learnable pattern per
"person" so the loss can fall).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from persongen_jax import conditions as conditions_lib
from persongen_jax.conditions import CLASS_WORDS, text_keys
from persongen_jax.data.pipeline import DEFAULT_TEXT_CONDITIONS, ID_INPUT_KEYS, IdInputs, batch_keys
from persongen_jax.pipeline import prompt as prompt_lib

SYNTHETIC_CLASS_WORDS = CLASS_WORDS[:3]  # man, woman, person (a person's word is person % 3)
# Synthetic texts of a text condition, by its captions field (a person's text is person % len); any other
# condition gets SYNTHETIC_OTHER.
SYNTHETIC_TEXTS = {
    "caption_bg": ("in the city", "in the mountains", "in a room"),
    "caption_body": ("wearing a red suit", "wearing a black hat"),
}
SYNTHETIC_OTHER = ("smiling", "looking at the camera")


class SyntheticIterator:
    """Deterministic fake ID data: example i of shard s is a function of (seed, global index) only."""

    def __init__(
        self,
        tokenizers,
        *,
        global_batch_size: int,
        resolution: int,
        num_refs: int,
        id_image_size: int,
        seed: int,
        shard_index: int = 0,
        shard_count: int = 1,
        trigger_word: str = "img",
        num_persons: int = 8,
        text_conditions=DEFAULT_TEXT_CONDITIONS,
        id_inputs: IdInputs = IdInputs(),
    ):
        if global_batch_size % shard_count:
            raise ValueError(f"global batch {global_batch_size} not divisible by {shard_count} processes")
        self.tokenizers, self.trigger_word = tokenizers, trigger_word
        self.b, self.r, self.k, self.s = global_batch_size, resolution, num_refs, id_image_size
        self.seed, self.shard_index, self.shard_count = seed, shard_index, shard_count
        self.num_persons = num_persons
        self.text_conditions = tuple(text_conditions)
        if id_inputs.embed_dim and not id_inputs.arcface_size:
            raise ValueError(
                "synthetic data has no stored ArcFace embeddings: PhotoMaker V2 training on it needs "
                "an ArcFace (config.init.arcface, or a model size such as 'tiny')"
            )
        self.id_inputs = id_inputs
        self.step = 0
        self._cache: dict = {}

    def get_state(self) -> dict:
        """The iterator position: {"step", "seed"} (JSON)."""
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        """Resumes at the position `get_state` returned."""
        self.step = int(state["step"])

    def __iter__(self):
        return self

    @staticmethod
    def _person_image(person: int, rng, size: int) -> np.ndarray:
        prng = np.random.default_rng(1000 + person)
        color = prng.uniform(-1, 1, 3)
        freq = prng.integers(1, 4, 2)
        yy, xx = np.mgrid[0:size, 0:size] / size
        pattern = np.sin(2 * np.pi * (freq[0] * yy + freq[1] * xx))[..., None]
        img = 0.6 * color * pattern + 0.1 * rng.standard_normal((size, size, 3))
        return np.clip(img, -1, 1).astype(np.float32)

    def _example(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        person = int(rng.integers(self.num_persons))
        r = self.r
        img = self._person_image(person, rng, r)
        # The background colour follows the person's first text condition (P_bg in the defaults), so that
        # condition carries learnable information.
        n_first = len(self._texts(0)) if self.text_conditions else 1
        bg_color = np.random.default_rng(2000 + person % n_first).uniform(-1, 1, 3).astype(np.float32)
        mask = np.zeros((r, r, 1), np.float32)
        lo, hi = r // 4, 3 * r // 4
        mask[lo:hi, lo:hi] = 1
        pixel = np.where(mask > 0, img, bg_color).astype(np.float32)
        n = int(rng.integers(1, self.k + 1))
        refs = np.stack([self._person_image(person, rng, self.s) for _ in range(self.k)])
        word = SYNTHETIC_CLASS_WORDS[person % len(SYNTHETIC_CLASS_WORDS)]
        caption = f"a photo of a {word} {self.trigger_word}"
        n_tokens = n * self.id_inputs.num_tokens  # PhotoMaker V2 fuses num_tokens ID tokens per image
        key = (caption, n_tokens)
        if key not in self._cache:
            self._cache[key] = prompt_lib.make_prompt_batch(self.tokenizers, caption, n_tokens, self.trigger_word)
        pb = self._cache[key]

        def tok(i, text):
            if (i, text) not in self._cache:
                self._cache[(i, text)] = prompt_lib.tokenize(self.tokenizers[i], [text])[0]
            return self._cache[(i, text)]

        out = dict(
            pixel_values=pixel,
            face_mask=mask,
            id_pixel_values=refs.astype(np.float32),
            num_id_images=np.int32(n),
            ids_1=pb.ids_1[0],
            ids_2=pb.ids_2[0],
            class_tokens_mask=pb.class_tokens_mask[0],
            text_only_ids_1=pb.text_only_ids_1[0],
            text_only_ids_2=pb.text_only_ids_2[0],
            original_size=np.array([r, r], np.int32),
            crop_top_left=np.array([0, 0], np.int32),
        )
        id_arrays = self.id_inputs.arrays(self.k)
        for j in range(n if self.id_inputs.embed_dim else 0):  # no stored embeddings: ArcFace crops of the refs
            self.id_inputs.fill(id_arrays, j, None, np.round((refs[j] + 1) * 127.5).astype(np.uint8), f"person{person}")
        out.update(id_arrays)
        for i, (name, _) in enumerate(self.text_conditions):
            texts = self._texts(i)
            text = texts[person % len(texts)]
            k1, k2, has = text_keys(name)
            out.update({k1: tok(0, text), k2: tok(1, text), has: np.bool_(rng.random() < 0.8)})
        return out

    def _texts(self, i: int) -> tuple[str, ...]:
        return SYNTHETIC_TEXTS.get(self.text_conditions[i][1], SYNTHETIC_OTHER)

    def __next__(self) -> dict:
        per = self.b // self.shard_count
        start = self.step * self.b + self.shard_index * per
        rows = [self._example(start + i) for i in range(per)]
        self.step += 1
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def text_condition_fields(config) -> tuple[tuple[str, str], ...]:
    """(name, captions field) of every text condition the config declares: what each batch carries."""
    return tuple((c.name, c.source) for c in conditions_lib.text_conditions(conditions_lib.from_config(config)))


def model_inputs(batch: dict, text_conditions=DEFAULT_TEXT_CONDITIONS) -> dict:
    """The arrays the train step uses (drops bookkeeping such as record_index; keeps PhotoMaker V2's
    `IdInputs` keys when present); KeyError names a missing one."""
    keys = batch_keys(text_conditions) + tuple(k for k in ID_INPUT_KEYS if k in batch)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing} (has {sorted(batch)})")
    return {k: batch[k] for k in keys}


class BadRecordHook:
    """Logs the records that failed while training (by name and reason) each time an epoch completes and at
    the end. The inputs the dataset's writer left out (index.json "bad"; `data.build` also lists every
    reject in "rejected" and its summary) were reported when the dataset was made and never reach
    training: they are counted in one info line at the start, not repeated as a warning."""

    def __init__(self, data_dir: str | None, global_batch_size: int):
        self.data_dir, self.gb = data_dir, global_batch_size
        self.num_records = None
        if data_dir:
            from persongen_jax.data import format as fmt
            from persongen_jax.data import pipeline as data_pipeline

            self._pipe = data_pipeline
            self.num_records = data_pipeline.num_records(data_dir)
            left_out = len(fmt.load_index(data_dir).get("bad", []))
            if left_out and jax.process_index() == 0:
                logging.getLogger("persongen_jax.train").info(
                    '%s: %d input(s) left out when the dataset was written (index.json "bad"); not training data',
                    data_dir,
                    left_out,
                )

    def report(self, why: str) -> str | None:
        """Logs the records that failed in this process's data pipeline so far (each by name and reason)
        with `why`; returns the text. Process 0 logs it; a record that fails in a grain worker process is
        logged, once, by that worker."""
        if not self.data_dir:
            return None
        bad = self._pipe.bad_records_report(self.data_dir)
        # bad.entries also holds the writer's list (index.json "bad"); only runtime failures are news here.
        failed = self._pipe.BadRecords(entries={k: bad.entries[k] for k in bad.failures}, failures=bad.failures)
        text = str(failed)
        if jax.process_index() == 0:
            # A clean epoch is news, not a warning.
            level = logging.WARNING if failed.entries else logging.INFO
            logging.getLogger("persongen_jax.train").log(level, "%s: %s", why, text)
        return text

    def after_step(self, step: int) -> None:
        """Reports the bad records when `step` completes an epoch."""
        if self.num_records:
            ep = self._pipe.epochs_completed
            if ep(step, self.gb, self.num_records) > ep(step - 1, self.gb, self.num_records):
                self.report(f"epoch {ep(step, self.gb, self.num_records)} done (step {step})")


def make_iterator(
    config,
    tokenizers,
    workdir,
    *,
    shard_index: int,
    shard_count: int,
    id_image_size: int,
    id_inputs: IdInputs = IdInputs(),
):
    """-> (iterator, BadRecordHook). id_inputs: the model's (`training.model.id_inputs`; PhotoMaker V2)."""
    d = config.data
    text_conditions = text_condition_fields(config)

    # What both sources take (the grain one draws min_refs..num_refs references, the synthetic one num_refs).
    batches = dict(
        tokenizers=tokenizers,
        global_batch_size=d.global_batch_size,
        resolution=d.resolution,
        id_image_size=id_image_size,
        seed=config.seed,
        shard_index=shard_index,
        shard_count=shard_count,
        trigger_word=d.trigger_word,
        text_conditions=text_conditions,
        id_inputs=id_inputs,
    )
    if d.source == "synthetic":
        return SyntheticIterator(num_refs=d.num_refs, **batches), BadRecordHook(None, d.global_batch_size)
    if d.source != "grain":
        raise ValueError(f"config.data.source={d.source!r}; expected 'grain' or 'synthetic'")
    from persongen_jax.data import pipeline as data_pipeline  # the grain pipeline (persongen_jax/data)

    data_dir = d.dir
    if data_dir and not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"config.data.dir={data_dir!r}: no such folder; build a dataset with `python -m "
            "persongen_jax.data.format SRC CAPTIONS.jsonl DST` (or leave it empty for the demo)"
        )
    if not data_dir:
        data_dir = dataset_dir(config, workdir)
        # One writer: process 0 builds the demo dataset, the others wait for it (same folder on every host).
        if shard_index == 0 and not (Path(data_dir) / "index.json").exists():
            from persongen_jax.data import make_demo

            logging.info("config.data.dir is empty: building the demo dataset in %s", data_dir)
            make_demo.main([data_dir])
        if shard_count > 1:
            from persongen_jax.training import distributed

            distributed.sync("persongen_demo_data")
    it = data_pipeline.make_train_iterator(
        data_dir, num_refs=(min(d.min_refs, d.num_refs), d.num_refs), worker_count=d.worker_count, **batches
    )
    return it, BadRecordHook(data_dir, d.global_batch_size)


def dataset_dir(config, workdir) -> str:
    """The grain dataset a config trains on: config.data.dir, or the demo dataset WORKDIR/demo_data."""
    return config.data.dir or str(Path(workdir) / "demo_data")


def sample_identities(config, workdir, count: int, size: int = 64) -> dict[str, list]:
    """A fixed sample of `count` training identities -> {identity: reference faces (PIL)}, what validation
    generates when config.eval.sets names no validation sets: persons spread over the dataset
    (`data.pipeline.sample_references`, up to data.num_refs faces each), or the synthetic source's persons
    0..count-1 (their pattern at `size` pixels)."""
    from PIL import Image

    if config.data.source == "synthetic":

        def face(person, k):
            img = SyntheticIterator._person_image(person, np.random.default_rng([person, k]), size)
            return Image.fromarray(np.round((img + 1) * 127.5).astype(np.uint8))

        return {f"person{p}": [face(p, k) for k in range(config.data.num_refs)] for p in range(count)}
    from persongen_jax.data import pipeline as data_pipeline

    return data_pipeline.sample_references(dataset_dir(config, workdir), count, config.data.num_refs)


def iterator_state(it) -> dict:
    """JSON-able position of the iterator (grain's DataLoader iterator returns bytes)."""
    s = it.get_state()
    if isinstance(s, bytes):
        return {"bytes": s.decode()}
    return {"state": json.loads(json.dumps(s))}


def restore_iterator(it, saved: dict) -> None:
    """Puts the iterator back at a position saved by `iterator_state`."""
    it.set_state(saved["bytes"].encode() if "bytes" in saved else saved["state"])
