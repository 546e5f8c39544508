"""Multi-host runs: joining the job, and the few decisions every process must take together.

    distributed.initialize(config.distributed)      # before anything touches a device
    stop = distributed.StopAgreement(mesh)           # SIGTERM on any host -> every host stops at one step
    host = distributed.to_host(state.params)         # numpy copies of arrays that span other hosts' devices

`initialize` calls `jax.distributed.initialize` when the run is one of several processes: with
config.distributed.coordinator_address / num_processes / process_id when given, else from the environment
JAX reads itself (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, Kubernetes / GKE, Cloud TPU). On CPU, cross-
process collectives need `JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo` (the two-process test sets it).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("persongen_jax.train")
MODES = ("auto", "always", "never")
# Variables of the launchers whose multi-process jobs `jax.distributed.initialize()` detects on its own.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _detected() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_VARS)


def initialize(cfg) -> bool:
    """Joins the multi-process job per config.distributed (see the module docstring); True when it did.

    cfg.initialize: "auto" (when a coordinator address is given or the environment names a multi-process
    job), "always" (let JAX detect the cluster; a single process otherwise fails), "never"."""
    if cfg.initialize not in MODES:
        raise ValueError(f"config.distributed.initialize={cfg.initialize!r}; expected one of {list(MODES)}")
    if jax.distributed.is_initialized() or cfg.initialize == "never":
        return False
    if not (cfg.initialize == "always" or cfg.coordinator_address or _detected()):
        return False
    kw = {}
    if cfg.coordinator_address:
        kw["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kw["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kw["process_id"] = cfg.process_id
    jax.distributed.initialize(**kw)
    log.info(
        "process %d of %d joined (%d local / %d global devices)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def sync(name: str) -> None:
    """Barrier: every process waits here until all arrive (a no-op for a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class StopAgreement:
    """Turns a per-process stop request (SIGTERM arrives at one host, or at hosts at different steps) into one
    step at which every process stops, so all of them save the same checkpoint.

    `__call__(requested)` is called once per step by every process. One process: `requested` as is. Several:
    the flags are max-reduced over all devices by a tiny jitted computation dispatched now and read at the
    next call, so the loop keeps one step in flight instead of waiting for each step to finish; every
    process reads the same reduced value at the same call, hence stops at the same step (one step after
    the first request)."""

    def __init__(self, mesh):
        self.multi = jax.process_count() > 1
        self._pending = None
        if self.multi:
            devices = mesh.devices.reshape(-1)
            flat = jax.sharding.Mesh(devices, ("all",))
            self._sharding = NamedSharding(flat, P("all"))
            self._local = sum(d.process_index == jax.process_index() for d in devices)
            self._reduce = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(flat, P()))

    def __call__(self, requested: bool) -> bool:
        """This process's stop request of this step -> whether every process stops now."""
        if not self.multi:
            return requested
        flags = np.full((self._local,), int(requested), np.int32)
        now = self._reduce(jax.make_array_from_process_local_data(self._sharding, flags))
        previous, self._pending = self._pending, now
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))


def to_host(tree):
    """Host numpy copies of a pytree of global arrays. Arrays that span devices of other processes (FSDP
    shards across hosts) are all-gathered -- a collective: every process calls this in the same order."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
