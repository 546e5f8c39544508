"""Shared bits of the benchmarks: timing, peak memory, device facts. XLA's cost and memory analysis:
`xla_flops` / `xla_memory_mib`, read by `persongen_jax.utils.xla_stats` (the training loop's reading too)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from persongen_jax.utils.xla_stats import compiled_flops as xla_flops  # noqa: F401 -- the benchmarks' name
from persongen_jax.utils.xla_stats import memory_fields as xla_memory_mib  # noqa: F401 -- the benchmarks' name

# Peak dense throughput (FLOP/s) per device kind, for MFU. fp32 without TF32 / bf16 tensor cores.
PEAK_FLOPS = {
    ("NVIDIA H100 80GB HBM3", "float32"): 67e12,
    ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 67e12,
    ("NVIDIA H200", "bfloat16"): 989e12,
}


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, steps: int, sync) -> tuple[float, list[float]]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


class StepClock:
    """`train_and_evaluate(..., on_step=StepClock())`: blocks on each step's outputs
    (`jax.block_until_ready`) and reads the clock, so the benchmark times finished steps from outside the
    loop (the loop's logged step_time_s is its own reading)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, step: int, metrics) -> None:
        import jax

        jax.block_until_ready(metrics)
        self.stamps.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        """Seconds of each step after the first `warmup` (>= 1: a step's time runs from the previous
        step's end): host batch, dispatch and the step itself."""
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: at least 1 step (a step is timed from the previous one's end)")
        return [b - a for a, b in zip(self.stamps[warmup - 1 :], self.stamps[warmup:])]


def time_torch(fn, steps: int, warmup: int, dev: str) -> tuple[float, list[float], float]:
    """Warm-up, then the median over `steps` calls of `fn` (CUDA-synchronised on a GPU).
    Returns (median s, times, peak MiB: CUDA allocator peak after warm-up on a GPU, process RSS on CPU)."""
    import torch

    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    for _ in range(warmup):
        sync(fn())
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, times = median_time(fn, steps, sync)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else peak_rss_mib()
    return med, times, peak


def torch_device() -> str:
    """The PyTorch side's device, "cuda" when there is a GPU, else "cpu"; TF32 off, so float32 matmuls and
    convolutions keep full precision (the JAX side's "highest")."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_result(fn, steps: int, warmup: int, dev: str, **extra) -> dict:
    """`time_torch`'s figures as a benchmark's PyTorch result (framework, device, median_s, times,
    peak_mib), then `extra`."""
    med, times, peak = time_torch(fn, steps, warmup, dev)
    return {"framework": "pytorch", "device": dev, "median_s": med, "times": times, "peak_mib": peak, **extra}


def compile_timed(jitted, *args):
    """(`jitted.lower(*args).compile()`, the seconds it took)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_jax(call, steps: int, warmup: int) -> tuple[float, list[float]]:
    """`warmup` calls, then (median s, times) over `steps` calls, each blocking until its output is ready."""
    sync = lambda x: x.block_until_ready()
    for _ in range(warmup):
        sync(call())
    return median_time(call, steps, sync)


def jax_result(median_s: float, times: list[float], compile_s: float, **extra) -> dict:
    """A benchmark's JAX result (framework, the device kind, median_s, times, compile_s), then `extra`."""
    import jax

    return {
        "framework": "jax",
        "device": jax.devices()[0].device_kind,
        "median_s": median_s,
        "times": times,
        "compile_s": compile_s,
        **extra,
    }


def xla_figures(compiled, median_s: float, flops: float | None, dtype: str) -> dict:
    """XLA's memory sizes of `compiled` (`xla_memory_mib`) and `jax_device_stats`."""
    return {**xla_memory_mib(compiled), **jax_device_stats(median_s, flops, dtype)}


def jax_device_stats(median_s: float, flops: float | None, dtype: str) -> dict:
    """Peak memory of JAX's first device (allocator peak on a GPU, process RSS on CPU), achieved
    TFLOP/s from XLA's FLOP count, and MFU where the device's peak is known."""
    import jax

    dev = jax.devices()[0]
    out = {
        "peak_mib": (
            dev.memory_stats().get("peak_bytes_in_use", 0) / 2**20 if dev.platform == "gpu" else peak_rss_mib()
        )
    }
    if flops:
        out["achieved_tflops"] = flops / median_s / 1e12
        peak = PEAK_FLOPS.get((dev.device_kind, dtype))
        if peak:
            out["mfu"] = flops / median_s / peak
    return out


def flops_line(head: str, stats: dict) -> str:
    """`head` + achieved TFLOP/s (+ MFU where known), from `jax_device_stats`' fields."""
    line = f"{head}, achieved {stats['achieved_tflops']:.3f} TFLOP/s"
    if "mfu" in stats:
        line += f", MFU {stats['mfu'] * 100:.1f}%"
    return line


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def child_argv(script: str, args, *names: str) -> list[str]:
    """A child's command line: `script` and these of the parsed `args` as given (a list value: its items),
    e.g. child_argv(__file__, args, "batch", "dtype") -> [script, "--batch", "4", "--dtype", "float32"]."""
    argv = [script]
    for name in names:
        value = getattr(args, name)
        argv += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def framework_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a JAX-vs-PyTorch benchmark, with its --framework (see `jax_vs_pytorch`)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=["both", "jax", "pytorch"], default="both")
    return p


def jax_vs_pytorch(script: str, args, run_jax, run_torch, report) -> None:
    """The main of a JAX-vs-PyTorch benchmark. --framework jax / pytorch: this process is that side's child;
    it prints the side's result as JSON. both: each side runs in its own child (`script` with the same flags),
    then the machine line, `report(args, pytorch_result, jax_result)` and both results as a `json:` line."""
    if args.framework != "both":
        print(json.dumps(run_jax(args) if args.framework == "jax" else run_torch(args)))
        return
    argv = child_argv(script, args, *(name for name in vars(args) if name != "framework"))
    pt = run_child(argv + ["--framework", "pytorch"])
    jx = run_child(argv + ["--framework", "jax"])
    print(f"machine: {machine()}; jax device: {jx['device']}; torch device: {pt['device']}")
    report(args, pt, jx)
    print("json:", json.dumps({"pytorch": pt, "jax": jx}))


def ratio_line(pt: dict, jx: dict) -> str:
    """The report's ratio of the two sides' median times."""
    return f"  ratio pytorch/jax = {pt['median_s'] / jx['median_s']:.2f}x  (>1: JAX faster)"


def run_child(argv: list[str]) -> dict:
    """Runs this benchmark for one framework in its own process (clean peak-memory figure)
    and returns the JSON dict it prints last."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
