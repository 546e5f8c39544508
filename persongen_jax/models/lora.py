"""LoRA and adapter cross-attentions for the UNet (DESIGN points 3 and 4), and their folder formats.

Variable types: `LoRAParam` subclasses flax's `nnx.LoRAParam` and `AdapterParam` `nnx.Param`, so

    nnx.state(unet, LoRAParam)                                    the LoRA weights
    nnx.state(unet, AdapterParam)                                 adapter layers + image projection
    nnx.All(nnx.Param, nnx.Not(LoRAParam), nnx.Not(AdapterParam))  the frozen base model

select them for optimizers, freezing and checkpoints (NNX's own `nnx.LoRAParam` filter selects the LoRA
too), and `modeling.flat_params` still sees them.

LoRA (PEFT naming): a targeted `Linear` at path P gets the children `P.lora_A` (kernel [in, r]) and
`P.lora_B` (kernel [r, out], zero-initialised) and computes
`base(x) + (alpha / r) * lora_B(lora_A(x))`; the torch key of `P.lora_A.kernel` is PEFT's
`P.lora_A.weight` (diffusers LoRA files prefix it with `unet.`).

Adapters: every cross-attention (`attn2`) gets an adapter processor (`attention_processor`: the class
of `ADAPTER_PROCESSORS[mode]`, "parallel" or "sequential") holding, per condition name c,
`processor.to_k[c]` / `processor.to_v[c]` (copies of `to_k` / `to_v`, AdapterParam) and a default scale.
Identity tokens for an image condition come from `ImageProjection` (IP-Adapter's image_proj), held as
`unet.image_proj`.

Folders (config.json + params/, orbax, paths relative to the UNet, written atomically):

    LoRA:     {"format": "persongen_lora", "version": 2, "rank", "alpha", "targets",
               "modules": {module path: {"rank", "alpha"}}}           + params of the LoRAParam leaves
    adapters: {"format": "persongen_adapters", "version": 2, "names", "mode", "scales": {name: s},
               "image_projection": {"condition", "image_embed_dim", "cross_attention_dim",
                                    "num_tokens"} | null}               + params of the AdapterParam leaves

Load adapters before LoRA when the LoRA covers adapter layers (`copy_lora=True`). Version-1 folders
(written before the processor layout, adapter paths `...attn2.to_k_<c>`) load unchanged: their paths are
mapped by `upgrade_adapter_path` when read.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persongen_jax.io import atomic_dir, read_json
from persongen_jax.models import modeling
from persongen_jax.models.attention_processor import ADAPTER_PROCESSORS, AdapterProcessor, Attention
from persongen_jax.models.layers import LayerNorm, Linear

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FORMAT = "persongen_lora"
ADAPTERS_FORMAT = "persongen_adapters"
LORA_VERSION = ADAPTERS_VERSION = 2
path_str = modeling.path_str


class LoRAParam(nnx.LoRAParam):
    """A LoRA factor (`lora_A` / `lora_B` kernels); flax's `nnx.LoRAParam` filters select it."""


class AdapterParam(nnx.Param):
    """A weight of an adapter projection (`processor.to_k[name]`, `processor.to_v[name]`) or of `image_proj`."""


# ----------------------------------------------------------------------------- LoRA


class LoRADense(nnx.Module):
    """x @ kernel, kernel [in, out] a LoRAParam (no bias; PEFT's lora_A / lora_B)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        init: str = "zeros",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
    ):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        if init == "zeros":
            kernel = jnp.zeros((in_features, out_features), param_dtype)
        else:  # PEFT's lora_A init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
            if rngs is None:
                raise ValueError(f"LoRADense init={init!r} draws its kernel: pass rngs")
            bound = 1.0 / np.sqrt(in_features)
            kernel = jax.random.uniform(rngs.params(), (in_features, out_features), param_dtype, -bound, bound)
        self.kernel = LoRAParam(kernel)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> x @ kernel [..., out], in `dtype` (default: the promoted dtype of x and kernel)."""
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.result_type(x, kernel)
        return jnp.matmul(x.astype(dtype), kernel.astype(dtype))


def linear_modules(module) -> dict[str, Linear]:
    """{dotted path: Linear} of every LoRA-capable linear layer under `module`."""
    return {path_str(p): m for p, m in nnx.iter_modules(module) if isinstance(m, Linear)}


