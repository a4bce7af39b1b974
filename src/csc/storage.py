"""Storage: OME-NGFF 0.4 and CellMap metadata for zarr v2 stores, and local/S3 locations.

Coordinates follow OME-NGFF: axes are (z, y, x) in nanometers, and a level's ``translation`` is
the world position of the centre of its voxel 0, so voxel ``i`` is centred at
``translation + i * scale``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
import random
import re
import shutil
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
AXES = ("z", "y", "x")
COMPRESSORS = ("zstd", "blosc-lz4", "gzip", "none")


def level_transforms(
    scale: Sequence[float], translation: Sequence[float], num_levels: int
) -> list[tuple[list[float], list[float]]]:
    """(scale, translation) in nm for levels s0.. of a pyramid downsampled 2x per level.

    A 2x average moves the centre of voxel 0 half an s0 voxel per level step:
    ``t_n = t_0 + (2**n - 1) * s_0 / 2``.
    """
    levels = []
    for n in range(num_levels):
        factor = 2**n
        level_scale = [float(s * factor) for s in scale]
        level_translation = [
            float(t + (factor - 1) * s / 2) for s, t in zip(scale, translation, strict=True)
        ]
        levels.append((level_scale, level_translation))
    return levels


def multiscales_attrs(
    name: str, levels: Sequence[tuple[Sequence[float], Sequence[float]]]
) -> dict[str, Any]:
    """The OME-NGFF 0.4 ``multiscales`` attribute for a group holding arrays s0, s1, ..."""
    datasets = [
        {
            "path": f"s{n}",
            "coordinateTransformations": [
                {"type": "scale", "scale": list(scale)},
                {"type": "translation", "translation": list(translation)},
            ],
        }
        for n, (scale, translation) in enumerate(levels)
    ]
    axes = [{"name": axis, "type": "space", "unit": "nanometer"} for axis in AXES]
    return {"multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets}]}


def annotation_attrs(class_name: str, num_absent: int) -> dict[str, Any]:
    """CellMap's per-array annotation attributes for a 0/1 semantic label array."""
    return {
        "cellmap": {
            "annotation": {
                "class_name": class_name,
                "annotation_type": {
                    "type": "semantic_segmentation",
                    "encoding": {"absent": 0, "present": 1},
                },
                "complement_counts": {"absent": int(num_absent)},
            }
        }
    }


def make_compressor(name: str) -> Any:
    """A numcodecs codec by csc's name for it; Zstd level 6 is what public CellMap raw uses."""
    import numcodecs

    codecs = {
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
    codec = make_compressor(compressor)
    array = group.create_array(
        name,
        shape=data.shape,
        chunks=tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True)),
        dtype=data.dtype,
        compressors=codec if codec is not None else None,
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    array[...] = data
    if attrs:
        array.attrs.update(attrs)


# --- Local and S3 locations ---------------------------------------------------------------

# Components that end a zarr or n5 store's root in a path; what follows is the path inside it.
STORE_SUFFIXES = (".zarr", ".n5")
# One S3 request gets this long to connect and then to receive each next byte (s); a failed
# request is retried with growing, jittered pauses until the read's budget (s) is spent.
S3_TIMEOUT_S = 10.0
S3_RETRY_BUDGET_S = 90.0
RETRY_FIRST_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 5.0
# At most one retry notice per endpoint this often (s): an outage fails many reads at once.
NOTICE_INTERVAL_S = 10.0


class StorageError(Exception):
    """A location cannot be read; the message names it and says what to check."""

    def __init__(self, message: str = "") -> None:
        super().__init__(_worker_line(str(message)))


def _worker_line(message: str) -> str:
    """The one line a DataLoader worker raised, where torch re-raises the worker's error in
    the training process with the whole traceback as its message."""
    head, _, rest = message.partition("\n")
    if not head.startswith("Caught StorageError in ") or "Traceback" not in rest:
        return message
    line = rest.rstrip().splitlines()[-1].split("StorageError: ", 1)[-1]
    return f"{line} ({head.removeprefix('Caught StorageError ').rstrip('.')})"


