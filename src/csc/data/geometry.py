"""Planning how to read a patch: world coordinates in, a box of source voxels and a map out.

A sample places an output grid (shape in voxels, voxel size in nm) in the world: its centre, and
a 3x3 matrix ``M`` (rotation, mirror and transpose) applied to offsets from the centre, all in
(z, y, x) order. Output voxel ``i`` sits at ``centre + M @ ((i - (n - 1) / 2) * voxel_size)``,
which in a level's voxel index space is the affine map ``A @ i + b`` (`source_map`).

Two kinds of plan (`plan_read`): when ``M`` only permutes and flips axes, each output axis
samples one source axis, and a box is indexed axis by axis (exact: an integer position returns
the stored value itself, bit for bit); otherwise (rotations) the plan holds a box around every
output voxel's source position and the map into it. When a rotation leaves one axis alone,
the patch is a stack of 2D slices along it (`_aligned_axis`). `csc.data.sampling` carries the
plans out. Raw is linear, labels nearest (ties round half up).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from types import EllipsisType

import numpy as np

EPS = 1e-6  # voxels: positions this close to an integer are that integer


@dataclasses.dataclass(frozen=True)
class Grid:
    """An output grid: shape (voxels) and voxel size (nm), both (z, y, x)."""

    shape: tuple[int, int, int]
    scale: tuple[float, float, float]

    @property
    def extent(self) -> np.ndarray:
        """Size in nm along each axis."""
        return np.asarray(self.shape) * np.asarray(self.scale)


@dataclasses.dataclass(frozen=True)
class Inside:
    """Which output voxels lie inside the array: those within `box` (per output axis (z, y,
    x), a range [low, high) of indices) where `mask` (broadcastable to the output shape) is
    true. Patches leaving a crop's labels are cut off by whole slabs: filling those is far
    cheaper than a voxel-by-voxel mask over the whole patch."""

    box: tuple[tuple[int, int], ...]
    mask: np.ndarray | None = None

    @property
    def cut(self) -> tuple[slice, ...]:
        """The box as slices of the output."""
        return tuple(slice(low, high) for low, high in self.box)

    def fill_outside(self, out: np.ndarray, value: float) -> None:
        """Set the voxels of `out` (..., Z, Y, X) outside the array to `value`."""
        inner: list[slice] = []
        key: tuple[EllipsisType | slice, ...]  # (..., z, y, x) slices of `out`
        for axis, (low, high) in enumerate(self.box):  # axes before this one: cut to the box
            tail = [slice(None)] * (2 - axis)
            if low > 0:
                key = (Ellipsis, *inner, slice(None, low), *tail)
                out[key] = value
            if high < out.shape[out.ndim - 3 + axis]:
                key = (Ellipsis, *inner, slice(high, None), *tail)
                out[key] = value
            inner.append(slice(low, high))
        if self.mask is not None:
            cut = tuple(
                s if n > 1 else slice(None) for s, n in zip(inner, self.mask.shape, strict=True)
            )
            key = (Ellipsis, *inner)
            np.copyto(out[key], value, where=~self.mask[cut])


def true_run(inside: np.ndarray) -> tuple[int, int]:
    """[low, high) of the true run in a 1D mask whose true values are contiguous."""
    where = np.flatnonzero(inside)
    return (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)


def source_map(
    grid: Grid,
    centre: np.ndarray,
    matrix: np.ndarray,
    scale: Sequence[float],
    translation: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with source voxel index = A @ output index + b, for a level (scale, translation)."""
    out_scale, src_scale = np.asarray(grid.scale), np.asarray(scale, dtype=float)
    a = matrix * out_scale[None, :] / src_scale[:, None]
    half = (np.asarray(grid.shape) - 1) / 2
    b = (centre - np.asarray(translation, dtype=float)) / src_scale - a @ half
    return a, b


