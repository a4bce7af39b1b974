"""`csc process`'s own methods on predictions written by the test in csc predict's layout: ids
consistent across prediction blocks (an object over four blocks keeps one id, whole-crop and
stitched labelling agree), the size filter, the watershed split, the semantic threshold, named
and unknown `process_func`s, a user's per-block labels made consistent, label metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from csc.config import (
    INSTANCE_CLASSES,
    PROCESS_FUNC_NAMES,
    ConfigWarning,
    TrainConfig,
    build_config,
)
from csc.labelling import ClassJob, ProcessOptions, instances, watershed
from csc.processing import process
from csc.storage import multiscales_attrs, open_group, write_array

SHAPE = (8, 16, 16)  # voxels (z, y, x) of the predicted crop
BLOCK = (8, 8, 8)  # prediction_block_shape: the crop is 2 x 2 blocks in (y, x)
SCALE, TRANSLATION = (8.0, 8.0, 8.0), (4.0, 4.0, 4.0)  # nm


def ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    """A bool ball of `radius` voxels about `centre` (z, y, x)."""
    grid = np.indices(shape, dtype=np.float64)
    distance = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return np.asarray(distance <= radius**2)


def write_prediction(root: Path, probabilities: dict[str, np.ndarray], crop: str = "crop1") -> Path:
    """`probabilities` per class as csc predict writes them: uint8 round(p * 255) in
    root/jrc_test.zarr/crop/class/s0 with OME-NGFF multiscales."""
    path = root / "jrc_test.zarr" / crop
    for name, values in probabilities.items():
        group = open_group(str(path / name), mode="w")
        group.attrs.update(multiscales_attrs(name, [(SCALE, TRANSLATION)]))
        group.attrs["csc_prediction"] = {"class": name, "encoding": "uint8"}
        encoded = np.round(np.asarray(values) * 255).astype(np.uint8)
        write_array(group, "s0", encoded, chunks=(4, 8, 8), compressor="zstd")
    return path


def config_for(tmp_path: Path, classes: tuple[str, ...], **settings: Any) -> TrainConfig:
    return build_config(
        {
            "classes": classes,
            "search_path": f"{tmp_path}/data/{{dataset}}/{{dataset}}.zarr/recon-1/{{name}}",
            "datasplit_path": f"{tmp_path}/datasplit.csv",
            "predictions_path": f"{tmp_path}/predictions",
            "processed_path": f"{tmp_path}/processed",
            "prediction_block_shape": BLOCK,
            **settings,
        }
    )


def processed(tmp_path: Path, name: str, output: str = "processed") -> tuple[np.ndarray, dict]:
    group = open_group(str(tmp_path / output / "jrc_test.zarr/crop1" / name), mode="r")
    return np.asarray(group["s0"][...]), dict(group.attrs)


def array_job(
    probabilities: np.ndarray, block: tuple[int, ...], options: ProcessOptions | None = None
) -> tuple[ClassJob, list[np.ndarray]]:
    """An instance class's job over an in-memory array; the list receives its output."""
    outputs: list[np.ndarray] = []

    def create(dtype: Any) -> np.ndarray:
        outputs.append(np.zeros(probabilities.shape, dtype))
        return outputs[0]

    job = ClassJob(
        read=lambda box: probabilities[box].astype(np.float32),
        shape=probabilities.shape,
        block_shape=block,
        create=create,
        instance=True,
        options=options or ProcessOptions(),
    )
    return job, outputs


def two_objects() -> np.ndarray:
    """A ball at the centre of the crop, over all four blocks, and a separate 2^3 cube."""
    probabilities = ball(SHAPE, (4, 8, 8), 3.5) * 0.9
    probabilities[0:2, 0:2, 0:2] = 0.8
    return probabilities.astype(np.float32)


