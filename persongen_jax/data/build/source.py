"""Input: every image file under SRC/persons/<person_id>/ (local or any Beam filesystem), as `Item`s.

A local SRC is listed by `list_local` without reading or following anything out of SRC: every entry of
a person folder with an image extension is an Item (a symlink, a FIFO, a folder named like an image
too: the decode stage reads only regular files inside SRC and rejects the others with their reason), and
a person folder that is a symlink out of SRC, dangling or in a loop is one Item for the folder (rejected
by decode, nothing under it listed), so nothing in SRC vanishes from the summary. A Beam filesystem URL
(gs://, s3://) is matched inside the pipeline (`fileio.MatchAll`), so the listing of a bucket with
millions of images is not shipped with the job. Either way the Items are redistributed (`Reshuffle`) so
the workers share the decoding. Files with other extensions are not images of the layout and are not
read (as `data.format` does).
"""

from __future__ import annotations

import os
import posixpath

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from persongen_jax.data import format as fmt
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


def list_local(src: str):
    """The Items of a local SRC, person folders and their files in name order (see the module doc)."""
    src_real = os.path.realpath(src)
    try:
        persons = sorted(os.scandir(os.path.join(src, "persons")), key=lambda e: e.name)
    except OSError:
        return
    for person in persons:
        folder = f"persons/{person.name}"
        if person.is_symlink():
            try:
                fmt._inside(src_real, "person folder", folder)  # data.format's rule
                inside = True
            except ValueError:
                inside = False
            if not inside or not os.path.exists(person.path):  # out of SRC, dangling or a loop
                yield Item(image=folder, person_id=person.name, path=person.path)
                continue
        if not person.is_dir():  # a file beside the person folders: not of the layout
            continue
        for entry in sorted(os.scandir(person.path), key=lambda e: e.name):
            if posixpath.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield Item(image=f"{folder}/{entry.name}", person_id=person.name, path=entry.path)


class ListImages(beam.PTransform):
    """SRC -> PCollection[Item], one per image file, redistributed over the workers."""

    def __init__(self, src: str):
        super().__init__()
        self.src = src

    def expand(self, pbegin):
        """Local: Create(SRC) -> list_local; URL: Create(pattern) -> MatchAll -> Items; then Reshuffle."""
        src = self.src
        if "://" not in src:
            items = pbegin | "Source" >> beam.Create([src]) | "ListLocal" >> beam.FlatMap(list_local)
        else:
            items = (pbegin
                     | "Pattern" >> beam.Create([persons_pattern(src)])
                     | "Match" >> fileio.MatchAll()
                     | "ToItem" >> beam.FlatMap(lambda m: [it] if (it := to_item(src, m.path)) is not None else []))
        return items | "Spread" >> beam.Reshuffle()
