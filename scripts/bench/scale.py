"""Memory and cost of the research-scale train step, proven without a GPU: the full train step of
configs/final_method.py with the sdxl_base shapes (random init through `eval_shape`: no weights, nothing
executed) is AOT-compiled (`jit(...).lower(...).compile()`) on this machine's CPU backend for each setting,
and XLA's memory analysis (arguments, temps, outputs) and cost analysis (FLOPs) are printed as a table.

    python scripts/bench/scale.py                       # sdxl_base, 512x512, per-device batch 1 and 12
    python scripts/bench/scale.py --model tiny --res 64 --batch 2     # the same on the tiny size (seconds)
    python scripts/bench/scale.py --peak-tflops 989     # + the MFU formula's denominator for a device

Settings: frozen_dtype float32 | bfloat16 x remat none | dots_saveable | full, compute dtype bfloat16,
attention as --attention (cudnn falls back to XLA on CPU). Columns: compiled argument / temp / output
bytes, "saved" = the residuals JAX keeps for the backward pass (exact; XLA:CPU's temp figure does not show
remat savings because its scheduler places recomputation early), FLOPs per image of the step and of
3 x the UNet forward alone (the usual fwd + 2 x bwd estimate). MFU on a device = FLOPs/step / (step time x
peak FLOP/s).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402


def build_abstract(config, workdir):
    """(spec, abstract state, abstract batch, abstract rng) of `config`: shapes only."""
    import jax
    import numpy as np
    from flax import nnx

    from persongen_jax.training import data as data_lib
    from persongen_jax.training import optimizer as optim_lib
    from persongen_jax.training import state as state_lib
    from persongen_jax.training.model import build_model
    from persongen_jax.training.train_loop import StepSpec, make_loss

    built = {}

    def make():
        model, tokenizers, scheduler = build_model(config, workdir, abstract=True)
        built.update(tokenizers=tokenizers, scheduler=scheduler)
        return model

    model = nnx.eval_shape(make)
    groups = {g: dict(spec) for g, spec in config.trainable.items() if spec.lr > 0}
    split, params, frozen, rest = state_lib.split_model(model, groups)
    frozen = jax.eval_shape(lambda f: state_lib.cast_frozen(f, config.frozen_dtype), frozen)
    tx = optim_lib.make_optimizer(params, groups, config.optim)
    state = state_lib._abstract(params, frozen, rest, tx)
    spec = StepSpec(split, tx, make_loss(config, model, built["tokenizers"], built["scheduler"]))
    it, _ = data_lib.make_iterator(
        config,
        built["tokenizers"],
        workdir,
        shard_index=0,
        shard_count=1,
        id_image_size=model.id_encoder.config.vision.image_size,
    )
    batch = data_lib.model_inputs(next(it), data_lib.text_condition_fields(config))
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    n_params = (
        sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen)),
    )
    return spec, state, batch, rng, model, n_params


def measure(config, workdir) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals

    from persongen_jax.training.train_loop import train_step

    spec, state, batch, rng, model, n_params = build_abstract(config, workdir)
    t0 = time.perf_counter()
    compiled = jax.jit(functools.partial(train_step, spec=spec), donate_argnums=0).lower(state, batch, rng).compile()
    out = {
        "compile_s": time.perf_counter() - t0,
        "flops": common.xla_flops(compiled),
        **common.xla_memory_mib(compiled),
        "trainable_m": n_params[0] / 1e6,
        "frozen_m": n_params[1] / 1e6,
    }

    def loss_of(params, frozen, rest, batch, key):
        # Gradients of the trainable params only, as in the step (stop_gradient: the rest are constants).
        frozen, rest, batch = jax.lax.stop_gradient((frozen, rest, batch))
        return spec.loss(spec.split.merge(params, frozen, rest), batch, key)[0]

    residuals = saved_residuals(loss_of, state.params, state.frozen, state.rest, batch, rng)
    out["saved_mib"] = sum(a.size * a.dtype.itemsize for a, why in residuals if "from the argument" not in why) / 2**20
    # The UNet forward alone, at the step's shapes, in the step's compute dtype: 3x it = fwd + bwd estimate.
    unet = model.unet
    c = unet.config
    b, r = batch["pixel_values"].shape[:2]
    dt = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    sds = jax.ShapeDtypeStruct
    gd, st = nnx.split(unet)
    fwd = jax.jit(lambda st, x, t, e, p, ti: nnx.merge(gd, st)(x, t, e, text_embeds=p, time_ids=ti))
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    cross = c.per_block("cross_attention_dim")[0]
    lowered = fwd.lower(
        st,
        sds((b, r // 8, r // 8, 4), dt),
        sds((b,), jnp.int32),
        sds((b, 77, cross), dt),
        sds((b, pooled), dt),
        sds((b, 6), jnp.float32),
    )
    out["unet_fwd_flops"] = common.xla_flops(lowered.compile())
    out["batch"] = b
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="sdxl_base")
    p.add_argument("--res", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 12], help="per-device batch sizes")
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    p.add_argument("--frozen", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--remat", nargs="+", default=["none", "dots_saveable", "full"])
    p.add_argument("--peak-tflops", type=float, default=0.0, help="a device's peak bf16 TFLOP/s for the MFU line")
    args = p.parse_args(argv)

    import jax

    from configs import final_method

    print(
        f"# scale.py: {args.model} {args.res}x{args.res}, final_method, compute bfloat16, attention "
        f"{args.attention}; CPU AOT compile on {common.machine()}, jax {jax.__version__}"
    )
    print(
        "| batch | frozen | remat | args GiB | temp GiB | output GiB | args+temp GiB | saved GiB | "
        "GFLOP/img step | GFLOP/img 3x UNet fwd | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for b in args.batch:
        for frozen in args.frozen:
            for remat in args.remat:
                c = final_method.get_config()
                c.model, c.dtype, c.attention_impl = args.model, "bfloat16", args.attention
                c.frozen_dtype, c.remat = frozen, remat
                c.data.source, c.data.resolution, c.data.global_batch_size = "synthetic", args.res, b
                with tempfile.TemporaryDirectory() as wd:
                    m = measure(c, wd)
                gib = lambda k: m.get(k, 0.0) / 1024  # noqa: E731
                step_g = (m["flops"] or 0) / b / 1e9
                unet_g = 3 * (m["unet_fwd_flops"] or 0) / b / 1e9
                print(
                    f"| {b} | {frozen} | {remat} | {gib('args_mib'):.2f} | {gib('temp_mib'):.2f} | "
                    f"{gib('output_mib'):.2f} | {gib('args_mib') + gib('temp_mib'):.2f} | {gib('saved_mib'):.2f} | "
                    f"{step_g:.4g} | {unet_g:.4g} | {m['compile_s']:.0f} |",
                    flush=True,
                )
                rows.append(m)
    if rows:
        print(f"\ntrainable {rows[0]['trainable_m']:.1f}M params, frozen {rows[0]['frozen_m']:.1f}M")
    if args.peak_tflops:
        for m in rows:
            print(
                f"batch {m['batch']}: MFU = {m['flops'] / 1e12:.2f} TFLOP / (step seconds x {args.peak_tflops} TFLOP/s)"
            )


if __name__ == "__main__":
    main()
