"""Shared test utilities: randomised PyTorch references and conversion through the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def randomize_(module, seed: int = 0, scale: float = 1.0) -> None:
    """Re-draws every parameter of a torch module so no zero/one init hides a bug.

    Matrices/convs ~ N(0, scale/fan_in) (keeps activations O(1) through deep nets),
    1-D weights (norm scales) ~ 1 + N(0, 0.1^2), biases and other 1-D params ~ N(0, 0.1^2).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(scale / fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def torch_precise() -> None:
    """fp32 PyTorch without TF32 shortcuts, deterministic."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def run_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m weights_conversion ARGS` in a subprocess (the real CLI)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, "-m", "weights_conversion", *map(str, args)],
                          cwd=REPO, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"weights_conversion {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def convert_and_load(kind: str, src: Path, dst: Path, component: str | None = None):
    """Converts the folder `src` with `python -m weights_conversion KIND src dst` and loads
    `dst[/component]` with `persongen_jax.models.from_pretrained`."""
    from persongen_jax.models import from_pretrained

    run_cli(kind, src, dst)
    return from_pretrained(dst / component if component else dst)


def assert_close(actual, expected, rtol: float = 1e-4, atol: float = 1e-4, name: str = "") -> None:
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)
