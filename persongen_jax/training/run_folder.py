"""What a training run folder (WORKDIR) guarantees -- one trainer at a time, configs checked before anything
is written, every config version kept, metrics without duplicate steps -- and reading a run's config back
(loading its model: `persongen_jax.sources`).

    with RunLock(workdir):                       # fcntl lock: a second trainer fails, naming the holder
        check_config_types(config)               # `--config.lora.targets=5` -> error naming the key
        changes = check_resume(config, workdir)  # refuses changes of shapes / trainable groups
        ... restore ...
        record_config(config, workdir, start_step, changes)   # config.json + config_history.jsonl
        supersede_metrics(workdir, start_step)   # metrics of steps past the checkpoint set aside

    config = read_config("runs/final_method")   # what `persongen_jax.sources` rebuilds a run's model from

Files: WORKDIR/.lock (the lock; holds the holder's pid, host and start time), WORKDIR/config.json (the
config of the latest start: what `evaluate --checkpoint` rebuilds the model from), WORKDIR/config_history.jsonl
(one line per start: step, time, host, the keys that changed and the whole config),
WORKDIR/metrics.superseded.jsonl (metric lines of steps a resume recomputes), WORKDIR/previous/<time>/
(a run set aside by `--config.resume=false`). See docs/RELIABILITY.md.

Stale locks: the lock is `fcntl.flock` on WORKDIR/.lock, which the kernel releases when its process ends,
however it ends (kill -9, OOM, power loss on a local disk): a .lock file left behind never blocks a new run
and is simply taken over. On network filesystems flock is emulated with NFS byte-range locks, which the
server drops when the client's lease expires (NFSv4: about 90 s after a crashed host). Multi-host runs
take the lock in process 0 only (all processes share WORKDIR).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_flags.config_flags import ConfigFileFlagParser

from persongen_jax.io import read_json

log = logging.getLogger("persongen_jax.train")

# The type reference of check_config_types: every key's type in the defaults.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.py"
LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"  # (and eval/history.superseded.jsonl)
PREVIOUS_DIR = "previous"
# Outputs of a run, set aside together by `--config.resume=false`.
RUN_OUTPUTS = ("checkpoints", CONFIG_FILE, HISTORY_FILE, METRICS_FILE, SUPERSEDED_FILE, "tb", "eval", "samples")

# Config keys whose change makes a checkpoint mean something else: parameter shapes, the set of trained
# parameters, the optimizer state's structure, or the frozen weights (which checkpoints do not hold).
# A key matches an entry equal to it or below it ("lora" covers lora.rank, lora.alpha, lora.targets).
STRUCTURAL_KEYS = ("model", "seed", "init", "lora", "adapters", "id_injection", "id_encoder", "optim.grad_accum_steps")
# Element types of tuple keys whose default is empty (the others are inferred from their default).
ELEMENT_TYPES = {"adapters.names": str, "adapters.scales": float}


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and what to do."""


# ----------------------------------------------------------------------------------------- lock


class RunLock:
    """Exclusive lock of WORKDIR for one training process (see the module doc for stale locks)."""

    def __init__(self, workdir):
        self.path = Path(workdir) / LOCK_FILE
        self._fd = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on {h['host']}, started {h['started']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that is just starting"
            raise RunFolderError(
                f"{self.path.parent}: another training run is using this folder ({who}); stop "
                "it or choose another --workdir (the lock is released when that process ends)"
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------------------- config types


def _reference_config():
    """configs/default.py's get_config(), the type reference, read by path (the library does not import the
    configs package); None when the file is absent (an install without configs/)."""
    if not DEFAULT_CONFIG.is_file():
        return None
    return ConfigFileFlagParser(name="config").parse(str(DEFAULT_CONFIG))


def _flat(config, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fits(value, like) -> bool:
    if isinstance(like, bool):
        return isinstance(value, bool)
    if isinstance(like, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(like, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(like, str):
        return isinstance(value, str)
    return True


def check_config_types(config, reference=None) -> None:
    """RunFolderError naming the first key whose value has another type than in configs/default.py
    (ml_collections checks scalar overrides, but not the elements of a tuple: `--config.lora.targets=5`
    becomes (5,) and used to fail deep inside LoRA with a TypeError)."""
    reference = _reference_config() if reference is None else reference
    if reference is None:
        return
    ref, new = _flat(reference), _flat(config)
    for key, like in ref.items():
        if key not in new or like is None:
            continue
        value = new[key]
        if isinstance(like, (tuple, list)):
            if not isinstance(value, (tuple, list)):
                raise RunFolderError(
                    f"config.{key}={value!r}: expected a tuple (like the default {tuple(like)!r}), "
                    f"got {type(value).__name__}"
                )
            elem = ELEMENT_TYPES.get(key)
            kinds = {type(v) for v in like}
            sample = elem() if elem else (like[0] if len(kinds) == 1 else None)
            for v in value:
                if sample is not None and not (
                    _fits(v, sample) and (not isinstance(sample, tuple) or isinstance(v, (tuple, list)))
                ):
                    raise RunFolderError(
                        f"config.{key}={tuple(value)!r}: expected a tuple of "
                        f"{type(sample).__name__} (like the default {tuple(like)!r}), got "
                        f"{type(v).__name__} {v!r}"
                    )
        elif not _fits(value, like):
            raise RunFolderError(
                f"config.{key}={value!r}: expected {type(like).__name__} (like the default "
                f"{like!r}), got {type(value).__name__}"
            )
    for name, spec in (config.get("trainable") or {}).items():
        if not isinstance(spec.get("pattern"), str) or not _fits(spec.get("lr"), 1.0):
            raise RunFolderError(f"config.trainable.{name}: expected {{pattern: str, lr: float}}, got {dict(spec)!r}")


# ----------------------------------------------------------------------------------------- resume


def has_checkpoints(workdir) -> bool:
    """Whether WORKDIR/checkpoints holds at least one step folder."""
    d = Path(workdir) / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def _plain(config) -> dict:
    """The JSON-able dict of a config, as config.json stores it."""
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def read_saved_config(workdir) -> dict | None:
    """WORKDIR/config.json as a dict (None when absent); RunFolderError when it is not valid JSON."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as e:
        raise RunFolderError(f"{e}; restore it from {HISTORY_FILE} or start over with --config.resume=false") from None


def _structural(key: str, old, new) -> bool:
    if any(key == k or key.startswith(k + ".") for k in STRUCTURAL_KEYS):
        return True
    if key.startswith("trainable."):
        # the group set and patterns decide which parameters train; an lr > 0 <-> 0 switch too
        return not key.endswith(".lr") or (old is None) != (new is None) or (bool(old) != bool(new))
    if key == "optim.grad_clip_norm":  # on/off adds or removes a stage of the optimizer state
        return bool(old) != bool(new)
    return False


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} of the keys that differ (missing = None)."""
    a, b = _flat(old), _flat(new)
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples vs lists)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))}


def check_resume(config, workdir, *, is_main: bool = True) -> dict[str, tuple]:
    """Before anything is written: compares `config` with the run's saved config.json when WORKDIR has
    checkpoints. Changes of structural keys (STRUCTURAL_KEYS, trainable groups) are refused, listing every
    differing key; others (steps, logging, eval, learning rates ...) are returned, to be recorded.
    `config.resume=False` sets the previous run aside (WORKDIR/previous/<time>/, nothing deleted) and starts
    over. Returns the changes ({} for a new run)."""
    workdir = Path(workdir)
    if not has_checkpoints(workdir):
        return {}
    if not config.get("resume", True):
        if is_main:
            set_aside(workdir)
        return {}
    saved = read_saved_config(workdir)
    if saved is None:
        log.warning(
            "%s: checkpoints without config.json: cannot compare configs; the checkpoint shapes are still checked",
            workdir,
        )
        return {}
    changes = {k: v for k, v in config_changes(saved, _plain(config)).items() if k != "resume"}
    refused = {k: v for k, v in changes.items() if _structural(k, *v)}
    if refused:
        listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in refused.items())
        raise RunFolderError(
            f"{workdir}: cannot resume this run with a different model or trained parameters "
            f"({listed}); use a new --workdir, or --config.resume=false to start over here "
            f"(the previous run moves to {workdir / PREVIOUS_DIR}/<time>/). Nothing was written."
        )
    return changes


