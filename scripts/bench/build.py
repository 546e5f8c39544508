"""Dataset construction, CPU stages: Beam DirectRunner (multi-processing, N workers) vs a hand-written loop.

    python scripts/bench/build.py                                    # 400 images, tiny ArcFace, 2 workers
    python scripts/bench/build.py --images 400 --arcface r50         # ArcFace r50-sized embedding cost
    python scripts/bench/build.py --memory 200,2000                  # peak RSS vs image count (streaming)
    python scripts/bench/build.py --empty --images 2000              # Beam's own cost: same graph, no stage work

The CPU stages of `python -m persongen_jax.data.build`: decode + size filter, SCRFD detection, ArcFace
embedding, per-person identity verification, square crop + resize + JPEG encode, record encoding and
the ArrayRecord sink (`data.build.pipeline.face_stages` + `write.WriteRecords`; no captioning).

Beam: the DirectRunner with `--direct_running_mode=multi_processing --direct_num_workers=N` (what a user
runs on one machine). Reference: the same work as a plain single-process Python loop -- what a user
writes by hand around insightface's `FaceAnalysis` (insightface is not installed here), calling the same
project functions on the same images in the same run: for each image read + decode (`decode_rgb`),
detect + align (`detect_faces`, `align`); embed all faces (`FaceSimScorer.embed_crops`, the pipeline's
batch size); cluster per person (`verify_person`); for each verified image read + decode again,
crop + resize + JPEG (`crop_face`), encode and write the record (`encode_record`, ArrayRecordWriter).
Decoding twice is what the pipeline does to stream (it does not carry pixels through the per-person
shuffle); a loop that keeps every decoded image would save ~10% of the work and hold them all in memory. Each side runs in its own child process (clean peak memory). Both include model loading and
compilation (a user waits for them too); the stage breakdown is the time inside each stage (for Beam
summed over the workers, from the build's "<stage>_us" counters).

Inputs: synthetic person folders (`testing.tiny_build.synthetic_persons`: one key-coloured face per
image, `--size` pixels, JPEG) and the key-colour SCRFD-layout detector (cheap: the real SCRFD-10g costs
about 10 GFLOP per image); ArcFace is a random IResNet, `tiny` (testing.tiny_build.BUILD_ARCFACE) or
`r50` (insightface's w600k_r50 shape, ~12 GFLOP per face). Every image passes every stage.

Peak memory and CPU: a thread samples the child process and its workers (psutil, every 0.2 s): peak RSS
of the driver, of the largest worker and of all processes together, and the CPU seconds of all (under
a loaded machine the wall-clock ratio moves; CPU seconds per image show the work each side does).
`--memory A,B` runs the Beam side alone on A and then B images (`--memory-mode in_memory`: one process
with `--workers` threads holds every stage and the runner's buffers; `multi_processing`: the driver and
its workers, summed) and prints the ratio of the peaks. `--empty` runs Beam alone: the same graph shape (list + reshuffle, group
by person, ArrayRecord sink) with no stage work, i.e. what the runner and its worker processes cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402

IMAGES_PER_PERSON = 10


def _settings(work: Path, src: Path, dst: Path, args):
    from persongen_jax.data.build.settings import BuildSettings, ModelSpec

    unused = ModelSpec(backend="openai", model="unused", endpoint="http://unused")
    return BuildSettings(
        src=str(src),
        dst=str(dst),
        detector=str(work / "det"),
        arcface=str(work / f"arcface_{args.arcface}"),
        caption=unused,
        split=unused,
        resolution=args.resolution,
        min_side=512,
        min_face=256,
        verify_threshold=0.85,
        detector_threads=args.detector_threads,
        progress_every_s=0,
    ).fingerprinted()


def prepare(args, work: Path, counts: list[int]) -> None:
    from persongen_jax.testing.tiny_build import BUILD_ARCFACE, make_key_detector, make_raw_persons, synthetic_persons
    from persongen_jax.testing.tiny_eval import R50, make_tiny_arcface

    if not (work / "det").exists():
        make_key_detector(work / "det", input_size=640)
    folder = work / f"arcface_{args.arcface}"
    if not folder.exists():
        make_tiny_arcface(folder, **(BUILD_ARCFACE if args.arcface == "tiny" else R50))
    w, h = args.size
    for n in counts:
        src = work / f"src_{n}_{w}x{h}"
        if not src.exists():
            t0 = time.perf_counter()
            make_raw_persons(
                src,
                synthetic_persons(
                    n // IMAGES_PER_PERSON, IMAGES_PER_PERSON, width=w, height=h, face=int(min(w, h) * 0.42)
                ),
            )
            print(f"made {n} images in {time.perf_counter() - t0:.0f} s: {src}", file=sys.stderr)


class TreeMonitor:
    """Samples this process and its descendants (the Beam workers) every `every_s` seconds with psutil:
    peak RSS of this process, of the largest other process and of the whole tree at one moment, and the
    CPU seconds (user + system) of every process seen, at its last sample."""

    def __init__(self, every_s: float = 0.2):
        import threading

        import psutil

        self.me, self.every_s = psutil.Process(), every_s
        self.peak_me = self.peak_child = self.peak_tree = 0.0
        self.cpu: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        import psutil

        tree = 0.0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss / 2**20
                t = proc.cpu_times()
            except psutil.Error:  # exited between listing and reading
                continue
            tree += rss
            self.cpu[proc.pid] = t.user + t.system
            if proc.pid == self.me.pid:
                self.peak_me = max(self.peak_me, rss)
            else:
                self.peak_child = max(self.peak_child, rss)
        self.peak_tree = max(self.peak_tree, tree)

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self._sample()

    def result(self) -> dict:
        self.stop.set()
        self.thread.join()
        self._sample()
        # ru_maxrss is exact for this process and the children already reaped; sampling covers the rest.
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "driver_mib": max(self.peak_me, me.ru_maxrss / 1024),
            "children_max_mib": max(self.peak_child, kids.ru_maxrss / 1024),
            "tree_mib": self.peak_tree,
            "cpu_s": sum(self.cpu.values()),
            "cpu_driver_s": self.cpu.get(self.me.pid, 0.0),
        }


def run_hand(args, work: Path, src: Path) -> dict:
    """The hand-written loop (see the module doc)."""
    from collections import defaultdict

    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter

    from persongen_jax.data.build.common import Item, read_bytes, sha256_bytes
    from persongen_jax.data.build.crop import crop_face
    from persongen_jax.data.build.decode import decode_rgb
    from persongen_jax.data.build.detect import align, detect_faces, large_faces
    from persongen_jax.data.build.faces import detector_session_options
    from persongen_jax.data.build.verify import verify_person
    from persongen_jax.data.build.write import record_header
    from persongen_jax.data.format import encode_record
    from persongen_jax.evaluation.face_sim import FaceSimScorer

    monitor = TreeMonitor()
    t_start = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="hand-", dir=work))
    s = _settings(work, src, out, args)
    scorer = FaceSimScorer.from_pretrained(
        s.detector,
        s.arcface,
        det_size=(s.det_size,) * 2,
        det_thresh=s.det_thresh,
        batch_size=s.embed_batch_size,
        session_options=detector_session_options(s.detector_threads),
    )
    times, items, n_images = defaultdict(float), [], 0
    # pass 1: read + decode + size filter, detect + align, for every image
    for f in sorted((src / "persons").glob("*/*")):
        n_images += 1
        t0 = time.perf_counter()
        data = read_bytes(str(f), s.max_file_bytes)
        it = Item(
            image=f"persons/{f.parent.name}/{f.name}", person_id=f.parent.name, path=str(f), sha256=sha256_bytes(data)
        )
        rgb = decode_rgb(data, s.min_side)
        it.height, it.width = rgb.shape[:2]
        t1 = time.perf_counter()
        it.faces = large_faces(detect_faces(scorer.detector, rgb), it.width, it.height, s.min_face)
        if it.faces:
            it.crops = align(rgb, it.faces, scorer.crop_size)
            items.append(it)
        times["decode"] += t1 - t0
        times["detect"] += time.perf_counter() - t1
    # embed every face, in the pipeline's batch size
    t0 = time.perf_counter()
    emb = scorer.embed_crops(np.concatenate([it.crops for it in items]))
    for it, e in zip(items, np.split(emb, np.cumsum([len(it.faces) for it in items])[:-1])):
        it.embeddings, it.crops = e, None
    times["embed"] += time.perf_counter() - t0
    # verify per person
    t0 = time.perf_counter()
    by_person = defaultdict(list)
    for it in items:
        by_person[it.person_id].append(it)
    verified = [v for group in by_person.values() for v in verify_person(group, s)[0]]
    times["verify"] += time.perf_counter() - t0
    # pass 2: reread + decode, crop + resize + JPEG, encode the record, write
    writer = ArrayRecordWriter(str(out / "data-00000-of-00001.array_record"), "group_size:1")
    for it in verified:
        t0 = time.perf_counter()
        rgb = decode_rgb(read_bytes(it.path, s.max_file_bytes))
        it.jpeg, it.mask, it.face, it.crop_box = crop_face(
            rgb, it.face, s.resolution, s.crop_scale, s.face_mask, s.jpeg_quality
        )
        t1 = time.perf_counter()
        writer.write(encode_record(record_header(it, s), it.jpeg, it.mask))
        times["crop"] += t1 - t0
        times["write"] += time.perf_counter() - t1
    n_records = len(verified)
    writer.close()
    wall = time.perf_counter() - t_start
    shutil.rmtree(out, ignore_errors=True)
    return dict(
        side="hand loop", images=n_images, records=n_records, wall_s=wall, stage_s=dict(times), **monitor.result()
    )


def run_beam(args, work: Path, src: Path, mode: str, workers: int, empty: bool = False) -> dict:
    """The build's CPU stages on Beam; `empty`: Beam's own cost -- the same graph shape (list + reshuffle,
    group by person, ArrayRecord sink) with no stage work (each record holds only the person id)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    import persongen_jax.data.build  # noqa: F401  (quiets Beam's import warning)
    from persongen_jax.data.build.pipeline import _counters, face_stages
    from persongen_jax.data.build.source import ListImages
    from persongen_jax.data.build.write import WriteRecords, persons_of_shards, shard_names

    monitor = TreeMonitor()
    t_start = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="beam-", dir=work))
    # As build_dataset: the stage caches in DST/_work, the shards in another folder (the sink lists the
    # shard folder recursively when it finalizes: it must not hold the caches' thousands of files).
    dst, shards = out / "dst", out / "shards"
    s = _settings(work, src, dst, args)
    opts = ["--runner=DirectRunner", f"--direct_running_mode={mode}", f"--direct_num_workers={workers}"]
    p = beam.Pipeline(options=PipelineOptions(opts))
    if empty:
        from array_record.beam.arrayrecordio import WriteToArrayRecord

        from persongen_jax.data import format as fmt

        names = (
            p
            | "List" >> ListImages(s.src)
            | "ByPerson" >> beam.Map(lambda it: (it.person_id, it))
            | "GroupByPerson" >> beam.GroupByKey()
            | "Records"
            >> beam.FlatMap(lambda kv: [fmt.encode_record(dict(person_id=it.person_id), b"", b"") for it in kv[1]])
        )
        _ = names | "Write" >> WriteToArrayRecord(str(shards / "data"), file_name_suffix=".array_record")
    else:
        crops, _ = face_stages(p, s)
        _ = crops | "Write" >> WriteRecords(str(shards), s)
    result = p.run()
    result.wait_until_finish()
    wall = time.perf_counter() - t_start
    counters = _counters(result)
    _, n_records = persons_of_shards(shards, shard_names(shards))
    shutil.rmtree(out, ignore_errors=True)
    stage_s = {k[:-3]: v / 1e6 for k, v in counters.items() if k.endswith("_us")}
    rejected = sum(v for k, v in counters.items() if k.endswith("_rejected"))
    side = (
        f"Beam DirectRunner {mode}"
        + (f" x{workers}" if mode == "multi_processing" else "")
        + (", no stage work" if empty else "")
    )
    return dict(
        side=side, images=n_records + rejected, records=n_records, wall_s=wall, stage_s=stage_s, **monitor.result()
    )


