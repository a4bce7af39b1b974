"""Resampling a patch out of a source array: world coordinates in, output voxels out.

A sample places an output grid (shape in voxels, voxel size in nm) in the world: its centre, and
a 3x3 matrix ``M`` (rotation, mirror and transpose) applied to offsets from the centre, all in
(z, y, x) order. Output voxel ``i`` sits at ``centre + M @ ((i - (n - 1) / 2) * voxel_size)``,
which in a level's voxel index space is the affine map ``A @ i + b`` (`source_map`).

Two ways to read it (`plan_read`): when ``M`` only permutes and flips axes, each output axis
samples one source axis, so a box is read and indexed axis by axis (exact: an integer position
returns the stored value itself, bit for bit); otherwise (rotations) a box that holds every
output voxel's source position is read and sampled with ``torch.nn.functional.grid_sample``.
Raw is linear, labels nearest (ties round half up in the exact path).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

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


def source_map(
    grid: Grid, centre: np.ndarray, matrix: np.ndarray, scale: Sequence[float],
    translation: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(A, b) with source voxel index = A @ output index + b, for a level (scale, translation)."""
    out_scale, src_scale = np.asarray(grid.scale), np.asarray(scale, dtype=float)
    a = matrix * out_scale[None, :] / src_scale[:, None]
    half = (np.asarray(grid.shape) - 1) / 2
    b = (centre - np.asarray(translation, dtype=float)) / src_scale - a @ half
    return a, b


@dataclasses.dataclass
class Plan:
    """How to read one output grid from a level: the box to read and how to sample it."""

    start: tuple[int, int, int]  # box in source voxels, (z, y, x), may exceed the array
    stop: tuple[int, int, int]
    valid: np.ndarray | None  # bool, output shape: inside the array (None: everywhere)
    perm: tuple[int, int, int] | None = None  # exact path: output axis j reads source perm[j]
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
    a: np.ndarray, b: np.ndarray, out_shape: Sequence[int], src_shape: Sequence[int], *,
    linear: bool, radius: np.ndarray | None = None,
) -> Plan:  # fmt: skip
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
    a: list[list[float]], b: list[float], out_shape: Sequence[int], src_shape: Sequence[int], *,
    linear: bool,
) -> Plan:  # fmt: skip
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
    valid = None
    if any(start[p] < 0 or stop[p] > src_shape[p] for p in range(3)):
        positions = [np.arange(out_shape[j]) * round(steps[j]) + round(firsts[j]) for j in range(3)]
        valid = _valid(positions, perm, start, stop, src_shape)
    return Plan(tuple(start), tuple(stop), valid, perm=perm, index=index)  # type: ignore[arg-type]


def _is_int(value: float) -> bool:
    return abs(value - round(value)) < EPS


def _valid(positions: list[np.ndarray], perm: Sequence[int], start: Sequence[int],
           stop: Sequence[int], src_shape: Sequence[int]) -> np.ndarray | None:  # fmt: skip
    """Output mask of positions inside the array; None (cheaply) when the box is inside."""
    if all(start[p] >= 0 and stop[p] <= src_shape[p] for p in range(3)):
        return None
    axes = [(x >= 0) & (x < src_shape[perm[j]]) for j, x in enumerate(positions)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2]


def _plan_rounded(perm: tuple[int, int, int], steps: list[float], firsts: list[float],
                  out_shape: Sequence[int], src_shape: Sequence[int]) -> Plan:  # fmt: skip
    positions = [
        np.floor(np.arange(out_shape[j]) * steps[j] + firsts[j] + 0.5).astype(np.int64)
        for j in range(3)
    ]  # nearest voxel, ties rounding up
    start, stop = [0, 0, 0], [0, 0, 0]
    for j, x in enumerate(positions):
        start[perm[j]], stop[perm[j]] = int(x.min()), int(x.max()) + 1
    index = [_as_slice(x - start[perm[j]]) for j, x in enumerate(positions)]
    return Plan(tuple(start), tuple(stop), _valid(positions, perm, start, stop, src_shape),
                perm=perm, index=index)  # type: ignore[arg-type]  # fmt: skip