def matches(path: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a module path when it is a dotted suffix of it ("to_q" matches
    "...attn1.to_q", not "...attn2.processor.to_k.bg") or a regex matching the whole path."""
    return any(path == p or path.endswith("." + p) or re.fullmatch(p, path) for p in patterns)


def _attach_lora(lin: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs | None, init_a: str = "uniform"):
    if lin.lora_A is not None:
        raise ValueError("already has LoRA")
    pd = lin.kernel[...].dtype
    lin.lora_A = LoRADense(lin.in_features, rank, init=init_a, dtype=lin.dtype, param_dtype=pd, rngs=rngs)
    lin.lora_B = LoRADense(rank, lin.out_features, init="zeros", dtype=lin.dtype, param_dtype=pd)
    lin.lora_scale = float(alpha) / rank


def add_lora(
    unet,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    rngs: nnx.Rngs,
    modules: Mapping[str, tuple[int, float]] | None = None,
) -> list[str]:
    """Adds LoRA (in place) to every Linear of `unet` whose path matches `targets`.

    rank r, alpha (default r, i.e. scale 1): output = base(x) + (alpha / r) * lora_B(lora_A(x));
    lora_A ~ U(+-1/sqrt(in)) (PEFT), lora_B = 0, so the model is unchanged until trained.
    `modules` ({path: (rank, alpha)}) instead names every module with its own rank/alpha.
    Returns the module paths that got LoRA.
    """
    linears = linear_modules(unet)
    if modules is None:
        if rank <= 0:
            raise ValueError(f"add_lora: rank must be positive, got {rank}")
        alpha = rank if alpha is None else alpha
        modules = {p: (rank, alpha) for p in linears if matches(p, targets)}
        if not modules:
            raise ValueError(f"add_lora: no linear layer matches targets {list(targets)}")
    missing = sorted(p for p in modules if p not in linears)
    if missing:
        raise ValueError(
            f"add_lora: no linear layer at {missing[:10]}"
            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        )
    for p, (r, a) in modules.items():
        try:
            _attach_lora(linears[p], int(r), float(a), rngs=rngs)
        except ValueError as e:
            raise ValueError(f"add_lora: {p} {e}") from None
    return sorted(modules)


def lora_modules(unet) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} of the LoRA currently on `unet`."""
    return {
        p: (m.lora_A.out_features, m.lora_scale * m.lora_A.out_features)
        for p, m in linear_modules(unet).items()
        if m.lora_A is not None
    }


def merge_lora(unet) -> int:
    """Folds every LoRA into its base kernel (kernel += scale * A @ B, in float32) and removes it.
    Returns the number of merged modules; outputs are unchanged up to float rounding."""
    n = 0
    for m in linear_modules(unet).values():
        if m.lora_A is None:
            continue
        k = m.kernel[...]
        delta = jnp.matmul(
            m.lora_A.kernel[...].astype(jnp.float32),
            m.lora_B.kernel[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        m.kernel.set_value((k.astype(jnp.float32) + m.lora_scale * delta).astype(k.dtype))
        m.lora_A, m.lora_B, m.lora_scale = None, None, 1.0
        n += 1
    return n


def _target_of(path: str) -> str:
    return "to_out.0" if path.endswith("to_out.0") else path.rsplit(".", 1)[-1]


def lora_config(modules: Mapping[str, tuple[int, float]]) -> dict:
    """config.json of a LoRA folder for {module path: (rank, alpha)}."""
    if not modules:
        raise ValueError("no LoRA modules")
    rank = collections.Counter(r for r, _ in modules.values()).most_common(1)[0][0]
    alpha = collections.Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return {
        "format": LORA_FORMAT,
        "version": LORA_VERSION,
        "rank": int(rank),
        "alpha": float(alpha),
        "targets": sorted({_target_of(p) for p in modules}),
        "modules": {p: {"rank": int(r), "alpha": float(a)} for p, (r, a) in sorted(modules.items())},
    }


def save_lora(unet, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes the LoRA of `unet` as a LoRA folder (config.json + params/ of the LoRAParam leaves)."""
    modules = lora_modules(unet)
    if not modules:
        raise ValueError("save_lora: the UNet has no LoRA (add_lora / load_lora first)")
    write_folder(directory, lora_config(modules), _flat(unet, LoRAParam), overwrite=overwrite)


def read_lora_config(directory: str | os.PathLike) -> dict:
    """The config.json of a LoRA folder (checked: format, modules; version-1 module paths upgraded)."""
    cfg = _read_config(directory, LORA_FORMAT)
    if not isinstance(cfg.get("modules"), dict) or not cfg["modules"]:
        raise ValueError(f"{Path(directory) / modeling.CONFIG_FILE}: no 'modules' in a LoRA config")
    cfg["modules"] = {upgrade_adapter_path(p): m for p, m in cfg["modules"].items()}
    return cfg


def load_lora(unet, directory: str | os.PathLike) -> list[str]:
    """Adds the LoRA stored in `directory` to `unet` (in place); returns the module paths."""
    cfg = read_lora_config(directory)
    modules = {p: (int(m["rank"]), float(m["alpha"])) for p, m in cfg["modules"].items()}
    linears = linear_modules(unet)
    missing = sorted(p for p in modules if p not in linears)
    if missing:
        raise ValueError(
            f"{directory}: LoRA for modules the UNet does not have: {missing[:10]}"
            + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            + (
                "; LoRA on adapter layers needs load_adapters first"
                if any(".processor.to_" in p for p in missing)
                else ""
            )
        )
    for p, (r, a) in modules.items():
        try:
            _attach_lora(linears[p], r, a, rngs=None, init_a="zeros")
        except ValueError as e:
            raise ValueError(f"{directory}: {p} {e}") from None
    _restore(unet, directory, LoRAParam)
    return sorted(modules)


# ----------------------------------------------------------------------------- adapters


def _retype(variable, param_type):
    return param_type(jnp.array(variable[...], copy=True))  # own buffer: safe with donation


def _copy_linear(src: Linear, param_type, *, copy_lora: bool) -> Linear:
    new = nnx.eval_shape(
        lambda: Linear(
            src.in_features,
            src.out_features,
            use_bias=src.use_bias,
            dtype=src.dtype,
            param_dtype=src.kernel[...].dtype,
            rngs=nnx.Rngs(0),
        )
    )
    new.kernel = _retype(src.kernel, param_type)
    if src.use_bias:
        new.bias = _retype(src.bias, param_type)
    if copy_lora and src.lora_A is not None:
        _attach_lora(new, src.lora_A.out_features, src.lora_scale * src.lora_A.out_features, rngs=None, init_a="zeros")
        new.lora_A.kernel.set_value(jnp.array(src.lora_A.kernel[...], copy=True))
        new.lora_B.kernel.set_value(jnp.array(src.lora_B.kernel[...], copy=True))
    return new


class ImageProjection(nnx.Module):
    """IP-Adapter's image projection (diffusers `ImageProjection`): image_embeds Linear(in ->
    tokens * D) -> reshape to tokens -> LayerNorm `norm`. Parameters are AdapterParam.

    [B, in] -> [B, tokens, D]; [B, N, in] (N reference images) -> [B, N * tokens, D].
    `condition` names the adapter condition whose tokens it makes (the image condition).
    """

    def __init__(
        self,
        image_embed_dim: int,
        cross_attention_dim: int,
        num_tokens: int = 4,
        *,
        condition: str,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.condition = condition
        self.image_embed_dim, self.cross_attention_dim = image_embed_dim, cross_attention_dim
        self.num_tokens = num_tokens
        self.image_embeds = Linear(
            image_embed_dim, num_tokens * cross_attention_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.norm = LayerNorm(cross_attention_dim, dtype=dtype, param_dtype=param_dtype)
        self.image_embeds.kernel = _retype(self.image_embeds.kernel, AdapterParam)
        self.image_embeds.bias = _retype(self.image_embeds.bias, AdapterParam)
        self.norm.scale = _retype(self.norm.scale, AdapterParam)
        self.norm.bias = _retype(self.norm.bias, AdapterParam)

    def config(self) -> dict:
        """The adapter folder's "image_projection" entry."""
        return {
            "condition": self.condition,
            "image_embed_dim": self.image_embed_dim,
            "cross_attention_dim": self.cross_attention_dim,
            "num_tokens": self.num_tokens,
        }

    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        """image_embeds [B, in] -> [B, num_tokens, D]; [B, N, in] -> [B, N * num_tokens, D] (image n's
        tokens contiguous)."""
        squeeze = image_embeds.ndim == 2
        x = image_embeds[:, None] if squeeze else image_embeds
        b, n, _ = x.shape
        x = self.image_embeds(x).reshape(b, n * self.num_tokens, -1)
        return self.norm(x)


def cross_attentions(unet) -> dict[str, Attention]:
    """{path: Attention} of every cross-attention (`attn2`) of the UNet."""
    return {
        path_str(p): m for p, m in nnx.iter_modules(unet) if isinstance(m, Attention) and p and str(p[-1]) == "attn2"
    }


def adapter_processors(unet) -> dict[str, AdapterProcessor]:
    """{attention path: its AdapterProcessor} of every cross-attention that has adapters."""
    return {p: a.processor for p, a in cross_attentions(unet).items() if isinstance(a.processor, AdapterProcessor)}


def add_adapters(
    unet,
    names: Sequence[str],
    *,
    mode: str = "parallel",
    scales: Mapping[str, float] | Sequence[float] | float = 1.0,
    copy_lora: bool = False,
    image_projection: Mapping[str, Any] | None = None,
    rngs: nnx.Rngs | None = None,
) -> list[str]:
    """Adds adapter cross-attentions (in place) to every `attn2` of `unet`; returns their paths.

    names: condition names in wiring order (the target method: ["bg", "body", "id"]).
    mode: a key of `ADAPTER_PROCESSORS` ("parallel" = IP-Adapter, "sequential"): the processor class
    that every `attn2` gets. scales: default scale per condition.
    copy_lora: also copy the LoRA of to_k / to_v into LoRA on the new layers (LoRAParam).
    image_projection: {"condition": "id", "image_embed_dim": int, "num_tokens": 4} adds
    `unet.image_proj` (ImageProjection into the cross-attention width; needs `rngs`).
    """
    names = tuple(names)
    if not names or len(set(names)) != len(names) or not all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names):
        raise ValueError(f"add_adapters: names must be unique lower-case identifiers, got {list(names)}")
    if mode not in ADAPTER_PROCESSORS:
        raise ValueError(f"add_adapters: mode {mode!r}; expected one of {list(ADAPTER_PROCESSORS)}")
    if isinstance(scales, (int, float)):
        scales = {n: float(scales) for n in names}
    elif not isinstance(scales, Mapping):
        scales = dict(zip(names, scales, strict=True))
    if set(scales) != set(names):
        raise ValueError(f"add_adapters: scales {dict(scales)} must name exactly {list(names)}")
    attns = cross_attentions(unet)
    if not attns:
        raise ValueError("add_adapters: the UNet has no cross-attention layers")
    processor_cls = ADAPTER_PROCESSORS[mode]
    for path, attn in attns.items():
        if isinstance(attn.processor, AdapterProcessor):
            raise ValueError(f"add_adapters: {path} already has adapters {list(attn.processor.names)}")
        attn.set_processor(
            processor_cls(
                names,
                [scales[n] for n in names],
                to_k={n: _copy_linear(attn.to_k, AdapterParam, copy_lora=copy_lora) for n in names},
                to_v={n: _copy_linear(attn.to_v, AdapterParam, copy_lora=copy_lora) for n in names},
            )
        )
    if image_projection is not None:
        ip = dict(image_projection)
        if ip.get("condition") not in names:
            raise ValueError(
                f"add_adapters: image_projection condition {ip.get('condition')!r} is not one of {list(names)}"
            )
        cross = ip.get("cross_attention_dim") or next(iter(attns.values())).to_k.in_features
        if rngs is None:
            raise ValueError("add_adapters: an image projection draws its weights: pass rngs")
        unet.image_proj = ImageProjection(
            int(ip["image_embed_dim"]),
            int(cross),
            int(ip.get("num_tokens", 4)),
            condition=ip["condition"],
            dtype=unet.dtype,
            rngs=rngs,
        )
    return sorted(attns)


def adapter_config(unet) -> dict | None:
    """{"names", "mode", "scales", "image_projection"} of the adapters on `unet` (read off its processors
    and `unet.image_proj`), or None."""
    processors = adapter_processors(unet)
    if not processors:
        return None
    first = next(iter(processors.values()))
    image_proj = getattr(unet, "image_proj", None)
    return {
        "names": list(first.names),
        "mode": first.mode,
        "scales": dict(zip(first.names, first.scales)),
        "image_projection": image_proj.config() if image_proj is not None else None,
    }


def save_adapters(unet, directory: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Writes the adapters of `unet` (config.json + params/ of the AdapterParam leaves)."""
    cfg = adapter_config(unet)
    if cfg is None:
        raise ValueError("save_adapters: the UNet has no adapters (add_adapters / load_adapters first)")
    write_folder(
        directory,
        {"format": ADAPTERS_FORMAT, "version": ADAPTERS_VERSION, **cfg},
        _flat(unet, AdapterParam),
        overwrite=overwrite,
    )


def read_adapters_config(directory: str | os.PathLike) -> dict:
    """The config.json of an adapter folder (checked: format, names, mode, scales)."""
    cfg = _read_config(directory, ADAPTERS_FORMAT)
    for key in ("names", "mode", "scales"):
        if key not in cfg:
            raise ValueError(f"{Path(directory) / modeling.CONFIG_FILE}: missing {key!r}")
    return cfg


# Version 1 folders (before adapter processors) stored the projections as `...attn2.to_k_<c>.*`.
_V1_ADAPTER_PATH = re.compile(r"^(.*\.attn2)\.to_([kv])_([a-z][a-z0-9_]*)(\..*|)$")


def upgrade_adapter_path(path: str) -> str:
    """A version-1 adapter path `...attn2.to_k_bg[.rest]` -> `...attn2.processor.to_k.bg[.rest]`
    (other paths unchanged); reads folders written before the processor layout."""
    m = _V1_ADAPTER_PATH.match(path)
    return f"{m[1]}.processor.to_{m[2]}.{m[3]}{m[4]}" if m else path


def adapter_param_path(attn_path: str, kv: str, name: str) -> str:
    """The module path of adapter `name`'s key (kv="k") or value (kv="v") projection in `attn_path`."""
    return f"{attn_path}.processor.to_{kv}.{name}"


def load_adapters(unet, directory: str | os.PathLike) -> list[str]:
    """Adds the adapters stored in `directory` to `unet` (in place); returns the attention paths."""
    cfg = read_adapters_config(directory)
    paths = add_adapters(
        unet,
        cfg["names"],
        mode=cfg["mode"],
        scales=cfg["scales"],
        image_projection=cfg.get("image_projection"),
        rngs=nnx.Rngs(0),
    )
    _restore(unet, directory, AdapterParam)
    return paths


# ----------------------------------------------------------------------------- folders


def _flat(module, param_type) -> dict[tuple, jax.Array]:
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, param_type))}


