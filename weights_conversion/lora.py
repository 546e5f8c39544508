"""LoRA, IP-Adapter and PhotoMaker checkpoints <-> persongen_jax LoRA / adapter folders.

Import (every key used, shapes checked against the UNet, errors name file and keys):

    lora        a standalone SDXL LoRA file, in any key style diffusers' `load_lora_weights` reads:
                  PEFT/diffusers   [unet.]<module>.lora_A.weight / .lora_B.weight [/ <module>.alpha]
                                   (alphas from the safetensors `lora_adapter_metadata`, else alpha = rank)
                  old diffusers    [unet.]<module parent>.processor.to_q_lora.down.weight / .up.weight
                                   (to_k_lora, to_v_lora, to_out_lora = to_out.0), .lora_linear_layer.down/up
                  kohya            lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha
                                   (diffusers block names or SGM ones: input_blocks_4_1_..., middle_block_1_...)
                Text-encoder LoRA is not supported: an error, or skipped (and counted) with skip_text_encoder.
    ip-adapter  an SDXL IP-Adapter checkpoint {"image_proj": {proj.*, norm.*}, "ip_adapter":
                {"<n>.to_k_ip.weight", "<n>.to_v_ip.weight"}} -> an adapter folder with one `parallel`
                condition (default "id") + ImageProjection. n = 1 + 2 * (index of the cross-attention in
                diffusers' `unet.attn_processors` order: down blocks, up blocks, then the mid block).
    photomaker  PhotoMaker v1 or V2 {"id_encoder": ..., "lora_weights": ...} -> DST/id_encoder + DST/lora
                (the version from the keys: V2 has `qformer_perceiver.*`).

Export (PyTorch-loadable safetensors):

    export-lora     keys unet.<module>.lora_A.weight / lora_B.weight, rank/alpha in the
                    `lora_adapter_metadata` header entry (diffusers' `load_lora_weights` reads both)
    export-photomaker  a converted PhotoMaker folder -> {"id_encoder", "lora_weights"} .bin / .safetensors in
                    the official key layout (bitwise round trip)
    export-adapter  keys image_proj.proj.* / image_proj.norm.* / ip_adapter.<n>.to_k_ip.weight (the
                    flat IP-Adapter .safetensors layout that diffusers' `load_ip_adapter` reads)

The UNet the weights are for (`unet=`): a converted UNet / SDXL folder or a diffusers one (only
config.json is read); default: the SDXL base config.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from persongen_jax.io import chmod_as_created, loads_json, read_json
from persongen_jax.models import lora as L
from persongen_jax.models import modeling
from weights_conversion import io
from weights_conversion.convert import atomic_output, check_output
from weights_conversion.core import (
    ConversionError,
    _listing,
    _to_numpy,
    all_finite,
    check_keys,
    convert_state_dict,
    warn_non_finite,
)

_TE_PREFIXES = ("text_encoder", "lora_te", "te_", "te1_", "te2_", "text_model", "conditioner")
_ATTN_LORA = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PEFT_RE = re.compile(r"^(.*)\.lora_([AB])(?:\.[A-Za-z_]\w*)?\.weight$")
_OLD_RE = re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LINEAR_LAYER_RE = re.compile(r"^(.*)\.(?:lora_linear_layer|lora)\.(down|up)\.weight$")
_ALPHA_RE = re.compile(r"^(.*)\.alpha$")
_SGM_RE = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_SGM_MID_RE = re.compile(r"^lora_unet_middle_block_(\d+)_(.+)$")


# ----------------------------------------------------------------------------- the target UNet


def unet_config(unet: str | os.PathLike | None) -> dict:
    """A UNet config dict from a converted/diffusers UNet folder, an SDXL folder with unet/, or a
    config.json; None = the SDXL base preset."""
    from persongen_jax.models.unet import UNet2DConditionModel

    if unet is None:
        return UNet2DConditionModel.preset_config("sdxl_base")
    p = Path(unet)
    for cand in (p, p / "config.json", p / "unet" / "config.json"):
        if cand.is_file() and cand.name.endswith(".json"):
            try:
                cfg = read_json(cand)
            except ValueError as e:
                raise ConversionError(str(e)) from None
            if cfg.get("_class_name", cfg.get(modeling.CLASS_KEY)) != "UNet2DConditionModel":
                continue
            return {k: v for k, v in cfg.items() if k != modeling.CLASS_KEY}
    raise ConversionError(f"{unet}: no UNet2DConditionModel config.json found (tried the folder, and unet/)")


def abstract_unet(unet: str | os.PathLike | None):
    from persongen_jax.models.unet import UNet2DConditionModel

    try:
        return modeling.abstract_model(UNet2DConditionModel, unet_config(unet))
    except ValueError as e:
        raise ConversionError(f"{unet}: {e}") from None


def ip_adapter_order(path: str) -> tuple:
    """Sort key of an attention path in diffusers' `unet.attn_processors` order (module registration
    order of UNet2DConditionModel: down_blocks, up_blocks, then mid_block)."""
    parts = path.split(".")
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[parts[0]]
    return (group,) + tuple(int(p) if p.isdigit() else p for p in parts[1:])


def ip_adapter_numbering(attn2_paths) -> dict[str, int]:
    """{cross-attention path: IP-Adapter key number}; diffusers numbers every attention processor
    (attn1, attn2 alternating) and only cross-attentions carry weights: 1, 3, 5, ..."""
    return {p: 1 + 2 * i for i, p in enumerate(sorted(attn2_paths, key=ip_adapter_order))}


# ----------------------------------------------------------------------------- LoRA import


def _kohya_map(linears: Mapping[str, Any]) -> dict[str, str]:
    return {"lora_unet_" + p.replace(".", "_"): p for p in linears}


def _sgm_to_diffusers(name: str, config: Mapping[str, Any]) -> str | None:
    """kohya SDXL names use the SGM UNet's numbering: input_blocks_<i>_<j>, middle_block_<j>,
    output_blocks_<i>_<j> (j = 0 resnet, 1 attention). Returns the kohya name in diffusers
    numbering, or None. Needs a uniform int layers_per_block (as in SDXL)."""
    if m := _SGM_MID_RE.match(name):  # middle_block_<i>: 0 resnet, 1 attention, 2 resnet
        return f"lora_unet_mid_block_attentions_0_{m.group(2)}" if m.group(1) == "1" else None
    m = _SGM_RE.match(name)
    lpb = config.get("layers_per_block", 2)
    if not m or not isinstance(lpb, int):
        return None
    kind, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if j != 1:
        return None
    if kind == "input_blocks":
        if i == 0:
            return None
        block, layer = (i - 1) // (lpb + 1), (i - 1) % (lpb + 1)
        return f"lora_unet_down_blocks_{block}_attentions_{layer}_{rest}"
    block, layer = i // (lpb + 1), i % (lpb + 1)
    return f"lora_unet_up_blocks_{block}_attentions_{layer}_{rest}"


def _read_metadata(path: Path) -> dict | None:
    """PEFT LoRA config from a safetensors header (`lora_adapter_metadata`, keys `unet.<field>`);
    ConversionError naming the file and the field when it is malformed."""
    if not path.name.endswith(".safetensors"):
        return None
    raw = io.read_safetensors_metadata(path).get("lora_adapter_metadata")
    if not raw:
        return None
    where = f"{path}: __metadata__.lora_adapter_metadata"
    try:
        meta = loads_json(raw, where, "is not valid JSON")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(meta, dict):
        raise ConversionError(f"{where} is a JSON {type(meta).__name__}, expected an object")
    meta = {k.removeprefix("unet."): v for k, v in meta.items() if not k.startswith("text_encoder")}
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for key, ok, want in (
        ("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive int"),
        ("lora_alpha", number, "a number"),
    ):
        if key in meta and not ok(meta[key]):
            raise ConversionError(f"{where}: {key}={meta[key]!r}, expected {want}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = meta.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict) or not all(isinstance(k, str) and number(v) for k, v in pat.items()):
            raise ConversionError(f"{where}: {key} must map module patterns to numbers, got {pat!r}"[:300])
        for k in pat:
            try:
                re.compile(k)
            except re.error as e:
                raise ConversionError(f"{where}: {key} pattern {k!r} is not a regular expression ({e})") from None
    return meta


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


def parse_lora_state_dict(
    sd: Mapping[str, Any],
    *,
    source: str,
    unet_cfg: Mapping[str, Any],
    linears,
    metadata: Mapping[str, Any] | None = None,
    skip_text_encoder: bool = False,
    dtype=None,
) -> tuple[dict[str, tuple[int, float]], dict[tuple, np.ndarray], int]:
    """A LoRA state dict (any supported key style) -> ({module: (rank, alpha)}, {flax path: array},
    number of skipped text-encoder keys). `linears`: {module path: Linear} of the target UNet."""
    kohya = _kohya_map(linears)
    parts: dict[str, dict[str, Any]] = {}  # module -> {"A": (key, tensor), "B": ..., "alpha": ...}
    te, unknown_style, unknown_module, unsupported = [], [], [], []

    def put(module, slot, key, value):
        module = module.replace(".processor.", ".").removesuffix(".processor")
        if module not in linears:
            unknown_module.append(key)
            return
        if slot in parts.setdefault(module, {}):
            unknown_style.append(f"{key} (a second {slot} for {module})")
            return
        parts[module][slot] = (key, value)

    for key, value in sd.items():
        if key.startswith(_TE_PREFIXES):
            te.append(key)
            continue
        if key.startswith("lora_unet_"):
            name, _, leaf = key.partition(".")
            slot = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}.get(leaf)
            if slot is None:
                unsupported.append(key)
                continue
            module = kohya.get(name) or kohya.get(_sgm_to_diffusers(name, unet_cfg) or "")
            if module is None:
                unknown_module.append(key)
                continue
            put(module, slot, key, value)
            continue
        k = key.removeprefix("unet.")
        if m := _PEFT_RE.match(k):
            put(m.group(1), m.group(2), key, value)
        elif m := _OLD_RE.match(k):
            put(f"{m.group(1)}.{_ATTN_LORA[m.group(2)]}", "A" if m.group(3) == "down" else "B", key, value)
        elif m := _LINEAR_LAYER_RE.match(k):
            put(m.group(1), "A" if m.group(2) == "down" else "B", key, value)
        elif m := _ALPHA_RE.match(k):
            put(m.group(1), "alpha", key, value)
        elif "lora" in k and (k.endswith(".bias") or "magnitude" in k or "dora" in k):
            unsupported.append(key)
        else:
            unknown_style.append(key)

    errors = []
    if te and not skip_text_encoder:
        errors.append(
            _listing(
                "text-encoder LoRA keys (not supported; pass --skip-text-encoder to convert only the UNet LoRA)",
                sorted(te),
            )
        )
    if unknown_module:
        errors.append(
            _listing("keys for modules the UNet does not have (or that are not linear layers)", sorted(unknown_module))
        )
    if unknown_style:
        errors.append(_listing("keys in no known LoRA key style", sorted(unknown_style)))
    if unsupported:
        errors.append(_listing("unsupported LoRA variants (DoRA, LoRA bias, LoHa/LoKr ...)", sorted(unsupported)))

    modules, flat, bad = {}, {}, []
    meta = metadata or {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            have = ", ".join(v[0] for v in p.values())
            bad.append(f"{module}: needs both down/A and up/B weights, found only {have}")
            continue
        (ka, a), (kb, b) = p["A"], p["B"]
        lin = linears[module]
        sa, sb = tuple(a.shape), tuple(b.shape)
        if len(sa) != 2 or len(sb) != 2:
            bad.append(f"{ka}: shape {sa} / {kb}: shape {sb} (only linear LoRA is supported, not conv)")
            continue
        r = sa[0]
        if sa != (r, lin.in_features) or sb != (lin.out_features, r):
            bad.append(f"{ka} {sa} / {kb} {sb}: {module} expects ({r}, {lin.in_features}) / ({lin.out_features}, {r})")
            continue
        if "alpha" in p:
            alpha = float(np.asarray(_to_numpy(p["alpha"][1])).reshape(()))
        elif meta:
            r_meta = _pattern_value(meta.get("rank_pattern"), module, meta.get("r", r))
            if r_meta != r:
                bad.append(f"{ka}: rank {r}, the file's lora_adapter_metadata says {r_meta}")
                continue
            alpha = float(_pattern_value(meta.get("alpha_pattern"), module, meta.get("lora_alpha", r)))
        else:
            alpha = float(r)  # diffusers/PEFT convention without alphas: scale 1
        modules[module] = (r, alpha)
        base = tuple(module.split("."))
        for slot, t in (("A", a), ("B", b)):
            v = _to_numpy(t).T
            if dtype is not None:
                v = v.astype(dtype)
            elif v.dtype not in (np.float32, np.float16) and v.dtype.name != "bfloat16":
                v = v.astype(np.float32)
            flat[base + (f"lora_{slot}", "kernel")] = np.ascontiguousarray(v)
    warn_non_finite(source, sorted(".".join(map(str, k)) for k, v in flat.items() if not all_finite(v)))
    if bad:
        errors.append(_listing("mismatched LoRA pairs", bad))
    if errors:
        raise ConversionError("\n".join([f"{source}: LoRA does not match the UNet"] + errors))
    if not modules:
        raise ConversionError(f"{source}: no UNet LoRA weights found")
    return modules, flat, len(te)


def _lora_from_state_dict(sd, *, source, unet, metadata=None, skip_text_encoder=False, dtype=None):
    cfg = unet_config(unet)
    from persongen_jax.models.unet import UNet2DConditionModel

    try:
        abstract = modeling.abstract_model(UNet2DConditionModel, cfg)
    except ValueError as e:
        raise ConversionError(f"{unet}: {e}") from None
    return parse_lora_state_dict(
        sd,
        source=source,
        unet_cfg=cfg,
        linears=L.linear_modules(abstract),
        metadata=metadata,
        skip_text_encoder=skip_text_encoder,
        dtype=dtype,
    )


def convert_lora(src, dst, *, unet=None, skip_text_encoder=False, dtype=None, overwrite=False) -> str:
    """A LoRA file -> a LoRA folder at `dst`. Returns a one-line summary."""
    src = Path(src)
    check_output(dst, overwrite, [src, unet])  # before minutes of work, not after
    sd = io.read_checkpoint(src)
    if sd and all(isinstance(v, Mapping) for v in sd.values()):
        raise ConversionError(
            f"{src}: a nested checkpoint with sections {sorted(sd)}; for PhotoMaker use the `photomaker` command"
        )
    modules, flat, skipped = _lora_from_state_dict(
        sd, source=str(src), unet=unet, metadata=_read_metadata(src), skip_text_encoder=skip_text_encoder, dtype=dtype
    )
    with atomic_output(dst, overwrite, [src, unet]) as tmp:
        L.write_folder(dst, L.lora_config(modules), flat, into=tmp)
    return _summary(modules, skipped)


def _summary(modules, skipped):
    ranks = sorted({r for r, _ in modules.values()})
    return f"LoRA on {len(modules)} modules (rank {'/'.join(map(str, ranks))})" + (
        f"; skipped {skipped} text-encoder keys" if skipped else ""
    )


# ----------------------------------------------------------------------------- IP-Adapter import


def _split_ip_adapter(sd: Mapping[str, Any], source: str) -> tuple[dict, dict]:
    if "image_proj" in sd and "ip_adapter" in sd and isinstance(sd["image_proj"], Mapping):
        extra = sorted(set(sd) - {"image_proj", "ip_adapter"})
        if extra:
            raise ConversionError(f"{source}: unexpected sections {extra} (expected image_proj, ip_adapter)")
        return dict(sd["image_proj"]), dict(sd["ip_adapter"])
    image_proj, ip, other = {}, {}, []
    for k, v in sd.items():
        if k.startswith("image_proj."):
            image_proj[k.removeprefix("image_proj.")] = v
        elif k.startswith("ip_adapter."):
            ip[k.removeprefix("ip_adapter.")] = v
        else:
            other.append(k)
    if other or not ip:
        raise ConversionError(
            f"{source}: not an IP-Adapter checkpoint (expected image_proj + ip_adapter "
            f"sections or image_proj.* / ip_adapter.* keys)"
            + (f"\n{_listing('other keys', sorted(other))}" if other else "")
        )
    return image_proj, ip


def convert_ip_adapter(
    src, dst, *, unet=None, name: str = "id", scale: float = 1.0, dtype=None, overwrite=False
) -> str:
    """An SDXL IP-Adapter checkpoint -> an adapter folder: condition `name`, parallel mode, image projection."""
    src = Path(src)
    check_output(dst, overwrite, [src, unet])
    image_proj, ip = _split_ip_adapter(io.read_checkpoint(src), str(src))
    want = {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    if set(image_proj) != want:
        raise ConversionError(
            f"{src}: image_proj keys {sorted(image_proj)[:8]}: only the plain IP-Adapter "
            f"projection ({', '.join(sorted(want))}) is supported (not Plus / FaceID / Full)"
        )
    cross = int(image_proj["norm.weight"].shape[0])
    proj_out, image_dim = (int(s) for s in image_proj["proj.weight"].shape)
    if proj_out % cross:
        raise ConversionError(
            f"{src}: image_proj.proj.weight {tuple(image_proj['proj.weight'].shape)} is not "
            f"num_tokens x {cross} (image_proj.norm.weight width)"
        )
    tokens = proj_out // cross
    abstract = abstract_unet(unet)
    attns = L.cross_attentions(abstract)
    numbering = ip_adapter_numbering(attns)
    expected, target = {}, {}
    for path, n in numbering.items():
        a = attns[path]
        if a.to_k.use_bias:
            raise ConversionError(f"{unet}: the UNet's attention has biases; IP-Adapter layers have none")
        for kv in ("k", "v"):
            key = f"{n}.to_{kv}_ip.weight"
            expected[key] = (a.to_k.in_features, a.to_k.out_features)  # flax layout [in, out]
            target[key] = tuple(L.adapter_param_path(path, kv, name).split(".")) + ("kernel",)
    check_keys(
        expected,
        {k: tuple(v.shape) for k, v in ip.items()},
        source=f"{src} [ip_adapter]",
        transform_shape=lambda k, s: s[::-1],
    )
    if cross != next(iter(attns.values())).to_k.in_features:
        raise ConversionError(
            f"{src}: image_proj.norm.weight width {cross} != the UNet's cross_attention_dim "
            f"{next(iter(attns.values())).to_k.in_features}"
        )

    def conv(t):
        v = _to_numpy(t)
        return (
            v.astype(dtype)
            if dtype is not None
            else (v if v.dtype in (np.float32, np.float16) else v.astype(np.float32))
        )

    flat = {target[k]: np.ascontiguousarray(conv(ip[k]).T) for k in expected}
    warn_non_finite(str(src), sorted(k for k in expected if not all_finite(flat[target[k]])))
    flat[("image_proj", "image_embeds", "kernel")] = np.ascontiguousarray(conv(image_proj["proj.weight"]).T)
    flat[("image_proj", "image_embeds", "bias")] = conv(image_proj["proj.bias"])
    flat[("image_proj", "norm", "scale")] = conv(image_proj["norm.weight"])
    flat[("image_proj", "norm", "bias")] = conv(image_proj["norm.bias"])
    cfg = {
        "format": L.ADAPTERS_FORMAT,
        "version": L.ADAPTERS_VERSION,
        "names": [name],
        "mode": "parallel",
        "scales": {name: float(scale)},
        "image_projection": {
            "condition": name,
            "image_embed_dim": image_dim,
            "cross_attention_dim": cross,
            "num_tokens": tokens,
        },
    }
    with atomic_output(dst, overwrite, [src, unet]) as tmp:
        L.write_folder(dst, cfg, flat, into=tmp)
    return f"IP-Adapter -> condition {name!r} on {len(numbering)} cross-attentions, {tokens} image tokens"


# ----------------------------------------------------------------------------- PhotoMaker import


PHOTOMAKER_VERSIONS = ("v1", "v2")


def photomaker_encoder(enc_sd: Mapping[str, Any], *, source: str, version: str | None = None):
    """(version, class, config) of a PhotoMaker `id_encoder` state dict: V2 when it holds the QFormerPerceiver
    (`qformer_perceiver.*`), else v1; every size read from the shapes. `version` insists (a ConversionError
    when the keys say otherwise)."""
    from persongen_jax.models import id_encoder as v1
    from persongen_jax.models import id_encoder_v2 as v2

    detected = "v2" if v2.is_v2_state_dict(enc_sd) else "v1"
    if version is not None and version != detected:
        raise ConversionError(
            f"{source}: --version {version}, but the keys are those of PhotoMaker {detected} "
            f"(qformer_perceiver.* {'present' if detected == 'v2' else 'absent'})"
        )
    cls, infer = (
        (v2.PhotoMakerV2IDEncoder, v2.config_from_state_dict)
        if detected == "v2"
        else (v1.PhotoMakerIDEncoder, v1.id_encoder_config_from_state_dict)
    )
    try:
        return detected, cls, infer(enc_sd)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def convert_photomaker(
    src, dst, *, unet=None, skip_text_encoder=False, dtype=None, overwrite=False, version: str | None = None
) -> str:
    """PhotoMaker v1 or V2 checkpoint (detected from the keys; `version` insists) -> DST/id_encoder
    (PhotoMakerIDEncoder / PhotoMakerV2IDEncoder folder) + DST/lora (LoRA folder)."""
    src = Path(src)
    check_output(dst, overwrite, [src, unet])
    sd = io.read_checkpoint(src)
    if sd and all(k.startswith(("id_encoder.", "lora_weights.")) for k in sd):  # the flat .safetensors layout
        sections: dict[str, dict] = {"id_encoder": {}, "lora_weights": {}}
        for k, v in sd.items():
            section, _, key = k.partition(".")
            sections[section][key] = v
        sd = sections
    if set(sd) != {"id_encoder", "lora_weights"}:
        raise ConversionError(
            f"{src}: expected a PhotoMaker checkpoint with sections id_encoder and "
            f"lora_weights, found {sorted(sd)[:10]}"
        )
    for section in ("id_encoder", "lora_weights"):
        if not isinstance(sd[section], Mapping):
            raise ConversionError(
                f"{src}: section {section!r} is a {type(sd[section]).__name__}, expected a "
                "dict of tensors (a PhotoMaker checkpoint)"
            )
    enc_sd = dict(sd["id_encoder"])
    found, cls, enc_cfg = photomaker_encoder(enc_sd, source=f"{src} [id_encoder]", version=version)
    enc_flat = convert_state_dict(cls, enc_cfg, enc_sd, source=f"{src} [id_encoder]", param_dtype=dtype)
    modules, flat, skipped = _lora_from_state_dict(
        dict(sd["lora_weights"]),
        source=f"{src} [lora_weights]",
        unet=unet,
        skip_text_encoder=skip_text_encoder,
        dtype=dtype,
    )
    with atomic_output(dst, overwrite, [src, unet]) as tmp:
        (tmp / "id_encoder").mkdir()
        cfg = dict(enc_cfg)
        cfg[modeling.CLASS_KEY] = cls.__name__
        (tmp / "id_encoder" / modeling.CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        modeling.save_params(enc_flat, tmp / "id_encoder" / modeling.PARAMS_DIR)
        L.write_folder(dst, L.lora_config(modules), flat, into=tmp / "lora")
    return f"PhotoMaker {found}: id_encoder + {_summary(modules, skipped)}"


# ----------------------------------------------------------------------------- export


def _write_safetensors(tensors: dict[str, np.ndarray], dst: Path, metadata: dict[str, str], overwrite: bool):
    from safetensors.numpy import save_file

    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.close(fd)
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp, metadata=metadata)
        # Not mkstemp's private 0600 (save_file keeps the mode of the file it overwrites): the mode open() gives.
        chmod_as_created(tmp, directory=False)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_folder(src, reader):
    try:
        return reader(src), L.read_params(src)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(str(e)) from None


def _peft_lora_tensors(src, cfg: Mapping[str, Any], params: Mapping[str, Any]):
    """A LoRA folder's (config, params) -> ({unet.<module>.lora_A/lora_B.weight: [out, in] array}, {module:
    (rank, alpha)}, skipped adapter-layer modules)."""
    tensors, modules, skipped = {}, {}, []
    for module, m in cfg["modules"].items():
        if ".processor.to_" in module:
            skipped.append(module)  # LoRA on adapter layers has no diffusers counterpart
            continue
        try:
            a, b = params[f"{module}.lora_A.kernel"], params[f"{module}.lora_B.kernel"]
        except KeyError as e:
            raise ConversionError(f"{src}: params miss {e} listed in config.json") from None
        tensors[f"unet.{module}.lora_A.weight"] = np.asarray(a).T
        tensors[f"unet.{module}.lora_B.weight"] = np.asarray(b).T
        modules[module] = (int(m["rank"]), float(m["alpha"]))
    if not modules:
        raise ConversionError(f"{src}: no exportable LoRA modules")
    return tensors, modules, skipped


def export_lora(src, dst, *, overwrite=False) -> str:
    """A LoRA folder -> diffusers/PEFT safetensors (unet.<module>.lora_A/lora_B.weight + metadata)."""
    check_output(dst, overwrite, [src], kind="file")
    cfg, params = _read_folder(src, L.read_lora_config)
    tensors, modules, skipped = _peft_lora_tensors(src, cfg, params)
    r = collections_mode(r for r, _ in modules.values())
    alpha = collections_mode(a for _, a in modules.values())
    meta = {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {re.escape(k): v for k, (v, _) in modules.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, (_, v) in modules.items() if v != alpha},
    }
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in meta.items()}, sort_keys=True),
    }
    _write_safetensors(tensors, dst, metadata, overwrite)
    return f"{len(modules)} LoRA modules -> {dst}" + (
        f" (skipped {len(skipped)} LoRA modules on adapter layers, no diffusers equivalent)" if skipped else ""
    )


def export_photomaker(src, dst, *, overwrite=False) -> str:
    """A converted PhotoMaker folder (id_encoder/ [+ lora/], v1 or V2) -> the official checkpoint layout:
    `{"id_encoder": {key: tensor}, "lora_weights": {unet.<module>.lora_A/B.weight}}` as a torch .bin, or the
    flat `id_encoder.<key>` / `lora_weights.<key>` .safetensors the official pipeline also reads (by DST's
    suffix). The id_encoder keys and layouts are the published module's (`core.torch_key`), so converting
    the export gives the same folder bit for bit. A LoRA whose alpha differs from its rank gets
    `<module>.alpha` keys (PhotoMaker's own LoRA has none: alpha = rank)."""
    from weights_conversion.core import to_torch_layout, torch_key

    src, dst = Path(src), Path(dst)
    check_output(dst, overwrite, [src], kind="file")
    if dst.suffix not in (".bin", ".safetensors"):
        raise ConversionError(f"{dst}: expected a .bin (torch.save, as photomaker-v2.bin) or .safetensors path")
    try:
        enc_cfg = modeling.read_config(src / "id_encoder")
        enc_params = L.read_params(src / "id_encoder")
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"{src}: not a converted PhotoMaker folder ({e})") from None
    version = getattr(modeling.get_model_class(enc_cfg[modeling.CLASS_KEY]), "version", None)
    if version not in PHOTOMAKER_VERSIONS:
        raise ConversionError(f"{src / 'id_encoder'}: a {enc_cfg[modeling.CLASS_KEY]}, not a PhotoMaker ID encoder")
    encoder = {
        torch_key(tuple(k.split("."))): np.ascontiguousarray(to_torch_layout(tuple(k.split(".")), np.asarray(v)))
        for k, v in enc_params.items()
    }
    lora: dict[str, np.ndarray] = {}
    if (src / "lora").is_dir():
        cfg, params = _read_folder(src / "lora", L.read_lora_config)
        lora, modules, _ = _peft_lora_tensors(src / "lora", cfg, params)
        lora.update({f"unet.{m}.alpha": np.asarray(a, np.float32) for m, (r, a) in modules.items() if a != r})
    if dst.suffix == ".safetensors":
        flat = {f"id_encoder.{k}": v for k, v in encoder.items()} | {f"lora_weights.{k}": v for k, v in lora.items()}
        _write_safetensors(flat, dst, {"format": "pt"}, overwrite)
    else:
        _write_torch_bin({"id_encoder": encoder, "lora_weights": lora}, dst)
    return f"PhotoMaker {version}: {len(encoder)} id_encoder + {len(lora)} lora_weights tensors -> {dst}"


