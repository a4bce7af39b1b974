"""Carrying out read plans (`csc.data.geometry`): sampling patches out of arrays in memory.

The arrays are crop regions held decoded (`csc.data.sources.RegionCache`), or boxes read by
tensorstore. Exact plans index them axis by axis (views); rotations about one axis gather each
slice at the same 2D positions (labels, straight out of the region) or go through one
``grid_sample`` call per batch with the slices as channels (raw); other rotations sample a 3D
grid out of boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from csc.data.geometry import Inside, Plan, index_array, true_run

if TYPE_CHECKING:
    import torch

Data = tuple[np.ndarray, Sequence[int]]  # an array holding a plan's box, and the level voxel
# index of its first voxel (z, y, x): a crop region held in memory, or the box itself
Sampled = tuple[np.ndarray | list[np.ndarray], Inside | None]  # a plan's values, (K, *out_shape)
# or a list of K views (the exact path), and the output voxels inside the array (None: all)
# Rotated items sampled together: box size, number of arrays, grid shape, aligned axis, linear.
_BatchKey = tuple[tuple[int, ...], int, tuple[int, ...], tuple[int, int, int] | None, bool]


def resample(items: Sequence[tuple[Plan, Sequence[Data]]]) -> list[Sampled]:
    """Sample each (plan, K arrays) item: (K, *out_shape) values (or a list of K views, when
    the exact path reads them as they lie) and the `Inside` of output voxels inside the array
    (None: all are). Nearest (labels) and exact values keep the arrays' dtype, bit for bit;
    interpolated ones are float32. An array holds every voxel of the plan's box that lies
    inside the level (a crop region), or the whole box with zeros beyond the level. Values
    may be views into the arrays: copy before writing."""
    results: list[Sampled | None] = [None] * len(items)
    batches: dict[_BatchKey, list[int]] = {}
    for i, (plan, arrays) in enumerate(items):
        if plan.grid is None:
            results[i] = _apply_axes(plan, arrays)
        else:  # rotated: items sharing box and grid shapes are planned (and sampled) together
            size = tuple(b - a for a, b in zip(plan.start, plan.stop, strict=True))
            key = (size, len(arrays), plan.grid_shape, plan.aligned, plan.linear)
            batches.setdefault(key, []).append(i)
    for key, members in batches.items():
        done: Sequence[Sampled]
        if key[3] is not None and not key[-1]:  # nearest slices: straight out of the arrays
            done = _sample_nearest_slices([items[i] for i in members])
        else:  # out of the boxes: grid_sample (linear), or a 3D grid of nearest positions
            sample = _sample_linear if key[-1] else _sample_nearest
            done = sample([(items[i][0], _boxes(*items[i])) for i in members])
        for i, result in zip(members, done, strict=True):
            results[i] = result
    return results  # type: ignore[return-value]  # every slot is filled by now


def _positions(maps: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Positions (N, k, voxels) of N affine maps (N, k, k + 1) over an output grid of `shape`
    (k axes): row p is maps[:, p, :k] @ i + maps[:, p, k] at every output index i, row-major.
    Summed as broadcast ramps, one per axis (a (2, 3) @ (3, voxels) matmul is far slower);
    float32: the positions are box-relative (hundreds of voxels)."""
    maps = maps.astype(np.float32)
    num, rows, k = len(maps), maps.shape[1], len(shape)
    ones = [1] * k
    out = np.empty((num, rows, *shape), dtype=np.float32)
    for r in range(rows):
        partial = maps[:, r, k].reshape(num, *ones)  # (N, 1, ..., 1), summed up to (N, *shape)
        for axis, n in enumerate(shape):
            ramp = np.arange(n, dtype=np.float32).reshape([n if a == axis else 1 for a in range(k)])
            term = maps[:, r, axis].reshape(num, *ones) * ramp
            if axis < k - 1:
                partial = partial + term
            else:  # the last, full-size sum goes straight into place
                np.add(partial, term, out=out[:, r])
    return out.reshape(num, rows, -1)


