"""Copying files from a bucket to local folders (csc fetch-data): listings with sizes, chunk
keys that overlap a box, downloads written under a temporary name and renamed when complete,
the record of what csc fetched (what a rerun may replace), and bounded concurrency.

A bucket key ``{dataset}/{dataset}.zarr/recon-1/...`` lands at ``DEST/{dataset}/...`` (the
bucket name dropped). Each dataset folder gets a record, ``DEST/{dataset}/.csc-fetch-data.jsonl``:
one JSON line per file csc wrote there (path, size, mtime), so a later run can tell csc's own
files from a user's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal

from csc.storage.errors import StorageError
from csc.storage.files import _running
from csc.storage.metadata import in_ranges
from csc.storage.s3 import S3Options, s3_errors, s3_filesystem
from csc.storage.urls import fs_path, is_s3

RECORD_NAME = ".csc-fetch-data.jsonl"
PARTIAL_SUFFIX = ".fetch-partial"  # a download in progress: .{name}.{pid}.fetch-partial
_PARTIAL = re.compile(rf"\..+\.(\d+){re.escape(PARTIAL_SUFFIX)}")

# What a local file is, compared with its source: absent, complete (same size; same bytes for
# metadata read while planning), csc's own file that the source no longer matches (fetched
# again), or a file csc did not write, or that was changed since, which is never replaced.
FetchState = Literal["missing", "complete", "replace", "keep"]


@dataclasses.dataclass(frozen=True)
class Transfer:
    """One file to copy: its source URL, its local path and its size (bytes) in the listing;
    `data` holds the bytes of a small file already read while planning (metadata)."""

    url: str
    path: Path
    size: int
    data: bytes | None = dataclasses.field(default=None, repr=False, compare=False)


def source_filesystem(options: S3Options, *, anon: bool = True, connections: int = 16) -> Any:
    """The filesystem fetch-data reads the bucket through: training's retries and timeouts,
    anonymous unless `anon` is False, with one HTTP connection per worker."""
    return s3_filesystem(options, anon=anon, connections=connections)


def check_source(url: str, what: str) -> None:
    """Refuse a source that is no S3 URL (fetch-data copies from a bucket)."""
    if not is_s3(url):
        raise ValueError(f"{what} {url!r} is no S3 URL (s3://BUCKET/KEY); fix the crop manifest")


def local_path(dest: Path, url: str) -> Path:
    """Where the file or group at `url` lands under `dest`: its key, without the bucket."""
    parts = fs_path(url).strip("/").split("/")
    if len(parts) < 3:
        raise ValueError(f"{url}: expected s3://BUCKET/DATASET/..., a key below a dataset folder")
    return dest.joinpath(*parts[1:])


def read_optional(fs: Any, url: str, endpoint_url: str | None = None) -> bytes | None:
    """The bytes of a small file (one GET), or None if it does not exist."""
    with s3_errors(url, endpoint_url):
        try:
            return bytes(fs.cat_file(fs_path(url)))
        except FileNotFoundError:
            return None


def list_tree(fs: Any, url: str, endpoint_url: str | None = None) -> dict[str, int]:
    """Every file under the folder `url` (one recursive listing): path relative to it -> size
    in bytes; FileNotFoundError when there is none."""
    root = fs_path(url).rstrip("/")
    with s3_errors(url, endpoint_url):
        found = fs.find(root, detail=True)
    files = {
        name.removeprefix(root + "/"): int(info["size"])
        for name, info in found.items()
        if info.get("type") != "directory" and name.startswith(root + "/")
    }
    if not files:
        raise FileNotFoundError(f"{url}: nothing stored there; check the crop manifest's URL")
    return files


def chunk_keys(
    fs: Any,
    array_url: str,
    ranges: Sequence[range],
    separator: str,
    *,
    workers: int = 16,
    endpoint_url: str | None = None,
) -> dict[str, int]:
    """The stored chunks of the array at `array_url` whose indices lie in `ranges` (z, y, x):
    key (e.g. "3/0/7") -> size in bytes. Nested keys are listed level by level, descending
    only into indices in range (listings in `workers` threads); flat keys ("3.0.7") by one
    listing of the array's folder."""
    root = fs_path(array_url).rstrip("/")
    with s3_errors(array_url, endpoint_url):
        if separator != "/":
            return {
                name: size
                for name, size in _listed(fs, root).items()
                if in_ranges(name.split(separator), ranges)
            }
        prefixes = [""]  # the keys' first indices so far, each ending in "/"
        for axis, wanted in enumerate(ranges):
            listings = _thread_map(
                lambda prefix: _listed(fs, f"{root}/{prefix}".rstrip("/")), prefixes, workers
            )
            found = [
                (f"{prefix}{name}", size)
                for prefix, listing in zip(prefixes, listings, strict=True)
                for name, size in listing.items()
                if name.isdigit() and int(name) in wanted
            ]
            if axis == len(ranges) - 1:
                return {key: size for key, size in found if size >= 0}
            prefixes = [f"{key}/" for key, size in found if size < 0]
        return {}


