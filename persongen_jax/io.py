"""File helpers shared by every loader and writer.

- `loads_json` / `read_json`: the one parser of the JSON files and headers the loaders read; a damaged
  file is a ValueError naming it, never a traceback from deep inside a loader.
- `atomic_dir`: a folder written in full or not at all (temp folder next to DST, renamed into place),
  with `clean_stale_temps` for the leftovers of killed writes.
- `chmod_as_created`: the mode of a temp file or folder that becomes an output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)


def loads_json(raw: str | bytes, source: str | os.PathLike, what: str = "not valid JSON") -> Any:
    """JSON text or UTF-8 bytes -> the value; `ValueError("<source>: <what> (<reason>)")` for bad syntax,
    bytes that are not UTF-8, and nesting deeper than Python's recursion limit (json raises
    RecursionError there: a hostile safetensors header of 2 MB of `[[[` was a 36-line traceback).
    The one parser of the JSON files and headers the loaders read."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        reason = str(e)
    except UnicodeDecodeError as e:
        reason = f"not UTF-8: {e.reason} at byte {e.start}"
    except RecursionError:
        reason = "nested too deeply"
    raise ValueError(f"{source}: {what} ({reason})")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status, kernels
    >= 4.7); elsewhere set and put back at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | os.PathLike, directory: bool) -> None:
    """Gives a file or folder made by `tempfile.mkstemp` / `mkdtemp` (private: 0600 / 0700) the mode a
    plain `open()` / `mkdir()` would have given it, 0666 / 0777 less the umask: the temp object becomes
    the user's output by a rename, and outputs must be readable as the user's other files are."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object file (config.json, scheduler / processor configs, a run's config): the one reader
    of them all, so a damaged file is always `ValueError("<path>: not valid JSON (...)")`, never a
    traceback from deep inside a loader. The caller decides what a missing file means."""
    path = Path(path)
    data = loads_json(path.read_bytes(), path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# Temporary folders of `atomic_dir` are named `.DST.tmp-PID@HOST-XXXXXXXX` (and `.DST.old-...` for the
# replaced folder on filesystems without an atomic exchange), so a later run can tell a folder left by
# a killed process of this host (removed) from one being written right now (kept).
_TMP_RE = re.compile(r"(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>.+)-[A-Za-z0-9_]+")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_stale_temps(dst: str | os.PathLike) -> list[Path]:
    """Removes the temporary folders that `atomic_dir(dst)` runs killed mid-write (kill -9, power loss)
    left next to `dst`: only those whose process was on this host and no longer runs, each logged with
    its name. A `.DST.old-*` folder (the previous `dst`, renamed away by the two-rename fallback) is put
    back when `dst` is missing instead of removed. Returns the folders removed or restored."""
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return []
    host, done = socket.gethostname(), []
    prefix = f".{dst.name}."
    for p in sorted(dst.parent.iterdir()):
        m = _TMP_RE.fullmatch(p.name[len(prefix) :]) if p.name.startswith(prefix) else None
        if not m or m["host"] != host or _process_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not os.path.lexists(dst):
            p.rename(dst)
            log.warning("restored %s from %s (a replacement of it was killed half-way)", dst, p.name)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s: left by an interrupted write of %s (process %s is gone)", p, dst.name, m["pid"])
        done.append(p)
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temp folder next to `dst`, renamed to `dst` only if the block succeeds, so a
    failed or killed write never leaves a half-written `dst` (nor destroys an existing one): after a
    kill -9 at any point `dst` is either the old complete folder or the new complete one. An existing
    `dst` is swapped out atomically (renameat2 exchange; two renames where the filesystem lacks it).
    Temp folders of killed earlier writes are removed first (`clean_stale_temps`). `dst` gets the mode
    of a plain mkdir (0777 less the umask), not mkdtemp's private 0700."""
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(dst)
    tag = f"{os.getpid()}@{socket.gethostname()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{tag}", dir=dst.parent))
    try:
        chmod_as_created(tmp, directory=True)  # mkdtemp's 0700 would become dst's mode
        yield tmp
        if not os.path.lexists(dst):
            tmp.rename(dst)
        elif _exchange(tmp, dst):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old folder
        else:
            old = dst.with_name(f".{dst.name}.old-{tag}{secrets.token_hex(4)}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
