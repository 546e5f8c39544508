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

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402
from scripts.bench.unet_step import unet_config  # noqa: E402

SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def embeddings(cfg, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    d = cfg["cross_attention_dim"]
    return dict(prompt=f(1, 77, d), pooled=f(1, pooled), negative=f(1, 77, d), negative_pooled=f(1, pooled))


def run_torch(args) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    cfg = unet_config(args.size, args.hw)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).to(dev, dtype).eval()
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.set_progress_bar_config(disable=True)
    e = {k: torch.from_numpy(v).to(dev, dtype) for k, v in embeddings(cfg).items()}
    rep = lambda x: x.repeat(args.batch, *([1] * (x.ndim - 1)))
    px = args.hw * 8  # the pipeline takes pixel sizes (vae_scale_factor 8 without a VAE)

    def call():
        with torch.no_grad():
            return pipe(
                prompt_embeds=rep(e["prompt"]),
                pooled_prompt_embeds=rep(e["pooled"]),
                negative_prompt_embeds=rep(e["negative"]),
                negative_pooled_prompt_embeds=rep(e["negative_pooled"]),
                height=px,
                width=px,
                num_inference_steps=args.steps,
                guidance_scale=5.0,
                output_type="latent",
            ).images

    med, times, peak = common.time_torch(call, args.repeats, 1, dev)
    return {"framework": "pytorch", "device": dev, "median_s": med, "times": times, "peak_mib": peak}


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from persongen_jax.models.unet import UNet2DConditionModel
    from persongen_jax.pipeline.sampling import Conditioning, denoise, sdxl_time_ids
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
    e = {k: jnp.asarray(v) for k, v in embeddings(cfg).items()}
    px = args.hw * 8
    cond = Conditioning(
        prompt_embeds=e["prompt"],
        pooled=e["pooled"],
        text_only_embeds=e["prompt"],
        text_only_pooled=e["pooled"],
        negative_embeds=e["negative"],
        negative_pooled=e["negative_pooled"],
        time_ids=sdxl_time_ids(px, px),
    )
    graphdef, params = nnx.split(unet)

    @jax.jit
    def loop(params, noise, cond):
        m = nnx.merge(graphdef, params)
        return denoise(
            m, sched, state, noise * sched.init_noise_sigma(state), cond, guidance_scale=5.0, start_merge_step=0
        )

    noise = jax.random.normal(jax.random.key(0), (args.batch, args.hw, args.hw, 4))
    t0 = time.perf_counter()
    compiled = loop.lower(params, noise, cond).compile()
    compile_s = time.perf_counter() - t0
    call = lambda: compiled(params, noise, cond)
    sync = lambda x: x.block_until_ready()
    sync(call())
    med, times = common.median_time(call, args.repeats, sync)
    dev = jax.devices()[0]
    # XLA's cost analysis counts a while-loop body once (it does not know the trip count):
    # scale by the number of steps (the ops outside the loop are negligible).
    flops = common.xla_flops(compiled)
    flops = flops * args.steps if flops else None
    return {
        "framework": "jax",
        "device": dev.device_kind,
        "median_s": med,
        "times": times,
        "compile_s": compile_s,
        "flops": flops,
        **common.xla_memory_mib(compiled),
        **common.jax_device_stats(med, flops, args.dtype),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=["both", "jax", "pytorch"], default="both")
    p.add_argument("--batch", type=int, default=1, help="images per call (x2 with guidance)")
    p.add_argument("--hw", type=int, default=32, help="latent height = width")
    p.add_argument("--size", default="mid", help='UNet shapes: "mid" or a presets size (sdxl_base, tiny, micro)')
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["xla", "cudnn"], default="xla")
    args = p.parse_args()
    if args.framework != "both":
        print(json.dumps(run_jax(args) if args.framework == "jax" else run_torch(args)))
        return
    base = [
        __file__,
        "--batch",
        str(args.batch),
        "--hw",
        str(args.hw),
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--dtype",
        args.dtype,
        "--attention",
        args.attention,
        "--size",
        args.size,
    ]
    pt = common.run_child(base + ["--framework", "pytorch"])
    jx = common.run_child(base + ["--framework", "jax"])
    print(f"machine: {common.machine()}; jax device: {jx['device']}; torch device: {pt['device']}")
    print(
        f"{args.steps}-step CFG sampling (Euler), mid-size SDXL-shaped UNet, {args.batch} image(s), "
        f"{args.hw}x{args.hw} latents, {args.dtype}, median of {args.repeats}"
    )
    print(f"  diffusers pipeline (eager): {pt['median_s']:7.2f} s   peak {pt['peak_mib']:7.0f} MiB")
    print(
        f"  jax (one compiled loop)   : {jx['median_s']:7.2f} s   peak {jx['peak_mib']:7.0f} MiB   "
        f"compile {jx['compile_s']:.1f} s"
    )
    print(f"  ratio pytorch/jax = {pt['median_s'] / jx['median_s']:.2f}x  (>1: JAX faster)")
    if jx.get("flops"):
        print(common.flops_line(f"  XLA flops/call {jx['flops'] / 1e12:.2f} TFLOP", jx))
    print("json:", json.dumps({"pytorch": pt, "jax": jx}))


if __name__ == "__main__":
    main()
