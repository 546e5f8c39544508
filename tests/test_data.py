"""Dataset format, grain pipeline and demo dataset (persongen_jax.data)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from persongen_jax.data import format as fmt
from persongen_jax.data import pipeline as dp
from persongen_jax.data.make_demo import make_demo
from tests.helpers import add_damaged_record

PERSONS, IMAGES = 6, 4
R, S, K = 32, 32, 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(
        tmp_path_factory.mktemp("demo"),
        persons=PERSONS,
        images_per_person=IMAGES,
        resolution=48,
        seed=0,
        progress=False,
    )


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from persongen_jax.pipeline.prompt import load_tokenizers
    from persongen_jax.testing.tiny_sdxl import write_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d / "tokenizer")
    write_tiny_tokenizer(d / "tokenizer_2", pad_token="!")
    return load_tokenizers(d)


def _iterator(data_dir, tokenizers, **kw):
    args = dict(
        tokenizers=tokenizers,
        global_batch_size=4,
        resolution=R,
        num_refs=(1, K),
        id_image_size=S,
        seed=0,
        shard_index=0,
        shard_count=1,
    )
    return dp.make_train_iterator(data_dir, **{**args, **kw})


def test_make_demo_and_round_trip(demo):
    index = fmt.load_index(demo)
    assert index["num_records"] == PERSONS * IMAGES and index["bad"] == []
    assert len(index["persons"]) == PERSONS and all(len(v) == IMAGES for v in index["persons"].values())
    assert len(index["shards"]) == 2
    lines = [json.loads(x) for x in (demo / "raw" / "captions.jsonl").read_text().splitlines()]
    by_image = {x["image"]: x for x in lines}
    records = fmt.read_records(demo)
    assert len(records) == len(lines)
    for i, (header, image, mask) in enumerate(records):
        src = by_image[header["image"]]
        assert i in index["persons"][header["person_id"]]
        assert header["caption"] == src["caption"]
        assert header["caption_bg"] == src["caption_bg"] and header["caption_body"] == src["caption_body"]
        assert header["face_box"] == [float(v) for v in src["face_box"]]
        assert image == (demo / "raw" / header["image"]).read_bytes()  # stored as is, no re-encoding
        assert mask == b"" and Image.open(io.BytesIO(image)).size == (48, 48)


def test_batch_shapes_and_sampling(demo, tokenizers):
    info = dp.dataset_info(demo)
    batch = next(_iterator(demo, tokenizers))
    B = 4
    expect = dict(
        pixel_values=((B, R, R, 3), np.float32),
        face_mask=((B, R, R, 1), np.float32),
        id_pixel_values=((B, K, S, S, 3), np.float32),
        num_id_images=((B,), np.int32),
        original_size=((B, 2), np.int32),
        crop_top_left=((B, 2), np.int32),
        has_bg=((B,), np.bool_),
        has_body=((B,), np.bool_),
        class_tokens_mask=((B, 77), np.bool_),
    )
    for k in (
        "ids_1",
        "ids_2",
        "text_only_ids_1",
        "text_only_ids_2",
        "bg_ids_1",
        "bg_ids_2",
        "body_ids_1",
        "body_ids_2",
    ):
        expect[k] = ((B, 77), np.int32)
    assert set(dp.BATCH_KEYS) <= set(batch)
    for k, (shape, dtype) in expect.items():
        assert batch[k].shape == shape and batch[k].dtype == dtype, (k, batch[k].shape, batch[k].dtype)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert set(np.unique(batch["face_mask"])) <= {0.0, 1.0} and batch["face_mask"].sum() > 0
    man = tokenizers[0].convert_tokens_to_ids("man</w>")
    empty = dp.tokenize(tokenizers[0], "")[0]
    for b in range(B):
        n = int(batch["num_id_images"][b])
        t = int(batch["record_index"][b])
        refs = batch["ref_record_indices"][b]
        assert 1 <= n <= K and (refs[:n] >= 0).all() and (refs[n:] == -1).all()
        # references: other images of the same person
        assert t not in refs[:n] and {info.person_of[r] for r in refs[:n]} == {info.person_of[t]}
        assert (np.abs(batch["id_pixel_values"][b, :n]).sum(axis=(1, 2, 3)) > 0).all()
        assert (batch["id_pixel_values"][b, n:] == 0).all()
        # class token repeated n times, right where the mask says
        pos = np.flatnonzero(batch["class_tokens_mask"][b])
        assert len(pos) == n and (np.diff(pos) == 1).all()
        assert len(set(batch["ids_1"][b, pos].tolist())) == 1
        cls = batch["ids_1"][b, pos[0]]
        assert batch["ids_1"][b, pos[0] - 1] == tokenizers[0].convert_tokens_to_ids("a</w>")
        if cls == man:
            assert (batch["text_only_ids_1"][b] == man).sum() == 1
        # the face mask lies inside the image and is a box (row/col products)
        m = batch["face_mask"][b, ..., 0]
        rows, cols = m.any(1), m.any(0)
        assert (m == np.outer(rows, cols)).all()
        assert batch["has_bg"][b] == (batch["bg_ids_1"][b] != empty).any()
        assert batch["has_body"][b] == (batch["body_ids_1"][b] != empty).any()


def test_face_box_inside_crop(demo, tokenizers):
    """Every example keeps the whole face box: the mask's box has the area of the original box, scaled."""
    records = fmt.read_records(demo)
    it = _iterator(demo, tokenizers, resolution=48, global_batch_size=8)
    for _ in range(3):
        batch = next(it)
        for b in range(8):
            x0, y0, x1, y1 = records[int(batch["record_index"][b])][0]["face_box"]
            m = batch["face_mask"][b, ..., 0]
            h, w = m.any(1).sum(), m.any(0).sum()
            # crop side <= 48, so the box scales by >= 1: it is never cut
            assert h >= (y1 - y0) and w >= (x1 - x0)


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_deterministic_and_resumable(demo, tokenizers):
    first = _batches(_iterator(demo, tokenizers), 3)
    for x, y in zip(first, _batches(_iterator(demo, tokenizers), 3)):
        _assert_same(x, y)
    other = next(_iterator(demo, tokenizers, seed=1))
    assert not np.array_equal(other["pixel_values"], first[0]["pixel_values"])
    it = _iterator(demo, tokenizers)
    _batches(it, 2)
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip (orbax/grain handler)
    resumed = _iterator(demo, tokenizers)
    resumed.set_state(state)
    _assert_same(next(resumed), first[2])


