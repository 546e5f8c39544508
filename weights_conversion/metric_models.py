"""Converting the evaluation metrics' networks that come as a single PyTorch state-dict file.

    python -m weights_conversion inception pt_inception-2015-12-05-6726825d.pth DST     (FID)
    python -m weights_conversion lpips lpips_alex.pth DST                                 (Face Div.)

Each writes DST (config.json with "_persongen_class" + params/ + checksums) atomically through
`convert.atomic_output`, after the strict key/shape check of `core.convert_state_dict`: every source tensor
is used (besides the ones the model class documents as unused and drops) and every parameter filled.
"""

from __future__ import annotations

import json
from pathlib import Path

from persongen_jax.models import modeling
from weights_conversion import io
from weights_conversion.convert import atomic_output, check_output
from weights_conversion.core import ConversionError, convert_state_dict


def convert_file(
    src: Path, dst: Path, class_name: str, config: dict, *, dtype: str | None = None, overwrite: bool = False
) -> int:
    """SRC (.pth / .bin / .safetensors state dict) -> DST for the registered `class_name` built from
    `config`; returns the number of parameters written."""
    src = Path(src)
    check_output(dst, overwrite, [src])
    if not src.is_file():
        raise ConversionError(f"{src}: no such file")
    cls = modeling.get_model_class(class_name)
    state_dict = io.read_checkpoint(src)
    if not state_dict:
        raise ConversionError(f"{src}: holds no tensors")
    flat = convert_state_dict(cls, config, state_dict, source=str(src), param_dtype=dtype)
    with atomic_output(dst, overwrite, [src]) as tmp:
        cfg = dict(config, source=src.name)
        cfg[modeling.CLASS_KEY] = class_name
        (tmp / modeling.CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        modeling.save_params(flat, tmp / modeling.PARAMS_DIR)
    return len(flat)


def convert_inception(src: Path, dst: Path, *, dtype: str | None = None, overwrite: bool = False) -> str:
    """pytorch-fid's FID Inception weights (torchvision Inception3 keys, as pt_inception-2015-12-05-6726825d.pth,
    or a pytorch_fid.inception.InceptionV3 state dict) -> DST (`models.inception.FIDInceptionV3`)."""
    n = convert_file(
        src, dst, "FIDInceptionV3", {"resize_input": True, "normalize_input": True}, dtype=dtype, overwrite=overwrite
    )
    return f"FIDInceptionV3 ({n} tensors; fc classifier dropped)"


def convert_lpips(src: Path, dst: Path, *, net: str = "alex", dtype: str | None = None, overwrite: bool = False) -> str:
    """A whole lpips.LPIPS state dict (backbone + linear layers: `torch.save(lpips.LPIPS(net="alex")
    .state_dict(), "lpips_alex.pth")`; the package's weights/v0.1/alex.pth holds only the linear layers)
    -> DST (`models.lpips.LPIPS`)."""
    n = convert_file(src, dst, "LPIPS", {"net": net}, dtype=dtype, overwrite=overwrite)
    return f"LPIPS net={net} ({n} tensors)"
