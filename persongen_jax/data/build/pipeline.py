"""The Beam pipeline of the build, and the run around it: destination checks, atomic DST, summary.

    index = build_dataset(settings, beam_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])

Graph (each arrow a stage module; every stage's rejects flow into one "rejected" output):

    ListImages -> Decode -> Detect -> BatchElements -> Embed -> GroupByKey(person) + Verify -> Crop
      -> BatchElements -> Caption -> BatchElements -> Split -> Mark -> Encode -> WriteToArrayRecord

The run writes into a temporary folder next to DST (`persongen_jax.io.atomic_dir`) that replaces DST only when
everything -- shards, index.json -- is complete: a killed run leaves the previous DST (or none). The
stage caches live in DST/_work during the run and move into the new DST with it, so a rerun after a
crash reuses every finished detection, embedding, caption and split. A caption or split request that
the endpoint failed (after its retries) is an error of the run, not a reject: the build stops with one
line naming the endpoint and the count, DST stays as it was and the answers received stay cached.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import traceback
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from persongen_jax.data import format as fmt
from persongen_jax.data.build.caption import CaptionImages
from persongen_jax.data.build.common import FAILED, NOTES, REJECTED, WORK_DIR, Progress
from persongen_jax.data.build.crop import CropFaces
from persongen_jax.data.build.decode import DecodeImages
from persongen_jax.data.build.detect import DetectFaces
from persongen_jax.data.build.mark import MarkTrigger
from persongen_jax.data.build.settings import BuildSettings
from persongen_jax.data.build.source import ListImages, list_local, persons_pattern
from persongen_jax.data.build.split import SplitCaptions
from persongen_jax.data.build.verify import EmbedFaces, VerifyIdentity
from persongen_jax.data.build.vlm import check_backend
from persongen_jax.data.build.write import WriteRecords, write_index

REPORT_DIR = "_build"  # rejected / notes / failed JSONL inside the temporary output folder (removed at the end)


def _batched(settings_batch: int):
    return beam.BatchElements(min_batch_size=settings_batch, max_batch_size=settings_batch)


def face_stages(p: beam.Pipeline, s: BuildSettings):
    """The CPU stages: list, decode + size filter, detect, embed, verify, crop + encode.
    -> (PCollection of cropped Items, [PCollections of rejects])."""
    items = p | "List" >> ListImages(s.src)
    dec = items | "Decode" >> beam.ParDo(DecodeImages(s)).with_outputs(REJECTED, main="kept")
    det = dec.kept | "Detect" >> beam.ParDo(DetectFaces(s)).with_outputs(REJECTED, main="kept")
    emb = det.kept | "BatchFaces" >> _batched(s.embed_batch_size) | "Embed" >> beam.ParDo(EmbedFaces(s))
    ver = emb | "Verify" >> VerifyIdentity(s)
    crp = ver.verified | "Crop" >> beam.ParDo(CropFaces(s)).with_outputs(REJECTED, main="kept")
    return crp.kept, [dec[REJECTED], det[REJECTED], ver[REJECTED], crp[REJECTED]]


def build_pipeline(p: beam.Pipeline, s: BuildSettings, out_dir: str) -> None:
    """Adds the build to `p`: records into out_dir/data-*.array_record, rejects, notes and failed requests
    into out_dir/_build/{rejected,notes,failed}-*.jsonl."""
    crops, rejected = face_stages(p, s)
    hints = {"accelerator": s.caption_accelerator} if s.caption_accelerator else {}
    cap = (crops | "BatchCrops" >> _batched(s.caption.batch_size)
           | "Caption" >> beam.ParDo(CaptionImages(s)).with_resource_hints(**hints)
           .with_outputs(REJECTED, FAILED, main="kept"))
    spl = (cap.kept | "BatchCaptions" >> _batched(s.split.batch_size)
           | "Split" >> beam.ParDo(SplitCaptions(s)).with_resource_hints(**hints)
           .with_outputs(NOTES, FAILED, main="kept"))
    mrk = spl.kept | "Mark" >> beam.ParDo(MarkTrigger(s)).with_outputs(REJECTED, main="kept")
    _ = mrk.kept | "Write" >> WriteRecords(out_dir, s)
    report = os.path.join(out_dir, REPORT_DIR)
    _ = ((*rejected, cap[REJECTED], mrk[REJECTED]) | "AllRejected" >> beam.Flatten()
         | "RejectedJson" >> beam.Map(json.dumps)
         | "WriteRejected" >> beam.io.WriteToText(os.path.join(report, "rejected"), ".jsonl"))
    _ = (spl[NOTES] | "NotesJson" >> beam.Map(json.dumps)
         | "WriteNotes" >> beam.io.WriteToText(os.path.join(report, "notes"), ".jsonl"))
    _ = ((cap[FAILED], spl[FAILED]) | "AllFailed" >> beam.Flatten() | "FailedJson" >> beam.Map(json.dumps)
         | "WriteFailed" >> beam.io.WriteToText(os.path.join(report, "failed"), ".jsonl"))


def _read_jsonl(folder: Path, prefix: str) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob(f"{prefix}-*.jsonl"))
            for line in f.read_text().splitlines() if line.strip()]


def _counters(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter

    out: dict = {}
    for c in result.metrics().query(MetricsFilter().with_namespace("build"))["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    return out


def check_destination(dst: Path, src: str) -> None:
    """ValueError unless DST may receive the build: absent, empty, holding only _work (an interrupted
    build), or a dataset this command built (its index.json has "build"); never a folder holding SRC
    (the new dataset replaces DST as a whole)."""
    if "://" not in src:
        d, p = os.path.realpath(dst), os.path.realpath(src)
        if os.path.commonpath([d, p]) == d:
            raise ValueError(f"{dst}: holds the source folder {src}; write the dataset to another folder")
    if dst.is_dir() and {p.name for p in dst.iterdir()} <= {WORK_DIR}:
        return
    fmt.check_destination(dst, {}, allowed_extra=(WORK_DIR,))
    if (dst / fmt.INDEX_FILE).is_file() and "build" not in fmt.load_index(dst):
        raise ValueError(f"{dst}: holds a dataset written by `data.format`, not by this build; choose another "
                         "folder (nothing in it is replaced)")


def build_dataset(settings: BuildSettings, beam_args=(), *, log=print) -> dict:
    """Runs the build (see the module doc); returns index.json's content. ValueError / OSError (one line,
    naming the file or option) for unusable inputs; RuntimeError when no image passes every stage or the
    caption endpoint failed (`endpoint_failure`)."""
    from apache_beam.io.filesystems import FileSystems

    from persongen_jax.data.build.faces import face_scorer
    from persongen_jax.io import atomic_dir

    s = settings
    s.check()
    if "://" in s.dst:
        raise ValueError(f"{s.dst}: DST must be a local or mounted folder (the ArrayRecord sink writes to disk)")
    dst = Path(s.dst).absolute()
    check_destination(dst, s.src)
    if (next(list_local(s.src), None) is None if "://" not in s.src
            else not FileSystems.match([persons_pattern(s.src)], limits=[1])[0].metadata_list):
        raise ValueError(f"{s.src}: no files under persons/<person_id>/ (expected SRC/persons/<id>/*.jpg)")
    face_scorer(s)  # the detector and ArcFace load here first: a bad folder is an error before the pipeline
    for spec in {s.caption, s.split}:
        check_backend(spec)
    s = dataclasses.replace(s.fingerprinted(), dst=str(dst))
    (dst / WORK_DIR).mkdir(parents=True, exist_ok=True)
    Progress.reset()
    options = PipelineOptions(list(beam_args))
    with atomic_dir(dst, overwrite=True) as out:
        p = beam.Pipeline(options=options)
        build_pipeline(p, s, str(out))
        try:
            result = p.run()
            result.wait_until_finish()
        except Exception as e:  # a worker's exception, wrapped by the runner in lines of context
            trace = dst / WORK_DIR / "last_error.txt"
            trace.write_text(traceback.format_exc())
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise RuntimeError(f"the pipeline failed: {type(e).__name__}: {first} (traceback in {trace})") from e
        report = out / REPORT_DIR
        rejected, notes, failed = (_read_jsonl(report, k) for k in ("rejected", "notes", "failed"))
        shutil.rmtree(report)
        if failed:  # raised inside atomic_dir: the new folder is dropped, DST and DST/_work stay
            raise RuntimeError(endpoint_failure(failed, dst))
        index = write_index(out, s, rejected, notes, _counters(result))
        log(format_summary(index, dst))
        if index["num_records"] == 0:
            raise RuntimeError(f"no image of {s.src} passed every stage ({len(rejected)} rejected, see above); "
                               f"{dst} is left as it was")
        # The caches move with the new dataset (a kill between this rename and the swap costs a recompute).
        os.rename(dst / WORK_DIR, out / WORK_DIR)
    return index


def endpoint_failure(failed: list[dict], dst) -> str:
    """The one-line error of a build whose endpoint failed: per endpoint and stage the requests that failed
    after their retries (the first error), and those not sent after it."""
    parts = []
    for endpoint in sorted({f["endpoint"] for f in failed}):
        counts = []
        for stage in sorted({f["stage"] for f in failed if f["endpoint"] == endpoint}):
            mine = [f for f in failed if (f["endpoint"], f["stage"]) == (endpoint, stage)]
            sent = [f for f in mine if f["sent"]]
            first = " ".join(min(sent or mine, key=lambda f: f["image"])["error"].split())  # HTTP bodies hold newlines
            counts.append(f"{len(sent)} {stage} request(s) failed ({first})"
                          + (f", {len(mine) - len(sent)} more not sent" if len(mine) > len(sent) else ""))
        parts.append(f"the endpoint {endpoint} failed: " + ", ".join(counts))
    return ("; ".join(parts) + f". {dst} is left as it was; the answers received are cached in "
            f"{Path(dst) / WORK_DIR}, so a rerun asks only for the rest")


def format_summary(index: dict, dst) -> str:
    """The printed summary of a build: counts per stage with reasons, split failures, seconds, cache use."""
    sm = index["summary"]
    lines = [f"{dst}: {sm['images']} images -> {sm['records']} records of {len(index['persons'])} persons in "
             f"{len(index['shards'])} shard(s)"]
    for st in sm["stages"]:
        rej = ", ".join(f"{k} {v}" for k, v in st["rejected"].items())
        lines.append(f"  {st['stage']:<8} {st['in']:>7} in {st['kept']:>7} kept" + (f"   rejected: {rej}" if rej else ""))
    lines.append(f"  split failures (kept with P_general only): {sm['split_failures']}")
    lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sm["seconds"].items())
                 + " (summed over workers)")
    lines.append("  cache: " + ", ".join(f"{g} {c['computed']} computed / {c['cached']} cached"
                                         for g, c in sm["cache"].items()))
    return "\n".join(lines)
