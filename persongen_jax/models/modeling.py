"""Model registry and the converted-model folder format.

A converted component is a folder:

    config.json   the reference (diffusers/transformers) config, plus
                  "_persongen_class": our class name
    params/       orbax checkpoint of the parameters, a nested dict that
                  mirrors the module tree (list indices as strings)

`from_pretrained(path)` rebuilds the module with `nnx.eval_shape` (no random
init is ever materialised) and restores the parameters into it.

Every model class registered here provides (from `ConfigMixin`)

    from_config(config: dict, *, rngs, dtype, param_dtype, attention_impl) -> module

and may override `preprocess_torch_state_dict` (rename legacy keys, drop
non-persistent buffers) for weight conversion.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from persongen_jax.io import loads_json, read_json

MODEL_REGISTRY: dict[str, type] = {}
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
CLASS_KEY = "_persongen_class"
CHECKSUMS_FILE = "checksums.json"
# from_pretrained(verify_checksums=None) reads this: "0" skips the sha256 of every parameter (speed).
VERIFY_ENV = "PERSONGEN_VERIFY_CHECKSUMS"
log = logging.getLogger(__name__)


def _matches(value, hint) -> bool:
    """Whether `value` (from a JSON config) fits the type annotation `hint` (int, float, str, bool,
    None, unions, tuple[X, ...] as a JSON list, nested config dataclasses); unknown hints pass."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args)))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _hint_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_field_types(config) -> None:
    """For a config dataclass's `__post_init__`: ValueError naming the first field whose value does not
    have the annotated type (a config.json value of the wrong type fails here, by key, instead of as a
    TypeError deep inside the model)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise ValueError(
                f"{type(config).__name__}: {f.name}={value!r} has type {type(value).__name__}, "
                f"expected {_hint_name(hints[f.name])}"
            )


class ModelConfig:
    """Base of the models' frozen config dataclasses: every field is checked against its annotation when the
    config is made, and `to_dict` gives the config back as a JSON-ready dict."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # set by @dataclasses.dataclass on each subclass

    def __post_init__(self):
        check_field_types(self)

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (top-level tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


class ConfigMixin:
    """`from_config` / `preset_config` of a model class (the part of diffusers' ConfigMixin we use): the class
    names its config parser (`_parse_config`: config.json dict -> the config object its `__init__` takes) and
    its table of reference configs (`_presets`: name -> config.json dict)."""

    _parse_config: Any  # a staticmethod (typed Any: mypy reads a Callable class attribute as a method)
    _presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | object,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        attention_impl: str = "xla",
    ):
        """config: the config.json dict of this model class (or its parsed config object, used as is)."""
        kw: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # The convolutional models (FID Inception, LPIPS, ArcFace) have no attention and their __init__ no
        # attention_impl; from_config takes one all the same, so that every registered class loads alike.
        if "attention_impl" in inspect.signature(cls.__init__).parameters:
            kw["attention_impl"] = attention_impl
        parsed = cls._parse_config(config) if isinstance(config, Mapping) else config
        return cls(parsed, **kw)  # type: ignore[call-arg]  # a mixin: the model class's __init__

    @classmethod
    def preset_config(cls, name: str) -> dict:
        """A config.json dict by name (the source of each preset is commented beside its table); ValueError
        naming the known presets for another name."""
        if name not in cls._presets:
            raise ValueError(f"{cls.__name__}: unknown preset {name!r}; known: {sorted(cls._presets)}")
        return copy.deepcopy({k: v for k, v in cls._presets[name].items() if v is not None})


def field_parser(config_class: type) -> Callable[[Mapping[str, Any]], Any]:
    """A `ConfigMixin._parse_config` for a config dataclass whose fields are the config.json keys: the keys
    that are fields build it, the others are ignored."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return lambda config: config_class(**{k: v for k, v in config.items() if k in names})


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


def abstract_model(cls, config: Mapping[str, Any], *, dtype=None, param_dtype=jnp.float32, attention_impl: str = "xla"):
    """The module with ShapeDtypeStruct parameters: shapes without memory."""
    with _cheap_tracer_attribute_errors():
        return nnx.eval_shape(
            lambda: cls.from_config(
                dict(config), rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl
            )
        )


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


def array_digest(value) -> str:
    """sha256 of an array's bytes (C order, its own dtype)."""
    a = np.ascontiguousarray(np.asarray(value))
    return hashlib.sha256(a.reshape(-1).view(np.uint8).data).hexdigest()  # the bytes (a memoryview, no copy)


def _digests(values) -> list[str]:
    # hashlib releases the GIL on large buffers: arrays hash in parallel threads.
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(array_digest, values))


def save_params(flat: Mapping[tuple, Any], directory: str | os.PathLike) -> None:
    """Writes {path: array} as an orbax checkpoint at `directory` (must not exist), with
    `directory/checksums.json`: the sha256 of every array, checked when the folder is loaded.

    Pass jax arrays: orbax serialises them with far less extra host memory than numpy ones.
    """
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), _nest({k: jnp.asarray(v) for k, v in flat.items()}))
    ckptr.wait_until_finished()
    names = [path_str(k) for k in flat]
    arrays = {
        n: {"sha256": d, "shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
        for n, v, d in zip(names, flat.values(), _digests(flat.values()))
    }
    (Path(directory) / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "sha256", "arrays": arrays}, indent=0))


def verify_default(verify: bool | None) -> bool:
    """verify_checksums=None -> the PERSONGEN_VERIFY_CHECKSUMS environment variable ("0": skip)."""
    return os.environ.get(VERIFY_ENV, "1") != "0" if verify is None else verify


