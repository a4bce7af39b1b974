"""csc fetch-data: crops and the EM around them copied from a loopback S3 bucket laid out as
the public one (anonymous, objects public-read), counted through the fault proxy: which crops,
levels and chunks, resuming, interrupted runs, a user's files, and training on the result."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from csc import manifests
from csc.cli import cli
from csc.fetching import (
    FetchOptions,
    describe_plan,
    em_levels,
    fetch_data,
    level_region,
    plan_fetch,
    select_crops,
)
from csc.storage import Level, S3Options, S3RetryWarning, StorageError, filesystem_for
from csc.storage.fetch import RECORD_NAME, chunk_keys
from csc.synth import SynthSpec, write_synthetic
from tests.faultproxy import FaultProxy
from tests.s3server import s3_client, upload_tree
from tests.test_data import assert_samples_equal, synth_rows, synth_samples

# Raw 16x32x32 at 8 nm in chunks of 4x8x8: s0 has 64 chunks, s1 8, s2..s3 one each, and s4
# (1x2x2) has a size-1 axis, so it is never fetched. Crops 16x16x16 at 4 nm.
SPEC = SynthSpec(
    num_datasets=2,
    num_crops=2,
    shape=(16, 32, 32),
    crop_shape=(16, 16, 16),
    chunks=(4, 8, 8),
    num_levels=5,
    missing_class_prob=0.3,
)
BUCKET = "fetch-public"
RAW = "recon-1/em/fibsem-uint8"
EM_CHUNK = re.compile(r"/(\w+)/\w+\.zarr/recon-1/em/fibsem-uint8/(s\d+/\d+/\d+/\d+)$")
# A test crop of jrc_synth1 at 16 nm whose corners map to s1 voxels (2, 3, 1) and (4, 5, 3).
TEST_CROP = {
    "voxel_size": (16.0, 16.0, 16.0),
    "translation": (40.0, 56.0, 24.0),
    "shape": (2, 2, 2),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fetch-source")
    write_synthetic(out, SPEC)
    return out


@pytest.fixture(scope="module")
def bucket(s3_server: str, source: Path) -> str:
    upload_tree(s3_server, source, BUCKET, public=True)
    return BUCKET


@pytest.fixture(scope="module")
def manifest_files(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A crop manifest of every synthetic crop in the bucket, and a test crop manifest."""
    folder = tmp_path_factory.mktemp("fetch-manifests")
    crops = folder / "manifest.csv"
    with open(crops, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(manifests.FETCH_COLUMNS)
        for crop in sorted(source.glob("*/*.zarr/recon-1/labels/groundtruth/crop*")):
            dataset = crop.parents[4].name
            store = f"s3://{BUCKET}/{dataset}/{dataset}.zarr/recon-1"
            number = crop.name.removeprefix("crop")
            writer.writerow(
                [
                    number,
                    dataset,
                    "recon-1",
                    f"{store}/labels/groundtruth/{crop.name}",
                    f"{store}/em/fibsem-uint8",
                ]
            )
    tests = folder / "test_crop_manifest.csv"
    vector = lambda values: "[" + ";".join(str(v) for v in values) + "]"  # noqa: E731
    tests.write_text(
        ",".join(manifests.COLUMNS)
        + "\n"
        + f"901,jrc_synth1,mito,{vector(TEST_CROP['voxel_size'])},"
        + f"{vector(TEST_CROP['translation'])},{vector(TEST_CROP['shape'])}\n"
    )
    return crops, tests


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_server)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def anonymous(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def options(
    dest: Path, proxy: FaultProxy, files: tuple[Path, Path], **changes: object
) -> FetchOptions:
    values: dict[str, object] = {
        "dest": str(dest),
        "manifest": str(files[0]),
        "test_crop_manifest": str(files[1]),
        # A generous timeout: on a loaded machine the local server can take seconds to answer
        # a listing, and a retry's notice would fail a test that is not about retries.
        "s3": S3Options(endpoint_url=proxy.endpoint, timeout_s=60, retry_budget_s=120),
        "workers": 4,
    }
    return FetchOptions(**{**values, **changes})  # type: ignore[arg-type]


def em_chunk_gets(proxy: FaultProxy, dataset: str | None = "jrc_synth1") -> Counter[str]:
    """EM chunks of `dataset` requested through the proxy, e.g. {"s1/0/0/0": 1} (of every
    dataset, named "jrc_synth2/s1/0/0/0", when None)."""
    found: Counter[str] = Counter()
    for (method, path), count in proxy.counts.items():
        match = EM_CHUNK.search(path)
        if method == "GET" and match and dataset in (None, match[1]):
            found[match[2] if dataset else f"{match[1]}/{match[2]}"] += count
    return found


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but csc's record: relative path -> bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RECORD_NAME
    }


