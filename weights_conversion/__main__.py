"""Weight conversion CLI.

    python -m weights_conversion sdxl SRC DST [--dtype float16] [--variant fp16] [--verify]
    python -m weights_conversion clip SRC DST [--verify]

(also installed as the `persongen-convert` console script). Exits 1 with a
message naming the file and keys when a checkpoint does not match.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("auto", "float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m weights_conversion",
                                description="Convert PyTorch diffusers/transformers weights to persongen_jax (Flax NNX + orbax).")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("sdxl", "a diffusers SDXL folder (model_index.json + unet/ vae/ text_encoder/ "
                                 "text_encoder_2/ tokenizer*/), some of its components, or one component folder"),
                        ("clip", "a transformers CLIPModel / CLIPTextModel(WithProjection) / "
                                 "CLIPVisionModel(WithProjection) folder")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("src", type=Path)
        s.add_argument("dst", type=Path)
        s.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="dtype of the stored params (auto: keep each tensor's source dtype)")
        s.add_argument("--variant", default=None, help="weight file variant, e.g. fp16 for *.fp16.safetensors")
        s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        s.add_argument("--verify", action="store_true",
                       help="run the PyTorch and Flax models on the same random inputs; print the max abs diff")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from weights_conversion.convert import convert_clip, convert_sdxl
    from weights_conversion.core import ConversionError

    dtype = None if args.dtype == "auto" else args.dtype
    try:
        if args.command == "sdxl":
            done = convert_sdxl(args.src, args.dst, dtype=dtype, variant=args.variant, overwrite=args.overwrite)
        else:
            done = [convert_clip(args.src, args.dst, dtype=dtype, variant=args.variant, overwrite=args.overwrite)]
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {', '.join(done)} -> {args.dst}")
    if args.verify:
        from weights_conversion.verify import verify_folder

        worst = verify_folder(args.src, args.dst, variant=args.variant)
        if worst is None:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
