"""File helpers shared by every loader and writer: one parser of JSON files and headers."""

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
