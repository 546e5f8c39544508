"""Stage "write": records in the dataset format of `data.format` through Beam's ArrayRecord sink, then
index.json as `data.format` writes it (so training reads both the same way), plus what the build adds.

Records: `format.encode_record(header, crop JPEG, mask PNG or b"")`; the header has the keys of
`data.format` (person_id, image, caption, the captions fields -- `format.DEFAULT_CAPTION_FIELDS` always,
None when empty, plus any other --split-fields -- face_box, width, height, format)
and the build's own: face_kps (5 landmarks in the crop), face_score (detector), identity_cos (mean
cosine to the person's identity cluster), arcface_embedding (the raw ArcFace embedding of the verified
face, `format.pack_float32`: PhotoMaker V2's `id_embeds`, read by the training pipeline), source (sha256, width, height and crop_box of the source
image). Shards are written by `array_record.beam.arrayrecordio.WriteToArrayRecord` (group_size:1 like
`data.format`) as data-SSSSS-of-NNNNN.array_record: with `num_shards` 0 one shard per bundle of the
runner, streamed; with N > 0 exactly N, which costs a shuffle of every record (on the DirectRunner
that holds them all in memory).

index.json: the keys of `data.format` -- version, num_records, shards (`format.index_shards`: records,
bytes and sha256 per shard, checked by every reader), persons (person id -> global record indices, in
shard order), bad (the undecodable / unreadable source files, as `data.format` lists them), trigger_word
-- and the build's: rejected (every dropped image: image, person_id, stage, reason, detail),
split_failures, summary (counts per stage) and build (settings and model names).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import apache_beam as beam
from array_record.beam.arrayrecordio import WriteToArrayRecord

from persongen_jax.data import format as fmt
from persongen_jax.data.build.common import STAGES, Item

SHARD_PREFIX, SHARD_SUFFIX = "data", ".array_record"
# Input defects, listed in "bad" as data.format lists them.
BAD_REASONS = ("cannot decode image", "unreadable file", "not a regular file", "outside the source folder")


def record_header(item: Item, settings) -> dict:
    """The record's JSON header (see the module doc) of a finished Item."""
    face, res = item.face, settings.resolution
    # As data.format: the default conditions' fields always present (None when absent), then any other.
    fields = sorted(set(fmt.DEFAULT_CAPTION_FIELDS) | set(settings.split_fields))
    return dict(person_id=item.person_id, image=item.image, caption=item.caption,
                **{f: item.captions.get(f) for f in fields}, face_box=face["box"], width=res, height=res,
                format="JPEG", face_kps=face["kps"], face_score=round(face["score"], 4),
                identity_cos=face.get("identity_cos"),
                **({"arcface_embedding": fmt.pack_float32(face["embedding"])} if "embedding" in face else {}),
                source=dict(sha256=item.sha256, width=item.width, height=item.height, crop_box=item.crop_box))


class WriteRecords(beam.PTransform):
    """Items -> encoded records -> out_dir/data-SSSSS-of-NNNNN.array_record."""

    def __init__(self, out_dir: str, settings):
        super().__init__()
        self.out_dir, self.settings = out_dir, settings

    def expand(self, items):
        """Items -> encoded records -> ArrayRecord shards (WriteToArrayRecord)."""
        s = self.settings
        return (items
                | "Encode" >> beam.Map(lambda it: fmt.encode_record(record_header(it, s), it.jpeg, it.mask))
                | "ArrayRecord" >> WriteToArrayRecord(os.path.join(self.out_dir, SHARD_PREFIX),
                                                      file_name_suffix=SHARD_SUFFIX,
                                                      num_shards=self.settings.num_shards))


def shard_names(out_dir: str | os.PathLike) -> list[str]:
    """The shard file names in `out_dir`, sorted (the order of global record indices)."""
    return sorted(p.name for p in Path(out_dir).glob(f"{SHARD_PREFIX}-*-of-*{SHARD_SUFFIX}"))


def persons_of_shards(out_dir: str | os.PathLike, names: list[str], chunk: int = 256) -> tuple[dict, int]:
    """({person_id: [global record indices]}, number of records) read from the shards' headers."""
    from array_record.python.array_record_module import ArrayRecordReader

    persons, n = {}, 0
    for name in names:
        reader = ArrayRecordReader(str(Path(out_dir) / name))
        try:
            total = reader.num_records()
            for start in range(0, total, chunk):
                for raw in reader.read(range(start, min(start + chunk, total))):
                    persons.setdefault(fmt.decode_record(raw)[0]["person_id"], []).append(n)
                    n += 1
        finally:
            reader.close()
    return dict(sorted(persons.items())), n


def summarize(num_records: int, rejected: list[dict], split_failures: int, counters: dict) -> dict:
    """Counts per stage (in, kept, rejected by reason), from the outputs themselves (exact on every
    runner); cache hits/misses from the Beam counters."""
    total = num_records + len(rejected)
    by_stage = {st: Counter(r["reason"] for r in rejected if r["stage"] == st) for st in STAGES}
    stages, n_in = [], total
    for st in STAGES:
        dropped = sum(by_stage[st].values())
        stages.append(dict(stage=st, **{"in": n_in}, kept=n_in - dropped, rejected=dict(sorted(by_stage[st].items()))))
        n_in -= dropped
    cache = {group: {what: int(counters.get(f"{group}_{what}", 0)) for what in ("computed", "cached")}
             for group in ("faces", "embeddings", "caption", "split")}
    # Seconds spent in each stage, summed over workers (embed is verify's first half).
    seconds = {st: round(counters.get(f"{st}_us", 0) / 1e6, 3) for st in ("decode", "detect", "embed", *STAGES[2:])}
    return dict(images=total, records=num_records, stages=stages, split_failures=split_failures, cache=cache,
                seconds=seconds)


def write_index(out_dir: str | os.PathLike, settings, rejected: list[dict], notes: list[dict],
                counters: dict) -> dict:
    """index.json for the shards in `out_dir` (see the module doc); returns it."""
    names = shard_names(out_dir)
    persons, n = persons_of_shards(out_dir, names)
    rejected = sorted(rejected, key=lambda r: r["image"])
    notes = sorted(notes, key=lambda r: r["image"])
    bad = [dict(image=r["image"], reason=f"{r['reason']}: {r['detail']}" if r["detail"] else r["reason"])
           for r in rejected if r["stage"] == "decode" and r["reason"] in BAD_REASONS]
    index = dict(version=fmt.FORMAT_VERSION, num_records=n, shards=fmt.index_shards(out_dir, names), persons=persons,
                 bad=bad, trigger_word=settings.trigger_word, rejected=rejected, split_failures=notes,
                 summary=summarize(n, rejected, len(notes), counters), build=settings.describe())
    (Path(out_dir) / fmt.INDEX_FILE).write_text(json.dumps(index, indent=1))
    return index
