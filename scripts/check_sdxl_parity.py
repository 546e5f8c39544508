"""Parity of the *full* SDXL base UNet: PyTorch random weights -> save -> CLI convert -> JAX.

    python scripts/check_sdxl_parity.py --workdir /tmp/sdxl_parity [--hw 32] [--keep]

Not part of CI (10 GB of fp32 weights on disk, several minutes). Each stage runs
in its own process so the PyTorch model is freed before the Flax one is loaded
(fits in 24 GiB) and each stage's peak memory is reported:

  1. build diffusers UNet2DConditionModel(sdxl_base config), randomise norms and
     biases, save_pretrained, run one forward pass on fixed random inputs;
  2. `python -m weights_conversion sdxl WORKDIR/src WORKDIR/dst`;
  3. from_pretrained + the same forward pass in JAX (fp32, highest precision).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def stage_torch(workdir: Path, hw: int) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from persongen_jax.models.unet import UNet2DConditionModel as JaxUNet
    from weights_conversion.verify import reference_inputs, run_torch

    cfg = JaxUNet.preset_config("sdxl_base")
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # default init has unit norm scales and zero biases in places: perturb them
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(workdir / "src" / "unet")
    del model
    inputs = reference_inputs("UNet2DConditionModel", cfg, latent_hw=(hw, hw))
    t0 = time.perf_counter()
    ref = run_torch("UNet2DConditionModel", workdir / "src" / "unet", inputs)
    np.savez(workdir / "io.npz", **inputs, ref=ref["sample"])
    print(
        json.dumps(
            {"stage": "torch", "params": n_params, "forward_s": time.perf_counter() - t0, "peak_gib": peak_gib()}
        )
    )


def stage_jax(workdir: Path) -> None:
    from weights_conversion.verify import run_flax

    data = dict(np.load(workdir / "io.npz"))
    ref = data.pop("ref")
    t0 = time.perf_counter()
    ours = run_flax("UNet2DConditionModel", workdir / "dst" / "unet", data)["sample"]
    diff = np.abs(ours - ref)
    print(
        json.dumps(
            {
                "stage": "jax",
                "forward_s": time.perf_counter() - t0,
                "peak_gib": peak_gib(),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "ref_abs_max": float(np.abs(ref).max()),
                "allclose_1e-4": bool(np.allclose(ours, ref, rtol=1e-4, atol=1e-4)),
            }
        )
    )


def child(*args) -> dict:
    proc = subprocess.run([sys.executable, __file__, *map(str, args)], cwd=REPO, text=True, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"stage {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdxl_parity"))
    p.add_argument("--hw", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="keep the 20 GB of weights in WORKDIR")
    p.add_argument("--stage", choices=["torch", "jax"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage == "torch":
        return stage_torch(args.workdir, args.hw)
    if args.stage == "jax":
        return stage_jax(args.workdir)

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    torch_res = child("--stage", "torch", "--workdir", args.workdir, "--hw", args.hw)
    print(
        f"[torch] {torch_res['params']:,} params, forward {torch_res['forward_s']:.1f} s, "
        f"peak RSS {torch_res['peak_gib']:.1f} GiB",
        flush=True,
    )
    t1 = time.perf_counter()
    conv = subprocess.run(
        [
            sys.executable,
            "-m",
            "weights_conversion",
            "sdxl",
            args.workdir / "src",
            args.workdir / "dst",
            "--dtype",
            "float32",
        ],
        cwd=REPO,
        text=True,
        capture_output=True,
    )
    if conv.returncode:
        raise SystemExit(f"conversion failed:\n{conv.stdout}\n{conv.stderr}")
    conv_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(
        f"[convert] {time.perf_counter() - t1:.1f} s, peak RSS (max over children so far) {conv_peak:.1f} GiB",
        flush=True,
    )
    jax_res = child("--stage", "jax", "--workdir", args.workdir)
    print(f"[jax] forward (incl. load+compile) {jax_res['forward_s']:.1f} s, peak RSS {jax_res['peak_gib']:.1f} GiB")
    print(
        f"max |diff| = {jax_res['max_abs_diff']:.3g}, mean |diff| = {jax_res['mean_abs_diff']:.3g}, "
        f"max |ref| = {jax_res['ref_abs_max']:.3g}, allclose(rtol=atol=1e-4): {jax_res['allclose_1e-4']}"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if jax_res["allclose_1e-4"] else 1


if __name__ == "__main__":
    sys.exit(main() or 0)
