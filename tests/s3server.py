"""A real S3 API server (moto's server mode) on a free 127.0.0.1 port, for tests and benchmarks."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_server(timeout: float = 30.0) -> Iterator[str]:
    """Run `python -m moto.server` on 127.0.0.1 until the block ends; yield its endpoint URL."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def s3_client(endpoint: str) -> Any:
    """A boto3 client with the fake credentials the local server accepts."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def upload_tree(endpoint: str, local: Path, bucket: str, *, public: bool) -> int:
    """Create `bucket` and upload every file under `local` to the same relative keys.

    Public buckets and objects get a public-read ACL: the server refuses anonymous reads
    otherwise. Returns the number of objects uploaded.
    """
    client = s3_client(endpoint)
    acl = {"ACL": "public-read"} if public else {}
    client.create_bucket(Bucket=bucket, **acl)
    count = 0
    for path in sorted(local.rglob("*")):
        if path.is_file():
            key = path.relative_to(local).as_posix()
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **acl)
            count += 1
    return count
