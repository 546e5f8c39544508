"""One process of tests/test_multihost.py: trains the given config and writes its result (.npz + losses).

    python tests/multihost_worker.py OUT.npz WORKDIR PROCESS_ID NUM_PROCESSES PORT [key=value ...]
NUM_PROCESSES=1 runs alone (no jax.distributed). XLA_FLAGS sets the fake CPU device count per process.
"""

import json
import sys

import numpy as np


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def main(out, workdir, process_id, num_processes, port, *overrides):
    from configs import default
    from persongen_jax.training import train_and_evaluate

    c = default.tiny(default.get_config())  # as tests/test_training.py's tiny_config
    c.model = "micro"
    c.trainable = default.groups(heads=1e-5, fuse_mlp=1e-5, lora=1e-4)
    for kv in overrides:
        key, value = kv.split("=", 1)
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = _tuples(json.loads(value))
    if int(num_processes) > 1:
        c.distributed.coordinator_address = f"127.0.0.1:{port}"
        c.distributed.num_processes, c.distributed.process_id = int(num_processes), int(process_id)
    result = train_and_evaluate(c, workdir)
    np.savez(out, **{f"param/{k}": np.asarray(v, np.float32) for k, v in result["params"].items()},
             losses=np.array([h["loss"] for h in result["history"]]), step=result["step"])


if __name__ == "__main__":
    main(*sys.argv[1:])
