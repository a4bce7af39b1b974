"""Prediction and post-processing on synthetic data: window placement checked with a model that
echoes its input (the output must equal the raw voxel for voxel), seamless blending (a constant
model gives a constant volume), block-size independence, boxes, orthoplanes, output metadata,
overwrite protection, `csc process`, and the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from csc.cli import cli
from csc.config import TrainConfig, build_config
from csc.data.datasets import PatchSpec
from csc.datasplit import ensure_datasplit, read_datasplit
from csc.prediction import (
    crop_regions,
    gaussian_weights,
    load_predictor,
    predict,
    predict_volume,
    window_starts,
)
from csc.processing import process
from csc.runtime import make_model
from csc.storage import blocks
from csc.synth import SynthSpec, write_synthetic

CLASSES = ("nuc", "mito", "er")
# Crops of 16 x 64 x 64 label voxels at 4 nm: 8 x 32 x 32 output voxels at 8 nm.
SPEC = SynthSpec(
    num_datasets=1,
    num_crops=2,
    shape=(16, 48, 48),
    crop_shape=(16, 64, 64),
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"


class Echo(torch.nn.Module):
    """Logits whose sigmoid is the input, for every class: a prediction equals the raw."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(x.clamp(1e-4, 1 - 1e-4)).repeat_interleave(len(CLASSES), dim=1)


