"""Fault suite, writers: `--overwrite` of predict, process and datasplit replaces only what csc
itself wrote (a marker in the group's .zattrs; a CSV that reads as a datasplit), nothing is
ever written inside an input store, and an interrupted or failed write leaves the old output
whole and no temporary file behind. Every refusal names the path and leaves each file that
existed before byte-identical."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from csc.cli import cli
from csc.config import TrainConfig, build_config
from csc.datasplit import check_writable, read_datasplit, write_datasplit
from csc.evaluation import EvaluationReport, is_report, write_json
from csc.prediction import predict
from csc.processing import process
from csc.storage import (
    StorageError,
    check_json_path,
    clean_stale,
    csc_output_command,
    staged_group,
    write_text_atomic,
)
from csc.synth import write_synthetic
from tests.faults import assert_unchanged, snapshot
from tests.test_predict import (
    SEARCH,
    SPEC,
    Echo,
    config_of,
    read_output,
    settings,
)

DATASET = "jrc_synth1"


class Boom(torch.nn.Module):
    """A model that fails at its first forward pass: a prediction that dies mid-write."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("writers-data")
    write_synthetic(out, SPEC)
    return out


def echo_config(data: Path, run: Path, **overrides: object) -> tuple[TrainConfig, str]:
    """A config whose model echoes the raw (no weights: an empty checkpoint), and that file."""
    config = config_of(data, run, model=Echo(), model_name="echo", **overrides)
    checkpoint = run / "echo.pth"
    torch.save({}, checkpoint)
    return config, str(checkpoint)


def store(data: Path) -> Path:
    return data / DATASET / f"{DATASET}.zarr"


def dead_pid() -> int:
    """The id of a process that has exited (as a killed run's is)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- 1. predict/process --overwrite replaces only csc's own groups ----------------------------


def test_predict_overwrite_refuses_ground_truth_it_did_not_write(
    data: Path, tmp_path: Path
) -> None:
    """A label root laid out {dataset}.zarr/{crop}/{label} given as --output: refused, with or
    without --overwrite, and every label file is still there, byte for byte."""
    config, checkpoint = echo_config(data, tmp_path / "run")
    labels = tmp_path / "labels"
    shutil.copytree(store(data) / "recon-1/labels/groundtruth", labels / f"{DATASET}.zarr")
    before = snapshot(labels)
    crop = labels / f"{DATASET}.zarr" / "crop1"
    with pytest.raises(FileExistsError, match=f"{crop} has no csc marker.*move {crop} away"):
        predict(
            config,
            crops=["crop1"],
            output=labels,
            checkpoint=checkpoint,
            overwrite=True,
            progress=False,
        )
    with pytest.raises(FileExistsError, match=f"{crop} already exist; pass --overwrite"):
        predict(config, crops=["crop1"], output=labels, checkpoint=checkpoint, progress=False)
    assert_unchanged(before, labels)
    assert not [p for p in labels.rglob("*") if "partial" in p.name or "replaced" in p.name]


def test_predict_overwrite_replaces_its_own_output_and_a_failure_keeps_it(
    data: Path, tmp_path: Path
) -> None:
    config, checkpoint = echo_config(data, tmp_path)
    (first,) = predict(config, crops=["crop2"], checkpoint=checkpoint, progress=False)
    assert csc_output_command(first.path) == "predict"
    values = read_output(first.path, "er")[0]
    stale = first.path.parent / f".crop2.partial-{dead_pid()}"  # a killed run's leftovers
    live = first.path.parent / f".crop2.partial-{os.getppid()}"  # a running one's: kept
    for partial in (stale, live):
        (partial / "nuc").mkdir(parents=True)
    (again,) = predict(
        config, crops=["crop2"], checkpoint=checkpoint, overwrite=True, progress=False
    )
    np.testing.assert_array_equal(read_output(again.path, "er")[0], values)
    assert not stale.exists() and live.is_dir()
    shutil.rmtree(live)
    before = snapshot(tmp_path / "predictions")
    failing = build_config({**settings(data, tmp_path), "model": Boom(), "model_name": "echo"})
    with pytest.raises(RuntimeError, match="boom"):
        predict(failing, crops=["crop2"], checkpoint=checkpoint, overwrite=True, progress=False)
    assert_unchanged(before, tmp_path / "predictions")
    assert snapshot(tmp_path / "predictions") == before  # no partial group left either


KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
import numpy as np
from csc.storage import staged_group
with staged_group(Path(sys.argv[1]), command="predict", overwrite=True) as group:
    group.create_array("nuc", shape=(4, 4), dtype="uint8")[...] = np.full((4, 4), 9, "uint8")
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-write, before the swap
"""


