"""Datasplit: crawl, seeded split, filters, the CSV format both ways, S3 on a local server."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from csc.cli import cli
from csc.config import load_config
from csc.datasplit import (
    CrawlOptions,
    DatasplitRow,
    SplitOptions,
    count_classes,
    crawl,
    ensure_datasplit,
    format_rows,
    make_datasplit,
    read_datasplit,
    split,
    write_datasplit,
)
from csc.storage import StorageError, level_transforms, multiscales_attrs
from csc.synth import SynthSpec, write_synthetic
from tests.s3server import s3_client, upload_tree

SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
ALL = ("nuc", "mito", "er")


def write_group(path: Path, scale: Sequence[float] = (4, 4, 4), *, n5: bool = False) -> None:
    """A minimal multiscale group: metadata only, which is all the crawler reads."""
    path.mkdir(parents=True, exist_ok=True)
    attrs = multiscales_attrs(path.name, level_transforms(scale, (0, 0, 0), 1))
    if n5:
        (path / "attributes.json").write_text(json.dumps(attrs))
        return
    (path / ".zgroup").write_text('{"zarr_format": 2}')
    (path / ".zattrs").write_text(json.dumps(attrs))


def make_layout(
    root: Path,
    crops: Mapping[str, Mapping[str, Sequence[str]]],
    *,
    scales: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """{dataset: {crop: [classes]}} as CellMap groups; a raw group for every dataset."""
    for dataset, dataset_crops in crops.items():
        recon = root / dataset / f"{dataset}.zarr" / "recon-1"
        write_group(recon / "em/fibsem-uint8", (8, 8, 8))
        for crop, classes in dataset_crops.items():
            for name in classes:
                scale = (scales or {}).get(f"{crop}/{name}", (4, 4, 4))
                write_group(recon / "labels/groundtruth" / crop / name, scale)
            # Chunk-like clutter that a crawl must never descend into.
            (recon / "labels/groundtruth" / crop / "notes").mkdir()


def options(root: Path, **changes: object) -> CrawlOptions:
    return dataclasses.replace(CrawlOptions(search_path=f"{root}/{SEARCH}", classes=ALL), **changes)


def usages(rows: Sequence[DatasplitRow]) -> dict[str, str]:
    return {f"{r.dataset}/{r.crop}": r.usage for r in rows}


def test_exact_csv_bytes_for_a_known_layout(tmp_path: Path) -> None:
    make_layout(
        tmp_path,
        {
            "jrc_b": {"crop10": ["er", "nuc"], "crop2": ["mito"]},
            "jrc_a": {"crop7": ["nuc", "er", "ves"]},
        },
    )
    rows, left_out = make_datasplit(
        options(tmp_path, classes=("nuc", "er", "mito")), SplitOptions(0.3, 1, None)
    )
    a, b = f"{tmp_path}/jrc_a/jrc_a.zarr", f"{tmp_path}/jrc_b/jrc_b.zarr"
    raw, gt = "recon-1/em/fibsem-uint8", "recon-1/labels/groundtruth"
    assert format_rows(rows) == (
        f'"train","{a}","{raw}","{a}","{gt}/crop7/[nuc,er]"\n'
        f'"validate","{b}","{raw}","{b}","{gt}/crop2/[mito]"\n'
        f'"train","{b}","{raw}","{b}","{gt}/crop10/[nuc,er]"\n'
    )
    assert left_out == []
    path = write_datasplit(rows, tmp_path / "split.csv")
    assert path.read_text() == format_rows(rows)


def test_split_is_seeded_and_differs_between_seeds(tmp_path: Path) -> None:
    make_layout(tmp_path, {"jrc_a": {f"crop{i}": ["nuc"] for i in range(20)}})
    crops = crawl(options(tmp_path)).crops
    first = split(crops, ALL, SplitOptions(0.25, 7))[0]
    assert first == split(list(reversed(crops))[::-1], ALL, SplitOptions(0.25, 7))[0]
    assert sum(r.usage == "validate" for r in first) == 5
    others = [usages(split(crops, ALL, SplitOptions(0.25, seed))[0]) for seed in (8, 9)]
    assert usages(first) != others[0] or usages(first) != others[1]


@pytest.mark.parametrize("ratio", [0.01, 0.5, 0.99])
def test_each_split_gets_a_crop_given_two(tmp_path: Path, ratio: float) -> None:
    make_layout(tmp_path, {"jrc_a": {"crop1": ["nuc"], "crop2": ["er"]}})
    rows, _ = make_datasplit(options(tmp_path), SplitOptions(ratio, 0, None))
    assert sorted(r.usage for r in rows) == ["train", "validate"]


def test_no_validation_when_ratio_is_zero_or_one_crop(tmp_path: Path) -> None:
    make_layout(tmp_path, {"jrc_a": {"crop1": ["nuc"], "crop2": ["er"]}})
    assert {r.usage for r in make_datasplit(options(tmp_path), SplitOptions(0.0))[0]} == {"train"}
    rows, _ = make_datasplit(options(tmp_path, crops=("crop1",)), SplitOptions(0.5))
    assert [r.usage for r in rows] == ["train"]


def test_class_dataset_and_crop_filters(tmp_path: Path) -> None:
    make_layout(
        tmp_path,
        {
            "jrc_a": {"crop1": ["nuc", "er"], "crop2": ["mito"], "crop30": ["er"]},
            "jrc_b": {"crop4": ["nuc"]},
            "other": {"crop5": ["nuc"]},
        },
    )
    found = crawl(options(tmp_path, classes=("er", "nuc"))).crops
    assert [(r.dataset, r.crop, r.classes) for r in found] == [
        ("jrc_a", "crop1", ("er", "nuc")),  # requested order, not the disk's
        ("jrc_a", "crop30", ("er",)),
        ("jrc_b", "crop4", ("nuc",)),
        ("other", "crop5", ("nuc",)),
    ]
    found = crawl(options(tmp_path, datasets=("jrc_*",), crops=("crop1", "crop[2-4]"))).crops
    assert [f"{r.dataset}/{r.crop}" for r in found] == ["jrc_a/crop1", "jrc_a/crop2", "jrc_b/crop4"]


def test_scale_filter_keeps_classes_fine_enough_on_every_axis(tmp_path: Path) -> None:
    scales = {"crop1/er": (8, 8, 8), "crop2/nuc": (4, 4, 16), "crop2/er": (4, 4, 4)}
    make_layout(
        tmp_path,
        {"jrc_a": {"crop1": ["nuc", "er"], "crop2": ["nuc", "er"], "crop3": ["er"]}},
        scales=scales,
    )
    isotropic = crawl(options(tmp_path, scale=(4.0,))).crops
    assert [(r.crop, r.classes) for r in isotropic] == [
        ("crop1", ("nuc",)),
        ("crop2", ("er",)),
        ("crop3", ("er",)),
    ]
    per_axis = crawl(options(tmp_path, scale=(4.0, 4.0, 16.0))).crops
    assert [(r.crop, r.classes) for r in per_axis][:2] == [
        ("crop1", ("nuc",)),
        ("crop2", ("nuc", "er")),
    ]
    assert len(crawl(options(tmp_path, scale=(8.0,))).crops[0].classes) == 2


@pytest.mark.parametrize("mode", [None, "validate", "train", "both"])
def test_force_all_classes_modes(tmp_path: Path, mode: str | None) -> None:
    make_layout(
        tmp_path,
        {"a": {"crop1": ["nuc", "er"], "crop2": ["nuc"], "crop3": ["er"], "crop4": ["er", "nuc"]}},
    )
    rows, left_out = make_datasplit(
        options(tmp_path, classes=("nuc", "er")), SplitOptions(0.25, 3, mode)
    )
    split_of = usages(rows)
    complete = [split_of.get("a/crop1"), split_of.get("a/crop4")]
    incomplete = [split_of.get("a/crop2"), split_of.get("a/crop3")]
    if mode is None:  # one of four crops validates, whatever it lacks
        assert sorted(split_of.values()) == ["train", "train", "train", "validate"]
    elif mode == "validate":  # crops lacking a class are moved out of validation
        assert incomplete == ["train", "train"] and sorted(complete) == ["train", "validate"]
    elif mode == "train":  # ... out of training
        assert incomplete == ["validate", "validate"] and complete == ["train", "train"]
    else:  # ... out of both
        assert incomplete == [None, None] and sorted(complete) == ["train", "validate"]
        assert left_out == ["a/crop2: lacks er", "a/crop3: lacks nuc"]


def test_existing_csv_is_never_overwritten_without_asking(tmp_path: Path) -> None:
    make_layout(tmp_path, {"jrc_a": {"crop1": ["nuc"], "crop2": ["er"]}})
    csv_path = tmp_path / "datasplit.csv"
    csv_path.write_text("# hand-edited\n")
    rows, _ = make_datasplit(options(tmp_path), SplitOptions())
    with pytest.raises(FileExistsError, match=r"datasplit.csv already exists; pass --overwrite"):
        write_datasplit(rows, csv_path)
    assert csv_path.read_text() == "# hand-edited\n"
    result = CliRunner().invoke(
        cli, ["datasplit", "--search-path", f"{tmp_path}/{SEARCH}", "--csv-path", str(csv_path)]
    )
    assert result.exit_code == 1
    assert "already exists; pass --overwrite" in result.output
    assert csv_path.read_text() == "# hand-edited\n"
    write_datasplit(rows, csv_path, overwrite=True)
    assert read_datasplit(csv_path) == rows


def test_train_mode_that_leaves_nothing_to_train_on_is_an_error(tmp_path: Path) -> None:
    make_layout(tmp_path, {"a": {"crop1": ["nuc"], "crop2": ["er"]}})
    with pytest.raises(ValueError, match="leaves nothing to train on"):
        make_datasplit(options(tmp_path, classes=("nuc", "er")), SplitOptions(0.5, 0, "train"))
    rows, notes = make_datasplit(
        options(tmp_path, classes=("nuc", "er")), SplitOptions(0.5, 0, "validate")
    )
    assert {r.usage for r in rows} == {"train"}
    assert notes == ["validation is empty: no crop has every class of ['nuc', 'er']"]
    with pytest.raises(ValueError, match=r"(?s)no crops with classes.*a/crop1: lacks er"):
        make_datasplit(options(tmp_path, classes=("nuc", "er")), SplitOptions(0.5, 0, "both"))


def test_n5_raw_fallback(tmp_path: Path) -> None:
    make_layout(tmp_path, {"jrc_a": {"crop1": ["nuc"]}})
    shutil.rmtree(tmp_path / "jrc_a/jrc_a.zarr/recon-1/em")
    write_group(tmp_path / "jrc_a/jrc_a.n5/recon-1/em/fibsem-uint8", n5=True)
    (row,) = crawl(options(tmp_path)).crops
    assert row.raw_root == f"{tmp_path}/jrc_a/jrc_a.n5"
    assert row.raw_path == "recon-1/em/fibsem-uint8"
    assert row.gt_root == f"{tmp_path}/jrc_a/jrc_a.zarr"


def test_crops_without_raw_are_reported_and_skipped(tmp_path: Path) -> None:
    make_layout(tmp_path, {"jrc_a": {"crop1": ["nuc"]}, "jrc_b": {"crop2": ["nuc"]}})
    shutil.rmtree(tmp_path / "jrc_b/jrc_b.zarr/recon-1/em")
    report = crawl(options(tmp_path))
    assert [r.crop for r in report.crops] == ["crop1"]
    assert report.skipped == ["jrc_b/crop2: no raw 'em/fibsem-uint8' found for jrc_b"]


def test_reader_accepts_comments_three_columns_and_relative_roots(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    csv_path = tmp_path / "sub/split.csv"
    csv_path.write_text(
        '#note,"unclosed quote in a comment\n'
        "# usage, raw, gt\n"
        '"train","../data/a.zarr","recon-1/em/fibsem-uint8","../data/a.zarr",'
        '"recon-1/labels/groundtruth/crop1/[nuc,er]"\n'
        "\n"
        "validate,s3://bucket/b/b.zarr/recon-1/em/fibsem-uint8,"
        "s3://bucket/b/b.zarr/recon-1/labels/groundtruth/crop2/[mito]\n"
    )
    first, second = read_datasplit(csv_path)
    assert first == DatasplitRow(
        "train",
        f"{tmp_path}/data/a.zarr",
        "recon-1/em/fibsem-uint8",
        f"{tmp_path}/data/a.zarr",
        "recon-1/labels/groundtruth/crop1",
        ("nuc", "er"),
    )
    assert (second.usage, second.raw_root, second.gt_path, second.classes) == (
        "validate",
        "s3://bucket/b/b.zarr",
        "recon-1/labels/groundtruth/crop2",
        ("mito",),
    )
    assert (first.dataset, first.crop) == ("a", "crop1")


def test_relative_csv_round_trip(tmp_path: Path) -> None:
    make_layout(tmp_path / "data", {"jrc_a": {"crop1": ["nuc"], "crop2": ["er"]}})
    rows, _ = make_datasplit(options(tmp_path / "data"), SplitOptions())
    path = write_datasplit(rows, tmp_path / "split.csv", relative=True)
    assert '"data/jrc_a/jrc_a.zarr"' in path.read_text()
    assert read_datasplit(path) == rows


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('"train","a.zarr","raw","x"\n', "line 1: .*expected 5 fields"),
        ('"train","a/raw","b/crop1/[nuc]"\n', "line 1: .a/raw. has no component ending in .zarr"),
        ('"test","a.zarr","r","a.zarr","c/[nuc]"\n', "line 1: usage must be .train. or .validate."),
        (
            '"train","a.zarr","r","a.zarr","crop1"\n',
            r"line 1: label path .crop1. must end in /\[class",
        ),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=f"bad.csv, {message}"):
        read_datasplit(tmp_path / "bad.csv")


def test_train_builds_the_datasplit_from_the_config(tmp_path: Path, tiny_synth: Path) -> None:
    config_path = tmp_path / "config.py"
    config_path.write_text(
        f"search_path = '{tiny_synth}/{SEARCH}'\nclasses = ['nuc', 'mito', 'er']\n"
        "validation_prob = 0.5\nforce_all_classes = None\nrandom_seed = 3\n"
    )
    config = load_config(config_path)
    messages: list[str] = []
    path = ensure_datasplit(config, echo=messages.append)
    assert path == tmp_path / "datasplit.csv"
    assert messages[0].startswith(f"wrote datasplit {path} (4 crops: 2 train, 2 validate)")
    expected, _ = make_datasplit(
        CrawlOptions(search_path=f"{tiny_synth}/{SEARCH}", classes=ALL), SplitOptions(0.5, 3)
    )
    assert read_datasplit(path) == expected
    edited = "# the user's own\n" + path.read_text()  # kept, once its classes are checked
    path.write_text(edited)
    assert ensure_datasplit(config, echo=messages.append) == path
    assert path.read_text() == edited


def test_demo_builds_its_datasplit_at_the_repository_root(tmp_path: Path) -> None:
    """`make demo` builds datasplit.csv at the repository root on its first run (the file is the
    demo's output, not committed): the demo config over data laid out as `csc synth data` writes
    it (smaller volumes) lists every crop of both datasets, some to train, some to validate."""
    repo = Path(__file__).parents[1]
    assert load_config(repo / "examples/train_2D.py").datasplit_path == str(repo / "datasplit.csv")
    spec = SynthSpec(shape=(16, 64, 64), crop_shape=(8, 32, 32), chunks=(8, 32, 32))
    write_synthetic(tmp_path / "data", spec)
    csv_path = tmp_path / "datasplit.csv"
    overrides = [f"search_path={tmp_path}/data/{SEARCH}", f"datasplit_path={csv_path}"]
    config = load_config(repo / "examples/train_2D.py", overrides)
    messages: list[str] = []
    assert ensure_datasplit(config, echo=messages.append) == csv_path
    rows = read_datasplit(csv_path)
    assert len(rows) == spec.num_datasets * spec.num_crops
    assert {row.usage for row in rows} == {"train", "validate"}
    assert {Path(row.raw_root).name for row in rows} == {"jrc_synth1.zarr", "jrc_synth2.zarr"}
    assert messages[0].startswith(f"wrote datasplit {csv_path}")


def test_counts_from_metadata_equal_counting_voxels(tmp_path: Path, tiny_synth: Path) -> None:
    shutil.copytree(tiny_synth, tmp_path / "copy")
    crawl_options = CrawlOptions(search_path=f"{tmp_path}/copy/{SEARCH}", classes=ALL)
    from_metadata, skipped = count_classes(crawl_options)
    assert skipped == []
    for attrs in (tmp_path / "copy").rglob("labels/groundtruth/*/*/s*/.zattrs"):
        attrs.write_text("{}")  # drop CellMap's complement_counts: csc must count
    assert count_classes(crawl_options)[0] == from_metadata
    assert {row["dataset"] for row in from_metadata} == {"jrc_synth1", "jrc_synth2"}
    assert sum(row["foreground_voxels"] for row in from_metadata) > 0


def test_datasplit_and_counts_commands(tmp_path: Path, tiny_synth: Path) -> None:
    runner = CliRunner()
    csv_path = tmp_path / "out.csv"
    base = ["--search-path", f"{tiny_synth}/{SEARCH}", "--classes", "nuc,mito,er"]
    dry = runner.invoke(cli, ["datasplit", *base, "--csv-path", str(csv_path), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing written" in dry.output and not csv_path.exists()
    made = runner.invoke(cli, ["make-datasplit", *base, "--csv-path", str(csv_path)])
    assert made.exit_code == 0, made.output
    assert f"wrote {csv_path}: 4 crops" in made.output
    counted = runner.invoke(cli, ["counts", *base, "--csv", str(tmp_path / "counts.csv")])
    assert counted.exit_code == 0, counted.output
    assert "foreground_voxels" in counted.output
    assert (tmp_path / "counts.csv").read_text().startswith("dataset,class,crops,foreground_voxels")
    again = runner.invoke(cli, ["counts", *base, "--csv", str(tmp_path / "counts.csv")])
    assert again.exit_code == 1 and "already exists; pass --overwrite" in again.output
    missing = runner.invoke(
        cli, ["datasplit", "--search-path", f"{tmp_path}/{SEARCH}", "--dry-run"]
    )
    assert missing.exit_code == 1 and "no crops with classes nuc,er found" in missing.output


# --- S3, on a real S3 API server on 127.0.0.1 --------------------------------------------------


def local_and_s3(tiny_synth: Path, bucket: str) -> tuple[list, list]:
    local = crawl(CrawlOptions(search_path=f"{tiny_synth}/{SEARCH}", classes=ALL)).crops
    remote = crawl(CrawlOptions(search_path=f"s3://{bucket}/{SEARCH}", classes=ALL)).crops
    return local, remote


def without_roots(rows: Sequence[DatasplitRow]) -> list[tuple]:
    return [(r.usage, r.dataset, r.raw_path, r.gt_path, r.classes) for r in rows]


def test_s3_crawl_anonymous_matches_local(s3_env: str, s3_synth: str, tiny_synth: Path) -> None:
    local, remote = local_and_s3(tiny_synth, f"{s3_synth}-public")
    assert without_roots(remote) == without_roots(local) and len(remote) == 4
    assert remote[0].gt_root == "s3://synth-public/jrc_synth1/jrc_synth1.zarr"
    rows, _ = split(remote, ALL, SplitOptions(0.5, 1))
    assert usages(rows) == usages(split(local, ALL, SplitOptions(0.5, 1))[0])


def test_s3_crawl_with_credentials(
    s3_env: str, s3_synth: str, tiny_synth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = f"{s3_synth}-private"
    scaled = CrawlOptions(search_path=f"s3://{bucket}/{SEARCH}", classes=ALL, scale=(4.0,))
    denied = r"access to s3://synth-private at http://127.0.0.1:\d+ was denied: check whether"
    with pytest.raises(StorageError, match=denied):
        crawl(scaled)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    local, remote = local_and_s3(tiny_synth, bucket)
    assert without_roots(remote) == without_roots(local)
    assert len(crawl(scaled).crops) == len(local)
    assert (
        count_classes(scaled)[0]
        == count_classes(dataclasses.replace(scaled, search_path=f"{tiny_synth}/{SEARCH}"))[0]
    )


def test_s3_requests_grow_with_crops_not_chunks(s3_env: str, tmp_path: Path) -> None:
    counts = []
    spec = SynthSpec(
        num_datasets=1,
        num_crops=2,
        shape=(16, 32, 32),
        crop_shape=(8, 16, 16),
        missing_class_prob=0.0,
    )
    for chunks, bucket in (((16, 32, 32), "big-chunks"), ((4, 8, 8), "small-chunks")):
        spec = dataclasses.replace(spec, chunks=chunks)
        write_synthetic(tmp_path / bucket, spec)
        upload_tree(s3_env, tmp_path / bucket, bucket, public=True)
        report = crawl(CrawlOptions(search_path=f"s3://{bucket}/{SEARCH}", classes=ALL))
        assert len(report.crops) == 2
        counts.append(report.num_requests)
    # The bucket (datasets), groundtruth (crops), one per crop (classes), the raw: 1 + 1 + 2 + 1.
    assert counts == [5, 5]


def test_s3_missing_bucket_and_dead_endpoint_are_one_line_errors(
    s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["datasplit", "--s3", "--bucket", "no-such-bucket", "--dry-run"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: s3://no-such-bucket not found at {s3_env}: check the bucket name (--bucket) "
        "and the path"
    )
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    start = time.monotonic()
    arguments = [
        "counts",
        "--s3",
        "--bucket",
        "b",
        "--endpoint-url",
        dead,
        "--s3-retry-budget",
        "2",
    ]
    result = runner.invoke(cli, arguments)
    assert time.monotonic() - start < 15  # refused connections are retried within the budget
    assert result.exit_code == 1
    notice, error = result.output.strip().splitlines()
    assert notice.startswith(f"warning: S3 read of s3://b from {dead} failed (")
    assert notice.endswith("retrying for up to 2 s (s3_retry_budget_s)")
    assert error.startswith(f"Error: cannot read s3://b from {dead} (")
    assert "(s3_retry_budget_s = 2 s) is spent; check the endpoint (s3_endpoint_url," in error


def test_s3_client_helper_targets_loopback_only(s3_env: str) -> None:
    assert s3_client(s3_env).meta.endpoint_url.startswith("http://127.0.0.1:")