def write_folder(
    directory: str | os.PathLike,
    config: Mapping[str, Any],
    flat: Mapping[tuple, Any],
    *,
    overwrite: bool = False,
    into: Path | None = None,
) -> None:
    """config.json + params/ (orbax, {path: array}); atomic unless `into` (an already-temporary folder)."""
    if into is not None:
        into.mkdir(parents=True, exist_ok=True)
        (into / modeling.CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
        modeling.save_params(flat, into / modeling.PARAMS_DIR)
        return
    with atomic_dir(directory, overwrite) as tmp:
        write_folder(directory, config, flat, into=tmp)


def _read_config(directory, fmt: str) -> dict:
    path = Path(directory) / modeling.CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a {fmt} folder")
    cfg = read_json(path)
    if cfg.get("format") != fmt:
        raise ValueError(f"{path}: format {cfg.get('format')!r}, expected {fmt!r}")
    return cfg


def read_params(directory: str | os.PathLike, *, verify_checksums: bool | None = None) -> dict[str, jax.Array]:
    """{dotted path: array} of a folder's params/ (small folders: LoRA, adapters), checked against
    params/checksums.json like `modeling.from_pretrained`; version-1 adapter paths are returned in the
    current layout (`upgrade_adapter_path`)."""
    import orbax.checkpoint as ocp

    params_dir = (Path(directory) / modeling.PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: missing parameters folder")
    try:
        tree = ocp.StandardCheckpointer().restore(params_dir)
    except Exception as e:  # a damaged data file: TensorStore's errors name neither folder nor parameter
        raise ValueError(
            f"{params_dir}: cannot read the parameters ({modeling.first_line(e)}); the folder is damaged, re-convert it"
        ) from None
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {path_str(path): v for path, v in flat}
    if modeling.verify_default(verify_checksums):
        modeling.check_checksums(params_dir, out)  # the stored paths: checksums.json names them as written
    return {upgrade_adapter_path(k): v for k, v in out.items()}


def _restore(module, directory, param_type) -> None:
    """Fills the `param_type` leaves of `module` from directory/params, strictly (all used, shapes equal)."""
    stored = read_params(directory)
    expected = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(module, param_type))}
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    bad = sorted(
        f"{k} {tuple(stored[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in stored and tuple(stored[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or bad:
        raise ValueError(
            f"{directory}: params do not match the model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatches {bad[:10]}"
        )
    for k, var in expected.items():
        var.set_value(jnp.asarray(stored[k], dtype=var.get_value().dtype))
