"""Faults in the data that training must never take in silently (docs/data.md): a raw with
no chunk stored under a crop, label chunks missing against their CellMap metadata, label
arrays of mixed dtypes in one crop, non-finite values in a float raw."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from csc.cli import cli
from csc.config import TrainConfig, build_config
from csc.data.datasets import PatchDataset
from csc.data.loaders import build_datasets, check_crops, load_crops, read_crops
from csc.data.sources import DataWarning
from csc.data.transforms import rotation
from csc.datasplit import DatasplitRow, write_datasplit
from csc.storage import Chunking, MetadataReader, any_chunk_stored, multiscales_attrs
from tests.faults import assert_unchanged, snapshot
from tests.s3server import upload_tree
from tests.volumes import (
    CROP_OFFSET,
    GT_PATH,
    LABEL_SHAPE,
    RAW_ORIGIN,
    RAW_PATH,
    RAW_SCALE,
    LabelGroup,
    LevelArray,
    checkerboard,
    coordinates,
    label_origin,
    patch_spec,
    raw_centre,
    rows_for,
    write_dataset,
)

CLASSES = ("ids", "mask")


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """A target transform that keeps the stored values (as float)."""
    return t.float()


def chunk_files(array: Path) -> list[Path]:
    """The chunk files of a zarr v2 array folder (nested keys z/y/x)."""
    return sorted(p for p in array.rglob("*") if p.is_file() and not p.name.startswith("."))


def remove_chunks(array: Path, keep: Callable[[tuple[int, ...]], bool] = lambda key: False) -> int:
    """Delete the chunk files of an array whose (z, y, x) chunk index `keep` refuses."""
    removed = 0
    for path in chunk_files(array):
        key = tuple(int(part) for part in path.relative_to(array).parts)
        if not keep(key):
            path.unlink()
            removed += 1
    return removed


def labels_at(offset: Sequence[int], *, shape: Sequence[int] = LABEL_SHAPE) -> dict:
    """Classes "ids" (coordinate ids) and "mask" (a checkerboard) of a crop starting at raw
    voxel `offset`, 4 nm."""
    origin = label_origin(offset)
    ids = coordinates(shape, dtype=np.uint32, offset=1)  # no 0: every voxel is present
    return {
        "ids": LabelGroup((LevelArray(ids, (4.0,) * 3, origin),)),
        "mask": LabelGroup((LevelArray(checkerboard(shape), (4.0,) * 3, origin),)),
    }


def config_for(rows: Sequence[DatasplitRow], csv: Path, **changes: Any) -> TrainConfig:
    write_datasplit(rows, csv, overwrite=True)
    info = {"shape": (1, 8, 8), "scale": (8, 8, 8)}
    values = {
        "datasplit_path": str(csv),
        "classes": list(CLASSES),
        "input_array_info": info,
        "target_array_info": info,
        "iterations_per_epoch": 2,
        "batch_size": 2,
        "weighted_sampler": False,
        "dataloader_kwargs": {},
        "random_seed": 3,
    }
    return build_config({**values, **changes})


# --- 1. A raw with no chunk stored under a crop: refused before training ------------------


def write_partial_raw(root: Path) -> Path:
    """A store whose raw (24, 40, 48) at 8 nm keeps only its chunks at x >= 32 voxels, with
    crop1 (raw x 8 to 20) far from them and crop2 (raw x 30 to 42) on them."""
    raw = [LevelArray(coordinates((24, 40, 48)), RAW_SCALE, RAW_ORIGIN)]
    write_dataset(root, raw, {"crop1": labels_at(CROP_OFFSET), "crop2": labels_at((4, 6, 30))})
    assert remove_chunks(root / RAW_PATH / "s0", keep=lambda key: key[2] >= 4) == 3 * 5 * 4
    return root


def test_a_crop_over_missing_raw_chunks_is_refused_naming_it(tmp_path: Path) -> None:
    root = write_partial_raw(tmp_path / "data" / "ds.zarr")
    rows = rows_for(root, {"crop1": CLASSES, "crop2": CLASSES})
    config = config_for(rows, tmp_path / "split.csv")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="no raw chunk is stored") as caught:
        build_datasets(config)
    message = str(caught.value)
    assert "crop ds/crop1 (raw " in message and f"{root}/{RAW_PATH}/s0" in message
    assert "crop2" not in message  # its raw is there
    assert str(tmp_path / "split.csv") in message and "\n" not in message
    # The other crop alone trains: its chunks are stored.
    train, _ = build_datasets(config_for(rows[1:], tmp_path / "split2.csv"))
    assert train.crops[0].name == "ds/crop2"
    assert_unchanged(before, tmp_path)


def test_csc_train_refuses_missing_raw_in_one_line_before_training(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    root = write_partial_raw(tmp_path / "data" / "ds.zarr")
    csv = tmp_path / "split.csv"
    write_datasplit(rows_for(root, {"crop1": CLASSES}), csv)
    path = write_config(f"""
        datasplit_path = {str(csv)!r}
        classes = ["ids", "mask"]
        input_array_info = {{"shape": (1, 8, 8), "scale": (8, 8, 8)}}
        target_array_info = {{"shape": (1, 8, 8), "scale": (8, 8, 8)}}
        model_name = "2d_unet"
        model_kwargs = {{"num_levels": 2, "base_channels": 4}}
        epochs = 1
        iterations_per_epoch = 2
        batch_size = 2
        device = "cpu"
        model_save_path = {str(tmp_path / "run" / "{model_name}_{epoch}.pth")!r}
        logs_save_path = {str(tmp_path / "run" / "logs")!r}
    """)
    before = snapshot(tmp_path)
    outcome = CliRunner().invoke(cli, ["train", str(path)])
    assert outcome.exit_code == 1, outcome.output
    assert "Traceback" not in outcome.output
    assert "no raw chunk is stored where the patches of crop ds/crop1" in outcome.output
    assert f"{root}/{RAW_PATH}/s0" in outcome.output
    assert not list((tmp_path / "run").glob("*.pth"))  # refused before any training
    assert_unchanged(before, tmp_path)


@pytest.mark.parametrize("separator", ["/", "."])
def test_stored_chunks_are_found_by_their_keys_with_either_separator(
    tmp_path: Path, separator: str
) -> None:
    """Only chunk (1, 2, 3) of a (4, 4, 4)-chunk grid is kept: boxes over it find it, boxes
    beside it, or outside the array, do not."""
    group = zarr.open_group(str(tmp_path / "raw"), mode="w", zarr_format=2)
    group.attrs.update(multiscales_attrs("raw", [(RAW_SCALE, RAW_ORIGIN)]))
    keys = {"name": "v2", "separator": separator}
    array = group.create_array(
        "s0", shape=(16, 16, 16), chunks=(4, 4, 4), dtype=np.uint8, chunk_key_encoding=keys
    )
    array[...] = 1
    array = tmp_path / "raw/s0"
    names = [p for p in array.rglob("*") if p.is_file() and not p.name.startswith(".")]
    kept = array / separator.join("123") if separator == "." else array / "1/2/3"
    for path in names:
        if path != kept:
            path.unlink()
    before = snapshot(tmp_path)
    reader = MetadataReader(".")
    source = reader.source(str(tmp_path / "raw"), RAW_SCALE, label=False)
    assert source.chunking == Chunking((4, 4, 4), separator, 0.0)
    assert any_chunk_stored(reader, source, (0, 0, 0), (16, 16, 16))
    assert any_chunk_stored(reader, source, (7, 11, 15), (8, 12, 16))  # its last voxel
    assert not any_chunk_stored(reader, source, (0, 0, 0), (4, 8, 12))  # beside it
    assert not any_chunk_stored(reader, source, (8, 0, 0), (16, 16, 16))
    assert not any_chunk_stored(reader, source, (16, 0, 0), (20, 4, 4))  # outside the array
    assert_unchanged(before, tmp_path)


# --- 2. Label chunks missing where their metadata counts foreground: a warning ------------


def test_label_array_without_chunks_but_counted_foreground_warns_once(tmp_path: Path) -> None:
    raw = [LevelArray(coordinates((20, 30, 40)), RAW_SCALE, RAW_ORIGIN)]
    classes = labels_at(CROP_OFFSET)
    empty = LevelArray(np.zeros(LABEL_SHAPE, np.uint8), (4.0,) * 3, label_origin())
    classes["none"] = LabelGroup((empty,))  # all background: no chunk written, count 0
    root = write_dataset(tmp_path / "ds.zarr", raw, {"crop1": classes})
    crop = root / GT_PATH / "crop1"
    assert not chunk_files(crop / "none/s0")  # zarr leaves all-fill chunks unwritten
    assert remove_chunks(crop / "mask/s0") == 2 * 3 * 3  # counted foreground, now missing
    remove_chunks(crop / "ids/s0", keep=lambda key: key == (0, 0, 0))  # some chunks remain
    rows = rows_for(root, {"crop1": (*CLASSES, "none")})
    both = rows + rows_for(root, {"crop1": (*CLASSES, "none")}, usage="validate")
    config = config_for(both, tmp_path / "split.csv", classes=[*CLASSES, "none"])
    before = snapshot(tmp_path)
    with pytest.warns(DataWarning) as caught:
        shared = read_crops(config)  # rank 0's read, which torchrun's other ranks are sent
    assert len(caught) == 1  # one array, in two crops of the split: one warning
    message = str(caught[0].message)
    assert message.startswith(f"{crop}/mask/s0: its CellMap metadata (complement_counts)")
    assert f"counts {np.count_nonzero(checkerboard(LABEL_SHAPE))} foreground" in message
    assert "reads as 0 (background)" in message
    # Only rank 0 reads and warns under torchrun; every rank builds its datasets quietly.
    build_datasets(config, crops=shared)
    build_datasets(config, rank=1, world_size=2, crops=shared)
    assert_unchanged(before, tmp_path)


# --- 1 and 2 on S3 ------------------------------------------------------------------------


def test_missing_chunks_on_s3_are_found_by_their_keys(s3_env: str, tmp_path: Path) -> None:
    """One store (few objects: a quick upload): an empty raw, a whole one, and a crop whose
    "mask" lost its chunks."""
    local = tmp_path / "bucket"
    raw = [LevelArray(coordinates((12, 16, 16)), RAW_SCALE, RAW_ORIGIN)]
    store = write_dataset(local / "ds.zarr", raw, {"crop1": labels_at((2, 4, 4), shape=(8, 8, 8))})
    shutil.copytree(store / RAW_PATH, store / "recon-1/em/empty")
    remove_chunks(store / "recon-1/em/empty/s0")
    remove_chunks(store / GT_PATH / "crop1/mask/s0")
    upload_tree(s3_env, local, "faults-data", public=True)
    before = snapshot(local)
    spec, root = patch_spec((1, 4, 4), RAW_SCALE), "s3://faults-data/ds.zarr"

    rows = [
        DatasplitRow("train", root, raw_path, root, f"{GT_PATH}/crop1", CLASSES)
        for raw_path in ("recon-1/em/empty", RAW_PATH)
    ]
    empty, whole = load_crops(rows, CLASSES, spec)  # metadata read concurrently
    with pytest.raises(
        ValueError, match="no raw chunk is stored where the patches of crop ds/crop1"
    ) as caught:
        check_crops([empty], spec, datasplit="split.csv")
    assert f"{root}/recon-1/em/empty/s0" in str(caught.value)
    with pytest.warns(DataWarning, match=f"{root}/{GT_PATH}/crop1/mask/s0: its CellMap"):
        check_crops([whole], spec, datasplit="split.csv")
    assert_unchanged(before, local)


# --- 3. Label arrays of every dtype, mixed in one crop -------------------------------------

# Each class stores a function of the coordinate value c = z * 10000 + y * 100 + x of its
# voxel; class "pos" stores c itself, so a sample's "pos" target says which voxel every other
# class's target came from (the same, in any path), and their truth follows. float32 holds
# each value exactly except where noted.
BIG = 2**63  # uint64 ids beyond float64's integers: rounding would make 2**63 the unknown
UNKNOWN = BIG + 1


def _uint64(c: np.ndarray) -> np.ndarray:
    out = (c.astype(np.uint64) << np.uint64(40)) + np.uint64(1)  # rounded as float32 alike
    out[c % 7 == 0] = UNKNOWN
    out[c % 7 == 1] = BIG
    out[c % 7 == 3] = 0
    return out


DTYPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "pos": lambda c: c.astype(np.float64),
    "u8": lambda c: (c % 251).astype(np.uint8),
    "u16": lambda c: (c % 65521).astype(np.uint16),
    "u32": lambda c: (c + 3_000_000_000).astype(np.uint32),
    "u64": _uint64,
    "i8": lambda c: (c % 200 - 100).astype(np.int8),
    "i16": lambda c: (c % 30000 - 15000).astype(np.int16),
    "i32": lambda c: (c - 100_000).astype(np.int32),
    "i64": lambda c: (c - 10**12).astype(np.int64),
    "f32": lambda c: (c + 0.25).astype(np.float32),
    "f64": lambda c: c / 7.0,
    "bool": lambda c: c % 2 == 1,
}
ENCODINGS = {"u64": {"absent": 0, "present": 1, "unknown": UNKNOWN}}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """crop1 with a class of each dtype, levels s0 (4 nm) and s1 (8 nm, on the raw grid)."""
    root = tmp_path_factory.mktemp("mixed") / "ds.zarr"
    origin = label_origin()
    s1_origin = tuple(t + 2 for t in origin)
    classes = {}
    for name, make in DTYPES.items():
        levels = (
            LevelArray(make(coordinates(LABEL_SHAPE, dtype=np.int64)), (4.0,) * 3, origin),
            LevelArray(
                make(coordinates([n // 2 for n in LABEL_SHAPE], dtype=np.int64)),
                (8.0,) * 3,
                s1_origin,
            ),
        )
        classes[name] = LabelGroup(levels, encoding=ENCODINGS.get(name))
    raw = [LevelArray(coordinates((20, 30, 40)), RAW_SCALE, RAW_ORIGIN)]
    return write_dataset(root, raw, {"crop1": classes})


def truth(pos: np.ndarray, name: str) -> np.ndarray:
    """What class `name`'s stored-value target must be where class "pos" read `pos`."""
    inside = ~np.isnan(pos)
    c = np.where(inside, pos, 0).astype(np.int64)
    values = DTYPES[name](c)
    expected = values.astype(np.float32)
    if name == "u64":
        expected[values == UNKNOWN] = np.nan
    expected[~inside] = np.nan
    return expected