def test_an_object_over_four_blocks_gets_one_id(tmp_path: Path) -> None:
    mito = two_objects()
    write_prediction(tmp_path / "predictions", {"mito": mito})
    config = config_for(tmp_path, ("mito",))  # process_func unset: "instances"
    process(config, progress=False)
    labels, attrs = processed(tmp_path, "mito")
    assert labels.dtype == np.uint32
    # Ids 1..N by each object's first voxel in (z, y, x) order: the cube comes first.
    assert set(np.unique(labels[mito > 0.5]).tolist()) == {1, 2}
    assert np.unique(labels[0:2, 0:2, 0:2]).tolist() == [1]
    assert np.unique(labels[ball(SHAPE, (4, 8, 8), 3.5)]).tolist() == [2]
    assert not labels[mito <= 0.5].any()
    assert attrs["image-label"] == {"version": "0.4"} and "multiscales" in attrs
    assert attrs["csc_process"]["method"] == "instances"
    assert attrs["csc_process"]["labelled"] == "whole crop"
    assert attrs["csc_process"]["threshold"] == 0.5
    # Forced block by block (no memory for the whole crop): stitched, the same ids.
    stitched = config_for(tmp_path, ("mito",), process_memory_mb=0)
    process(stitched, output=tmp_path / "stitched", progress=False)
    again, attrs = processed(tmp_path, "mito", "stitched")
    assert attrs["csc_process"]["labelled"].startswith("block by block")
    np.testing.assert_array_equal(again, labels)


