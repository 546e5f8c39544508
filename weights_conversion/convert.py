"""Converting whole model folders: diffusers SDXL pipelines and transformers CLIP models.

Output layout (each component loadable with `persongen_jax.models.from_pretrained`):

    DST/model_index.json            (SDXL only, copied)
    DST/unet/{config.json,params/}
    DST/vae/...  DST/text_encoder/...  DST/text_encoder_2/...
    DST/tokenizer/  DST/tokenizer_2/  (copied verbatim)

Everything is written to a temporary sibling folder and renamed into place
only when every component converted, so a failed run leaves DST untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from persongen_jax.io import atomic_dir, read_json
from persongen_jax.models import modeling
from weights_conversion import io
from weights_conversion.core import ConversionError, convert_state_dict

SDXL_MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SDXL_COPIED = ("tokenizer", "tokenizer_2", "scheduler")

# transformers `model_type` -> class, for configs without `architectures`.
_MODEL_TYPES = {
    "clip": "CLIPModel",
    "clip_text_model": "CLIPTextModel",
    "clip_vision_model": "CLIPVisionModel",
    "vit": "ViTModel",
}
SUPPORTED = (
    "UNet2DConditionModel",
    "AutoencoderKL",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "ControlNetModel",
    "T2IAdapter",
)


def read_source_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    try:
        return read_json(path)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def class_name_of(config: dict, folder: Path, supported=SUPPORTED) -> str:
    """Our class for a reference config: diffusers `_class_name`, transformers `architectures`/`model_type`;
    ConversionError unless it is one of `supported`."""
    name = config.get("_class_name")
    if name is None and config.get("architectures"):
        name = config["architectures"][0]
    if name is None:
        name = _MODEL_TYPES.get(config.get("model_type", ""))
    if name not in supported:
        raise ConversionError(
            f"{folder / 'config.json'}: model class {name!r} is not supported; expected one of {', '.join(supported)}"
        )
    return name


def _progress(state_dict: dict, desc: str):
    total = sum(io.tensor_nbytes(v) for v in state_dict.values())

    def wrap(keys, sd):
        # sd: the state dict after the model's preprocess_torch_state_dict (keys may be renamed).
        # disable=None: a bar on a terminal, silence in logs/CI.
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False) as bar:
            for k in keys:
                yield k
                bar.update(io.tensor_nbytes(sd[k]))

    return wrap


def convert_component(
    src: Path, dst: Path, *, dtype: str | None = None, variant: str | None = None, supported=SUPPORTED
) -> str:
    """Converts one diffusers/transformers model folder (a class of `supported`) into `dst` (config.json +
    params/)."""
    config = read_source_config(src)
    name = class_name_of(config, src, supported)
    cls = modeling.get_model_class(name)
    weights = io.find_weights(src, variant)
    state_dict = io.read_checkpoint(weights)
    flat = convert_state_dict(
        cls,
        config,
        state_dict,
        source=str(weights),
        param_dtype=dtype,
        progress=_progress(state_dict, f"{src.name} ({weights.name})"),
    )
    dst.mkdir(parents=True, exist_ok=True)
    out_config = dict(config)
    out_config[modeling.CLASS_KEY] = name
    (dst / modeling.CONFIG_FILE).write_text(json.dumps(out_config, indent=2, sort_keys=True))
    modeling.save_params(flat, dst / modeling.PARAMS_DIR)
    return name


# Entries a converted folder may hold besides its components (SDXL: copied verbatim).
_SDXL_EXTRAS = ("model_index.json",) + SDXL_COPIED


def _is_copied_clip_file(name: str) -> bool:
    """Tokenizer / processor files `convert_clip` copies next to the converted model: preprocessor_config.json /
    processor_config.json (transformers 5 saves a processor there) hold the image preprocessing CLIP-T reads."""
    return name.startswith(("tokenizer", "special_tokens", "preprocessor")) or name in (
        "vocab.json",
        "merges.txt",
        "processor_config.json",
    )


def written_by_us(folder: Path) -> bool:
    """Whether `folder` is one this tool writes: a component (config.json + params/ [+ checksums, copied
    tokenizer files]) or a folder of components (SDXL: + model_index.json, tokenizer*/, scheduler/;
    PhotoMaker: id_encoder/ + lora/) and nothing else."""

    def component(p: Path) -> bool:
        return (p / modeling.CONFIG_FILE).is_file() and (p / modeling.PARAMS_DIR).is_dir()

    entries = list(folder.iterdir())
    if component(folder):
        return all(
            e.name in (modeling.CONFIG_FILE, modeling.PARAMS_DIR) or _is_copied_clip_file(e.name) for e in entries
        )
    parts = [e for e in entries if e.is_dir() and component(e)]
    return bool(parts) and all(e in parts or e.name in _SDXL_EXTRAS for e in entries)


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output(dst: Path, overwrite: bool = False, sources=(), *, kind: str = "folder") -> Path:
    """Checks DST before any conversion work; ConversionError (one line) when:
    - DST is a symlink (dangling or not: the result would replace the link, not its target);
    - DST is, contains or is inside a source (`sources`: the input file/folder, --unet ...), since
      --overwrite replaces DST as a whole;
    - DST exists without --overwrite, or with --overwrite but is not a {folder this tool wrote | file};
    - the folder that would receive DST cannot be written (read-only, not a folder).
    kind: "folder" (converted model) or "file" (exported .safetensors). Returns DST made absolute."""
    dst = Path(dst).absolute()
    if dst.is_symlink():
        target = os.readlink(dst)
        raise ConversionError(
            f"{dst}: is a symlink to {target}"
            + ("" if dst.exists() else " (which does not exist)")
            + "; give the real path of the output"
        )
    d = os.path.realpath(dst)
    for src in sources:
        if src is None:
            continue
        s = os.path.realpath(src)
        if d == s:
            raise ConversionError(f"{dst}: is the source {src}; write the output elsewhere")
        if os.path.commonpath([d, s]) == d:
            raise ConversionError(
                f"{dst}: contains the source {src}; --overwrite would delete it, so write the output elsewhere"
            )
        if os.path.commonpath([d, s]) == s:
            raise ConversionError(f"{dst}: is inside the source {src}; write the output elsewhere")
    if os.path.lexists(dst):
        if not overwrite:
            raise ConversionError(f"{dst}: already exists (pass --overwrite to replace it)")
        if kind == "file" and dst.is_dir():
            raise ConversionError(f"{dst}: is a folder; the export writes a .safetensors file, give a file path")
        if kind == "folder" and not dst.is_dir():
            raise ConversionError(f"{dst}: is a file, not a folder this tool wrote; --overwrite replaces only those")
        if kind == "folder" and any(dst.iterdir()) and not written_by_us(dst):
            held = ", ".join(sorted(p.name for p in dst.iterdir())[:5])
            raise ConversionError(
                f"{dst}: not a folder written by weights_conversion (config.json + params/; it "
                f"holds {held or 'nothing we wrote'}); --overwrite replaces only those: remove it "
                "yourself or choose another DST"
            )
    parent = _nearest_existing(dst.parent)
    if not parent.is_dir():
        raise ConversionError(f"{dst}: {parent} is not a folder")
    try:  # a real write, not os.access: root, ACLs and read-only mounts all answer honestly
        tempfile.TemporaryDirectory(prefix=".persongen-write-probe-", dir=parent).cleanup()
    except OSError as e:
        raise ConversionError(f"{dst}: cannot write in {parent} ({e.strerror}); nothing was converted") from None
    return dst


def atomic_output(dst: Path, overwrite: bool = False, sources=()):
    """`persongen_jax.io.atomic_dir` behind `check_output`: errors are ConversionErrors naming DST and the flag."""
    return atomic_dir(check_output(dst, overwrite, sources), overwrite=True)


def convert_sdxl(src: Path, dst: Path, *, dtype=None, variant=None, overwrite=False) -> list[str]:
    """A diffusers SDXL folder (or a folder holding just some components, or one
    component folder itself) -> `dst`. Returns the converted component names."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder")
    done = []
    with atomic_output(dst, overwrite, [src]) as tmp:
        if (src / "config.json").is_file() and not (src / "model_index.json").is_file():
            convert_component(src, tmp, dtype=dtype, variant=variant)  # a bare component folder
            return [src.name]
        components = [c for c in SDXL_MODEL_COMPONENTS if (src / c / "config.json").is_file()]
        if not components:
            raise ConversionError(
                f"{src}: no SDXL components found; expected model_index.json and/or "
                f"subfolders {', '.join(SDXL_MODEL_COMPONENTS)} with a config.json"
            )
        for c in components:
            print(f"converting {c} ...", flush=True)
            name = convert_component(src / c, tmp / c, dtype=dtype, variant=variant)
            done.append(f"{c} ({name})")
        for c in SDXL_COPIED:
            if (src / c).is_dir():
                shutil.copytree(src / c, tmp / c)
        if (src / "model_index.json").is_file():
            shutil.copy2(src / "model_index.json", tmp / "model_index.json")
    return done


def convert_clip(src: Path, dst: Path, *, dtype=None, variant=None, overwrite=False, supported=SUPPORTED) -> str:
    """A transformers CLIP folder (or another class of `supported`: `weights_conversion dino` passes ViTModel)
    -> `dst`; tokenizer/processor files are copied alongside."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder")
    with atomic_output(dst, overwrite, [src]) as tmp:
        name = convert_component(src, tmp, dtype=dtype, variant=variant, supported=supported)
        for f in src.iterdir():
            if f.is_file() and _is_copied_clip_file(f.name):
                shutil.copy2(f, tmp / f.name)
    return name
