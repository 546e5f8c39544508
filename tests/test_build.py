"""Dataset construction on Apache Beam (`python -m persongen_jax.data.build`).

Real code paths on models built here: the key-colour SCRFD-layout detector and a random ArcFace IResNet
(persongen_jax/testing/tiny_build.py, tiny_eval.py), captions from an OpenAI-compatible endpoint on
127.0.0.1 that answers with fixed text (our client and parsing, not a model), and a tiny random
Qwen2.5-VL (transformers backend: gibberish answers, the parse-failure path). One source tree and one
built dataset (the CLI, DirectRunner) are shared by the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam")
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

from persongen_jax.data import format as fmt  # noqa: E402
from persongen_jax.testing.tiny_build import (  # noqa: E402
    BUILD_ARCFACE,
    BUILD_THRESHOLD,
    CaptionServer,
    make_raw_persons,
    mixed_persons,
)
from tests.helpers import cli_env, run_train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


EXPECTED_REJECTS = {
    "persons/p0/small.jpg": ("decode", "image too small"),
    "persons/p0/corrupt.jpg": ("decode", "cannot decode image"),
    "persons/p1/tinyface.jpg": ("detect", "face too small"),
    "persons/p1/noface.jpg": ("detect", "no face"),
    "persons/p3/intruder_0.jpg": ("verify", "not the person's identity"),
    "persons/p3/intruder_1.jpg": ("verify", "not the person's identity"),
    "persons/p4/0.jpg": ("verify", "too few images"),
    "persons/p0/dark.jpg": ("mark", "no class word"),  # the endpoint captions a dark image "a dark photo ..."
}
RECORDS = {
    "p0": ["0.jpg", "1.jpg", "2.jpg", "3.png"],
    "p1": [f"{k}.jpg" for k in range(4)],
    "p2": ["0.jpg", "1.jpg", "2.jpg", "group.jpg"],
    "p3": [f"{k}.jpg" for k in range(4)],
}
RESOLUTION = 128


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from persongen_jax.testing.tiny_build import make_build_inputs

    root = tmp_path_factory.mktemp("build")
    make_build_inputs(root, root / "src")
    return root


def caption_args(endpoint: str) -> list[str]:
    """The build's flags that caption with the test endpoint (OpenAI-compatible, model "tiny-vlm")."""
    return ["--caption-backend", "openai", "--caption-endpoint", endpoint, "--caption-model", "tiny-vlm"]


def build_args(root: Path, dst: Path, endpoint: str, *extra: str) -> list[str]:
    return [
        str(root / "src"),
        str(dst),
        "--detector",
        str(root / "det"),
        "--arcface",
        str(root / "arcface"),
        "--verify-threshold",
        str(BUILD_THRESHOLD),
        "--resolution",
        str(RESOLUTION),
        "--face-mask",
        "ellipse",
        *caption_args(endpoint),
        "--caption-batch-size",
        "2",
        "--caption-concurrency",
        "2",
        "--progress-every",
        "0",
        *extra,
    ]


