"""Input: every image file under SRC/persons/<person_id>/ (local or any Beam filesystem), as `Item`s.

The files are matched inside the pipeline (`fileio.MatchAll`), so the listing of a bucket with millions
of images is not shipped with the job, and redistributed (`Reshuffle`) so the workers share the decoding.
Files with other extensions are not images of the layout and are not read (as `data.format` does).
"""

from __future__ import annotations

import posixpath

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from persongen_jax.data.build.common import Item
from persongen_jax.data.format import IMAGE_EXTENSIONS


def persons_pattern(src: str) -> str:
    """The glob of SRC's image files: SRC/persons/*/* (on any Beam filesystem)."""
    return FileSystems.join(src, "persons", "*", "*")


def to_item(src: str, path: str) -> Item | None:
    """The Item of a matched path, or None for a file that is not an image of the layout."""
    root = FileSystems.join(src, "persons")
    rel = path[len(root):].lstrip("/\\").replace("\\", "/")
    person_id, _, name = rel.partition("/")
    if not person_id or not name or "/" in name or posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        return None
    return Item(image=f"persons/{person_id}/{name}", person_id=person_id, path=path)


class ListImages(beam.PTransform):
    """SRC -> PCollection[Item], one per image file, redistributed over the workers."""

    def __init__(self, src: str):
        super().__init__()
        self.src = src

    def expand(self, pbegin):
        """Create(pattern) -> MatchAll -> Items (images of the layout only) -> Reshuffle."""
        src = self.src
        return (pbegin
                | "Pattern" >> beam.Create([persons_pattern(src)])
                | "Match" >> fileio.MatchAll()
                | "ToItem" >> beam.FlatMap(lambda m: [it] if (it := to_item(src, m.path)) is not None else [])
                | "Spread" >> beam.Reshuffle())
