"""Probabilities to labels, over a whole crop or block by block: thresholds, instance ids from
26-connected components (as the challenge's scorer labels), a size filter, a watershed split,
and the stitching that makes block-by-block ids the ones the whole crop would get.

Ids are uint32, 1..N, numbered by each object's first voxel in (z, y, x) raster order, so the
whole-crop and the stitched block-by-block labelling give the same array (a test holds). Sizes
are counted in voxels of the array labelled (the prediction grid).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import cc3d
import fastremap
import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from csc.storage import blocks

# Voxels sharing a face, edge or corner touch: the scorer's cc3d default.
CONNECTIVITY: Literal[26] = 26
ID_DTYPE = np.uint32
MASK_DTYPE = np.uint8  # 0/1
# Memory a whole-crop labelling may hold per voxel, bytes, with room: measured peaks (200^3
# noise, 2026-12) were about 6 for connected components (the mask, cc3d's labels, the
# renumbered copy) and 56 for the watershed (float64 distance transform, int64 markers and
# labels, skimage's queue).
BYTES_PER_VOXEL = {"instances": 16, "watershed": 64}

Box = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class ProcessOptions:
    """The settings of csc's own methods (config keys process_threshold, min_instance_size,
    watershed_min_distance, process_memory_mb)."""

    threshold: float = 0.5  # foreground: p > threshold, p in [0, 1]
    min_instance_size: int = 0  # voxels of the prediction grid; smaller objects are removed
    watershed_min_distance: int = 5  # voxels between two watershed seeds, per axis
    memory_mb: int = 4096  # a crop labelled whole must fit in this; else block by block


@dataclasses.dataclass(frozen=True)
class ClassJob:
    """One class of one crop: where its probabilities come from and its labels go."""

    read: Callable[[Box], np.ndarray]  # a box's probabilities, float32 in [0, 1], (z, y, x)
    shape: tuple[int, ...]  # voxels, (z, y, x)
    block_shape: tuple[int, ...]  # voxels held at once when working block by block
    create: Callable[[Any], Any]  # dtype -> the output array (zeros), indexable by boxes
    instance: bool  # an instance class (ids) or a semantic one (0/1)
    options: ProcessOptions = dataclasses.field(default_factory=ProcessOptions)
    progress: Callable[[Iterable[Box]], Iterable[Box]] = iter

    def boxes(self) -> Iterable[Box]:
        return self.progress(list(blocks(self.shape, self.block_shape)))

    def fits(self, method: str) -> bool:
        """Whether labelling the whole crop at once stays within memory_mb."""
        need = int(np.prod(self.shape)) * BYTES_PER_VOXEL[method]
        return need <= self.options.memory_mb * 2**20


# --- The methods a config names (csc.registries.PROCESS_FUNCS) -----------------------------


def threshold(job: ClassJob) -> dict[str, Any]:
    """Every class: p > threshold as 0/1, block by block."""
    out = job.create(MASK_DTYPE)
    for box in job.boxes():
        out[box] = foreground(job.read(box), job.options.threshold)
    return {"method": "threshold", "threshold": job.options.threshold}


def instances(job: ClassJob) -> dict[str, Any]:
    """Instance classes: connected components of p > threshold, size-filtered, ids consistent
    over the crop; semantic classes: `threshold`."""
    if not job.instance:
        return threshold(job)
    return _label(job, "instances", components)


def watershed(job: ClassJob) -> dict[str, Any]:
    """`instances`, with each component split by a watershed of its distance transform."""
    if not job.instance:
        return threshold(job)
    distance = job.options.watershed_min_distance
    return _label(job, "watershed", lambda mask: split_watershed(mask, min_distance=distance))


def _label(job: ClassJob, method: str, label: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    options = job.options
    out = job.create(ID_DTYPE)
    whole = job.fits(method)
    if whole:
        mask = np.zeros(job.shape, dtype=bool)
        for box in job.boxes():
            mask[box] = foreground(job.read(box), options.threshold)
        out[...] = size_filter(label(mask), options.min_instance_size)
    else:
        stitch_blocks(job, out, lambda box: label(foreground(job.read(box), options.threshold)))
    attrs: dict[str, Any] = {
        "method": method,
        "threshold": options.threshold,
        "min_instance_size": options.min_instance_size,
        "connectivity": CONNECTIVITY,
        "labelled": "whole crop" if whole else "block by block, stitched across block faces",
    }
    if method == "watershed":
        attrs["watershed_min_distance"] = options.watershed_min_distance
    return attrs


def stitch_blocks(
    job: ClassJob, out: Any, label: Callable[[Box], np.ndarray], *, min_size: int | None = None
) -> int:
    """`label` each block, then give objects touching across block faces one id: provisional
    ids are written first, then replaced by the final ones. Returns the number of objects."""
    stitcher = Stitcher(job.shape, job.block_shape)
    boxes = list(job.boxes())
    for box in boxes:
        out[box] = stitcher.add(box, label(box))
    size = job.options.min_instance_size if min_size is None else min_size
    mapping = stitcher.mapping(min_size=size)
    for box in boxes:
        out[box] = mapping[np.asarray(out[box])]
    return int(mapping.max(initial=0))


# --- Array operations ------------------------------------------------------------------------


def foreground(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """p > threshold as uint8 0/1."""
    return (np.asarray(probabilities) > threshold).astype(MASK_DTYPE)


def components(mask: np.ndarray) -> np.ndarray:
    """26-connected components of a mask (3D, (z, y, x)), ids 1..N in raster order."""
    labels = cc3d.connected_components(np.ascontiguousarray(mask), connectivity=CONNECTIVITY)
    return renumber(labels)


def split_watershed(mask: np.ndarray, *, min_distance: int) -> np.ndarray:
    """Components of `mask` split along the watershed of their Euclidean distance transform
    (in voxels), seeded at its peaks at least `min_distance` voxels apart."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed as flood

    mask = np.ascontiguousarray(mask, dtype=bool)
    if not mask.any():  # no peaks to seed (skimage's empty result has no usable shape)
        return np.zeros(mask.shape, dtype=ID_DTYPE)
    regions = components(mask)
    distance = ndimage.distance_transform_edt(mask)
    # skimage's functions carry no annotations (no-untyped-call): their results are Any here.
    peaks = peak_local_max(  # type: ignore[no-untyped-call]
        distance, min_distance=min_distance, labels=regions, exclude_border=False
    )
    markers = np.zeros(mask.shape, dtype=np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = flood(-distance, markers, mask=mask, connectivity=mask.ndim)  # type: ignore[no-untyped-call]
    missed = mask & (labels == 0)  # a region no seed reached keeps its component
    if missed.any():
        labels[missed] = regions[missed].astype(np.int64) + len(peaks)
    return renumber(labels)


def size_filter(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels with objects of fewer than `min_size` voxels removed, renumbered 1..N."""
    if min_size > 1:
        ids, counts = fastremap.unique(labels, return_counts=True)
        small = ids[(counts < min_size) & (ids != 0)]
        if len(small):
            labels = fastremap.mask(labels, small.tolist())
    return renumber(labels)


def renumber(labels: np.ndarray) -> np.ndarray:
    """Ids 1..N (0 stays background) in the order of each object's first voxel in (z, y, x)
    raster order, as uint32."""
    ordered, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True)
    if ordered.max(initial=0) > np.iinfo(ID_DTYPE).max:
        raise ValueError(f"more than {np.iinfo(ID_DTYPE).max} objects in one array")
    return np.asarray(ordered, dtype=ID_DTYPE)


# --- Stitching block-by-block labels -------------------------------------------------------


class Stitcher:
    """Provisional ids for each block's labels (offset by the ids before), the label planes on
    both sides of every block face, each id's size and first voxel; `mapping` then merges ids
    that touch across a face (26-connected) and numbers the objects as `renumber` would."""

    def __init__(self, shape: Sequence[int], block_shape: Sequence[int]) -> None:
        self.shape = tuple(shape)
        # Per axis, the first index of every block but the first: a face lies before each.
        self.cuts = [list(range(b, n, b)) for n, b in zip(self.shape, block_shape, strict=True)]
        self.planes: dict[tuple[int, int], np.ndarray] = {}
        self.sizes: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # id 0: background
        self.firsts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.count = 0

    def add(self, box: Box, labels: np.ndarray) -> np.ndarray:
        """The block's labels (any integers, 0 background) as provisional ids."""
        local = renumber(labels).astype(np.int64)  # 1..k, in the block's raster order
        ids, first, counts = np.unique(local.ravel(), return_index=True, return_counts=True)
        keep = ids != 0
        corner = np.array([s.start for s in box])[:, None]
        where = np.array(np.unravel_index(first[keep], local.shape)) + corner
        self.firsts.append(np.ravel_multi_index(tuple(where), self.shape).astype(np.int64))
        self.sizes.append(counts[keep].astype(np.int64))
        provisional = np.where(local > 0, local + self.count, 0)
        self.count += int(keep.sum())
        if self.count > np.iinfo(ID_DTYPE).max:
            raise ValueError(f"more than {np.iinfo(ID_DTYPE).max} objects in one crop")
        provisional = provisional.astype(ID_DTYPE)
        self._keep_planes(box, provisional)
        return provisional

    def _keep_planes(self, box: Box, provisional: np.ndarray) -> None:
        for axis, cuts in enumerate(self.cuts):
            span = box[axis]
            for cut in cuts:
                for index in (cut - 1, cut):
                    if span.start <= index < span.stop:
                        plane = self._plane(axis, index)
                        others = tuple(s for a, s in enumerate(box) if a != axis)
                        plane[others] = provisional.take(index - span.start, axis=axis)

    def _plane(self, axis: int, index: int) -> np.ndarray:
        key = (axis, index)
        if key not in self.planes:
            shape = tuple(n for a, n in enumerate(self.shape) if a != axis)
            self.planes[key] = np.zeros(shape, dtype=ID_DTYPE)
        return self.planes[key]

    def pairs(self) -> np.ndarray:
        """(id, id) pairs of different ids whose voxels touch across a block face."""
        found = [np.zeros((0, 2), dtype=np.int64)]
        for axis, cuts in enumerate(self.cuts):
            for cut in cuts:
                found.append(touching(self._plane(axis, cut - 1), self._plane(axis, cut)))
        return np.concatenate(found)

    def mapping(self, *, min_size: int) -> np.ndarray:
        """Final id (uint32) of each provisional id: merged, size-filtered, 1..N by first voxel."""
        sizes, firsts = np.concatenate(self.sizes), np.concatenate(self.firsts)
        pairs = self.pairs()
        nodes = self.count + 1
        graph = sparse.coo_matrix(
            (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(nodes, nodes)
        )
        num, component = csgraph.connected_components(graph, directed=False)
        total = np.bincount(component, weights=sizes, minlength=num)
        first = np.full(num, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first, component[1:], firsts[1:])
        kept = np.flatnonzero(total >= max(min_size, 1))  # background's component has size 0
        ordered = kept[np.argsort(first[kept], kind="stable")]
        final = np.zeros(num, dtype=ID_DTYPE)
        final[ordered] = np.arange(1, len(ordered) + 1, dtype=ID_DTYPE)
        mapping = final[component]
        mapping[0] = 0
        return mapping


def touching(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Unique (id, id) pairs of nonzero, different ids in two adjacent planes whose voxels are
    26-neighbours: the same position or one step along either in-plane axis."""
    found = []
    for step in _steps(before.ndim):
        here = tuple(_shifted(n, d)[0] for n, d in zip(before.shape, step, strict=True))
        there = tuple(_shifted(n, d)[1] for n, d in zip(after.shape, step, strict=True))
        a, b = before[here].ravel(), after[there].ravel()
        both = (a != 0) & (b != 0) & (a != b)
        found.append(np.stack([a[both], b[both]], axis=1).astype(np.int64))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _steps(ndim: int) -> Iterator[tuple[int, ...]]:
    grids = np.meshgrid(*[(-1, 0, 1)] * ndim, indexing="ij")
    yield from zip(*(g.ravel().tolist() for g in grids), strict=True)


def _shifted(n: int, step: int) -> tuple[slice, slice]:
    """Slices pairing index i of one axis of length n with index i + step of the other."""
    return slice(max(0, -step), n - max(0, step)), slice(max(0, step), n + min(0, step))
