"""Zarr nodes of a folder or a zip, opened by their paths: no group metadata (.zgroup) is
needed on the way, as the challenge tolerates submissions without it (scoring.md §9). Zips
are read in place, never extracted."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NodeRoot:
    """The nodes below `prefix` ('' or 'x.zarr/') of one store; `root[path]` opens one (the
    `root` that `read_label` takes)."""

    store: Any  # a zarr store; its `path` (the folder or zip) names it in messages
    prefix: str

    def __getitem__(self, path: str) -> Any:
        import zarr

        return zarr.open(self.store, mode="r", path=f"{self.prefix}{path}")


@contextmanager
def open_nodes(location: str | os.PathLike[str], prefix: str = "") -> Iterator[NodeRoot]:
    """The nodes below `prefix` of the folder or zip at `location`, for a `with` block."""
    from zarr.storage import LocalStore, ZipStore

    path = os.fspath(location)
    if os.path.isdir(path):
        yield NodeRoot(LocalStore(path, read_only=True), prefix)
        return
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is neither a zarr folder nor a zip file")
    store = ZipStore(path, mode="r")
    try:
        yield NodeRoot(store, prefix)
    finally:
        store.close()
