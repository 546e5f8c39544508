"""File helpers shared by every loader and writer: the one parser of JSON files and headers; the mode
of a temp file or folder that becomes an output."""

from __future__ import annotations

import json
import os
from typing import Any


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