MATRICES = {
    "plain": np.eye(3),
    "flipped": np.diag([1.0, 1.0, -1.0])[[0, 2, 1]],  # exact path, mirrored and transposed
    "about-z": rotation(0, 30),  # slices along z
    "about-x": rotation(2, 25),  # slices along x (2D: tilted)
    "oblique": rotation(0, 30) @ rotation(1, 20),  # a 3D grid of nearest voxels
}


@pytest.mark.parametrize("matrix", list(MATRICES), ids=list(MATRICES))
@pytest.mark.parametrize(
    ("input_shape", "target_shape", "target_scale"),
    [
        ((4, 6, 6), (8, 12, 12), (4, 4, 4)),
        ((4, 6, 6), (4, 6, 6), (8, 8, 8)),
        ((1, 6, 6), (1, 12, 12), (8, 4, 4)),
        ((1, 6, 6), (1, 6, 6), (8, 8, 8)),
    ],
    ids=["3d-4nm", "3d-8nm", "2d-4nm", "2d-8nm"],
)
def test_label_arrays_of_every_dtype_mix_in_one_crop(
    mixed: Path, input_shape: tuple, target_shape: tuple, target_scale: tuple, matrix: str
) -> None:
    names = list(DTYPES)
    spec = patch_spec(input_shape, RAW_SCALE, target_shape, target_scale)
    crops = load_crops(rows_for(mixed, {"crop1": names}), names, spec)
    assert [label.dtype for label in crops[0].labels if label] == [
        "float64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float32",
        "float64",
        "bool",
    ]
    before = snapshot(mixed)
    values = PatchDataset(crops, spec, target_transform=stored_values)
    masks = PatchDataset(crops, spec)
    # One centre inside the crop, one on its edge (the patch leaves the labels); each read
    # twice, so the second comes from the crop regions held in memory.
    low = np.asarray(CROP_OFFSET)
    centres = [raw_centre(low + np.array([4, 6, 6])), raw_centre(low + np.array([0, 1, 0]))]
    requests = [(0, c, MATRICES[matrix], 0) for c in centres for _ in range(2)]
    for sample, mask in zip(values.read(requests), masks.read(requests), strict=True):
        out, binary = sample["output"].numpy(), mask["output"].numpy()
        pos = out[0]
        assert 0 < np.isnan(pos).mean() < 1 or np.isfinite(pos).all()
        assert np.isfinite(pos).any()
        for k, name in enumerate(names):
            expected = truth(pos, name)
            np.testing.assert_array_equal(out[k], expected, err_msg=name)
            # Default transform: 1 where not absent (0), NaN where unknown or outside.
            present = np.where(np.isnan(expected), np.nan, (expected != 0).astype(np.float32))
            np.testing.assert_array_equal(binary[k], present, err_msg=name)
    edge = values.read(requests[2:3])[0]["output"]
    assert edge.isnan().any()  # the patch on the crop's edge leaves it
    assert_unchanged(before, mixed)


