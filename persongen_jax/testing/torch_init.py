"""Random re-initialisation of PyTorch reference modules (tests, tiny models, benchmarks)."""

from __future__ import annotations

import math


def randomize_(module, seed: int = 0, scale: float = 1.0):
    """Re-draws every parameter of a torch module so no zero/one init hides a bug.

    Matrices/convs ~ N(0, scale/fan_in) (keeps activations O(1) through deep nets),
    1-D weights (norm scales) ~ 1 + N(0, 0.1^2), biases and other 1-D params ~ N(0, 0.1^2).
    Returns the torch.Generator, for callers that draw more from the same stream.
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
    return g


def allow_torchvision_import() -> None:
    """diffusers' ControlNet / T2I-Adapter classes import transformers' PEFT integration, which imports
    torchvision; with a CPU-only torch build, torchvision's C-op registrations fail. Its pure-Python parts are
    all the references need, so the registration module is stubbed (tests, tiny-model builders, benchmarks)."""
    import sys
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