def _listed(fs: Any, path: str) -> dict[str, int]:
    """The entries directly in the folder `path`: name -> size (-1 for a folder); none when it
    does not exist."""
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    listing = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        listing[name] = -1 if entry.get("type") == "directory" else int(entry.get("size") or 0)
    return listing


def touched_chunks(start: Sequence[int], stop: Sequence[int], chunks: Sequence[int]) -> list[range]:
    """Per axis, the indices of the chunks that voxels [start, stop) touch."""
    return [range(a // c, -(-b // c)) for a, b, c in zip(start, stop, chunks, strict=True)]


@dataclasses.dataclass(frozen=True)
class ArrayLayout:
    """A zarr v2 array's shape and chunk keys, from its ``.zarray``, (z, y, x)."""

    shape: tuple[int, int, int]  # voxels
    chunks: tuple[int, int, int]  # voxels per chunk
    separator: str  # between a chunk key's indices: "/" (nested) or "." (flat)


def array_layout(zarray: bytes, where: str) -> ArrayLayout:
    """The layout of the 3D array whose ``.zarray`` holds `zarray`."""
    try:
        meta = json.loads(zarray)
        shape = tuple(int(n) for n in meta["shape"])
        chunks = tuple(int(n) for n in meta.get("chunks", shape))
        separator = str(meta.get("dimension_separator") or ".")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{where}/.zarray is no zarr v2 array metadata ({error})") from None
    if len(shape) != 3 or len(chunks) != 3:
        raise ValueError(f"{where} has {len(shape)} dimensions; csc fetches 3D (z, y, x) arrays")
    return ArrayLayout((shape[0], shape[1], shape[2]), (chunks[0], chunks[1], chunks[2]), separator)


def _thread_map(function: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    if len(items) <= 1 or workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(function, items))


# --- What csc fetched: the record per dataset folder -----------------------------------------


class FetchRecord:
    """The files csc fetch-data wrote under `dest`, kept per dataset folder in RECORD_NAME:
    path -> (size, mtime_ns) when csc wrote it. A file that still matches its entry is csc's
    own, untouched since; anything else there is the user's."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self._entries: dict[Path, dict[str, tuple[int, int]]] = {}  # folder -> path -> stat
        self._lock = threading.Lock()

    def folder_of(self, path: Path) -> Path:
        """The dataset folder whose record lists `path` (DEST/{dataset})."""
        relative = path.relative_to(self.dest)
        return self.dest / relative.parts[0]

    def wrote(self, path: Path) -> bool:
        """Whether csc fetched `path` and nothing changed it since (size and mtime)."""
        if path.is_symlink() or not path.is_file():
            return False
        stat = path.stat()
        return self._read(self.folder_of(path)).get(self._key(path)) == (
            stat.st_size,
            stat.st_mtime_ns,
        )

    def add(self, path: Path) -> None:
        """Note that csc has just written `path` (one line appended, flushed at once)."""
        stat = path.stat()
        folder = self.folder_of(path)
        entries = self._read(folder)
        line = json.dumps(
            {"path": self._key(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        )
        with self._lock:
            entries[self._key(path)] = (stat.st_size, stat.st_mtime_ns)
            with open(folder / RECORD_NAME, "a", encoding="utf-8") as file:
                file.write(line + "\n")

    def _key(self, path: Path) -> str:
        return path.relative_to(self.folder_of(path)).as_posix()

    def _read(self, folder: Path) -> dict[str, tuple[int, int]]:
        with self._lock:
            if folder not in self._entries:
                self._entries[folder] = _read_record(folder / RECORD_NAME)
            return self._entries[folder]


def _read_record(path: Path) -> dict[str, tuple[int, int]]:
    """A record's entries, the last line per path winning; unreadable lines are skipped (a run
    killed while appending may leave half a line)."""
    entries: dict[str, tuple[int, int]] = {}
    with suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                item = json.loads(line)
                entries[str(item["path"])] = (int(item["size"]), int(item["mtime_ns"]))
            except (ValueError, KeyError, TypeError):
                continue
    return entries


def state_of(transfer: Transfer, record: FetchRecord) -> FetchState:
    """What the local file of `transfer` is (see `FetchState`): sizes compared with the listing,
    and the bytes too for a small file already read."""
    path = transfer.path
    if not (path.exists() or path.is_symlink()):
        return "missing"
    same_size = path.is_file() and path.stat().st_size == transfer.size
    if same_size and (transfer.data is None or path.read_bytes() == transfer.data):
        return "complete"
    return "replace" if record.wrote(path) else "keep"


# --- Downloads -----------------------------------------------------------------------------


def partial_path(path: Path) -> Path:
    """The temporary name a download of `path` is written under, in the same folder."""
    return path.parent / f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name beside `path` and rename it over `path`, so
    `path` never holds part of a file; the temporary file is removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    try:
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            temporary.unlink()
        raise


def clean_partials(folders: Iterable[Path]) -> int:
    """Remove the temporary files that killed runs (their process is gone) left in `folders`;
    returns how many."""
    removed = 0
    for folder in folders:
        with suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(folder):
                found = _PARTIAL.fullmatch(entry.name)
                if found and entry.is_file(follow_symlinks=False) and not _running(int(found[1])):
                    with suppress(FileNotFoundError):
                        os.unlink(entry.path)
                    removed += 1
    return removed


def download(
    fs: Any,
    transfers: Sequence[Transfer],
    record: FetchRecord,
    *,
    workers: int,
    on_done: Callable[[Transfer], None] = lambda _: None,
    endpoint_url: str | None = None,
) -> None:
    """Copy every transfer in up to `workers` threads, each file written atomically and noted
    in `record`; the first failure stops the rest (files already complete stay)."""
    lock = threading.Lock()

    def fetch(transfer: Transfer) -> None:
        data = transfer.data
        if data is None:
            with s3_errors(transfer.url, endpoint_url):
                data = bytes(fs.cat_file(fs_path(transfer.url)))
        if len(data) != transfer.size:
            raise StorageError(
                f"{transfer.url} has {len(data)} bytes, its listing said {transfer.size}: it "
                "changed while csc fetched it; run csc fetch-data again"
            )
        write_atomic(transfer.path, data)
        record.add(transfer.path)
        with lock:
            on_done(transfer)

    _bounded_map(fetch, transfers, workers)


def _bounded_map(function: Callable[[Any], None], items: Iterable[Any], workers: int) -> None:
    """`function` over `items` in `workers` threads, at most a few items per thread queued at
    once (a plan may hold millions); the first failure cancels what has not started and is
    raised once the running calls end."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: set[Future[None]] = set()
        try:
            for item in items:
                if len(pending) >= 4 * workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                pending.add(pool.submit(function, item))
            for future in as_completed(pending):
                future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
