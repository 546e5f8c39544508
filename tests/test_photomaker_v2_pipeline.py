"""PhotoMaker V2 in the pipeline: a 10-step sampling loop (tiny SDXL, start_merge_step inside the loop)
against a PyTorch loop built from diffusers' SDXL parts + the reference V2 encoder (the official pipeline's
loop: text-only prompt while i <= start_merge_step, the ID-fused prompt after; the PhotoMaker LoRA fused into
the UNet, as the official script's `fuse_lora()`), and `generate` with a V2 folder: ArcFace embeddings from the
project's SCRFD + IResNet, a reference without a face is a one-line error naming the file.

Tolerance: max |ours - torch| <= 1e-4 x max |torch| on the final latents.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import helpers  # noqa: E402

PROMPT = "a photo of a man img wearing a red hat"
FAST_SAMPLING = ["--steps", "2", "--start-merge-step", "0"]  # the CLI runs': 2 steps, the ID from the first step
STEPS, MERGE = 10, 3


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    """Tiny SDXL (diffusers source + converted), a tiny V2 checkpoint (converted), the tiny SCRFD-layout
    detector and ArcFace, two reference photos."""
    from PIL import Image

    from persongen_jax.testing.tiny_eval import make_tiny_arcface, make_tiny_detector
    from persongen_jax.testing.tiny_photomaker import make_tiny_photomaker
    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl
    from weights_conversion.convert import convert_sdxl
    from weights_conversion.lora import convert_photomaker

    root = tmp_path_factory.mktemp("pm_v2")
    src = make_tiny_sdxl(root / "src")
    convert_sdxl(src, root / "sdxl")
    pm_bin = make_tiny_photomaker(root / "photomaker-v2.bin", seed=1, version="v2")
    convert_photomaker(pm_bin, root / "photomaker", unet=root / "sdxl" / "unet")
    faces = make_tiny_detector(root / "faces")
    arcface = make_tiny_arcface(root / "arcface")
    refs = []
    for i in range(2):
        refs.append(root / f"face{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 36, 3)).astype(np.uint8)).save(refs[-1])
    return dict(
        root=root,
        src=src,
        dst=root / "sdxl",
        pm_bin=pm_bin,
        pm=root / "photomaker",
        faces=faces,
        arcface=arcface,
        refs=refs,
        # The command lines' flags for the V2 folder (generate, evaluate, the app) and for its face models.
        model_args=["--model", str(root / "sdxl"), "--photomaker", str(root / "photomaker")],
        face_args=["--face-models", str(faces), "--arcface", str(arcface)],
    )


@pytest.fixture(scope="module")
def pipe(v2):
    from persongen_jax.pipeline.pipeline import PersonGenPipeline

    return PersonGenPipeline.from_pretrained(
        v2["dst"], photomaker=v2["pm"], face_models=v2["faces"], arcface=v2["arcface"]
    )


def _torch_loop(v2, pipe, refs, id_embeds, noise, size, start_merge_step):
    """The official V2 pipeline's denoising loop on diffusers' SDXL modules (fp32, LoRA fused)."""
    from test_id_encoder_v2 import TorchPhotoMakerV2IDEncoder
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from persongen_jax.models.id_encoder_v2 import PhotoMakerV2IDEncoder
    from persongen_jax.pipeline import prompt as prompt_lib
    from persongen_jax.pipeline.image_processing import clip_preprocess

    helpers.torch_precise()
    src = v2["src"]
    unet = diffusers.UNet2DConditionModel.from_pretrained(src / "unet").eval()
    te1 = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder_2").eval()
    sched = diffusers.EulerDiscreteScheduler.from_pretrained(src / "scheduler")
    ckpt = torch.load(v2["pm_bin"], weights_only=True)
    with torch.no_grad():  # PEFT LoRA, alpha = rank: W += B @ A (diffusers' fuse_lora at scale 1)
        for key, a in ckpt["lora_weights"].items():
            if key.endswith(".lora_A.weight"):
                module = unet.get_submodule(key[len("unet.") : -len(".lora_A.weight")])
                module.weight += ckpt["lora_weights"][key.replace("lora_A", "lora_B")] @ a
    encoder = TorchPhotoMakerV2IDEncoder(PhotoMakerV2IDEncoder.preset_config("tiny")).eval()
    encoder.load_state_dict(ckpt["id_encoder"], strict=True)

    batch = prompt_lib.make_prompt_batch(pipe.tokenizers, PROMPT, 2 * len(refs), pipe.trigger_word)

    def text(ids_1, ids_2):
        h1 = te1(torch.from_numpy(ids_1).long(), output_hidden_states=True).hidden_states[-2]
        out2 = te2(torch.from_numpy(ids_2).long(), output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], -1), out2.text_embeds

    size_v = encoder.config.image_size
    pixels = np.stack([clip_preprocess(im, size_v) for im in refs])[None].transpose(0, 1, 4, 2, 3)
    with torch.no_grad():
        embeds, pooled = text(batch.ids_1, batch.ids_2)
        text_only, text_only_pooled = text(batch.text_only_ids_1, batch.text_only_ids_2)
        fused = encoder(
            torch.from_numpy(np.ascontiguousarray(pixels)),
            embeds,
            torch.from_numpy(batch.class_tokens_mask),
            torch.from_numpy(id_embeds[None]),
        )
        neg, neg_pooled = torch.zeros_like(fused), torch.zeros_like(pooled)  # force_zeros_for_empty_prompt
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        sched.set_timesteps(STEPS)
        latents = torch.from_numpy(noise.transpose(0, 3, 1, 2)) * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            if i <= start_merge_step:
                context, add_text = torch.cat([neg, text_only]), torch.cat([neg_pooled, text_only_pooled])
            else:
                context, add_text = torch.cat([neg, fused]), torch.cat([neg_pooled, pooled])
            eps = unet(
                x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": add_text, "time_ids": time_ids}
            ).sample
            eps_u, eps_c = eps.chunk(2)
            latents = sched.step(eps_u + 5.0 * (eps_c - eps_u), t, latents).prev_sample
    return latents.numpy().transpose(0, 2, 3, 1)


def _our_latents(pipe, cond, noise, start_merge_step):
    import jax.numpy as jnp
    from flax import nnx

    from persongen_jax.pipeline.sampling import denoise
    from persongen_jax.pipeline.schedulers import scheduler_from_config

    sched = scheduler_from_config(pipe.scheduler_config, "euler")
    state = sched.set_timesteps(STEPS)
    if not hasattr(pipe, "_test_loop"):  # one compiled loop; the merge step is a traced value
        pipe._test_loop = nnx.jit(
            lambda unet, x, c, m: denoise(
                unet, sched, state, x * sched.init_noise_sigma(state), c, guidance_scale=5.0, start_merge_step=m
            )
        )
    return np.asarray(pipe._test_loop(pipe.unet, jnp.asarray(noise), cond, jnp.int32(start_merge_step)))


def test_v2_sampling_loop_matches_torch(v2, pipe):
    from PIL import Image

    assert pipe.id_encoder.version == "v2"
    refs = [Image.open(p).convert("RGB") for p in v2["refs"]]
    id_embeds = pipe.face_id_embeds(refs)  # the face models load on first use
    assert id_embeds.shape == (2, 16) and np.linalg.norm(id_embeds, axis=1).min() > 0
    size = pipe.default_size
    h = size // pipe.vae.downscale_factor
    noise = np.random.default_rng(0).standard_normal((1, h, h, 4)).astype(np.float32)
    cond = pipe.encode(PROMPT, refs, height=size, width=size, id_embeds=id_embeds)
    ours = _our_latents(pipe, cond, noise, MERGE)
    ref = _torch_loop(v2, pipe, refs, id_embeds, noise, size, MERGE)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= 1e-4, f"final latents: max relative error {err:.2e}"
    # The ID tokens act (inside the loop, after step MERGE): never merging gives other latents.
    assert np.abs(_our_latents(pipe, cond, noise, STEPS) - ours).max() / np.abs(ref).max() > 1e-3


def test_reference_embeddings_are_the_raw_arcface_of_the_most_confident_face(v2):
    """As the official `faces[0]['embedding']`: the highest-scoring face, aligned, embedded, not normalised."""
    from PIL import Image

    from persongen_jax.evaluation.faces import norm_crop
    from persongen_jax.evaluation.id_embeds import ReferenceFaceEmbedder
    from persongen_jax.models import iresnet

    embedder = ReferenceFaceEmbedder.from_pretrained(v2["faces"], v2["arcface"])
    rgb = np.asarray(Image.open(v2["refs"][0]).convert("RGB"))
    faces = embedder.detector.detect(rgb)
    expected = np.asarray(iresnet.embed(embedder.arcface, norm_crop(rgb, faces.kps[0], 112)[None], normalize=False))
    got = embedder([v2["refs"][0]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(np.linalg.norm(got)) - 1.0) > 1e-2  # the raw embedding, not `normed_embedding`


def test_generate_with_a_v2_folder(v2, tmp_path, capsys):
    """`generate --photomaker V2_DIR --face-models --arcface`: images, the version said and recorded; without
    the face models, or with a reference without a face: one `error:` line naming the flags / the file."""
    import json

    from PIL import Image

    from persongen_jax.generate import main

    base = [*v2["model_args"], "--prompt", PROMPT, *FAST_SAMPLING]
    refs = [a for p in v2["refs"] for a in ("--ref", str(p))]
    faces = v2["face_args"]
    assert main(base + refs + faces + ["--out", str(tmp_path / "a")]) == 0
    assert "ID encoder: PhotoMaker v2" in capsys.readouterr().err
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["photomaker_version"] == "v2" and settings["images"] == ["seed_0.png"]

    assert main(base + refs + ["--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--face-models" in err and "--arcface" in err

    black = tmp_path / "no_face.png"
    Image.fromarray(np.zeros((40, 36, 3), np.uint8)).save(black)
    assert main(base + refs + ["--ref", str(black)] + faces + ["--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err  # before loading SDXL
    assert err.startswith("error: ") and err.count("\n") == 1 and str(black) in err and "no face" in err
    assert not (tmp_path / "c" / "seed_0.png").exists()


def test_app_with_a_v2_folder(v2, pipe, tmp_path, capsys):
    """The web app: without --face-models / --arcface a V2 folder is refused at start-up (one line, before any
    loading); a reference photo without a face is the page's message (a PipelineError naming it, which the page
    shows as its error), raised before any sampling."""
    from PIL import Image

    from persongen_jax import app
    from persongen_jax.pipeline.pipeline import PipelineError

    assert app.main(v2["model_args"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "--face-models" in err[0] and "PhotoMaker V2" in err[0]

    size = pipe.default_size
    req = app.Request(prompt=PROMPT, num_images=1, num_steps=2, start_merge_step=0, height=size, width=size)
    gen = app.Generator(pipe, None, source={}, defaults=req, workdir=tmp_path)
    black = Image.fromarray(np.zeros((40, 36, 3), np.uint8))
    with pytest.raises(PipelineError, match=r"no face found in reference image\(s\) no_face\.png"):
        gen.generate([("face0.png", Image.open(v2["refs"][0])), ("no_face.png", black)], req)


def test_evaluate_mode_b_with_a_v2_folder(v2, tmp_path, capsys):
    """`evaluate` mode B on a V2 folder: refused before loading without the face models; with them, the
    protocol runs (the same --face-models / --arcface feed Face-Sim and V2's ArcFace embeddings)."""
    import json
    import shutil

    from persongen_jax.evaluate import main

    (tmp_path / "val" / "alice").mkdir(parents=True)
    shutil.copy(v2["refs"][0], tmp_path / "val" / "alice" / "a.png")
    argv = [*v2["model_args"], "--sets", f"in_train={tmp_path / 'val'}", "--num-prompts", "1", "--seeds", "0"]
    argv += FAST_SAMPLING
    assert main(argv + ["--metrics", "none", "--out", str(tmp_path / "a")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "--face-models" in err[0]
    scoring = ["--metrics", "face_sim", *v2["face_args"]]
    assert main(argv + scoring + ["--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["sets"]["in_train"]["n_images"] == 1
