"""S3 under network faults, through a loopback fault proxy in front of the local S3 server:
outages and throttling cost time, not the run; a stalled endpoint fails within the retry
budget with one line; metadata and chunks are each asked for once; the endpoint comes from the
config or the command line. Budgets and outages are short so the suite stays quick."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from csc.cli import cli
from csc.config import TrainConfig, build_config, load_config
from csc.data.datasets import Crop, TrainPatches
from csc.data.loaders import load_crops
from csc.data.sources import PendingRead
from csc.datasplit import (
    CrawlOptions,
    DatasplitRow,
    crawl,
    options_from_config,
    s3_options,
    write_datasplit,
)
from csc.storage import (
    ArraySource,
    MetadataReader,
    S3Options,
    S3RetryWarning,
    StorageError,
    open_array,
    write_array,
)
from csc.training import train
from tests.faultproxy import FaultProxy, fault_proxy
from tests.faults import assert_unchanged, snapshot
from tests.s3server import free_port, s3_client, upload_tree
from tests.volumes import patch_spec

SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
CLASSES = ("nuc", "mito", "er")
RAW = "jrc_synth1/jrc_synth1.zarr/recon-1/em/fibsem-uint8"
DEAD = "http://127.0.0.1:9"  # discard port: nothing listens
SPEC = patch_spec((1, 16, 16), (8, 8, 8))


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    with fault_proxy(s3_server) as running:
        yield running


@pytest.fixture
def env_elsewhere(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL names a dead endpoint: only an endpoint csc is given reaches S3."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD)


def bucket_snapshot(endpoint: str, bucket: str) -> dict[str, str]:
    """Every object of `bucket` (key -> ETag, the MD5 of its bytes), from one listing."""
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return {item["Key"]: item["ETag"] for item in listing.get("Contents", [])}


def options(proxy: FaultProxy, *, timeout_s: float = 1.0, budget_s: float = 10.0) -> S3Options:
    return S3Options(proxy.endpoint, timeout_s=timeout_s, retry_budget_s=budget_s)


def rows(bucket: str, s3: S3Options) -> list[DatasplitRow]:
    """The bucket's crops, crawled through `s3`'s endpoint, all for training."""
    search = CrawlOptions(
        search_path=f"s3://{bucket}/{SEARCH}",
        classes=CLASSES,
        endpoint_url=s3.endpoint_url,
        s3_timeout_s=s3.timeout_s,
        s3_retry_budget_s=s3.retry_budget_s,
    )
    return [dataclasses.replace(row, usage="train") for row in crawl(search).crops]


def raw_source(bucket: str, s3: S3Options) -> ArraySource:
    return MetadataReader("s3://", s3=s3).source(f"s3://{bucket}/{RAW}", (8, 8, 8), label=False)


def fresh_bucket(s3_server: str, local: Path) -> str:
    """A copy of `local` in a bucket of its own: no process has read (or cached) it yet."""
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    upload_tree(s3_server, local, bucket, public=True)
    return bucket


def raw_bucket(s3_server: str, tiny_synth: Path) -> str:
    """A fresh bucket holding one dataset's raw at s0 (8 chunks of 8 x 16 x 16 voxels): its
    chunks are in no cache of this process yet."""
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket, ACL="public-read")
    group = tiny_synth / RAW
    for path in [group / ".zattrs", *sorted((group / "s0").rglob("*"))]:
        if path.is_file():
            key = path.relative_to(tiny_synth).as_posix()
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), ACL="public-read")
    return bucket


# --- The proxy itself ---------------------------------------------------------------------------


def test_proxy_forwards_counts_and_injects_each_fault(
    s3_env: str, s3_synth: str, proxy: FaultProxy
) -> None:
    import urllib.error
    import urllib.request

    url = f"{proxy.endpoint}/{s3_synth}-public/{RAW}/.zattrs"
    assert b"multiscales" in urllib.request.urlopen(url, timeout=5).read()
    proxy.set("error", p=1.0)
    with pytest.raises(urllib.error.HTTPError, match="503"):
        urllib.request.urlopen(url, timeout=5)
    proxy.set("refuse")
    with pytest.raises(ConnectionError):  # reset by the proxy
        urllib.request.urlopen(url, timeout=5)
    proxy.set("stall")
    start = time.monotonic()
    with pytest.raises(OSError, match="timed out"):
        urllib.request.urlopen(url, timeout=0.5)
    assert time.monotonic() - start < 3
    proxy.set("delay", delay_s=0.3)
    start = time.monotonic()
    urllib.request.urlopen(url, timeout=5).read()
    assert time.monotonic() - start >= 0.3
    assert proxy.num_requests("GET", f"{RAW}/.zattrs") == 5
    assert proxy.statuses[503] == 1 and proxy.statuses[200] == 2


# --- The endpoint from the config and the command line -----------------------------------------


def test_config_and_overrides_set_the_endpoint_timeout_and_budget(
    write_config, tmp_path: Path
) -> None:
    path = write_config("use_s3 = True\ns3_retry_budget_s = 30\n")
    before = snapshot(tmp_path)
    config = load_config(path, ["s3_endpoint_url=http://127.0.0.1:9000", "s3_timeout_s=2.5"])
    assert s3_options(config) == S3Options("http://127.0.0.1:9000", 2.5, 30)
    crawl_options = options_from_config(config)[0]
    assert crawl_options.s3 == s3_options(config)  # the datasplit crawl reads the same endpoint
    result = CliRunner().invoke(cli, ["config", str(path), "s3_endpoint_url=http://host:9000"])
    assert result.exit_code == 0 and "http://host:9000" in result.output
    for override, key in (
        ("s3_endpoint_url=3", "s3_endpoint_url"),
        ("s3_timeout_s=0", "s3_timeout_s"),
        ("s3_retry_budget_s=-1", "s3_retry_budget_s"),
    ):
        result = CliRunner().invoke(cli, ["config", str(path), override])
        assert result.exit_code == 1 and result.output.startswith(f"Error: {key} must be")
    assert_unchanged(before, tmp_path)


def test_the_given_endpoint_reaches_crawl_metadata_and_chunks(
    env_elsewhere: None, s3_synth: str, s3_server: str, proxy: FaultProxy
) -> None:
    bucket = f"{s3_synth}-public"
    before = bucket_snapshot(s3_server, bucket)
    s3 = options(proxy, timeout_s=5.0)  # a healthy path: no read may time out on a busy machine
    found = rows(bucket, s3)
    crops = load_crops(found, CLASSES, SPEC, s3=s3)
    assert len(crops) == 4 and crops[0].raw.s3 == s3
    data = PendingRead(crops[0].raw, (0, 0, 0), (1, 16, 16), cache_mb=16).result()
    assert data.shape == (1, 16, 16) and data.any()
    assert proxy.num_requests("GET", f"/{bucket}/jrc_synth") > 0  # crawl, metadata and chunks
    assert proxy.num_requests("GET", f"{RAW}/s0/0/0/0") <= 1
    result = CliRunner().invoke(
        cli,
        [
            "counts",
            "--s3",
            "--bucket",
            bucket,
            "--classes",
            "nuc",
            "--endpoint-url",
            proxy.endpoint,
        ],
    )
    assert result.exit_code == 0, result.output
    assert bucket_snapshot(s3_server, bucket) == before


# --- Requests: each metadata file and each chunk once ------------------------------------------


def test_metadata_is_one_get_per_file_and_chunks_are_asked_for_once(
    env_elsewhere: None, s3_synth: str, s3_server: str, tiny_synth: Path, proxy: FaultProxy
) -> None:
    s3 = options(proxy)
    found = rows(f"{s3_synth}-public", s3)
    proxy.reset_counts()
    load_crops(found, CLASSES, SPEC, s3=s3)
    assert proxy.num_requests("HEAD") == 0  # no size probe before each GET
    assert max(proxy.counts.values()) == 1  # every metadata file asked for once
    classes = sum(len(row.classes) for row in found)
    # Raw: the group's .zattrs and the level's .zarray, once per dataset; a label: the group's
    # .zattrs, the level's .zarray and .zattrs.
    assert proxy.num_requests("GET") == 2 * 2 + 3 * classes
    bucket = raw_bucket(s3_server, tiny_synth)
    before = bucket_snapshot(s3_server, bucket)
    source = raw_source(bucket, s3)
    open_array(source, cache_mb=16)
    proxy.reset_counts()
    first = PendingRead(source, (0, 0, 0), (16, 32, 32), cache_mb=16).result()
    assert proxy.num_requests("GET") == 8  # the whole s0: 2 x 2 x 2 chunks
    again = PendingRead(source, (0, 0, 0), (16, 32, 32), cache_mb=16).result()
    assert np.array_equal(first, again) and proxy.num_requests("GET") == 8  # none again
    assert bucket_snapshot(s3_server, bucket) == before


def test_samples_read_again_without_the_crop_cache_make_no_requests(
    env_elsewhere: None, s3_synth: str, s3_server: str, proxy: FaultProxy
) -> None:
    """Measured before: about 7 requests per sample each epoch (304s for cached chunks, 404s
    for missing ones); the data does not change, so a cached chunk is never asked again."""
    bucket = f"{s3_synth}-public"
    before = bucket_snapshot(s3_server, bucket)
    s3 = options(proxy)
    crops = load_crops(rows(bucket, s3), CLASSES, SPEC, s3=s3)
    patches = TrainPatches(crops, SPEC, num_samples=8, seed=3, crop_cache_mb=0)
    proxy.reset_counts()
    first = patches.__getitems__([(1, i) for i in range(8)])
    assert proxy.num_requests("GET") > 0
    proxy.reset_counts()
    again = patches.__getitems__([(1, i) for i in range(8)])
    assert proxy.num_requests() == 0
    for one, other in zip(first, again, strict=True):
        assert torch.equal(one["input"], other["input"])
    assert bucket_snapshot(s3_server, bucket) == before


def test_a_missing_chunk_is_asked_for_once(
    s3_env: str, s3_server: str, tmp_path: Path, proxy: FaultProxy
) -> None:
    data = np.zeros((16, 16, 16), dtype=np.uint8)
    data[8:] = 7  # chunk (0, 0, 0) is all fill value: zarr does not write it
    store = tmp_path / "gaps.zarr"
    group = zarr.open_group(store, mode="w", zarr_format=2)
    write_array(group, "s0", data, chunks=(8, 16, 16), compressor="zstd")
    level = {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [8.0] * 3}]}
    group.attrs.update({"multiscales": [{"version": "0.4", "datasets": [level]}]})
    assert not (store / "s0" / "0" / "0" / "0").exists()
    bucket = fresh_bucket(s3_server, tmp_path)
    before = bucket_snapshot(s3_server, bucket)
    source = MetadataReader("s3://", s3=options(proxy)).source(
        f"s3://{bucket}/gaps.zarr", (8, 8, 8), label=False
    )
    for _ in range(3):
        assert np.array_equal(
            PendingRead(source, (0, 0, 0), (16, 16, 16), cache_mb=16).result(), data
        )
    assert proxy.statuses[404] == 1 and proxy.num_requests("GET", "/s0/0/0/0") == 1
    assert proxy.num_requests("GET", "/s0/1/0/0") == 1
    assert bucket_snapshot(s3_server, bucket) == before


# --- Outages and throttling cost time, not the run ---------------------------------------------


def test_an_outage_within_the_budget_costs_time_not_the_metadata_load(
    env_elsewhere: None, s3_synth: str, s3_server: str, tiny_synth: Path, proxy: FaultProxy
) -> None:
    bucket = f"{s3_synth}-public"
    before = bucket_snapshot(s3_server, bucket)
    s3 = options(proxy, budget_s=10)
    found = rows(bucket, s3)
    proxy.fault_for(2.0, "refuse")
    start = time.monotonic()
    with pytest.warns(
        S3RetryWarning,
        match=rf"S3 read of s3://{bucket}/\S+ from "
        rf"{proxy.endpoint} failed .*retrying for up to 10 s \(s3_retry_budget_s\)",
    ):
        crops = load_crops(found, CLASSES, SPEC, s3=s3)
    assert 2.0 <= time.monotonic() - start < 10
    assert len(crops) == 4
    assert bucket_snapshot(s3_server, bucket) == before


@pytest.mark.parametrize("fault", ["refuse", "stall"])
def test_an_outage_within_the_budget_costs_time_not_the_chunk_read(
    env_elsewhere: None,
    s3_synth: str,
    s3_server: str,
    tiny_synth: Path,
    proxy: FaultProxy,
    fault: str,
) -> None:
    bucket = raw_bucket(s3_server, tiny_synth)
    before = bucket_snapshot(s3_server, bucket)
    source = raw_source(bucket, options(proxy, budget_s=10))
    open_array(source, cache_mb=16)
    expected = zarr.open_array(tiny_synth / RAW / "s0", mode="r")[:]
    proxy.fault_for(2.0, fault)
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = PendingRead(source, (0, 0, 0), (16, 32, 32), cache_mb=16).result()
    assert 2.0 <= time.monotonic() - start < 10
    notices = [w for w in caught if issubclass(w.category, S3RetryWarning)]
    assert all(f"S3 read of s3://{bucket}/{RAW}/s0 (voxels" in str(w.message) for w in notices)
    # A refused connection is retried with a notice. A stalled one is too once tensorstore's
    # curl timeout (read once per process: the first test's settings) is shorter than the
    # outage; with a longer one the request just waits the outage out.
    assert notices or fault == "stall", [str(w.message) for w in caught]
    assert np.array_equal(data, expected)
    assert bucket_snapshot(s3_server, bucket) == before


def test_thirty_percent_slow_down_answers_cost_requests_not_the_run(
    env_elsewhere: None, s3_synth: str, s3_server: str, tiny_synth: Path, proxy: FaultProxy
) -> None:
    bucket = raw_bucket(s3_server, tiny_synth)
    before = bucket_snapshot(s3_server, bucket)
    s3 = options(proxy, budget_s=20)
    proxy.set("error", p=0.3)

    def crawl_load_and_read() -> tuple[list[Crop], np.ndarray]:
        crops = load_crops(rows(f"{s3_synth}-public", s3), CLASSES, SPEC, s3=s3)
        return crops, PendingRead(
            raw_source(bucket, s3), (0, 0, 0), (16, 32, 32), cache_mb=16
        ).result()

    with pytest.warns(S3RetryWarning, match="SlowDown"):
        crops, data = crawl_load_and_read()
    expected = zarr.open_array(tiny_synth / RAW / "s0", mode="r")[:]
    assert len(crops) == 4 and np.array_equal(data, expected)
    answered = proxy.statuses[200] + proxy.statuses[404]
    assert proxy.statuses[503] > 0
    assert sum(proxy.statuses.values()) < 2.5 * answered  # ~1/0.7 requests per answer
    assert bucket_snapshot(s3_server, bucket) == before


# --- A stalled or dead endpoint fails within the budget, in one line ---------------------------


def test_a_stalled_endpoint_fails_the_metadata_read_within_the_budget(
    env_elsewhere: None, s3_synth: str, proxy: FaultProxy
) -> None:
    url = f"s3://{s3_synth}-public/{RAW}/.zattrs"
    proxy.set("stall")
    start = time.monotonic()
    with pytest.warns(S3RetryWarning), pytest.raises(StorageError) as caught:
        MetadataReader("s3://", s3=options(proxy, timeout_s=1, budget_s=2)).json(url)
    assert time.monotonic() - start < 8  # timeout 1 s, then 2 s of retries: not minutes
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot read {url} from {proxy.endpoint} (")
    assert "(s3_retry_budget_s = 2 s) is spent" in message
    assert proxy.num_requests("GET", f"{RAW}/.zattrs") >= 2  # each stalled attempt abandoned


STALL_SCRIPT = """
import sys, time
from csc.data.sources import PendingRead
from csc.storage import ArraySource, Level, S3Options, open_array
endpoint, url = sys.argv[1:]
s3 = S3Options(endpoint, timeout_s=1, retry_budget_s=3)
source = ArraySource(url, Level("s0", (8, 8, 8), (4, 4, 4), (16, 32, 32)), s3=s3)
open_array(source, cache_mb=16)
print("opened", flush=True)
sys.stdin.readline()  # the test stalls the proxy, then says go
start = time.monotonic()
try:
    PendingRead(source, (0, 0, 0), (8, 16, 16), cache_mb=16).result()
