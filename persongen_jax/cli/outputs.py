"""The output folder (`--out`) of a command that writes files (generate, evaluate): it writes only into a
folder it creates or one it wrote before, and then only with `--overwrite`; it never replaces a user's file.

    out = OutputFolder(args.out, "generate", overwrite=args.overwrite)
    out.check()          # before loading anything: ValueError naming the first clashing file
    with out:            # creates the folder (or clears this command's previous outputs with --overwrite)
        ... write files ...
        out.finish(["seed_0.png", "settings.json"])   # what a later --overwrite may replace

A folder written by a command holds `.persongen_output.json` ({"command", "files"}): how a later run knows
the folder is its own, and which top-level entries it may replace. A command that fails leaves no folder it
created empty behind (the error paths of generate: a prompt without the trigger word, no checkpoint at the
step asked).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from persongen_jax.io import loads_json

MARKER = ".persongen_output.json"


class OutputFolder:
    """`--out PATH` of `command`; see the module doc."""

    def __init__(self, path: str | os.PathLike, command: str, *, overwrite: bool = False):
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.created = False
        self._had_marker = False
        self._written = False  # finish() was called

    def _previous(self) -> dict | None:
        """The marker of an earlier run in the folder (None: not written by a command of ours)."""
        try:
            marker = loads_json((self.path / MARKER).read_bytes(), self.path / MARKER)
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) and isinstance(marker.get("files", []), list) else None

    def check(self) -> None:
        """ValueError naming the folder and its first clashing entry when the command may not write there."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path}: is a file, not a folder")
        if not self.path.is_dir() or self.overwrite:
            return
        entries = sorted(p.name for p in self.path.iterdir())
        if not entries:
            return
        first = next((e for e in entries if e != MARKER), entries[0])
        previous = self._previous()
        if previous and previous.get("command") == self.command:
            raise ValueError(
                f"--out {self.path}: holds the output of an earlier `{self.command}` run "
                f"({self.path / first} ...); pass --overwrite to replace it, or choose a new folder"
            )
        raise ValueError(
            f"--out {self.path}: not empty and not written by `{self.command}` (first file: "
            f"{self.path / first}); choose a new or empty folder, or pass --overwrite to write into it"
        )

    def __enter__(self) -> "OutputFolder":
        """Creates the folder and proves it writable (a real write: root and read-only mounts answer
        honestly); with --overwrite, removes what this command wrote there before (the marker's list)."""
        self.check()
        try:
            if not self.path.is_dir():
                self.path.mkdir(parents=True)
                self.created = True
            tempfile.TemporaryFile(dir=self.path).close()
        except OSError as e:
            raise ValueError(f"--out {self.path}: cannot write there ({e.strerror})") from None
        previous = self._previous()
        self._had_marker = (self.path / MARKER).exists()
        if previous and previous.get("command") == self.command:
            for name in previous.get("files", []):
                target = self.path / Path(str(name)).name  # top-level entries only, never outside the folder
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        self._write_marker([])
        return self

    def _write_marker(self, files: Iterable[str]) -> None:
        (self.path / MARKER).write_text(json.dumps({"command": self.command, "files": sorted(set(files))}))

    def finish(self, files: Iterable[str | os.PathLike]) -> None:
        """Records the files written (paths inside the folder; their top-level entries are recorded)."""
        tops = {Path(os.path.relpath(Path(self.path, f), self.path)).parts[0] for f in files}
        self._write_marker(tops)
        self._written = True

    def __exit__(self, exc_type, exc, tb) -> None:
        # A failed command leaves no empty folder it created behind, nor its marker in a folder it wrote
        # nothing into; what it did write stays, marked as its own (a rerun replaces it with --overwrite).
        if exc_type is None:
            return
        rest = [p for p in self.path.iterdir() if p.name != MARKER]
        if not rest and self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif not self.created and not self._written and not self._had_marker:
            (self.path / MARKER).unlink(missing_ok=True)
