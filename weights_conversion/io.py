"""Reading PyTorch checkpoints without surprises.

- `.safetensors` is parsed here (header + memory-mapped data) rather than
  through the safetensors package so that bf16 works without torch, tensors
  are read lazily (a 10 GB UNet is never fully resident twice), and a
  truncated file is detected from its header before anything is converted.
- `.bin` (pickle) files need torch; they are loaded with `weights_only=True`.
- Sharded checkpoints (`*.index.json` with a `weight_map`) are merged.

Every failure raises `ConversionError` with a one-line message naming the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from persongen_jax.io import loads_json
from weights_conversion.core import ConversionError

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class LazyTensor:
    """A tensor in a safetensors file, read on `np.asarray`."""

    def __init__(self, path: Path, dtype, shape: tuple, start: int, end: int):
        self.path, self.dtype, self.shape, self.start, self.end = path, np.dtype(dtype), tuple(shape), start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def __array__(self, dtype=None, copy=None):
        if self.nbytes == 0:
            arr = np.zeros(self.shape, self.dtype)
        else:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.start, shape=(self.nbytes,))
            arr = np.array(mm.view(self.dtype).reshape(self.shape))  # copy out of the map
        return arr if dtype is None else arr.astype(dtype)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, data start offset); ConversionError naming the file when it is not one."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise ConversionError(
                    f"{path}: truncated or corrupt safetensors file (header says "
                    f"{header_len} header bytes, file has {size})"
                )
            header = loads_json(f.read(header_len), path, "corrupt safetensors header")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(header, dict):
        raise ConversionError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an object of tensor entries)"
        )
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ConversionError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    return header, 8 + header_len


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` entry of a safetensors header ({} when absent)."""
    return _safetensors_header(Path(path))[0].get("__metadata__") or {}


def _index(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors(path: str | os.PathLike) -> dict[str, LazyTensor]:
    path = Path(path)
    size = path.stat().st_size
    header, data_start = _safetensors_header(path)
    tensors = {}
    needed = data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(
                f"{path}: unsupported or malformed tensor entry {name!r} ({type(e).__name__}: {e})"
            ) from None
        if not (_index(begin) and _index(end) and begin <= end and all(_index(d) for d in shape)):
            raise ConversionError(
                f"{path}: malformed tensor entry {name!r}: data_offsets {[begin, end]} and shape "
                f"{list(shape)} must be non-negative integers, begin <= end"
            )
        if (end - begin) != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise ConversionError(f"{path}: tensor {name!r} byte range does not match its shape {shape}")
        needed = max(needed, data_start + end)
        tensors[name] = LazyTensor(path, dtype, shape, data_start + begin, data_start + end)
    if needed > size:
        raise ConversionError(f"{path}: truncated file: tensors need {needed} bytes, file has {size}")
    return tensors


def read_torch_bin(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading .bin checkpoints needs PyTorch (pip install 'persongen_jax[torch]')"
        ) from None
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # old non-zip format
    except Exception as e:  # torch raises many types for a damaged pickle/zip
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConversionError(
            f"{path}: cannot read PyTorch checkpoint (corrupt or truncated?): {type(e).__name__}: {msg}"
        ) from None
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return dict(sd)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """{key: tensor-like} from a .safetensors / .bin file or a sharded *.index.json."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    name = path.name
    if name.endswith(".index.json"):
        try:
            weight_map = loads_json(path.read_bytes(), path, "not a valid sharded-checkpoint index")
            weight_map = weight_map["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("weight_map must map tensor names to file names")
        except ValueError as e:
            raise ConversionError(str(e)) from None
        except (KeyError, TypeError) as e:
            raise ConversionError(f"{path}: not a valid sharded-checkpoint index ({type(e).__name__}: {e})") from None
        out = {}
        for shard in sorted(set(weight_map.values())):
            part = read_checkpoint(path.parent / shard)
            for k, v in part.items():
                if weight_map.get(k) == shard:
                    out[k] = v
        return out
    if name.endswith(".safetensors"):
        return read_safetensors(path)
    if name.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return read_torch_bin(path)
    raise ConversionError(f"{path}: unknown checkpoint format (expected .safetensors, .bin or *.index.json)")


_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def find_weights(folder: str | os.PathLike, variant: str | None = None) -> Path:
    """The weight file of a diffusers/transformers component folder (safetensors preferred)."""
    folder = Path(folder)
    v = f".{variant}" if variant else ""
    candidates = []
    for ext in (".safetensors", ".bin"):
        for stem in _WEIGHT_STEMS:
            candidates += [folder / f"{stem}{v}{ext}", folder / f"{stem}{v}{ext}.index.json"]
    for c in candidates:
        if c.is_file():
            return c
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hint = ""
    if not variant and any(".fp16." in p for p in present):
        hint = " (found fp16 files: pass --variant fp16)"
    raise ConversionError(
        f"{folder}: no weights found; expected one of "
        f"{', '.join(c.name for c in candidates[:4])}, ...; folder has {present[:10]}{hint}"
    )


def tensor_nbytes(t) -> int:
    if isinstance(t, LazyTensor):
        return t.nbytes
    if hasattr(t, "element_size"):
        return t.numel() * t.element_size()
    return int(np.asarray(t).nbytes)
