"""ControlNet inside the compiled sampling loop: 10-step final latents against diffusers'
StableDiffusionXLControlNetPipeline (one ControlNet; two ControlNets with different scales and guidance
windows = diffusers' MultiControlNetModel), and against a PyTorch reference of PhotoMaker's ControlNet loop
(ID embedding merged after start_merge_step, the ControlNet on the text-only prompt). Same Euler scheduler,
same initial latents, fp32. Tolerance: rtol = atol = 1e-4 on the final latents.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import helpers  # noqa: E402

helpers.allow_torchvision_import()
diffusers = pytest.importorskip("diffusers")

PROMPT = "a photo of a man wearing a red hat"
STEPS = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from persongen_jax.pipeline.pipeline import PersonGenPipeline
    from persongen_jax.testing.tiny_sdxl import make_tiny_controlnet

    root = tmp_path_factory.mktemp("control")
    src, _ = helpers.converted_tiny_sdxl(root)
    from weights_conversion.__main__ import main as convert

    cns = []
    for k in range(2):  # in-process: the CLI's subprocess path is test_controlnet's
        make_tiny_controlnet(root / f"cn{k}_src", seed=10 + k)
        assert (
            convert(
                ["controlnet", str(root / f"cn{k}_src"), str(root / f"cn{k}"), "--unet", str(root / "sdxl" / "unet")]
            )
            == 0
        )
        cns.append(root / f"cn{k}")
    pipe = PersonGenPipeline.from_pretrained(root / "sdxl", controlnets=cns)
    rng = np.random.default_rng(0)
    size = pipe.default_size
    # Control images at another size than the output: both sides resize them (PIL Lanczos).
    images = [rng.integers(0, 256, (size + 6, size - 4, 3)).astype(np.uint8) for _ in range(2)]
    noise = rng.standard_normal((2, size // 2, size // 2, 4)).astype(np.float32)
    return {
        "root": root,
        "src": src,
        "cn_src": [root / f"cn{k}_src" for k in range(2)],
        "pipe": pipe,
        "images": images,
        "noise": noise,
        "size": size,
    }


def _ours(pipe, cond, noise, active, start_merge_step=0):
    """Final latents of our compiled loop (the same `denoise` the sampler runs, without the VAE decode)."""
    import jax
    import jax.numpy as jnp

    from persongen_jax.pipeline.sampling import control_keep, denoise
    from persongen_jax.pipeline.schedulers import scheduler_from_config

    sched = scheduler_from_config(pipe.scheduler_config, "euler")
    state = sched.set_timesteps(STEPS)
    cns = [pipe.controlnets[i] for i in active]
    keep = control_keep(cond.controls, STEPS)
    from flax import nnx

    @nnx.jit
    def run(unet, cns, noise, cond, keep):
        return denoise(
            unet,
            sched,
            state,
            noise * sched.init_noise_sigma(state),
            cond,
            guidance_scale=5.0,
            start_merge_step=start_merge_step,
            controlnets=cns,
            controlnet_keep=keep,
        )

    return np.asarray(jax.block_until_ready(run(pipe.unet, cns, jnp.asarray(noise), cond, keep)))


def _reference_pipeline(tiny, cn_idx):
    from PIL import Image

    helpers.torch_precise()
    nets = [diffusers.ControlNetModel.from_pretrained(tiny["cn_src"][k]) for k in cn_idx]
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny["src"], controlnet=nets[0] if len(nets) == 1 else nets, torch_dtype=torch.float32
    )
    ref.set_progress_bar_config(disable=True)
    return ref, [Image.fromarray(tiny["images"][k]) for k in cn_idx]


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# The reference pipelines' sampling, as `_ours` samples: STEPS steps, guidance 5, 2 images.
REFERENCE_SAMPLING = dict(num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2, output_type="latent")


def _reference_latents(ref, tiny, image, **control) -> np.ndarray:
    """A diffusers pipeline's final latents [B, h, w, C] for PROMPT from the fixture's noise, with IMAGE and the
    pipeline's own CONTROL arguments."""
    size = tiny["size"]
    with torch.no_grad():
        out = ref(
            PROMPT, image=image, height=size, width=size, latents=_nchw(tiny["noise"]), **REFERENCE_SAMPLING, **control
        )
    return out.images.numpy().transpose(0, 2, 3, 1)


