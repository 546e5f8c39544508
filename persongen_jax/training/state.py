"""Training state: the model split into what trains and what does not, as the one pytree the step updates.

    split, params, frozen, rest = split_model(model, groups)     # groups: config.trainable regexes
    frozen = cast_frozen(frozen, config.frozen_dtype)             # e.g. bf16 frozen weights
    state = create_state(params, frozen, rest, tx, mesh, config.sharding)   # sharded on the mesh
    model = split.merge(state.params, state.frozen, state.rest)             # e.g. inside the loss
    target = abstract_checkpoint(params, tx, mesh, config.sharding)         # restore target
    state = restore_state(state, restored)                                  # from a checkpoint

`TrainState` holds the step counter (an int32 device scalar: the loop never copies the step from the
host), the trainable parameters as a flat {dotted path: array} dict (what the optimizer, the config's
group regexes and the checkpoints name), the optimizer state, and the frozen parameters and the rest of
the module state (never checkpointed: they come from config.init). `ModelSplit` is the static part: the
graph definition and where each trainable parameter goes back.

`checkpoint_tree(state)` is what a checkpoint stores ({"params", "opt_state", "step"}); `abstract_checkpoint`
gives the same tree as ShapeDtypeStructs with the mesh shardings, the restore target.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from persongen_jax.models.modeling import path_str
from persongen_jax.training import optimizer as optim_lib
from persongen_jax.training import sharding as shard_lib


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of the jitted step
class ModelSplit:
    """How to put the trainable parameters back into the model: its graphdef and, per trainable parameter,
    (NNX path, dotted path, Variable template)."""

    graphdef: Any
    template: tuple

    def merge(self, params: Mapping[str, jax.Array], frozen, rest):
        """The model with trainable params {dotted path: array} (and the frozen state) put back in."""
        train_state = nnx.from_flat_state([(p, v.replace(params[k])) for p, k, v in self.template])
        return nnx.merge(self.graphdef, train_state, frozen, rest)


def split_model(model, groups: Mapping[str, Mapping]) -> tuple[ModelSplit, dict, Any, Any]:
    """-> (split, trainable params {dotted path: array}, frozen params (nnx.State), the rest of the state).
    A parameter trains when a group regex of `groups` ({name: {"pattern", "lr"}}) matches its path."""

    def trainable(path, value):
        return isinstance(value, nnx.Param) and optim_lib.group_of(path_str(path), groups) is not None

    graphdef, train_state, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)  # type: ignore[misc]
    flat = list(nnx.to_flat_state(train_state))
    params = {path_str(p): v.get_value() for p, v in flat}
    template = tuple(
        (p, path_str(p), v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype))) for p, v in flat
    )
    return ModelSplit(graphdef, template), params, frozen, rest


FROZEN_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_frozen(frozen, dtype_name: str):
    """The frozen parameters' floating-point arrays in `dtype_name` ("float32" | "bfloat16"; config.frozen_dtype).

    Frozen weights (UNet base, VAE, text encoders, frozen ID-encoder parts) get no gradient and no optimizer
    state, so storing them in bf16 halves their memory (SDXL base: ~6.6 -> 3.3 GB) while the trainable
    parameters and the optimizer state stay float32. Layers promote mixed inputs (a float32 activation
    times a bf16 kernel computes in float32), so with config.dtype="float32" only the weights are rounded."""
    if dtype_name not in FROZEN_DTYPES:
        raise ValueError(f"config.frozen_dtype={dtype_name!r}; expected one of {sorted(FROZEN_DTYPES)}")
    dtype = FROZEN_DTYPES[dtype_name]
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x  # noqa: E731
    return jax.tree.map(cast, frozen)


@flax.struct.dataclass
class TrainState:
    """What the train step reads and updates (all arrays; see the module docstring)."""

    # Leaves are arrays; the same tree holds their shardings or ShapeDtypeStructs (state_shardings, _abstract).
    step: Any  # int32 [], the number of steps taken
    params: dict[str, Any]  # trainable, {dotted path: array}
    opt_state: Any
    frozen: Any  # nnx.State of the frozen parameters
    rest: Any  # nnx.State of everything else (e.g. RNG counters)

    def replace(self, **changes) -> "TrainState":
        """A copy with `changes` (flax.struct's replace, declared for the type checker)."""
        return dataclasses.replace(self, **changes)


def state_shardings(state: TrainState, mesh, sharding_cfg) -> TrainState:
    """The sharding of every leaf: params, optimizer state and frozen parameters by the config's "params"
    rule (replicated, or FSDP over a mesh axis), the step and the rest replicated."""
    repl = NamedSharding(mesh, P())
    return TrainState(
        step=repl,
        params=shard_lib.tree_shardings(state.params, mesh, sharding_cfg),
        opt_state=shard_lib.tree_shardings(state.opt_state, mesh, sharding_cfg),
        frozen=shard_lib.tree_shardings(state.frozen, mesh, sharding_cfg),
        rest=jax.tree.map(lambda _: repl, state.rest),
    )


def _abstract(params, frozen, rest, tx) -> TrainState:
    """The state's shapes and dtypes, nothing allocated (the optimizer state by `jax.eval_shape`)."""
    sds = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
    return TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=jax.tree.map(sds, params),
        opt_state=jax.eval_shape(tx.init, params),
        frozen=frozen,
        rest=rest,
    )


def create_state(params, frozen, rest, tx: optax.GradientTransformation, mesh, sharding_cfg) -> TrainState:
    """The initial state on the mesh: arrays put with their shardings, the optimizer state initialised by a
    jitted `tx.init` straight into its shardings (no host copy of the optimizer state)."""
    sh = state_shardings(_abstract(params, frozen, rest, tx), mesh, sharding_cfg)
    params = shard_lib.put(params, sh.params)
    opt_state = jax.jit(tx.init, out_shardings=sh.opt_state)(params)
    return TrainState(
        step=shard_lib.put(np.zeros((), np.int32), sh.step),
        params=params,
        opt_state=opt_state,
        frozen=shard_lib.put(frozen, sh.frozen),
        rest=shard_lib.put(rest, sh.rest),
    )


def checkpoint_tree(state: TrainState) -> dict:
    """What a checkpoint stores: trainable params, optimizer state and the step (a host int64, as always)."""
    step = np.asarray(state.step.addressable_data(0))  # replicated: every process holds the value
    return {"params": state.params, "opt_state": state.opt_state, "step": np.int64(step)}


def abstract_checkpoint(params, tx: optax.GradientTransformation, mesh, sharding_cfg) -> dict:
    """`checkpoint_tree`'s structure as ShapeDtypeStructs with the mesh shardings (the restore target),
    computed from the trainable params and the optimizer alone: nothing is allocated."""
    abstract = _abstract(params, None, None, tx)
    sh = state_shardings(abstract.replace(frozen={}, rest={}), mesh, sharding_cfg)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    return {
        "params": jax.tree.map(with_sharding, abstract.params, sh.params),
        "opt_state": jax.tree.map(with_sharding, abstract.opt_state, sh.opt_state),
        "step": jax.ShapeDtypeStruct((), np.int64, sharding=sh.step),
    }


def restore_state(state: TrainState, restored: Mapping[str, Any]) -> TrainState:
    """`state` with a restored checkpoint tree ({"params", "opt_state", "step"}) put in."""
    step = shard_lib.put(np.asarray(int(restored["step"]), np.int32), state.step.sharding)
    return state.replace(step=step, params=restored["params"], opt_state=restored["opt_state"])
