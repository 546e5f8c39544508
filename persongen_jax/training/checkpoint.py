"""Orbax checkpoints in WORKDIR/checkpoints/<step>/: {"state": trainable params + optimizer state + step,
"data": the data iterator's position (JSON)}. Frozen weights are never saved (they come from
config.init). Saves are atomic (orbax writes a temporary folder and renames it when complete), so a
run killed mid-save resumes from the last complete checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp


def make_manager(workdir, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_state: dict, *, force: bool = False) -> None:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
              force=force)
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[dict, dict]:
    """abstract_state: the state pytree of ShapeDtypeStructs with shardings (restored onto the mesh)."""
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                     data=ocp.args.JsonRestore()))
    return out["state"], out["data"]
