"""Every GPU figure of docs/BENCHMARKS.md in one command (one H100/H200 lease): JSON + markdown rows.

    python scripts/bench/device_suite.py --out $OUT          # on the GPU: sdxl_base shapes (see BENCHMARKS.md)
    python scripts/bench/device_suite.py --tiny --out /tmp/s  # the same code on CI-sized shapes, CPU

Parts, each in its own child process (clean peak memory; one failing part is reported, the rest still run):
  method   the method's full train step through the real train loop: configs/final_method.py at the
           sdxl_base size with random weights, 512x512, per-device batch 12, LoRA r64, bf16 compute,
           frozen params bf16, remat / attention as given: img/s, step time, peak device memory, XLA
           FLOPs/step and MFU (FLOPs / step time / the device's peak bf16 FLOP/s, scripts/bench/common.py)
  unet     UNet train step (fwd + bwd + Adam, full UNet), JAX vs diffusers UNet2DConditionModel + torch.optim
           in bf16 autocast with SDPA, same config and batch (scripts/bench/unet_step.py --size sdxl_base)
  sample   50-step CFG sampling, 1 and 4 images of 1024x1024 (128x128 latents), JAX compiled loop vs
           diffusers' StableDiffusionXLPipeline (scripts/bench/sample.py --size sdxl_base)
  eval     CLIP ViT-L/14 and ArcFace r100 images/s, JAX vs transformers / torch (scripts/bench/eval.py)
--tiny: the micro model size, 32x32 images, batch 2, 2 steps, 3 sampling steps of 1 and 2 images, the base
CLIP and tiny ArcFace (tests/test_device_suite.py runs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.bench import common  # noqa: E402

BENCH = Path(__file__).resolve().parent


def method_config(args):
    from configs import final_method

    c = final_method.get_config()
    c.model, c.dtype, c.frozen_dtype = args.size, args.dtype, "bfloat16"
    c.remat, c.attention_impl = args.remat, args.attention
    c.data.source, c.data.resolution, c.data.global_batch_size = "synthetic", args.res, args.batch
    c.total_steps = args.warmup + args.steps
    c.log_every, c.checkpoint_every, c.progress_bar = c.total_steps, 10**9, False  # timed by common.StepClock
    c.optim.warmup_steps = 1
    return c


def run_method(args) -> dict:
    """The method's train step in the train loop (synthetic host batches, one device), each step timed from
    outside the loop after `jax.block_until_ready` on its outputs."""
    import jax

    from persongen_jax.training import train_and_evaluate

    clock = common.StepClock()  # each step timed from outside after jax.block_until_ready on its outputs
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        out = train_and_evaluate(method_config(args), wd, devices=jax.devices()[:1], on_step=clock)
        wall = time.perf_counter() - t0
    times = clock.step_times(args.warmup)
    med = statistics.median(times)
    flops = out["compiled"].get("flops_per_step")
    dev = jax.devices()[0]
    return {
        "device": dev.device_kind,
        "median_s": med,
        "img_per_s": args.batch / med,
        "times": times,
        "compile_s": out["compiled"]["compile_s"],
        "wall_s": wall,
        "flops_per_step": flops,
        "memory_mib": out["compiled"].get("memory_mib"),
        "trainable_m": sum(v.size for v in out["params"].values()) / 1e6,
        **common.jax_device_stats(med, flops, args.dtype),
    }


def plan(args) -> list[tuple[str, list[str]]]:
    """(part name, child argv) of every part, sized by --tiny."""
    t = args.tiny
    # What the parts share: the model size, the precision, and (the train-step parts) batch and step counts.
    size = ["--size", "micro" if t else "sdxl_base"]
    precision = ["--dtype", "float32" if t else "bfloat16", "--attention", "xla" if t else "cudnn"]
    train = ["--batch", "2" if t else "12", "--steps", "2" if t else "10", "--warmup", "1" if t else "2"]
    me = [__file__, "--part", "method", *size, "--res", "32" if t else "512", *train, *precision, "--remat", args.remat]
    unet = [str(BENCH / "unet_step.py"), *size, "--hw", "8" if t else "64", *train, *precision]
    sample = lambda b: [
        str(BENCH / "sample.py"),
        *size,
        "--hw",
        "8" if t else "128",
        "--batch",
        str(b),
        "--steps",
        "3" if t else "50",
        "--repeats",
        "1" if t else "3",
        *precision,
    ]
    ev = [
        str(BENCH / "eval.py"),
        "--which",
        "both",
        "--model",
        "base" if t else "large",
        "--arcface",
        "tiny" if t else "r100",
        "--batch",
        "2" if t else "32",
        "--steps",
        "1" if t else "10",
        "--warmup",
        "1" if t else "2",
        "--dtype",
        precision[1],
    ]
    return [("method", me), ("unet", unet), ("sample_1", sample(1)), ("sample_4", sample(2 if t else 4)), ("eval", ev)]


def run_part(argv: list[str]) -> dict:
    """A child benchmark's JSON (its last `json: {...}` line or a bare JSON line)."""
    import subprocess

    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]}
    last = lines[-1]
    return json.loads(last[len("json:") :] if last.startswith("json:") else last)


