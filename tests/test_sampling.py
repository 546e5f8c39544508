"""The compiled SDXL sampling loop against diffusers' StableDiffusionXLPipeline (same latents,
same prompt, CFG, Euler and DDIM), and the generate CLI end to end on tiny converted models."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import helpers  # noqa: E402

PROMPT = "a photo of a man wearing a red hat"
ID_PROMPT = "a photo of a man img wearing a red hat"  # the trigger word after the class word: the ID enters
STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from persongen_jax.testing.tiny_photomaker import make_tiny_photomaker

    root = tmp_path_factory.mktemp("sampling")
    src, dst = helpers.converted_tiny_sdxl(root)
    return {"root": root, "src": src, "dst": dst, "pm_bin": make_tiny_photomaker(root / "pm.bin")}


@pytest.fixture(scope="module")
def pipe(tiny):
    from persongen_jax.pipeline.pipeline import PersonGenPipeline

    return PersonGenPipeline.from_pretrained(tiny["dst"])


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_sampling_matches_diffusers_pipeline(tiny, pipe, scheduler):
    import jax.numpy as jnp

    helpers.torch_precise()
    size = pipe.default_size
    h = size // pipe.vae.downscale_factor
    noise = np.random.default_rng(0).standard_normal((2, h, h, 4)).astype(np.float32)

    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny["src"], torch_dtype=torch.float32)
    if scheduler == "ddim":
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = ref(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            height=size,
            width=size,
            num_images_per_prompt=2,
            latents=torch.from_numpy(noise.transpose(0, 3, 1, 2)),
            output_type="np",
        ).images  # [2, H, W, 3] in [0, 1]

    cond = pipe.encode(PROMPT, height=size, width=size)
    # The jitted loop + decode the pipeline uses (noise is scaled by init_noise_sigma inside).
    images = np.asarray(pipe.sampler(STEPS, scheduler)(jnp.asarray(noise), cond, 5.0, 0))
    helpers.assert_close(images, out, rtol=1e-4, atol=1e-4, name=f"{scheduler} images")


def test_generate_cli_end_to_end(tiny, tmp_path, capsys):
    """PhotoMaker conversion + generate: N images + settings.json, same seed -> identical images."""
    import subprocess
    import sys

    from PIL import Image

    pm = tmp_path / "photomaker"
    helpers.run_cli("photomaker", tiny["pm_bin"], pm, "--unet", tiny["dst"] / "unet")
    faces = []
    for i in range(2):
        face = tmp_path / f"face{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 36, 3)).astype(np.uint8)).save(face)
        faces += ["--ref", str(face)]

    # The model, the prompt and references, and the sampling of the generate runs below.
    inputs = ["--model", str(tiny["dst"]), "--photomaker", str(pm), "--prompt", ID_PROMPT, *faces]
    sampling = ["--steps", "3", "--start-merge-step", "1"]

    def generate(out, *extra):
        cmd = [sys.executable, "-m", "persongen_jax.generate", *inputs, *sampling, "--out", str(out), *extra]
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=helpers.REPO,
            env=dict(__import__("os").environ, JAX_PLATFORMS="cpu"),
        )

    proc = generate(tmp_path / "a", "--seeds", "0-2")
    assert proc.returncode == 0, proc.stderr
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["images"] == ["seed_0.png", "seed_1.png", "seed_2.png"]
    assert settings["seeds"] == [0, 1, 2] and settings["start_merge_step"] == 1
    imgs = [np.asarray(Image.open(tmp_path / "a" / f)) for f in settings["images"]]
    assert imgs[0].shape == (32, 32, 3) and not np.array_equal(imgs[0], imgs[1])
    proc = generate(tmp_path / "b", "--seeds", "1")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b" / "seed_1.png")), imgs[1])

    # Error cases through the same `main` in-process (the subprocess path is covered above).
    from persongen_jax.generate import main

    def fails(out, *extra):
        assert main([*inputs, "--steps", "2", "--out", str(out), *extra]) == 1
        return capsys.readouterr().err

    # A folder generate wrote before is replaced only with --overwrite: its earlier images go (seed_0), the
    # seeds run in batches of --batch-size (the last one padded), each image the same as in one batch.
    err = fails(tmp_path / "a", "--seeds", "1-3")
    assert "earlier `generate` run" in err and "--overwrite" in err, err
    from persongen_jax.pipeline.pipeline import PersonGenPipeline

    calls, call = [], PersonGenPipeline.__call__

    def record(self, prompt, refs, *, seeds, **kw):
        calls.append(list(seeds))
        return call(self, prompt, refs, seeds=seeds, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PersonGenPipeline, "__call__", record)
        argv = [*inputs, *sampling, "--out", str(tmp_path / "a"), "--seeds", "1-3", "--batch-size", "2", "--overwrite"]
        assert main(argv) == 0, capsys.readouterr().err
    assert calls == [[1, 2], [3, 3]]
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["images"] == ["seed_1.png", "seed_2.png", "seed_3.png"] and settings["batch_size"] == 2
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == settings["images"]
    for k in (1, 2):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / f"seed_{k}.png")), imgs[k])

    # The prompt must carry the trigger word after the class word; the failed run leaves no --out behind.
    err = fails(tmp_path / "c", "--prompt", "a photo of a man wearing a red hat")
    assert "trigger word" in err and "img" in err, err
    assert not (tmp_path / "c").exists()
    # An unreadable reference image is named.
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x89PNG not really")
    assert "broken.jpg" in fails(tmp_path / "d", "--ref", str(bad))
    # A model folder without an ID encoder.
    assert "id_encoder" in fails(tmp_path / "e", "--photomaker", str(tmp_path))


def test_id_tokens_change_the_image_only_after_the_merge_step(tiny, tmp_path):
    """start_merge_step >= steps: the ID never enters, so the result equals the text-only prompt's."""
    from PIL import Image

    from persongen_jax.pipeline.pipeline import PersonGenPipeline

    pm = tmp_path / "photomaker"
    helpers.run_cli("photomaker", tiny["pm_bin"], pm, "--unet", tiny["dst"] / "unet")
    p = PersonGenPipeline.from_pretrained(tiny["dst"], photomaker=pm, merge_lora=False)
    face = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8))
    with_id_late = p("a photo of a man img", [face], seeds=[0], num_steps=3, start_merge_step=3)
    with_id = p("a photo of a man img", [face], seeds=[0], num_steps=3, start_merge_step=0)
    text_only = p("a photo of a man", [], seeds=[0], num_steps=3)
    np.testing.assert_array_equal(with_id_late, text_only)
    assert not np.array_equal(with_id, text_only)