def test_one_controlnet_matches_diffusers_pipeline(tiny):
    pipe, size, noise = tiny["pipe"], tiny["size"], tiny["noise"]
    ref, images = _reference_pipeline(tiny, [0])
    out = _reference_latents(ref, tiny, images[0], controlnet_conditioning_scale=0.8)
    active, controls = pipe.control_inputs([tiny["images"][0], None], height=size, width=size, scales=0.8)
    assert active == (0,)
    cond = pipe.encode(PROMPT, height=size, width=size, controls=controls)
    helpers.assert_close(_ours(pipe, cond, noise, active), out, rtol=1e-4, atol=1e-4, name="final latents")


def test_two_controlnets_match_multicontrolnet(tiny):
    """Different scales and guidance windows (start/end fractions that switch each ControlNet on/off mid-loop)."""
    pipe, size, noise = tiny["pipe"], tiny["size"], tiny["noise"]
    ref, images = _reference_pipeline(tiny, [0, 1])
    assert isinstance(ref.controlnet, diffusers.models.controlnets.MultiControlNetModel)
    kw = dict(scales=[0.7, 1.3], guidance_start=[0.0, 0.25], guidance_end=[0.6, 1.0])
    out = _reference_latents(
        ref,
        tiny,
        images,
        controlnet_conditioning_scale=kw["scales"],
        control_guidance_start=kw["guidance_start"],
        control_guidance_end=kw["guidance_end"],
    )
    active, controls = pipe.control_inputs(tiny["images"], height=size, width=size, **kw)
    cond = pipe.encode(PROMPT, height=size, width=size, controls=controls)
    ours = _ours(pipe, cond, noise, active)
    helpers.assert_close(ours, out, rtol=1e-4, atol=1e-4, name="final latents")
    # The second ControlNet matters (a test that cannot fail without it would prove nothing).
    _, only_first = pipe.control_inputs(
        [tiny["images"][0], None], height=size, width=size, scales=0.7, guidance_end=0.6
    )
    alone = _ours(pipe, pipe.encode(PROMPT, height=size, width=size, controls=only_first), noise, (0,))
    assert np.abs(alone - ours).max() > 1e-3