def test_a_killed_overwrite_leaves_the_old_output_whole(tmp_path: Path) -> None:
    """A real process SIGKILLed while writing the replacement: the old group is intact under
    its name, and the next write cleans the killed run's .partial-PID away."""
    target = tmp_path / "out" / f"{DATASET}.zarr" / "crop1"
    with staged_group(target, command="predict") as group:
        group.create_array("nuc", shape=(4, 4), dtype="uint8")[...] = 1
    before = snapshot(tmp_path / "out")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert_unchanged(before, tmp_path / "out")
    (partial,) = target.parent.glob(".crop1.partial-*")
    assert (partial / "nuc" / ".zarray").is_file()  # the half-written replacement
    clean_stale(target)
    assert not partial.exists() and snapshot(tmp_path / "out") == before


def test_a_swap_killed_between_its_renames_is_put_back(tmp_path: Path) -> None:
    """The old group moved aside (.replaced-PID) and the new one not yet in place: the next
    write puts the old one back under its name before anything else."""
    target = tmp_path / f"{DATASET}.zarr" / "crop1"
    with staged_group(target, command="process") as group:
        group.create_array("nuc", shape=(4,), dtype="uint8")[...] = 3
    before = snapshot(tmp_path)
    target.rename(target.parent / f".crop1.replaced-{dead_pid()}")
    clean_stale(target)
    assert snapshot(tmp_path) == before


def test_process_refuses_what_it_did_not_write_and_replaces_its_own(
    data: Path, tmp_path: Path
) -> None:
    config, checkpoint = echo_config(data, tmp_path, process_func=lambda p: p > 0.5)
    predict(config, crops=["crop1"], checkpoint=checkpoint, progress=False)
    (written,) = process(config, progress=False)
    assert csc_output_command(written) == "process"
    (again,) = process(config, overwrite=True, progress=False)
    assert again == written and csc_output_command(written) == "process"
    # Output another command wrote, or a group without csc's marker, is not process's own.
    predictions = tmp_path / "predictions"
    for victim, reason in (
        (predictions, "was written by csc predict"),
        (tmp_path / "plain", "has no csc marker"),
    ):
        group = victim / f"{DATASET}.zarr" / "crop1"
        if not group.exists():
            shutil.copytree(written, group)
            (group / ".zattrs").write_text("{}")
        before = snapshot(victim)
        with pytest.raises(FileExistsError, match=f"{group} {reason}"):
            process(
                config, source=tmp_path / "processed", output=victim, overwrite=True, progress=False
            )
        assert_unchanged(before, victim)
    # ... and predict does not replace process's output.
    before = snapshot(tmp_path / "processed")
    with pytest.raises(FileExistsError, match=f"{written} was written by csc process"):
        predict(
            config,
            crops=["crop1"],
            output=tmp_path / "processed",
            checkpoint=checkpoint,
            overwrite=True,
            progress=False,
        )
    assert_unchanged(before, tmp_path / "processed")


# --- 2. Nothing is written inside an input store ----------------------------------------------


