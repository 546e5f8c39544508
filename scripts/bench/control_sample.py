"""50-step CFG sampling with one SDXL ControlNet: JAX (one compiled loop) vs diffusers'
StableDiffusionXLControlNetPipeline, measured in the same run.

    python scripts/bench/control_sample.py                        # tiny UNet + its ControlNet, 32x32 latents
    python scripts/bench/control_sample.py --size mid --hw 32     # the mid-size SDXL-shaped UNet of sample.py

The UNet and the scheduler are scripts/bench/sample.py's; the ControlNet is diffusers' `ControlNetModel.from_unet`
shape (the UNet's encoder half + an 8x conditioning embedding), control image [1, 8*hw, 8*hw, 3] random in
[0, 1], conditioning scale 1 at every step. PyTorch side: the pipeline's own eager loop with `prompt_embeds=`
and `output_type="latent"`. JAX side: `persongen_jax.pipeline.sampling.denoise(..., controlnets=[cn])` under
one `jax.jit`. fp32, highest-precision matmuls. Each framework runs in its own child process; each line gives
the median of --repeats calls after a warm-up call and the process's peak RSS.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402
from scripts.bench.sample import (  # noqa: E402
    GUIDANCE,
    SCHEDULER,
    embeddings,
    jax_conditioning,
    pipeline_kwargs,
    print_times,
    torch_pipeline,
)
from scripts.bench.unet_step import unet_config  # noqa: E402

CN_EMBEDDING = [16, 32, 96, 256]  # diffusers' default: control images at 8x the latent size


def control_image(hw: int):
    import numpy as np

    return np.random.default_rng(1).random((1, 8 * hw, 8 * hw, 3)).astype(np.float32)


def run_torch(args) -> dict:
    import torch

    from persongen_jax.testing.torch_init import allow_torchvision_import, randomize_

    allow_torchvision_import()
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel

    torch.backends.cuda.matmul.allow_tf32 = False
    # XLA:CPU flushes denormals to zero; eager PyTorch does not by default, and random tiny models produce
    # denormals that slow every CPU kernel many times over: both sides flush, so the ratio measures the loops.
    torch.set_flush_denormal(True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = unet_config(args.size, args.hw)
    unet = UNet2DConditionModel(**cfg).eval()
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CN_EMBEDDING).eval()
    randomize_(unet, seed=0)  # random weights on both sides (the JAX side: modeling.random_init)
    randomize_(cn, seed=1)  # no zero convolutions: the residuals are real work for both sides
    pipe = torch_pipeline(StableDiffusionXLControlNetPipeline, unet.to(dev), controlnet=cn.to(dev))
    e = {k: torch.from_numpy(v).to(dev) for k, v in embeddings(cfg).items()}
    image = torch.from_numpy(control_image(args.hw).transpose(0, 3, 1, 2).copy()).to(dev)

    def call():
        with torch.no_grad():
            return pipe(**pipeline_kwargs(e, args.hw, args.steps), image=image).images

    return common.torch_result(call, args.repeats, 1, dev)


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from persongen_jax.models import modeling
    from persongen_jax.models.controlnet import ControlNetModel
    from persongen_jax.models.unet import UNet2DConditionModel
    from persongen_jax.pipeline.sampling import ControlConditioning, control_keep, denoise
    from persongen_jax.pipeline.schedulers import EulerDiscreteScheduler

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = unet_config(args.size, args.hw)
    unet = modeling.random_init(UNet2DConditionModel, cfg, seed=0)
    cn = modeling.random_init(
        ControlNetModel, ControlNetModel.config_for_unet(cfg, conditioning_embedding_out_channels=CN_EMBEDDING), seed=1
    )
    sched = EulerDiscreteScheduler.from_config(SCHEDULER)
    state = sched.set_timesteps(args.steps)
    e = {k: jnp.asarray(v) for k, v in embeddings(cfg).items()}
    controls = (ControlConditioning(image=jnp.asarray(control_image(args.hw)), scale=jnp.float32(1.0)),)
    cond = jax_conditioning(e, args.hw, controls=controls)
    keep = control_keep(controls, args.steps)
    (udef, uparams), (cdef, cparams) = nnx.split(unet), nnx.split(cn)

    @jax.jit
    def loop(uparams, cparams, noise, cond, keep):
        return denoise(
            nnx.merge(udef, uparams),
            sched,
            state,
            noise * sched.init_noise_sigma(state),
            cond,
            guidance_scale=GUIDANCE,
            start_merge_step=0,
            controlnets=[nnx.merge(cdef, cparams)],
            controlnet_keep=keep,
        )

    noise = jax.random.normal(jax.random.key(0), (1, args.hw, args.hw, 4))
    compiled, compile_s = common.compile_timed(loop, uparams, cparams, noise, cond, keep)
    med, times = common.time_jax(lambda: compiled(uparams, cparams, noise, cond, keep), args.repeats, 1)
    return common.jax_result(med, times, compile_s, peak_mib=common.peak_rss_mib())


def report(args, pt: dict, jx: dict) -> None:
    print(
        f"{args.steps}-step CFG sampling (Euler) with one ControlNet, {args.size} UNet, 1 image, "
        f"{args.hw}x{args.hw} latents, fp32, median of {args.repeats}"
    )
    print_times("diffusers StableDiffusionXLControlNetPipeline (eager)", pt, jx)


def main():
    p = common.framework_parser(__doc__)
    p.add_argument("--hw", type=int, default=32, help="latent height = width")
    p.add_argument("--size", default="tiny", help='UNet shapes: "mid" or a presets size (tiny, micro, sdxl_base)')
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    common.jax_vs_pytorch(__file__, p.parse_args(), run_jax, run_torch, report)


if __name__ == "__main__":
    main()
