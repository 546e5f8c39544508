"""Orbax checkpoints in WORKDIR/checkpoints/<step>/: {"state": trainable params + optimizer state + step,
"data": the data iterator's position (JSON)}. Frozen weights are never saved (they come from
config.init). Saves are asynchronous (config.async_checkpointing): `save` returns once the arrays are
copied off the devices and the files are written by a background thread while the next steps run; the
next `save`, `restore` and the manager's `close` wait for it. Saves are atomic (orbax writes a temporary
folder and renames it when complete), so a run killed mid-save resumes from the last complete checkpoint;
the next run removes the half-written folder (`remove_partial_saves`, with a warning naming it).

`restore_latest` resumes from the newest checkpoint that restores: one whose files are damaged is
named in a warning and moved to WORKDIR/checkpoints_unreadable/<step>/ (kept, never deleted; out of
the way of the step being saved again), and the previous one is tried. A checkpoint whose shapes differ
from the model (another config) is an error naming the parameters and the checkpoint, not a fallback.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("persongen_jax.train")
UNREADABLE_DIR = "checkpoints_unreadable"
# Orbax writes checkpoint <step> into `<step>.orbax-checkpoint-tmp` (some versions add `-<timestamp>`) and
# renames it when complete: such a folder found at start is a save that was killed or failed.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def remove_partial_saves(directory: Path) -> list[Path]:
    """Removes the temporary folders (`<step>.orbax-checkpoint-tmp*`) of saves that never finished -- a run
    killed with SIGKILL mid-save, a full disk -- each named in a warning; -> the removed paths. Only
    called under the run folder's lock (`run_folder.RunLock`): no other trainer is writing there."""
    removed = []
    for tmp in sorted(Path(directory).glob(f"*{TMP_SUFFIX}*")) if Path(directory).is_dir() else ():
        log.warning(
            "removing %s: a checkpoint whose save did not finish (the run was killed or the disk was "
            "full while writing it); resuming from the last complete checkpoint",
            tmp,
        )
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
        removed.append(tmp)
    return removed


def make_manager(workdir, keep: int, *, asynchronous: bool = True) -> ocp.CheckpointManager:
    """The orbax manager of WORKDIR/checkpoints: items "state" and "data", the newest `keep` kept; every
    process of a multi-host run calls it (and `save`) with the same arguments, as orbax expects. Process 0
    first removes the half-written folders of killed saves (`remove_partial_saves`)."""
    directory = Path(workdir).absolute() / "checkpoints"
    if jax.process_index() == 0:
        remove_partial_saves(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def save(
    mngr: ocp.CheckpointManager, step: int, state: dict, data_state: dict, *, force: bool = False, wait: bool = False
) -> None:
    """Saves the state pytree and the data iterator position (JSON) as checkpoint `step`. Returns once the
    arrays are copied to host memory (the caller may then donate / overwrite them); the write finishes in
    the background unless `wait` (or the manager is synchronous)."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
        force=force,
    )
    if wait:
        mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[dict, dict]:
    """abstract_state: the state pytree of ShapeDtypeStructs with shardings (restored onto the mesh)."""
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    )
    return out["state"], out["data"]


def _stored_shapes(step_dir: Path) -> dict | None:
    """The state's {params, opt_state, step} tree of (shape, dtype) from the checkpoint's metadata."""
    meta = ocp.StandardCheckpointer().metadata((step_dir / "state").absolute())
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return tree or None


def shape_mismatches(step_dir: Path, abstract_state) -> list[str]:
    """Differences between a checkpoint and the state the current config builds: trainable parameters
    missing, extra or of another shape, and the optimizer state's leaf count / shapes."""
    stored = _stored_shapes(step_dir)
    if stored is None:
        raise ValueError("no readable metadata")
    want, have = abstract_state["params"], stored.get("params") or {}
    out = [
        f"{k}: stored {tuple(have[k].shape)}, the config builds {tuple(v.shape)}"
        for k, v in want.items()
        if k in have and tuple(have[k].shape) != tuple(v.shape)
    ]
    out += [f"{k}: not in the checkpoint" for k in want if k not in have]
    out += [f"{k}: in the checkpoint, not trained by the config" for k in have if k not in want]
    if not out:
        a = [tuple(np.shape(x)) for x in jax.tree.leaves(abstract_state["opt_state"])]
        b = [tuple(x.shape) for x in jax.tree.leaves(stored.get("opt_state"))]
        if a != b:
            out.append(f"optimizer state: {len(b)} arrays stored, the config builds {len(a)} (or other shapes)")
    return out


def _root_reason(e: BaseException) -> str:
    """The first line of the innermost chained exception: for a damaged checkpoint that is TensorStore's
    own error, which names the array and the byte range (the outer one prints a TensorStore spec)."""
    inner = e.__cause__ or e.__context__
    while inner is not None:
        e, inner = inner, inner.__cause__ or inner.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, workdir) -> tuple[int, dict, dict] | None:
    """(step, state, data state) of the newest checkpoint that restores; None when there is none.

    A checkpoint that does not match the config's shapes raises ValueError naming it and the parameters.
    One that fails to restore (damaged files) is named in a warning, moved to WORKDIR/checkpoints_unreadable/
    and the next older is tried; when none restores, ValueError listing each with its error."""
    directory = Path(mngr.directory)
    mngr.wait_until_finished()
    errors = []
    for step in sorted(mngr.all_steps(), reverse=True):
        step_dir = directory / str(step)
        meta_error: Exception | None = None
        try:
            diffs = shape_mismatches(step_dir, abstract_state)
        except Exception as e:  # noqa: BLE001 -- damaged metadata: treated as a damaged checkpoint below
            diffs, meta_error = [], e
        if diffs:
            raise ValueError(
                f"{step_dir}: the checkpoint does not match the model this config builds: "
                + "; ".join(diffs[:10])
                + (f" (+{len(diffs) - 10} more)" if len(diffs) > 10 else "")
                + "; resume with the config it was trained with (WORKDIR/config.json), or start over "
                "with --config.resume=false"
            )
        try:
            if meta_error is not None:
                raise meta_error
            state, data = restore(mngr, step, abstract_state)
            return step, state, data
        except Exception as e:  # noqa: BLE001 -- orbax / TensorStore raise many types for damaged files
            reason = _root_reason(e)
            aside = Path(workdir) / UNREADABLE_DIR / str(step)
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside = aside.with_name(f"{step}-{len(list(aside.parent.iterdir()))}")
            shutil.move(str(step_dir), str(aside))
            mngr.reload()
            log.warning(
                "checkpoint %s does not restore (%s); moved it to %s (kept for inspection) and trying the "
                "previous checkpoint",
                step_dir,
                reason,
                aside,
            )
            errors.append(f"step {step}: {reason}")
    if errors:
        raise ValueError(
            f"{directory}: no checkpoint restores ({'; '.join(errors)}); the damaged ones are in "
            f"{Path(workdir) / UNREADABLE_DIR}"
        )
    return None