def _plan_linear(perm: tuple[int, int, int], steps: list[float], firsts: list[float],
                 out_shape: Sequence[int], src_shape: Sequence[int]) -> Plan:  # fmt: skip
    coords = [np.arange(out_shape[j]) * steps[j] + firsts[j] for j in range(3)]
    lowers = [np.floor(c + EPS).astype(np.int64) for c in coords]
    start, stop = [0, 0, 0], [0, 0, 0]
    for j, x in enumerate(lowers):
        start[perm[j]], stop[perm[j]] = int(x.min()), int(x.max()) + 2
    return Plan(
        tuple(start), tuple(stop), None, perm=perm,  # type: ignore[arg-type]
        index=[x - start[perm[j]] for j, x in enumerate(lowers)],
        upper=[x - start[perm[j]] + 1 for j, x in enumerate(lowers)],
        weight=[
            np.clip(c - x, 0, 1).astype(np.float32) for c, x in zip(coords, lowers, strict=True)
        ],
        linear=True,
    )  # fmt: skip


def _as_slice(index: np.ndarray) -> np.ndarray | slice:
    """A unit-step run of indices as a slice (a view, no copy); anything else stays an array."""
    if index.size > 1 and np.all(np.diff(index) == 1):
        return slice(int(index[0]), int(index[-1]) + 1)
    if index.size > 1 and np.all(np.diff(index) == -1):
        return slice(int(index[0]), int(index[-1]) - 1 if index[-1] > 0 else None, -1)
    return index


def _plan_affine(
    a: np.ndarray, b: np.ndarray, out_shape: Sequence[int], src_shape: Sequence[int], *,
    linear: bool, radius: np.ndarray,
) -> Plan:  # fmt: skip
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
        (low[0], low[1], low[2]), (low[0] + size[0], low[1] + size[1], low[2] + size[2]), None,
        grid=np.concatenate([np.asarray(step), np.asarray(offset)[:, None]], axis=1),
        linear=linear, src_shape=tuple(src_shape), grid_axes=tuple(grid_src),
        grid_shape=tuple(n[j] for j in grid_out), aligned=aligned,
    )  # fmt: skip


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


