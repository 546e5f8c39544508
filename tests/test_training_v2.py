"""PhotoMaker V2 training: `configs/photomaker_v2.py:tiny` through the real CLIs.

One 30-step run of the CLI on the demo dataset (micro model, tiny random V2 encoder + tiny random ArcFace,
validation at the last step) is shared: the loss falls, validation wrote its images, a resume from step 20
equals it bitwise, and `generate --checkpoint` samples from it. The data pipeline's V2 inputs (stored
embeddings vs ArcFace crops, the class word repeated K x num_tokens times) are checked on their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import GENERATE_TWO_SEEDS, assert_loss_falls, assert_two_different_images, cli_env, run_train

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
# The demo config's learning rates (a from-scratch tiny model learns with larger steps than the research runs).
TRAIN_ARGS = [
    "--config.model=micro",
    "--config.data.source=grain",
    "--config.data.global_batch_size=8",
    "--config.trainable.qformer_perceiver.lr=0.001",
    "--config.trainable.fuse_mlp.lr=0.001",
    "--config.trainable.lora.lr=0.003",
    "--config.optim.warmup_steps=10",
    "--config.optim.grad_clip_norm=1.0",
    f"--config.total_steps={STEPS}",
    "--config.checkpoint_every=10",
    "--config.keep_checkpoints=10",
    "--config.log_every=1",
    "--config.progress_bar=False",
]
# Validation at the last step: 2 training identities x 1 prompt x 1 seed, 2 sampling steps.
EVAL_ARGS = [
    f"--config.eval_every={STEPS}",
    "--config.eval.num_identities=2",
    "--config.eval.num_prompts=1",
    "--config.eval.seeds=(0,)",
    "--config.eval.num_steps=2",
]


def _train(wd, data, *extra):
    config = REPO / "configs" / "photomaker_v2.py:tiny"
    return run_train(config, wd, f"--config.data.dir={data}", *TRAIN_ARGS, *extra, timeout=900)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from persongen_jax.data.make_demo import make_demo

    return make_demo(
        tmp_path_factory.mktemp("v2data") / "demo", persons=6, images_per_person=3, resolution=32, progress=False
    )


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory, demo_data):
    wd = tmp_path_factory.mktemp("v2run") / "run"
    proc = _train(wd, demo_data, *EVAL_ARGS)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return wd


def _losses(wd) -> dict[int, float]:
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_v2_tiny_trains_through_the_cli_on_the_demo_dataset(v2_run):
    losses = _losses(v2_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_loss_falls([losses[s] for s in range(1, STEPS + 1)])
    config = json.loads((v2_run / "config.json").read_text())
    assert config["id_encoder"] == "photomaker_v2"
    # the V2 encoder's perceiver trained: it is in the checkpoint's trainable groups
    assert set(config["trainable"]) == {"qformer_perceiver", "fuse_mlp", "lora"}


def test_v2_validation_writes_samples(v2_run):
    images = sorted(
        p for p in (v2_run / "samples" / str(STEPS) / "images").rglob("*.png") if not p.name.startswith("reference_")
    )
    assert len(images) == 2, images  # 2 identities x 1 prompt x 1 seed
    assert np.asarray(Image.open(images[0])).std() > 0


def test_v2_resume_is_bitwise_identical(v2_run, demo_data, tmp_path):
    """The run's folder cut back to its step-20 checkpoint, resumed to step 30: the same params, optimizer state
    and losses as the uninterrupted run."""
    import jax
    import orbax.checkpoint as ocp

    wd = tmp_path / "resumed"
    shutil.copytree(v2_run, wd, ignore=shutil.ignore_patterns("samples", "tb", "eval", "*.lock"))
    shutil.rmtree(wd / "checkpoints" / str(STEPS))
    proc = _train(wd, demo_data, "--config.eval_every=0")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    restore = lambda w: ocp.StandardCheckpointer().restore((w / "checkpoints" / str(STEPS) / "state").absolute())  # noqa: E731
    leaves_a, tree_a = jax.tree.flatten(restore(wd))
    leaves_b, tree_b = jax.tree.flatten(restore(v2_run))
    assert tree_a == tree_b and leaves_a
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    a, b = _losses(wd), _losses(v2_run)
    assert [a[s] for s in range(21, STEPS + 1)] == [b[s] for s in range(21, STEPS + 1)]


def test_generate_from_a_v2_checkpoint(v2_run, demo_data, tmp_path):
    """generate --checkpoint of the V2 run: the references' id_embeds come from the run's own frozen ArcFace."""
    raw = sorted((demo_data / "raw" / "persons").rglob("*.png")) + sorted(
        (demo_data / "raw" / "persons").rglob("*.jpg")
    )
    refs = raw[:2]
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "persongen_jax.generate", "--checkpoint", str(v2_run), *GENERATE_TWO_SEEDS]
    cmd += ["--out", str(out), *(a for r in refs for a in ("--ref", str(r)))]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "PhotoMaker v2" in proc.stderr
    assert_two_different_images(out)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["photomaker_version"] == "v2" and settings["step"] == STEPS


# ----------------------------------------------------------------------------- the V2 data inputs


def _tokenizers(tmp_path):
    from persongen_jax.models import presets
    from persongen_jax.pipeline import prompt as prompt_lib

    presets.write_tiny_tokenizer(tmp_path / "tok" / "tokenizer")
    presets.write_tiny_tokenizer(tmp_path / "tok" / "tokenizer_2", pad_token="!")
    return prompt_lib.load_tokenizers(tmp_path / "tok", "img")


def test_v2_batches_take_stored_embeddings_else_arcface_crops(demo_data, tmp_path):
    """Person p000's records carry an `arcface_embedding` (as data.build writes it), the others none: their
    references get the stored embedding, the others an ArcFace crop; the class word is repeated K x 2 times;
    the train step's `arcface_embeds` takes the stored ones and computes the rest with the frozen ArcFace."""
    import jax.numpy as jnp

    from persongen_jax.data import format as fmt
    from persongen_jax.data.pipeline import IdEmbedsError, IdInputs, make_train_iterator
    from persongen_jax.models import iresnet
    from persongen_jax.training.loss import arcface_embeds

    records = fmt.read_records(demo_data)
    stored = {
        i: np.random.default_rng(i).standard_normal(16).astype(np.float32)
        for i, r in enumerate(records)
        if r[0]["person_id"] == "p000"
    }
    good = [
        (dict(h, arcface_embedding=fmt.pack_float32(stored[i])) if i in stored else h, im, m)
        for i, (h, im, m) in enumerate(records)
    ]
    data = tmp_path / "mixed"
    data.mkdir()
    fmt.write_records(data, good, [], num_shards=1, progress=False)
    tokenizers = _tokenizers(tmp_path)
    spec = IdInputs(num_tokens=2, embed_dim=16, arcface_size=32)
    kw = dict(
        tokenizers=tokenizers,
        global_batch_size=18,
        resolution=32,
        num_refs=(1, 2),
        id_image_size=32,
        read_threads=1,
        prefetch=0,
    )
    batch = next(make_train_iterator(data, id_inputs=spec, **kw))
    n = batch["num_id_images"]
    np.testing.assert_array_equal(batch["class_tokens_mask"].sum(1), 2 * n)
    seen = {True: 0, False: 0}
    for b in range(len(n)):
        for j, r in enumerate(batch["ref_record_indices"][b]):
            crop = batch["arcface_pixel_values"][b, j]
            if j >= n[b]:  # padded slot: nothing
                assert not batch["has_id_embeds"][b, j] and not crop.any() and not batch["id_embeds"][b, j].any()
            elif int(r) in stored:
                assert batch["has_id_embeds"][b, j] and not crop.any()
                np.testing.assert_array_equal(batch["id_embeds"][b, j], stored[int(r)])
            else:
                assert not batch["has_id_embeds"][b, j] and crop.std() > 0
            if j < n[b]:
                seen[int(r) in stored] += 1
    assert seen[True] and seen[False], seen

    class Model:  # what arcface_embeds reads of a PersonGenModel
        arcface = iresnet.random_iresnet(iresnet.IResNet.preset_config("tiny"), 0)

    emb = np.asarray(arcface_embeds(Model, {k: jnp.asarray(v) for k, v in batch.items()}))
    crops = batch["arcface_pixel_values"].reshape(-1, 32, 32, 3)
    computed = np.asarray(iresnet.embed(Model.arcface, crops, normalize=False)).reshape(emb.shape)
    has = batch["has_id_embeds"]
    np.testing.assert_array_equal(emb[has], batch["id_embeds"][has])
    np.testing.assert_allclose(emb[~has], computed[~has], rtol=1e-5, atol=1e-5)
    assert np.abs(np.linalg.norm(computed[~has], axis=-1) - 1).min() > 1e-3  # raw, not L2-normalised

    # No ArcFace to compute the missing ones: the run's error, naming a record (never a skipped record).
    with pytest.raises(IdEmbedsError, match=r"persons/p0\d\d/.*no arcface_embedding"):
        next(make_train_iterator(data, id_inputs=IdInputs(num_tokens=2, embed_dim=16), **kw))
