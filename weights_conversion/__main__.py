"""Weight conversion CLI.

    python -m weights_conversion sdxl SRC DST [--dtype float16] [--variant fp16] [--verify]
    python -m weights_conversion clip SRC DST [--verify]
    python -m weights_conversion dino SRC DST [--verify]                      (transformers ViTModel, DINO v1)
    python -m weights_conversion lora SRC.safetensors DST [--unet UNET_DIR] [--skip-text-encoder]
    python -m weights_conversion ip-adapter SRC.bin DST [--unet UNET_DIR] [--name id] [--scale 1.0]
    python -m weights_conversion photomaker SRC.bin DST [--unet UNET_DIR] [--version v1|v2]  (DST/id_encoder + DST/lora)
    python -m weights_conversion export-photomaker PHOTOMAKER_DIR DST.bin|DST.safetensors   (official key layout)
    python -m weights_conversion export-lora LORA_DIR|RUN DST.safetensors [--step N]
    python -m weights_conversion export-adapter ADAPTER_DIR|RUN DST.safetensors [--name bg] [--step N]
    python -m weights_conversion arcface SRC.onnx DST                          (insightface IResNet ONNX)
    python -m weights_conversion inception SRC.pth DST                         (pytorch-fid's FID InceptionV3)
    python -m weights_conversion lpips SRC.pth DST                             (lpips.LPIPS(net="alex") state dict)
    python -m weights_conversion controlnet SRC DST [--unet UNET_DIR] [--verify]  (diffusers ControlNetModel)
    python -m weights_conversion t2i-adapter SRC DST [--unet UNET_DIR] [--verify] (diffusers T2IAdapter, SDXL)

(also installed as the `persongen-convert` console script). Exits 1 with a
message naming the file and keys when a checkpoint does not match.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
from pathlib import Path

DTYPES = ("auto", "float32", "float16", "bfloat16")
CONTROL_COMMANDS = ("controlnet", "t2i-adapter")  # weights_conversion/controlnet.py


def build_parser() -> argparse.ArgumentParser:
    from persongen_jax.cli import HelpFormatter, parser

    p = parser(
        "python -m weights_conversion",
        __doc__.split("(also installed")[0].replace(
            "Weight conversion CLI.",
            "Convert PyTorch diffusers/transformers/insightface weights to persongen_jax "
            "(Flax NNX + orbax) and back (export-*).",
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_, src, dst):
        s = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        s.add_argument("src", type=Path, help=src)
        s.add_argument("dst", type=Path, help=dst)
        s.add_argument(
            "--overwrite",
            action="store_true",
            help="replace DST if it exists (only a folder/file this tool wrote, never the source)",
        )
        return s

    for name, help_ in [
        (
            "sdxl",
            "a diffusers SDXL folder (model_index.json + unet/ vae/ text_encoder/ "
            "text_encoder_2/ tokenizer*/), some of its components, or one component folder",
        ),
        ("clip", "a transformers CLIPModel / CLIPTextModel(WithProjection) / CLIPVisionModel(WithProjection) folder"),
        (
            "dino",
            "a transformers ViTModel folder (DINO v1: facebook/dino-vits16 ...) for the DINO "
            "metric; its preprocessor_config.json is copied",
        ),
    ]:
        s = add(name, help_, "the source folder", "the converted folder to write")
        s.add_argument(
            "--dtype",
            choices=DTYPES,
            default="auto",
            help="dtype of the stored params (auto: keep each tensor's source dtype)",
        )
        s.add_argument(
            "--variant", default=None, help="weight file variant, e.g. fp16 for *.fp16.safetensors (default: none)"
        )
        s.add_argument(
            "--verify",
            action="store_true",
            help="run the PyTorch and Flax models on the same random inputs; print the max abs diff "
            "(needs the [torch] extra)",
        )
    unet_help = (
        "the UNet the weights are for: a converted or diffusers UNet/SDXL folder (its config.json "
        "is read; default: the SDXL base config)"
    )
    for name, help_ in [
        ("lora", "a standalone SDXL LoRA file (PEFT/diffusers, old diffusers or kohya keys)"),
        ("ip-adapter", "an SDXL IP-Adapter checkpoint (image_proj + ip_adapter) -> an adapter folder (parallel mode)"),
        ("photomaker", "a PhotoMaker v1 or V2 checkpoint (photomaker-v2.bin) -> DST/id_encoder + DST/lora"),
    ]:
        s = add(name, help_, "the PyTorch checkpoint file (.safetensors or .bin)", "the folder to write")
        s.add_argument("--unet", type=Path, default=None, help=unet_help)
        s.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the stored params")
        if name == "photomaker":
            s.add_argument(
                "--version",
                choices=("v1", "v2"),
                default=None,
                help="insist on this PhotoMaker version (default: detected from the keys; V2 has the "
                "qformer_perceiver)",
            )
        if name == "ip-adapter":
            s.add_argument("--name", default="id", help="condition name of the adapter")
            s.add_argument("--scale", type=float, default=1.0, help="the adapter's stored scale")
        else:
            s.add_argument(
                "--skip-text-encoder",
                action="store_true",
                help="skip text-encoder LoRA keys (not supported) instead of failing",
            )
    run_help = " or a training run folder (python -m persongen_jax.train: its checkpoint, --step)"
    for name, help_ in [
        (
            "export-lora",
            "a LoRA folder (or a training run) -> diffusers/PEFT .safetensors (diffusers' load_lora_weights)",
        ),
        ("export-adapter", "an adapter folder (or a training run) -> IP-Adapter layout .safetensors"),
    ]:
        s = add(name, help_, f"the {name.split('-')[1]} folder{run_help}", "the .safetensors file to write")
        s.add_argument(
            "--step", type=int, default=None, help="with a training run: the checkpoint step (default: the latest)"
        )
        if name == "export-adapter":
            s.add_argument("--name", default=None, help="which condition to export (default: the only one)")
    add(
        "export-photomaker",
        "a converted PhotoMaker folder (id_encoder/ + lora/, v1 or V2) -> the official "
        "checkpoint layout ({id_encoder, lora_weights}: .bin as torch.save, or flat .safetensors)",
        "the converted PhotoMaker folder",
        "the .bin or .safetensors file to write",
    )
    for name, help_ in [
        ("controlnet", "a diffusers ControlNetModel folder (SDXL) -> a ControlNet folder for generate --controlnet"),
        ("t2i-adapter", "a diffusers T2IAdapter folder (full_adapter_xl) -> a folder for generate --t2i-adapter"),
    ]:
        s = add(name, help_, "the diffusers folder (config.json + weights)", "the converted folder to write")
        s.add_argument("--unet", type=Path, default=None, help=unet_help)
        s.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the stored params")
        s.add_argument("--variant", default=None, help="weight file variant, e.g. fp16 (default: none)")
        s.add_argument(
            "--verify",
            action="store_true",
            help="run the PyTorch and Flax models on the same random inputs; print the max abs diff",
        )
    for name, help_, src in [
        (
            "arcface",
            "an insightface ArcFace recognition ONNX file (IResNet, e.g. w600k_r50.onnx, "
            "glintr100.onnx) -> an IResNet folder",
            "the .onnx file",
        ),
        (
            "inception",
            "pytorch-fid's FID InceptionV3 weights (pt_inception-2015-12-05-6726825d.pth, or an "
            "InceptionV3 state dict) -> the FID metric's network",
            "the .pth / .safetensors file",
        ),
        (
            "lpips",
            "a whole lpips.LPIPS state dict (backbone + linear layers: torch.save(lpips.LPIPS(net='alex')"
            ".state_dict(), 'lpips_alex.pth')) -> the Face Div. metric's network",
            "the .pth / .safetensors file",
        ),
    ]:
        s = add(name, help_, src, "the folder to write")
        auto = " (auto: float32)" if name == "arcface" else ""  # the ONNX reader gives float32 arrays
        s.add_argument("--dtype", choices=DTYPES, default="auto", help=f"dtype of the stored params{auto}")
    return p


def _lora_command(args, dtype) -> str:
    from weights_conversion import lora

    if args.command in ("lora", "ip-adapter", "photomaker"):
        common = {"unet": args.unet, "dtype": dtype, "overwrite": args.overwrite}
        if args.command == "lora":
            return lora.convert_lora(args.src, args.dst, skip_text_encoder=args.skip_text_encoder, **common)
        if args.command == "ip-adapter":
            return lora.convert_ip_adapter(args.src, args.dst, name=args.name, scale=args.scale, **common)
        return lora.convert_photomaker(
            args.src, args.dst, skip_text_encoder=args.skip_text_encoder, version=args.version, **common
        )
    if args.command == "export-photomaker":
        return lora.export_photomaker(args.src, args.dst, overwrite=args.overwrite)
    with _exported_folder(args) as src:
        if args.command == "export-lora":
            return lora.export_lora(src, args.dst, overwrite=args.overwrite)
        return lora.export_adapter(src, args.dst, name=args.name, overwrite=args.overwrite)


def is_run_folder(path: Path) -> bool:
    """A training run folder (`python -m persongen_jax.train`): config.json + checkpoints/."""
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


@contextlib.contextmanager
def _exported_folder(args):
    """export-*'s source: the LoRA / adapter folder given, or that of a training run's checkpoint (--step)
    written to a temporary folder."""
    from weights_conversion.core import ConversionError

    if not is_run_folder(args.src):
        if args.step is not None:
            raise ConversionError(f"--step: {args.src} is not a training run folder (config.json + checkpoints/)")
        yield args.src
        return
    from persongen_jax.models import lora as lora_lib
    from persongen_jax.sources import load_trained_model

    try:
        model, _, step = load_trained_model(args.src, step=args.step)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    save, what = (lora_lib.save_lora, "LoRA") if args.command == "export-lora" else (lora_lib.save_adapters, "adapters")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save(model.unet, Path(tmp) / "folder")
        except ValueError:
            raise ConversionError(f"{args.src}: the run's model has no {what} to export") from None
        print(f"{args.src}: {what} of the checkpoint at step {step}", file=sys.stderr)
        yield Path(tmp) / "folder"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verify", False):
        import importlib.util

        if importlib.util.find_spec("torch") is None:  # before writing anything, not after the conversion
            print(
                "error: --verify runs the PyTorch model: install the [torch] extra (pip install -e '.[torch]') "
                "or drop --verify",
                file=sys.stderr,
            )
            return 1
    from weights_conversion.convert import convert_clip, convert_sdxl
    from weights_conversion.core import ConversionError

    dtype = None if getattr(args, "dtype", "auto") == "auto" else args.dtype
    if args.command not in ("sdxl", "clip", "dino"):
        try:
            if args.command == "arcface":
                from weights_conversion.onnx_arcface import convert_arcface

                summary = convert_arcface(args.src, args.dst, dtype=dtype, overwrite=args.overwrite)
            elif args.command == "lpips":
                from weights_conversion.metric_models import convert_lpips

                summary = convert_lpips(args.src, args.dst, dtype=dtype, overwrite=args.overwrite)
            elif args.command == "inception":
                from weights_conversion.metric_models import convert_inception

                summary = convert_inception(args.src, args.dst, dtype=dtype, overwrite=args.overwrite)
            elif args.command in CONTROL_COMMANDS:
                from weights_conversion.controlnet import convert_control_model

                summary = convert_control_model(
                    args.command,
                    args.src,
                    args.dst,
                    unet=args.unet,
                    dtype=dtype,
                    variant=args.variant,
                    overwrite=args.overwrite,
                )
            else:
                summary = _lora_command(args, dtype)
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"converted {args.src} -> {args.dst}: {summary}")
        if getattr(args, "verify", False):
            return _verify(args)
        return 0
    try:
        if args.command == "sdxl":
            done = convert_sdxl(args.src, args.dst, dtype=dtype, variant=args.variant, overwrite=args.overwrite)
        elif args.command == "dino":
            done = [
                convert_clip(
                    args.src,
                    args.dst,
                    dtype=dtype,
                    variant=args.variant,
                    overwrite=args.overwrite,
                    supported=("ViTModel",),
                )
            ]
        else:
            done = [convert_clip(args.src, args.dst, dtype=dtype, variant=args.variant, overwrite=args.overwrite)]
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {', '.join(done)} -> {args.dst}")
    return _verify(args) if args.verify else 0


def _verify(args) -> int:
    from weights_conversion.verify import verify_folder

    worst = verify_folder(args.src, args.dst, variant=args.variant)
    if not math.isfinite(worst):
        print(
            f"error: --verify: a PyTorch or Flax output of {args.dst} holds NaN/Inf (see the warnings above "
            "for non-finite weights); the converted model is not usable as is",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