def box_of(plan: Plan, data: Data) -> np.ndarray:
    """The plan's box [start, stop) out of an array: a view when the array holds it, else a
    copy with zeros where the array does not reach (outside the level; for nearest plans,
    whose voxels there are masked, left unset, but for float labels: stray float bits would
    make a target transform's cast to float32 warn of overflow before they are masked)."""
    array, origin = data
    first = [a - o for a, o in zip(plan.start, origin, strict=True)]  # in the array's voxels
    last = [b - o for b, o in zip(plan.stop, origin, strict=True)]
    inner = tuple(
        slice(max(a, 0), min(b, n)) for a, b, n in zip(first, last, array.shape, strict=True)
    )
    if all(a >= 0 and b <= n for a, b, n in zip(first, last, array.shape, strict=True)):
        return array[inner]
    make = np.zeros if plan.linear or array.dtype.kind == "f" else np.empty
    box = make([b - a for a, b in zip(first, last, strict=True)], dtype=array.dtype)
    if all(s.stop > s.start for s in inner):
        box[tuple(slice(s.start - a, s.stop - a) for s, a in zip(inner, first, strict=True))] = (
            array[inner]
        )
    return box


def _boxes(plan: Plan, arrays: Sequence[Data]) -> np.ndarray:
    """(K, Z, Y, X): the plan's box of each array."""
    if len(arrays) == 1:
        return box_of(plan, arrays[0])[None]
    return np.stack([box_of(plan, data) for data in arrays])


def _apply_axes(plan: Plan, arrays: Sequence[Data]) -> Sampled:
    """The exact (or axis by axis linear) path: each output axis samples one source axis.
    Exact values come as a list of views into the arrays (the consumer's one pass copies
    them); where a label patch leaves the level, a view of the part inside it (`Inside.box`)."""
    assert plan.perm is not None
    assert plan.index is not None
    if plan.upper is not None:
        return _interpolate_axes(plan, _boxes(plan, arrays)), plan.valid
    views: list[np.ndarray] = []
    for array, origin in arrays:
        if plan.valid is not None and not plan.linear and not _holds_box(plan, (array, origin)):
            runs = plan.valid.box  # the others are masked
            if any(high <= low for low, high in runs):
                views.append(np.empty([max(0, high - low) for low, high in runs], array.dtype))
                continue
            index = [
                _sub_index(plan.index[j], low, high, plan.start[p] - origin[p])
                for j, (p, (low, high)) in enumerate(zip(plan.perm, runs, strict=True))
            ]
            views.append(_index_axes(array.transpose(plan.perm), index))
        else:  # (Z, Y, X) source order -> output order: output axis j is source axis perm[j]
            box = box_of(plan, (array, origin))  # raw beyond the level: zeros there
            views.append(_index_axes(box.transpose(plan.perm), plan.index))
    return views, plan.valid


def _sub_index(index: np.ndarray | slice, low: int, high: int, offset: int) -> np.ndarray | slice:
    """Entries [low, high) of an axis index, plus `offset`; a slice stays a slice (a view)."""
    if isinstance(index, np.ndarray):
        return index[low:high] + offset
    step = index.step or 1
    first = index.start + low * step + offset
    stop = first + (high - low) * step
    return slice(first, stop if stop >= 0 else None, step)


def _index_axes(array: np.ndarray, index: Sequence[np.ndarray | slice]) -> np.ndarray:
    """`array` indexed axis by axis (slices: views; index arrays: np.take)."""
    for j, axis_index in enumerate(index):
        if isinstance(axis_index, slice):
            array = array[(slice(None),) * j + (axis_index,)]
        else:
            array = np.take(array, axis_index, axis=j)
    return array


def _holds_box(plan: Plan, data: Data) -> bool:
    """Whether the array holds the plan's whole box."""
    array, origin = data
    return all(
        a >= o and b <= o + n
        for a, b, o, n in zip(plan.start, plan.stop, origin, array.shape, strict=True)
    )


