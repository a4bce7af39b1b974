"""The challenge toolkit's Python API on csc (docs/utils.md): `csc.utils`, the `csc.config`
constants, and `csc.predict` / `csc.process` with the toolkit's keywords, used as the toolkit's
configs and scripts use them, on tiny synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

import csc
from csc import utils
from csc.config import DEFAULT_SEARCH_PATH, TrainConfig, load_config
from csc.datasplit import CrawlOptions, SplitOptions, format_rows, make_datasplit
from csc.utils import (
    CropSelection,
    get_test_crop_labels,
    get_test_crops,
    get_tested_classes,
    layout_root,
    load_safe_config,
    make_datasplit_csv,
    parse_crops,
)

SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
ROOT = Path(__file__).parents[1]


def test_the_toolkit_s_constants_are_csc_s_defaults() -> None:
    from csc.config import (
        BASE_DATA_PATH,
        CROP_NAME,
        INSTANCE_CLASSES,
        PREDICTIONS_PATH,
        PROCESSED_PATH,
        RAW_NAME,
        SEARCH_PATH,
        SUBMISSION_PATH,
        TRUTH_PATH,
    )

    assert SEARCH_PATH == DEFAULT_SEARCH_PATH == TrainConfig.search_path
    assert (TrainConfig.raw_name, TrainConfig.crop_name) == (RAW_NAME, CROP_NAME)
    assert SEARCH_PATH.startswith(f"{BASE_DATA_PATH}/")
    names = {"dataset": "jrc_x", "crop": "crop1"}
    assert PREDICTIONS_PATH.format(**names) == "data/predictions/jrc_x.zarr/crop1"
    assert PROCESSED_PATH.format(**names) == "data/processed/jrc_x.zarr/crop1"
    assert (SUBMISSION_PATH, TRUTH_PATH) == ("data/submission.zarr", "data/ground_truth.zarr")
    assert INSTANCE_CLASSES[:3] == ("nuc", "vim", "ves") and len(INSTANCE_CLASSES) == 12


def test_a_config_importing_the_constants_resolves_like_csc_s_defaults(
    write_config: Callable[..., Path],
) -> None:
    """`search_path = SEARCH_PATH` in a config is csc's default, resolved against its folder."""
    plain = load_config(write_config("classes = ['nuc']\n", "plain.py"))
    toolkit = load_config(
        write_config(
            "from csc.config import CROP_NAME, RAW_NAME, SEARCH_PATH\n"
            "classes = ['nuc']\nsearch_path = SEARCH_PATH\nraw_name = RAW_NAME\n"
            "crop_name = CROP_NAME\n",
            "toolkit.py",
        )
    )
    for key in ("search_path", "raw_name", "crop_name"):
        assert getattr(toolkit, key) == getattr(plain, key), key
    # Kept as the file's other names (csc reads none of them), with no typo warning.
    assert set(toolkit.extras) == {"CROP_NAME", "RAW_NAME", "SEARCH_PATH"}


# --- load_safe_config ------------------------------------------------------------------------

CONFIG = """\
    from csc.utils import get_tested_classes

    classes = get_tested_classes()[:2]
    batch_size = 4
    input_array_info = {"shape": (1, 64, 64), "scale": (8, 8, 8)}
    my_threshold = 0.3  # a name csc does not read


    def process_func(x):
        return x > my_threshold
"""


def test_load_safe_config_gives_every_name_of_the_file(write_config: Callable[..., Path]) -> None:
    cfg = load_safe_config(write_config(CONFIG))
    assert cfg.classes == ["ecs", "pm"] and getattr(cfg, "batch_size", 8) == 4
    assert getattr(cfg, "epochs", 10) == 10 and cfg.get("epochs", 3) == 3
    assert cfg.input_array_info["shape"] == (1, 64, 64)
    assert cfg.my_threshold == 0.3 and cfg.process_func(np.array([0.5])).tolist() == [True]
    assert "batch_size" in cfg and "get_tested_classes" in cfg.to_dict()
    assert set(cfg.to_dict()) >= {"classes", "batch_size", "my_threshold", "process_func"}
    with pytest.raises(AttributeError, match="defines no 'learning_rate'"):
        _ = cfg.learning_rate


