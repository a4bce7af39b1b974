"""Label arrays read as the CellMap challenge reads a submitted (or packed) label node.

A label node is one of (submission.md §1, scoring.md §2.1):
- a plain zarr array, its voxel size from the first of the attrs ``voxel_size``,
  ``resolution``, ``scale`` and its translation from ``translation`` or ``offset``;
- a non-OME group of arrays ``s0, s1, ...``, one picked by the toolkit's level score;
- an OME-NGFF group (``multiscales``), such as csc's own ``{class}`` outputs: the level is
  the one csc's loader and the toolkit's data library pick (the coarsest level not coarser
  than the target on any axis, else the finest), placed by its ``coordinateTransformations``.

Sizes and positions are nm, (z, y, x); either may be missing (None). Zarr v2 and v3 stores,
folders or zips (read in place, never extracted), are read through zarr.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from csc.storage.metadata import Level, choose_level, ome_attrs, parse_multiscales

Vec3 = tuple[float, float, float]
VOXEL_SIZE_KEYS = ("voxel_size", "resolution", "scale")
TRANSLATION_KEYS = ("translation", "offset")
COARSER_PENALTY = 1e6  # added to a level's score when any axis is coarser than the target
UNKNOWN_SCORE = 1e18  # the score of a level without a voxel size
LEVEL_NAME = re.compile(r"s(\d+)")


@dataclass(frozen=True)
class LabelArray:
    """One label's voxels with the placement the challenge reads for them (nm, (z, y, x))."""

    data: np.ndarray
    voxel_size: Vec3 | None
    translation: Vec3 | None
    path: str  # where it was read (a folder path, or "<zip>/<path inside>"), for messages
    # True for OME-NGFF levels, whose translation is the centre of voxel 0 (csc's outputs);
    # the challenge reads every translation alike, which shifts a coarse level's resampling.
    centred: bool = False


def open_label_root(location: str | os.PathLike[str]) -> Any:
    """The zarr group at `location`: a folder, or a .zip read in place (its root must be the
    zarr root); FileNotFoundError or ValueError naming it when it cannot be opened."""
    import zarr
    from zarr.storage import ZipStore

    path = os.fspath(location)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(path):
        return zarr.open_group(path, mode="r")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is neither a zarr folder nor a zip file")
    return zarr.open_group(ZipStore(path, mode="r"), mode="r")


def read_label(
    path: str | os.PathLike[str], *, target_voxel_size: Sequence[float], root: Any | None = None
) -> LabelArray:
    """The label node at `path` (inside the group `root` from `open_label_root` if given,
    else a local folder path), at the level chosen for `target_voxel_size` (nm)."""
    import zarr

    where = _where(path, root)
    try:
        if root is None:
            node = zarr.open(os.fspath(path), mode="r")
        else:
            node = root[os.fspath(path).strip("/")]
    except (FileNotFoundError, KeyError):
        raise FileNotFoundError(f"no zarr array or group at {where}") from None
    target = _vec3(target_voxel_size, f"target voxel size for {where}")
    if isinstance(node, zarr.Array):
        return _plain(node, where)
    attrs = dict(node.attrs)
    if "multiscales" in ome_attrs(attrs):
        return _ome_level(node, attrs, target, where)
    return _plain_level(node, target, where)


def _where(path: str | os.PathLike[str], root: Any | None) -> str:
    if root is None:
        return os.fspath(path)
    store = getattr(getattr(root, "store", None), "path", None)
    return f"{store}/{os.fspath(path).strip('/')}" if store else os.fspath(path)


def _plain(array: Any, where: str) -> LabelArray:
    """A plain array with its own attributes."""
    attrs = dict(array.attrs)
    return LabelArray(
        np.asarray(array[...]),
        _first_vec3(attrs, VOXEL_SIZE_KEYS, where),
        _first_vec3(attrs, TRANSLATION_KEYS, where),
        where,
    )


def _plain_level(group: Any, target: Vec3, where: str) -> LabelArray:
    """The level array of a non-OME group with the lowest score (scoring.md §2.1)."""
    levels = sorted(
        (int(found.group(1)), name)
        for name in group.array_keys()
        if (found := LEVEL_NAME.fullmatch(name))
    )
    if not levels:
        raise ValueError(
            f"{where} is a zarr group with neither OME-NGFF 'multiscales' nor level arrays "
            "s0, s1, ...: point at the label's array"
        )
    scored = [(_level_score(group[name], target, where), name) for _, name in levels]
    best = min(scored, key=lambda item: item[0])[1]  # the first level among equal scores
    return _plain(group[best], f"{where}/{best}")


def _level_score(array: Any, target: Vec3, where: str) -> float:
    """|level - target| (nm), plus a penalty if any axis is coarser; no voxel size: 1e18."""
    voxel_size = _first_vec3(dict(array.attrs), VOXEL_SIZE_KEYS, where)
    if voxel_size is None:
        return UNKNOWN_SCORE
    level, wanted = np.asarray(voxel_size), np.asarray(target)
    score = float(np.linalg.norm(level - wanted))
    return score + COARSER_PENALTY if bool(np.any(level > wanted)) else score


def _ome_level(group: Any, attrs: dict[str, Any], target: Vec3, where: str) -> LabelArray:
    """The OME-NGFF level for `target`, placed by its coordinateTransformations."""
    level: Level = choose_level(parse_multiscales(attrs, where), target)
    try:
        array = group[level.path]
    except KeyError:
        raise FileNotFoundError(f"{where}: 'multiscales' names {level.path}, not found") from None
    return LabelArray(
        np.asarray(array[...]),
        level.scale,
        level.translation,
        f"{where}/{level.path}",
        centred=True,
    )


def _first_vec3(attrs: dict[str, Any], keys: Sequence[str], where: str) -> Vec3 | None:
    for key in keys:
        if key in attrs:
            return _vec3(attrs[key], f"{where} attribute {key!r}")
    return None


def _vec3(values: Any, what: str) -> Vec3:
    try:
        z, y, x = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be 3 numbers (z, y, x) in nm, got {values!r}") from None
    return (z, y, x)


def write_label(group: Any, name: str, data: np.ndarray, *, attrs: dict[str, Any]) -> None:
    """`data` as the zarr-2 array `name` in `group`, laid out as the challenge's pack-results
    writes it: zarr's default chunks, Blosc(lz4, 5, shuffle), C order, fill 0, keys z.y.x."""
    from csc.storage.arrays import make_compressor

    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks="auto",
        compressors=make_compressor("blosc-lz4"),
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "."},
    )
    array[...] = data
    array.attrs.update(attrs)