def _interpolate_axes(plan: Plan, boxes: np.ndarray) -> np.ndarray:
    """Linear along each axis, of boxes (K, Z, Y, X): a coarser grid than the level's."""
    perm, index, uppers, weights = plan.perm, plan.index, plan.upper, plan.weight
    assert perm is not None  # _plan_linear sets all four
    assert index is not None
    assert uppers is not None
    assert weights is not None
    out = boxes.transpose(0, *(p + 1 for p in perm)).astype(np.float32, copy=False)
    for j in range(3):
        lower = np.take(out, index_array(index[j]), axis=j + 1)
        upper = np.take(out, uppers[j], axis=j + 1)
        shape = [1, 1, 1, 1]
        shape[j + 1] = -1
        w = weights[j].reshape(shape)
        # inf * 0 in a raw holding inf is NaN, as grid_sample gives it: the dataset reports
        # non-finite raw with its crop, so numpy's own warning would only repeat it.
        with np.errstate(invalid="ignore"):
            out = lower * (1 - w) + upper * w
    return out


def _sample_nearest_slices(
    items: Sequence[tuple[Plan, Sequence[Data]]],
) -> list[tuple[np.ndarray, Inside | None]]:
    """Nearest plans with an aligned axis p (`_aligned_axis`) sharing box and grid shapes:
    each output is a stack of slices along source axis p, all read at the same 2D positions
    through one flat index. Positions are computed for all items at once; values come
    straight out of the arrays (a crop region in memory needs no box copy) when p is z."""
    first = items[0][0]
    maps = np.stack([plan.grid for plan, _ in items])  # type: ignore[misc]  # rotated: grids set
    maps[:, :, -1] += 0.5  # nearest, ties up: floor(x + 0.5), as truncation (exact for
    # x > -0.5: the box holds every position with at least half a voxel to spare)
    index = _positions(maps, first.grid_shape).astype(np.int32)  # (N, 2, count) box voxels
    return [_slices(plan, arrays, index[n]) for n, (plan, arrays) in enumerate(items)]


def _slices(
    plan: Plan, arrays: Sequence[Data], index: np.ndarray
) -> tuple[np.ndarray, Inside | None]:
    """One item of `_sample_nearest_slices`: (K, *out_shape) values and the inside mask."""
    aligned = plan.aligned  # (p, j, sign), handed on: read once per item
    assert aligned is not None
    p = aligned[0]
    num_slices, count = plan.stop[p] - plan.start[p], index.shape[1]
    reach = _index_reach(plan)
    values = None
    flats: dict[tuple[tuple[int, int, int], tuple[int, ...]], np.ndarray] = {}
    for k, data in enumerate(arrays):
        slab, shift = _slab(plan, data, p)  # (S, R, C) array; box voxel i is its voxel i + shift
        if values is None:
            values = np.empty((len(arrays), num_slices, count), dtype=slab.dtype)
        key = (shift, slab.shape)
        if key not in flats:
            flats[key] = _flat_index(index, shift[1:], slab.shape[2])
        low, high = max(0, -shift[0]), min(num_slices, slab.shape[0] - shift[0])
        if low > 0 or high < num_slices:  # slices beyond the array: outside the level
            values[k, :low], values[k, high:] = 0, 0
        if high > low:
            plane = slab[low + shift[0] : high + shift[0]].reshape(high - low, -1)
            # Clip mode: no index error for masked positions, and `out` written unbuffered.
            np.take(plane, flats[key], axis=1, out=values[k, low:high], mode="clip")
    assert values is not None
    return _slices_to_output(plan, aligned, values), _slices_mask(plan, aligned, index, reach)


