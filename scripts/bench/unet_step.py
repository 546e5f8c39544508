"""One UNet training step (forward + backward + Adam), JAX vs diffusers PyTorch eager.

    python scripts/bench/unet_step.py                 # mid-size SDXL-shaped UNet, 32x32 latents, batch 4, fp32
    python scripts/bench/unet_step.py --dtype bfloat16 --steps 20   # on a GPU

Both frameworks run the same architecture and config, the same batch and the
same numerics (fp32 with highest-precision matmuls and TF32 off,
or bf16 compute with fp32 params). Each runs in its own child process so that
peak memory is measured per framework. Prints both medians, the ratio
(PyTorch time / JAX time, >1 means JAX is faster), JAX compile time, XLA's
FLOP count and the achieved FLOP/s (MFU on known GPUs).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402

MID_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[64, 128, 256],
    layers_per_block=2,
    attention_head_dim=[1, 2, 4],
    transformer_layers_per_block=[1, 2, 4],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)


def unet_config(size: str, hw: int) -> dict:
    """The benchmark UNet's diffusers config: "mid" (MID_CONFIG) or a model size of
    persongen_jax.models.presets ("sdxl_base": the real SDXL UNet shapes, "tiny"), at hw x hw latents."""
    if size == "mid":
        return dict(MID_CONFIG, sample_size=hw)
    from persongen_jax.models import presets

    return {k: v for k, v in dict(presets.get(size).unet, sample_size=hw).items() if not k.startswith("_")}


def make_batch(cfg, batch: int, hw: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return dict(
        sample=f(batch, hw, hw, 4),
        timesteps=rng.integers(0, 1000, batch).astype(np.int32),
        encoder_hidden_states=f(batch, 77, cfg["cross_attention_dim"]),
        text_embeds=f(batch, pooled),
        time_ids=np.tile(np.array([[512, 512, 0, 0, 512, 512]], np.float32), (batch, 1)),
        target=f(batch, hw, hw, 4),
    )


def torch_model(cfg, seed=0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg)


def run_torch(args) -> dict:
    import torch

    dev = common.torch_device()
    cfg = unet_config(args.size, args.hw)
    model = torch_model(cfg).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    b = {k: torch.from_numpy(v).to(dev) for k, v in make_batch(cfg, args.batch, args.hw).items()}
    sample = b["sample"].permute(0, 3, 1, 2).contiguous()
    target = b["target"].permute(0, 3, 1, 2).contiguous()
    t = b["timesteps"].long()
    added = {"text_embeds": b["text_embeds"], "time_ids": b["time_ids"]}
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            pred = model(sample, t, b["encoder_hidden_states"], added_cond_kwargs=added).sample
        loss = torch.mean((pred.float() - target) ** 2)
        loss.backward()
        opt.step()
        return loss

    return common.torch_result(step, args.steps, args.warmup, dev, params=sum(p.numel() for p in model.parameters()))


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from persongen_jax.models.unet import UNet2DConditionModel

    if args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")  # equal numerics with torch fp32
    cfg = unet_config(args.size, args.hw)
    # Own init rather than the PyTorch weights: timing does not depend on the values, and not
    # importing torch keeps this process's peak RSS a JAX-only figure. (Parity is tested elsewhere.)
    model = UNet2DConditionModel.from_config(
        cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None, attention_impl=args.attention
    )
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-5)
    opt_state = tx.init(params)
    batch = {k: jnp.asarray(v) for k, v in make_batch(cfg, args.batch, args.hw).items()}

    def train_step(params, opt_state, batch):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            pred = m(
                batch["sample"],
                batch["timesteps"],
                batch["encoder_hidden_states"],
                text_embeds=batch["text_embeds"],
                time_ids=batch["time_ids"],
            )
            return jnp.mean((pred.astype(jnp.float32) - batch["target"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled, compile_s = common.compile_timed(jax.jit(train_step, donate_argnums=(0, 1)), params, opt_state, batch)
    state = {"params": params, "opt": opt_state}

    def step():
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], batch)
        return loss

    med, times = common.time_jax(step, args.steps, args.warmup)
    flops = common.xla_flops(compiled)
    stats = common.xla_figures(compiled, med, flops, args.dtype)
    return common.jax_result(med, times, compile_s, flops_per_step=flops, **stats)


def unet_parser(doc: str, batch: dict, steps: int, timing: tuple[str, int]):
    """The UNet benchmarks' flags (this one's and sample.py's): --batch (`batch`: its default and help),
    --hw, --size, --steps (default `steps`), `timing` (the flag and its default: --warmup here, --repeats
    in sample.py), --dtype, --attention."""
    p = common.framework_parser(doc)
    p.add_argument("--batch", type=int, **batch)
    p.add_argument("--hw", type=int, default=32, help="latent height = width")
    p.add_argument("--size", default="mid", help='UNet shapes: "mid" or a presets size (sdxl_base, tiny, micro)')
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument(timing[0], type=int, default=timing[1])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attention", choices=["xla", "cudnn"], default="xla")
    return p


def report(args, pt: dict, jx: dict) -> None:
    print(
        f"UNet train step (fwd+bwd+Adam), {pt['params'] / 1e6:.1f}M params, batch {args.batch}, "
        f"{args.hw}x{args.hw} latents, {args.dtype}, {args.steps} timed steps"
    )
    print(f"  pytorch eager : median {pt['median_s'] * 1e3:8.1f} ms   peak {pt['peak_mib']:8.0f} MiB")
    print(
        f"  jax (jit)     : median {jx['median_s'] * 1e3:8.1f} ms   peak {jx['peak_mib']:8.0f} MiB   "
        f"compile {jx['compile_s']:.1f} s"
    )
    if "temp_mib" in jx:
        print(
            f"  XLA compiled memory: args {jx['args_mib']:.0f} MiB, temp {jx['temp_mib']:.0f} MiB, "
            f"outputs {jx['output_mib']:.0f} MiB (peak = process RSS on CPU, allocator peak on GPU)"
        )
    print(common.ratio_line(pt, jx))
    if jx.get("flops_per_step"):
        print(common.flops_line(f"  XLA flops/step {jx['flops_per_step'] / 1e9:.1f} GFLOP", jx))


def main():
    p = unet_parser(__doc__, batch=dict(default=4), steps=5, timing=("--warmup", 1))
    common.jax_vs_pytorch(__file__, p.parse_args(), run_jax, run_torch, report)


if __name__ == "__main__":
    main()