# --- 4. Non-finite values in a float raw: reported with the crop, once ---------------------


@pytest.fixture(scope="module")
def nan_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 raw with a NaN and an inf inside crop1."""
    data = coordinates((20, 30, 40))
    data[8, 12, 14] = np.nan
    data[9, 13, 15] = np.inf
    root = tmp_path_factory.mktemp("nan") / "ds.zarr"
    raw = [LevelArray(data, RAW_SCALE, RAW_ORIGIN)]
    return write_dataset(root, raw, {"crop1": labels_at(CROP_OFFSET)})


@pytest.mark.parametrize("crop_cache_mb", [256, 0], ids=["regions", "tensorstore"])
def test_non_finite_raw_values_are_reported_once_per_crop(
    nan_raw: Path, crop_cache_mb: int
) -> None:
    spec = patch_spec((1, 6, 6), RAW_SCALE)
    crops = load_crops(rows_for(nan_raw, {"crop1": CLASSES}), CLASSES, spec)
    dataset = PatchDataset(crops, spec, crop_cache_mb=crop_cache_mb)
    before = snapshot(nan_raw)
    clean = [(0, raw_centre([6, 8, 10]), np.eye(3), 0)]  # a patch away from them
    assert torch.isfinite(dataset.read(clean)[0]["input"]).all()
    on_nan = [(0, raw_centre([8, 12, 14]), rotation(0, 10 * k), k) for k in range(3)]
    with pytest.warns(DataWarning) as caught:
        batches = [dataset.read(on_nan), dataset.read(on_nan + clean)]  # met twice: one warning
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"crop ds/crop1: its raw {nan_raw}/{RAW_PATH}/s0 holds 2 non-finite")
    assert "the first at voxel (8, 12, 14)" in message
    assert not torch.isfinite(batches[0][0]["input"]).all()  # the values themselves are kept
    # Another dataset (a new training run, a worker) reports the crop again; so does
    # prediction, which reads inputs only.
    with pytest.warns(DataWarning, match="crop ds/crop1"):
        PatchDataset(crops, spec, crop_cache_mb=crop_cache_mb).read(on_nan)
    with pytest.warns(DataWarning, match="crop ds/crop1"):
        inputs = PatchDataset(crops, spec, crop_cache_mb=crop_cache_mb).read_inputs(on_nan)
    assert inputs.shape == (3, 1, 6, 6)
    assert_unchanged(before, nan_raw)


def test_non_finite_raw_in_a_training_loader_warns_as_batches_are_read(
    nan_raw: Path, tmp_path: Path
) -> None:
    config = config_for(
        rows_for(nan_raw, {"crop1": CLASSES}), tmp_path / "split.csv", iterations_per_epoch=4
    )
    train, _ = build_datasets(config)  # nothing is read yet: no warning
    before = snapshot(nan_raw)
    crop = train.crops[0]
    centre = raw_centre([8, 12, 14])
    assert np.all(np.asarray(crop.low) < centre) and np.all(centre < np.asarray(crop.high))
    # Three epochs: the crop's region is held in memory from its second read on.
    with pytest.warns(DataWarning, match=f"crop ds/crop1: its raw {nan_raw}/{RAW_PATH}/s0"):
        batches = [train.__getitems__([(epoch, i) for i in range(8)]) for epoch in (1, 2, 3)]
    assert any(not torch.isfinite(batch.tensors["input"]).all() for batch in batches)
    assert_unchanged(before, nan_raw)


def test_integer_raw_is_never_checked_for_non_finite_values(tmp_path: Path) -> None:
    raw = [LevelArray(coordinates((20, 30, 40), dtype=np.uint8), RAW_SCALE, RAW_ORIGIN)]
    root = write_dataset(tmp_path / "ds.zarr", raw, {"crop1": labels_at(CROP_OFFSET)})
    spec = patch_spec((1, 6, 6), RAW_SCALE)
    dataset = PatchDataset(load_crops(rows_for(root, {"crop1": CLASSES}), CLASSES, spec), spec)
    requests = [(0, raw_centre([8, 12, 14]), np.eye(3), 0)] * 3
    dataset.read(requests)
    jobs = [dataset._start(*request) for request in requests]
    assert not any(job.check_raw for job in jobs) and not dataset._finite_regions