def run_build(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "persongen_jax.data.build", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.fixture(scope="module")
def built(inputs):
    """The CLI on the synthetic tree (DirectRunner, in-process): (dst, the endpoint's requests, stdout)."""
    dst = inputs / "dataset"
    with CaptionServer() as server:
        proc = run_build(build_args(inputs, dst, server.url))
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        return dst, list(server.requests), out


def _records_by_image(dst) -> dict:
    return {h["image"]: (h, image, mask) for h, image, mask in fmt.read_records(dst)}


def test_every_stage_rejects_exactly_the_expected_images(built):
    dst, requests, out = built
    index = fmt.load_index(dst)
    got = {r["image"]: (r["stage"], r["reason"]) for r in index["rejected"]}
    assert got == EXPECTED_REJECTS, got
    details = {r["image"]: r["detail"] for r in index["rejected"]}
    assert "480 px < min_side 512" in details["persons/p0/small.jpg"]
    assert "< min_face 256" in details["persons/p1/tinyface.jpg"]
    assert f"< {BUILD_THRESHOLD}" in details["persons/p3/intruder_0.jpg"]
    assert "1 image(s) with a face < min_images 2" in details["persons/p4/0.jpg"]
    # undecodable inputs are also "bad", as data.format lists them (training reports them by name)
    assert [b["image"] for b in index["bad"]] == ["persons/p0/corrupt.jpg"]
    # summary: per stage in / kept / rejected by reason, printed and in index.json
    stages = {s["stage"]: s for s in index["summary"]["stages"]}
    assert index["summary"]["images"] == 16 + len(EXPECTED_REJECTS) and index["summary"]["records"] == 16
    assert stages["decode"] == {
        "stage": "decode",
        "in": 24,
        "kept": 22,
        "rejected": {"cannot decode image": 1, "image too small": 1},
    }
    assert stages["verify"]["rejected"] == {"not the person's identity": 2, "too few images": 1}
    assert stages["mark"] == {"stage": "mark", "in": 17, "kept": 16, "rejected": {"no class word": 1}}
    assert "verify        20 in      17 kept   rejected: not the person's identity 2, too few images 1" in out
    # every verified crop was captioned once, every distinct caption split once
    assert index["summary"]["cache"]["caption"] == {"computed": 17, "cached": 0}
    assert sum(r["kind"] == "caption" for r in requests) == 17


def test_index_and_records_match_the_data_format(built):
    dst, _, _ = built
    index = fmt.load_index(dst)
    fmt.check_shards(dst, index)  # what every reader does first
    assert set(index) >= {"version", "num_records", "shards", "persons", "bad", "trigger_word"}
    assert index["version"] == fmt.FORMAT_VERSION and index["num_records"] == 16
    assert index["shards"] == fmt.index_shards(dst, [s["path"] for s in index["shards"]])
    records = fmt.read_records(dst)
    assert {
        p: sorted(records[i][0]["image"].rsplit("/", 1)[1] for i in recs) for p, recs in index["persons"].items()
    } == RECORDS
    assert index["build"]["caption"]["model"] == "tiny-vlm" and index["build"]["verify_threshold"] == BUILD_THRESHOLD
    by_image = _records_by_image(dst)
    import io

    from PIL import Image

    for image, (h, jpeg, mask) in by_image.items():
        assert h["person_id"] == image.split("/")[1] and h["width"] == h["height"] == RESOLUTION
        assert Image.open(io.BytesIO(jpeg)).size == (RESOLUTION, RESOLUTION)
        assert Image.open(io.BytesIO(mask)).size == (RESOLUTION, RESOLUTION)  # --face-mask ellipse
        # PhotoMaker marking: the trigger right after the class word, once
        assert h["caption"].startswith("a photo of a man img wearing a ") and h["caption"].split().count("img") == 1
        assert h["caption_body"] in ("wearing a red suit", "wearing a black suit")
        x0, y0, x1, y1 = h["face_box"]
        assert 0 <= x0 < x1 <= RESOLUTION and 0 <= y0 < y1 <= RESOLUTION and len(h["face_kps"]) == 5
    # the verified face's raw ArcFace embedding (PhotoMaker V2's id_embeds): not normalised, and the person's
    # identity (its direction is within the verify threshold of another image of the person)
    emb = {image: fmt.unpack_float32(h["arcface_embedding"]) for image, (h, _, _) in by_image.items()}
    assert {e.shape for e in emb.values()} == {(BUILD_ARCFACE["num_features"],)}
    unit = {k: e / np.linalg.norm(e) for k, e in emb.items()}
    assert min(abs(np.linalg.norm(e) - 1) for e in emb.values()) > 1e-3
    for image in emb:
        person = image.split("/")[1]
        assert (
            max(float(unit[image] @ unit[o]) for o in emb if o != image and o.split("/")[1] == person)
            >= BUILD_THRESHOLD
        ), image
    assert by_image["persons/p0/1.jpg"][0]["caption_bg"] == "in the mountains"
    assert by_image["persons/p0/0.jpg"][0]["caption_bg"] is None
    # the group photo keeps the person's face (slot A, left), not the larger, more confident stranger
    group = by_image["persons/p2/group.jpg"][0]
    left, top, right, bottom = group["source"]["crop_box"]
    scale = RESOLUTION / (right - left)
    np.testing.assert_allclose(
        group["face_box"],
        [(40 - left) * scale, (80 - top) * scale, (300 - left) * scale, (340 - top) * scale],
        atol=3 * scale + 0.5,
    )


def _train(config: str, wd: Path, *overrides: str) -> tuple[str, list[dict]]:
    """Trains with configs/CONFIG through the CLI (one CPU device) -> (its output, the rows of metrics.jsonl)."""
    proc = run_train(REPO / "configs" / config, wd, *overrides)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr, [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]


def test_training_runs_on_the_built_dataset(built, tmp_path):
    dst, _, _ = built
    out, rows = _train(
        "demo.py",
        tmp_path / "run",
        f"--config.data.dir={dst}",
        "--config.model=micro",
        "--config.data.global_batch_size=2",
        "--config.total_steps=2",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        "--config.progress_bar=False",
    )
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    # The build's rejects are in index.json and its summary: training counts them in one info line and
    # warns only about records that fail while training (none here).
    log = out.splitlines()
    assert not [line for line in log if "bad record" in line and not line.startswith("I")], log[-20:]
    assert any(f"{dst}: 1 input(s) left out when the dataset was written" in line for line in log), log[-20:]
    assert any(line.endswith("end of training (step 2): 0 bad records") for line in log), log[-20:]


def test_photomaker_v2_trains_on_the_built_dataset(built, inputs, tmp_path):
    """configs/photomaker_v2.py:tiny on the built records' stored ArcFace embeddings (the build's ArcFace, so its
    width sizes the tiny V2 encoder): 30 steps through the CLI, the loss falls by more than 3 standard errors."""
    from tests.helpers import assert_loss_falls
    from tests.test_training_v2 import STEPS, TRAIN_ARGS

    dst, _, _ = built
    arcface = f"--config.init.arcface={inputs / 'arcface'}"
    _, rows = _train("photomaker_v2.py:tiny", tmp_path / "run", f"--config.data.dir={dst}", arcface, *TRAIN_ARGS)
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_loss_falls([losses[s] for s in range(1, STEPS + 1)])


def test_sigkill_then_rerun_recomputes_no_cached_caption(built, inputs):
    """SIGKILL mid-captioning: DST has no dataset (complete or absent); the rerun (multi-processing DirectRunner,
    2 workers) asks the endpoint only for crops without a cached caption and writes the same dataset as the
    uninterrupted run."""
    dst_ref, _, _ = built
    dst = inputs / "killed"
    with CaptionServer(delay=0.3) as server:
        proc = run_build(
            build_args(inputs, dst, server.url, "--caption-batch-size", "1", "--caption-concurrency", "1"),
            start_new_session=True,
        )
        captions = dst / "_work" / "captions"
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(list(captions.glob("*/*.json"))) < 5:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the build and any worker it started
        proc.wait()
        proc.stdout.close()
    cached = len(list(captions.glob("*/*.json")))
    assert 5 <= cached < 17
    assert sorted(p.name for p in dst.iterdir()) == ["_work"]  # no index.json, no shards: absent
    with pytest.raises(FileNotFoundError):
        fmt.load_index(dst)
    with CaptionServer() as server:  # the rerun on 2 worker processes: same dataset from the other runner mode
        proc = run_build(
            build_args(
                inputs,
                dst,
                server.url,
                "--detector-threads",
                "1",
                "--",
                "--direct_num_workers=2",
                "--direct_running_mode=multi_processing",
            )
        )
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        assert server.count("caption") == 17 - cached
    index = fmt.load_index(dst)
    assert index["summary"]["cache"]["caption"] == {"computed": 17 - cached, "cached": cached}
    assert not list(inputs.glob(".killed.tmp-*"))  # the killed run's temporary folder was cleaned
    ref = fmt.load_index(dst_ref)
    assert index["rejected"] == ref["rejected"] and index["summary"]["stages"] == ref["summary"]["stages"]
    assert _records_by_image(dst) == _records_by_image(dst_ref)  # same headers, same crop and mask bytes


# The records and the image-level outcomes of the build above, measured on main before the stages returned new
# Items instead of changing theirs (commit 6f3e456; the same on two runs): the refactor changed no byte of the
# dataset. A change of PIL / libjpeg or of XLA's CPU numerics (ArcFace: identity_cos, face_score) changes it.
GOLDEN_DATASET_SHA256 = "c2c3f3d81b4ebcaf2c94a756ffff1fd1dafaf91c9c631d573085eab761a6a5c6"


def dataset_digest(dst) -> str:
    """sha256 over the records (header JSON, image and mask bytes, in image order) and the image-level
    outcomes of index.json (rejects' stage and reason, per-stage counts, bad inputs, split failures)."""
    h = hashlib.sha256()
    for head, image, mask in sorted(fmt.read_records(dst), key=lambda r: r[0]["image"]):
        # arcface_embedding came later (PhotoMaker V2 training): the rest is unchanged by it
        head = {k: v for k, v in head.items() if k != "arcface_embedding"}
        h.update(json.dumps(head, sort_keys=True).encode() + image + mask)
    index = fmt.load_index(dst)
    h.update(
        json.dumps(
            [
                [(r["image"], r["stage"], r["reason"]) for r in index["rejected"]],
                index["summary"]["stages"],
                index["bad"],
                index["split_failures"],
            ]
        ).encode()
    )
    return h.hexdigest()


def test_the_built_dataset_is_the_same_bit_for_bit(built):
    assert dataset_digest(built[0]) == GOLDEN_DATASET_SHA256


def test_the_built_dataset_follows_the_umask(built):
    """The dataset folder and every file in it get the user's umask (the build runs with pytest's), not
    mkdtemp's 0700: a dataset built for a team is readable by it."""
    dst = built[0]
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(dst)): p.stat().st_mode & 0o777 for p in [dst, *dst.rglob("*")]}
    want = {k: (0o777 if (dst / k).is_dir() else 0o666) & ~umask for k in modes}
    assert modes == want