def test_photomaker_with_controlnet_matches_reference_loop(tiny, tmp_path):
    """PhotoMaker's ControlNet pipeline loop in PyTorch (diffusers' UNet, ControlNet and Euler scheduler) fed
    with our prompt / ID / negative embeddings: steps <= start_merge_step use the text-only prompt, later ones
    the ID-fused prompt; the ControlNet always sees the text-only prompt and the current pooled embedding."""
    import shutil

    from PIL import Image

    from persongen_jax.pipeline.pipeline import PersonGenPipeline
    from persongen_jax.testing.tiny_photomaker import make_tiny_photomaker

    root = tiny["root"]
    pm = tmp_path / "photomaker"
    from weights_conversion.__main__ import main as convert

    assert (
        convert(
            [
                "photomaker",
                str(make_tiny_photomaker(tmp_path / "pm.bin")),
                str(pm),
                "--unet",
                str(root / "sdxl" / "unet"),
            ]
        )
        == 0
    )
    shutil.rmtree(pm / "lora")  # the ID encoder only: the reference UNet is the plain one
    pipe = PersonGenPipeline.from_pretrained(root / "sdxl", photomaker=pm, controlnets=[root / "cn0"])
    size, noise, start_merge = tiny["size"], tiny["noise"], 3
    face = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 36, 3)).astype(np.uint8))
    active, controls = pipe.control_inputs([tiny["images"][0]], height=size, width=size, scales=0.9, guidance_end=0.8)
    cond = pipe.encode(
        "a photo of a man img wearing a red hat",
        [face],
        negative_prompt="a hat",
        height=size,
        width=size,
        controls=controls,
    )
    ours = _ours(pipe, cond, noise, active, start_merge_step=start_merge)

    helpers.torch_precise()
    ref, _ = _reference_pipeline(tiny, [0])
    unet, cn, sched = ref.unet, ref.controlnet, ref.scheduler
    T = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    neg, neg_pooled = T(cond.negative_embeds).repeat(2, 1, 1), T(cond.negative_pooled).repeat(2, 1)
    fused, text_only = T(cond.prompt_embeds).repeat(2, 1, 1), T(cond.text_only_embeds).repeat(2, 1, 1)
    pooled, text_only_pooled = T(cond.pooled).repeat(2, 1), T(cond.text_only_pooled).repeat(2, 1)
    time_ids = T(cond.time_ids).repeat(4, 1)
    image = torch.cat([_nchw(np.asarray(controls[0].image))] * 4)
    sched.set_timesteps(STEPS)
    latents = _nchw(noise) * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
            merged = i > start_merge
            emb = torch.cat([neg, fused if merged else text_only])
            added = {
                "text_embeds": torch.cat([neg_pooled, pooled if merged else text_only_pooled]),
                "time_ids": time_ids,
            }
            keep = 1.0 - float(i / STEPS < 0.0 or (i + 1) / STEPS > 0.8)
            down, mid = cn(
                x_in,
                t,
                encoder_hidden_states=torch.cat([neg, text_only]),
                controlnet_cond=image,
                conditioning_scale=0.9 * keep,
                added_cond_kwargs=added,
                return_dict=False,
            )
            eps = unet(
                x_in,
                t,
                encoder_hidden_states=emb,
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
            eps_u, eps_c = eps.chunk(2)
            latents = sched.step(eps_u + 5.0 * (eps_c - eps_u), t, latents).prev_sample
    helpers.assert_close(ours, latents.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4, name="final latents")


def test_generate_cli_canny_control_style_and_aspect(tiny, tmp_path, capsys):
    """generate --controlnet --control-image --control-preprocess canny --style --aspect: the images are the
    pipeline's for the canny edges of the image, the styled prompt / merged negative, at the 16:9 preset scaled
    to the tiny model (32 x 18); settings.json holds the template text. Bad options: one `error:` line."""
    import json

    from PIL import Image

    from persongen_jax.generate import main
    from persongen_jax.pipeline.control import STYLES, apply_style, canny

    root, pipe = tiny["root"], tiny["pipe"]
    photo = tmp_path / "pose.png"
    Image.fromarray(np.kron(tiny["images"][0], np.ones((2, 2, 1), np.uint8))).save(photo)
    base = ["--model", str(root / "sdxl"), "--prompt", "a photo of a man", "--steps", "2", "--seeds", "3"]
    argv = base + [
        "--controlnet",
        str(root / "cn1"),
        "--control-image",
        str(photo),
        "--control-scale",
        "1.5",
        "--control-preprocess",
        "canny",
        "--style",
        "Cinematic",
        "--negative-prompt",
        "a hat",
        "--aspect",
        "16:9",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["style_template"] == {"prompt": STYLES["Cinematic"][0], "negative_prompt": STYLES["Cinematic"][1]}
    assert settings["styled_negative_prompt"] == STYLES["Cinematic"][1] + " a hat"
    assert settings["control_scales"] == [1.5] and settings["control_preprocess"] == ["canny"]
    image = np.asarray(Image.open(tmp_path / "out" / "seed_3.png"))
    assert image.shape == (18, 32, 3)

    # The same through the library (pipe holds cn0, cn1: cn0 off): identical pixels; without control: different.
    prompt, negative = apply_style("Cinematic", "a photo of a man", "a hat")
    kw = dict(seeds=[3], num_steps=2, height=18, width=32, negative_prompt=negative)
    same = pipe(prompt, control_images=[None, canny(Image.open(photo))], control_scales=[1.0, 1.5], **kw)
    np.testing.assert_array_equal(same[0], image)
    assert not np.array_equal(pipe(prompt, **kw)[0], image)

    def fails(*extra, after_loading=False):
        assert main(base + ["--out", str(tmp_path / "bad"), *extra]) == 1
        err = capsys.readouterr().err.strip()
        if after_loading:  # the "loading MODEL ..." progress line comes first
            assert err.startswith("loading "), err
            err = err.split("\n", 1)[1]
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        return err

    err = fails("--style", "Vaporwave")
    assert "unknown style 'Vaporwave'" in err and "'Cinematic'" in err and "'(No style)'" in err
    assert "unknown aspect '5:4'" in fails("--aspect", "5:4")
    assert "--aspect sets the size" in fails("--aspect", "16:9", "--height", "32")
    assert "1 --control-image for 2 --controlnet" in fails(
        "--controlnet", "a", "--controlnet", "b", "--control-image", str(photo)
    )
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert "--control-image" in fails("--controlnet", str(root / "cn0"), "--control-image", str(bad))
    # A ControlNet made for another UNet: named, shapes listed (after the model loads: it needs the UNet).
    from persongen_jax.testing.tiny_sdxl import make_tiny_controlnet

    make_tiny_controlnet(tmp_path / "other_src", unet=helpers.parity_unet_config())
    (tmp_path / "other_unet").mkdir()
    (tmp_path / "other_unet" / "config.json").write_text(json.dumps(helpers.parity_unet_config()))
    from weights_conversion.__main__ import main as convert

    assert (
        convert(
            ["controlnet", str(tmp_path / "other_src"), str(tmp_path / "other"), "--unet", str(tmp_path / "other_unet")]
        )
        == 0
    )
    err = fails("--controlnet", str(tmp_path / "other"), "--control-image", str(photo), after_loading=True)
    assert "made for another UNet: residual channels [32, 32" in err and "vs the UNet's [32, 32, 32, 32, 64" in err


def test_t2i_adapter_loop_matches_diffusers_and_generate_cli(tiny, tmp_path, capsys):
    """A T2I-Adapter for the tiny UNet: 10-step final latents vs diffusers' StableDiffusionXLAdapterPipeline
    (adapter_conditioning_scale 0.8, factor 0.5: the features stop after step 5); generate --t2i-adapter
    --adapter-image gives the library's pixels."""
    from PIL import Image

    from persongen_jax.generate import main
    from persongen_jax.pipeline.sampling import Conditioning
    from weights_conversion.__main__ import main as convert

    root, pipe, size, noise = tiny["root"], tiny["pipe"], tiny["size"], tiny["noise"]
    helpers.torch_precise()
    ref_adapter = diffusers.T2IAdapter(
        in_channels=3, channels=[32, 64, 64], num_res_blocks=2, downscale_factor=4, adapter_type="full_adapter_xl"
    ).eval()
    helpers.randomize_(ref_adapter, seed=7)
    ref_adapter.save_pretrained(tmp_path / "t2i_src")
    assert (
        convert(
            ["t2i-adapter", str(tmp_path / "t2i_src"), str(tmp_path / "t2i"), "--unet", str(root / "sdxl" / "unet")]
        )
        == 0
    )
    capsys.readouterr()
    pipe.add_t2i_adapter(tmp_path / "t2i")
    image = Image.fromarray(tiny["images"][1])

    ref = diffusers.StableDiffusionXLAdapterPipeline.from_pretrained(
        tiny["src"], adapter=ref_adapter, torch_dtype=torch.float32
    )
    ref.set_progress_bar_config(disable=True)
    out = _reference_latents(ref, tiny, image, adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5)
    cond: Conditioning = pipe.encode(PROMPT, height=size, width=size)
    import jax.numpy as jnp

    cond = cond.replace(
        t2i_features=pipe.t2i_features(image, height=size, width=size, scale=0.8), t2i_steps=jnp.int32(int(STEPS * 0.5))
    )
    helpers.assert_close(_ours(pipe, cond, noise, ()), out, rtol=1e-4, atol=1e-4, name="final latents")

    photo = tmp_path / "sketch.png"
    image.save(photo)
    argv = [
        "--model",
        str(root / "sdxl"),
        "--prompt",
        PROMPT,
        "--steps",
        "2",
        "--seeds",
        "1",
        "--t2i-adapter",
        str(tmp_path / "t2i"),
        "--adapter-image",
        str(photo),
        "--adapter-scale",
        "1.2",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    got = np.asarray(Image.open(tmp_path / "o" / "seed_1.png"))
    kw = dict(seeds=[1], num_steps=2)
    np.testing.assert_array_equal(pipe(PROMPT, adapter_image=image, adapter_conditioning_scale=1.2, **kw)[0], got)
    assert not np.array_equal(pipe(PROMPT, **kw)[0], got)
    assert main(argv[:-6] + ["--out", str(tmp_path / "p")]) == 1  # --t2i-adapter without --adapter-image
    assert "--t2i-adapter and --adapter-image go together" in capsys.readouterr().err