except Exception as error:
    print(f"{time.monotonic() - start:.1f} {error}")
"""


@pytest.mark.slow
def test_a_stalled_endpoint_fails_the_chunk_read_within_the_budget(
    env_elsewhere: None, s3_synth: str, s3_server: str, tiny_synth: Path, proxy: FaultProxy
) -> None:
    """In a fresh process, as in training (tensorstore reads its HTTP settings once per
    process): each stalled chunk request is given up after s3_timeout_s and sent again, and
    the read fails in one line once the budget is spent, not after minutes."""
    bucket = raw_bucket(s3_server, tiny_synth)
    before = bucket_snapshot(s3_server, bucket)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TENSORSTORE_")}
    child = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "ignore::UserWarning",
            "-c",
            STALL_SCRIPT,
            proxy.endpoint,
            f"s3://{bucket}/{RAW}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert child.stdout.readline().strip() == "opened"
        proxy.set("stall")
        proxy.reset_counts()
        output, errors = child.communicate("go\n", timeout=30)
    finally:
        child.kill()
    seconds, message = output.strip().split(" ", 1)
    # Timeout 1 s, then a 3 s budget: about 4-5 s; the bound leaves room for a loaded machine
    # (8.0 s was measured with five test runs on 2 cores) and still rules out minutes.
    assert float(seconds) < 15, errors
    assert "\n" not in message
    assert message.startswith(f"cannot read s3://{bucket}/{RAW}/s0 (voxels (0, 0, 0) to (8, 16")
    assert f"from {proxy.endpoint}" in message and "(s3_retry_budget_s = 3 s) is spent" in message
    assert proxy.num_requests("GET", f"{RAW}/s0/0/0/0") >= 3  # abandoned after 1 s, sent again
    assert bucket_snapshot(s3_server, bucket) == before


# --- Metadata read once under torchrun ----------------------------------------------------------

SHARE_SCRIPT = """
import sys
import torch
from csc import distributed
from csc.data.loaders import load_crops
from csc.datasplit import read_datasplit
from csc.storage import S3Options, StorageError
from tests.volumes import patch_spec