@dataclasses.dataclass
class Plan:
    """How to read one output grid from a level: the box to read and how to sample it."""

    # Three entries each, (z, y, x); typed as variable-length tuples because they are built
    # with tuple() from lists (per sample: a fixed-length literal would be different work).
    start: tuple[int, ...]  # box in source voxels, may exceed the array
    stop: tuple[int, ...]
    valid: Inside | None  # output voxels inside the array (None: everywhere)
    perm: tuple[int, ...] | None = None  # exact path: output axis j reads source perm[j]
    index: list[np.ndarray | slice] | None = None  # per output axis, into the permuted box
    upper: list[np.ndarray] | None = None  # linear: second index and weight per output axis
    weight: list[np.ndarray] | None = None
    grid: np.ndarray | None = None  # rotated: (k, k + 1) map, output index -> box voxel position
    linear: bool = False
    src_shape: tuple[int, ...] = ()  # rotated: the array's shape, to mask what lies outside
    grid_axes: tuple[int, ...] = ()  # rotated: source axes the grid moves along (2 or 3)
    grid_shape: tuple[int, ...] = ()  # rotated: output axes it spans (2 or 3)
    aligned: tuple[int, int, int] | None = None  # rotated: (source p, output j, +-1), see
    # _aligned_axis
    out_shape: tuple[int, ...] = ()


def plan_read(
    a: np.ndarray,
    b: np.ndarray,
    out_shape: Sequence[int],
    src_shape: Sequence[int],
    *,
    linear: bool,
    radius: np.ndarray | None = None,
) -> Plan:
    """Plan reading an output grid of `out_shape` through the map (a, b) from an array.
    `radius` (source voxels per axis) bounds a rotated patch: half its diagonal."""
    rows = a.tolist()
    nonzero = [[abs(v) > EPS for v in row] for row in rows]
    columns = zip(*nonzero, strict=True)
    if all(sum(row) == 1 for row in nonzero) and all(sum(col) == 1 for col in columns):
        return _plan_axes(rows, b.tolist(), out_shape, src_shape, linear=linear)
    if radius is None:
        radius = np.abs(a) @ ((np.asarray(out_shape) - 1) / 2)
    plan = _plan_affine(a, b, out_shape, src_shape, linear=linear, radius=radius)
    plan.out_shape = tuple(int(n) for n in out_shape)
    return plan


def _plan_axes(
    a: list[list[float]],
    b: list[float],
    out_shape: Sequence[int],
    src_shape: Sequence[int],
    *,
    linear: bool,
) -> Plan:
    # Plain floats: this runs for every array of every sample, and numpy's per-call overhead
    # on 3-element arrays would dominate.
    perm = tuple(next(p for p in range(3) if abs(a[p][j]) > EPS) for j in range(3))
    steps = [a[perm[j]][j] for j in range(3)]
    firsts = [b[perm[j]] for j in range(3)]
    exact = all(_is_int(f) for f in firsts) and all(_is_int(t) for t in steps)
    if not exact and not linear:  # nearest onto a different grid: round each position
        return _plan_rounded(perm, steps, firsts, out_shape, src_shape)
    if not exact:
        return _plan_linear(perm, steps, firsts, out_shape, src_shape)
    start, stop = [0, 0, 0], [0, 0, 0]
    index: list[np.ndarray | slice] = []
    for j in range(3):
        p, step, first, n = perm[j], round(steps[j]), round(firsts[j]), int(out_shape[j])
        last = first + step * (n - 1)
        start[p], stop[p] = min(first, last), max(first, last) + 1
        if abs(step) > 1:
            index.append(np.arange(n) * step + first - start[p])
        else:  # unit steps (or one voxel) are slices: views, no copy
            end = last - start[p] + (step or 1)
            index.append(slice(first - start[p], end if end >= 0 else None, step or 1))
    valid = _valid(index, perm, start, stop, src_shape)
    return Plan(
        tuple(start),
        tuple(stop),
        valid,
        perm=perm,
        index=index,
        linear=linear,
    )  # raw (zeros beyond the level) or labels (masked there)


def _is_int(value: float) -> bool:
    return abs(value - round(value)) < EPS