def _write_torch_bin(sections: Mapping[str, Mapping[str, np.ndarray]], dst: Path) -> None:
    """torch.save of {section: {key: tensor}}, written to a temp file and renamed (never half a file)."""
    import torch

    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(
            {s: {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()} for s, sd in sections.items()},
            tmp,
        )
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def collections_mode(values):
    import collections

    return collections.Counter(values).most_common(1)[0][0]


def export_adapter(src, dst, *, name: str | None = None, overwrite=False) -> str:
    """An adapter folder -> IP-Adapter layout safetensors for condition `name`."""
    check_output(dst, overwrite, [src], kind="file")
    cfg, params = _read_folder(src, L.read_adapters_config)
    names = cfg["names"]
    if name is None:
        if len(names) != 1:
            raise ConversionError(f"{src}: adapters {names}; choose one with --name")
        name = names[0]
    if name not in names:
        raise ConversionError(f"{src}: no adapter {name!r} (has {names})")
    suffix = L.adapter_param_path("", "k", name) + ".kernel"
    attn_paths = [k.removesuffix(suffix) for k in params if k.endswith(suffix)]
    tensors = {}
    for path, n in ip_adapter_numbering(attn_paths).items():
        for kv in ("k", "v"):
            module = L.adapter_param_path(path, kv, name)
            if f"{module}.bias" in params:
                raise ConversionError(f"{src}: {module} has a bias; IP-Adapter layers have none")
            tensors[f"ip_adapter.{n}.to_{kv}_ip.weight"] = np.asarray(params[f"{module}.kernel"]).T
    ip = cfg.get("image_projection")
    if ip and ip.get("condition") == name:
        tensors["image_proj.proj.weight"] = np.asarray(params["image_proj.image_embeds.kernel"]).T
        tensors["image_proj.proj.bias"] = np.asarray(params["image_proj.image_embeds.bias"])
        tensors["image_proj.norm.weight"] = np.asarray(params["image_proj.norm.scale"])
        tensors["image_proj.norm.bias"] = np.asarray(params["image_proj.norm.bias"])
    _write_safetensors(tensors, dst, {"format": "pt"}, overwrite)
    note = "" if cfg["mode"] == "parallel" else f" (note: mode {cfg['mode']!r}; IP-Adapter loaders run it as parallel)"
    return f"adapter {name!r} ({len(attn_paths)} cross-attentions) -> {dst}{note}"