class S3RetryWarning(UserWarning):
    """An S3 request failed in a way that may pass (an outage, throttling); csc retries it."""


@dataclasses.dataclass(frozen=True)
class S3Options:
    """Where the S3 endpoint is and how long csc waits for it (the config's s3_* keys)."""

    endpoint_url: str | None = None  # None: $AWS_ENDPOINT_URL, else AWS's default
    timeout_s: float = S3_TIMEOUT_S  # connect, and wait for each next byte, per request
    retry_budget_s: float = S3_RETRY_BUDGET_S  # retrying one failing read at most this long

    @property
    def endpoint(self) -> str | None:
        return s3_endpoint(self.endpoint_url)

    def client_config(self) -> dict[str, Any]:
        """botocore's settings: csc's own loop retries, so botocore makes one attempt."""
        return {
            "connect_timeout": self.timeout_s,
            "read_timeout": self.timeout_s,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        }


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint: the given one, else $AWS_ENDPOINT_URL, else AWS's default (None)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


def has_aws_credentials() -> bool:
    """Whether the standard AWS variables name credentials (otherwise S3 reads are anonymous)."""
    keys = os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")
    return bool(keys or os.environ.get("AWS_PROFILE"))


def s3_filesystem(
    options: S3Options | None = None,
    *,
    endpoint_url: str | None = None,
    anon: bool | None = None,
    asynchronous: bool = False,
) -> Any:
    """An s3fs filesystem whose requests retry transient failures within the budget;
    anonymous unless AWS credentials are set."""
    options = options or S3Options(endpoint_url=endpoint_url)
    fs = _retrying_filesystem_class()(
        anon=not has_aws_credentials() if anon is None else anon,
        endpoint_url=options.endpoint,
        config_kwargs=options.client_config(),
        skip_instance_cache=True,  # the environment (credentials, endpoint) may have changed
        max_concurrency=1,  # else each cat_file asks for the size first: two requests a file
        asynchronous=asynchronous,
    )
    fs.csc_options = options
    fs.retries = 1  # s3fs's own loop: one attempt, csc's loop retries
    return fs


@functools.cache
def _retrying_filesystem_class() -> type:
    """s3fs's filesystem with each request and each whole-file read in csc's retry loop."""
    import s3fs

    class RetryingS3FileSystem(s3fs.S3FileSystem):
        csc_options = S3Options()

        async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
            key = kwargs.get("Key", kwargs.get("Prefix", ""))
            url = f"s3://{kwargs.get('Bucket', '')}/{key}".rstrip("/")
            parent = super()._call_s3
            return await _with_retries(
                url, self.csc_options, lambda: parent(method, *args, **kwargs)
            )

        async def _cat_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
            parent = super()._cat_file
            url = "s3://" + path.removeprefix("s3://")
            return await _with_retries(url, self.csc_options, lambda: parent(path, *args, **kwargs))

    return RetryingS3FileSystem


_IN_RETRY_LOOP: contextvars.ContextVar[bool] = contextvars.ContextVar("csc_s3_retry", default=False)


