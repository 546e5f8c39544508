"""Try the evaluate CLI offline: tiny random models -> the validation protocol -> report.html.

    python scripts/smoke_evaluate.py --out runs/eval_smoke          # needs the [test] extra (PyTorch)

Builds, under OUT/models: a tiny SDXL + PhotoMaker (converted), a tiny CLIP (converted), the test
SCRFD-layout detector and a tiny ArcFace (`persongen_jax.testing.tiny_eval`), and two validation sets
of synthetic "faces"; then runs

    python -m persongen_jax.evaluate --model OUT/models/sdxl --photomaker OUT/models/photomaker \
        --sets in_train=...,out_of_domain=... --seeds 0-1 --steps 4 --clip ... --face-models ... \
        --arcface ... --out OUT/eval

and prints where metrics.json / scores.csv / report.html are. Random weights: the numbers mean
nothing, the files and their layout are what a real run writes. About a minute on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(models: Path) -> dict:
    from PIL import Image

    from persongen_jax.testing.tiny_eval import make_tiny_arcface, make_tiny_clip, make_tiny_detector
    from persongen_jax.testing.tiny_photomaker import make_tiny_photomaker
    from persongen_jax.testing.tiny_sdxl import make_tiny_sdxl
    from weights_conversion.convert import convert_sdxl
    from weights_conversion.lora import convert_photomaker

    if not (models / "sdxl").is_dir():
        convert_sdxl(make_tiny_sdxl(models / "sdxl_src"), models / "sdxl")
        convert_photomaker(
            make_tiny_photomaker(models / "pm.bin"), models / "photomaker", unet=models / "sdxl" / "unet"
        )
        make_tiny_clip(models / "clip")
        make_tiny_detector(models / "faces")
        make_tiny_arcface(models / "arcface")
    rng = np.random.default_rng(0)
    sets = {"in_train": ["alice", "bob"], "out_of_domain": ["carol"]}
    for name, people in sets.items():
        for person in people:
            path = models / "val" / name / f"{person}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(60, 256, (48, 48, 3)).astype(np.uint8)).save(path)
    return {name: models / "val" / name for name in sets}


def evaluate_argv(models: Path, sets: dict, out: Path, steps: int) -> list[str]:
    """The evaluate arguments of the smoke run. --start-merge-step is left at its default, a fraction of the
    steps (0.2 of 4 -> step 0): the reference faces enter sampling however few steps run, so the identities'
    images differ (a fixed step 10 of 4 steps gave pixel-identical images for every identity)."""
    return [
        "--model",
        str(models / "sdxl"),
        "--photomaker",
        str(models / "photomaker"),
        "--sets",
        ",".join(f"{k}={v}" for k, v in sets.items()),
        "--seeds",
        "0-1",
        "--steps",
        str(steps),
        "--clip",
        str(models / "clip"),
        "--face-models",
        str(models / "faces"),
        "--arcface",
        str(models / "arcface"),
        "--out",
        str(out),
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/eval_smoke"), help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default: %(default)s)")
    args = p.parse_args()
    models = args.out / "models"
    print(f"[1/2] building tiny models and validation sets in {models} ...", flush=True)
    sets = build(models)
    cmd = [sys.executable, "-m", "persongen_jax.evaluate", *evaluate_argv(models, sets, args.out / "eval", args.steps)]
    print("[2/2] " + " ".join(cmd[1:]), flush=True)
    rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc == 0:
        print(f"open {(args.out / 'eval' / 'report.html').resolve()}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