def test_a_failing_endpoint_stops_the_build_and_keeps_the_dataset(built, inputs, tmp_path, capsys):
    """DST holds a complete build; the caption endpoint dies after 4 answers (--caption-retries 1
    --caption-batch-size 1 --caption-concurrency 1): exit 1 with one line naming the endpoint and the count of
    failed requests, DST as it was, the captions received cached; the rerun asks only for the others and
    writes the same dataset."""
    from persongen_jax.data.build.__main__ import main

    dst = tmp_path / "dataset"
    shutil.copytree(built[0], dst)
    for cache in ("captions", "splits"):  # the faces and embeddings stay cached: only captioning is redone
        shutil.rmtree(dst / "_work" / cache)
    before = {p: p.read_bytes() for p in dst.iterdir() if p.is_file()}
    one_at_a_time = ["--caption-retries", "1", "--caption-batch-size", "1", "--caption-concurrency", "1"]
    with CaptionServer(die_after=4) as server:
        assert main(build_args(inputs, dst, server.url, *one_at_a_time)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: the endpoint {server.url} failed: "), err
    failed = re.search(r"(\d+) caption request\(s\) failed", err)
    assert failed and int(failed.group(1)) >= 1, err
    assert any(why in err for why in ("ConnectionRefusedError", "RemoteDisconnected")), err
    assert f"{dst} is left as it was" in err
    assert {p: p.read_bytes() for p in dst.iterdir() if p.is_file()} == before  # index.json and shards
    assert not list(tmp_path.glob(".dataset.tmp-*"))
    cached = len(list((dst / "_work" / "captions").glob("*/*.json")))
    assert cached == server.count("caption") and 1 <= cached < 17
    with CaptionServer() as server:
        assert main(build_args(inputs, dst, server.url)) == 0
        assert server.count("caption") == 17 - cached
    assert dataset_digest(dst) == GOLDEN_DATASET_SHA256


def test_symlinks_fifos_and_loops_in_src_are_rejected_and_never_read(inputs, tmp_path):
    """Only regular files inside SRC are read, as `data.format` does: symlinks are followed while they stay
    inside SRC; a file or person folder linked from outside is rejected `outside the source folder`, a FIFO
    `not a regular file` (the build does not wait on it), a link loop and a dangling person folder
    `unreadable file`; each is listed (nothing vanishes from the summary) and nothing outside SRC is listed
    or opened (an audit hook in the build process)."""
    outside = inputs / "src"
    src = tmp_path / "src"
    (src / "persons" / "pa").mkdir(parents=True)
    (src / "elsewhere").mkdir()
    for k in (0, 1):
        shutil.copy(outside / "persons" / "p1" / f"{k}.jpg", src / "persons" / "pa" / f"{k}.jpg")
    shutil.copy(outside / "persons" / "p1" / "2.jpg", src / "elsewhere" / "2.jpg")
    pa = src / "persons" / "pa"
    (pa / "in.jpg").symlink_to("../../elsewhere/2.jpg")  # inside SRC: read
    (pa / "out.jpg").symlink_to(outside / "persons" / "p1" / "3.jpg")  # a good image, outside SRC
    (pa / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(pa / "fifo.jpg")
    (src / "persons" / "evil").symlink_to(outside / "persons" / "p2")  # a person folder outside SRC
    (src / "persons" / "gone").symlink_to(src / "nothing")
    report, dst = tmp_path / "opened.txt", tmp_path / "dataset"
    hook = (
        "import sys; from persongen_jax.data.build.__main__ import main; out, seen = sys.argv[1], []; "
        "sys.addaudithook(lambda ev, a: seen.append(f'{ev} {a[0]}') if ev in ('open', 'os.scandir', 'os.listdir') "
        "and str(a[0]).startswith(out) else None); rc = main(sys.argv[3:]); "
        "open(sys.argv[2], 'w').write('\\n'.join(seen)); sys.exit(rc)"
    )
    with CaptionServer() as server:
        args = [str(src), *build_args(inputs, dst, server.url)[1:]]
        proc = subprocess.run(
            [sys.executable, "-c", hook, str(outside), str(report), *args],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=240,
        )  # a FIFO read would block: fail, not hang
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert report.read_text() == ""  # nothing under the outside folders was listed or opened
    index = fmt.load_index(dst)
    got = {r["image"]: (r["stage"], r["reason"]) for r in index["rejected"]}
    assert got == {
        "persons/pa/out.jpg": ("decode", "outside the source folder"),
        "persons/evil": ("decode", "outside the source folder"),
        "persons/pa/fifo.jpg": ("decode", "not a regular file"),
        "persons/pa/loop.jpg": ("decode", "unreadable file"),
        "persons/gone": ("decode", "unreadable file"),
    }, got
    assert sorted(h["image"] for h, _, _ in fmt.read_records(dst)) == [
        "persons/pa/0.jpg",
        "persons/pa/1.jpg",
        "persons/pa/in.jpg",
    ]
    assert index["summary"]["images"] == 8 and index["summary"]["cache"]["faces"]["computed"] == 3
    assert {b["image"] for b in index["bad"]} == set(got)  # listed as bad inputs, as data.format does


def test_split_parse_failure_with_a_tiny_qwen2_5_vl(inputs, tmp_path, capsys):
    """A tiny random Qwen2.5-VL (transformers backend) answers gibberish: as the splitter every answer fails
    to parse -- recorded, counted, and the image keeps P_general; as the captioner no caption holds a class
    word, so no image passes and DST is left as it was."""

    from persongen_jax.data.build.__main__ import main
    from persongen_jax.testing.tiny_build import make_tiny_qwen2_5_vl

    qwen = make_tiny_qwen2_5_vl(tmp_path / "qwen")
    src = make_raw_persons(tmp_path / "src", {"p1": mixed_persons()["p1"][:2], "p2": mixed_persons()["p2"][:2]})
    common = [
        str(src),
        "--detector",
        str(inputs / "det"),
        "--arcface",
        str(inputs / "arcface"),
        "--verify-threshold",
        str(BUILD_THRESHOLD),
        "--resolution",
        "64",
        "--progress-every",
        "0",
    ]
    with CaptionServer() as server:
        rc = main(
            [
                common[0],
                str(tmp_path / "out"),
                *common[1:],
                *caption_args(server.url),
                "--split-backend",
                "transformers",
                "--split-model",
                str(qwen),
                "--split-max-tokens",
                "12",
            ]
        )
    assert rc == 0
    index = fmt.load_index(tmp_path / "out")
    assert index["num_records"] == 4 and index["rejected"] == []
    assert index["summary"]["split_failures"] == 4 and len(index["split_failures"]) == 4
    assert all(
        f["reason"] == "caption split did not parse" and f["detail"].startswith("not JSON")
        for f in index["split_failures"]
    )
    for h, _, _ in fmt.read_records(tmp_path / "out"):
        assert h["caption_bg"] is None and h["caption_body"] is None and " man img " in h["caption"]
    assert "split failures (kept with P_general only): 4" in capsys.readouterr().out

    rc = main(
        [
            common[0],
            str(tmp_path / "gibberish"),
            *common[1:],
            "--caption-model",
            str(qwen),
            "--caption-max-tokens",
            "12",
        ]
    )
    assert rc == 1
    err = capsys.readouterr()
    assert err.err.startswith("error: no image of") and len(err.err.strip().splitlines()) == 1
    assert "mark           4 in       0 kept   rejected: no class word 4" in err.out
    assert sorted(p.name for p in (tmp_path / "gibberish").iterdir()) == ["_work"]


def test_bad_inputs_are_one_line_errors(inputs, tmp_path, capsys):
    from persongen_jax.data.build.__main__ import main
    from persongen_jax.data.make_demo import make_demo

    args = lambda dst, *x: [
        str(inputs / "src"),
        str(dst),
        "--detector",
        str(inputs / "det"),  # noqa: E731
        "--arcface",
        str(inputs / "arcface"),
        "--caption-backend",
        "openai",
        "--caption-model",
        "m",
        *x,
    ]
    cases = [
        (args(tmp_path / "a"), "--caption-backend openai needs --caption-endpoint"),
        (args(tmp_path / "a", "--caption-endpoint", "http://x", "--min-images", "1"), "--min-images must be >= 2"),
        (
            args(tmp_path / "a", "--caption-endpoint", "http://x", "--detector", str(tmp_path / "nope")),
            "no such face model folder",
        ),
        (args(inputs, "--caption-endpoint", "http://x"), "holds the source folder"),
        (
            args(tmp_path / "a", "--caption-endpoint", "http://x", "--split-fields", "caption_bg,expr"),
            "--split-fields must be distinct caption_<name> fields",
        ),
        (
            args(tmp_path / "a", "--caption-endpoint", "http://x", "--split-fields", "caption_bg,caption_expr"),
            'the split prompt never asks for the JSON key "expr"',
        ),
        (
            [str(tmp_path / "empty_src"), str(tmp_path / "a"), *args(tmp_path)[2:], "--caption-endpoint", "http://x"],
            "no files under persons/",
        ),
    ]
    raw = make_demo(tmp_path / "demo", persons=2, images_per_person=2, resolution=32, progress=False) / "raw"
    fmt.write_dataset(raw, raw / "captions.jsonl", tmp_path / "fmt", progress=False)
    cases.append((args(tmp_path / "fmt", "--caption-endpoint", "http://x"), "written by `data.format`"))
    cases.append((args(tmp_path / "demo", "--caption-endpoint", "http://x"), "not a dataset written by this tool"))
    (tmp_path / "empty_src").mkdir()
    cases.append((args(tmp_path / "a", "--caption-endpoint", "http://127.0.0.1:9/v1"), "cannot reach the endpoint"))
    with CaptionServer() as server:
        cases.append((args(tmp_path / "a", "--caption-endpoint", server.url), "does not serve model 'm'"))
        for argv, message in cases:
            assert main(argv) == 1, message
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, (message, err)
    assert not (tmp_path / "a").exists()  # nothing written for a run refused up front
    assert fmt.load_index(tmp_path / "fmt")["num_records"] == 4  # untouched


# ----------------------------------------------------------------------------- pure functions of the stages


def test_marking_split_parsing_crop_geometry_and_clustering():
    from persongen_jax.data.build.crop import square_around
    from persongen_jax.data.build.mark import insert_trigger
    from persongen_jax.data.build.settings import CLASS_WORDS
    from persongen_jax.data.build.split import parse_split
    from persongen_jax.data.build.verify import dominant_identity

    assert insert_trigger("A photo of a Man, smiling", CLASS_WORDS, "img") == "A photo of a Man img, smiling"
    assert insert_trigger("two women and a man", CLASS_WORDS, "img") == "two women img and a man"
    assert insert_trigger("a woman-like statue near a boy", CLASS_WORDS, "img") == "a woman-like statue near a boy img"
    for bad, why in (("a photo of a statue", "no class word"), ("a man img", "already holds the trigger")):
        with pytest.raises(ValueError, match=why):
            insert_trigger(bad, CLASS_WORDS, "img")
    fields = fmt.DEFAULT_CAPTION_FIELDS
    assert fields == ("caption_bg", "caption_body")  # the text conditions of conditions.DEFAULTS
    assert parse_split('{"bg": "a room", "body": ""}', fields) == {"caption_bg": "a room", "caption_body": None}
    assert parse_split('```json\n{"body": "red  hat", "bg": "street"}\n```', fields) == {
        "caption_bg": "street",
        "caption_body": "red hat",
    }
    for bad, why in (
        ("sure! {}", "not JSON"),
        ('{"bg": "x"}', "exactly the keys"),
        ('{"bg": 1, "body": "x"}', "strings"),
        ('["a", "b"]', "exactly the keys"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_split(bad, fields)
    # a new text condition (ARCHITECTURE.md: P_expr) is one more field; its key is the name after caption_
    three = parse_split('{"bg": "", "body": "", "expr": "smiling"}', (*fields, "caption_expr"))
    assert three == {"caption_bg": None, "caption_body": None, "caption_expr": "smiling"}
    assert square_around([10, 10, 50, 50], 200, 100, 0.0) == (0, 0, 100)  # largest square, face at the edge
    assert square_around([150, 40, 190, 80], 200, 100, 0.0) == (100, 0, 100)
    assert square_around([80, 30, 120, 70], 200, 100, 2.0) == (60, 10, 80)  # 2 x the face, centred
    # two identities in one person's folder: 3 images of A (one a group photo with B), 2 of B alone
    a, b = np.eye(4)[0], np.eye(4)[1]
    emb = np.stack([a, a, a, b, b])
    labels, dominant, _ = dominant_identity(emb, np.array([0, 1, 2, 2, 3]), 0.4, 2)
    assert dominant is not None and (labels == dominant).tolist() == [True, True, True, False, False]
    _, tie, _ = dominant_identity(emb[[0, 1, 3, 4]], np.array([0, 1, 2, 3]), 0.4, 2)
    assert tie is None  # two clusters of two images each: no dominant identity


def test_unreadable_and_oversized_files_are_rejected_by_decode_and_crop(tmp_path):
    """The decode and crop stages read the source through StageDoFn.read_source: a missing file and a file
    over the size limit become an "unreadable file" reject of that stage, naming the cause."""
    from persongen_jax.data.build.common import REJECTED, Item
    from persongen_jax.data.build.crop import CropFaces
    from persongen_jax.data.build.decode import DecodeImages
    from persongen_jax.data.build.settings import BuildSettings, ModelSpec

    unused = ModelSpec(backend="openai", model="unused", endpoint="http://unused")
    (tmp_path / "persons" / "p").mkdir(parents=True)
    (tmp_path / "persons" / "p" / "big.jpg").write_bytes(b"x" * (2**20 + 1))
    s = BuildSettings(
        src=str(tmp_path),
        dst=str(tmp_path / "dst"),
        detector="",
        arcface="",
        caption=unused,
        split=unused,
        max_file_bytes=2**20,
        progress_every_s=0,
    )
    for stage in (DecodeImages(s), CropFaces(s)):
        for name, why in (("missing.jpg", "no such file"), ("big.jpg", "over the 1048576-byte limit")):
            image = f"persons/p/{name}"
            out = list(stage.process(Item(image=image, person_id="p", path=str(tmp_path / image))))
            assert len(out) == 1 and out[0].tag == REJECTED, out
            r = out[0].value
            assert (r["stage"], r["reason"]) == (stage.stage, "unreadable file") and why in r["detail"], r


def test_dbscan_gives_scikit_learns_labels():
    """verify.dbscan against scikit-learn's DBSCAN(metric="precomputed") (the test-only reference): random
    groups of faces with the build's distance matrix (same-image pairs at 2, distances exactly at eps),
    several eps / min_samples; the labels must be equal, numbering and border points included."""
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    from persongen_jax.data.build.verify import dbscan

    rng = np.random.default_rng(0)
    checked = clustered = 0
    for trial in range(300):
        n = int(rng.integers(1, 40))
        ids = rng.integers(0, int(rng.integers(1, 4)), n)  # up to 3 identities, noisy embeddings
        centres = rng.normal(size=(3, 16))
        emb = centres[ids] + rng.normal(scale=float(rng.uniform(0.2, 1.5)), size=(n, 16))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        dist = 1.0 - np.clip(emb @ emb.T, -1.0, 1.0)
        owner = rng.integers(0, max(1, n - 3), n)  # some images with several faces
        dist[owner[:, None] == owner[None, :]] = 2.0
        np.fill_diagonal(dist, 0.0)
        eps = float(rng.choice([0.3, 0.6, 0.9]))
        if trial % 5 == 0 and n > 1:  # a pair exactly at eps: neighbours
            dist[0, 1] = dist[1, 0] = eps
        for min_samples in (1, 2, 3, 5):
            want = sklearn_cluster.DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dist)
            got = dbscan(dist, eps, min_samples)
            assert got.tolist() == want.tolist(), (trial, min_samples)
            checked += 1
            clustered += int(len(set(want.tolist()) - {-1}) > 1)
    assert clustered > 100  # the cases include several clusters, not only noise or one cluster
    # ... and the build itself does not need scikit-learn (not a [data] dependency): imports of it blocked
    code = (
        "import sys; sys.modules['sklearn'] = None; import numpy as np; "
        "from persongen_jax.data.build.verify import dominant_identity; "
        "labels, dominant, _ = dominant_identity(np.eye(3)[[0, 0, 1]], np.arange(3), 0.4, 2); "
        "print(labels.tolist(), dominant)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[-2] == "[0, 0, -1] 0"


# ----------------------------------------------------------------------------- the caption endpoint's bounds


def _caption_settings(endpoint: str, dst, *extra: str):
    """BuildSettings from the CLI's own parser (the flags reach the backend and the stage as a user gives them)."""
    from persongen_jax.data.build.__main__ import parser, settings_from_args

    return settings_from_args(
        parser().parse_args(
            [
                "src",
                str(dst),
                "--detector",
                "d",
                "--arcface",
                "a",
                *caption_args(endpoint),
                "--caption-retries",
                "0",
                "--progress-every",
                "0",
                *extra,
            ]
        )
    )


def _jpeg(side: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 90, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def test_caption_timeout_bounds_the_whole_request():
    """An endpoint that sends its answer one byte every 50 ms (each read well inside the timeout) with
    --caption-timeout 1: the request fails at the 1 s deadline, as the endpoint's failure, and the backend
    sends nothing more to an endpoint that failed."""
    from persongen_jax.data.build.vlm import EndpointError, load_backend

    with CaptionServer(trickle=0.05) as server:  # an answer of ~200 bytes: 10 s
        backend = load_backend(_caption_settings(server.url, "dst", "--caption-timeout", "1").caption)
        t0 = time.monotonic()
        (answer,) = backend.describe([_jpeg(8)], "describe")
        elapsed = time.monotonic() - t0
        assert isinstance(answer, EndpointError) and answer.sent, answer
        assert "TimeoutError" in str(answer) and "1 s timeout" in str(answer), answer
        assert 0.9 < elapsed < 3.0, elapsed
        t0 = time.monotonic()
        (again,) = backend.describe([_jpeg(8)], "describe")
        assert isinstance(again, EndpointError) and not again.sent and time.monotonic() - t0 < 0.5, again
        assert server.count("caption") == 1


def test_server_errors_are_the_endpoints_failure_not_the_images(tmp_path):
    """HTTP 503 is retried (--caption-retries 1: two attempts), HTTP 400 is not; either way the caption stage
    emits a "failed" output (the run's error), never a reject of the image, and sends no further request."""
    from persongen_jax.data.build.caption import CaptionImages
    from persongen_jax.data.build.common import FAILED, Item

    for status, attempts in ((503, 2), (400, 1)):
        with CaptionServer(status=status) as server:
            stage = CaptionImages(
                _caption_settings(server.url, tmp_path / "dst", "--caption-retries", "1", "--caption-concurrency", "1")
            )
            stage.setup()
            batch = [
                Item(image=f"persons/p/{k}.jpg", person_id="p", path="", jpeg=_jpeg(8), crop_sha256=str(k))
                for k in range(3)
            ]
            out = list(stage.process(batch))
        assert [getattr(o, "tag", None) for o in out] == [FAILED] * 3, out
        first, *rest = [o.value for o in out]
        assert first["sent"] and first["endpoint"] == server.url and f"HTTP {status}" in first["error"], first
        assert (f"(after {attempts} attempts)" in first["error"]) == (status == 503), first
        assert not any(r["sent"] for r in rest) and server.posts == attempts


def test_long_answers_are_bounded_and_long_captions_rejected(tmp_path):
    """A 10 MB answer is read up to the 64 KiB bound and rejected for its image; a caption over
    --caption-max-chars (default 2000) is rejected naming the limit; a normal one is kept; neither long
    answer is cached."""
    from persongen_jax.data.build.caption import CaptionImages
    from persongen_jax.data.build.common import REJECTED, Item

    answers = {8: "a photo of a man", 16: "a photo of a man " + "very " * 600, 24: "x" * 10_000_000}
    with CaptionServer(caption=lambda im: answers[im.size[0]]) as server:
        s = _caption_settings(server.url, tmp_path / "dst")
        assert s.caption_max_chars == 2000
        stage = CaptionImages(s)
        stage.setup()
        batch = [
            Item(image=f"persons/p/{side}.jpg", person_id="p", path="", jpeg=_jpeg(side), crop_sha256=str(side))
            for side in answers
        ]
        out = list(stage.process(batch))
    kept = [o for o in out if isinstance(o, Item)]
    rejected = {
        o.value["image"]: (o.value["reason"], o.value["detail"]) for o in out if getattr(o, "tag", "") == REJECTED
    }
    assert [(k.image, k.caption) for k in kept] == [("persons/p/8.jpg", "a photo of a man")]
    assert rejected["persons/p/16.jpg"][0] == "caption too long"
    assert rejected["persons/p/16.jpg"][1].startswith("3016 characters > --caption-max-chars 2000")
    assert rejected["persons/p/24.jpg"] == ("caption too long", "the answer is over the 65536-byte limit")
    assert len(stage.cache) == 2  # the short and the 3016-character caption; the cut answer is not stored
    assert _caption_settings(server.url, "dst", "--caption-max-chars", "40").caption_max_chars == 40


# ----------------------------------------------------------------------------- stages never mutate their input


def test_every_stage_derives_new_items_and_leaves_its_input_unchanged(inputs, tmp_path):
    """Beam's rule: a DoFn never mutates its input. Each stage, run on two of p1's images in pipeline order,
    gets frozen Items and leaves them byte for byte as they were (lists, dicts and arrays inside included),
    and returns new Items."""
    import dataclasses
    import pickle

    from persongen_jax.data.build.caption import CaptionImages
    from persongen_jax.data.build.common import Item
    from persongen_jax.data.build.crop import CropFaces
    from persongen_jax.data.build.decode import DecodeImages
    from persongen_jax.data.build.detect import DetectFaces
    from persongen_jax.data.build.mark import MarkTrigger
    from persongen_jax.data.build.source import list_local
    from persongen_jax.data.build.split import SplitCaptions
    from persongen_jax.data.build.verify import EmbedFaces, VerifyPerson

    with CaptionServer() as server:
        s = dataclasses.replace(
            _caption_settings(server.url, tmp_path / "dst"),
            src=str(inputs / "src"),
            detector=str(inputs / "det"),
            arcface=str(inputs / "arcface"),
            verify_threshold=BUILD_THRESHOLD,
            resolution=64,
        )
        items = [it for it in list_local(s.src) if it.image in ("persons/p1/0.jpg", "persons/p1/1.jpg")]
        with pytest.raises(dataclasses.FrozenInstanceError):
            items[0].caption = "changed"

        def run(stage, elements):
            if hasattr(stage, "setup"):
                stage.setup()
            out = []
            for element in elements:
                before = pickle.dumps(element)
                out += [o for o in stage.process(element) if isinstance(o, Item)]
                assert pickle.dumps(element) == before, f"{type(stage).__name__} changed its input"
            assert out and not {id(o) for o in out} & {id(i) for i in items_seen}, type(stage).__name__
            items_seen.extend(out)
            return out

        items_seen = list(items)
        items = run(DecodeImages(s), items)
        items = run(DetectFaces(s), items)
        items = run(EmbedFaces(s), [items])
        items = run(VerifyPerson(s), [("p1", items)])
        items = run(CropFaces(s), items)
        items = run(CaptionImages(s), [items])
        items = run(SplitCaptions(s), [items])
        items = run(MarkTrigger(s), items)
    assert sorted(it.image for it in items) == ["persons/p1/0.jpg", "persons/p1/1.jpg"]
    assert all(it.caption.startswith("a photo of a man img ") and it.jpeg and it.face for it in items)


def test_one_class_word_list_for_demo_synthetic_and_built_data():
    """conditions.CLASS_WORDS is the only class-word list in the package (an AST count of its assignments):
    the build marks with it, the demo and synthetic training data draw their words from its head, in the
    order they always used (so their data is unchanged)."""
    import ast

    from persongen_jax.conditions import CLASS_WORDS
    from persongen_jax.data.build.settings import BuildSettings
    from persongen_jax.data.make_demo import DEMO_CLASS_WORDS
    from persongen_jax.training.data import SYNTHETIC_CLASS_WORDS

    lists = [
        str(p.relative_to(REPO))
        for p in sorted((REPO / "persongen_jax").rglob("*.py"))
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Tuple)
        and len(node.value.elts) > 2
        and all(isinstance(e, ast.Constant) and e.value in ("man", "woman") for e in node.value.elts[:2])
    ]
    assert lists == ["persongen_jax/conditions.py"]
    assert BuildSettings.__dataclass_fields__["class_words"].default == CLASS_WORDS
    assert DEMO_CLASS_WORDS == ("man", "woman", "person", "boy", "girl")
    assert SYNTHETIC_CLASS_WORDS == ("man", "woman", "person")