endpoint, split = sys.argv[1:]
place = distributed.from_env()
distributed.init(place, torch.device("cpu"))


def broken():
    raise StorageError("cannot read s3://nowhere/x: on purpose")


try:
    distributed.from_main(place, broken)
except StorageError as error:
    print(f"rank {place.rank} raised: {error}", flush=True)
rows = read_datasplit(split)
spec = patch_spec((1, 16, 16), (8, 8, 8))
s3 = S3Options(endpoint)
crops = distributed.from_main(place, lambda: load_crops(rows, CLASSES, spec, s3=s3))
print(f"rank {place.rank} has {len(crops)} crops from {crops[0].raw.s3.endpoint_url}", flush=True)
distributed.shutdown(place)
"""


@pytest.mark.slow
def test_metadata_is_read_by_rank_zero_and_shared(
    env_elsewhere: None, s3_synth: str, s3_server: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    found = rows(f"{s3_synth}-public", options(proxy))
    split = tmp_path / "datasplit.csv"
    write_datasplit(found, split)
    before = snapshot(tmp_path)
    proxy.reset_counts()
    port = str(free_port())
    script = SHARE_SCRIPT.replace("CLASSES", repr(CLASSES))
    children = []
    for rank in range(2):
        variables = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", script, proxy.endpoint, str(split)],
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, **variables},
                cwd=Path(__file__).parents[1],
            )
        )
    outputs = [child.communicate(timeout=120)[0] for child in children]
    for rank, output in enumerate(outputs):
        assert f"rank {rank} raised: cannot read s3://nowhere/x: on purpose" in output, output
        assert f"rank {rank} has 4 crops from {proxy.endpoint}" in output, output
    classes = sum(len(row.classes) for row in found)
    assert proxy.num_requests("GET") == 2 * 2 + 3 * classes  # once, not once per rank
    assert_unchanged(before, tmp_path)


def test_a_storage_error_in_a_loader_worker_stays_one_line() -> None:
    """torch re-raises a worker's error with the worker's traceback as its message."""
    from torch._utils import ExceptionWrapper

    line = "cannot read s3://b/x.zarr/s0 from http://h:9 (...): still failing after 3 attempts"
    try:
        raise StorageError(line)
    except StorageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")
    with pytest.raises(StorageError) as caught:
        wrapped.reraise()
    assert str(caught.value) == f"{line} (in DataLoader worker process 1)"


# --- Training through the faults ----------------------------------------------------------------

CHUNKS = r"/s\d+/\d+/\d+/\d+$"  # array chunks, not metadata


def s3_training(bucket: str, run: Path, proxy: FaultProxy, **overrides: object) -> TrainConfig:
    """A tiny 2D CPU run on S3 data through the proxy: 1 epoch of 2 batches of 2."""
    info = {"shape": (1, 16, 16), "scale": (8, 8, 8)}
    settings = {
        "use_s3": True,
        "search_path": f"s3://{bucket}/{SEARCH}",
        "classes": CLASSES,
        "datasplit_path": f"{run}/datasplit.csv",
        "validation_prob": 0.5,
        "input_array_info": info,
        "target_array_info": info,
        "model_kwargs": {"num_levels": 2, "base_channels": 4},
        "epochs": 1,
        "iterations_per_epoch": 2,
        "batch_size": 2,
        "validation_batch_limit": 1,
        "device": "cpu",
        "s3_endpoint_url": proxy.endpoint,
        "s3_timeout_s": 1.0,
        "model_save_path": f"{run}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{run}/tensorboard/{{model_name}}",
        **overrides,
    }
    return build_config(settings)


@pytest.mark.slow
def test_training_through_thirty_percent_slow_down_answers_finishes(
    env_elsewhere: None, s3_synth: str, s3_server: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = f"{s3_synth}-public"
    before, objects = snapshot(tmp_path), bucket_snapshot(s3_server, bucket)
    config = s3_training(bucket, tmp_path, proxy, s3_retry_budget_s=20.0)
    proxy.set("error", p=0.3)
    with pytest.warns(S3RetryWarning, match=rf"from {proxy.endpoint} failed .*SlowDown"):
        result = train(config)
    assert result.last_epoch == 1 and (tmp_path / "checkpoints/2d_unet_1.pth").is_file()
    assert proxy.statuses[503] > 0
    assert_unchanged(before, tmp_path)
    assert bucket_snapshot(s3_server, bucket) == objects


@pytest.mark.slow
def test_training_on_an_endpoint_that_stalls_fails_within_the_budget(
    env_elsewhere: None,
    s3_synth: str,
    s3_server: str,
    tiny_synth: Path,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    bucket = fresh_bucket(s3_server, tiny_synth)  # chunks in no cache of this process yet
    before = snapshot(tmp_path)
    config = s3_training(bucket, tmp_path, proxy, s3_retry_budget_s=2.0)
    proxy.set("stall", only=CHUNKS)  # metadata is answered, array data never
    start = time.monotonic()
    with pytest.warns(S3RetryWarning), pytest.raises(StorageError) as caught:
        train(config)
    assert time.monotonic() - start < 30  # not 6.5 min per read
    message = str(caught.value)
    assert "\n" not in message
    # The first chunk request fails: the start-up check of which raw chunks are stored, or
    # the first read of one (both are chunk keys under the raw's level s0).
    assert re.match(rf"cannot read s3://{bucket}/\S+/s\d[/ ]", message), message
    assert f"from {proxy.endpoint}" in message and "(s3_retry_budget_s = 2 s) is spent" in message
    assert_unchanged(before, tmp_path)