def rows(results: dict) -> list[str]:
    """Markdown rows: | part | JAX | PyTorch | ratio | peak memory | notes |."""
    out = ["| part | JAX | PyTorch | PyTorch time / JAX time | JAX peak MiB | notes |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            out.append(f"| {name} | failed | | | | {' '.join(r['error'])[:200]} |")
            continue
        if name == "method":
            mfu = f", MFU {r['mfu'] * 100:.1f}%" if "mfu" in r else ""
            out.append(
                f"| method train step | {r['img_per_s']:.2f} img/s ({r['median_s'] * 1e3:.0f} ms/step) | "
                f"(see unet) | | {r['peak_mib']:.0f} | compile {r['compile_s']:.0f} s{mfu} |"
            )
            continue
        if name == "eval":
            for model in ("clip", "arcface"):
                if model in r:
                    jx, pt = r[model]["jax"], r[model]["reference"]
                    out.append(
                        f"| eval {model} | {jx['images_per_s']:.1f} img/s | {pt['images_per_s']:.1f} img/s | "
                        f"{r[model]['ratio_ref_over_jax']:.2f}x | {jx.get('peak_mib', 0):.0f} | "
                        f"parity {'ok' if r[model]['parity_ok'] else 'FAILED'} |"
                    )
            continue
        if "jax" in r and "pytorch" in r and "median_s" in r["jax"]:
            jx, pt = r["jax"], r["pytorch"]
            out.append(
                f"| {name} | {jx['median_s'] * 1e3:.1f} ms | {pt['median_s'] * 1e3:.1f} ms | "
                f"{pt['median_s'] / jx['median_s']:.2f}x | {jx.get('peak_mib', 0):.0f} | "
                f"compile {jx.get('compile_s', 0):.0f} s |"
            )
        else:
            out.append(f"| {name} | {json.dumps(r)[:300]} | | | | |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CI-sized shapes on the CPU (same code)")
    p.add_argument("--out", type=Path, default=None, help="folder for device_suite.json and device_suite.md")
    p.add_argument("--parts", default="method,unet,sample_1,sample_4,eval")
    p.add_argument("--remat", default="none")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # child: one part
    for k, v in (
        ("--size", "sdxl_base"),
        ("--res", "512"),
        ("--batch", "12"),
        ("--steps", "10"),
        ("--warmup", "2"),
        ("--dtype", "bfloat16"),
        ("--attention", "cudnn"),
    ):
        p.add_argument(k, default=v, type=int if v.isdigit() else str, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part == "method":
        print(json.dumps(run_method(args)))
        return
    wanted = set(args.parts.split(","))
    results = {}
    t0 = time.perf_counter()
    for name, child in plan(args):
        if name in wanted:
            t = time.perf_counter()
            results[name] = run_part(child)
            print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    header = (
        f"device suite ({'tiny' if args.tiny else 'sdxl_base'}), {common.machine()}, "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    table = rows(results)
    print(header)
    print("\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "device_suite.json").write_text(json.dumps(results, indent=1))
        (args.out / "device_suite.md").write_text(header + "\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
