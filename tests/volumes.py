"""Coordinate-valued OME-NGFF test volumes, and the specs, crops and datasets built on them.

Every stored value names its own voxel: ``z * 10000 + y * 100 + x`` (plus an offset that tells
levels apart), so a patch read one voxel off, or with two axes swapped, shows as a wrong number.
Groups are zarr v2 with real OME-NGFF ``multiscales`` and CellMap annotation attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from csc.config import ArrayInfo
from csc.data.datasets import Crop, PatchSpec
from csc.data.loaders import load_crops
from csc.datasplit import DatasplitRow
from csc.storage import annotation_attrs, multiscales_attrs, write_array

RAW_PATH = "recon-1/em/raw"
GT_PATH = "recon-1/labels/groundtruth"
CHUNKS = (8, 8, 8)  # small chunks: patches cross chunk boundaries


def coordinates(shape: Sequence[int], *, dtype: Any = np.float32, offset: int = 0) -> np.ndarray:
    """A volume whose value at voxel (z, y, x) is ``offset + z * 10000 + y * 100 + x``."""
    z, y, x = np.indices(tuple(shape), dtype=np.int64)
    return (offset + z * 10000 + y * 100 + x).astype(dtype)


def coordinate_value(z: Any, y: Any, x: Any, *, offset: float = 0) -> Any:
    """The coordinate function at (possibly fractional) voxel positions: what linear
    interpolation of a `coordinates` volume returns anywhere inside it."""
    return offset + np.asarray(z) * 10000 + np.asarray(y) * 100 + np.asarray(x)


def checkerboard(shape: Sequence[int]) -> np.ndarray:
    """A 0/1 uint8 mask, ``(z + y + x) % 2``: one voxel off on any axis flips every value."""
    z, y, x = np.indices(tuple(shape))
    return ((z + y + x) % 2).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class LevelArray:
    """One level to write: its data, voxel size (nm) and voxel-0 centre (nm), (z, y, x)."""

    data: np.ndarray
    scale: tuple[float, float, float]
    translation: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class LabelGroup:
    """A label group: its levels s0, s1, ... and the CellMap encoding written on each array.

    `encoding` replaces CellMap's ``{"absent": 0, "present": 1}``; without `counts` the arrays
    carry no ``complement_counts`` (foreground voxels then have to be counted from the data)."""

    levels: tuple[LevelArray, ...]
    encoding: Mapping[str, int] | None = None
    counts: bool = True


def write_group(
    path: Path, levels: Sequence[LevelArray], *, label: LabelGroup | None = None
) -> None:
    """A multiscale group at `path` with arrays s0, s1, ... (labels: with annotation attrs)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.attrs.update(multiscales_attrs(path.name, [(lv.scale, lv.translation) for lv in levels]))
    for n, level in enumerate(levels):
        attrs = None
        if label is not None:
            attrs = label_attrs(path.name, level.data, label)
        write_array(group, f"s{n}", level.data, chunks=CHUNKS, compressor="zstd", attrs=attrs)


def label_attrs(name: str, data: np.ndarray, label: LabelGroup) -> dict[str, Any]:
    """CellMap annotation attrs; complement_counts counts every state but "present"."""
    attrs = annotation_attrs(name, int(data.size - np.count_nonzero(data)))
    annotation = attrs["cellmap"]["annotation"]
    if label.encoding is not None:
        encoding = dict(label.encoding)
        annotation["annotation_type"]["encoding"] = encoding
        annotation["complement_counts"] = {
            state: int(np.count_nonzero(data == value))
            for state, value in encoding.items()
            if state != "present"
        }
    if not label.counts:
        del annotation["complement_counts"]
    return attrs


def write_dataset(
    root: Path, raw: Sequence[LevelArray], crops: Mapping[str, Mapping[str, LabelGroup]]
) -> Path:
    """A store at `root` (``.../name.zarr``): the raw group and ``{crop: {class: labels}}``."""
    write_group(root / RAW_PATH, raw)
    for crop, classes in crops.items():
        for name, label in classes.items():
            write_group(root / GT_PATH / crop / name, label.levels, label=label)
    return root


