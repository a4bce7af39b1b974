"""The challenge's manifests, shipped with csc as package data, and their readers.

- ``tested_classes.csv``: the classes the challenge scores, one name a line;
- ``test_crop_manifest.csv``: one row per scored (test crop, class): its dataset and the target
  space (voxel size and translation in nm, shape in voxels, each ``[z;y;x]``);
- ``classes.csv``: class name, id and the atomic ids a composite class includes;
- ``manifest.csv``: one row per training crop: its number, dataset (``collection``), alignment
  and the bucket URLs of its ground-truth group and of its dataset's EM group (csc fetch-data).

The test crop manifest can be replaced by the user's own: a path given to `scored_crop_rows`
(the ``--test-crop-manifest`` options) or the challenge's variable ``CSC_TEST_CROP_MANIFEST_URL``
(a local path or ``file://`` URL; csc reads no web address). The training crop manifest, the
same way: `training_crop_rows` (``--manifest``) or ``CSC_FETCH_DATA_MANIFEST_URL``.

This module imports nothing of csc, so any layer may read the manifests.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

Vec3 = tuple[float, float, float]
MANIFEST_VARIABLE = "CSC_TEST_CROP_MANIFEST_URL"  # the challenge's name for the override
COLUMNS = ("crop_name", "dataset", "class_label", "voxel_size", "translation", "shape")
FETCH_MANIFEST_VARIABLE = "CSC_FETCH_DATA_MANIFEST_URL"  # the challenge's name, for fetch-data
FETCH_COLUMNS = ("crop_number", "collection", "alignment", "crop_url", "em_url")


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


@dataclasses.dataclass(frozen=True)
class TestCrop:
    """A test crop as the challenge toolkit merges its manifest rows: the smallest voxel size
    and translation and the largest shape over its classes, (z, y, x)."""

    __test__ = False  # a data class, not a pytest test class

    id: int
    dataset: str
    class_labels: tuple[str, ...]
    voxel_size: Vec3  # nm
    translation: Vec3  # nm, the world position of voxel 0 (its centre, as csc reads OME-NGFF)
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


def manifest_source(
    manifest: str | os.PathLike[str] | None = None,
    *,
    variable: str = MANIFEST_VARIABLE,
    option: str = "--test-crop-manifest",
    what: str = "test crop manifest",
) -> Path | None:
    """The manifest in use: `manifest`, else $`variable` (a local path or file:// URL), else
    None (the one shipped with csc). Defaults: the test crop manifest."""
    chosen = manifest if manifest is not None else os.environ.get(variable) or None
    if chosen is None:
        return None
    text = os.fspath(chosen)
    if "://" in text and not text.startswith("file://"):  # a web or bucket address
        raise ValueError(
            f"{what} {text}: csc reads a local file; download it and pass its path "
            f"({option} or {variable})"
        )
    path = Path(text.removeprefix("file://")).expanduser()
    if not path.is_file():
        where = option if manifest is not None else variable
        raise FileNotFoundError(f"{what} {path} ({where}) does not exist")
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


def scored_crops(manifest: str | os.PathLike[str] | None = None) -> tuple[TestCrop, ...]:
    """The test crops of the manifest in use (`scored_crop_rows`), one per crop id, in id
    order, each merged over its rows."""
    by_id: dict[int, list[ScoredCropRow]] = {}
    for row in scored_crop_rows(manifest):
        by_id.setdefault(row.id, []).append(row)
    return tuple(_merge(rows) for _, rows in sorted(by_id.items()))


def _merge(rows: list[ScoredCropRow]) -> TestCrop:
    def smallest(values: list[Vec3]) -> Vec3:
        z, y, x = (min(axis) for axis in zip(*values, strict=True))
        return (z, y, x)

    z, y, x = (max(axis) for axis in zip(*(r.shape for r in rows), strict=True))
    return TestCrop(
        rows[0].id,
        rows[0].dataset,
        tuple(row.class_label for row in rows),
        smallest([r.voxel_size for r in rows]),
        smallest([r.translation for r in rows]),
        (z, y, x),
    )


def manifest_name(manifest: str | os.PathLike[str] | None = None) -> str:
    """The test crop manifest in use, as messages name it."""
    path = manifest_source(manifest)
    return "csc's test_crop_manifest.csv" if path is None else str(path)


@functools.cache
def _read_rows(path: Path, _mtime: int, _size: int) -> tuple[ScoredCropRow, ...]:
    return _parse(path.read_text(encoding="utf-8"), str(path))


def _reader(text: str, what: str, columns: Sequence[str], note: str = "") -> csv.DictReader[str]:
    """The rows of a manifest's CSV text, refused naming `what` if it lacks a column."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(
            f"{what} lacks the column(s) {', '.join(missing)}; it needs {','.join(columns)}{note}"
        )
    return reader


@functools.cache
def _parse(text: str, source: str) -> tuple[ScoredCropRow, ...]:
    reader = _reader(text, f"test crop manifest {source}", COLUMNS, " with vectors written [z;y;x]")
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


# --- The training crop manifest (manifest.csv): where fetch-data finds each crop ------------


@dataclasses.dataclass(frozen=True)
class TrainingCropRow:
    """One row of manifest.csv: a training crop and the bucket URLs of its data."""

    id: int
    dataset: str  # the manifest's "collection"
    alignment: str  # "recon-1"
    crop_url: str  # the crop's ground-truth group (all its classes)
    em_url: str  # the dataset's EM multiscale group

    @property
    def name(self) -> str:
        return f"crop{self.id}"


def fetch_manifest_source(manifest: str | os.PathLike[str] | None = None) -> Path | None:
    """The training crop manifest in use: `manifest`, else $CSC_FETCH_DATA_MANIFEST_URL, else
    None (csc's manifest.csv)."""
    return manifest_source(
        manifest, variable=FETCH_MANIFEST_VARIABLE, option="--manifest", what="crop manifest"
    )


def training_crop_rows(
    manifest: str | os.PathLike[str] | None = None,
) -> tuple[TrainingCropRow, ...]:
    """Every training crop of the crop manifest in use, in its order: `manifest`, else
    $CSC_FETCH_DATA_MANIFEST_URL, else the manifest.csv shipped with csc."""
    path = fetch_manifest_source(manifest)
    if path is None:
        return _parse_training(read_text("manifest.csv"), "csc's manifest.csv")
    return _parse_training(path.read_text(encoding="utf-8"), str(path))


@functools.cache
def _parse_training(text: str, source: str) -> tuple[TrainingCropRow, ...]:
    reader = _reader(text, f"crop manifest {source}", FETCH_COLUMNS)
    rows = []
    for line, row in enumerate(reader, start=2):
        try:
            number = int(row["crop_number"].strip().removeprefix("crop"))
        except (ValueError, AttributeError):
            raise ValueError(
                f"crop manifest {source}, line {line}: crop_number {row['crop_number']!r} is "
                "not a number"
            ) from None
        urls = (row["crop_url"].strip().rstrip("/"), row["em_url"].strip().rstrip("/"))
        rows.append(TrainingCropRow(number, row["collection"].strip(), row["alignment"], *urls))
    return tuple(rows)
