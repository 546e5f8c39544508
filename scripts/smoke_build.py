"""Try the dataset build offline: synthetic person folders -> `python -m persongen_jax.data.build` -> a dataset.

    python scripts/smoke_build.py --out runs/build_smoke          # needs the [test] extra (PyTorch, Beam)

Builds, under OUT/models, the stand-ins of `persongen_jax.testing.tiny_build`: an SCRFD-layout detector that
finds key-coloured faces and a random ArcFace IResNet; under OUT/src a source with one case of each kind
(good portraits, an image below 512 px, an undecodable file, a face below 256 px, an image without a face,
a group photo, an intruder's photos, a person with one image, a dark image the captioner describes without
a class word); starts an OpenAI-compatible captioning endpoint on 127.0.0.1 that answers with fixed text;
then runs

    python -m persongen_jax.data.build OUT/src OUT/dataset --detector OUT/models/det --arcface OUT/models/arcface \
        --caption-backend openai --caption-endpoint http://127.0.0.1:PORT/v1 --caption-model tiny-vlm \
        --verify-threshold 0.85 --resolution 256 [-- beam options, e.g. --direct_num_workers 2 --direct_running_mode multi_processing]

and prints the summary (also in OUT/dataset/index.json). Train on the result with
`python -m persongen_jax.train --config configs/demo.py --workdir runs/demo_build --config.data.dir=OUT/dataset`.
About 20 seconds on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/build_smoke"))
    p.add_argument("beam_args", nargs="*", help="Beam pipeline options (after --)")
    args = p.parse_args()
    from persongen_jax.testing import tiny_build, tiny_eval

    models, src = args.out / "models", args.out / "src"
    if not (models / "arcface").is_dir():
        tiny_build.make_key_detector(models / "det")
        tiny_eval.make_tiny_arcface(models / "arcface", **tiny_build.BUILD_ARCFACE)
    if not src.is_dir():
        tiny_build.make_raw_persons(src, tiny_build.mixed_persons())
    with tiny_build.CaptionServer() as server:
        cmd = [
            sys.executable,
            "-m",
            "persongen_jax.data.build",
            str(src),
            str(args.out / "dataset"),
            "--detector",
            str(models / "det"),
            "--arcface",
            str(models / "arcface"),
            "--caption-backend",
            "openai",
            "--caption-endpoint",
            server.url,
            "--caption-model",
            server.model,
            "--verify-threshold",
            str(tiny_build.BUILD_THRESHOLD),
            "--resolution",
            "256",
        ]
        if args.beam_args:
            cmd += ["--", *args.beam_args]
        print(" ".join(cmd))
        rc = subprocess.call(cmd, cwd=REPO)
    if rc == 0:
        print(f"dataset: {args.out / 'dataset'} (index.json: records, rejected with stage and reason, summary)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
