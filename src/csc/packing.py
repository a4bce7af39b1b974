"""`csc pack-results` and `csc check-submission`: a challenge submission zip packed from
processed predictions, and checked against the test crop manifest (submission.md §1-§2).

Packing follows the toolkit's `package_submission`: a group ``crop<id>`` for every manifest
crop, one array per manifest row whose label is found under the input template, brought into
the row's space by `csc.alignment.match_crop_space`, written as zarr 2 with the toolkit's
attrs and layout, then zipped. Where the toolkit's ``astype(uint8)`` loses data, csc keeps it
while staying a valid submission (`submission_values`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from csc.alignment import match_crop_space
from csc.config import INSTANCE_CLASSES
from csc.manifests import ScoredCropRow, scored_crop_rows
from csc.storage import (
    LabelArray,
    check_targets,
    check_zip_replaceable,
    read_label,
    staged_group,
    write_label,
    zip_folder,
)

PACK = "pack-results"  # the command named in the csc marker of the zarr and the zip
DEFAULT_INPUT = "data/processed/{dataset}.zarr/{crop}"
DEFAULT_OUTPUT = "data/submission.zarr"
UINT8_MAX = 255


@dataclasses.dataclass(frozen=True)
class PackReport:
    """What `pack_results` wrote: the zarr and zip, the labels packed and those not found."""

    zarr_path: Path
    zip_path: Path
    zip_bytes: int
    num_crops: int
    packed: tuple[str, ...]  # "crop<id>/<label>"
    missing: tuple[str, ...]  # "crop<id>/<label> (not found at <source>)"


def pack_results(
    input_template: str,
    output: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
) -> PackReport:
    """Pack the labels under `input_template` (``{crop}`` and ``{dataset}`` filled per manifest
    row) into the zarr `output` (suffix forced to .zarr) and the zip beside it."""
    zarr_path = Path(output).with_suffix(".zarr")
    zip_path = zarr_path.with_suffix(".zip")
    rows = scored_crop_rows(manifest)
    sources = {row: _source(input_template, row) for row in rows}  # template errors first
    check_targets([zarr_path], PACK, overwrite=overwrite)
    check_zip_replaceable(zip_path, PACK, overwrite=overwrite)
    found = [row for row in rows if sources[row].exists()]
    missing = tuple(
        f"{row.name}/{row.class_label} (not found at {sources[row]})"
        for row in rows
        if row not in found
    )
    if not found:
        raise ValueError(
            f"none of the {len(rows)} test crop labels was found under {input_template} (e.g. "
            f"{sources[rows[0]]}): point -i/--input-search-path at the processed predictions"
        )
    crops = list(dict.fromkeys(row.name for row in rows))
    with staged_group(zarr_path, command=PACK, overwrite=overwrite, standalone=True) as root:
        for crop in crops:
            root.require_group(crop)  # every manifest crop: an empty one scores as missing
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            list(pool.map(lambda row: _pack_row(root, row, sources[row]), found))
    # The root's .zattrs holds only csc's marker, the crops' only {}: the zip has the
    # toolkit's members (.zgroup, and .zarray, .zattrs, chunks per label) and no others.
    leave_out = {".zattrs", *(f"{crop}/.zattrs" for crop in crops)}
    zip_bytes = zip_folder(zarr_path, zip_path, command=PACK, leave_out=leave_out)
    packed = tuple(f"{row.name}/{row.class_label}" for row in found)
    return PackReport(zarr_path, zip_path, zip_bytes, len(crops), packed, missing)


def _source(template: str, row: ScoredCropRow) -> Path:
    """Where `row`'s label is read: the template with {crop} and {dataset} filled, / label."""
    try:
        folder = template.format(crop=row.name, dataset=row.dataset)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"input search path {template!r}: only the placeholders {{crop}} and {{dataset}} "
            f"are filled ({type(error).__name__}: {error})"
        ) from None
    return Path(folder) / row.class_label