def test_generate_checks_settings_and_output_before_loading(tmp_path, capsys):
    """NaN guidance, --height 0 / -16, --steps 0, huge seeds, an --out that is a
    file or read-only: one `error:` line before the model loads (the model folder here does not exist)."""
    from persongen_jax.generate import main

    def fails(*extra, out=tmp_path / "out"):
        assert (
            main(
                [
                    "--model",
                    str(tmp_path / "no_model"),
                    "--prompt",
                    "a photo of a man",
                    "--steps",
                    "2",
                    "--out",
                    str(out),
                    *extra,
                ]
            )
            == 1
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and "no_model" not in err, err
        return err

    assert "guidance scale nan" in fails("--guidance-scale", "nan")
    assert "height=0" in fails("--height", "0") and "height=-16" in fails("--height", "-16")
    assert "steps=0" in fails("--steps", "0")
    assert "--step goes with --checkpoint" in fails("--step", "3")
    run = ["--checkpoint", str(tmp_path / "no_run"), "--prompt", "a photo of a man", "--out", str(tmp_path / "o2")]
    for extra, expected in (
        (["--lora", "l"], "--checkpoint brings its own model"),
        (["--dtype", "bfloat16"], "--dtype / --attention go with --model"),
    ):
        assert main(run + extra) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):  # a malformed flag value: argparse's usage error, naming --seeds
        main(["--model", "m", "--prompt", "p", "--out", str(tmp_path), "--seeds", "99999999999999999999"])
    assert "seeds are integers in [0, 4294967295]" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert "is a file" in fails(out=tmp_path / "file")
    ro = tmp_path / "ro"
    ro.mkdir()
    from test_conversion_cli import _read_only

    undo = _read_only(ro)
    try:
        assert "cannot write" in fails(out=ro)
    finally:
        undo()


@pytest.mark.parametrize(
    "command, files",
    [("generate", ("seed_0.png", "settings.json")), ("evaluate", ("metrics.json", "report.html", "scores.csv"))],
)
def test_a_users_folder_is_never_written_into(command, files, tmp_path, capsys):
    """generate / evaluate --out naming a folder of the user's files: refused before anything loads, one line
    naming the first clashing file; the files are untouched. With --overwrite the command may write there."""
    import importlib

    main = importlib.import_module(f"persongen_jax.{command}").main
    out = tmp_path / "mine"
    out.mkdir()
    for name in files:
        (out / name).write_text(f"the user's {name}")
    argv = {
        "generate": ["--model", str(tmp_path / "no_model"), "--prompt", "a photo of a man"],
        "evaluate": ["--model", str(tmp_path / "no_model"), "--sets", f"a={tmp_path / 'no_sets'}"],
    }[command]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: --out {out}: not empty and not written by `{command}` (first file: {out / files[0]}); "
        "choose a new or empty folder, or pass --overwrite to write into it"
    ), err
    assert all((out / name).read_text() == f"the user's {name}" for name in files)
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    # --overwrite gets past the folder check: the next error is the missing model / sets, nothing written.
    assert main([*argv, "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "not written by" not in err and ("no_model" in err or "no_sets" in err), err
    assert all((out / name).read_text() == f"the user's {name}" for name in files)


def test_non_finite_images_are_an_error_naming_the_seeds(pipe):
    """NaN weights decode to NaN, which used to be saved as black PNGs; now a
    PipelineError naming the seeds (the generate CLI prints it and exits 1)."""
    from persongen_jax.pipeline.pipeline import PipelineError

    bias = pipe.vae.decoder.conv_out.bias
    good = bias.get_value()
    bias.set_value(good * float("nan"))
    try:
        with pytest.raises(PipelineError, match=r"seed\(s\) \[3, 4\] holds NaN/Inf"):
            pipe(PROMPT, seeds=[3, 4], num_steps=STEPS, scheduler="euler")
    finally:
        bias.set_value(good)
