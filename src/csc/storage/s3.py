"""S3: where the endpoint is, how long csc waits for it, filesystems that retry transient
failures within a budget, and one-line errors that say what to check.

A failed request is retried with growing, jittered pauses (`Retry`) by fsspec's filesystems
(`s3_filesystem`) and by tensorstore's reads (`csc.storage.arrays.await_read`); tensorstore's
own HTTP timeouts come from the same `S3Options` (`curl_timeouts`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from csc.storage.errors import StorageError
from csc.storage.urls import is_s3, s3_url

T = TypeVar("T")
# One S3 request gets this long to connect and then to receive each next byte (s); a failed
# request is retried with growing, jittered pauses until the read's budget (s) is spent.
S3_TIMEOUT_S = 10.0
S3_RETRY_BUDGET_S = 90.0
RETRY_FIRST_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 5.0
# At most one retry notice per endpoint this often (s): an outage fails many reads at once.
NOTICE_INTERVAL_S = 10.0


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
    connections: int | None = None,
) -> Any:
    """An s3fs filesystem whose requests retry transient failures within the budget;
    anonymous unless AWS credentials are set (or as `anon` says). `connections`: the most
    HTTP connections it holds open at once (botocore's default, 10, when None)."""
    options = options or S3Options(endpoint_url=endpoint_url)
    config = options.client_config()
    if connections is not None:
        config["max_pool_connections"] = connections
    fs = _retrying_filesystem_class()(
        anon=not has_aws_credentials() if anon is None else anon,
        endpoint_url=options.endpoint,
        config_kwargs=config,
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

    # s3fs ships no annotations, so its class is Any to mypy.
    class RetryingS3FileSystem(s3fs.S3FileSystem):  # type: ignore[misc]
        csc_options = S3Options()

        async def _call_s3(self, method: str, *args: Any, **kwargs: Any) -> Any:
            key = kwargs.get("Key", kwargs.get("Prefix", ""))
            url = s3_url(f"{kwargs.get('Bucket', '')}/{key}".rstrip("/"))
            parent = super()._call_s3
            return await _with_retries(
                url, self.csc_options, lambda: parent(method, *args, **kwargs)
            )

        async def _cat_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
            parent = super()._cat_file
            url = s3_url(path)
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
    """The fsspec filesystem that reads `path`: S3 for S3 URLs, else the local disk."""
    if is_s3(path):
        return s3_filesystem(options, endpoint_url=endpoint_url)
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


_ZARR_FILESYSTEMS: dict[tuple[Any, ...], Any] = {}
_ZARR_LOCK = threading.Lock()


def zarr_filesystem(options: S3Options) -> Any:
    """One asynchronous S3 filesystem per process and settings, for zarr's event loop: each
    holds an HTTP session that closes only with that loop."""
    key = (os.getpid(), options, has_aws_credentials())
    with _ZARR_LOCK:
        if key not in _ZARR_FILESYSTEMS:
            _ZARR_FILESYSTEMS[key] = s3_filesystem(options, asynchronous=True)
        return _ZARR_FILESYSTEMS[key]


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


# --- tensorstore's HTTP requests -------------------------------------------------------------

# tensorstore's own, silent retry of one chunk request that failed transiently (5xx, 429,
# timeouts), once, quickly; csc's loop (`Retry`) then retries the read within the budget.
TENSORSTORE_S3_RETRIES = {"max_retries": 1, "initial_delay": "0.1s", "max_delay": "1s"}


def curl_timeouts(options: S3Options) -> None:
    """Bound each tensorstore HTTP request: connect within, and stall no longer than,
    `options.timeout_s`. tensorstore reads these variables when its HTTP transport starts
    (once per process, at the first S3 request); values the user set win."""
    seconds = str(max(1, math.ceil(options.timeout_s)))  # whole seconds, at least 1
    os.environ.setdefault("TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS", seconds)
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS", seconds)
    os.environ.setdefault("TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES", "1")
