"""What XLA says about an ahead-of-time compiled function: FLOPs per call (cost analysis) and memory
(memory analysis). One reading for the training loop's compile log and every benchmark in scripts/bench/.

    compiled = jax.jit(f).lower(*args).compile()
    compiled_flops(compiled)          # 1.67e10, or None where the backend gives no cost analysis
    compiled_memory_mib(compiled)     # {"args": .., "temp": .., "output": .., "code": ..} MiB, or None
    memory_fields(compiled)           # {"temp_mib", "args_mib", "output_mib"}: the benchmarks' JSON keys

Imports nothing heavy (the compiled object is duck-typed), so the PyTorch child processes of the
benchmarks can import it without importing JAX.
"""

from __future__ import annotations


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of an AOT-compiled function, from XLA's cost analysis (None where the backend
    gives none). XLA counts a while-loop body once: a caller that compiles a loop multiplies."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 -- best effort: backends raise various errors or give no analysis
        return None


def compiled_memory_mib(compiled) -> dict | None:
    """XLA's memory analysis of an AOT-compiled function in MiB: {"args", "temp", "output", "code"} (None
    where the backend does not implement it)."""
    try:
        mem = compiled.memory_analysis()
        return {
            "args": mem.argument_size_in_bytes / 2**20,
            "temp": mem.temp_size_in_bytes / 2**20,
            "output": mem.output_size_in_bytes / 2**20,
            "code": mem.generated_code_size_in_bytes / 2**20,
        }
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return None


def memory_fields(compiled) -> dict:
    """`compiled_memory_mib` as the benchmarks' JSON keys: {"temp_mib", "args_mib", "output_mib"} (empty
    where the backend gives no memory analysis)."""
    mem = compiled_memory_mib(compiled) or {}
    return {f"{k}_mib": mem[k] for k in ("temp", "args", "output") if k in mem}