class Constant(torch.nn.Module):
    """Logit 0.7 everywhere, whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :1] * 0 + self.bias).repeat_interleave(len(CLASSES), dim=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("predict-data")
    write_synthetic(out, SPEC)
    return out


def settings(
    data: Path, run: Path, shape: tuple[int, ...] = (1, 16, 16), **overrides: Any
) -> dict[str, Any]:
    """A 2D (or 3D) config at 8 nm predicting blocks of 4 x 16 x 16 voxels."""
    info = {"shape": shape, "scale": (8, 8, 8)}
    return {
        "search_path": f"{data}/{SEARCH}",
        "datasplit_path": f"{run}/datasplit.csv",
        "classes": CLASSES,
        "validation_prob": 0.5,
        "input_array_info": info,
        "target_array_info": info,
        "model_name": "2d_unet",
        "model_kwargs": {"num_levels": 2, "base_channels": 4},
        "batch_size": 3,
        "device": "cpu",
        "prediction_block_shape": (4, 16, 16),
        "model_save_path": f"{run}/checkpoints/{{model_name}}_{{epoch}}.pth",
        "logs_save_path": f"{run}/tensorboard/{{model_name}}",
        "predictions_path": f"{run}/predictions",
        "processed_path": f"{run}/processed",
        **overrides,
    }


def config_of(
    data: Path, run: Path, shape: tuple[int, ...] = (1, 16, 16), **overrides: Any
) -> TrainConfig:
    config = build_config(settings(data, run, shape, **overrides))
    ensure_datasplit(config, echo=lambda _: None)
    return config


def save_weights(config: TrainConfig, epoch: int = 1) -> Path:
    """The config's model, as built for training, saved as epoch `epoch`'s checkpoint."""
    spec = PatchSpec.from_arrays(config.input_array_info, config.target_array_info)
    path = Path(config.model_save_path.format(model_name=config.model_name, epoch=epoch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make_model(config, spec).state_dict(), path)
    return path


def raw_s0(data: Path, dataset: str) -> np.ndarray:
    group = zarr.open_group(
        str(data / dataset / f"{dataset}.zarr/recon-1/em/fibsem-uint8"), mode="r"
    )
    return np.asarray(group["s0"][...])


def read_output(path: Path, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    group = zarr.open_group(str(path / name), mode="r")
    return np.asarray(group["s0"][...]), dict(group.attrs)


def test_windows_cover_the_axis_and_weights_peak_in_the_middle() -> None:
    assert window_starts(32, 16, 0.25).tolist() == [0, 12, 16]
    assert window_starts(32, 16, 0.0).tolist() == [0, 16]
    assert window_starts(10, 16, 0.5).tolist() == [-3]  # one centred window past both ends
    assert window_starts(5, 1, 0.5).tolist() == [0, 1, 2, 3, 4]  # 2D planes: every slice
    weights = gaussian_weights((1, 16, 16))
    assert weights.shape == (1, 16, 16) and weights.max() == 1.0 and weights.min() > 0
    assert weights[0, 7, 7] > weights[0, 0, 0] and np.allclose(weights, weights[:, ::-1, ::-1])
    covered = np.zeros((5, 9, 7), dtype=int)
    for box in blocks(covered.shape, (2, 4, 7)):
        covered[box] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize(
    ("shape", "orthoplanes"),
    [((1, 16, 16), False), ((1, 16, 16), True), ((4, 16, 16), False)],
    ids=["2D", "2D-orthoplanes", "3D"],
)
def test_an_echo_model_predicts_the_raw_voxel_for_voxel(
    data: Path, tmp_path: Path, shape: tuple[int, ...], orthoplanes: bool
) -> None:
    """Every output voxel is the weighted mean of windows that all say "the raw value there":
    any misplaced window, offset or axis mix-up shows as a wrong value."""
    config = config_of(data, tmp_path, shape, model=Echo(), model_name="echo")
    torch.save({}, tmp_path / "echo.pth")
    written = predict(
        config,
        all_crops=True,
        checkpoint=str(tmp_path / "echo.pth"),
        orthoplanes=orthoplanes,
        progress=False,
    )
    raw = raw_s0(data, "jrc_synth1")
    assert len(written) == 2
    for item in written:
        grid = item.grid
        first = np.rint(np.asarray(grid.translation) / 8).astype(int)  # raw: 8 nm, origin 0
        expected = raw[tuple(slice(f, f + n) for f, n in zip(first, grid.shape, strict=True))]
        for name in CLASSES:
            values, attrs = read_output(item.path, name)
            assert values.dtype == np.uint8 and values.shape == grid.shape == (8, 32, 32)
            np.testing.assert_array_equal(values, expected, err_msg=f"{item.path}/{name}")
            transforms = attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
            assert transforms[0]["scale"] == [8.0, 8.0, 8.0]
            assert transforms[1]["translation"] == list(grid.translation)
            assert attrs["csc_prediction"]["orthoplanes"] is orthoplanes


def test_output_grid_is_the_crop_extent_on_the_target_grid(data: Path, tmp_path: Path) -> None:
    config = config_of(data, tmp_path)
    rows = {row.crop: row for row in read_datasplit(config.datasplit_path)}
    for region in crop_regions(config, all_crops=True):
        crop = zarr.open_group(
            str(Path(rows[region.name].gt_root) / rows[region.name].gt_path / "nuc"), mode="r"
        )
        level = crop.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        label_translation = np.asarray(level[1]["translation"])  # centre of label voxel 0, 4 nm
        low = label_translation - 2  # its edge
        assert np.allclose(region.low, low) and np.allclose(
            region.high, low + np.array([64, 256, 256])
        )


def test_blending_leaves_no_seam_and_blocks_do_not_change_the_result(
    data: Path, tmp_path: Path
) -> None:
    constant = config_of(
        data,
        tmp_path,
        (4, 16, 16),
        model=Constant(),
        model_name="constant",
        prediction_overlap=0.5,
        prediction_encoding="float16",
    )
    save_weights(constant)
    (region,) = crop_regions(constant, crops=["crop1"])
    values = predict_volume(load_predictor(constant, progress=False), region, constant)
    assert values.shape == (3, 8, 32, 32)
    np.testing.assert_allclose(values, 1 / (1 + np.exp(-0.7)), rtol=1e-6)

    unet = config_of(data, tmp_path / "unet", prediction_overlap=0.5)
    save_weights(unet)
    small = predict_volume(load_predictor(unet, progress=False), region, unet)
    whole = dict(prediction_block_shape=(64, 64, 64))
    large = predict_volume(
        load_predictor(unet, progress=False), region, build_config({**vars_of(unet), **whole})
    )
    np.testing.assert_array_equal(small, large)
    assert small.std() > 0  # a real model, not a constant


def vars_of(config: TrainConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in config.__dataclass_fields__ if k != "extras"}


def test_a_box_is_predicted_where_it_is_and_outside_the_raw_is_refused(
    data: Path, tmp_path: Path
) -> None:
    config = config_of(data, tmp_path, model=Echo(), model_name="echo")
    torch.save({}, tmp_path / "echo.pth")
    box = (16, 40, 80, 48, 200, 240)  # nm: 4 x 20 x 20 voxels of 8 nm from voxel (2, 5, 10)
    (item,) = predict(
        config,
        bbox=box,
        dataset="jrc_synth1",
        checkpoint=str(tmp_path / "echo.pth"),
        progress=False,
    )
    assert item.path == tmp_path / "predictions/jrc_synth1.zarr/bbox_16_40_80_48_200_240"
    assert item.grid.shape == (4, 20, 20) and item.grid.translation == (20.0, 44.0, 84.0)
    values, _ = read_output(item.path, "mito")
    # Raw voxel centres are at 8 * index: the box's voxels lie half a voxel off them, so the
    # echo is the linear mean of the 8 raw voxels around each (linear resampling of raw).
    raw = raw_s0(data, "jrc_synth1").astype(np.float64)
    corners = [
        raw[2 + a : 6 + a, 5 + b : 25 + b, 10 + c : 30 + c]
        for a in (0, 1)
        for b in (0, 1)
        for c in (0, 1)
    ]
    np.testing.assert_allclose(values, np.mean(corners, axis=0), atol=1.01)
    with pytest.raises(
        ValueError, match=r"reaches outside the raw of jrc_synth1 .* covers z -4 to"
    ):
        predict(config, bbox=(0, 0, 0, 64, 4000, 64), dataset="jrc_synth1", progress=False)
    with pytest.raises(ValueError, match="dataset 'nope' is not in"):
        predict(config, bbox=box, dataset="nope", progress=False)


def test_existing_output_is_kept_without_overwrite(data: Path, tmp_path: Path) -> None:
    config = config_of(data, tmp_path)
    save_weights(config)
    (first,) = predict(config, crops=["crop2"], progress=False)
    before = read_output(first.path, "er")[0]
    marker = first.path / "er" / "note.txt"
    marker.write_text("mine")
    # The same weights and settings: complete already, kept as it is, nothing predicted.
    (kept,) = predict(config, crops=["crop2"], progress=False)
    assert kept.blocks is not None and kept.blocks.predicted == 0
    assert kept.blocks.recorded == kept.blocks.total
    assert marker.read_text() == "mine"
    # Other settings (here the encoding): another run's output, refused without --overwrite.
    with pytest.raises(FileExistsError, match="crop2 already exists, predicted by another run"):
        predict(config, crops=["crop2"], encoding="float16", progress=False)
    assert marker.read_text() == "mine"
    (again,) = predict(config, crops=["crop2"], overwrite=True, progress=False)
    assert not marker.exists()
    np.testing.assert_array_equal(read_output(again.path, "er")[0], before)
    leftovers = [p.name for p in again.path.parent.iterdir() if "partial" in p.name]
    assert leftovers == []
    other = config_of(data, tmp_path / "wider", model_kwargs={"num_levels": 2, "base_channels": 8})
    with pytest.raises(ValueError, match=r"the weights in .*2d_unet_1.pth do not fit the model"):
        predict(other, crops=["crop2"], checkpoint=str(save_weights(config)), progress=False)
    with pytest.raises(FileNotFoundError, match="no latest checkpoint of 2d_unet"):
        predict(config_of(data, tmp_path / "untrained"), crops=["crop2"], progress=False)


def threshold(probabilities: np.ndarray) -> np.ndarray:
    return probabilities > 0.5


def test_process_applies_the_function_block_by_block(data: Path, tmp_path: Path) -> None:
    config = config_of(data, tmp_path, process_func=threshold)
    save_weights(config)
    predict(config, all_crops=True, progress=False)
    written = process(config, crops=("jrc_synth1/crop1",), progress=False)
    assert written == [tmp_path / "processed/jrc_synth1.zarr/crop1"]
    for name in CLASSES:
        source, _ = read_output(tmp_path / "predictions/jrc_synth1.zarr/crop1", name)
        result, attrs = read_output(written[0], name)
        assert result.dtype == np.uint8
        np.testing.assert_array_equal(result, (source / 255 > 0.5).astype(np.uint8))
        assert attrs["csc_process"]["function"] == "threshold"
        assert "multiscales" in attrs
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        process(config, crops=("crop1",), progress=False)
    shrink = build_config({**vars_of(config), "process_func": lambda p: p[:1]})
    with pytest.raises(ValueError, match="must return an array of the same shape"):
        process(shrink, output=tmp_path / "other", progress=False)
    assert not (tmp_path / "other/jrc_synth1.zarr/crop1").exists()  # nothing half-written
    default = build_config({**vars_of(config), "process_func": None})  # csc's "instances"
    (done,) = process(default, output=tmp_path / "default", crops=("crop1",), progress=False)
    nuc, attrs = read_output(done, "nuc")
    assert nuc.dtype == np.uint32 and attrs["csc_process"]["method"] == "instances"
    assert read_output(done, "er")[0].dtype == np.uint8  # a semantic class: thresholded


def test_csc_predict_and_process_on_the_command_line(data: Path, tmp_path: Path) -> None:
    config = config_of(data, tmp_path)
    save_weights(config)
    lines = [f"{key} = {value!r}" for key, value in settings(data, tmp_path).items()]
    lines.append("process_func = lambda p: (p > 0.5).astype('uint8')")
    path = tmp_path / "config.py"
    path.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    done = runner.invoke(cli, ["predict", str(path), "--crops", "crop1", "--encoding", "float16"])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and "jrc_synth1.zarr/crop1" in done.output
    values, attrs = read_output(tmp_path / "predictions/jrc_synth1.zarr/crop1", "nuc")
    assert values.dtype == np.float16 and attrs["csc_prediction"]["encoding"] == "float16"
    done = runner.invoke(
        cli, ["predict", str(path), "--bbox", "0,0,0,64,4000,64", "--dataset", "jrc_synth1"]
    )
    assert done.exit_code == 1 and "reaches outside the raw" in done.output
    done = runner.invoke(cli, ["process", str(path)])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "processed/jrc_synth1.zarr/crop1/nuc/s0").is_dir()


def test_train_predict_evaluate_round_trip(data: Path, tmp_path: Path) -> None:
    """A briefly trained model's predictions of the validation crops, scored by `evaluate` from
    the zarr files, equal the metrics computed in memory on the same region: the in-memory
    probabilities, each 8 nm voxel repeated over its 2 x 2 x 2 label voxels of 4 nm."""
    from csc.evaluation import evaluate
    from csc.metrics import SegmentationMetrics
    from csc.prediction import encode
    from csc.training import train

    config = config_of(
        data,
        tmp_path,
        epochs=2,
        iterations_per_epoch=4,
        learning_rate=3e-3,
        criterion="dice_bce",
        weight_loss=False,
        weighted_sampler=False,
    )
    train(config)
    written = predict(config, checkpoint="best", progress=False)  # the validation crops
    rows = [row for row in read_datasplit(config.datasplit_path) if row.usage == "validate"]
    assert [item.region.name for item in written] == [row.crop for row in rows]
    report = evaluate(tmp_path / "predictions", rows)
    predictor = load_predictor(config, checkpoint="best", progress=False)
    compared = 0
    for item, row in zip(written, rows, strict=True):
        probabilities = predict_volume(predictor, item.region, config)  # (C, Z, Y, X), 8 nm
        predicted = encode(probabilities, "uint8") / 255 > 0.5  # as stored, as evaluated
        for k, name in enumerate(CLASSES):
            if name not in row.classes:
                continue
            truth = np.asarray(
                zarr.open_group(f"{row.gt_root}/{row.gt_path}/{name}", mode="r")["s0"][...]
            )
            upsampled = predicted[k].repeat(2, 0).repeat(2, 1).repeat(2, 2)
            assert upsampled.shape == truth.shape
            metrics = SegmentationMetrics([name])
            metrics.update(
                torch.from_numpy(np.where(upsampled, 1.0, -1.0))[None, None],
                torch.from_numpy(truth.astype(np.float32))[None, None],
            )
            expected = metrics.compute()
            (result,) = [r for r in report.results if (r.crop, r.class_name) == (row.crop, name)]
            for metric in ("iou", "dice", "precision", "recall", "accuracy", "boundary_f1"):
                assert result.scores[metric] == pytest.approx(expected[metric][name]), metric
                compared += 1
    assert compared >= 12