def child(args) -> None:
    work = Path(args.work)
    src = work / f"src_{args.n}_{args.size[0]}x{args.size[1]}"
    if args.child == "prepare":
        prepare(args, work, [int(n) for n in args.counts.split(",")])
        res = {}
    elif args.child == "hand":
        res = run_hand(args, work, src)
    else:
        res = run_beam(args, work, src, args.mode, args.workers, empty=args.child == "empty")
    print(json.dumps(res))


def _argv(args, **kw) -> list[str]:
    base = [
        __file__,
        "--work",
        str(args.work),
        "--arcface",
        args.arcface,
        "--size",
        f"{args.size[0]}x{args.size[1]}",
        "--resolution",
        str(args.resolution),
        "--detector-threads",
        str(args.detector_threads),
    ]
    for k, v in kw.items():
        base += [f"--{k.replace('_', '-')}", str(v)]
    return base


def _line(r: dict) -> str:
    if r["records"] != r["images"]:
        raise SystemExit(
            f"{r['side']}: {r['images'] - r['records']} of {r['images']} images rejected; the benchmark "
            "source should pass every stage"
        )
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_s"].items())
    return (
        f"{r['side']:<40} {r['images']:>5} images {r['wall_s']:7.1f} s  {r['images'] / r['wall_s']:6.2f} img/s   "
        f"CPU {r['cpu_s']:.1f} s ({r['cpu_driver_s']:.1f} s driver), peak RSS: driver {r['driver_mib']:.0f} MiB, "
        f"largest worker {r['children_max_mib']:.0f} MiB, all processes {r['tree_mib']:.0f} MiB\n"
        f"{'':<40} stage seconds: {stages}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400, help="images in the comparison (multiple of 10)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="hand/Beam pairs, in alternating order")
    p.add_argument(
        "--detector-threads",
        type=int,
        default=1,
        help="onnxruntime threads of the detector, both sides (0: one per core)",
    )
    p.add_argument("--arcface", choices=("tiny", "r50"), default="tiny")
    p.add_argument(
        "--size",
        type=lambda v: tuple(int(x) for x in v.split("x")),
        default=(960, 1080),
        help="source image WxH (default 960x1080)",
    )
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--memory", help="comma-separated image counts: peak RSS of the Beam side per count")
    p.add_argument("--memory-mode", default="in_memory", choices=("in_memory", "multi_processing"))
    p.add_argument("--work", help="folder for models and sources (kept between runs); default: a temp folder")
    p.add_argument(
        "--empty",
        action="store_true",
        help="Beam's own cost: the same pipeline shape (list, group by person, write) without stage work",
    )
    p.add_argument("--child", choices=("prepare", "hand", "beam", "empty"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--counts", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    tmp = None
    if not args.work:
        tmp = args.work = tempfile.mkdtemp(prefix="bench-build-")
    counts = [int(n) for n in args.memory.split(",")] if args.memory else [args.images]
    print(
        f"machine: {common.machine()}; ArcFace {args.arcface}; images {args.size[0]}x{args.size[1]} -> crops "
        f"{args.resolution}; detector threads {args.detector_threads or 'per core'}; work {args.work}"
    )
    common.run_child(_argv(args, child="prepare", n=0, counts=",".join(map(str, counts))))
    if args.empty:
        print(
            _line(
                common.run_child(
                    _argv(args, child="empty", n=args.images, mode="multi_processing", workers=args.workers)
                )
            )
        )
    elif args.memory:
        rows = [
            common.run_child(_argv(args, child="beam", n=n, mode=args.memory_mode, workers=args.workers))
            for n in counts
        ]
        for r in rows:
            print(_line(r))
        key = "driver_mib" if args.memory_mode == "in_memory" else "tree_mib"
        print(
            f"peak RSS {counts[-1]} vs {counts[0]} images ({args.memory_mode}, {key}): "
            f"{rows[-1][key]:.0f} / {rows[0][key]:.0f} MiB = {rows[-1][key] / rows[0][key]:.2f}x"
        )
    else:
        hands, beams = [], []
        for r in range(args.repeats):  # alternate the order: a neighbour's load then hits both sides alike
            for side in ("hand", "beam") if r % 2 == 0 else ("beam", "hand"):
                load = os.getloadavg()[0]
                if side == "hand":
                    res = common.run_child(_argv(args, child="hand", n=args.images))
                    hands.append(res)
                else:
                    res = common.run_child(
                        _argv(args, child="beam", n=args.images, mode="multi_processing", workers=args.workers)
                    )
                    beams.append(res)
                print(_line(res) + f"\n{'':<40} load average at start {load:.1f}")
        for h, b in zip(hands, beams):
            print(
                f"ratio (Beam img/s / hand-loop img/s): {h['wall_s'] / b['wall_s']:.2f}x; CPU seconds per image: "
                f"hand loop {h['cpu_s'] / h['images']:.3f}, Beam {b['cpu_s'] / b['images']:.3f}"
            )
        if args.repeats > 1:
            best_h, best_b = min(h["wall_s"] for h in hands), min(b["wall_s"] for b in beams)
            print(
                f"best of {args.repeats}: hand loop {best_h:.1f} s, Beam {best_b:.1f} s, ratio {best_h / best_b:.2f}x"
            )
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
