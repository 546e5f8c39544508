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
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort on some backends
        return None


def xla_memory_mib(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
        return {"temp_mib": m.temp_size_in_bytes / 2**20, "args_mib": m.argument_size_in_bytes / 2**20,
                "output_mib": m.output_size_in_bytes / 2**20}
    except Exception:
        return {}
