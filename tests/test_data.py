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

PERSONS, IMAGES = 6, 4
R, S, K = 32, 32, 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), persons=PERSONS, images_per_person=IMAGES, resolution=48,
                     seed=0, progress=False)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from persongen_jax.pipeline.prompt import load_tokenizers
    from persongen_jax.testing.tiny_sdxl import write_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d / "tokenizer")
    write_tiny_tokenizer(d / "tokenizer_2", pad_token="!")
    return load_tokenizers(d)


def _iterator(data_dir, tokenizers, **kw):
    args = dict(tokenizers=tokenizers, global_batch_size=4, resolution=R, num_refs=(1, K), id_image_size=S,
                seed=0, shard_index=0, shard_count=1)
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
    expect = dict(pixel_values=((B, R, R, 3), np.float32), face_mask=((B, R, R, 1), np.float32),
                  id_pixel_values=((B, K, S, S, 3), np.float32), num_id_images=((B,), np.int32),
                  original_size=((B, 2), np.int32), crop_top_left=((B, 2), np.int32),
                  has_bg=((B,), np.bool_), has_body=((B,), np.bool_), class_tokens_mask=((B, 77), np.bool_))
    for k in ("ids_1", "ids_2", "text_only_ids_1", "text_only_ids_2", "bg_ids_1", "bg_ids_2", "body_ids_1",
              "body_ids_2"):
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
    shards = [_batches(_iterator(demo, tokenizers, global_batch_size=4, shard_index=p, shard_count=2), 2)
              for p in range(2)]
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
    index = fmt.load_index(data)
    header = dict(person_id="p001", image="persons/p001/damaged.jpg", caption="a photo of a man img",
                  caption_bg=None, caption_body=None, face_box=[0, 0, 8, 8], width=32, height=32, format="JPEG")
    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(str(data / "extra.array_record"), "group_size:1")
    w.write(fmt.encode_record(header, b"\xff\xd8 truncated"))
    w.close()
    index["shards"].append(dict(path="extra.array_record", num_records=1))
    index["persons"]["p001"].append(index["num_records"])
    index["num_records"] += 1
    (data / "index.json").write_text(json.dumps(index))
    it = _iterator(data, tokenizers, global_batch_size=5)
    batches = _batches(it, 4)  # two epochs: the damaged record comes up (twice) and is replaced
    assert all(b["pixel_values"].shape == (5, R, R, 3) for b in batches)
    seen = np.concatenate([b["record_index"] for b in batches])
    refs = np.concatenate([b["ref_record_indices"].ravel() for b in batches])
    assert index["num_records"] - 1 not in seen and index["num_records"] - 1 not in refs
    report = str(dp.bad_records_report(data))
    assert report.startswith("3 bad records:")
    assert "persons/p001/damaged.jpg (cannot decode image" in report


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "persongen_jax.data.make_demo", str(tmp_path / "d"), "--persons", "2",
                          "--images-per-person", "2", "--resolution", "32", "--corrupt"],
                         capture_output=True, text=True, check=True)
    assert "4 records of 2 persons; 2 bad input(s)" in out.stdout
    out = subprocess.run([sys.executable, "-m", "persongen_jax.data.format", str(tmp_path / "d" / "raw"),
                          str(tmp_path / "d" / "raw" / "captions.jsonl"), str(tmp_path / "e"), "--num-shards", "3"],
                         capture_output=True, text=True, check=True)
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
        lines.append(dict(image=f"persons/a/{k}.png", caption="a photo of a woman img", face_box=[10, 5, 25, 20],
                          face_mask=f"masks/{k}.png"))
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