def _index_reach(plan: Plan) -> list[tuple[int, int]]:
    """Per plane axis, the lowest and highest nearest box voxel the plan's positions round to
    (from the grid's corners, widened by a rounding margin): cheap bounds that spare the
    mask when the positions stay inside the array."""
    bounds = []
    for row in plan.grid.tolist():  # type: ignore[union-attr]  # rotated plans carry a grid
        steps, offset = row[:-1], row[-1]
        low = offset + sum(
            min(0.0, a * (n - 1)) for a, n in zip(steps, plan.grid_shape, strict=True)
        )
        high = offset + sum(
            max(0.0, a * (n - 1)) for a, n in zip(steps, plan.grid_shape, strict=True)
        )
        bounds.append((math.floor(low + 0.5 - 1e-3), math.floor(high + 0.5 + 1e-3)))
    return bounds


def _slab(plan: Plan, data: Data, p: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The array with the plan's aligned axis p first, and the shift from box voxels to its
    voxels along (p, *grid axes): the array itself when p is z, else the box moved (a copy)."""
    array, origin = data
    if p == 0:  # (Z, Y, X) regions are C-ordered: a z range is one contiguous block
        shift = (plan.start[0] - origin[0], plan.start[1] - origin[1], plan.start[2] - origin[2])
        return array, shift
    return np.ascontiguousarray(np.moveaxis(box_of(plan, data), p, 0)), (0, 0, 0)


def _flat_index(index: np.ndarray, shift: Sequence[int], width: int) -> np.ndarray:
    """Row-major plane index of box voxels `index` (2, count) in an array plane `width`
    voxels wide, box voxel i being array voxel i + shift. Positions outside the level (and so
    perhaps outside the array) get some index or other: they are masked, and `take` clips."""
    flat = index[0].astype(np.intp)  # take's own index type: converted once, not per class
    flat *= width
    flat += index[1]
    flat += shift[0] * width + shift[1]
    return flat


def _slices_mask(
    plan: Plan,
    aligned: tuple[int, int, int],
    index: np.ndarray,
    reach: Sequence[tuple[int, int]],
) -> Inside | None:
    """Output voxels inside the array, None when all are (the usual case): a run of slices
    along p, and the plane positions inside it; `aligned` is the plan's (p, j, sign)."""
    p, j, sign = aligned
    along = np.arange(plan.start[p], plan.stop[p])
    inside = _inside(plan, index, reach)
    if inside is None and along[0] >= 0 and along[-1] < plan.src_shape[p]:
        return None
    low, high = true_run((along >= 0) & (along < plan.src_shape[p]))
    if sign < 0:  # the slices are output axis j, in reverse
        low, high = len(along) - high, len(along) - low
    box = [(0, n) for n in plan.out_shape]
    box[j] = (low, high)
    mask = None if inside is None else np.expand_dims(inside.reshape(plan.grid_shape), j)
    return Inside(tuple(box), mask)


def _slices_to_output(plan: Plan, aligned: tuple[int, int, int], values: np.ndarray) -> np.ndarray:
    """(K, slices, count) in the order of the source axis p to (K, *out_shape): a view;
    `aligned` is the plan's (p, j, sign)."""
    _, j, sign = aligned
    values = values.reshape(len(values), values.shape[1], *plan.grid_shape)[:, ::sign]
    return values if j == 0 else np.moveaxis(values, 1, 1 + j)  # slices: output axis j


def _inside(
    plan: Plan, index: np.ndarray, reach: Sequence[tuple[int, int]] | None = None
) -> np.ndarray | None:
    """Mask (voxels,) of box positions `index` (k, voxels) along the plan's grid axes that lie
    inside the array; None when they all do (by the box, or by `reach`: `_index_reach`)."""
    mask = None
    for r, p in enumerate(plan.grid_axes):
        low, high = -plan.start[p], plan.src_shape[p] - plan.start[p]  # in box voxels
        first, last = reach[r] if reach is not None else (0, plan.stop[p] - plan.start[p] - 1)
        if first < low or last >= high:
            axis = (index[r] >= low) & (index[r] < high)
            mask = axis if mask is None else mask & axis
    return mask


def _sample_nearest(
    items: Sequence[tuple[Plan, np.ndarray]],
) -> list[tuple[np.ndarray, Inside | None]]:
    """Plans on a 3D grid sharing box and grid shapes, sampled nearest (ties up) by indexing
    the boxes (K, Z, Y, X): stored values, no float round trip, so label values stay as they
    are. Positions are computed for all items at once."""
    first, boxes = items[0]
    sizes = boxes.shape[1:]
    grids = np.stack([plan.grid for plan, _ in items])  # type: ignore[misc]  # rotated: grids set
    positions = _positions(grids, first.grid_shape)
    results = []
    for (plan, boxes), points in zip(items, positions, strict=True):
        index = _nearest_index(points, sizes)
        flat = (index[0] * sizes[1] + index[1]) * sizes[2] + index[2]
        values = np.take(boxes.reshape(len(boxes), -1), flat, axis=1)
        inside = _inside(plan, index)
        results.append(
            (
                values.reshape(len(boxes), *plan.out_shape),
                None if inside is None else _everywhere(plan, inside),
            )
        )
    return results


def _everywhere(plan: Plan, inside: np.ndarray) -> Inside:
    """`Inside` of a voxel-by-voxel mask over the whole output."""
    return Inside(tuple((0, n) for n in plan.out_shape), inside.reshape(plan.out_shape))


def affine_grid(maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(N, *shape, k) grid of N affine maps (N, k, k + 1) float32 over an output grid of
    `shape` (k axes): entry (n, i, c) is maps[n, c, :k] @ i + maps[n, c, k]. Summed as
    broadcast ramps, one fused multiply-add per axis, the last one writing the full grid (a
    batched (voxels, k + 1) @ (k + 1, k) matmul took 3x longer for 2D 256^2, affine_grid
    longer still). On the maps' device."""
    import torch

    num, k = len(maps), len(shape)
    steps = maps.transpose(1, 2)  # (N, k + 1, k): per output axis, its step in each coordinate
    ones = [1] * k
    grid = steps[:, k].reshape(num, *ones, k)
    for axis, n in enumerate(shape):
        ramp = torch.arange(n, dtype=maps.dtype, device=maps.device)
        ramp = ramp.reshape(1, *[n if a == axis else 1 for a in range(k)], 1)
        grid = torch.addcmul(grid, ramp, steps[:, axis].reshape(num, *ones, k))
    return grid


def _sample_linear(items: Sequence[tuple[Plan, np.ndarray]]) -> list[tuple[np.ndarray, None]]:
    """Rotated plans sharing box and grid shapes, sampled (bi/tri)linearly in one grid_sample
    call; float32, zero outside the array. Slices along an aligned axis are the channels of
    a 2D grid (4 taps, not 8)."""
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

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
    # Rows x first; the ignore: rotated plans carry a grid.
    maps = np.stack([plan.grid[::-1] * norm[::-1] for plan, _ in items])  # type: ignore[index]
    maps[:, :, -1] -= np.array([1.0 if n > 1 else 0.0 for n in sizes[::-1]])
    grid = affine_grid(torch.from_numpy(maps.astype(np.float32)), first.grid_shape)
    out = F.grid_sample(
        torch.from_numpy(source), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    ).numpy()
    if first.aligned is not None:
        _, j, sign = first.aligned
        out = out.reshape(num, channels, num_slices, *first.grid_shape)  # (N, C, P, h, w)
        out = np.moveaxis(out[:, :, ::sign], 2, 2 + j)  # the slices are output axis j
    return [(values.reshape(channels, *first.out_shape), None) for values in out]


def _nearest_index(positions: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Nearest voxel (ties up) of box positions (..., k, count) float32, clipped to the box:
    the box holds every position, so clipping only catches rounding at its edges."""
    index = positions + np.float32(0.5)
    np.maximum(index, 0, out=index)
    index = index.astype(np.intp)  # truncation of values >= 0: floor
    np.minimum(index, np.asarray(sizes)[:, None] - 1, out=index)
    return index
