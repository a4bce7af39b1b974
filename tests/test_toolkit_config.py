"""Configs written for the challenge toolkit, in its layout: a checkout with ``examples/`` (the
configs) beside ``data/`` (written here by `csc.synth`). Where a default search path looks,
the config's folder as working directory, the toolkit's keys (each honoured: base_experiment_path,
use_mutual_exclusion, debug_memory, value_transforms), its pos_weight shape, a 2-element
input_array_info through training and prediction, and what process_func gets."""

from __future__ import annotations

import dataclasses
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from csc.config import ArrayInfo, ConfigWarning, build_config, load_config
from csc.data.datasets import PatchSpec
from csc.data.loaders import build_datasets
from csc.datasplit import NoCropsError, ensure_datasplit, read_datasplit
from csc.losses import build_loss
from csc.manifests.classes import class_ids, exclusions
from csc.prediction import predict, prediction_transform
from csc.processing import process, to_logits
from csc.synth import SynthSpec, write_synthetic

# Crops of 16 x 64 x 64 label voxels at 4 nm: 8 x 32 x 32 at 8 nm.
SPEC = SynthSpec(
    num_datasets=1,
    num_crops=2,
    shape=(16, 48, 48),
    crop_shape=(16, 64, 64),
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)
DEFAULT_SEARCH = "data/{dataset}/{dataset}.zarr/recon-1/{name}"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toolkit checkout's data: ``data/{dataset}/{dataset}.zarr/recon-1/...``."""
    root = tmp_path_factory.mktemp("checkout")
    write_synthetic(root / "data", SPEC)
    return root


@pytest.fixture
def examples(checkout: Path, request: pytest.FixtureRequest) -> Path:
    """This test's own configs folder beside the checkout's ``data/``."""
    folder = checkout / f"examples_{request.node.name}"
    folder.mkdir()
    return folder


def write(folder: Path, text: str, name: str = "train_2D.py") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


# --- Where the data is found ----------------------------------------------------------------


def test_a_default_search_path_finds_the_checkouts_data_one_folder_up(
    examples: Path, checkout: Path
) -> None:
    for text in ('classes = ["nuc", "er"]\n', f'search_path = "{DEFAULT_SEARCH}"\n'):
        config = load_config(write(examples, text))
        assert config.search_path == str(checkout / DEFAULT_SEARCH)
        assert config.search_path_candidates == (
            str(examples / DEFAULT_SEARCH),
            str(checkout / DEFAULT_SEARCH),
        )
    ensure_datasplit(config, echo=lambda _: None)
    rows = read_datasplit(config.datasplit_path)
    assert config.datasplit_path == str(examples / "datasplit.csv")
    assert rows and all(row.raw_root.startswith(str(checkout / "data")) for row in rows)


def test_data_next_to_the_config_comes_first(examples: Path, checkout: Path) -> None:
    (examples / "data").symlink_to(checkout / "data")
    config = load_config(write(examples, "epochs = 1\n"))
    assert config.search_path == str(examples / DEFAULT_SEARCH)


def test_an_empty_next_folder_falls_back_to_the_checkouts_data(
    examples: Path, checkout: Path
) -> None:
    (examples / "data").mkdir()  # exists, but holds no dataset
    config = load_config(write(examples, 'classes = ["nuc"]\n'))
    assert config.search_path == str(examples / DEFAULT_SEARCH)
    ensure_datasplit(config, echo=lambda _: None)
    rows = read_datasplit(config.datasplit_path)
    assert rows and all(row.raw_root.startswith(str(checkout / "data")) for row in rows)


def test_no_data_anywhere_names_every_place_looked(tmp_path: Path) -> None:
    folder = tmp_path / "examples"
    folder.mkdir()
    config = load_config(write(folder, 'classes = ["nuc"]\n'))
    with pytest.raises(NoCropsError) as raised:
        ensure_datasplit(config, echo=lambda _: None)
    message = str(raised.value)
    assert "in any place csc looked" in message
    assert f"no folder {folder / 'data'}" in message and f"no folder {tmp_path / 'data'}" in message
    assert "set search_path" in message
    assert not (folder / "datasplit.csv").exists()


def test_a_search_path_the_config_sets_is_the_only_place(examples: Path) -> None:
    config = load_config(write(examples, 'search_path = "elsewhere/{dataset}/{name}"\n'))
    assert config.search_path_candidates == ()
    with pytest.raises(FileNotFoundError, match="elsewhere does not exist"):
        ensure_datasplit(config, echo=lambda _: None)


# --- Working directory ------------------------------------------------------------------------