def test_stitched_ids_equal_whole_crop_ids_on_noise() -> None:
    """Many objects of every shape across uneven blocks: stitching gives the whole crop's ids."""
    noise = np.random.default_rng(3).random((20, 30, 40))
    probabilities = ndimage.gaussian_filter(noise, 1.0)
    probabilities = (probabilities - probabilities.min()) / np.ptp(probabilities)
    results = []
    for memory_mb, block in ((4096, (20, 30, 40)), (0, (7, 11, 13)), (0, (1, 4, 40))):
        options = ProcessOptions(threshold=0.6, min_instance_size=3, memory_mb=memory_mb)
        job, outputs = array_job(probabilities, block, options)
        instances(job)
        results.append(outputs[0])
    assert results[0].max() > 20  # many objects, numbered 1..N
    assert np.unique(results[0]).tolist() == list(range(results[0].max() + 1))
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_size_filter_removes_specks_and_semantic_classes_are_thresholded(
    tmp_path: Path,
) -> None:
    mito = two_objects()
    mito[6, 14, 14] = mito[0, 15, 0] = 0.7  # one-voxel specks
    er = np.linspace(0, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    write_prediction(tmp_path / "predictions", {"mito": mito, "er": er})
    assert "er" not in INSTANCE_CLASSES and "mito" in INSTANCE_CLASSES
    config = config_for(tmp_path, ("mito", "er"), min_instance_size=2, process_threshold=0.3)
    process(config, progress=False)
    labels, attrs = processed(tmp_path, "mito")
    assert labels.max() == 2 and labels[6, 14, 14] == 0 and labels[0, 15, 0] == 0
    assert attrs["csc_process"]["min_instance_size"] == 2
    semantic, attrs = processed(tmp_path, "er")
    assert semantic.dtype == np.uint8
    stored = np.round(er * 255) / 255  # what the uint8 prediction holds
    np.testing.assert_array_equal(semantic, (stored.astype(np.float32) > 0.3).astype(np.uint8))
    assert attrs["csc_process"] == {
        "source": str(tmp_path / "predictions/jrc_test.zarr/crop1/er"),
        "method": "threshold",
        "threshold": 0.3,
    }
    assert attrs["image-label"] == {"version": "0.4"}


def test_watershed_splits_touching_balls(tmp_path: Path) -> None:
    shape = (16, 16, 32)
    touching = ball(shape, (8, 8, 10), 5) | ball(shape, (8, 8, 19), 5)
    assert ndimage.label(touching)[1] == 1  # connected components see one object
    write_prediction(tmp_path / "predictions", {"ves": touching * np.float32(0.9)})
    settings = {"prediction_block_shape": (16, 16, 32), "watershed_min_distance": 3}
    process(config_for(tmp_path, ("ves",), **settings), progress=False)
    merged, _ = processed(tmp_path, "ves")
    assert merged.max() == 1
    split = config_for(tmp_path, ("ves",), process_func="watershed", **settings)
    process(split, output=tmp_path / "split", progress=False)
    labels, attrs = processed(tmp_path, "ves", "split")
    assert labels.max() == 2 and (labels > 0).sum() == touching.sum()
    assert labels[8, 8, 10] != labels[8, 8, 19]
    assert attrs["csc_process"]["method"] == "watershed"
    assert attrs["csc_process"]["watershed_min_distance"] == 3


def test_watershed_keeps_separate_objects_whole_and_empty_crops_empty() -> None:
    mask = np.zeros((6, 12, 12), dtype=bool)
    mask[1:5, 1:5, 1:5] = mask[1:5, 7:11, 7:11] = True
    job, outputs = array_job(mask, mask.shape)
    watershed(job)
    assert np.unique(outputs[0]).tolist() == [0, 1, 2]
    assert (outputs[0] > 0).sum() == mask.sum()
    for memory_mb in (4096, 0):  # nothing above the threshold: no ids, whole or per block
        for method in (instances, watershed):
            options = ProcessOptions(memory_mb=memory_mb)
            job, outputs = array_job(np.zeros((3, 5, 7)), (2, 2, 2), options)
            method(job)
            assert outputs[0].dtype == np.uint32 and not outputs[0].any()


def test_named_threshold_gives_instance_classes_masks(tmp_path: Path) -> None:
    write_prediction(tmp_path / "predictions", {"mito": two_objects()})
    process(config_for(tmp_path, ("mito",), process_func="threshold"), progress=False)
    labels, attrs = processed(tmp_path, "mito")
    assert labels.dtype == np.uint8 and np.unique(labels).tolist() == [0, 1]
    assert attrs["csc_process"]["method"] == "threshold"


def test_unknown_process_func_name_is_a_config_error(tmp_path: Path) -> None:
    message = (
        r"unknown process_func 'blobs'; available: 'instances', 'threshold', 'watershed' "
        r"\(or a callable\)"
    )
    assert sorted(PROCESS_FUNC_NAMES) == ["instances", "threshold", "watershed"]
    with pytest.raises(ValueError, match=message):
        config_for(tmp_path, ("mito",), process_func="blobs")
    with pytest.raises(ValueError, match="min_instance_size must be an integer >= 0"):
        config_for(tmp_path, ("mito",), min_instance_size=-1)
    with pytest.raises(ValueError, match=r"process_threshold must be in \[0, 1\)"):
        config_for(tmp_path, ("mito",), process_threshold=1.5)
    with pytest.warns(ConfigWarning, match="process_input = 'logits' has no effect"):
        config_for(tmp_path, ("mito",), process_input="logits")


def test_user_labels_per_block_get_consistent_ids(tmp_path: Path) -> None:
    mito = two_objects()
    write_prediction(tmp_path / "predictions", {"mito": mito})

    def label_block(probabilities: np.ndarray) -> np.ndarray:
        return np.asarray(ndimage.label(probabilities > 0.5)[0], dtype=np.int32)  # per block

    process(config_for(tmp_path, ("mito",), process_func=label_block), progress=False)
    labels, attrs = processed(tmp_path, "mito")
    assert labels.dtype == np.uint32
    assert np.unique(labels[ball(SHAPE, (4, 8, 8), 3.5)]).tolist() == [2]
    assert np.unique(labels[0:2, 0:2, 0:2]).tolist() == [1]
    assert attrs["csc_process"]["method"] == "callable"
    assert attrs["csc_process"]["function"].endswith("label_block")
    assert attrs["image-label"] == {"version": "0.4"}


def test_csc_process_without_process_func_on_the_command_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from csc.cli import cli

    write_prediction(tmp_path / "predictions", {"mito": two_objects()})
    lines = [
        "classes = ['mito']",
        f"search_path = '{tmp_path}/data/{{dataset}}/{{dataset}}.zarr/recon-1/{{name}}'",
        f"predictions_path = '{tmp_path}/predictions'",
        f"processed_path = '{tmp_path}/processed'",
        f"prediction_block_shape = {BLOCK}",
        "min_instance_size = 9",  # the 2 x 2 x 2 cube goes
    ]
    config = tmp_path / "config.py"
    config.write_text("\n".join(lines) + "\n")
    done = CliRunner().invoke(cli, ["process", str(config)])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output
    labels, _ = processed(tmp_path, "mito")
    assert np.unique(labels).tolist() == [0, 1]
    done = CliRunner().invoke(cli, ["process", str(config), "process_func=blobs"])
    assert done.exit_code != 0 and "unknown process_func 'blobs'" in done.output
