"""The challenge's manifests, shipped with csc as package data, and their readers.

- ``tested_classes.csv``: the classes the challenge scores, one name a line;
- ``test_crop_manifest.csv``: one row per scored (test crop, class): its dataset and the target
  space (voxel size and translation in nm, shape in voxels, each ``[z;y;x]``);
- ``classes.csv``: class name, id and the atomic ids a composite class includes.

This module imports nothing of csc, so any layer may read the manifests.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
from importlib import resources

Vec3 = tuple[float, float, float]


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


@functools.cache
def scored_crop_rows() -> tuple[ScoredCropRow, ...]:
    """Every row of the test crop manifest (the scored crops and classes), in its order."""
    reader = csv.DictReader(io.StringIO(read_text("test_crop_manifest.csv")))
    return tuple(
        ScoredCropRow(
            int(row["crop_name"]),
            row["dataset"],
            row["class_label"],
            _floats(row["voxel_size"]),
            _floats(row["translation"]),
            _ints(row["shape"]),
        )
        for row in reader
    )


def _floats(text: str) -> Vec3:
    """``[z;y;x]`` as floats."""
    z, y, x = (float(v) for v in text.strip().strip("[]").split(";"))
    return (z, y, x)


def _ints(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.strip().strip("[]").split(";"))
    return (z, y, x)