def _valid(
    index: Sequence[np.ndarray | slice],
    perm: Sequence[int],
    start: Sequence[int],
    stop: Sequence[int],
    src_shape: Sequence[int],
) -> Inside | None:
    """Output voxels whose positions (output axis j: start[perm[j]] + index[j]) lie inside
    the array; None (cheaply) when the box does. Positions run monotonically along each
    axis, so each axis's inside part is one run."""
    if all(start[p] >= 0 and stop[p] <= src_shape[p] for p in range(3)):
        return None
    return Inside(tuple(_run(index[j], start[p], src_shape[p]) for j, p in enumerate(perm)))


def _run(index: np.ndarray | slice, offset: int, size: int) -> tuple[int, int]:
    """[low, high) of the output indices i whose position offset + index[i] lies in
    [0, size): by arithmetic for a slice (plain ints: this runs for every patch that leaves
    its crop), else from the positions."""
    if isinstance(index, np.ndarray):
        x = index + offset
        return true_run((x >= 0) & (x < size))
    step = index.step or 1
    count = len(range(index.start, -1 if index.stop is None else index.stop, step))
    first = offset + index.start  # position of output index 0; index i is first + step * i
    if step > 0:  # first + step * i in [0, size)
        low, high = -(first // step), -((first - size) // step)  # ceil(-first / step), ...
    else:
        low, high = (first - size) // -step + 1, first // -step + 1
    low, high = max(low, 0), min(high, count)
    return (low, high) if high > low else (0, 0)


def _plan_rounded(
    perm: tuple[int, ...],
    steps: list[float],
    firsts: list[float],
    out_shape: Sequence[int],
    src_shape: Sequence[int],
) -> Plan:
    positions = [
        np.floor(np.arange(out_shape[j]) * steps[j] + firsts[j] + 0.5).astype(np.int64)
        for j in range(3)
    ]  # nearest voxel, ties rounding up
    start, stop = [0, 0, 0], [0, 0, 0]
    for j, x in enumerate(positions):
        start[perm[j]], stop[perm[j]] = int(x.min()), int(x.max()) + 1
    index = [as_slice(x - start[perm[j]]) for j, x in enumerate(positions)]
    return Plan(
        tuple(start),
        tuple(stop),
        _valid(index, perm, start, stop, src_shape),
        perm=perm,
        index=index,
    )


def _plan_linear(
    perm: tuple[int, ...],
    steps: list[float],
    firsts: list[float],
    out_shape: Sequence[int],
    src_shape: Sequence[int],
) -> Plan:
    coords = [np.arange(out_shape[j]) * steps[j] + firsts[j] for j in range(3)]
    lowers = [np.floor(c + EPS).astype(np.int64) for c in coords]
    start, stop = [0, 0, 0], [0, 0, 0]
    for j, x in enumerate(lowers):
        start[perm[j]], stop[perm[j]] = int(x.min()), int(x.max()) + 2
    return Plan(
        tuple(start),
        tuple(stop),
        None,
        perm=perm,
        index=[x - start[perm[j]] for j, x in enumerate(lowers)],
        upper=[x - start[perm[j]] + 1 for j, x in enumerate(lowers)],
        weight=[
            np.clip(c - x, 0, 1).astype(np.float32) for c, x in zip(coords, lowers, strict=True)
        ],
        linear=True,
    )


def as_slice(index: np.ndarray) -> np.ndarray | slice:
    """A unit-step run of indices as a slice (a view, no copy); anything else stays an array."""
    if index.size > 1 and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    if index.size > 1 and np.all(np.diff(index) == -1):
        return slice(int(index[0]), int(index[-1]) - 1 if index[-1] > 0 else None, -1)
    return index


def _plan_affine(
    a: np.ndarray,
    b: np.ndarray,
    out_shape: Sequence[int],
    src_shape: Sequence[int],
    *,
    linear: bool,
    radius: np.ndarray,
) -> Plan:
    n = [int(v) for v in out_shape]
    # Floats, not numpy (see _plan_axes); a singleton output axis never moves a position.
    rows = [[v if n[j] > 1 else 0.0 for j, v in enumerate(row)] for row in a.tolist()]
    offsets, reach = b.tolist(), radius.tolist()
    aligned = _aligned_axis(rows, offsets, n, linear=linear)
    half = [(m - 1) / 2 for m in n]
    low, size = [0, 0, 0], [0, 0, 0]
    for p in range(3):
        middle = sum(v * h for v, h in zip(rows[p], half, strict=True)) + offsets[p]
        spread = sum(abs(v) * 2 * h for v, h in zip(rows[p], half, strict=True))
        if aligned is not None and p == aligned[0]:  # whole voxels, read as they are
            low[p], size[p] = math.floor(middle - spread / 2 + 0.5), round(spread) + 1
        elif aligned is not None and spread > 0 and n[aligned[1]] == 1:
            # A 2D patch: a box that holds it at any angle (reach: half its diagonal), so the
            # rotated samples of a batch share a box size and are resampled in one call.
            low[p], size[p] = math.floor(middle - reach[p]), math.ceil(2 * reach[p]) + 2
        else:  # 3D: the tight box of this sample, far smaller than the any-angle one
            low[p] = math.floor(middle - spread / 2)
            size[p] = math.floor(middle + spread / 2) - low[p] + 2
    grid_src = [p for p in range(3) if aligned is None or p != aligned[0]]
    grid_out = [j for j in range(3) if aligned is None or j != aligned[1]]
    # Box voxel position along source axis p of output index i: sum_j A[p, j] i_j + b_p - low_p.
    step = [[rows[p][j] for j in grid_out] for p in grid_src]
    offset = [offsets[p] - low[p] for p in grid_src]
    return Plan(
        (low[0], low[1], low[2]),
        (low[0] + size[0], low[1] + size[1], low[2] + size[2]),
        None,
        grid=np.concatenate([np.asarray(step), np.asarray(offset)[:, None]], axis=1),
        linear=linear,
        src_shape=tuple(src_shape),
        grid_axes=tuple(grid_src),
        grid_shape=tuple(n[j] for j in grid_out),
        aligned=aligned,
    )


def _aligned_axis(
    rows: list[list[float]], offsets: list[float], n: list[int], *, linear: bool
) -> tuple[int, int, int] | None:
    """(p, j, sign) when output axis j walks source axis p voxel by voxel (sign +-1) and
    nothing else, or stays on one voxel of it (a 2D patch turned in its plane): then the patch
    is a stack of 2D slices along p, resampled with a 2D grid (4 taps, not 8)."""
    for p in range(3):
        moving = [j for j in range(3) if abs(rows[p][j]) > EPS]
        whole = not linear or _is_int(offsets[p])  # index 0 (and so every index) on a voxel
        if not moving and whole:
            singles = [j for j in range(3) if n[j] == 1]
            if singles:
                return p, singles[0], 1
        elif len(moving) == 1 and abs(abs(rows[p][moving[0]]) - 1) < EPS and whole:
            j = moving[0]
            if all(abs(rows[q][j]) <= EPS for q in range(3) if q != p):
                return p, j, 1 if rows[p][j] > 0 else -1
    return None


def shift_plan(plan: Plan, shift: Sequence[int], src_shape: Sequence[int]) -> Plan:
    """`plan` (exact or rotated) for an array whose voxel i is voxel i - shift of the planned
    one, of shape `src_shape`, sampled nearest (for labels)."""
    start = tuple(a + d for a, d in zip(plan.start, shift, strict=True))
    stop = tuple(b + d for b, d in zip(plan.stop, shift, strict=True))
    valid = None
    if plan.grid is None:  # exact: the mask of output voxels inside the other array
        assert plan.perm is not None
        assert plan.index is not None
        valid = _valid(plan.index, plan.perm, start, stop, src_shape)
    return dataclasses.replace(
        plan, start=start, stop=stop, valid=valid, linear=False, src_shape=tuple(src_shape)
    )


def index_array(index: np.ndarray | slice) -> np.ndarray:
    """An axis index (a slice with a known start, or an index array) as an index array."""
    if isinstance(index, slice):
        step = index.step or 1
        stop = index.stop if index.stop is not None else -1
        return np.arange(index.start, stop, step)
    return index
