"""Where patches come from: multiscale arrays described by small metadata, read with tensorstore.

Metadata (OME-NGFF ``multiscales``, ``.zarray`` shapes, CellMap annotation attributes) is read
with fsspec, never tensorstore: tensorstore aborts a process forked after it has been used, and
DataLoader workers are forked from the process that builds the datasets. Array data is read with
tensorstore, through stores opened lazily in whichever process reads them (`open_array`).

Coordinates are world nanometers in (z, y, x) order; a level's ``translation`` is the centre of
its voxel 0, so voxel ``i`` covers ``translation + (i - 1/2) * scale`` to ``... + (i + 1/2)``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from csc.storage import (
    Retry,
    S3Options,
    StorageError,
    filesystem_for,
    has_aws_credentials,
    is_s3,
    is_transient,
    s3_errors,
)

Vec3 = tuple[float, float, float]
DEFAULT_CHUNK_CACHE_MB = 256
# tensorstore's own, silent retry of one chunk request that failed transiently (5xx, 429,
# timeouts), once, quickly; csc's loop (`Retry`) then retries the read within the budget.
S3_RETRIES = {"max_retries": 1, "initial_delay": "0.1s", "max_delay": "1s"}


class DataWarning(UserWarning):
    """Something in the data that training would otherwise take in silently (a label array
    whose chunks disagree with its metadata, non-finite raw values); it names the array."""


@dataclasses.dataclass(frozen=True)
class Level:
    """One scale level of a multiscale group: its array path, voxel size and placement."""

    path: str  # array inside the group, e.g. "s1"
    scale: Vec3  # nm per voxel, (z, y, x)
    translation: Vec3  # nm, centre of voxel 0
    shape: tuple[int, int, int] = (0, 0, 0)  # voxels; filled in once the level is chosen

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World extent (nm) of the level's voxels: first and last voxel edges, (z, y, x)."""
        scale, origin = np.asarray(self.scale), np.asarray(self.translation)
        return origin - scale / 2, origin + (np.asarray(self.shape) - 0.5) * scale


@dataclasses.dataclass(frozen=True)
class Chunking:
    """How a zarr v2 array stores its chunks, from its ``.zarray``."""

    chunks: tuple[int, int, int]  # voxels per chunk, (z, y, x)
    separator: str  # between a chunk key's indices: "/" (nested, z/y/x) or "." (z.y.x)
    fill_value: float  # what a missing chunk reads as


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """One array to read patches from: a multiscale group and the level chosen for a scale."""

    group: str  # group URL: a local path or s3://bucket/key
    level: Level
    absent: int | None = None  # label encoding: the value for background (None: raw data)
    unknown: int | None = None  # label encoding: the value for "not annotated here"
    foreground: int | None = None  # label voxels that are present, from complement_counts
    dtype: str | None = None  # numpy type of the stored values, native byte order ("uint8")
    chunking: Chunking | None = None
    s3: S3Options | None = None  # endpoint, timeouts and retry budget of an s3:// group

    @property
    def url(self) -> str:
        return f"{self.group}/{self.level.path}"


def choose_level(levels: Sequence[Level], scale: Sequence[float]) -> Level:
    """The coarsest level not coarser than `scale` on any axis; else the finest level."""
    fine = [
        lv
        for lv in levels
        if all(s <= w * (1 + 1e-6) for s, w in zip(lv.scale, scale, strict=True))
    ]
    if fine:
        return max(fine, key=lambda lv: math.prod(lv.scale))
    return min(levels, key=lambda lv: math.prod(lv.scale))


def parse_multiscales(attrs: dict[str, Any], group: str) -> list[Level]:
    """The levels of an OME-NGFF 0.4 ``multiscales`` attribute (scale and translation, nm)."""
    try:
        multiscale = attrs["multiscales"][0]
        levels = []
        for dataset in multiscale["datasets"]:
            transforms = {t["type"]: t for t in dataset.get("coordinateTransformations", [])}
            scale = transforms["scale"]["scale"]
            translation = transforms.get("translation", {}).get("translation", [0.0] * len(scale))
            levels.append(Level(dataset["path"], _vec3(scale), _vec3(translation)))
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ValueError(
            f"{group} has no usable OME-NGFF 'multiscales' metadata ({type(error).__name__}: "
            f"{error}); each level needs 'scale' and 'translation' transforms in (z, y, x) nm"
        ) from None
    if not levels:
        raise ValueError(f"{group}: 'multiscales' lists no datasets (levels)")
    return levels