def test_the_config_runs_in_its_folder_and_the_callers_folder_comes_back(
    examples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (examples / "classes.txt").write_text("nuc\nmito\n")
    path = write(examples, 'with open("classes.txt") as file:\n    classes = file.read().split()\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.classes == ("nuc", "mito")
    assert os.getcwd() == str(tmp_path)
    assert config.datasplit_path == str(examples / "datasplit.csv")  # csc's paths: the file's


# --- The toolkit's keys -----------------------------------------------------------------------


def test_base_experiment_path_anchors_the_outputs_left_at_their_defaults(examples: Path) -> None:
    config = load_config(write(examples, 'base_experiment_path = "runs/one"\n'))
    base = examples / "runs/one"
    assert config.base_experiment_path == str(base)
    assert config.model_save_path == str(base / "checkpoints/{model_name}_{epoch}.pth")
    assert config.logs_save_path == str(base / "tensorboard/{model_name}")
    assert config.datasplit_path == str(base / "datasplit.csv")
    assert config.predictions_path == str(examples / "predictions/{model_name}")
    text = 'base_experiment_path = "runs/one"\ndatasplit_path = "split.csv"\n'
    assert load_config(write(examples, text)).datasplit_path == str(examples / "split.csv")
    with pytest.raises(ValueError, match="base_experiment_path must be a local folder"):
        build_config({"base_experiment_path": "s3://bucket/runs"})


def test_the_classes_table_says_which_classes_exclude_each_other() -> None:
    ids = class_ids()
    assert ids["mito"] == {3, 4, 5, 50} and ids["ecs"] == {1}
    # nuc and er share the nuclear envelope (ids 20-23); mito overlaps neither.
    assert exclusions(["nuc", "mito", "er"]) == ((1,), (0, 2), (1,))
    assert exclusions(["nuc", "my_class"]) == ((), ())
    with pytest.warns(ConfigWarning, match="my_class are not in the classes table"):
        build_config({"classes": ["nuc", "my_class"], "use_mutual_exclusion": True})
    with pytest.raises(ValueError, match="use_mutual_exclusion must be True or False"):
        build_config({"use_mutual_exclusion": "yes"})


def test_mutual_exclusion_marks_an_unannotated_class_absent_where_another_is_present(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    write_synthetic(data, dataclasses.replace(SPEC, classes=("nuc", "mito")))
    crop = data / "jrc_synth1/jrc_synth1.zarr/recon-1/labels/groundtruth/crop1"
    shutil.rmtree(crop / "mito")  # crop1 annotates nuc only
    info = {"shape": (8, 32, 32), "scale": (8, 8, 8)}
    settings = {
        "search_path": str(data / "{dataset}/{dataset}.zarr/recon-1/{name}"),
        "datasplit_path": str(tmp_path / "datasplit.csv"),
        "classes": ["nuc", "mito"],
        "input_array_info": info,
        "validation_prob": 0.0,
        "force_all_classes": None,
        "weighted_sampler": False,
        "model_name": "3d_unet",
    }
    targets = {}
    for inferred in (False, True):
        config = build_config({**settings, "use_mutual_exclusion": inferred})
        ensure_datasplit(config, echo=lambda _: None)
        train, _ = build_datasets(config)
        index = next(i for i, c in enumerate(train.crops) if c.name.endswith("/crop1"))
        centre = (np.asarray(train.crops[index].low) + train.crops[index].high) / 2
        targets[inferred] = train.sample(index, centre)["output"].numpy()  # (C, Z, Y, X)
    plain, inferred_target = targets[False], targets[True]
    nuc = plain[0] == 1
    assert nuc.any() and np.isnan(plain[1]).all()
    np.testing.assert_array_equal(inferred_target[0], plain[0])  # annotated: unchanged
    assert (inferred_target[1][nuc] == 0).all() and np.isnan(inferred_target[1][~nuc]).all()


def test_value_transforms_is_the_raw_transform_of_prediction() -> None:
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255

    def validation(x: torch.Tensor) -> torch.Tensor:
        return x.float()

    assert prediction_transform(build_config({"value_transforms": scale})) is scale
    config = build_config({"val_raw_value_transforms": validation})
    assert prediction_transform(config) is validation
    with pytest.raises(ValueError, match="value_transforms must be a callable"):
        build_config({"value_transforms": 3})


@pytest.mark.parametrize("criterion", ["bce", torch.nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("ndim", [2, 3])
def test_pos_weight_in_the_toolkits_shape_weighs_each_class(
    criterion: str | type[torch.nn.Module], ndim: int
) -> None:
    weight = torch.tensor([2.0, 5.0])
    toolkit = weight.reshape(2, *([1] * ndim))  # w[:, None, None] (2D), w[:, None, None, None]
    logits = torch.randn(3, 2, *([4] * ndim))
    target = (torch.rand_like(logits) > 0.5).float()
    target[0, 1] = torch.nan  # unannotated voxels stay out
    expected = build_loss(criterion, criterion_kwargs={"pos_weight": weight})(logits, target)
    loss = build_loss(criterion, criterion_kwargs={"pos_weight": toolkit})(logits, target)
    torch.testing.assert_close(loss, expected)
    unweighted = build_loss(criterion)(logits, target)
    assert not torch.allclose(loss, unweighted)


def test_a_two_element_array_info_is_the_plane_one_y_x() -> None:
    config = build_config({"input_array_info": {"shape": (64, 64), "scale": (8, 8)}})
    assert config.input_array_info == ArrayInfo((1, 64, 64), (8, 8, 8))
    assert config.target_array_info == config.input_array_info
    assert PatchSpec.from_config(config).plane_axis == 0
    with pytest.raises(ValueError, match="have different lengths"):
        build_config({"input_array_info": {"shape": (64, 64), "scale": (8, 8, 8)}})


def test_logits_for_process_func_are_the_inverse_sigmoid() -> None:
    p = np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32)
    logits = to_logits(p)
    assert logits.dtype == np.float32 and logits[0] == -np.inf and logits[-1] == np.inf
    np.testing.assert_allclose(logits[1:3], [np.log(1 / 3), 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown process_input 'raw'"):
        build_config({"process_input": "raw"})


# --- A toolkit-style 2D config, trained and predicted ------------------------------------------

TOOLKIT_2D = """\
import os
from pathlib import Path

import torch

learning_rate = 1e-3
batch_size = 2
input_array_info = {"shape": (32, 32), "scale": (8, 8)}
target_array_info = {"shape": (32, 32), "scale": (8, 8)}
epochs = 1
iterations_per_epoch = 2
random_seed = 42
classes = ["nuc", "mito"]
model_name = "2d_unet"
model_to_load = "2d_unet"
model_kwargs = {"num_levels": 2, "base_channels": 4}
load_model = "latest"
validation_prob = 0.5
validation_batch_limit = 1
device = "cpu"
base_experiment_path = "experiment"
use_mutual_exclusion = True
debug_memory = True
criterion = torch.nn.BCEWithLogitsLoss
criterion_kwargs = {"pos_weight": torch.tensor([2.0, 3.0])[:, None, None]}
prediction_block_shape = (4, 16, 16)
_here = Path(__file__).parent


def train_raw_value_transforms(x):
    Path("cwd_during_training.txt").write_text(os.getcwd())  # relative: the working directory
    return x.float() / 255


def value_transforms(x):
    (_here / "value_transforms_called.txt").write_text("yes")
    return x.float() / 255
"""


@pytest.mark.slow
def test_a_toolkit_2d_config_trains_predicts_and_processes(
    examples: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from csc import train  # as the toolkit's `if __name__ == "__main__"` block calls it

    path = write(examples, TOOLKIT_2D)
    monkeypatch.chdir(tmp_path)
    result = train(path)
    assert os.getcwd() == str(tmp_path)  # the caller's folder is back
    seen = (examples / "cwd_during_training.txt").read_text()
    assert os.path.realpath(seen) == os.path.realpath(examples)
    assert result.last_epoch == 1
    assert (examples / "experiment/checkpoints/2d_unet_1.pth").is_file()
    assert (examples / "experiment/datasplit.csv").is_file()
    assert "memory (MiB): host_peak_mib" in capsys.readouterr().out

    config = load_config(path)
    written = predict(config, all_crops=True, progress=False)  # crashed for (y, x) infos
    assert (examples / "value_transforms_called.txt").read_text() == "yes"
    assert written and all(item.grid.shape == (8, 32, 32) for item in written)
    assert all(item.grid.scale == (8.0, 8.0, 8.0) for item in written)

    logits = dataclasses.replace(config, process_func=lambda x: x > 0.5, process_input="logits")
    processed = process(logits, progress=False)
    assert len(processed) == len(written)
    for target in processed:
        crop = target.relative_to(config.processed_path.format(model_name="2d_unet"))
        source = Path(config.predictions_path.format(model_name="2d_unet")) / crop
        stored = np.asarray(zarr.open_group(str(source / "nuc"), mode="r")["s0"][...])
        mask = np.asarray(zarr.open_group(str(target / "nuc"), mode="r")["s0"][...])
        expected = to_logits(stored.astype(np.float32) / np.float32(255)) > 0.5
        np.testing.assert_array_equal(mask, expected.astype(np.uint8))
        # The toolkit's `x > 0.5` on logits keeps p > sigmoid(0.5), about 0.62, not p > 0.5.
        assert not (mask.astype(bool) & (stored <= 0.62 * 255)).any()
