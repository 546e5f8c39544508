"""Strict PyTorch -> Flax NNX parameter conversion.

Our module trees mirror the PyTorch ones name for name, so the key map is one
rule: the NNX path joined with "." is the PyTorch key, with the leaf renamed

    kernel    -> weight   (Linear: [out, in] -> [in, out];
                           Conv:   [out, in, kh, kw] -> [kh, kw, in, out])
    scale     -> weight   (GroupNorm / LayerNorm)
    embedding -> weight   (Embedding)
    anything else keeps its name (bias, class_embedding, ...)

Per-model differences (legacy key names, non-persistent buffers found in old
checkpoints) are handled by the model class's `preprocess_torch_state_dict`.
Every source key must be used and every target parameter filled with the
right shape; otherwise `ConversionError` lists the offending keys.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from persongen_jax.models import modeling

MAX_LISTED = 20
log = logging.getLogger("weights_conversion")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


class ConversionError(Exception):
    """A checkpoint does not match the model; the message names file and keys."""


def torch_key(path: tuple) -> str:
    *parents, leaf = (str(p) for p in path)
    return ".".join(parents + [_LEAF_TO_TORCH.get(leaf, leaf)])


# A kernel's axes in ours, as PyTorch's axes by rank: Linear [out, in] -> [in, out]; Conv2d [out, in, kh, kw]
# -> [kh, kw, in, out]. Other parameters keep PyTorch's layout.
_KERNEL_AXES = {2: (1, 0), 4: (2, 3, 1, 0)}


def to_flax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """PyTorch tensor layout -> ours, decided by the leaf name and rank."""
    axes = _KERNEL_AXES.get(value.ndim) if str(path[-1]) == "kernel" else None
    return value if axes is None else value.transpose(axes)


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
    """Inverse of `to_flax_layout` (used to export trained weights)."""
    axes = _KERNEL_AXES.get(value.ndim) if str(path[-1]) == "kernel" else None
    return value if axes is None else value.transpose(tuple(int(a) for a in np.argsort(axes)))


def _listing(title: str, items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"  {title} ({len(items)}): " + ", ".join(items[:MAX_LISTED]) + more


def check_keys(
    expected: Mapping[str, tuple],
    source_shapes: Mapping[str, tuple],
    *,
    source: str,
    transform_shape: Callable[[str, tuple], tuple],
) -> None:
    """Raises ConversionError unless the source keys/shapes match the target exactly."""
    missing = sorted(k for k in expected if k not in source_shapes)
    unexpected = sorted(k for k in source_shapes if k not in expected)
    mismatched = []
    for k, shape in expected.items():
        if k in source_shapes:
            got = transform_shape(k, tuple(source_shapes[k]))
            if tuple(got) != tuple(shape):
                mismatched.append(
                    f"{k} (checkpoint {tuple(source_shapes[k])} -> {tuple(got)}, model expects {tuple(shape)})"
                )
    if missing or unexpected or mismatched:
        lines = [f"{source}: checkpoint does not match the model"]
        if missing:
            lines.append(_listing("missing keys", missing))
        if unexpected:
            lines.append(_listing("unexpected keys", unexpected))
        if mismatched:
            lines.append(_listing("shape mismatches", sorted(mismatched)))
        raise ConversionError("\n".join(lines))


def convert_state_dict(
    cls,
    config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    source: str = "<state dict>",
    param_dtype=None,
    progress: Callable[[Iterable, Mapping], Iterable] | None = None,
    abstract=None,
) -> dict[tuple, jax.Array]:
    """Returns {flax path: jax array} for `cls(config)` from a PyTorch state dict.

    state_dict values may be numpy arrays, torch tensors or lazy tensors with
    `.shape` and `np.asarray` support (see `weights_conversion.io`). Shapes are
    checked for every key before any tensor is read. `progress(keys, state_dict)`
    may wrap the key iteration (a progress bar). `abstract`: the model from
    `modeling.abstract_model`, if the caller already has it.
    """
    if abstract is None:
        abstract = modeling.abstract_model(cls, config)
    expected_paths = modeling.flat_params(abstract)
    sd = (
        cls.preprocess_torch_state_dict(dict(state_dict), config)
        if hasattr(cls, "preprocess_torch_state_dict")
        else dict(state_dict)
    )
    by_key = {torch_key(p): p for p in expected_paths}
    if len(by_key) != len(expected_paths):  # two paths mapping to one key would be a port bug
        raise AssertionError(f"{cls.__name__}: ambiguous torch key mapping")
    expected_shapes = {k: tuple(expected_paths[p].shape) for k, p in by_key.items()}

    def transform_shape(key, shape):
        p = by_key[key]
        return to_flax_layout(p, np.empty(shape, dtype=np.bool_)).shape

    check_keys(
        expected_shapes, {k: tuple(v.shape) for k, v in sd.items()}, source=source, transform_shape=transform_shape
    )
    out, non_finite = {}, []
    keys = sorted(by_key)
    for k in progress(keys, sd) if progress else keys:
        p = by_key[k]
        value = _to_numpy(sd[k])
        if not all_finite(value):
            non_finite.append(k)
        value = to_flax_layout(p, value)
        if param_dtype is not None:
            value = value.astype(jnp.dtype(param_dtype))
        elif value.dtype not in (np.float32, np.float16, jnp.bfloat16):
            value = value.astype(np.float32)
        # Straight to a device array, dropping the host copy tensor by tensor: orbax saves jax arrays
        # with ~0.7x extra memory, numpy ones with ~1.6x (a 10 GB UNet must fit in 24 GB).
        out[p] = jnp.asarray(np.ascontiguousarray(value).reshape(value.shape))
        del value
    warn_non_finite(source, non_finite)
    return out


def all_finite(value) -> bool:
    """False when a floating-point array holds NaN or Inf (integer arrays are always finite)."""
    value = np.asarray(value)
    if value.dtype.kind not in "fc" and value.dtype != jnp.bfloat16:
        return True
    return bool(np.isfinite(value).all())


def warn_non_finite(source: str, keys: list[str]) -> None:
    """The conversion goes on (the file is what it is), but never silently: the tensors are named."""
    if keys:
        log.warning(
            "warning: %s: %d tensor(s) hold NaN or Inf values: %s%s",
            source,
            len(keys),
            ", ".join(keys[:MAX_LISTED]),
            f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "",
        )


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        import torch

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.float().numpy().astype(jnp.bfloat16)
        return t.numpy()
    return np.asarray(value)


def load_from_torch_state_dict(
    cls,
    config: Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    dtype=None,
    param_dtype=None,
    attention_impl: str = "xla",
    source: str = "<state dict>",
):
    """Builds `cls` from `config` with weights from a PyTorch state dict (in memory)."""
    model = modeling.abstract_model(
        cls, config, dtype=dtype, param_dtype=param_dtype or jnp.float32, attention_impl=attention_impl
    )
    flat = convert_state_dict(cls, config, state_dict, source=source, param_dtype=param_dtype, abstract=model)
    return modeling.assign_params(model, flat)
