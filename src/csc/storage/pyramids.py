"""Multiscale pyramids: levels s1, s2, ... of a zarr group, each 2x coarser on every axis than
the one before, computed block by block from it (memory bounded by the block, not the volume).

Probabilities and raw are averaged over each 2x2x2 block; labels take the block's most
frequent value (ties to the larger: foreground over background), so ids are kept, never mixed.
An odd last row, column or slice is dropped: level n+1 has ``floor(size / 2)`` voxels per axis.
Placement (OME-NGFF, nm): `csc.storage.metadata.level_transforms`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from csc.storage.arrays import blocks, create_array

PYRAMID_MIN_SIDE = 32  # voxels: no level whose longest side would be shorter than this
MAX_LEVELS = 8  # s0 to s7: 128x coarser at most
Method = Literal["mean", "mode"]


def pyramid_levels(shape: Sequence[int]) -> int:
    """How many levels (s0 included) a pyramid over an s0 of `shape` (z, y, x) gets: halving
    stops before the longest side drops below PYRAMID_MIN_SIDE or any side below 1 voxel,
    and at MAX_LEVELS."""
    sides, count = [int(n) for n in shape], 1
    while count < MAX_LEVELS:
        sides = [n // 2 for n in sides]
        if min(sides) < 1 or max(sides) < PYRAMID_MIN_SIDE:
            break
        count += 1
    return count


def downsample_2x(data: np.ndarray, method: Method) -> np.ndarray:
    """One 2x2x2 downsampling of `data` (z, y, x): "mean" (rounded for integers) or "mode";
    odd edges dropped; the dtype is kept."""
    even = data[tuple(slice(0, (n // 2) * 2) for n in data.shape)]
    z, y, x = (n // 2 for n in even.shape)
    cells = even.reshape(z, 2, y, 2, x, 2).transpose(0, 2, 4, 1, 3, 5).reshape(z, y, x, 8)
    if method == "mode":
        return _mode(cells.reshape(-1, 8)).reshape(z, y, x)
    mean = cells.astype(np.float32).mean(axis=-1)
    if np.issubdtype(data.dtype, np.integer):
        mean = np.rint(mean)
    return mean.astype(data.dtype)


def _mode(cells: np.ndarray) -> np.ndarray:
    """Per row of 8 values, the most frequent one; among equally frequent, the largest. Rows
    of one value (most of a label volume) are answered without sorting."""
    out = cells[:, 0].copy()
    mixed = np.flatnonzero((cells != cells[:, :1]).any(axis=1))
    if mixed.size:
        out[mixed] = _mode_of_mixed(cells[mixed])
    return out


def _mode_of_mixed(cells: np.ndarray) -> np.ndarray:
    ordered = np.sort(cells, axis=1)
    counts = (ordered[:, :, None] == ordered[:, None, :]).sum(axis=2)  # (N, 8): each's count
    last_max = 7 - np.argmax(counts[:, ::-1], axis=1)  # sorted ascending: the largest of ties
    return ordered[np.arange(len(ordered)), last_max]


def write_pyramid(
    group: Any,
    num_levels: int,
    *,
    method: Method,
    block_shape: Sequence[int],
    compressor: str = "zstd",
) -> None:
    """Arrays s1 .. s{num_levels - 1} of the zarr `group` from its s0, each from the level
    before, read `block_shape` voxels at a time; chunks as s0's (capped at the level's size)."""
    previous = group["s0"]
    for n in range(1, num_levels):
        shape = tuple(size // 2 for size in previous.shape)
        chunks = tuple(min(c, s) for c, s in zip(previous.chunks, shape, strict=True))
        level = create_array(
            group, f"s{n}", shape=shape, chunks=chunks, dtype=previous.dtype, compressor=compressor
        )
        half = tuple(max(1, b // 2) for b in block_shape)  # reads about one block_shape
        for box in blocks(shape, half):
            source = tuple(slice(2 * part.start, 2 * part.stop) for part in box)
            level[box] = downsample_2x(np.asarray(previous[source]), method)
        previous = level