@pytest.mark.parametrize(
    "inside",
    [
        f"{DATASET}/{DATASET}.zarr",
        f"{DATASET}/{DATASET}.zarr/recon-1/labels/groundtruth",
        DATASET,
    ],  # this last: {output}/{dataset}.zarr is the dataset's store itself
    ids=["the-store", "its-groundtruth", "its-folder"],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_into_an_input_store_is_refused(
    data: Path, tmp_path: Path, inside: str, overwrite: bool
) -> None:
    config, checkpoint = echo_config(data, tmp_path)
    before = snapshot(data)
    with pytest.raises(ValueError, match=f"lies inside {store(data)}, the raw store of {DATASET}"):
        predict(
            config,
            crops=["crop1"],
            output=data / inside,
            checkpoint=checkpoint,
            overwrite=overwrite,
            progress=False,
        )
    assert_unchanged(before, data)
    assert snapshot(data) == before  # not even a new file


def test_process_into_an_input_store_or_its_own_input_is_refused(
    data: Path, tmp_path: Path
) -> None:
    config, checkpoint = echo_config(data, tmp_path, process_func=lambda p: p > 0.5)
    predict(config, crops=["crop1"], checkpoint=checkpoint, progress=False)
    # Without a datasplit CSV the search path alone says where the input stores are.
    unsplit = build_config(
        {
            **settings(data, tmp_path),
            "process_func": lambda p: p > 0.5,
            "datasplit_path": str(tmp_path / "missing.csv"),
        }
    )
    before = snapshot(data)
    for chosen in (config, unsplit):
        with pytest.raises(ValueError, match=f"lies inside {store(data)}, .*choose an --output"):
            process(chosen, output=data / DATASET, overwrite=True, progress=False)
    assert snapshot(data) == before
    predictions = tmp_path / "predictions"
    before = snapshot(predictions)
    for output in (predictions, predictions / f"{DATASET}.zarr/crop1"):
        with pytest.raises(ValueError, match=f"--output {output} would write .* it reads"):
            process(config, output=output, overwrite=True, progress=False)
    assert snapshot(predictions) == before


ECHO_CONFIG = """
import torch


class Echo(torch.nn.Module):
    def forward(self, x):
        return torch.logit(x.clamp(1e-4, 1 - 1e-4)).repeat_interleave(3, dim=1)


model = Echo()
"""


def test_the_command_line_refuses_ground_truth_and_replaces_its_own(
    data: Path, tmp_path: Path
) -> None:
    _, checkpoint = echo_config(data, tmp_path)
    lines = [f"{key} = {value!r}" for key, value in settings(data, tmp_path).items()]
    path = tmp_path / "config.py"
    path.write_text("\n".join([ECHO_CONFIG, *lines, 'model_name = "echo"']) + "\n")
    runner = CliRunner()
    base = ["predict", str(path), "--crops", "crop1", "--checkpoint", checkpoint]
    done = runner.invoke(cli, base)
    assert done.exit_code == 0, done.output
    target = tmp_path / "predictions" / f"{DATASET}.zarr" / "crop1"
    again = runner.invoke(cli, [*base, "--overwrite"])
    assert again.exit_code == 0 and f"wrote {target}" in again.output, again.output
    assert csc_output_command(target) == "predict"
    before = snapshot(data)
    refused = runner.invoke(cli, [*base, "--overwrite", "--output", str(store(data))])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    message = refused.output.strip().splitlines()
    assert len(message) == 1 and f"lies inside {store(data)}" in message[0], refused.output
    assert snapshot(data) == before


# --- 3. datasplit --overwrite replaces only a datasplit CSV -----------------------------------


def datasplit_args(data: Path, csv_path: Path, *extra: str) -> list[str]:
    return [
        "datasplit",
        "--search-path",
        f"{data}/{SEARCH}",
        "--classes",
        "nuc,mito,er",
        "--csv-path",
        str(csv_path),
        *extra,
    ]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_datasplit_overwrite_refuses_a_label_zattrs_and_a_folder(
    data: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    before = snapshot(copy)
    runner = CliRunner()
    zattrs = store(copy) / "recon-1/labels/groundtruth/crop1/nuc/.zattrs"
    folder = store(copy) / "recon-1/labels/groundtruth/crop1"
    cases = {
        zattrs: f"{zattrs} does not read as a datasplit CSV, so --overwrite will not",
        folder: f"{folder} is a folder; give the CSV file's path",
    }
    for target, expected in cases.items():
        for extra in ((), ("--overwrite",)):
            done = runner.invoke(cli, datasplit_args(copy, target, *extra))
            lines = done.output.strip().splitlines()
            assert done.exit_code == 1 and len(lines) == 1, done.output
            if extra or target == folder:
                assert expected in lines[0], done.output
            else:
                assert f"{target} already exists; pass --overwrite" in lines[0]
    counts = runner.invoke(
        cli, ["counts", "--search-path", f"{copy}/{SEARCH}", "--csv", str(zattrs), "--overwrite"]
    )
    assert counts.exit_code == 1 and f"{zattrs} does not read as a counts CSV" in counts.output
    assert_unchanged(before, copy)
    assert snapshot(copy) == before and temporaries(tmp_path) == []


def test_datasplit_overwrite_replaces_a_datasplit_csv(data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    csv_path = tmp_path / "split.csv"
    done = runner.invoke(cli, datasplit_args(data, csv_path))
    assert done.exit_code == 0, done.output
    rows = read_datasplit(csv_path)
    csv_path.write_text("# edited by hand\n" + csv_path.read_text().replace("validate", "train"))
    again = runner.invoke(cli, datasplit_args(data, csv_path, "--overwrite"))
    assert again.exit_code == 0 and f"wrote {csv_path}" in again.output, again.output
    assert read_datasplit(csv_path) == rows and temporaries(tmp_path) == []
    # No rows: a .csv may be replaced (nothing in it to lose); any other name is refused.
    for name, replaced in (("empty.csv", True), (".zattrs", False), ("notes.txt", False)):
        path = tmp_path / name
        path.write_text("" if name != "notes.txt" else "not,a,datasplit\n")
        if replaced:
            write_datasplit(rows, path, overwrite=True)
            assert read_datasplit(path) == rows
        else:
            with pytest.raises(FileExistsError, match=f"{path} does not read as a datasplit"):
                write_datasplit(rows, path, overwrite=True)
            assert path.read_text() in ("", "not,a,datasplit\n")
    with pytest.raises(ValueError, match=f"{csv_path / 'x.csv'} cannot be written: {csv_path} is"):
        check_writable(csv_path / "x.csv", overwrite=True)
    assert temporaries(tmp_path) == []


def test_a_failed_csv_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "split.csv"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "half written \ud800")  # fails after the temporary exists
    assert path.read_text() == "old\n" and temporaries(tmp_path) == []
    with pytest.raises(StorageError, match=f"cannot write {tmp_path / 'gone' / 'x.csv'}"):
        write_text_atomic(tmp_path / "gone" / "x.csv", "text")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and temporaries(tmp_path) == []


def test_marker_round_trip_keeps_other_attributes(tmp_path: Path) -> None:
    from csc.storage import is_csc_output, mark_csc_output

    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4"}]
    assert csc_output_command(tmp_path / "g") is None
    mark_csc_output(tmp_path / "g", "predict")
    attrs = json.loads((tmp_path / "g" / ".zattrs").read_text())
    assert attrs["multiscales"] == [{"version": "0.4"}] and attrs["csc"]["command"] == "predict"
    assert is_csc_output(tmp_path / "g", "predict") and not is_csc_output(tmp_path / "g", "process")
    (tmp_path / "link").symlink_to(tmp_path / "g")
    assert not is_csc_output(tmp_path / "link", "predict")  # a link is never replaced


def test_counts_and_evaluate_overwrite_only_their_own_files(data: Path, tmp_path: Path) -> None:
    """`counts --csv` replaces only a counts table and `evaluate --json` only a report csc
    wrote; neither replaces a label .zattrs, a datasplit CSV or a folder."""
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    split = tmp_path / "split.csv"
    write_datasplit(read_datasplit_rows(copy), split)
    zattrs = store(copy) / "recon-1/labels/groundtruth/crop1/nuc/.zattrs"
    before = {**snapshot(copy), "split": split.read_text()}
    runner = CliRunner()
    counts = ["counts", "--search-path", f"{copy}/{SEARCH}", "--overwrite", "--csv"]
    evaluate = ["evaluate", "--predictions", str(tmp_path / "none"), "--datasplit", str(split)]
    refused = {
        (*counts, str(split)): f"{split} does not read as a counts CSV",
        (*evaluate, "--json", str(zattrs), "--overwrite"): f"{zattrs} is not an evaluation report",
        (*evaluate, "--json", str(split), "--overwrite"): f"{split} is not an evaluation report",
        (*evaluate, "--json", str(copy), "--overwrite"): f"'{copy}' is a directory",
    }
    for args, expected in refused.items():
        done = runner.invoke(cli, list(args))  # exit 2: click's own check of a folder
        assert done.exit_code in (1, 2) and expected in done.output, done.output
    assert_unchanged({k: v for k, v in before.items() if k != "split"}, copy)
    assert split.read_text() == before["split"] and temporaries(tmp_path) == []
    table = tmp_path / "counts.csv"
    for _ in range(2):  # written, then replaced: it is a counts table csc wrote
        done = runner.invoke(cli, [*counts, str(table)])
        assert done.exit_code == 0 and f"wrote {table}" in done.output, done.output
    assert table.read_text().startswith("dataset,class,crops,foreground_voxels\n")
    report = tmp_path / "report.json"
    empty = EvaluationReport(str(tmp_path), 0.5, 1, [], [], {})
    write_json(empty, report, overwrite=False)
    # csc's own report: replaceable
    assert check_json_path(report, overwrite=True, is_ours=is_report) == report


def read_datasplit_rows(root: Path) -> list:
    from csc.datasplit import CrawlOptions, SplitOptions, make_datasplit

    crawl = CrawlOptions(search_path=f"{root}/{SEARCH}", classes=("nuc", "mito"))
    return make_datasplit(crawl, SplitOptions(0.5, 0, None))[0]
