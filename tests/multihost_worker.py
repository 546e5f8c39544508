"""One process of tests/test_multihost.py: trains the micro config with overrides, saves params and losses.

    python tests/multihost_worker.py OUT.npz WORKDIR PROCESS_ID NUM_PROCESSES PORT [key=JSON ...] [sigterm_at=P:S]
XLA_FLAGS sets the fake CPU device count of the process; JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo.
"""

import json
import sys

import numpy as np


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def run(workdir, overrides: dict, devices=None, **distributed) -> dict:
    """train_and_evaluate of tests/test_training.py's tiny_config (micro model, synthetic data) + overrides."""
    from configs import default
    from persongen_jax.training import train_and_evaluate

    c = default.tiny(default.get_config())
    c.model = "micro"
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5, lora=1e-4)
    for key, value in {**overrides, **{f"distributed.{k}": v for k, v in distributed.items()}}.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = _tuples(value)
    return train_and_evaluate(c, workdir, devices=devices)


def _sigterm_at(process_id: int, step: int) -> None:
    """As if SIGTERM reached process `process_id` (only) during step `step`: its stop request is raised from
    that step on; the agreement across processes is the real one."""
    from persongen_jax.training import distributed

    agree, calls = distributed.StopAgreement.__call__, {"n": 0}

    def patched(self, requested):
        calls["n"] += 1
        import jax

        return agree(self, requested or (jax.process_index() == process_id and calls["n"] >= step))

    distributed.StopAgreement.__call__ = patched


def main(out, workdir, process_id, num_processes, port, *overrides):
    kv = dict(o.split("=", 1) for o in overrides)
    if "sigterm_at" in kv:
        _sigterm_at(*map(int, kv.pop("sigterm_at").split(":")))
    result = run(
        workdir,
        {k: json.loads(v) for k, v in kv.items()},
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(num_processes),
        process_id=int(process_id),
    )
    np.savez(
        out,
        **{f"param/{k}": np.asarray(v, np.float32) for k, v in result["params"].items()},
        losses=np.array([h["loss"] for h in result["history"]]),
        step=result["step"],
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
