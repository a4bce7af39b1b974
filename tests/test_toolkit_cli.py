"""The challenge toolkit's command line spellings (`csc make-datasplit -vr 0.1 -sp ...`,
`csc predict CONFIG -c 1 -o ... -so -O`, `--search_path`, ...) run csc's commands and give what
csc's own spellings give: the same datasplit CSV bytes, counts, predictions and processed
masks, from real runs on synthetic data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result

from csc.cli import (
    TOOLKIT_COMMANDS,
    TOOLKIT_SPELLED,
    Spelled,
    _config_with,
    cli,
    counts,
    datasplit,
    fetch_data,
    predict,
    process,
)
from csc.synth import write_synthetic
from tests.test_cli import run_without_torch_check
from tests.test_predict import SPEC, config_of, save_weights, settings

SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
CROP_NAME = "labels/groundtruth/{crop}/{label}"
DOCS = Path(__file__).parents[1] / "docs/cli.md"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_help_lists_both_names_without_importing_torch() -> None:
    listing = run_without_torch_check("--help")
    assert listing.returncode == 0, listing.stderr
    assert "make-datasplit  Same as `csc datasplit`." in listing.stdout
    assert "get-counts      Same as `csc counts`." in listing.stdout
    assert re.search(r"\n  datasplit +Crawl zarr stores", listing.stdout)  # any column width
    usage = run_without_torch_check("make-datasplit", "--help")
    assert usage.returncode == 0, usage.stderr
    assert "Usage: csc make-datasplit [OPTIONS]" in usage.stdout
    assert "-vr, --validate-ratio, --validate_ratio FLOAT" in usage.stdout


@pytest.mark.parametrize(
    "command", [datasplit, counts, predict, process, fetch_data], ids=lambda c: c.name
)
def test_every_toolkit_name_is_in_help_and_in_the_docs(command: click.Command) -> None:
    text = invoke(command.name or "", "--help").output
    documented = DOCS.read_text()
    spelled = [p for p in command.params if isinstance(p, Spelled)]
    assert spelled
    for param in spelled:
        for name in param.toolkit:
            assert name in text, name
            assert f"`{name}`" in documented, name
    for alias, name in TOOLKIT_COMMANDS.items():
        assert f"`csc {alias}`" in documented and f"`csc {name}`" in documented


def test_multi_letter_flags_parse_as_the_toolkit_means() -> None:
    def parsed(*args: str) -> dict[str, object]:
        return datasplit.make_context("make-datasplit", list(args)).params

    for spelling in ("-s3", "--s3", "--use-s3", "--use_s3"):
        assert parsed(spelling)["use_s3"] is True
    assert parsed("-s", "8")["scale"] == "8" and parsed("-s", "8")["use_s3"] is False
    assert parsed("-s3", "-s", "4,4")["scale"] == "4,4"
    assert parsed("-sp", "a/{dataset}/{name}")["search_path"] == "a/{dataset}/{name}"
    assert (
        parsed("-vr", "0.3")["validate_ratio"]
        == parsed("--validate_ratio", "0.3")["validate_ratio"]
    )
    spelled = predict.make_context("predict", ["c.py", "-s", "x", "-so", "-O"])
    assert spelled.params["search_path"] == "x" and spelled.params["skip_orthoplanes"]
    assert spelled.params["overwrite"] and spelled.meta[TOOLKIT_SPELLED]
    own = predict.make_context("predict", ["c.py", "--overwrite", "--search-path", "x"])
    assert own.params["overwrite"] and not own.meta[TOOLKIT_SPELLED]
    after_dashes = predict.make_context("predict", ["c.py", "--", "-O"])  # -O: an override
    assert not after_dashes.meta[TOOLKIT_SPELLED] and after_dashes.params["overrides"] == ("-O",)


def datasplit_csv(*args: str, csv: Path) -> bytes:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"wrote {csv}" in result.output
    return csv.read_bytes()


@pytest.mark.parametrize(
    ("flag", "choice"), [("-fa", "both"), ("-ft", "train"), ("-fv", "validate")]
)
def test_make_datasplit_flags_write_the_same_csv(
    tiny_synth: Path, tmp_path: Path, flag: str, choice: str
) -> None:
    search = f"{tiny_synth}/{SEARCH}"
    own = datasplit_csv(
        *("datasplit", "--search-path", search, "--raw-name", "em/fibsem-uint8"),
        *("--crop-name", CROP_NAME, "--classes", "nuc,er", "--validate-ratio", "0.5"),
        *("--scale", "8", "--force-all-classes", choice, "--csv-path", str(tmp_path / "a.csv")),
        csv=tmp_path / "a.csv",
    )
    toolkit = datasplit_csv(
        *("make-datasplit", "-sp", search, "-rn", "em/fibsem-uint8", "-cn", CROP_NAME),
        *("-c", "nuc,er", "-vr", "0.5", "-s", "8", flag, "-ds", "all", "-cr", "all"),
        *("-cp", str(tmp_path / "b.csv")),
        csv=tmp_path / "b.csv",
    )
    underscores = datasplit_csv(
        *("make-datasplit", "--search_path", search, "--raw_name", "em/fibsem-uint8"),
        *("--crop_name", CROP_NAME, "-c", "nuc,er", "--validate_ratio", "0.5", "-s", "8"),
        *(flag, "--csv_path", str(tmp_path / "c.csv")),
        csv=tmp_path / "c.csv",
    )
    unforced = datasplit_csv(
        *("make-datasplit", "-sp", search, "-c", "nuc,er", "-vr", "0.5"),
        *("--force-all-classes", "none", "-cp", str(tmp_path / "d.csv")),
        csv=tmp_path / "d.csv",
    )
    assert toolkit == own == underscores
    assert toolkit != unforced  # the flag moved or dropped crops that lack a class


def test_datasets_and_crops_lists(tiny_synth: Path, tmp_path: Path) -> None:
    base = ["-sp", f"{tiny_synth}/{SEARCH}", "-c", "nuc,mito,er", "-vr", "0.5"]
    own = datasplit_csv(
        *("datasplit", *base, "--datasets", "jrc_synth2", "--crops", "crop3"),
        *("--force-all-classes", "none", "--csv-path", str(tmp_path / "a.csv")),
        csv=tmp_path / "a.csv",
    )
    toolkit = datasplit_csv(
        *("make-datasplit", *base, "-ds", "jrc_synth2", "-cr", "crop3"),
        *("--force-all-classes", "none", "-cp", str(tmp_path / "b.csv")),
        csv=tmp_path / "b.csv",
    )
    assert own == toolkit and own.count(b"\n") == 1 and b"/crop3/" in own  # one row, no header


def test_conflicting_force_flags_are_refused(tiny_synth: Path) -> None:
    for extra in (["-fa", "-ft"], ["-fv", "--force-all-classes", "train"]):
        result = invoke("make-datasplit", "-sp", f"{tiny_synth}/{SEARCH}", "--dry-run", *extra)
        assert result.exit_code == 2
        assert "give one of --force-all-classes, -fa, -ft and -fv" in result.output


def test_python_dash_m_csc_make_datasplit(tiny_synth: Path, tmp_path: Path) -> None:
    search = f"{tiny_synth}/{SEARCH}"
    own = datasplit_csv(
        *("datasplit", "--search-path", search, "--classes", "nuc,mito,er"),
        *("--validate-ratio", "0.5", "--csv-path", str(tmp_path / "a.csv")),
        csv=tmp_path / "a.csv",
    )
    command = [sys.executable, "-m", "csc", "make-datasplit", "-sp", search, "-c", "nuc,mito,er"]
    command += ["-vr", "0.5", "-fv", "-cp", "b.csv"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("wrote b.csv:")
    assert (tmp_path / "b.csv").read_bytes() == own


def test_get_counts_is_counts(tiny_synth: Path) -> None:
    search = f"{tiny_synth}/{SEARCH}"
    own = invoke("counts", "--search-path", search, "--classes", "nuc,mito", "--crops", "crop1")
    toolkit = invoke("get-counts", "-sp", search, "-c", "nuc,mito", "-cr", "crop1")
    assert own.exit_code == toolkit.exit_code == 0, own.output + toolkit.output
    assert toolkit.output == own.output and "jrc_synth1" in own.output


def test_use_s3_spellings_crawl_the_bucket(s3_env: str, s3_synth: str, tmp_path: Path) -> None:
    base = ["--bucket", f"{s3_synth}-public", "-c", "nuc,mito,er", "-vr", "0.5"]
    own = datasplit_csv(
        "datasplit", "--s3", *base, "--csv-path", str(tmp_path / "a.csv"), csv=tmp_path / "a.csv"
    )
    for index, spelling in enumerate(("-s3", "--use_s3")):
        csv = tmp_path / f"{index}.csv"
        assert datasplit_csv("make-datasplit", spelling, *base, "-cp", str(csv), csv=csv) == own
    assert b"s3://" in own


# --- predict and process: real runs with a tiny untrained 2D model -------------------------


@pytest.fixture(scope="module")
def predict_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toolkit-predict-data")
    write_synthetic(out, SPEC)
    return out


@pytest.fixture
def config_file(predict_data: Path, tmp_path: Path) -> Path:
    """A 2D config file (the model saved as epoch 1) with a threshold process_func; big
    batches without overlap keep orthoplanes (three planes of windows) fast."""
    save_weights(config_of(predict_data, tmp_path))
    fast = settings(predict_data, tmp_path, prediction_batch_size=512, prediction_overlap=0.0)
    lines = [f"{key} = {value!r}" for key, value in fast.items()]
    lines.append("process_func = lambda p: (p > 0.5).astype('uint8')")
    path = tmp_path / "config.py"
    path.write_text("\n".join(lines) + "\n")
    return path


def prediction(folder: Path, name: str = "nuc") -> tuple[np.ndarray, dict[str, Any]]:
    group = zarr.open_group(str(folder / "jrc_synth1.zarr/crop1" / name), mode="r")
    return np.asarray(group["s0"][...]), dict(group.attrs)


def test_toolkit_predict_spelling_turns_orthoplanes_on_for_2d(
    config_file: Path, tmp_path: Path
) -> None:
    config = str(config_file)
    toolkit = invoke("predict", config, "-c", "1", "-o", f"{tmp_path}/tk/{{dataset}}.zarr/{{crop}}")
    assert toolkit.exit_code == 0, toolkit.output
    assert "orthoplanes: on (the toolkit's default for 2D models" in toolkit.stderr
    own = ["predict", config, "--crops", "crop1", "--output", f"{tmp_path}/on", "--orthoplanes"]
    assert invoke(*own).exit_code == 0
    values, attrs = prediction(tmp_path / "tk")
    assert attrs["csc_prediction"]["orthoplanes"] is True
    np.testing.assert_array_equal(values, prediction(tmp_path / "on")[0])


@pytest.mark.slow
def test_toolkit_predict_and_process_flags_give_csc_results(
    config_file: Path, predict_data: Path, tmp_path: Path
) -> None:
    config = str(config_file)
    own = invoke("predict", config, "--crops", "crop1", "--output", f"{tmp_path}/own")
    assert own.exit_code == 0, own.output
    locations = ["-s", f"{predict_data}/{SEARCH}", "-r", "em/fibsem-uint8", "-n", CROP_NAME]
    skipped = ["predict", config, "-c", "1", "-o", f"{tmp_path}/so", "-so", *locations]
    done = invoke(*skipped)
    assert done.exit_code == 0, done.output
    values, attrs = prediction(tmp_path / "so")
    assert attrs["csc_prediction"]["orthoplanes"] is False
    np.testing.assert_array_equal(values, prediction(tmp_path / "own")[0])
    assert invoke(*skipped).exit_code == 0  # the same run again: kept, no block predicted anew
    np.testing.assert_array_equal(prediction(tmp_path / "so")[0], values)
    assert invoke(*skipped, "-O").exit_code == 0

    source = f"{tmp_path}/so/{{dataset}}.zarr/{{crop}}"
    processed = invoke(
        *("process", config, "-c", "1", "-i", source, "-o", f"{tmp_path}/ptk"),
        *("-O", "-d", "cpu", "-w", "2"),
    )
    assert processed.exit_code == 0, processed.output
    assert "device" not in processed.stderr  # the CPU is what csc process uses
    assert "warning: max_workers=2: csc process works one block at a time" in processed.stderr
    mine = invoke("process", config, "--crops", "crop1", "--input", f"{tmp_path}/so")
    assert mine.exit_code == 0, mine.output
    masks = prediction(tmp_path / "ptk")[0]
    np.testing.assert_array_equal(masks, prediction(tmp_path / "processed")[0])
    np.testing.assert_array_equal(masks, (values / 255 > 0.5).astype(np.uint8))


def test_toolkit_crop_lists_and_templates(config_file: Path) -> None:
    config = str(config_file)
    test = invoke("predict", config, "-c", "test")
    assert test.exit_code == 1
    assert "Error: no raw for the test crops of jrc_" in test.output  # not in the synth data
    assert invoke("process", config, "--crops", "crop1,test").exit_code == 1
    layout = invoke("predict", config, "-o", "out/{crop}")
    assert layout.exit_code == 2 and "csc's layout is ROOT/{dataset}.zarr/{crop}" in layout.output
    both = invoke("predict", config, "--orthoplanes", "-so")
    assert both.exit_code == 2 and "contradict" in both.output
    unknown = invoke("predict", config, "-c", "99")
    assert unknown.exit_code == 1 and "--crops crop99 matches no crop" in unknown.output


def test_location_options_set_the_config_keys(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = _config_with(
        str(config_file),
        ("epochs=2",),
        strict=False,
        search_path="here/{dataset}/{dataset}.zarr/recon-1/{name}",
        raw_name="em/other",
        crop_name=None,
    )
    assert resolved.search_path == f"{tmp_path}/here/{SEARCH}"
    assert resolved.raw_name == "em/other" and resolved.crop_name == CROP_NAME
    assert resolved.epochs == 2
