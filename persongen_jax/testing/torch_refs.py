"""PyTorch references of the evaluation metrics with random weights (tests, benchmarks): pytorch-fid's
InceptionV3 and the lpips package's LPIPS, built without downloading anything.

    install_torchvision_shim()                 # before importing torchvision / transformers models
    model = fid_inception(seed=0)              # pytorch_fid.inception.InceptionV3, random weights + BN stats

torchvision 0.28's `_meta_registrations` registers meta kernels for its C++ ops (torchvision::nms ...),
which the CPU torch build of the test environment does not load: `import torchvision` raises "operator
torchvision::nms does not exist", and with it every transformers import that probes torchvision (CLIPModel,
ViTModel ...). The references here use none of those ops, so an empty stand-in for that one module is
enough; tests/conftest.py installs it first thing.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path


def install_torchvision_shim() -> None:
    # torchvision (which lpips and pytorch-fid import) is not installed in the venv itself: transformers
    # probes any installed torchvision, and PyPI's build (CUDA) breaks its imports in every process without
    # this shim, the CLI subprocesses of the tests too. The README's test command installs torchvision,
    # lpips and pytorch-fid into a side folder, `<venv>/torch-refs`, which only the test process adds to its path.
    if importlib.util.find_spec("torchvision") is None:
        side = Path(sys.prefix) / "torch-refs"
        if side.is_dir():
            sys.path.append(str(side))
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def randomize_batchnorm_stats_(module, generator) -> None:
    """Random running means (N(0, 0.1^2)) and variances (U(0.5, 1.5)) of every BatchNorm, so inference-mode
    normalisation is exercised (defaults 0 / 1 would hide a mean/var swap)."""
    import torch

    with torch.no_grad():
        for m in module.modules():
            if (
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                and m.running_mean is not None
                and m.running_var is not None
            ):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))


def fid_inception(seed: int = 0, **kwargs):
    """pytorch_fid.inception.InceptionV3(**kwargs) (the FID variant, block 3) with random weights: its
    `fid_inception_v3()` is given a freshly built FID Inception instead of downloading the weights file."""
    install_torchvision_shim()
    from pytorch_fid import inception as fid

    from persongen_jax.testing.torch_init import randomize_

    net = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid.FIDInceptionE_1(1280)
    net.Mixed_7c = fid.FIDInceptionE_2(2048)
    g = randomize_(net, seed)
    randomize_batchnorm_stats_(net, g)
    original = fid.fid_inception_v3
    fid.fid_inception_v3 = lambda: net
    try:
        model = fid.InceptionV3(**kwargs).eval()
    finally:
        fid.fid_inception_v3 = original
    return model


def lpips_model(net: str = "alex", seed: int = 0):
    """lpips.LPIPS(net=net) with random backbone and random linear layers (pretrained=False, pnet_rand=True:
    nothing is downloaded), every weight re-drawn by `randomize_` and the linear weights made positive as
    the released ones are (a distance)."""
    install_torchvision_shim()
    import lpips
    import torch

    from persongen_jax.testing.torch_init import randomize_

    model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False).eval()
    g = randomize_(model, seed)
    with torch.no_grad():
        for lin in model.lins:
            w = lin.model[-1].weight
            w.copy_(torch.rand(w.shape, generator=g))
    return model