def _vec3(values: Sequence[float]) -> Vec3:
    if len(values) != 3:
        raise ValueError(f"expected 3 values (z, y, x), got {list(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))


class MetadataReader:
    """Reads the small JSON files of zarr v2 groups and arrays, locally or on S3, cached."""

    def __init__(
        self, root: str, *, endpoint_url: str | None = None, s3: S3Options | None = None
    ) -> None:
        self.root = root
        self.s3 = s3 or S3Options(endpoint_url=endpoint_url)
        self.endpoint_url = self.s3.endpoint_url
        self.fs = filesystem_for(root, self.s3)
        self._cache: dict[str, dict[str, Any] | None] = {}  # None: the file does not exist
        self._lock = threading.Lock()
        self._reading: dict[str, threading.Lock] = {}  # one per path: threads read it once

    def json(self, path: str, *, missing_ok: bool = False) -> dict[str, Any]:
        """A JSON file, read once (one GET on S3); a missing one is remembered as missing."""
        with self._lock:
            reading = self._reading.setdefault(path, threading.Lock())
        with reading:
            with self._lock:
                cached = self._cache.get(path, ...)
            value = self._read(path) if cached is ... else cached
        if value is None:
            if missing_ok:
                return {}
            raise FileNotFoundError(
                f"{path} not found: is the datasplit CSV out of date? Rebuild it with "
                "`csc datasplit ... --overwrite`"
            )
        return value

    def _read(self, path: str) -> dict[str, Any] | None:
        import json

        try:
            with s3_errors(path, self.endpoint_url):
                value = json.loads(self.fs.cat_file(path.removeprefix("s3://")))
        except FileNotFoundError:
            value = None
        with self._lock:
            self._cache[path] = value
        return value

    def source(self, group: str, scale: Sequence[float], *, label: bool) -> ArraySource:
        """The level of `group` to read at `scale` (nm), with its shape and label encoding."""
        if ".n5/" in group + "/":
            raise ValueError(
                f"{group}: N5 arrays are not read by csc's data loader yet; convert the raw "
                "to OME-NGFF zarr"
            )
        level = choose_level(parse_multiscales(self.json(f"{group}/.zattrs"), group), scale)
        array = self.json(f"{group}/{level.path}/.zarray")
        where = f"{group}/{level.path}"
        level = dataclasses.replace(level, shape=_vec3i(array["shape"], where))
        s3 = self.s3 if is_s3(group) else None
        stored = {"dtype": _dtype(array, where), "chunking": _chunking(array, where), "s3": s3}
        if not label:
            return ArraySource(group, level, **stored)
        attrs = self.json(f"{group}/{level.path}/.zattrs", missing_ok=True)
        annotation = attrs.get("cellmap", {}).get("annotation", {})
        encoding = annotation.get("annotation_type", {}).get("encoding", {})
        counts = annotation.get("complement_counts")
        foreground = None
        if isinstance(counts, dict):
            foreground = math.prod(level.shape) - int(sum(counts.values()))
        return ArraySource(
            group, level, encoding.get("absent", 0), encoding.get("unknown"), foreground, **stored
        )


def _dtype(array: dict[str, Any], where: str) -> str:
    """The numpy type name of a ``.zarray``'s dtype ("<u8" -> "uint64"): byte order aside,
    which tensorstore converts to native on reading."""
    try:
        return np.dtype(array["dtype"]).newbyteorder("=").name
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{where}/.zarray has no dtype csc can read ({array.get('dtype')!r}); csc reads "
            "integer, bool and float arrays"
        ) from None


def _chunking(array: dict[str, Any], where: str) -> Chunking:
    chunks = _vec3i(array.get("chunks", array["shape"]), where)
    try:  # a number, "NaN"/"Infinity", or false for bool; null reads as zeros
        fill_value = float(array.get("fill_value") or 0)
    except (TypeError, ValueError):
        fill_value = 0.0
    return Chunking(chunks, array.get("dimension_separator") or ".", fill_value)