def expected_chunks(
    source: Path, dataset: str, first: tuple, last: tuple, padding: int, levels: list[str]
) -> set[str]:
    """The EM chunk keys the toolkit's rule names: nearest voxel centres, padding, clipping."""

    group = source / dataset / f"{dataset}.zarr" / RAW
    multiscale = json.loads((group / ".zattrs").read_text())["multiscales"][0]
    keys = set()
    for entry in multiscale["datasets"]:
        if entry["path"] not in levels:
            continue
        scale = np.asarray(entry["coordinateTransformations"][0]["scale"])
        origin = np.asarray(entry["coordinateTransformations"][1]["translation"])
        array = json.loads((group / entry["path"] / ".zarray").read_text())
        shape, chunks = np.asarray(array["shape"]), np.asarray(array["chunks"])
        ends = [
            np.clip(np.floor((np.asarray(x) - origin) / scale + 0.5), 0, shape - 1)
            for x in (first, last)
        ]
        low = np.maximum(0, np.minimum(*ends) - padding).astype(int)
        high = np.minimum(shape - 1, np.maximum(*ends) + padding).astype(int)
        ranges = [range(a // c, b // c + 1) for a, b, c in zip(low, high, chunks, strict=True)]
        for z in ranges[0]:
            for y in ranges[1]:
                for x in ranges[2]:
                    if (group / entry["path"] / str(z) / str(y) / str(x)).is_file():
                        keys.add(f"{entry['path']}/{z}/{y}/{x}")
    return keys


def crop_corners(store: Path, number: int) -> tuple[list[float], list[float]]:
    """The first and last s0 voxel centres (nm) of a synthetic crop's first class group."""
    crop = store / "recon-1" / "labels" / "groundtruth" / f"crop{number}"
    first_class = sorted(p for p in crop.iterdir() if p.is_dir())[0]
    multiscale = json.loads((first_class / ".zattrs").read_text())["multiscales"][0]
    first = multiscale["datasets"][0]["coordinateTransformations"][1]["translation"]
    return first, [t + 4.0 * (n - 1) for t, n in zip(first, SPEC.crop_shape, strict=True)]


# --- The rules, without S3 -----------------------------------------------------------------


def levels_8nm() -> list[Level]:
    """Five 2x levels from 8 nm, s4 with a size-1 z axis."""
    shapes = [(16, 32, 32), (8, 16, 16), (4, 8, 8), (2, 4, 4), (1, 2, 2)]
    return [
        Level(f"s{n}", (8.0 * 2**n,) * 3, ((2**n - 1) * 4.0,) * 3, shape)  # type: ignore[arg-type]
        for n, shape in enumerate(shapes)
    ]


@pytest.mark.parametrize(
    ("voxel_size", "all_resolutions", "chosen"),
    [
        ((4.0, 4.0, 4.0), False, ["s0", "s1", "s2", "s3"]),  # finer crop: every level
        ((8.0, 8.0, 8.0), False, ["s0", "s1", "s2", "s3"]),  # ratio 1 > 0.8
        ((9.0, 9.0, 9.0), False, ["s0", "s1", "s2", "s3"]),  # 8/9 = 0.89 > 0.8
        ((10.0, 10.0, 10.0), False, ["s1", "s2", "s3"]),  # 8/10 = 0.8 is not above 0.8
        ((8.0, 8.0, 16.0), False, ["s1", "s2", "s3"]),  # every axis must pass
        ((16.0, 16.0, 16.0), True, ["s0", "s1", "s2", "s3"]),  # all: still no size-1 axis
    ],
)
def test_em_levels_follow_the_ratio_rule(
    voxel_size: tuple[float, float, float], all_resolutions: bool, chosen: list[str]
) -> None:
    levels = em_levels(levels_8nm(), voxel_size, all_resolutions=all_resolutions)
    assert [level.path for level in levels] == chosen


def test_level_region_is_nearest_voxels_padded_and_clipped() -> None:
    s1 = levels_8nm()[1]  # 16 nm, voxel 0 centred at 4 nm, 8x16x16
    first, last = (40.0, 56.0, 24.0), (72.0, 88.0, 56.0)
    assert level_region(s1, first, last, 0) == ((2, 3, 1), (5, 6, 4))
    assert level_region(s1, first, last, 3) == ((0, 0, 0), (8, 9, 7))  # z clipped at 8
    # A tie (exactly between two centres) goes to the higher index, as pandas' nearest.
    assert level_region(s1, (12.0, 12.0, 12.0), (12.0, 12.0, 12.0), 0) == ((1, 1, 1), (2, 2, 2))
    # Outside the array: clipped to its edge voxels.
    assert level_region(s1, (-500.0,) * 3, (9999.0,) * 3, 0) == ((0, 0, 0), (8, 16, 16))


@pytest.mark.parametrize("separator", ["/", "."])
def test_chunk_keys_lists_only_stored_chunks_in_range(separator: str, tmp_path: Path) -> None:
    for z, y, x in [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0), (2, 1, 1)]:
        path = tmp_path.joinpath(*separator.join(map(str, (z, y, x))).split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (z + 1))
    (tmp_path / ".zarray").write_text("{}")
    ranges = [range(0, 2), range(0, 2), range(0, 1)]  # z 0-1, y 0-1, x 0
    keys = chunk_keys(filesystem_for(str(tmp_path)), str(tmp_path), ranges, separator)
    want = {(0, 0, 0): 1, (0, 1, 0): 1, (1, 0, 0): 2}  # (0, 2, 0) and (2, 1, 1): out of range
    assert keys == {separator.join(map(str, k)): n for k, n in want.items()}


def test_the_shipped_crop_manifest_has_the_challenge_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(manifests.FETCH_MANIFEST_VARIABLE, raising=False)
    rows = manifests.training_crop_rows()
    assert len(rows) == len({row.id for row in rows}) == 289  # one row per crop
    assert rows[0].id == 234 and rows[0].dataset == "jrc_cos7-1a"
    assert rows[0].crop_url.endswith(
        "/jrc_cos7-1a/jrc_cos7-1a.zarr/recon-1/labels/groundtruth/crop234"
    )
    assert rows[0].em_url.endswith("/jrc_cos7-1a/jrc_cos7-1a.zarr/recon-1/em/fibsem-uint8")


def test_crop_manifest_from_the_variable_and_no_web_address(
    manifest_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(manifests.FETCH_MANIFEST_VARIABLE, f"file://{manifest_files[0]}")
    assert [row.id for row in manifests.training_crop_rows()] == [1, 2, 3, 4]
    monkeypatch.setenv(manifests.FETCH_MANIFEST_VARIABLE, "https://example.org/manifest.csv")
    with pytest.raises(ValueError, match="CSC_FETCH_DATA_MANIFEST_URL"):
        manifests.training_crop_rows()
    with pytest.raises(FileNotFoundError, match=r"gone\.csv \(--manifest\) does not exist"):
        manifests.training_crop_rows("gone.csv")


def test_workers_option_names_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from csc.cli import fetch_data as command

    def parsed(*args: str) -> object:
        return command.make_context("fetch-data", list(args)).params["workers"]

    monkeypatch.delenv("CSC_FETCH_DATA_NUM_WORKERS", raising=False)
    assert parsed() == 16 and parsed("--num-workers", "3") == parsed("--workers", "3") == 3
    monkeypatch.setenv("CSC_FETCH_DATA_NUM_WORKERS", "5")  # the toolkit's variable
    assert parsed() == 5 and parsed("--workers", "2") == 2


def test_crop_selection(manifest_files: tuple[Path, Path]) -> None:
    crops, tests = map(str, manifest_files)
    chosen = select_crops("3,crop1", manifest=crops, test_crop_manifest=tests)
    assert [(c.id, c.dataset, c.space) for c in chosen] == [
        (3, "jrc_synth2", None),
        (1, "jrc_synth1", None),
    ]
    test = select_crops("test", manifest=crops, test_crop_manifest=tests)
    assert [(c.id, c.crop_url) for c in test] == [(901, None)]
    assert test[0].space is not None and test[0].space.last == (72.0, 88.0, 56.0)
    assert test[0].em_url == f"s3://{BUCKET}/jrc_synth1/jrc_synth1.zarr/{RAW}"
    everything = select_crops("all", manifest=crops, test_crop_manifest=tests)
    assert [c.id for c in everything] == [1, 2, 3, 4, 901]
    with pytest.raises(ValueError, match="crop7 not in the crop manifest"):
        select_crops("1,7", manifest=crops, test_crop_manifest=tests)
    with pytest.raises(ValueError, match="'x' is no crop number"):
        select_crops("x", manifest=crops, test_crop_manifest=tests)


# --- Against the bucket --------------------------------------------------------------------


def test_test_crop_fetches_only_the_chunks_it_touches(
    anonymous: None,
    bucket: str,
    source: Path,
    manifest_files: tuple,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    report = fetch_data(options(tmp_path, proxy, manifest_files, crops="test"))
    # s0 (8 nm) is finer than the crop's 16 nm; s4 has a size-1 axis.
    assert report.plan.crops[0].levels == ("s1", "s2", "s3")
    want = {"s1/0/0/0", "s1/1/0/0", "s2/0/0/0", "s3/0/0/0"}
    assert (
        em_chunk_gets(proxy)
        == Counter(want)
        == Counter({k.split("/", 1)[1]: n for k, n in em_chunk_gets(proxy, None).items()})
    )
    local = tmp_path / "jrc_synth1" / "jrc_synth1.zarr" / RAW
    got = {k for k in files_under(local) if not k.rsplit("/", 1)[-1].startswith(".")}
    assert got == want
    # Every level's metadata, the groups above it, and no ground truth (a test crop has none).
    for level in ("s0", "s1", "s2", "s3", "s4"):
        assert (local / level / ".zarray").read_bytes() == (
            source / "jrc_synth1" / "jrc_synth1.zarr" / RAW / level / ".zarray"
        ).read_bytes()
    assert (tmp_path / "jrc_synth1" / "jrc_synth1.zarr" / ".zgroup").is_file()
    assert not (tmp_path / "jrc_synth1" / "jrc_synth1.zarr" / "recon-1" / "labels").exists()
    assert report.num_fetched == len(report.plan.transfers)


def test_padding_and_all_resolutions_widen_the_chunks(
    anonymous: None,
    bucket: str,
    source: Path,
    manifest_files: tuple,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    fetch_data(options(tmp_path / "a", proxy, manifest_files, crops="test", raw_padding=3))
    assert {k for k in em_chunk_gets(proxy) if k.startswith("s1/")} == {
        "s1/0/0/0",
        "s1/0/1/0",
        "s1/1/0/0",
        "s1/1/1/0",
    }
    proxy.reset_counts()
    fetch_data(options(tmp_path / "b", proxy, manifest_files, crops="test", all_resolutions=True))
    first, last = TEST_CROP["translation"], (72.0, 88.0, 56.0)
    want = expected_chunks(source, "jrc_synth1", first, last, 0, ["s0", "s1", "s2", "s3"])
    assert {k for k in want if k.startswith("s0/")} == {
        "s0/1/0/0",
        "s0/1/1/0",
        "s0/2/0/0",
        "s0/2/1/0",
    }
    assert em_chunk_gets(proxy) == Counter(want)


@pytest.mark.slow
def test_training_crops_land_with_all_their_files_and_a_rerun_fetches_nothing(
    anonymous: None,
    bucket: str,
    source: Path,
    manifest_files: tuple,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    report = fetch_data(options(tmp_path, proxy, manifest_files, crops="1,3", raw_padding=1))
    for crop in report.plan.crops:
        dataset, name = crop.crop.dataset, crop.crop.name
        truth = f"{dataset}/{dataset}.zarr/recon-1/labels/groundtruth/{name}"
        assert files_under(tmp_path / truth) == files_under(source / truth)  # every file
        assert crop.levels == ("s0", "s1", "s2", "s3")  # 4 nm crops: every level but s4
    assert max(em_chunk_gets(proxy, None).values()) == 1  # each chunk once
    for dataset, number in (("jrc_synth1", 1), ("jrc_synth2", 3)):
        first, last = crop_corners(source / dataset / f"{dataset}.zarr", number)
        want = expected_chunks(source, dataset, first, last, 1, ["s0", "s1", "s2", "s3"])
        raw = tmp_path / dataset / f"{dataset}.zarr" / RAW
        got = {k for k in files_under(raw) if not k.rsplit("/", 1)[-1].startswith(".")}
        assert got == want and len(want) < 64
        assert all(
            files_under(raw)[k] == (source / dataset / f"{dataset}.zarr" / RAW / k).read_bytes()
            for k in got
        )
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    proxy.reset_counts()
    again = fetch_data(options(tmp_path, proxy, manifest_files, crops="1,3", raw_padding=1))
    assert again.num_fetched == 0 and not em_chunk_gets(proxy, None)
    assert proxy.num_requests("GET", "/groundtruth/crop1/mito/s0/0") == 0  # listed, not read
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_dry_run_writes_nothing_and_says_what_it_would_fetch(
    anonymous: None, bucket: str, manifest_files: tuple, proxy: FaultProxy, tmp_path: Path
) -> None:
    dest = tmp_path / "data"
    plan = plan_fetch(options(dest, proxy, manifest_files, crops="all"))
    lines = describe_plan(plan)
    assert not dest.exists() and not em_chunk_gets(proxy, None)
    assert lines[-1].startswith(f"would fetch {len(plan.transfers)} files (")
    assert (
        lines[4] == "crop901 jrc_synth1: test crop, no ground truth; EM levels s1 s2 s3: 4 chunks"
    )
    result = CliRunner().invoke(
        cli,
        [
            "fetch-data",
            "--dry-run",
            "--crops",
            "test",
            "--dest",
            str(dest),
            "--manifest",
            str(manifest_files[0]),
            "--test-crop-manifest",
            str(manifest_files[1]),
            "--endpoint-url",
            proxy.endpoint,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "EM levels s1 s2 s3: 4 chunks" in result.output and not dest.exists()


def test_cli_fetches_and_reports(
    anonymous: None, bucket: str, manifest_files: tuple, proxy: FaultProxy, tmp_path: Path
) -> None:
    arguments = [
        "fetch-data",
        "--crops",
        "test",
        "--dest",
        str(tmp_path),
        "--manifest",
        str(manifest_files[0]),
        "--test-crop-manifest",
        str(manifest_files[1]),
        "--endpoint-url",
        proxy.endpoint,
        "--num-workers",
        "2",
    ]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    assert re.search(
        r"fetched \d+ files \(.*\) for 1 crops into .*; 0 already complete", result.output
    )
    result = CliRunner().invoke(
        cli, ["fetch-data", "--crops", "1,99", "--manifest", str(manifest_files[0])]
    )
    assert result.exit_code == 1 and "crop99 not in the crop manifest" in result.output


@pytest.mark.slow
def test_a_users_file_is_kept_csc_own_outdated_file_replaced_stale_temporaries_removed(
    anonymous: None,
    bucket: str,
    s3_server: str,
    source: Path,
    manifest_files: tuple,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    fetch_data(options(tmp_path, proxy, manifest_files, crops="test"))
    raw = tmp_path / "jrc_synth1" / "jrc_synth1.zarr" / RAW
    mine = raw / "s2" / "0" / "0" / "0"
    mine.write_bytes(b"the user's own bytes")  # not what csc wrote: kept
    stale = raw / "s1" / "0" / "0" / ".0.99999999.fetch-partial"  # a killed run's (pid gone)
    stale.write_bytes(b"half")
    key = f"jrc_synth1/jrc_synth1.zarr/{RAW}/s3/0/0/0"
    original = (source / key).read_bytes()
    client = s3_client(s3_server)
    client.put_object(Bucket=BUCKET, Key=key, Body=original + b"more", ACL="public-read")
    try:
        report = fetch_data(options(tmp_path, proxy, manifest_files, crops="test"))
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=original, ACL="public-read")
    assert report.kept == (mine,) and mine.read_bytes() == b"the user's own bytes"
    assert report.replaced == (raw / "s3" / "0" / "0" / "0",)  # csc's, the source changed
    assert (raw / "s3/0/0/0").read_bytes() == original + b"more"
    assert report.num_partials_removed == 1 and not stale.exists()
    assert em_chunk_gets(proxy)["s3/0/0/0"] == 2 and em_chunk_gets(proxy)["s2/0/0/0"] == 1
    result = CliRunner().invoke(
        cli,
        [
            "fetch-data",
            "--crops",
            "test",
            "--dest",
            str(tmp_path),
            "--manifest",
            str(manifest_files[0]),
            "--test-crop-manifest",
            str(manifest_files[1]),
            "--endpoint-url",
            proxy.endpoint,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning: kept 1 files that differ from the source" in result.output
    assert "replaced 1 files csc had fetched" in result.output  # back to the original
    assert (raw / "s3/0/0/0").read_bytes() == original


@pytest.mark.slow
def test_a_killed_run_completes_on_rerun_with_identical_bytes(
    anonymous: None,
    bucket: str,
    source: Path,
    manifest_files: tuple,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    proxy.set("delay", delay_s=0.3, only=r"/em/fibsem-uint8/s\d+/\d+/\d+/\d+$")
    command = [
        sys.executable,
        "-m",
        "csc",
        "fetch-data",
        "--crops",
        "1,3",
        "--raw-padding",
        "2",
        "--dest",
        str(tmp_path),
        "--manifest",
        str(manifest_files[0]),
        "--test-crop-manifest",
        str(manifest_files[1]),
        "--workers",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sum(em_chunk_gets(proxy, None).values()) < 6:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()  # reaped, its pipes closed
    proxy.set("pass")
    # Whatever lies under a real name is complete; the rest is missing or temporary.
    partial = [p for p in tmp_path.rglob("*.fetch-partial")]
    for path, data in files_under(tmp_path).items():
        if not path.endswith(".fetch-partial"):
            assert data == (source / path).read_bytes(), path
    fetched_before = {k for k in files_under(tmp_path) if EM_CHUNK.search("/" + k)}
    report = fetch_data(options(tmp_path, proxy, manifest_files, crops="1,3", raw_padding=2))
    assert report.num_fetched > 0 and report.num_partials_removed == len(partial)
    after = files_under(tmp_path)
    assert not [p for p in after if p.endswith(".fetch-partial")]
    assert all(data == (source / path).read_bytes() for path, data in after.items())
    assert fetched_before < {k for k in after if EM_CHUNK.search("/" + k)}
    planned = {path.relative_to(tmp_path).as_posix() for path in report.plan.transfers}
    assert set(after) == planned  # every file of the plan, nothing else


@pytest.mark.slow
def test_training_on_fetched_data_gives_the_batches_of_training_from_s3(
    s3_env: str, bucket: str, manifest_files: tuple, proxy: FaultProxy, tmp_path: Path
) -> None:
    fetch_data(options(tmp_path, proxy, manifest_files, crops="1,2,3,4", raw_padding=16))
    local, remote = synth_rows(str(tmp_path)), synth_rows(f"s3://{BUCKET}")
    assert len(local) == len(remote) >= 4
    assert remote[0].raw_root.startswith(f"s3://{BUCKET}/") and local[0].raw_root.startswith(
        str(tmp_path)
    )
    assert_samples_equal(synth_samples(local), synth_samples(remote))


def test_failing_requests_are_retried_as_training_reads_are(
    anonymous: None,
    bucket: str,
    source: Path,
    manifest_files: tuple,
    proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    proxy.set("error", p=0.5, only=r"/em/fibsem-uint8/s\d+/\d+/\d+/\d+$")  # 503 SlowDown
    retrying = S3Options(endpoint_url=proxy.endpoint, timeout_s=60, retry_budget_s=10)
    with pytest.warns(S3RetryWarning, match="retrying for up to 10 s"):
        report = fetch_data(options(tmp_path, proxy, manifest_files, crops="test", s3=retrying))
    assert proxy.statuses[503] > 0 and report.num_fetched == len(report.plan.transfers)
    raw = f"jrc_synth1/jrc_synth1.zarr/{RAW}"
    for key in ("s1/0/0/0", "s1/1/0/0", "s2/0/0/0", "s3/0/0/0"):
        assert (tmp_path / raw / key).read_bytes() == (source / raw / key).read_bytes()
    proxy.set("error", p=1.0, only=r"/s1/1/0/0$")  # still failing when the budget is spent
    quick = S3Options(endpoint_url=proxy.endpoint, timeout_s=5, retry_budget_s=0.5)
    failing = options(tmp_path / "again", proxy, manifest_files, crops="test", s3=quick)
    with warnings.catch_warnings():  # a notice comes at most once per 10 s
        warnings.simplefilter("ignore", S3RetryWarning)
        with pytest.raises(StorageError, match=r"cannot read s3://fetch-public/\S+/s1/1/0/0 from"):
            fetch_data(failing)
    assert not list((tmp_path / "again").rglob("*.fetch-partial"))
