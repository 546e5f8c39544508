"""Conditions as data (persongen_jax/conditions.py): a new text condition is added by config alone --
a captions field in the dataset, one `config.conditions` entry and its adapter name -- trained with the
real loop, and used for generation with `generate --cond NAME=TEXT`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persongen_jax import conditions
from persongen_jax.data.format import load_index, read_records, write_dataset
from persongen_jax.data.make_demo import make_demo
from persongen_jax.generate import main as generate_main
from persongen_jax.train import load_config
from persongen_jax.training import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]

# A config file a user would write for the new condition: the demo plus P_expr (facial expression).
EXPR_CONFIG = """
from configs import demo


def get_config():
    c = demo.get_config()
    c.conditions.expr = dict(kind="text", source="caption_expr", drop=0.1, gated=False)
    c.adapters.names = ("bg", "expr")
    return c
"""


def test_condition_specs_validate():
    table = dict(conditions.DEFAULTS, expr=dict(kind="text", source="caption_expr"))
    specs = conditions.parse(table)
    assert [c.name for c in conditions.text_conditions(specs, ["expr", "id", "bg"])] == ["expr", "bg"]
    assert conditions.image_condition(specs).gated and specs["expr"].batch_keys == (
        "expr_ids_1",
        "expr_ids_2",
        "has_expr",
    )
    for bad, match in (
        (dict(kind="video", source="x"), "kind"),
        (dict(kind="text", source=""), "source"),
        (dict(kind="text", source="caption_x", drop=2.0), "probability"),
        (dict(kind="text", source="caption_x", colour=1), "unknown keys"),
    ):
        with pytest.raises(ValueError, match=match):
            conditions.parse({"x": bad})
    with pytest.raises(ValueError, match="one image condition"):
        conditions.parse(dict(conditions.DEFAULTS, face2=dict(kind="image", source="references")))


def test_new_text_condition_by_config_trains_and_generates(tmp_path):
    # The dataset: the demo's raw persons with one more captions field.
    demo = make_demo(tmp_path / "demo", persons=4, images_per_person=3, resolution=32, progress=False)
    lines = [json.loads(x) for x in (demo / "raw" / "captions.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        line["caption_expr"] = "smiling" if i % 2 else "looking at the camera"
    (demo / "raw" / "captions_expr.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    data = tmp_path / "data"
    write_dataset(demo / "raw", demo / "raw" / "captions_expr.jsonl", data, num_shards=1, progress=False)
    assert not load_index(data)["bad"]
    assert {h.get("caption_expr") for h, _, _ in read_records(data)} == {"smiling", "looking at the camera"}

    (tmp_path / "expr_config.py").write_text(textwrap.dedent(EXPR_CONFIG))
    config = load_config(str(tmp_path / "expr_config.py"))
    config.model = "micro"
    config.data.dir = str(data)
    config.data.global_batch_size = 4
    config.total_steps, config.log_every, config.checkpoint_every = 3, 1, 3
    config.progress_bar = False
    run = tmp_path / "run"
    result = train_and_evaluate(config, run)
    assert result["step"] == 3 and all(np.isfinite(h["loss"]) for h in result["history"])
    expr_params = [k for k in result["params"] if ".processor.to_k.expr." in k]
    assert expr_params, "the expr condition got no trained adapter layers"

    face = tmp_path / "face.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(face)
    common = [
        "--checkpoint",
        str(run),
        "--ref",
        str(face),
        "--prompt",
        "a photo of a man img",
        "--steps",
        "2",
        "--start-merge-step",
        "0",
        "--seeds",
        "0",
    ]
    assert generate_main(common + ["--cond", "expr=smiling", "--out", str(tmp_path / "with")]) == 0
    assert generate_main(common + ["--out", str(tmp_path / "without")]) == 0
    settings = json.loads((tmp_path / "with" / "settings.json").read_text())
    assert settings["conditions"] == {"expr": "smiling"} and settings["step"] == 3
    with_cond = np.asarray(Image.open(tmp_path / "with" / "seed_0.png"))
    without = np.asarray(Image.open(tmp_path / "without" / "seed_0.png"))
    assert not np.array_equal(with_cond, without), "--cond expr=... did not reach the UNet"
    # A condition the model has no adapter for is an input error, not a silent no-op.
    assert generate_main(common + ["--cond", "body=in a suit", "--out", str(tmp_path / "bad")]) == 1

    # The web app on the same run (`--checkpoint`: generate's loader): one field per text condition of the
    # model, P_expr among them, and the generate CLI's image for the same request.
    from persongen_jax import app

    args = app.build_parser().parse_args(["--checkpoint", str(run)])
    pipe, source = app.load_pipeline(args, tmp_path / "app")
    request = app.Request(
        prompt="a photo of a man img",
        conditions={"expr": "smiling"},
        num_images=1,
        seed=0,
        num_steps=2,
        start_merge_step=0,
        height=32,
        width=32,
    )
    gen = app.Generator(pipe, source=source, defaults=request, workdir=tmp_path / "app")
    assert gen.text_conditions == ["bg", "expr"] and source["step"] == 3
    fields = {b.elem_id: b.label for b in app.build_ui(gen).blocks.values() if (b.elem_id or "").startswith("cond_")}
    assert fields == {"cond_bg": "P_bg", "cond_expr": "P_expr"}
    with Image.open(face) as im:
        result = gen.generate([("face.png", im.copy())], request)
    np.testing.assert_array_equal(result.images[0], with_cond)
