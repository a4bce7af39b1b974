"""The challenge's manifests, shipped with csc as package data, and their readers.

- ``tested_classes.csv``: the classes the challenge scores, one name a line;
- ``test_crop_manifest.csv``: one row per scored (test crop, class): its dataset and the target
  space (voxel size and translation in nm, shape in voxels, each ``[z;y;x]``);
- ``classes.csv``: class name, id and the atomic ids a composite class includes.

The test crop manifest can be replaced by the user's own: a path given to `test_crop_rows`
(the ``--test-crop-manifest`` options) or the challenge's variable ``CSC_TEST_CROP_MANIFEST_URL``
(a local path or ``file://`` URL; csc reads no web address).

This module imports nothing of csc, so any layer may read the manifests.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
from importlib import resources
from pathlib import Path

Vec3 = tuple[float, float, float]
MANIFEST_VARIABLE = "CSC_TEST_CROP_MANIFEST_URL"  # the challenge's name for the override
COLUMNS = ("crop_name", "dataset", "class_label", "voxel_size", "translation", "shape")


@dataclasses.dataclass(frozen=True)
class ScoredCropRow:
    """One row of the test crop manifest: a (crop, class) and its target space, (z, y, x)."""

    id: int
    dataset: str
    class_label: str
    voxel_size: Vec3  # nm
    translation: Vec3  # nm, the world position of the corner voxel
    shape: tuple[int, int, int]  # voxels

    @property
    def name(self) -> str:
        return f"crop{self.id}"


def read_text(name: str) -> str:
    """The text of a shipped manifest, e.g. ``tested_classes.csv``."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@functools.cache
def scored_classes() -> tuple[str, ...]:
    """The classes the challenge scores, in the manifest's order."""
    lines = read_text("tested_classes.csv").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def manifest_source(manifest: str | os.PathLike[str] | None = None) -> Path | None:
    """The test crop manifest in use: `manifest`, else $CSC_TEST_CROP_MANIFEST_URL, else None
    (the one shipped with csc)."""
    chosen = manifest if manifest is not None else os.environ.get(MANIFEST_VARIABLE) or None
    if chosen is None:
        return None
    text = os.fspath(chosen)
    if "://" in text and not text.startswith("file://"):  # a web or bucket address
        raise ValueError(
            f"test crop manifest {text}: csc reads a local file; download it and pass its path "
            f"(--test-crop-manifest or {MANIFEST_VARIABLE})"
        )
    path = Path(text.removeprefix("file://")).expanduser()
    if not path.is_file():
        where = "--test-crop-manifest" if manifest is not None else MANIFEST_VARIABLE
        raise FileNotFoundError(f"test crop manifest {path} ({where}) does not exist")
    return path


def scored_crop_rows(
    manifest: str | os.PathLike[str] | None = None,
) -> tuple[ScoredCropRow, ...]:
    """Every row (a scored test crop and class) of the test crop manifest in use, in its order:
    `manifest`, else $CSC_TEST_CROP_MANIFEST_URL, else the one shipped with csc."""
    path = manifest_source(manifest)
    if path is None:
        return _parse(read_text("test_crop_manifest.csv"), "csc's test_crop_manifest.csv")
    stat = path.stat()  # the cache key: an edited file is read again
    return _read_rows(path, stat.st_mtime_ns, stat.st_size)


@functools.cache
def _read_rows(path: Path, _mtime: int, _size: int) -> tuple[ScoredCropRow, ...]:
    return _parse(path.read_text(encoding="utf-8"), str(path))


@functools.cache
def _parse(text: str, source: str) -> tuple[ScoredCropRow, ...]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(
            f"test crop manifest {source} lacks the column(s) {', '.join(missing)}; it needs "
            f"{','.join(COLUMNS)} with vectors written [z;y;x]"
        )
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            rows.append(
                ScoredCropRow(
                    int(row["crop_name"].removeprefix("crop")),
                    row["dataset"],
                    row["class_label"],
                    _floats(row["voxel_size"]),
                    _floats(row["translation"]),
                    _ints(row["shape"]),
                )
            )
        except (ValueError, AttributeError) as error:
            raise ValueError(
                f"test crop manifest {source}, line {line}: {error}; vectors are [z;y;x]"
            ) from None
    return tuple(rows)


def _floats(text: str) -> Vec3:
    """``[z;y;x]`` as floats."""
    z, y, x = (float(v) for v in text.strip().strip("[]").split(";"))
    return (z, y, x)


def _ints(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.strip().strip("[]").split(";"))
    return (z, y, x)