def rows_for(
    root: Path, crops: Mapping[str, Sequence[str]], *, usage: str = "train"
) -> list[DatasplitRow]:
    """Datasplit rows of a `write_dataset` store: ``{crop: classes annotated in the row}``."""
    return [
        DatasplitRow(usage, str(root), RAW_PATH, str(root), f"{GT_PATH}/{crop}", tuple(classes))
        for crop, classes in crops.items()
    ]


def patch_spec(
    input_shape: Sequence[int],
    input_scale: Sequence[float],
    target_shape: Sequence[int] | None = None,
    target_scale: Sequence[float] | None = None,
) -> PatchSpec:
    """The spec of `ArrayInfo`s as a config gives them; the target defaults to the input."""
    target_shape = input_shape if target_shape is None else target_shape
    target_scale = input_scale if target_scale is None else target_scale
    return PatchSpec.from_arrays(
        ArrayInfo(tuple(input_shape), tuple(input_scale)),
        ArrayInfo(tuple(target_shape), tuple(target_scale)),
    )


def crops_for(rows: Sequence[DatasplitRow], classes: Sequence[str], spec: PatchSpec) -> list[Crop]:
    return load_crops(rows, classes, spec)


# --- The standard aligned dataset ------------------------------------------------------------

# Raw: 8 nm, voxel 0 centred at RAW_ORIGIN, float32 coordinate values (stored values come back
# bit for bit). Label crop "crop1" starts at raw voxel CROP_OFFSET: its 4 nm s0 voxel 0 is
# centred at RAW_ORIGIN + 8 * CROP_OFFSET - 2, so two label voxels split each raw voxel, and
# its 8 nm s1 (translation + 2) sits exactly on the raw voxels.
RAW_SHAPE = (20, 30, 40)
RAW_SCALE = (8.0, 8.0, 8.0)
RAW_ORIGIN = (4.0, 12.0, -20.0)
CROP_OFFSET = (4, 6, 8)  # raw voxels
LABEL_SHAPE = (16, 24, 24)  # 4 nm voxels: 8 x 12 x 12 raw voxels
S0_IDS, S1_IDS = 1_000_000, 2_000_000  # offsets telling label levels apart


def label_origin(offset: Sequence[int] = CROP_OFFSET) -> tuple[float, float, float]:
    """The 4 nm voxel-0 centre of a crop starting at raw voxel `offset`."""
    z, y, x = (o + 8 * k - 2 for o, k in zip(RAW_ORIGIN, offset, strict=True))
    return (z, y, x)


def raw_centre(index: Sequence[float]) -> np.ndarray:
    """World position (nm) of raw voxel `index` (fractional indices allowed)."""
    return np.asarray(RAW_ORIGIN) + np.asarray(index, dtype=float) * np.asarray(RAW_SCALE)


def write_aligned(root: Path) -> Path:
    """The standard store: raw, and crop1 with classes "ids" (coordinate ids: s0 at 4 nm with
    offset S0_IDS, s1 at 8 nm with offset S1_IDS) and "mask" (a 4 nm checkerboard, s0 only)."""
    origin = label_origin()
    s1_origin = tuple(t + 2 for t in origin)
    ids = LabelGroup(
        (
            LevelArray(
                coordinates(LABEL_SHAPE, dtype=np.uint32, offset=S0_IDS), (4.0,) * 3, origin
            ),
            LevelArray(
                coordinates([n // 2 for n in LABEL_SHAPE], dtype=np.uint32, offset=S1_IDS),
                (8.0,) * 3,
                s1_origin,
            ),
        )
    )
    mask = LabelGroup((LevelArray(checkerboard(LABEL_SHAPE), (4.0,) * 3, origin),))
    raw = [LevelArray(coordinates(RAW_SHAPE), RAW_SCALE, RAW_ORIGIN)]
    return write_dataset(root, raw, {"crop1": {"ids": ids, "mask": mask}})
