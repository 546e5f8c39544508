"""50-step classifier-free-guided SDXL sampling loop, JAX (one compiled loop) vs diffusers PyTorch.

    python scripts/bench/sample.py                     # mid-size SDXL-shaped UNet, 32x32 latents, 1 image
    python scripts/bench/sample.py --batch 4 --dtype bfloat16 --attention cudnn   # on a GPU

Same UNet config as scripts/bench/unet_step.py, Euler-discrete scheduler with the
SDXL config, guidance 5, fixed random prompt embeddings (text encoders are not
part of the loop). PyTorch side: diffusers' `StableDiffusionXLPipeline.__call__`
with `prompt_embeds=` and `output_type="latent"` (its own denoising loop, eager).
JAX side: `persongen_jax.pipeline.sampling.denoise` under one `jax.jit`
(`lax.fori_loop` over the steps). fp32 with highest-precision matmuls unless
--dtype bfloat16. Each framework runs in its own child process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from persongen_jax.pipeline import SDXL_SCHEDULER_CONFIG as SCHEDULER  # noqa: E402 -- the library's (JAX-free)
from scripts.bench import common  # noqa: E402
from scripts.bench.unet_step import unet_config, unet_parser  # noqa: E402

GUIDANCE = 5.0


def embeddings(cfg, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    d = cfg["cross_attention_dim"]
    return dict(prompt=f(1, 77, d), pooled=f(1, pooled), negative=f(1, 77, d), negative_pooled=f(1, pooled))


def torch_pipeline(cls, unet, **components):
    """diffusers' SDXL pipeline `cls` around `unet` alone (the benchmarks pass prompt embeddings and take
    latents: no VAE, no text encoders), Euler with SCHEDULER, no progress bar."""
    from diffusers import EulerDiscreteScheduler

    without = dict.fromkeys(("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    pipe = cls(**without, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SCHEDULER), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(e: dict, hw: int, steps: int) -> dict:
    """The diffusers pipeline call's arguments: the `embeddings` `e` (torch tensors), hw x hw latents
    (the pipeline takes pixel sizes: vae_scale_factor 8 without a VAE), guidance 5, latents out."""
    return dict(
        prompt_embeds=e["prompt"],
        pooled_prompt_embeds=e["pooled"],
        negative_prompt_embeds=e["negative"],
        negative_pooled_prompt_embeds=e["negative_pooled"],
        height=8 * hw,
        width=8 * hw,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        output_type="latent",
    )


def jax_conditioning(e: dict, hw: int, **extra):
    """`denoise`'s Conditioning of the `embeddings` `e` (jax arrays) at hw x hw latents, then `extra`."""
    from persongen_jax.pipeline.sampling import Conditioning, sdxl_time_ids

    return Conditioning(
        prompt_embeds=e["prompt"],
        pooled=e["pooled"],
        text_only_embeds=e["prompt"],
        text_only_pooled=e["pooled"],
        negative_embeds=e["negative"],
        negative_pooled=e["negative_pooled"],
        time_ids=sdxl_time_ids(8 * hw, 8 * hw),
        **extra,
    )


def run_torch(args) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    dev = common.torch_device()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    cfg = unet_config(args.size, args.hw)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(dev, dtype).eval()
    pipe = torch_pipeline(StableDiffusionXLPipeline, unet)
    rep = lambda x: x.repeat(args.batch, *([1] * (x.ndim - 1)))
    e = {k: rep(torch.from_numpy(v).to(dev, dtype)) for k, v in embeddings(cfg).items()}

    def call():
        with torch.no_grad():
            return pipe(**pipeline_kwargs(e, args.hw, args.steps)).images

    return common.torch_result(call, args.repeats, 1, dev)


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from persongen_jax.models.unet import UNet2DConditionModel
    from persongen_jax.pipeline.sampling import denoise
    from persongen_jax.pipeline.schedulers import EulerDiscreteScheduler

    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    cfg = unet_config(args.size, args.hw)
    unet = UNet2DConditionModel.from_config(
        cfg,
        rngs=nnx.Rngs(0),
        dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None,
        param_dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32,
        attention_impl=args.attention,
    )
    sched = EulerDiscreteScheduler.from_config(SCHEDULER)
    state = sched.set_timesteps(args.steps)
    cond = jax_conditioning({k: jnp.asarray(v) for k, v in embeddings(cfg).items()}, args.hw)
    graphdef, params = nnx.split(unet)

    @jax.jit
    def loop(params, noise, cond):
        m = nnx.merge(graphdef, params)
        return denoise(
            m, sched, state, noise * sched.init_noise_sigma(state), cond, guidance_scale=GUIDANCE, start_merge_step=0
        )

    noise = jax.random.normal(jax.random.key(0), (args.batch, args.hw, args.hw, 4))
    compiled, compile_s = common.compile_timed(loop, params, noise, cond)
    med, times = common.time_jax(lambda: compiled(params, noise, cond), args.repeats, 1)
    # XLA's cost analysis counts a while-loop body once (it does not know the trip count):
    # scale by the number of steps (the ops outside the loop are negligible).
    flops = common.xla_flops(compiled)
    flops = flops * args.steps if flops else None
    return common.jax_result(med, times, compile_s, flops=flops, **common.xla_figures(compiled, med, flops, args.dtype))


def print_times(reference: str, pt: dict, jx: dict) -> None:
    """The sampling benchmarks' lines (control_sample.py's too): each side's median time and peak memory
    (JAX: and its compile time), the names in one column, then the ratio."""
    print(f"  {reference}: {pt['median_s']:7.2f} s   peak {pt['peak_mib']:7.0f} MiB")
    print(
        f"  {'jax (one compiled loop)':{len(reference)}s}: {jx['median_s']:7.2f} s   "
        f"peak {jx['peak_mib']:7.0f} MiB   compile {jx['compile_s']:.1f} s"
    )
    print(common.ratio_line(pt, jx))


def report(args, pt: dict, jx: dict) -> None:
    print(
        f"{args.steps}-step CFG sampling (Euler), mid-size SDXL-shaped UNet, {args.batch} image(s), "
        f"{args.hw}x{args.hw} latents, {args.dtype}, median of {args.repeats}"
    )
    print_times("diffusers pipeline (eager)", pt, jx)
    if jx.get("flops"):
        print(common.flops_line(f"  XLA flops/call {jx['flops'] / 1e12:.2f} TFLOP", jx))


def main():
    p = unet_parser(
        __doc__, batch=dict(default=1, help="images per call (x2 with guidance)"), steps=50, timing=("--repeats", 3)
    )
    common.jax_vs_pytorch(__file__, p.parse_args(), run_jax, run_torch, report)


if __name__ == "__main__":
    main()