async def _with_retries(url: str, options: S3Options, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, retried after transient failures; inside another retry loop, called once."""
    if _IN_RETRY_LOOP.get():
        return await call()
    import asyncio

    token = _IN_RETRY_LOOP.set(True)
    try:
        retry = Retry(url, options)
        while True:
            try:
                return await call()
            except Exception as error:
                if not is_transient(error):
                    raise
                await asyncio.sleep(retry.delay(error))
    finally:
        _IN_RETRY_LOOP.reset(token)


class Retry:
    """The retries of one S3 read: jittered exponential pauses, for at most the budget from
    its first failure (so a slow first attempt never leaves no time to retry)."""

    def __init__(self, url: str, options: S3Options) -> None:
        self.url, self.options = url, options
        self.start = time.monotonic()
        self.first_failure: float | None = None
        self.attempts = 0

    def remaining(self) -> float:
        """Seconds of the budget left (s); all of it until the first failure."""
        if self.first_failure is None:
            return self.options.retry_budget_s
        return max(0.0, self.first_failure + self.options.retry_budget_s - time.monotonic())

    def delay(self, error: BaseException | str) -> float:
        """The pause (s) before the next attempt after `error`, with a notice; a
        `StorageError` instead once the pause would outlast the budget."""
        if self.first_failure is None:
            self.first_failure = time.monotonic()
        self.attempts += 1
        pause = min(RETRY_MAX_DELAY_S, RETRY_FIRST_DELAY_S * 2 ** (self.attempts - 1))
        pause *= random.uniform(0.5, 1.0)  # jitter: readers that failed together spread out
        if pause >= self.remaining():
            raise self.spent(error) from None
        _notice(self, error)
        return pause

    def spent(self, error: BaseException | str) -> StorageError:
        """The one-line error for a read still failing when the budget ran out."""
        endpoint = self.options.endpoint or "the AWS default endpoint"
        waited = time.monotonic() - self.start
        return StorageError(
            f"cannot read {self.url} from {endpoint} ({_reason(error)}): still failing after "
            f"{self.attempts} attempts over {waited:.0f} s, its retry budget "
            f"(s3_retry_budget_s = {self.options.retry_budget_s:g} s) is spent; check the "
            "endpoint (s3_endpoint_url, --endpoint-url or AWS_ENDPOINT_URL) and that it is "
            "reachable"
        )


_LAST_NOTICE: dict[str, float] = {}
_NOTICE_LOCK = threading.Lock()


def _notice(retry: Retry, error: BaseException | str) -> None:
    """Warn that reads from an endpoint are being retried (once per NOTICE_INTERVAL_S)."""
    endpoint = retry.options.endpoint or "the AWS default endpoint"
    now = time.monotonic()
    with _NOTICE_LOCK:
        if now - _LAST_NOTICE.get(endpoint, -NOTICE_INTERVAL_S) < NOTICE_INTERVAL_S:
            return
        _LAST_NOTICE[endpoint] = now
    warnings.warn(
        f"S3 read of {retry.url} from {endpoint} failed ({_reason(error)}); retrying for up "
        f"to {retry.options.retry_budget_s:g} s (s3_retry_budget_s)",
        S3RetryWarning,
        stacklevel=2,
    )


def _reason(error: BaseException | str) -> str:
    """The first line of an error, with its type, short enough for a one-line message; for
    an error s3fs translated, botocore's own (it names the S3 error code, e.g. SlowDown)."""
    if isinstance(error, OSError) and _http_status(error.__cause__ or error) is not None:
        error = error.__cause__ or error
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    first = text.splitlines()[0] if text else "no answer"
    return first if len(first) <= 200 else first[:197] + "..."


# Words of failures that may pass: throttling, server errors, connections refused or reset,
# timeouts. tensorstore reports them in its status text ("ABORTED: ... CURL error ...").
TRANSIENT_WORDS = (
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttl",
    "TooManyRequests",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CURL error",
    "Connection reset",
    "Could not connect",
    "timed out",
    "Timeout",
)


def is_transient(error: BaseException) -> bool:
    """Whether an S3 failure may pass if retried: refused or reset connections, timeouts,
    5xx answers, SlowDown and other throttling. Missing keys and denied access do not."""
    if isinstance(error, FileNotFoundError | PermissionError | StorageError):
        return False
    status = _http_status(error)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(error, TimeoutError | ConnectionError):
        return True
    try:
        from aiohttp import ClientError as HTTPError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - s3fs brings them
        return False
    if isinstance(error, BotoConnectionError | HTTPClientError | HTTPError):
        return True
    cause = error.__cause__ or error.__context__
    if cause is not None and cause is not error and is_transient(cause):
        return True
    return any(word in str(error) for word in TRANSIENT_WORDS)


def _http_status(error: BaseException) -> int | None:
    """The HTTP status of a botocore error, or of the one s3fs translated into `error`."""
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
    return None


def filesystem_for(
    path: str, options: S3Options | None = None, *, endpoint_url: str | None = None
) -> Any:
    """The fsspec filesystem that reads `path`: S3 for s3:// URLs, else the local disk."""
    if is_s3(path):
        return s3_filesystem(options, endpoint_url=endpoint_url)
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def open_zarr_array(url: str, options: S3Options | None = None) -> Any:
    """A zarr array for reading, local or on S3 (through the retrying filesystem)."""
    import zarr

    if not is_s3(url):
        return zarr.open_array(url, mode="r")
    from zarr.storage import FsspecStore

    fs = _zarr_filesystem(options or S3Options())
    return zarr.open_array(
        FsspecStore(fs, path=url.removeprefix("s3://"), read_only=True), mode="r"
    )


_ZARR_FILESYSTEMS: dict[tuple[Any, ...], Any] = {}
_ZARR_LOCK = threading.Lock()


def _zarr_filesystem(options: S3Options) -> Any:
    """One asynchronous filesystem per process and settings, for zarr's event loop: each
    holds an HTTP session that closes only with that loop."""
    key = (os.getpid(), options, has_aws_credentials())
    with _ZARR_LOCK:
        if key not in _ZARR_FILESYSTEMS:
            _ZARR_FILESYSTEMS[key] = s3_filesystem(options, asynchronous=True)
        return _ZARR_FILESYSTEMS[key]


def split_store_path(path: str) -> tuple[str, str]:
    """Split '/a/b/x.zarr/recon-1/em' into the store root '/a/b/x.zarr' and 'recon-1/em'."""
    parts = path.rstrip("/").split("/")
    for index, part in enumerate(parts):
        if part.endswith(STORE_SUFFIXES):
            return "/".join(parts[: index + 1]), "/".join(parts[index + 1 :])
    raise ValueError(f"{path!r} has no component ending in .zarr or .n5 to mark the store root")


@contextmanager
def s3_errors(url: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Turn S3 failures under `url` into a one-line `StorageError` (local errors pass through)."""
    if not is_s3(url):
        yield
        return
    from aiohttp import ClientError as HTTPError
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (OSError, BotoCoreError, ClientError, HTTPError) as error:
        raise StorageError(describe_s3_error(error, url, endpoint_url)) from None


def describe_s3_error(error: BaseException, url: str, endpoint_url: str | None = None) -> str:
    """One line naming the URL and what to check, for the errors users meet on S3."""
    endpoint = s3_endpoint(endpoint_url) or "the AWS default endpoint"
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in text:
        return f"{url} not found at {endpoint}: check the bucket name (--bucket) and the path"
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        variables = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        how = f"the credentials in {variables} or AWS_PROFILE"
        if not has_aws_credentials():
            how = f"whether the bucket allows anonymous reads, or set {variables}"
        return f"access to {url} at {endpoint} was denied: check {how}"
    return (
        f"cannot read {url} from {endpoint} ({text.splitlines()[0]}): check the endpoint "
        "(s3_endpoint_url, --endpoint-url or AWS_ENDPOINT_URL) and that it is reachable"
    )


# --- What csc wrote (what --overwrite may replace) -----------------------------------------

# The key csc puts in the .zattrs of every group it writes as a whole (a predicted or processed
# crop): {"csc": {"command": "predict", "version": "0.1.0"}}. --overwrite replaces a group only
# if it carries this key for the same command, so it never deletes data csc did not write.
CSC_MARKER = "csc"


def mark_csc_output(group: str | os.PathLike[str], command: str) -> None:
    """Mark the local zarr group `group` as written by `csc {command}` (in its .zattrs)."""
    import json

    from csc import __version__

    attrs_path = os.path.join(group, ".zattrs")
    attrs = _read_attrs(attrs_path) or {}
    attrs[CSC_MARKER] = {"command": command, "version": __version__}
    write_text_atomic(attrs_path, json.dumps(attrs, indent=2))


def csc_output_command(group: str | os.PathLike[str]) -> str | None:
    """The csc command that wrote the local group `group` (its marker), or None if not csc."""
    attrs = _read_attrs(os.path.join(group, ".zattrs"))
    marker = attrs.get(CSC_MARKER) if attrs else None
    command = marker.get("command") if isinstance(marker, dict) else None
    return command if isinstance(command, str) else None


def is_csc_output(group: str | os.PathLike[str], command: str) -> bool:
    """Whether `group` is a real folder (not a link) that `csc {command}` wrote."""
    return not os.path.islink(group) and csc_output_command(group) == command


def check_replaceable(path: str | os.PathLike[str], command: str, *, overwrite: bool) -> None:
    """Refuse to replace the existing `path` unless `overwrite` is given and `csc {command}`
    wrote it; anything else (ground truth, raw, a user's files) is never replaced."""
    if not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    if is_csc_output(path, command):
        return
    found = csc_output_command(path)
    what = f"was written by csc {found}" if found else "has no csc marker in its .zattrs"
    raise FileExistsError(
        f"{path} {what}, so csc {command} --overwrite will not replace it (it replaces only "
        f"its own output): choose another --output, or move {path} away yourself (output of "
        "csc before markers has none either)"
    )


@contextmanager
def staged_group(path: Path, *, command: str, overwrite: bool = False) -> Iterator[Any]:
    """A zarr group written under a temporary name next to `path`, marked as `csc {command}`'s
    output and swapped in for `path` when the block ends without error; removed on error, so
    a crash never leaves a half-written group under the real name. What was at `path` is
    replaced only if `overwrite` is given and `csc {command}` wrote it."""
    import zarr

    clean_stale(path)
    root = zarr.open_group(str(path.parent), mode="a", zarr_format=2)
    partial = _beside(path, "partial", os.getpid())
    try:
        yield root.require_group(partial.name)
        mark_csc_output(partial, command)
        swap_in(partial, path, command=command, overwrite=overwrite)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # still there only if something failed


def swap_in(partial: Path, path: Path, *, command: str, overwrite: bool) -> None:
    """Rename the complete group `partial` to `path`. An existing `path` (csc's own, checked
    again now) is first moved aside and removed once the new group is in place; if the swap
    fails, it is put back."""
    if not (path.exists() or path.is_symlink()):
        partial.rename(path)
        return
    check_replaceable(path, command, overwrite=overwrite)
    aside = _beside(path, "replaced", os.getpid())
    path.rename(aside)
    try:
        partial.rename(path)
    except BaseException:
        aside.rename(path)
        raise
    shutil.rmtree(aside)


def clean_stale(path: Path) -> None:
    """Tidy what runs killed while writing `path` left beside it (their process is gone): a
    .partial-PID group is csc's own half-written output and is removed; a .replaced-PID group
    is csc output moved aside during a swap: put back if `path` is missing, else removed."""
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(partial|replaced)-(\d+)")
    for entry in sorted(path.parent.iterdir()):
        found = pattern.fullmatch(entry.name)
        if found is None or entry.is_symlink() or _running(int(found.group(2))):
            continue
        if found.group(1) == "partial":
            shutil.rmtree(entry, ignore_errors=True)
        elif csc_output_command(entry) is not None:
            if path.exists() or path.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.rename(path)


def _beside(path: Path, what: str, pid: int) -> Path:
    return path.parent / f".{path.name}.{what}-{pid}"


def _running(pid: int) -> bool:
    """Whether another process with this id runs on this machine (it may be writing)."""
    if pid == os.getpid():
        return False  # this process: anything of ours there is left from an earlier failure
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _read_attrs(path: str) -> dict[str, Any] | None:
    """A .zattrs file's JSON object, or None if it is missing or not a JSON object."""
    import json

    try:
        with open(path, encoding="utf-8") as file:
            attrs = json.load(file)
    except (OSError, ValueError):
        return None
    return attrs if isinstance(attrs, dict) else None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to a temporary file in `path`'s folder and rename it over `path`, so
    readers see the old or the new file, never half of one; the temporary file is removed on
    any failure. A failed write raises StorageError naming `path`."""
    import tempfile

    folder, name = os.path.split(os.fspath(path))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    except OSError as error:
        raise StorageError(f"cannot write {path}: {error.strerror}; check the folder") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0o600; be an ordinary file
        os.replace(temporary, path)
    except BaseException as error:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise StorageError(f"cannot write {path}: {error.strerror or error}") from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
