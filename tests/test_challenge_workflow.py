"""The challenge workflow end to end on `csc synth` data with held-out test crops: train a few
steps, `csc predict --crops test`, `csc process`, `csc pack-results --check`, then `csc evaluate`
of the zip against the held-out ground truth; its semantic IoU equals csc's own IoU of the same
arrays, and its instance counts equal a direct count on the packed arrays."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner, Result

from csc.cli import cli
from csc.config import INSTANCE_CLASSES
from csc.metrics import COUNT_NAMES, batch_counts, scores_from_counts
from csc.synth import SynthSpec, write_synthetic

CLASSES = ("nuc", "mito", "er")
SPEC = SynthSpec(
    num_datasets=2,
    num_crops=2,
    shape=(16, 64, 64),
    crop_shape=(16, 64, 64),
    test_crop_shape=(16, 48, 48),
    num_test_crops=1,
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)
CONFIG = """
search_path = "{data}/{{dataset}}/{{dataset}}.zarr/recon-1/{{name}}"
datasplit_path = "{run}/datasplit.csv"
classes = {classes}
input_array_info = {{"shape": (1, 32, 32), "scale": (8, 8, 8)}}
target_array_info = input_array_info
model_name = "2d_unet"
model_kwargs = {{"base_channels": 4, "num_levels": 2}}
epochs = 1
iterations_per_epoch = 60
batch_size = 4
learning_rate = 3e-3
validation_batch_limit = 1
device = "cpu"
random_seed = 3
prediction_block_shape = (8, 32, 32)
model_save_path = "{run}/checkpoints/{{model_name}}_{{epoch}}.pth"
logs_save_path = "{run}/tensorboard/{{model_name}}"
predictions_path = "{run}/predictions"
processed_path = "{run}/processed"
"""


def run(*args: str) -> Result:
    done = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return done


@pytest.mark.slow
def test_train_predict_process_pack_check_and_score_the_test_crops(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data, work = tmp_path / "data", tmp_path / "run"
    write_synthetic(data, SPEC)
    manifest, truth = data / "test_crop_manifest.csv", data / "ground_truth.zarr"
    config = work / "config.py"
    work.mkdir()
    config.write_text(CONFIG.format(data=data, run=work, classes=list(CLASSES)))

    run("train", str(config))
    crops = ("--crops", "test", "--test-crop-manifest", str(manifest))
    run("predict", str(config), *crops)
    predicted = sorted(p.name for p in (work / "predictions").glob("*.zarr/crop*"))
    assert predicted == ["crop1001", "crop1002"]
    run("process", str(config), *crops)
    submission = work / "submission.zarr"
    both = CliRunner().invoke(cli, ["pack-results", "--config", str(config), "-i", "x/{crop}"])
    assert both.exit_code == 2 and "not both" in both.output
    run(
        "pack-results",
        "--config",  # its processed_path: where csc process wrote
        str(config),
        "-o",
        str(submission),
        "--test-crop-manifest",
        str(manifest),
        "--check",
    )
    archive = work / "submission.zip"
    run("check-submission", str(archive), "--test-crop-manifest", str(manifest))  # exit 0: valid
    members = zipfile.ZipFile(archive).namelist()
    assert ".zgroup" in members and "crop1001/mito/.zarray" in members
    result = work / "result.json"
    run("evaluate", "-s", str(archive), "-r", str(result), "-t", str(truth), *crops[2:])

    public = json.loads(result.read_text())
    extended = json.loads((work / "result_extended.json").read_text())
    assert public["total_evals"] == public["num_evals_done"] == 6  # 2 crops x 3 classes
    assert set(public["label_scores"]) == set(CLASSES)
    packed_root = zarr.open_group(str(submission), mode="r")
    truth_root = zarr.open_group(str(truth), mode="r")
    counts = {name: torch.zeros(len(COUNT_NAMES), 1, dtype=torch.int64) for name in CLASSES}
    for crop in ("crop1001", "crop1002"):
        for name in CLASSES:
            prediction = np.asarray(packed_root[f"{crop}/{name}"][...])
            target = np.asarray(truth_root[f"{crop}/{name}"][...])
            assert prediction.shape == target.shape
            entry = extended[crop][name]
            if name in INSTANCE_CLASSES:
                # Every truth object is either matched or missed.
                assert entry["tp"] + entry["fn"] == len(np.unique(target[target > 0]))
                continue
            tp = int(np.count_nonzero((prediction > 0) & (target > 0)))
            assert (entry["tp"], entry["fp"], entry["fn"]) == (
                tp,
                int(np.count_nonzero(prediction > 0)) - tp,
                int(np.count_nonzero(target > 0)) - tp,
            )
            counts[name] += _csc_counts(prediction > 0, target > 0)
    # Semantic IoU pooled over crops: the challenge's number equals csc's own metric.
    (own,) = scores_from_counts(counts["er"])
    expected = 1.0 if own["iou"] is None else own["iou"]  # csc: None where nothing is in either
    assert public["label_scores"]["er"]["iou"] == pytest.approx(expected, abs=1e-6)


def _csc_counts(prediction: np.ndarray, target: np.ndarray) -> torch.Tensor:
    """csc.metrics' counts (COUNT_NAMES, 1) of one class over a whole crop (all annotated)."""
    pred, truth = (torch.as_tensor(a)[None, None] for a in (prediction, target))
    return batch_counts(pred, truth, torch.ones_like(truth), tolerance=1)