UNSAFE = """\
    import os
    from subprocess import run

    classes = ["nuc"]
    value = eval("1 + 1")
    open(os.path.join(os.path.dirname(__file__), "ran.txt"), "w").close()
"""


def test_an_unsafe_config_is_reported_or_refused_under_force_safe_config(
    write_config: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_config(UNSAFE)
    monkeypatch.setenv("FORCE_SAFE_CONFIG", "1")
    with pytest.raises(
        ValueError, match=r"imports os \(line 1\), which a safe load \(FORCE_SAFE_CONFIG"
    ):
        load_safe_config(path)
    assert not (path.parent / "ran.txt").exists()  # refused before it ran
    monkeypatch.delenv("FORCE_SAFE_CONFIG")
    cfg = load_safe_config(path)
    assert cfg.value == 2 and (path.parent / "ran.txt").exists()
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [
        f"warning: config {path} imports os (line 1)",
        f"warning: config {path} imports subprocess (line 2)",
        f"warning: config {path} calls eval (line 5)",
    ]
    with pytest.raises(ValueError, match="or force_safe\\) refuses"):
        load_safe_config(path, force_safe=True)
    monkeypatch.setenv("FORCE_SAFE_CONFIG", "true")
    assert load_safe_config(path, force_safe=False).value == 2  # the argument wins


# --- Manifests, crops and templates ----------------------------------------------------------


def test_tested_classes_and_test_crops_come_from_the_shipped_manifests(tmp_path: Path) -> None:
    classes = get_tested_classes()
    assert len(classes) == len(set(classes)) == 48 and classes[:2] == ["ecs", "pm"]
    (tmp_path / "mine.csv").write_text("nuc\nmito\n")
    assert get_tested_classes(tmp_path / "mine.csv") == ["nuc", "mito"]
    crops = get_test_crops()
    assert [c.id for c in crops] == [*range(557, 563), *range(980, 990)]
    first = crops[0]
    assert (first.name, first.dataset, first.shape) == ("crop557", "jrc_ctl-id8-1", (600,) * 3)
    assert first.voxel_size == (1.74, 2.0, 2.0) and "nuc" in first.class_labels
    assert get_test_crop_labels("crop557") == list(first.class_labels) == get_test_crop_labels(557)
    with pytest.raises(ValueError, match="crop 1 is not a test crop"):
        get_test_crop_labels(1)
    shipped = resources.files("csc.manifests")
    for name in ("tested_classes.csv", "test_crop_manifest.csv", "classes.csv"):
        assert shipped.joinpath(name).is_file(), name
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert package_data["package-data"]["csc.manifests"] == ["*.csv"]


def test_format_string_fills_only_the_fields_it_is_given() -> None:
    from csc.utils import format_string, get_formatted_fields

    assert format_string(SEARCH, {"dataset": "jrc_x"}) == "jrc_x/jrc_x.zarr/recon-1/{name}"
    assert format_string("{a}_{b}", {"a": 1, "b": "x"}) == "1_x"
    assert get_formatted_fields(SEARCH) == ["dataset", "dataset", "name"]


@pytest.mark.parametrize(
    ("crops", "selection"),
    [
        ("1,2", CropSelection(("crop1", "crop2"))),
        (" 3 , crop4,jrc_x/crop*", CropSelection(("crop3", "crop4", "jrc_x/crop*"))),
        (["5", "crop6"], CropSelection(("crop5", "crop6"))),
        ("*", CropSelection(all_crops=True)),
        ("test", CropSelection(test=True)),
        (None, CropSelection()),
    ],
)
def test_crop_spellings(crops: Any, selection: CropSelection) -> None:
    assert parse_crops(crops) == selection


def test_test_goes_alone() -> None:
    with pytest.raises(ValueError, match="'test' goes alone"):
        parse_crops("test,1")


@pytest.mark.parametrize(
    ("template", "root"),
    [
        ("data/predictions/{dataset}.zarr/{crop}", "data/predictions"),
        ("/out/{dataset}.zarr/{crop}/{label}/", "/out"),
        ("{dataset}.zarr/{crop}", "."),
    ],
)
def test_output_templates_in_csc_s_layout_give_their_root(template: str, root: str) -> None:
    assert layout_root(template, "output_path") == root


@pytest.mark.parametrize(
    "template", ["out", "out/{crop}", "out/{dataset}/{crop}.zarr", "{label}/{dataset}.zarr/{crop}"]
)
def test_other_output_templates_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match=r"output_path=.*csc's layout is ROOT/\{dataset\}.zarr"):
        layout_root(template, "output_path")