def check_checksums(params_dir: str | os.PathLike, named: Mapping[str, Any]) -> None:
    """Compares {dotted path: restored array} with `params_dir/checksums.json`; ValueError naming the
    parameters that differ. A folder without the file (written before checksums existed) loads with a
    warning that it is unverified."""
    params_dir = Path(params_dir)
    path = params_dir / CHECKSUMS_FILE
    skip = f"re-convert it, or load anyway with verify_checksums=False ({VERIFY_ENV}=0)"
    if not path.is_file():
        log.warning(
            "%s: no %s (written before checksums existed): parameters not verified; re-convert to get them",
            params_dir,
            CHECKSUMS_FILE,
        )
        return
    try:
        stored = loads_json(path.read_bytes(), path, "unreadable checksums")
    except ValueError as e:
        raise ValueError(f"{e}; {skip}") from None
    try:
        stored = stored["arrays"]
        sums = {k: stored[k]["sha256"] for k in named if k in stored}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable checksums ({type(e).__name__}: {e}); {skip}") from None
    missing = sorted(k for k in named if k not in sums)
    bad = [k for k, d in zip(named, _digests(named.values())) if k in sums and d != sums[k]]
    if missing or bad:
        what = (
            f"checksum mismatch for {bad[:10]}" + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
            if bad
            else f"no checksum for {missing[:10]}"
        )
        raise ValueError(
            f"{params_dir}: {what}: the stored parameters changed since they were written (disk "
            f"corruption, an edited or mixed-up file); {skip}"
        )


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
    it is not a JSON object or has no "_persongen_class"."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no config.json; expected a folder written by `python -m weights_conversion` or save_pretrained"
        )
    cfg = read_json(path)
    if CLASS_KEY not in cfg:
        raise ValueError(
            f"{path}: missing {CLASS_KEY!r}; this is not a converted persongen_jax "
            "folder (convert it with `python -m weights_conversion`)"
        )
    return cfg


def from_pretrained(
    directory: str | os.PathLike,
    *,
    dtype=None,
    param_dtype=None,
    attention_impl: str = "xla",
    verify_checksums: bool | None = None,
):
    """Loads a converted component folder and returns the module with its weights.

    dtype: compute dtype (None = the params' dtype). param_dtype: cast the stored
    parameters (None = keep as stored). attention_impl: "xla" or "cudnn". verify_checksums:
    compare every parameter with params/checksums.json (None: yes unless PERSONGEN_VERIFY_CHECKSUMS=0).
    Errors are ValueErrors naming the folder and the key or parameter.
    """
    import orbax.checkpoint as ocp

    directory = Path(directory)
    cfg = read_config(directory)
    cls = get_model_class(cfg[CLASS_KEY])
    params_dir = (directory / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: missing parameters folder")
    ckptr = ocp.StandardCheckpointer()
    try:
        stored = ckptr.metadata(params_dir)
    except Exception as e:  # orbax / tensorstore raise many types for a damaged folder
        raise ValueError(f"{params_dir}: cannot read the checkpoint metadata ({first_line(e)})") from None
    stored_tree = getattr(stored, "item_metadata", stored)
    if not stored_tree:  # orbax only logs a warning when _METADATA is damaged
        raise ValueError(f"{params_dir}: cannot read the checkpoint metadata; the folder is damaged, re-convert it")
    try:
        model = abstract_model(
            cls, cfg, dtype=dtype, param_dtype=param_dtype or jnp.float32, attention_impl=attention_impl
        )
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{directory / CONFIG_FILE}: {e}") from None
    expected = flat_params(model)
    verify = verify_default(verify_checksums)
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
            raise ValueError(
                f"{params_dir}: {path_str(path)} has shape {tuple(meta.shape)}, "
                f"the model built from config.json expects {tuple(sds.shape)}"
            )
        # Restoring straight into device arrays (a sharding on the target) avoids a second host copy;
        # verified loads restore the stored dtype (what the checksums are of) and cast afterwards.
        want = meta.dtype if verify else (param_dtype or meta.dtype)
        target[path] = jax.ShapeDtypeStruct(sds.shape, want, sharding=device)
    if missing:
        raise ValueError(
            f"{params_dir}: missing parameters {missing[:20]}"
            + (f" (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        )
    try:
        restored = ckptr.restore(params_dir, _nest(target))
    except Exception as e:  # a damaged data file: TensorStore's errors name neither folder nor parameter
        raise ValueError(
            f"{params_dir}: cannot read the parameters ({first_line(e)}); the folder is damaged, re-convert it"
        ) from None
    flat = {p: _lookup(restored, p) for p in target}
    del restored
    if verify:
        check_checksums(params_dir, {path_str(p): v for p, v in flat.items()})
        if param_dtype is not None:
            want = jnp.dtype(param_dtype)
            flat = {p: v.astype(want) if v.dtype != want else v for p, v in flat.items()}
    return assign_params(model, flat)


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` of an exception (at most 300 characters), for one-line errors."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def assign_params(model, flat: Mapping[tuple, Any]):
    """Returns `model` with its nnx.Param values replaced by `flat` ({path: array})."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]  # two filters: two states
    flat_state = list(nnx.to_flat_state(params))
    new = []
    for path, var in flat_state:
        new.append((path, var.replace(jnp.asarray(flat[tuple(path)]))))  # no copy for jax arrays
    params = nnx.from_flat_state(new)
    return nnx.merge(graphdef, params, rest)
