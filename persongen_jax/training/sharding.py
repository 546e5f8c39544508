"""One Mesh with named axes + logical axis rules, so data parallel -> FSDP is a config change.

config.sharding.mesh_axes = ("data",); mesh_shape = (-1,) (-1: all devices, of all processes).
config.sharding.logical_axis_rules = (("batch", "data"), ("params", None)):
    batch  -> the mesh axis the leading dim of every batch array is split over;
    params -> None: parameters and optimizer state replicated (data parallel);
              a mesh axis name ("data"): FSDP -- each array is split over that axis along its largest
              dimension divisible by the axis size (arrays with none stay replicated).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(cfg, devices=None) -> Mesh:
    """The Mesh of `config.sharding` (mesh_shape with at most one -1 = the remaining devices, mesh_axes)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(cfg.mesh_shape)
    if shape.count(-1) > 1:
        raise ValueError(f"config.sharding.mesh_shape={shape}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    shape = [len(devices) // known if s == -1 else s for s in shape]
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"config.sharding.mesh_shape={list(cfg.mesh_shape)} does not fit {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(shape), tuple(cfg.mesh_axes))


def rule(cfg, logical: str):
    """The mesh axis (or None) a logical axis ("batch", "params") maps to by config.sharding.logical_axis_rules."""
    rules = dict(tuple(r) for r in cfg.logical_axis_rules)
    if logical not in rules:
        raise ValueError(f"config.sharding.logical_axis_rules has no rule for {logical!r}")
    return rules[logical]


def batch_sharding(mesh: Mesh, cfg) -> NamedSharding:
    """Batch arrays: the leading dimension split over the "batch" rule's mesh axis."""
    return NamedSharding(mesh, P(rule(cfg, "batch")))


def param_sharding(shape, mesh: Mesh, cfg) -> NamedSharding:
    """A parameter / optimizer-state array of `shape`: replicated, or (FSDP) split over the "params" rule's
    axis along its largest dimension divisible by that axis' size."""
    axis = rule(cfg, "params")
    if axis is None or not shape:
        return NamedSharding(mesh, P())
    n = mesh.shape[axis]
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % n == 0 and shape[d] >= n:
            spec = [None] * len(shape)
            spec[d] = axis
            return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())


def tree_shardings(tree, mesh: Mesh, cfg):
    """A sharding per array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: param_sharding(tuple(np.shape(x)), mesh, cfg), tree)


def put(tree, shardings):
    """Values every process holds in full (host or local device arrays) -> global arrays with `shardings`.
    One process: `jax.device_put`. Several: each process fills the shards on its own devices from its copy
    (device_put cannot target other hosts' devices)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, shardings)


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy (this process's rows) -> global arrays sharded on the batch axis (multi-host safe)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