# --- Datasplits ------------------------------------------------------------------------------


def test_make_datasplit_csv_writes_csc_s_crawl(
    tiny_synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    search_path = f"{tiny_synth}/{SEARCH}"
    csv_path = tmp_path / "datasplit.csv"
    make_datasplit_csv(
        classes=["nuc", "er"], validation_prob=0.5, search_path=search_path, csv_path=csv_path
    )
    options = CrawlOptions(search_path=search_path, classes=("nuc", "er"))
    rows, _ = make_datasplit(options, SplitOptions(validate_ratio=0.5))
    assert csv_path.read_text() == format_rows(rows) and len(rows) == 4
    assert f"wrote datasplit {csv_path}" in capsys.readouterr().out
    make_datasplit_csv(  # the toolkit rewrites its CSV; csc replaces only a datasplit CSV
        classes=["nuc", "er"],
        force_all_classes=True,
        crops=["1", "crop2", "3"],
        search_path=search_path,
        csv_path=csv_path,
    )
    assert [line.split('","')[4] for line in csv_path.read_text().splitlines()] == [
        'recon-1/labels/groundtruth/crop1/[nuc,er]"',
        'recon-1/labels/groundtruth/crop2/[nuc,er]"',
    ]  # crop3 lacks nuc: force_all_classes=True leaves it out of both splits
    dry = tmp_path / "dry.csv"
    make_datasplit_csv(classes=["mito"], search_path=search_path, csv_path=dry, dry_run=True)
    assert not dry.exists() and "crop3/[mito]" in capsys.readouterr().out
    with pytest.raises(ValueError, match="the test crops have no ground truth to split"):
        make_datasplit_csv(crops=["test"], search_path=search_path, csv_path=dry)


def test_make_s3_datasplit_csv_crawls_a_bucket(
    s3_env: str, s3_synth: str, tiny_synth: Path, tmp_path: Path
) -> None:
    from csc.utils import make_s3_datasplit_csv

    remote = make_s3_datasplit_csv(
        classes=["nuc"], bucket=f"{s3_synth}-public", csv_path=tmp_path / "s3.csv"
    )
    local = make_datasplit_csv(
        classes=["nuc"], search_path=f"{tiny_synth}/{SEARCH}", csv_path=tmp_path / "local.csv"
    )
    assert [r.crop for r in remote] == [r.crop for r in local]
    assert remote[0].gt_root == f"s3://{s3_synth}-public/jrc_synth1/jrc_synth1.zarr"


# --- predict and process ---------------------------------------------------------------------

TRAIN = """\
    from csc.utils import get_tested_classes

    classes = ["nuc", "er"]
    input_array_info = {{"shape": (1, 16, 16), "scale": (8, 8, 8)}}
    target_array_info = input_array_info
    model_name = "2d_unet"
    model_kwargs = {{"num_levels": 2, "base_channels": 4}}
    batch_size = 2
    device = "cpu"
    search_path = "{data}/{search}"
    prediction_block_shape = (4, 16, 16)
"""


def train_config(tiny_synth: Path, folder: Path) -> Path:
    """A toolkit-style config in `folder` with untrained saved weights (epoch 1)."""
    from csc.data.datasets import PatchSpec
    from csc.runtime import make_model

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train_2D.py"
    path.write_text(textwrap.dedent(TRAIN.format(data=tiny_synth, search=SEARCH)))
    config = load_config(path)
    weights = Path(config.model_save_path.format(model_name=config.model_name, epoch=1))
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(make_model(config, PatchSpec.from_config(config)).state_dict(), weights)
    return path


def read_s0(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    group = zarr.open_group(str(path), mode="r")
    return np.asarray(group["s0"][...]), dict(group.attrs)


def test_predict_takes_the_toolkit_s_keywords(tiny_synth: Path, tmp_path: Path) -> None:
    """`crops="1,2"` and an output template; the crops come from a crawl of search_path (no
    datasplit CSV); do_orthoplanes is on for a 2D model unless turned off."""
    config = train_config(tiny_synth, tmp_path)
    out = f"{tmp_path}/out/{{dataset}}.zarr/{{crop}}"
    written = csc.predict(
        config, crops="1,2", output_path=out, do_orthoplanes=False, progress=False
    )
    assert [w.path for w in written] == [tmp_path / f"out/jrc_synth1.zarr/crop{n}" for n in (1, 2)]
    values, attrs = read_s0(written[0].path / "nuc")
    assert values.shape == (4, 8, 8) and attrs["csc_prediction"]["orthoplanes"] is False
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        csc.predict(config, crops="1", output_path=out, progress=False)
    (again,) = csc.predict(config, crops="1", output_path=out, overwrite=True, progress=False)
    assert read_s0(again.path / "nuc")[1]["csc_prediction"]["orthoplanes"] is True
    # The toolkit's default folder, next to the config; "*": every crop the crawl finds.
    everything = csc.predict(config, crops="*", progress=False, do_orthoplanes=False)
    assert len(everything) == 4 and all(
        (tmp_path / "data/predictions") in w.path.parents for w in everything
    )
    # The default, crops="test": the shipped manifest's datasets are not in tiny_synth.
    with pytest.raises(FileNotFoundError, match=r"dataset jrc_ctl-id8-1 \(test crop crop557"):
        csc.predict(config)
    with pytest.raises(ValueError, match="output_path='out': csc's layout is ROOT/"):
        csc.predict(config, crops="1", output_path="out")


def test_predict_searches_where_its_keywords_say(tiny_synth: Path, tmp_path: Path) -> None:
    """`search_path=` replaces the config's; relative paths are relative to the config's
    folder, like the config's own paths, also for a loaded `TrainConfig`."""
    path = train_config(tiny_synth, tmp_path / "run")
    (tmp_path / "run/data").symlink_to(tiny_synth)
    text = path.read_text().replace(f'search_path = "{tiny_synth}/{SEARCH}"', "")
    path.write_text(text + 'search_path = "/nowhere/{dataset}/{name}"\n')
    (written,) = csc.predict(
        load_config(path),
        crops="3",
        search_path=f"data/{SEARCH}",
        output_path="out/{dataset}.zarr/{crop}",  # not into the linked data
        do_orthoplanes=False,
        progress=False,
    )
    assert written.region.dataset == "jrc_synth2" and written.region.name == "crop3"
    assert written.path == tmp_path / "run/out/jrc_synth2.zarr/crop3"


def test_process_takes_the_toolkit_s_keywords(tiny_synth: Path, tmp_path: Path) -> None:
    config = train_config(tiny_synth, tmp_path)
    config.write_text(config.read_text() + "\nprocess_func = lambda x: x > 0.5\n")
    predictions = f"{tmp_path}/preds/{{dataset}}.zarr/{{crop}}"
    csc.predict(config, crops="1,4", output_path=predictions, progress=False)
    with pytest.warns(UserWarning, match="max_workers=2: csc process works one block at a time"):
        written = csc.process(
            config,
            crops="4",
            input_path=predictions,
            output_path=f"{tmp_path}/done/{{dataset}}.zarr/{{crop}}/{{label}}",
            max_workers=2,
            progress=False,
        )
    assert written == [tmp_path / "done/jrc_synth2.zarr/crop4"]
    source = read_s0(tmp_path / "preds/jrc_synth2.zarr/crop4/er")[0]
    result = read_s0(written[0] / "er")[0]
    np.testing.assert_array_equal(result, (source / 255 > 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match=r"no predicted crop in .*preds matches jrc_ctl-id8-1/"):
        csc.process(config, crops="test", input_path=predictions, progress=False)
    with pytest.warns(UserWarning, match="device='cuda': csc process hands process_func numpy"):
        csc.process(config, input_path=predictions, device="cuda", overwrite=True, progress=False)


def test_csc_predict_and_process_are_the_toolkit_adapters() -> None:
    import csc.utils

    assert csc.predict is csc.utils.predict and csc.process is csc.utils.process


PREDICT_SCRIPT = """\
    from csc import predict
    from csc.utils import load_safe_config

    config_path = __file__.replace("predict", "train")
    config = load_safe_config(config_path)
    batch_size = getattr(config, "batch_size", 8)

    if __name__ == "__main__":
        predict(config_path, crops="1", overwrite=True)
"""

PROCESS_SCRIPT = """\
    from csc.utils import load_safe_config

    config = load_safe_config(__file__.replace("process", "train"))
    classes = config.classes
    default = {"shape": (1, 128, 128), "scale": (8, 8, 8)}
    input_array_info = getattr(config, "input_array_info", default)
    target_array_info = getattr(config, "target_array_info", input_array_info)


    def process_func(x):
        return x > 0.5


    if __name__ == "__main__":
        from csc import process

        process(__file__, overwrite=True)
"""


@pytest.mark.slow
def test_the_toolkit_s_example_scripts_run_with_python(tiny_synth: Path, tmp_path: Path) -> None:
    """`python predict_2D.py` then `python process_2D.py`, written as the toolkit's examples
    are: they meet in the toolkit's default folders next to the configs. (The test's name
    holds neither "predict" nor "process": the scripts' __file__.replace would hit tmp_path.)"""
    examples = tmp_path / "examples"
    train_config(tiny_synth, examples)
    for name, text in (("predict_2D.py", PREDICT_SCRIPT), ("process_2D.py", PROCESS_SCRIPT)):
        (examples / name).write_text(textwrap.dedent(text))
        done = subprocess.run(
            [sys.executable, name], cwd=examples, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    predicted = read_s0(examples / "data/predictions/jrc_synth1.zarr/crop1/nuc")[0]
    processed = read_s0(examples / "data/processed/jrc_synth1.zarr/crop1/nuc")[0]
    np.testing.assert_array_equal(processed, (predicted / 255 > 0.5).astype(np.uint8))


def test_the_toolkits_submission_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """package_submission, zip_submission, score_submission and match_crop_space with the
    toolkit's arguments, on the golden s1 inputs: the same scores as the challenge's."""
    golden = Path(__file__).parent / "data" / "golden" / "submissions"
    monkeypatch.setenv("CSC_TEST_CROP_MANIFEST_URL", str(golden / "test_crop_manifest.csv"))
    with zipfile.ZipFile(golden / "s1_pack_results" / "processed_inputs.zip") as archive:
        archive.extractall(tmp_path / "processed")
    template = str(tmp_path / "processed" / "{dataset}.zarr" / "{crop}")
    report = utils.package_submission(template, tmp_path / "submission.zarr", max_workers=1)
    assert report.zip_path == tmp_path / "submission.zip" and len(report.packed) == 5
    again = utils.zip_submission(tmp_path / "submission.zarr")  # replaces csc's own zip
    assert again == report.zip_path and zipfile.is_zipfile(again)
    result = utils.score_submission(again, tmp_path / "result.json", golden / "truth.zarr")
    assert (tmp_path / "result_extended.json").is_file()
    # The toolkit's own packing lost nuc (id 256) and er (0.9 truncated); csc's did not.
    want = json.loads((golden / "s1_pack_results" / "result.json").read_text())
    mito = result["label_scores"]["mito"]["combined_score"]
    assert mito == pytest.approx(want["label_scores"]["mito"]["combined_score"], abs=1e-6)
    assert result["label_scores"]["er"]["iou"] > want["label_scores"]["er"]["iou"]
    aligned = utils.match_crop_space(
        tmp_path / "processed" / "synth_b.zarr" / "crop9002" / "mito",
        "mito",
        (4.0, 4.0, 4.0),
        (32, 32, 32),
        (0.0, 0.0, 0.0),
    )
    packed = zarr.open_group(str(tmp_path / "submission.zarr"), mode="r")["crop9002/mito"]
    np.testing.assert_array_equal(aligned, packed[...])