def test_epochs_cover_every_record(demo, tokenizers):
    n = PERSONS * IMAGES
    it = _iterator(demo, tokenizers, global_batch_size=n // 2)
    seen = np.concatenate([next(it)["record_index"] for _ in range(2)])
    assert sorted(seen.tolist()) == list(range(n))
    nxt = np.concatenate([next(it)["record_index"] for _ in range(2)])
    assert sorted(nxt.tolist()) == list(range(n)) and not np.array_equal(seen, nxt)  # reshuffled


def test_process_sharding(demo, tokenizers):
    whole = _batches(_iterator(demo, tokenizers, global_batch_size=4), 2)
    shards = [
        _batches(_iterator(demo, tokenizers, global_batch_size=4, shard_index=p, shard_count=2), 2) for p in range(2)
    ]
    for step in range(2):
        assert shards[0][step]["pixel_values"].shape[0] == 2
        assert not set(shards[0][step]["record_index"]) & set(shards[1][step]["record_index"])
        joined = {k: np.concatenate([shards[0][step][k], shards[1][step][k]]) for k in whole[step]}
        _assert_same(joined, whole[step])
    with pytest.raises(ValueError, match="not divisible"):
        _iterator(demo, tokenizers, global_batch_size=3, shard_count=2)


def test_bad_records_reported(tmp_path, tokenizers):
    data = make_demo(tmp_path / "bad", persons=3, images_per_person=3, resolution=32, corrupt=True, progress=False)
    report = dp.bad_records_report(data)
    assert len(report) == 2
    assert "persons/p000/corrupt.jpg (cannot decode image)" in str(report)
    assert "persons/p000/nocaption.jpg (missing caption)" in str(report)
    # A record that passed the writer but fails in the pipeline (damaged shard): skipped, counted, named.
    damaged = add_damaged_record(data, "p001", "persons/p001/damaged.jpg")
    it = _iterator(data, tokenizers, global_batch_size=5)
    batches = _batches(it, 4)  # two epochs: the damaged record comes up (twice) and is replaced
    assert all(b["pixel_values"].shape == (5, R, R, 3) for b in batches)
    seen = np.concatenate([b["record_index"] for b in batches])
    refs = np.concatenate([b["ref_record_indices"].ravel() for b in batches])
    assert damaged not in seen and damaged not in refs
    report = str(dp.bad_records_report(data))
    assert report.startswith("3 bad records:")
    assert "persons/p001/damaged.jpg (cannot decode image" in report


def test_cli(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "persongen_jax.data.make_demo",
            str(tmp_path / "d"),
            "--persons",
            "2",
            "--images-per-person",
            "2",
            "--resolution",
            "32",
            "--corrupt",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "4 records of 2 persons; 2 bad input(s)" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "persongen_jax.data.format",
            str(tmp_path / "d" / "raw"),
            str(tmp_path / "d" / "raw" / "captions.jsonl"),
            str(tmp_path / "e"),
            "--num-shards",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "4 records of 2 persons in 3 shard(s)" in out.stdout and "missing caption" in out.stdout


def test_single_image_person_uses_own_face(tmp_path, tokenizers):
    data = make_demo(tmp_path / "one", persons=2, images_per_person=1, resolution=32, progress=False)
    batch = next(_iterator(data, tokenizers, global_batch_size=2, num_refs=4))
    assert (batch["num_id_images"] == 1).all()
    np.testing.assert_array_equal(batch["ref_record_indices"][:, 0], batch["record_index"])


def test_worker_processes_give_the_same_data(demo, tokenizers):
    plain = _iterator(demo, tokenizers)
    expect = _batches(plain, 3)
    assert plain.get_state() == {"next_index": 3}  # element i of the stream is global step i
    it = _iterator(demo, tokenizers, worker_count=2)
    got = _batches(it, 2)
    state = it.get_state()
    got.append(next(it))
    for x, y in zip(expect, got):
        _assert_same(x, y)
    resumed = _iterator(demo, tokenizers, worker_count=2)
    resumed.set_state(state)
    _assert_same(next(resumed), expect[2])


def test_face_mask_file(tmp_path, tokenizers):
    """A `face_mask` image is stored with the record and transformed like the image."""
    src = tmp_path / "src"
    (src / "persons" / "a").mkdir(parents=True)
    (src / "masks").mkdir()
    lines = []
    for k in range(2):
        Image.new("RGB", (40, 30), (k * 50, 80, 120)).save(src / "persons" / "a" / f"{k}.png")
        m = np.zeros((30, 40), np.uint8)
        m[5:20, 10:25] = 255
        Image.fromarray(m).save(src / "masks" / f"{k}.png")
        lines.append(
            dict(
                image=f"persons/a/{k}.png",
                caption="a photo of a woman img",
                face_box=[10, 5, 25, 20],
                face_mask=f"masks/{k}.png",
            )
        )
    (src / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    index = fmt.write_dataset(src, src / "c.jsonl", tmp_path / "dst", progress=False)
    assert index["num_records"] == 2 and index["bad"] == []
    header, image, mask = fmt.read_records(tmp_path / "dst")[0]
    assert mask == (src / "masks" / "0.png").read_bytes() and header["caption_bg"] is None
    batch = next(_iterator(tmp_path / "dst", tokenizers, global_batch_size=2, resolution=30))
    assert batch["original_size"].tolist() == [[30, 40], [30, 40]]
    m = batch["face_mask"][..., 0]
    assert set(np.unique(m)) == {0.0, 1.0} and (m.sum(axis=(1, 2)) >= 15 * 15).all()
    assert not batch["has_bg"].any() and not batch["has_body"].any()


# ----------------------------------------------------------------------------- reliability


def _png(path, color, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _src(root, persons=("p0", "p1"), images=2, seed=0):
    """SRC/persons/<p>/<k>.png (distinct colours per seed) + a captions JSONL of good lines."""
    lines = []
    for i, p in enumerate(persons):
        for k in range(images):
            _png(root / "persons" / p / f"{k}.png", (seed * 40 % 256, 20 + 60 * i, 30 * k))
            lines.append(dict(image=f"persons/{p}/{k}.png", caption="a photo of a man img", face_box=[2, 2, 12, 12]))
    return lines


def _write_lines(path, lines):
    with open(path, "wb") as f:
        for x in lines:
            f.write(x if isinstance(x, bytes) else json.dumps(x).encode())
            f.write(b"\n")
    return path


def _bad(index):
    return {b["image"]: b["reason"] for b in index["bad"]}


def test_paths_stay_inside_src_and_reads_are_limited(tmp_path):
    """`..`, absolute and symlinked paths out of SRC, `/dev/zero` and an oversized file are listed
    as bad (nothing outside SRC stored); `p0/../p0/1.png` is the image `p0/1.png` once (duplicate listed)."""

    src = tmp_path / "src"
    lines = _src(src, persons=("p0", "p1", "p2"), images=3)
    secret = _png(tmp_path / "secret.png", (255, 0, 255))
    (src / "persons" / "p1" / "link.png").symlink_to(secret)
    (src / "masks").mkdir()
    (src / "masks" / "huge.png").write_bytes(b"\0" * 5000)
    box = [2, 2, 12, 12]
    lines += [
        dict(image="persons/p1/../../../secret.png", caption="a photo of a man img", face_box=box),
        dict(image="persons/p1/link.png", caption="a photo of a man img", face_box=box),
        dict(image="persons/p2/../p2/1.png", caption="a photo of a man img", face_box=box),
    ]
    lines[0]["face_mask"] = "../secret.png"
    lines[1]["face_mask"] = str(secret)
    lines[3]["face_mask"] = "/dev/zero"
    lines[4]["face_mask"] = "masks/huge.png"
    _write_lines(src / "c.jsonl", lines)
    index = fmt.write_dataset(src, src / "c.jsonl", tmp_path / "dst", progress=False, max_file_bytes=4096)
    bad = _bad(index)
    assert "points outside SRC" in bad["persons/p1/../../../secret.png"]
    assert "resolves outside SRC" in bad["persons/p1/link.png"]
    assert "points outside SRC" in bad["persons/p0/0.png"] and "absolute path" in bad["persons/p0/1.png"]
    assert "absolute path" in bad["persons/p1/0.png"] and "4096-byte limit" in bad["persons/p1/1.png"]
    assert "duplicate caption line" in bad["persons/p2/1.png"]
    records = fmt.read_records(tmp_path / "dst")
    assert [h["image"] for h, _, _ in records] == [
        "persons/p0/2.png",
        "persons/p1/2.png",
        "persons/p2/0.png",
        "persons/p2/1.png",
        "persons/p2/2.png",
    ]
    assert index["persons"] == {"p0": [0], "p1": [1], "p2": [2, 3, 4]}
    assert all(img == (src / h["image"]).read_bytes() and mask == b"" for h, img, mask in records)


def test_jsonl_field_types_encodings_and_nan_boxes(tmp_path):
    """Defects 10 + 11: `caption_bg: 5`, `image: null`, non-UTF-8 bytes and a NaN face box make their line
    bad (listed with the reason); the run goes on and writes the good lines."""
    src = tmp_path / "src"
    lines = _src(src, persons=("p0", "p1", "p2"))
    lines[1]["caption_bg"] = 5
    lines[2] = dict(lines[2], image=None)
    lines[3] = json.dumps(dict(lines[3], caption="a photo of a man img \xe9"), ensure_ascii=False).encode("latin-1")
    lines[4]["face_box"] = [float("nan"), 0, 10, 10]
    _write_lines(src / "c.jsonl", lines)
    index = fmt.write_dataset(src, src / "c.jsonl", tmp_path / "dst", progress=False)
    bad = _bad(index)
    assert "caption_bg must be a string" in bad["persons/p0/1.png"]
    assert "string 'image'" in bad[f"{src / 'c.jsonl'}:3"] and "not UTF-8" in bad[f"{src / 'c.jsonl'}:4"]
    assert "non-finite" in bad["persons/p2/0.png"]
    # the files of lines 3 and 4 have no usable line: listed as missing caption
    assert bad["persons/p1/0.png"] == bad["persons/p1/1.png"] == "missing caption"
    assert index["num_records"] == 2 and [h["image"] for h, _, _ in fmt.read_records(tmp_path / "dst")] == [
        "persons/p0/0.png",
        "persons/p2/1.png",
    ]


def test_fuzz_captions_jsonl(tmp_path):
    """Random malformed JSONL lines (types, encodings, paths): the writer finishes, every bad line is listed,
    and no file outside SRC is opened (an audit hook watches every open() of the process)."""
    import os
    import random
    import sys

    rng = random.Random(0)
    src = tmp_path / "src"
    outside = _png(tmp_path / "outside" / "secret.png", (1, 2, 3))
    n_lines = 160
    for i in range(n_lines):
        _png(src / "persons" / f"p{i % 7}" / f"{i}.png", (i % 256, 7, 9))
    (src / "persons" / "p0" / "evil.png").symlink_to(outside)
    os.mkfifo(src / "persons" / "p1" / "fifo.png")
    junk = [5, -1.5, None, True, [], {}, [1, 2], "x" * 300, float("nan"), "\u202e", {"a": 1}]
    paths = [
        "../outside/secret.png",
        str(outside),
        "/dev/zero",
        "persons/p0/evil.png",
        "persons/p1/fifo.png",
        "persons/../../outside/secret.png",
        "",
        ".",
        "persons/p0/\x00.png",
        "persons/p0/nope.png",
        "persons//p0/./0.png",
    ]
    # must_bad: lines no reading of the format accepts; good: lines that must become records.
    good, must_bad, lines = set(), set(), []
    for i in range(n_lines):
        rel = f"persons/p{i % 7}/{i}.png"
        line = dict(image=rel, caption="a photo of a man img", caption_bg="mountains", face_box=[1, 1, 15, 15])
        kind = rng.randrange(8) if i else 0
        if kind == 0:
            good.add(rel)
        elif kind == 1:
            key, value = (
                rng.choice(["caption", "caption_bg", "caption_body", "face_box", "face_mask"]),
                rng.choice(junk),
            )
            line[key] = value
            if (
                key in ("caption", "face_box", "face_mask")
                and value is not None
                or not isinstance(value, (str, type(None)))
            ):
                must_bad.add(i + 1)
        elif kind == 2:
            line["image"] = rng.choice(junk + paths)
            if line["image"] != "persons//p0/./0.png":  # a second spelling of line 1's image: a duplicate
                must_bad.add(i + 1)
        elif kind == 3:
            line["face_mask"] = rng.choice(paths)
            if line["face_mask"] not in ("", "persons//p0/./0.png"):  # "": no mask; the other: a real image
                must_bad.add(i + 1)
        elif kind == 4:
            raw = json.dumps(line).encode()
            cut = rng.randrange(1, len(raw))
            line = raw[:cut] + bytes([rng.choice([0x80, 0xFF, 0xC3, 0xFE])]) + raw[cut:]
            must_bad.add(i + 1)
        elif kind == 5:
            line = rng.choice([b"{not json", b"[1, 2, 3]", b"42", b"null", b'"persons/p0/0.png"', b"\xef\xbb\xbf{}"])
            must_bad.add(i + 1)
        elif kind == 6:
            line["face_box"] = rng.choice(
                [
                    [0, 0, 0, 0],
                    [1, 2, 3],
                    ["1", 2, 3, 4],
                    [float("inf"), 0, 9, 9],
                    [-5, -5, -1, -1],
                    "1 2 3 4",
                    [True, 1, 9, 9],
                ]
            )
            must_bad.add(i + 1)
        else:
            line["caption"] = rng.choice(["a photo of a man", "img img", "   ", "a man img"])
            if line["caption"] == "a man img":
                good.add(rel)
            else:
                must_bad.add(i + 1)
        lines.append(line)
    lines.append({"image": "persons/p0/0.png", "caption": "a photo of a man img", "face_box": [1, 1, 15, 15]})
    must_bad.add(len(lines))
    _write_lines(src / "c.jsonl", lines)
    cap = str(src / "c.jsonl")

    opened = []
    watch = [os.path.realpath(tmp_path / "outside"), "/dev/zero"]

    def hook(event, args):
        if event == "open" and watching and isinstance(args[0], (str, bytes, os.PathLike)):
            real = os.path.realpath(os.fsdecode(args[0]))
            if any(real == w or real.startswith(w + os.sep) for w in watch):
                opened.append(real)

    watching = False
    sys.addaudithook(lambda e, a: hook(e, a))
    watching = True
    try:
        index = fmt.write_dataset(src, cap, tmp_path / "dst", progress=False)
    finally:
        watching = False
    assert opened == [], opened
    records = fmt.read_records(tmp_path / "dst")
    assert all(img == (src / h["image"]).read_bytes() for h, img, _ in records)
    stored = {h["image"] for h, _, _ in records}
    assert good <= stored and len(good) > 10, (sorted(good - stored), len(good))
    bad = _bad(index)
    listed = " ".join(list(bad) + list(bad.values()))
    for n, line in enumerate(lines, 1):
        rel = line.get("image") if isinstance(line, dict) else None
        named = f"{cap}:{n}" in listed or (isinstance(rel, str) and rel in bad)
        assert named if n in must_bad else (named or rel in stored or rel == "persons//p0/./0.png"), (n, line)
    files = {p.relative_to(src).as_posix() for p in (src / "persons").glob("*/*")}
    assert files <= stored | set(bad), sorted(files - stored - set(bad))


_KILL_AT_INDEX = """
import os, pathlib, signal, sys
from persongen_jax.data import format as fmt
write_text = pathlib.Path.write_text
def die_at_index(self, *a, **k):  # kill -9 once the shards are written, before index.json
    if self.name == "index.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return write_text(self, *a, **k)
pathlib.Path.write_text = die_at_index
fmt.write_dataset(sys.argv[1], sys.argv[2], sys.argv[3], num_shards=2, progress=False)
"""


def test_dataset_rewrite_killed_keeps_the_old_dataset(tmp_path):
    """A rewrite of DST killed (SIGKILL) after its shards are written leaves the old dataset whole
    (on main: the old index over the new shards, read without complaint); the next write removes the
    killed run's temp folder and says so; DST holding SRC or foreign files is refused."""
    import os
    import signal

    a, b = tmp_path / "a", tmp_path / "b"
    _write_lines(a / "c.jsonl", _src(a, persons=("p0", "p1", "p2"), images=2, seed=1))
    _write_lines(b / "c.jsonl", _src(b, persons=("q0", "q1", "q2"), images=2, seed=2))
    dst = tmp_path / "dst"
    fmt.write_dataset(a, a / "c.jsonl", dst, num_shards=2, progress=False)
    before = fmt.read_records(dst)
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT_INDEX, str(b), str(b / "c.jsonl"), str(dst)], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    after = fmt.read_records(dst)
    assert [h for h, _, _ in after] == [h for h, _, _ in before]  # still dataset a, every record
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".dst.tmp-")]
    assert len(stale) == 1 and len(list(stale[0].glob("*.array_record"))) == 2
    proc = subprocess.run(
        [sys.executable, "-m", "persongen_jax.data.format", str(b), str(b / "c.jsonl"), str(dst)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removed" in proc.stderr and stale[0].name in proc.stderr
    assert not stale[0].exists() and {h["person_id"] for h, _, _ in fmt.read_records(dst)} == {"q0", "q1", "q2"}
    # Never replaced: a DST that holds SRC, or a folder this writer did not make.
    with pytest.raises(ValueError, match="holds the source folder"):
        fmt.write_dataset(a, a / "c.jsonl", tmp_path, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a dataset written by this tool.*notes.txt"):
        fmt.write_dataset(a, a / "c.jsonl", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_reader_refuses_an_index_of_other_shards(tmp_path, tokenizers, caplog):
    """An index.json over shards it did not describe (same record counts, other persons), a truncated
    shard, a missing shard: every reader (read_records, the training pipeline) refuses, naming the shard.
    A version-1 index is still read, with a warning that it is unverified."""
    import logging

    a, b = tmp_path / "a", tmp_path / "b"
    _write_lines(a / "c.jsonl", _src(a, persons=("p0", "p1", "p2"), images=2, seed=1))
    _write_lines(b / "c.jsonl", _src(b, persons=("q0", "q1", "q2"), images=2, seed=2))
    fmt.write_dataset(a, a / "c.jsonl", tmp_path / "da", num_shards=2, progress=False)
    fmt.write_dataset(b, b / "c.jsonl", tmp_path / "db", num_shards=2, progress=False)
    mixed = tmp_path / "db"
    (mixed / "index.json").write_bytes((tmp_path / "da" / "index.json").read_bytes())
    shard = mixed / "data-00000-of-00002.array_record"
    with pytest.raises(ValueError, match=f"{shard}: sha256 .*content changed after the index was written"):
        fmt.read_records(mixed)
    with pytest.raises(ValueError, match="data-00000-of-00002.array_record"):
        _iterator(mixed, tokenizers)
    good = tmp_path / "da"
    index = json.loads((good / "index.json").read_text())
    data = (good / "data-00001-of-00002.array_record").read_bytes()
    (good / "data-00001-of-00002.array_record").write_bytes(data[:-7])
    with pytest.raises(ValueError, match="data-00001-of-00002.array_record: .* bytes, .* says"):
        fmt.read_records(good)
    (good / "data-00001-of-00002.array_record").unlink()
    with pytest.raises(ValueError, match="data-00001-of-00002.array_record: shard listed in .* is missing"):
        fmt.read_records(good)
    (good / "data-00001-of-00002.array_record").write_bytes(data)
    v1 = dict(index, version=1, shards=[{"path": s["path"], "num_records": s["num_records"]} for s in index["shards"]])
    (good / "index.json").write_text(json.dumps(v1))
    with caplog.at_level(logging.WARNING):
        assert len(fmt.read_records(good)) == 6
    assert any("version-1 index" in r.getMessage() and "unverified" in r.getMessage() for r in caplog.records)