def _positions(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Positions (N, k, voxels) of N affine maps (N, k, k + 1) over an output grid of `shape`
    (k axes): row p is maps[:, p, :k] @ i + maps[:, p, k] at every output index i, row-major.
    float32: the positions are box-relative (hundreds of voxels), and numpy's batched matmul
    is over ten times faster in float32 than in float64."""
    maps = maps.astype(np.float32)
    ramps = np.indices(shape, dtype=np.float32).reshape(len(shape), -1)
    positions = maps[:, :, :-1] @ ramps
    positions += maps[:, :, -1:]
    return positions


def _grid_points(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """`_positions` laid out point by point, (N, *shape, k) float32: grid_sample's grid."""
    positions = _positions(maps, shape)  # (N, k, voxels)
    points = np.empty((len(maps), positions.shape[2], len(shape)), dtype=np.float32)
    for r in range(len(shape)):  # strided writes: far cheaper than (N, voxels, k) arithmetic
        points[:, :, r] = positions[:, r]
    return points.reshape(len(maps), *shape, len(shape))


def resample(
    items: Sequence[tuple[Plan, np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Sample each (plan, boxes (C, Z, Y, X)) pair: (C, *out_shape) values and the mask of
    output voxels inside the array (None: all are). Nearest (labels) and exact values keep the
    boxes' dtype, bit for bit; interpolated ones are float32. Rotated linear items with the same
    box and grid shapes are sampled together, in one grid_sample call."""
    results: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(items)
    batches: dict[tuple, list[int]] = {}
    for i, (plan, boxes) in enumerate(items):
        if plan.grid is None:
            results[i] = _apply_axes(plan, boxes)
        else:
            key = (boxes.shape, plan.grid_shape, plan.grid_axes, plan.aligned, plan.linear)
            batches.setdefault(key, []).append(i)
    for key, members in batches.items():
        sample = _sample_linear if key[-1] else _sample_nearest
        for i, result in zip(members, sample([items[i] for i in members]), strict=True):
            results[i] = result
    return results  # type: ignore[return-value]


def _apply_axes(plan: Plan, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    assert plan.perm is not None
    assert plan.index is not None
    # (C, Z, Y, X) source order -> output order: output axis j is source axis perm[j].
    out = boxes.transpose(0, *(p + 1 for p in plan.perm))
    if plan.upper is None:
        for j, index in enumerate(plan.index):
            if isinstance(index, slice):
                out = out[(slice(None),) * (j + 1) + (index,)]
            else:
                out = np.take(out, index, axis=j + 1)
        return np.ascontiguousarray(out), plan.valid
    out = out.astype(np.float32, copy=False)
    for j in range(3):
        lower = np.take(out, _indices(plan.index[j]), axis=j + 1)
        upper = np.take(out, plan.upper[j], axis=j + 1)  # type: ignore[index]
        shape = [1, 1, 1, 1]
        shape[j + 1] = -1
        w = plan.weight[j].reshape(shape)  # type: ignore[index]
        out = lower * (1 - w) + upper * w
    return out, plan.valid


def shift_plan(plan: Plan, shift: Sequence[int], src_shape: Sequence[int]) -> Plan:
    """`plan` (exact or rotated) for an array whose voxel i is voxel i - shift of the planned
    one, of shape `src_shape`, sampled nearest (for labels)."""
    start = tuple(a + d for a, d in zip(plan.start, shift, strict=True))
    stop = tuple(b + d for b, d in zip(plan.stop, shift, strict=True))
    valid = None
    if plan.grid is None:  # exact: the mask of output voxels inside the other array
        assert plan.perm is not None
        assert plan.index is not None
        positions = [_indices(plan.index[j]) + start[plan.perm[j]] for j in range(3)]
        valid = _valid(positions, plan.perm, start, stop, src_shape)
    return dataclasses.replace(
        plan, start=start, stop=stop, valid=valid, linear=False, src_shape=tuple(src_shape)
    )


def _indices(index: np.ndarray | slice) -> np.ndarray:
    if isinstance(index, slice):
        step = index.step or 1
        stop = index.stop if index.stop is not None else -1
        return np.arange(index.start, stop, step)
    return index


def _sample_nearest(
    items: Sequence[tuple[Plan, np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Rotated plans sharing box and grid shapes, sampled nearest (ties round up) by indexing
    the boxes: stored values, no float round trip, so label values and codes stay as they are.
    Positions are computed for all items at once, in the box's own voxels."""
    first, boxes = items[0]
    box_shape, k = boxes.shape[1:], len(first.grid_axes)
    positions = _positions(np.stack([plan.grid for plan, _ in items]), first.grid_shape)
    # Nearest, ties up: floor(x + 0.5), as truncation of values clipped to >= 0 (the box holds
    # every position, so clipping only catches rounding at its edges).
    positions += np.float32(0.5)
    np.maximum(positions, 0, out=positions)
    index = positions.astype(np.int32)
    sizes = [box_shape[p] for p in first.grid_axes]  # box extent along each grid axis
    for r, size in enumerate(sizes):
        np.minimum(index[:, r], size - 1, out=index[:, r])
    flat = index[:, 0]
    for r in range(1, k):  # row-major position in the box's grid axes
        flat = flat * sizes[r] + index[:, r]
    return [
        _take(plan, boxes, flat[n], _inside(plan, index[n]))
        for n, (plan, boxes) in enumerate(items)
    ]


def _inside(plan: Plan, index: np.ndarray) -> np.ndarray | None:
    """Mask (voxels,) of box positions `index` (k, voxels) along the plan's grid axes that lie
    inside the array; None when the whole box does along them (the usual case)."""
    mask = None
    for r, p in enumerate(plan.grid_axes):
        if plan.start[p] < 0 or plan.stop[p] > plan.src_shape[p]:
            low, high = -plan.start[p], plan.src_shape[p] - plan.start[p]  # in box voxels
            axis = (index[r] >= low) & (index[r] < high)
            mask = axis if mask is None else mask & axis
    return mask


def _take(plan: Plan, boxes: np.ndarray, flat: np.ndarray,
          inside: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """One item of `_sample_nearest`: the boxes (C, Z, Y, X) at flat grid positions."""
    num = len(boxes)
    if plan.aligned is None:  # a 3D grid over the whole box
        values = np.take(boxes.reshape(num, -1), flat, axis=1).reshape(num, *plan.out_shape)
        return values, None if inside is None else inside.reshape(plan.out_shape)
    p, j, sign = plan.aligned
    # Slices along p (read whole), each indexed by the same 2D positions: (C, P, *grid_shape).
    stack = np.moveaxis(boxes, 1 + p, 1)
    stack = stack.reshape(num, stack.shape[1], -1)
    values = np.take(stack, flat, axis=2).reshape(num, stack.shape[1], *plan.grid_shape)
    values = np.ascontiguousarray(np.moveaxis(values[:, ::sign], 1, 1 + j))  # (C, Z, Y, X)
    if inside is None and plan.start[p] >= 0 and plan.stop[p] <= plan.src_shape[p]:
        return values, None
    along = np.arange(plan.start[p], plan.stop[p])
    mask = ((along >= 0) & (along < plan.src_shape[p]))[:, None]  # (P, voxels)
    if inside is not None:
        mask = mask & inside[None, :]
    mask = np.broadcast_to(mask, (len(along), inside.size if inside is not None else flat.size))
    mask = mask[::sign].reshape(-1, *plan.grid_shape)
    return values, np.ascontiguousarray(np.moveaxis(mask, 0, j))


def _sample_linear(
    items: Sequence[tuple[Plan, np.ndarray]],
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Rotated plans sharing box and grid shapes, sampled (bi/tri)linearly in one grid_sample
    call; float32, zero outside the array."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    first, boxes = items[0]
    num, channels = len(items), boxes.shape[0]
    source = np.stack([boxes for _, boxes in items]).astype(np.float32)  # (N, C, Z, Y, X)
    num_slices = 1
    if first.aligned is not None:  # 2D slices along source axis p sharing one grid: channels
        p = first.aligned[0]
        num_slices = source.shape[2 + p]
        source = np.moveaxis(source, 2 + p, 2)  # (N, C, P, H, W); a view when p is z
        plane = [n for axis, n in enumerate(boxes.shape[1:]) if axis != p]
        source = np.ascontiguousarray(source).reshape(num, channels * num_slices, *plane)
    # grid_sample (align_corners=True) maps -1..1 onto voxels 0..size-1 of the box; its grid
    # is (N, [Z,] Y, X, k) with the x position first.
    sizes = [boxes.shape[1 + p] for p in first.grid_axes]
    norm = np.array([2 / (n - 1) if n > 1 else 0.0 for n in sizes])[:, None]
    maps = np.stack([plan.grid[::-1] * norm[::-1] for plan, _ in items])  # rows x first
    maps[:, :, -1] -= np.array([1.0 if n > 1 else 0.0 for n in sizes[::-1]])
    grid = _grid_points(maps, first.grid_shape)
    out = F.grid_sample(
        torch.from_numpy(source), torch.from_numpy(grid), mode="bilinear", padding_mode="zeros",
        align_corners=True,
    ).numpy()  # fmt: skip
    if first.aligned is not None:
        _, j, sign = first.aligned
        out = out.reshape(num, channels, num_slices, *first.grid_shape)  # (N, C, P, h, w)
        if sign < 0:
            out = out[:, :, ::-1]
        out = np.moveaxis(out, 2, 2 + j)  # the slices are output axis j: (N, C, Z, Y, X)
    out = np.ascontiguousarray(out).reshape(num, -1, *first.out_shape)
    return [(values, None) for values in out]
