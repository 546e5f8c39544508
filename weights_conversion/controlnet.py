"""Spatial-control models: a diffusers ControlNetModel / T2IAdapter folder -> a converted folder.

    python -m weights_conversion controlnet SRC DST [--unet UNET_DIR] [--verify]
    python -m weights_conversion t2i-adapter SRC DST [--unet UNET_DIR] [--verify]

The weights go through the same strict key/shape conversion as every component (`convert.convert_component`:
every key used, every parameter filled, checksums written, the output written atomically). Before any work,
the model is checked against the UNet it will steer (`--unet`: a converted or diffusers UNet / SDXL folder;
default: the SDXL base config): a ControlNet or adapter made for another UNet size is a one-line error
listing both shapes.
"""

from __future__ import annotations

from pathlib import Path

from weights_conversion.convert import atomic_output, check_output, convert_component, read_source_config
from weights_conversion.core import ConversionError
from weights_conversion.lora import unet_config

KINDS = {"controlnet": "ControlNetModel", "t2i-adapter": "T2IAdapter"}


def check_against_unet(kind: str, config: dict, unet, source: Path) -> None:
    """ConversionError (one line) when the model in `config` does not fit the UNet of `unet` (None: SDXL base)."""
    from persongen_jax.models.unet import UNetConfig

    try:
        ucfg = UNetConfig.from_dict(unet_config(unet))
    except ValueError as e:
        raise ConversionError(f"{unet}: {e}") from None
    from persongen_jax.models.controlnet import ControlNetConfig, check_matches_unet
    from persongen_jax.models.t2i_adapter import T2IAdapterConfig, check_adapter_matches_unet

    try:
        if kind == "controlnet":
            check_matches_unet(ControlNetConfig.from_dict(config), ucfg, name=f"{source}: this ControlNet")
        else:
            check_adapter_matches_unet(T2IAdapterConfig.from_dict(config), ucfg, name=f"{source}: this T2I-Adapter")
    except ValueError as e:
        raise ConversionError(str(e) if str(e).startswith(str(source)) else f"{source / 'config.json'}: {e}") from None


def convert_control_model(kind: str, src, dst, *, unet=None, dtype=None, variant=None, overwrite=False) -> str:
    """Converts the diffusers folder `src` (a ControlNetModel for kind "controlnet", a T2IAdapter for
    "t2i-adapter") into `dst`; returns a one-line summary."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder (expected a diffusers {KINDS[kind]} folder)")
    check_output(dst, overwrite, [src, unet])  # before any work, not after
    config = read_source_config(src)
    if config.get("_class_name") != KINDS[kind]:
        raise ConversionError(
            f"{src / 'config.json'}: _class_name {config.get('_class_name')!r}; "
            f"`{kind}` converts a diffusers {KINDS[kind]} folder"
        )
    check_against_unet(kind, config, unet, src)
    with atomic_output(dst, overwrite, [src, unet]) as tmp:
        name = convert_component(src, tmp, dtype=dtype, variant=variant)
    return f"{name} ({'for the UNet of ' + str(unet) if unet else 'for the SDXL base UNet'})"
