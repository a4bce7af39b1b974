"""Where patches come from: boxes of arrays read through tensorstore (`PendingRead`), and crop
regions held decoded in memory (`RegionCache`, `RegionRead`).

Opening arrays, reading their metadata and retrying S3 reads belong to `csc.storage`; this
module decides what is read and keeps it. Boxes are voxel (start, stop) in (z, y, x) order.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import numpy as np

from csc.storage import ArraySource, await_read, open_array


class DataWarning(UserWarning):
    """Something in the data that training would otherwise take in silently (a label array
    whose chunks disagree with its metadata, non-finite raw values); it names the array."""


class PendingRead:
    """A box of an array being read: `result()` waits and returns it, zero outside bounds."""

    def __init__(
        self, source: ArraySource, start: Sequence[int], stop: Sequence[int], *, cache_mb: int
    ) -> None:
        store = open_array(source, cache_mb=cache_mb)
        self.url, self.s3 = source.url, source.s3
        self.box = (tuple(start), tuple(stop))
        self.dtype = store.dtype.numpy_dtype
        lo = [max(a, 0) for a in start]
        hi = [min(b, n) for b, n in zip(stop, source.level.shape, strict=True)]
        self.out: np.ndarray | None = None
        self.target: tuple[slice, ...] | None = None
        if lo != list(start) or hi != list(stop):  # partly outside: zeros around what exists
            shape = tuple(b - a for a, b in zip(start, stop, strict=True))
            self.out = np.zeros(shape, dtype=self.dtype)
            self.target = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
        self.future = None
        if all(b > a for a, b in zip(lo, hi, strict=True)):
            self.view = store[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            self.future = self.view.read()

    def result(self) -> np.ndarray:
        if self.future is not None:
            where = f"{self.url} (voxels {self.box[0]} to {self.box[1]})"
            data = await_read(self.view.read, where, self.s3, first=self.future)
            if self.out is None:
                self.out = data
            else:
                self.out[self.target] = data
            self.future = None
        assert self.out is not None, "a read box inside nothing is all zeros, set at creation"
        return self.out

    def data(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """`result()` and the voxel index of its first voxel (the box's start)."""
        return self.result(), self.box[0]


# --- Crop regions held decoded in memory ---------------------------------------------------

Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # voxel (start, stop), (z, y, x)


class RegionCache:
    """Regions of arrays held decoded in this process as numpy, the least recently used
    dropped first, `limit_bytes` in all. A cached tensorstore read costs about 150 µs here
    against a few µs for a numpy slice, and a crop's region is read over and over."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.entries: collections.OrderedDict[tuple[str, Box], np.ndarray] = (
            collections.OrderedDict()
        )
        self.num_bytes = 0

    def get(self, source: ArraySource, box: Box, *, cache_mb: int) -> np.ndarray:
        """The region `box` of `source` (inside the array), read once and then kept."""
        key = (source.url, box)
        array = self.entries.get(key)
        if array is not None:
            self.entries.move_to_end(key)
            return array
        array = PendingRead(source, box[0], box[1], cache_mb=cache_mb).result()
        array.flags.writeable = False  # shared by every sample that reads it
        self.entries[key] = array
        self.num_bytes += array.nbytes
        while self.num_bytes > self.limit_bytes and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.num_bytes -= dropped.nbytes
        return array

    def drop(self, source: ArraySource, box: Box) -> None:
        dropped = self.entries.pop((source.url, box), None)
        if dropped is not None:
            self.num_bytes -= dropped.nbytes


_REGIONS: dict[int, RegionCache] = {}  # per process id: a worker starts with its own


def region_cache(limit_mb: int) -> RegionCache:
    """This process's `RegionCache` (the largest limit asked for wins)."""
    cache = _REGIONS.get(os.getpid())
    if cache is None:
        cache = _REGIONS[os.getpid()] = RegionCache(limit_mb * 2**20)
    cache.limit_bytes = max(cache.limit_bytes, limit_mb * 2**20)
    return cache


class RegionRead:
    """A box served from a region held in memory; `result()` as `PendingRead`'s: zero outside
    the array."""

    def __init__(
        self,
        region: np.ndarray,
        origin: Sequence[int],
        start: Sequence[int],
        stop: Sequence[int],
        shape: Sequence[int],
    ) -> None:
        self.dtype = region.dtype
        self.region, self.origin = region, tuple(origin)
        self.start, self.stop, self.shape = tuple(start), tuple(stop), tuple(shape)
        self.out: np.ndarray | None = None

    def data(self) -> tuple[np.ndarray, tuple[int, ...]]:
        """The region and the voxel index of its first voxel: it holds every voxel of the box
        that lies inside the array (no copy)."""
        return self.region, self.origin

    def result(self) -> np.ndarray:
        if self.out is None:
            self.out = self._box()
        return self.out

    def _box(self) -> np.ndarray:
        start, stop, origin = self.start, self.stop, self.origin
        lo = [max(a, 0) for a in start]
        hi = [min(b, n) for b, n in zip(stop, self.shape, strict=True)]
        inner = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin, strict=True))
        if lo == list(start) and hi == list(stop):
            return self.region[inner]  # a view: the usual case
        out = np.zeros([b - a for a, b in zip(start, stop, strict=True)], dtype=self.dtype)
        if all(b > a for a, b in zip(lo, hi, strict=True)):
            target = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
            out[target] = self.region[inner]
        return out
