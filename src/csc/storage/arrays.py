"""Array data: zarr arrays opened and written (local, or read from S3), compressors, block
iteration, and tensorstore arrays opened once per process and read with retries.

zarr serves the process that forks DataLoader workers (metadata-sized work, counts, writing
predictions); tensorstore reads the patches, in whichever process reads them (`open_array`),
since a process forked after tensorstore was used aborts.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from csc.storage.errors import StorageError
from csc.storage.s3 import (
    TENSORSTORE_S3_RETRIES,
    Retry,
    S3Options,
    curl_timeouts,
    has_aws_credentials,
    is_transient,
    s3_errors,
    zarr_filesystem,
)
from csc.storage.urls import fs_path, is_s3

if TYPE_CHECKING:
    from csc.storage.metadata import ArraySource

COMPRESSORS = ("zstd", "blosc-lz4", "gzip", "none")
DEFAULT_CHUNK_CACHE_MB = 256


# --- zarr ----------------------------------------------------------------------------------


def make_compressor(name: str) -> Any:
    """A numcodecs codec by csc's name for it; Zstd level 6 is what public CellMap raw uses."""
    import numcodecs

    codecs: dict[str, Callable[[], Any]] = {
        "zstd": lambda: numcodecs.Zstd(level=6),
        "blosc-lz4": lambda: numcodecs.Blosc(
            cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE
        ),
        "gzip": lambda: numcodecs.GZip(level=5),
        "none": lambda: None,
    }
    if name not in codecs:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(COMPRESSORS)}")
    return codecs[name]()


def create_array(
    group: Any,
    name: str,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    compressor: str,
    write_empty_chunks: bool = False,
) -> Any:
    """An empty zarr format 2 array `name` in `group` (zeros where nothing is written), chunk
    keys nested like CellMap's (z/y/x). `write_empty_chunks`: store chunks that are all zero
    too, so every written chunk has a file (a resumed prediction checks its blocks by them)."""
    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        compressors=make_compressor(compressor),
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},
        config={"write_empty_chunks": write_empty_chunks},
    )


def write_array(
    group: Any,
    name: str,
    data: Any,
    *,
    chunks: Sequence[int],
    compressor: str,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write `data` as zarr format 2 array `name` in `group`, chunk keys nested like CellMap's."""
    chunks = tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True))
    array = create_array(
        group, name, shape=data.shape, chunks=chunks, dtype=data.dtype, compressor=compressor
    )
    array[...] = data
    if attrs:
        array.attrs.update(attrs)


def open_group(path: str, *, mode: Literal["r", "a", "w"] = "r") -> Any:
    """The local zarr format 2 group at `path`: "r" to read, "a" to add to it, "w" to create it
    (replacing what was there)."""
    import zarr

    return zarr.open_group(path, mode=mode, zarr_format=2)


def open_zarr(url: str, s3: S3Options | None = None) -> Any:
    """A zarr array for reading, local or on S3 (anonymous unless credentials are set, through
    the filesystem that retries transient failures within the budget)."""
    import zarr

    s3 = s3 or S3Options()
    with s3_errors(url, s3.endpoint_url):
        if not is_s3(url):
            return zarr.open_array(url, mode="r")
        from zarr.storage import FsspecStore

        store = FsspecStore(zarr_filesystem(s3), path=fs_path(url), read_only=True)
        return zarr.open_array(store, mode="r")


def read_box(source: ArraySource, box: tuple[slice, ...]) -> Any:
    """The voxels `box` (z, y, x) of `source`'s level, read with zarr (the process that forks
    loader workers may call it); leading size-1 time/channel axes read at index 0."""
    return open_zarr(source.url, source.s3)[(0,) * source.num_leading + box]


def count_foreground(
    url: str, *, absent: int | None = 0, unknown: int | None = None, s3: S3Options | None = None
) -> int:
    """Voxels of a zarr array that are neither `absent` nor `unknown`, read with zarr (not
    tensorstore: this runs in the process that forks the loader's workers) one chunk-row slab
    at a time to bound memory."""
    import numpy as np

    array = open_zarr(url, s3)
    step = array.chunks[0]
    total = 0
    for z in range(0, array.shape[0], step):
        slab = array[z : z + step]
        present = slab != absent
        if unknown is not None:
            present &= slab != unknown
        total += int(np.count_nonzero(present))
    return total


def blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Slices of an array of `shape`, block by block in (z, y, x) order."""
    ranges = [range(0, n, b) for n, b in zip(shape, block, strict=True)]
    for corner in itertools.product(*ranges):
        yield tuple(slice(c, min(c + b, n)) for c, b, n in zip(corner, block, shape, strict=True))


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
                "s3_request_retries": TENSORSTORE_S3_RETRIES,
            }
        )
    return _STATE["context"]


def kvstore_spec(
    url: str, *, endpoint_url: str | None = None, s3: S3Options | None = None
) -> dict[str, Any]:
    """The tensorstore key-value store for a local folder or a prefix on S3.

    tensorstore ignores AWS_ENDPOINT_URL, so the endpoint goes into the spec; reads are
    anonymous unless AWS credentials are set (which also avoids probing EC2 metadata).
    """
    if not is_s3(url):
        return {"driver": "file", "path": os.path.abspath(url) + "/"}
    bucket, _, key = fs_path(url).partition("/")
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
    """The tensorstore array of `source`'s level, opened once per process and kept: (z, y, x),
    leading size-1 time/channel axes indexed at 0 (zarr v3 through the zarr3 driver)."""
    import tensorstore as ts

    key = (source.url, source.s3.endpoint if source.s3 else None)  # a bucket per endpoint
    with _STATE_LOCK:
        context = _context(cache_mb)
        store = _STATE["stores"].get(key)
    if store is not None:
        return store
    if source.s3 is not None:
        curl_timeouts(source.s3)
    spec = {
        "driver": "zarr3" if source.zarr_format == 3 else "zarr",
        "kvstore": kvstore_spec(source.url, s3=source.s3),
        # The data does not change while csc reads it: a chunk (or a chunk found missing) in
        # the cache is used as it is, never asked for again (no 304/404 round trips).
        "recheck_cached_data": False,
        "recheck_cached_metadata": False,
    }
    store = await_read(
        lambda: ts.open(spec, read=True, context=context), source.url, source.s3
    )  # opened outside the lock: one array's retries never hold up another's reads
    if source.num_leading:
        store = store[(0,) * source.num_leading]  # (t, c, z, y, x) -> (z, y, x)
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