def _vec3i(values: Sequence[int], where: str) -> tuple[int, int, int]:
    if len(values) != 3:
        raise ValueError(f"{where} has {len(values)} dimensions; csc reads 3D (z, y, x) arrays")
    return (int(values[0]), int(values[1]), int(values[2]))


# --- Which chunks are stored: keys, not voxels ---------------------------------------------


def chunk_ranges(source: ArraySource, start: Sequence[int], stop: Sequence[int]) -> list[range]:
    """Per axis (z, y, x), the chunk indices of `source`'s level that voxels [start, stop)
    overlap, within the array (an empty range: the box lies outside it)."""
    assert source.chunking is not None
    return [
        range(max(0, a // c), min(-(-n // c), -(-b // c)))
        for a, b, c, n in zip(start, stop, source.chunking.chunks, source.level.shape, strict=True)
    ]


def any_chunk_stored(
    reader: MetadataReader, source: ArraySource, start: Sequence[int], stop: Sequence[int]
) -> bool:
    """Whether any chunk of `source`'s level overlapping voxels [start, stop) is stored (a
    missing chunk reads as the fill value), through `reader`'s filesystem. Asks for keys,
    never data: the middle chunk first (one request when it is there, the usual case), then
    listings that descend the nested keys z/y/x only where indices in range exist (one
    listing when none is stored)."""
    assert source.chunking is not None
    ranges = chunk_ranges(source, start, stop)
    if any(len(r) == 0 for r in ranges):
        return False
    fs, path = reader.fs, source.url.removeprefix("s3://")
    separator = source.chunking.separator
    middle = separator.join(str(r[len(r) // 2]) for r in ranges)
    with s3_errors(source.url, reader.endpoint_url):
        try:
            if fs.exists(f"{path}/{middle}"):
                return True
            if separator == "/":
                return _nested_stored(fs, path, ranges)
            return any(_in_ranges(name.split("."), ranges) for name in _listing(fs, path))
        except PermissionError:  # listing refused (a bucket that allows reads only): can't tell
            return True


def _nested_stored(fs: Any, path: str, ranges: Sequence[range]) -> bool:
    """Whether a nested key ``path/i/j/k`` exists with each index in its range."""
    inside = [name for name in _listing(fs, path) if name.isdigit() and int(name) in ranges[0]]
    if len(ranges) == 1:
        return bool(inside)
    return any(_nested_stored(fs, f"{path}/{name}", ranges[1:]) for name in inside)


def _in_ranges(indices: Sequence[str], ranges: Sequence[range]) -> bool:
    return len(indices) == len(ranges) and all(
        i.isdigit() and int(i) in r for i, r in zip(indices, ranges, strict=True)
    )


def _listing(fs: Any, path: str) -> list[str]:
    """The names directly under `path` (none when it does not exist)."""
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


# --- Reading array data with tensorstore, per process -------------------------------------

_STATE: dict[str, Any] = {"pid": None, "context": None, "stores": {}, "cache_mb": None}
_STATE_LOCK = threading.Lock()


def tensorstore_used_here() -> bool:
    """Whether this process has opened tensorstore arrays (a fork of it would then abort)."""
    return _STATE["pid"] == os.getpid()


def _context(cache_mb: int) -> Any:
    import tensorstore as ts

    if _STATE["pid"] != os.getpid() or _STATE["cache_mb"] != cache_mb:
        _STATE.update(pid=os.getpid(), stores={}, cache_mb=cache_mb)
        _STATE["context"] = ts.Context(
            {
                "cache_pool": {"total_bytes_limit": int(cache_mb) * 2**20},
                "s3_request_retries": S3_RETRIES,
            }
        )
    return _STATE["context"]


def _curl_timeouts(s3: S3Options) -> None:
    """Bound each tensorstore HTTP request: connect within, and stall no longer than,
    `s3.timeout_s`. tensorstore reads these variables when its HTTP transport starts (once
    per process, at the first S3 request); values the user set win."""
    seconds = str(max(1, math.ceil(s3.timeout_s)))  # whole seconds, at least 1
    os.environ.setdefault("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", seconds)
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", seconds)
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")


def kvstore_spec(
    url: str, *, endpoint_url: str | None = None, s3: S3Options | None = None
) -> dict[str, Any]:
    """The tensorstore key-value store for a local folder or an s3:// prefix.

    tensorstore ignores AWS_ENDPOINT_URL, so the endpoint goes into the spec; reads are
    anonymous unless AWS credentials are set (which also avoids probing EC2 metadata).
    """
    if not is_s3(url):
        return {"driver": "file", "path": os.path.abspath(url) + "/"}
    bucket, _, key = url.removeprefix("s3://").partition("/")
    spec: dict[str, Any] = {
        "driver": "s3",
        "bucket": bucket,
        "path": key.rstrip("/") + "/",
        "aws_region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "aws_credentials": {"type": "default" if has_aws_credentials() else "anonymous"},
    }
    endpoint = (s3 or S3Options(endpoint_url=endpoint_url)).endpoint
    if endpoint:
        spec["endpoint"] = endpoint
    return spec


def open_array(source: ArraySource, *, cache_mb: int = DEFAULT_CHUNK_CACHE_MB) -> Any:
    """The tensorstore array of `source`'s level, opened once per process and kept."""
    import tensorstore as ts

    key = (source.url, source.s3.endpoint if source.s3 else None)  # a bucket per endpoint
    with _STATE_LOCK:
        context = _context(cache_mb)
        store = _STATE["stores"].get(key)
    if store is not None:
        return store
    if source.s3 is not None:
        _curl_timeouts(source.s3)
    spec = {
        "driver": "zarr",
        "kvstore": kvstore_spec(source.url, s3=source.s3),
        # The data does not change while csc reads it: a chunk (or a chunk found missing) in
        # the cache is used as it is, never asked for again (no 304/404 round trips).
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }
    store = await_read(
        lambda: ts.open(spec, read=True, context=context), source.url, source.s3
    )  # opened outside the lock: one array's retries never hold up another's reads
    with _STATE_LOCK:
        if _STATE["context"] is context:
            store = _STATE["stores"].setdefault(key, store)
    return store


def await_read(issue: Callable[[], Any], url: str, s3: S3Options | None, first: Any = None) -> Any:
    """The result of tensorstore future `first` (else of `issue()`); on S3, a transient
    failure is issued again after a jittered pause until `s3.retry_budget_s` is spent."""
    future = issue() if first is None else first
    if s3 is None:
        return _result(future, url)
    retry, last = Retry(url, s3), ""
    while True:
        try:  # a wait past the budget means the request hangs despite curl's timeouts
            return future.result(timeout=retry.remaining() + s3.timeout_s)
        except TimeoutError:
            future.cancel()
            retry.attempts += 1
            waited = time.monotonic() - retry.start
            raise retry.spent(last or f"no answer in {waited:.0f} s") from None
        except ValueError as error:  # tensorstore reports I/O errors as ValueError
            if not _transient(error):
                raise StorageError(_read_error(url, error)) from None
            last = _status(error)
            time.sleep(retry.delay(last))
        future = issue()


def _result(future: Any, url: str) -> Any:
    try:
        return future.result()
    except ValueError as error:
        raise StorageError(_read_error(url, error)) from None


def _transient(error: ValueError) -> bool:
    """Whether tensorstore's error may pass (its status text, not its spec, decides)."""
    status = _status(error)
    return "PERMISSION_DENIED" not in status and is_transient(RuntimeError(status))


def _status(error: Exception) -> str:
    """tensorstore's status text without its spec dump, for a one-line message."""
    return str(error).split(" [tensorstore_spec=")[0].split(" [source")[0]


def _read_error(url: str, error: Exception) -> str:
    first = str(error).split(" [tensorstore_spec=")[0]
    hint = "check that it exists and is readable"
    if "PERMISSION_DENIED" in first or "403" in first:
        hint = "access was denied: check AWS credentials or that the bucket allows public reads"
    return f"cannot read {url}: {first} ({hint})"


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
