"""Model registry and the converted-model folder format.

A converted component is a folder:

    config.json   the reference (diffusers/transformers) config, plus
                  "_persongen_class": our class name
    params/       orbax checkpoint of the parameters, a nested dict that
                  mirrors the module tree (list indices as strings)

`from_pretrained(path)` rebuilds the module with `nnx.eval_shape` (no random
init is ever materialised) and restores the parameters into it.

Every model class registered here provides

    from_config(config: dict, *, rngs, dtype, param_dtype, attention_impl) -> module

and may override `preprocess_torch_state_dict` (rename legacy keys, drop
non-persistent buffers) for weight conversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

MODEL_REGISTRY: dict[str, type] = {}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CLASS_KEY = "_persongen_class"


def register_model(cls):
    """Class decorator: makes `cls` loadable by name from a converted folder."""
    MODEL_REGISTRY[cls.__name__] = cls
    return cls


def get_model_class(name: str):
    """The registered class called `name` (a folder's "_persongen_class"), after importing every model
    module; ValueError for an unknown name."""
    _import_all_models()
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model class {name!r}; known: {sorted(MODEL_REGISTRY)}") from None


def _import_all_models():
    # Importing the package modules runs their @register_model decorators.
    import persongen_jax.models  # noqa: F401


def path_str(path) -> str:
    """A parameter path (NNX path or jax tree path) as the dotted string the configs and key maps use:
    ("down_blocks", 0, "attentions") -> "down_blocks.0.attentions"."""
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


@contextlib.contextmanager
def _cheap_tracer_attribute_errors():
    """Makes `nnx.eval_shape` of big models linear-time instead of quadratic.

    NNX's RNG-counter update probes `getattr(tracer, "sharding", None)`; JAX builds
    that AttributeError's message by scanning the whole trace so far, once per
    parameter (SDXL UNet: 49 s -> 3 s on CPU; upstream jax-ml/jax#40041). Only the
    error text changes. A private JAX attribute: if it moves, this is a no-op.
    """
    try:
        from jax._src.interpreters import partial_eval as pe

        original = pe.DynamicJaxprTracer._origin_msg
    except (ImportError, AttributeError):
        yield
        return
    pe.DynamicJaxprTracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        pe.DynamicJaxprTracer._origin_msg = original


def abstract_model(cls, config: Mapping[str, Any], *, dtype=None, param_dtype=jnp.float32,
                   attention_impl: str = "xla"):
    """The module with ShapeDtypeStruct parameters: shapes without memory."""
    with _cheap_tracer_attribute_errors():
        return nnx.eval_shape(lambda: cls.from_config(dict(config), rngs=nnx.Rngs(0), dtype=dtype,
                                                      param_dtype=param_dtype,
                                                      attention_impl=attention_impl))


def random_init(cls, config: Mapping[str, Any], seed: int, **kw):
    """A randomly initialised model built without per-parameter device dispatch: the module is created
    abstractly (`abstract_model`), then every parameter is drawn on the host with numpy (seeded):
    kernels / embeddings ~ N(0, 1/fan_in), norm scales 1, biases 0. Eager NNX init of even the tiny
    models costs ~20 s of op dispatch on a small CPU; this takes well under a second."""
    import numpy as np

    model = abstract_model(cls, config, **kw)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, sds in flat_params(model).items():
        shape = tuple(sds.shape)
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        elif str(path[-1]) == "scale":
            value = np.ones(shape, np.float32)
        elif str(path[-1]) == "bias":
            value = np.zeros(shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        flat[path] = jnp.asarray(value, dtype=sds.dtype)
    return assign_params(model, flat)


def flat_params(model) -> dict[tuple, Any]:
    """{path tuple: array} of every nnx.Param (LoRA and adapters included, they subclass Param)."""
    state = nnx.state(model, nnx.Param)
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def _nest(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = value
    return tree


def _lookup(tree: Mapping, path: tuple):
    node = tree
    for p in path:
        node = node[str(p)]
    return node


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temp folder next to `dst`, renamed to `dst` only if the block succeeds, so a
    failed or killed write never leaves a half-written `dst` (nor destroys an existing one)."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_params(flat: Mapping[tuple, Any], directory: str | os.PathLike) -> None:
    """Writes {path: array} as an orbax checkpoint at `directory` (must not exist).

    Pass jax arrays: orbax serialises them with far less extra host memory than numpy ones.
    """
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), _nest({k: jnp.asarray(v) for k, v in flat.items()}))
    ckptr.wait_until_finished()


def save_pretrained(model, config: Mapping[str, Any], directory: str | os.PathLike) -> None:
    """Writes config.json + params/ for `model` (an instance of a registered class)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg[CLASS_KEY] = type(model).__name__
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    save_params(flat_params(model), directory / PARAMS_DIR)


def read_config(directory: str | os.PathLike) -> dict:
    """config.json of a converted component folder; FileNotFoundError when it is absent, ValueError when
    it is not JSON or has no "_persongen_class"."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a folder written by "
                                "`python -m weights_conversion` or save_pretrained")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if CLASS_KEY not in cfg:
        raise ValueError(f"{path}: missing {CLASS_KEY!r}; this is not a converted persongen_jax "
                         "folder (convert it with `python -m weights_conversion`)")
    return cfg


def from_pretrained(directory: str | os.PathLike, *, dtype=None, param_dtype=None,
                    attention_impl: str = "xla"):
    """Loads a converted component folder and returns the module with its weights.

    dtype: compute dtype (None = the params' dtype). param_dtype: cast the stored
    parameters (None = keep as stored). attention_impl: "xla" or "cudnn".
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    cfg = read_config(directory)
    cls = get_model_class(cfg[CLASS_KEY])
    params_dir = (directory / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: missing parameters folder")
    ckptr = ocp.StandardCheckpointer()
    stored = ckptr.metadata(params_dir)
    stored_tree = getattr(stored, "item_metadata", stored)
    model = abstract_model(cls, cfg, dtype=dtype, param_dtype=param_dtype or jnp.float32,
                           attention_impl=attention_impl)
    expected = flat_params(model)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {}
    missing = []
    for path, sds in expected.items():
        try:
            meta = _lookup(stored_tree, path)
        except (KeyError, TypeError):
            missing.append(path_str(path))
            continue
        if tuple(meta.shape) != tuple(sds.shape):
            raise ValueError(f"{params_dir}: {path_str(path)} has shape {tuple(meta.shape)}, "
                             f"the model built from config.json expects {tuple(sds.shape)}")
        # Restoring straight into device arrays (a sharding on the target) avoids a second host copy.
        target[path] = jax.ShapeDtypeStruct(sds.shape, param_dtype or meta.dtype, sharding=device)
    if missing:
        raise ValueError(f"{params_dir}: missing parameters {missing[:20]}"
                         + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else ""))
    restored = ckptr.restore(params_dir, _nest(target))
    flat = {p: _lookup(restored, p) for p in target}
    del restored
    return assign_params(model, flat)


def assign_params(model, flat: Mapping[tuple, Any]):
    """Returns `model` with its nnx.Param values replaced by `flat` ({path: array})."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat_state = list(nnx.to_flat_state(params))
    new = []
    for path, var in flat_state:
        new.append((path, var.replace(jnp.asarray(flat[tuple(path)]))))  # no copy for jax arrays
    params = nnx.from_flat_state(new)
    return nnx.merge(graphdef, params, rest)
