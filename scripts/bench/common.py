"""Shared bits of the benchmarks: timing, peak memory, device facts, XLA cost analysis."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# Peak dense throughput (FLOP/s) per device kind, for MFU. fp32 without TF32 / bf16 tensor cores.
PEAK_FLOPS = {
    ("NVIDIA H100 80GB HBM3", "float32"): 67e12, ("NVIDIA H100 80GB HBM3", "bfloat16"): 989e12,
    ("NVIDIA H200", "float32"): 67e12, ("NVIDIA H200", "bfloat16"): 989e12,
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


def jax_device_stats(median_s: float, flops: float | None, dtype: str) -> dict:
    """Peak memory of JAX's first device (allocator peak on a GPU, process RSS on CPU), achieved
    TFLOP/s from XLA's FLOP count, and MFU where the device's peak is known."""
    import jax

    dev = jax.devices()[0]
    out = {"peak_mib": (dev.memory_stats().get("peak_bytes_in_use", 0) / 2**20 if dev.platform == "gpu"
                        else peak_rss_mib())}
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


def run_child(argv: list[str]) -> dict:
    """Runs this benchmark for one framework in its own process (clean peak-memory figure)
    and returns the JSON dict it prints last."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of `compiled` (XLA's cost analysis; the training loop's own function)."""
    from persongen_jax.training.train_loop import compiled_flops

    return compiled_flops(compiled)


def xla_memory_mib(compiled) -> dict:
    """XLA's memory analysis of `compiled` as the benchmarks' JSON keys (temp_mib, args_mib, output_mib)."""
    from persongen_jax.training.train_loop import compiled_memory_mib

    mem = compiled_memory_mib(compiled) or {}
    return {f"{k}_mib": mem[k] for k in ("temp", "args", "output") if k in mem}