def set_aside(workdir) -> Path:
    """Moves the outputs of the previous run (RUN_OUTPUTS) to WORKDIR/previous/<time>/; returns that folder."""
    workdir = Path(workdir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dst = workdir / PREVIOUS_DIR / stamp
    dst.mkdir(parents=True)
    for name in RUN_OUTPUTS:
        if (workdir / name).exists():
            shutil.move(str(workdir / name), str(dst / name))
    log.warning("config.resume=false: the previous run in %s moved to %s; starting over", workdir, dst)
    return dst


def record_config(config, workdir, step: int, changes: dict[str, tuple]) -> None:
    """WORKDIR/config.json = `config`; one line in config_history.jsonl: the step this config starts at and
    what changed since the previous one."""
    workdir = Path(workdir)
    plain = _plain(config)
    line = {
        "step": int(step),
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "changes": {k: list(v) for k, v in changes.items()},
        "config": plain,
    }
    with open(workdir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")
    tmp = workdir / f".{CONFIG_FILE}.tmp"
    tmp.write_text(
        config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(plain, indent=2)
    )
    os.replace(tmp, workdir / CONFIG_FILE)
    if changes:
        log.info(
            "resumed at step %d with config changes: %s",
            step,
            "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
        )


def supersede_metrics(workdir, step: int) -> int:
    """A run killed after its last checkpoint logged steps the resume computes again: their lines (step >
    `step`) move from metrics.jsonl to metrics.superseded.jsonl (and from eval/history.jsonl to
    eval/history.superseded.jsonl), so each step appears once. Returns how many lines moved."""
    workdir = Path(workdir)
    return sum(
        _supersede(path, path.with_name(path.stem + ".superseded.jsonl"), step)
        for path in (workdir / METRICS_FILE, workdir / "eval" / "history.jsonl")
    )


def _supersede(path: Path, aside: Path, step: int) -> int:
    if not path.is_file():
        return 0
    keep: list[str] = []
    moved: list[str] = []
    for line in path.read_text(errors="replace").splitlines(keepends=True):
        try:
            later = int(json.loads(line)["step"]) > step
        except (ValueError, KeyError, TypeError):
            later = False  # not ours to judge: kept as is
        (moved if later else keep).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(aside, "a") as f:
            f.writelines(moved)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
        log.warning(
            "%s: %d line(s) of steps after %d (logged after the last checkpoint of a stopped run) moved to %s",
            path,
            len(moved),
            step,
            aside.name,
        )
    return len(moved)


# ----------------------------------------------------------------------------------------- trained models


def read_config(workdir):
    """The run's config (WORKDIR/config.json) as a ConfigDict: what `sources.load_trained_model` rebuilds from."""
    saved = read_saved_config(workdir)
    if saved is None:
        raise RunFolderError(
            f"{Path(workdir) / CONFIG_FILE}: no training config (a run folder of `python -m "
            "persongen_jax.train` has one; or pass --config configs/X.py)"
        )
    return ml_collections.ConfigDict(saved)