def _pack_row(root: Any, row: ScoredCropRow, source: Path) -> None:
    """Read, align and write one manifest row's label into `root`."""
    label = edge_aligned(read_label(source, target_voxel_size=row.voxel_size), row.voxel_size)
    instance = row.class_label in INSTANCE_CLASSES
    aligned = match_crop_space(
        label,
        voxel_size=row.voxel_size,
        shape=row.shape,
        translation=row.translation,
        instance=instance,
    )
    where = f"{row.name}/{row.class_label}"
    values = submission_values(aligned, instance=instance, where=where)
    attrs = {
        "voxel_size": list(row.voxel_size),
        "translation": list(row.translation),
        "shape": list(row.shape),
    }
    write_label(root[row.name], row.class_label, values, attrs=attrs)


def edge_aligned(label: LabelArray, voxel_size: Sequence[float]) -> LabelArray:
    """An OME-NGFF label placed for resampling to `voxel_size` (nm) by voxel edges.

    OME-NGFF translations are voxel 0's centre; resampling (edge to edge) puts the first
    crop-sized voxel's centre half a crop voxel inside the label's first voxel's corner, at
    t - s/2 + v/2. The challenge's alignment uses t itself, which moves a label coarser than
    the crop by floor(s / 2v) - 1 crop voxels (1 voxel for 8 nm on 2 nm crops). Plain arrays
    (the toolkit's attrs) keep the challenge's reading; with s == v nothing changes.
    """
    if not label.centred or label.voxel_size is None or label.translation is None:
        return label
    z, y, x = (
        t - s / 2 + v / 2
        for t, s, v in zip(label.translation, label.voxel_size, voxel_size, strict=True)
    )
    return dataclasses.replace(label, translation=(z, y, x))


def submission_values(aligned: np.ndarray, *, instance: bool, where: str) -> np.ndarray:
    """The values csc writes for an aligned label: uint8 where the toolkit's cast loses
    nothing (the same bytes); otherwise what the scorer reads the same way, without loss."""
    if aligned.dtype == bool:
        return aligned.astype(np.uint8)
    if not instance:
        if _fits_uint8(aligned):
            return aligned.astype(np.uint8)
        threshold = 0.5 if aligned.dtype.kind == "f" else 0  # a probability map, or ids
        return (aligned > threshold).astype(np.uint8)
    if aligned.dtype.kind == "f" and not bool(np.all(np.mod(aligned, 1) == 0)):
        warnings.warn(
            f"{where}: an instance class with non-integer values; written as foreground "
            "above 0.5 (the scorer splits it by connected components); write integer ids",
            stacklevel=2,
        )
        return (aligned > 0.5).astype(np.uint8)
    if _fits_uint8(aligned):
        return aligned.astype(np.uint8)
    return _compact_ids(aligned, where)


def _fits_uint8(values: np.ndarray) -> bool:
    """Whether the cast to uint8 keeps every value (integers in 0..255)."""
    if values.size == 0:
        return True
    if values.dtype.kind == "f" and not bool(np.all(np.mod(values, 1) == 0)):
        return False
    return bool(values.min() >= 0 and values.max() <= UINT8_MAX)


def _compact_ids(ids: np.ndarray, where: str) -> np.ndarray:
    """Instance ids renumbered 1..N in ascending order (0 stays background), in uint8 when
    N <= 255, else in the smallest unsigned type that holds N (with a warning)."""
    unique, inverse = np.unique(ids, return_inverse=True)
    nonzero = unique != 0
    numbers = np.where(nonzero, np.cumsum(nonzero), 0)  # a value's rank among the non-zero
    count = int(nonzero.sum())
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if count <= np.iinfo(t).max)
    if dtype is not np.uint8:
        warnings.warn(
            f"{where}: {count} instances do not fit uint8; written as {np.dtype(dtype).name} "
            "ids 1..N (the scorer reads any integer type; the toolkit's pack-results would "
            "wrap them modulo 256)",
            stacklevel=2,
        )
    return numbers[inverse].reshape(ids.shape).astype(dtype)
