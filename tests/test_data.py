"""csc.data: exact alignment on coordinate-valued volumes, spatial and value transforms, NaN
semantics, class-balanced sampling, loaders and workers, validation tiles, S3."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from csc.config import ArrayInfo, TrainConfig, build_config
from csc.data import (
    Compose,
    GaussianBlur,
    GaussianNoise,
    Normalize,
    RandomContrast,
    RandomGamma,
    build_loaders,
)
from csc.data.datasets import (
    EpochSampler,
    PatchDataset,
    PatchSpec,
    TrainPatches,
    ValidationTiles,
    crop_probabilities,
)
from csc.data.loaders import build_datasets, fill_foreground, load_crops, loader_kwargs
from csc.data.transforms import rotation, sample_generator, spatial_matrix
from csc.datasplit import CrawlOptions, DatasplitRow, crawl, write_datasplit
from csc.storage import StorageError, tensorstore_used_here
from tests.volumes import (
    CROP_OFFSET,
    LABEL_SHAPE,
    RAW_ORIGIN,
    RAW_SCALE,
    RAW_SHAPE,
    S0_IDS,
    S1_IDS,
    LabelGroup,
    LevelArray,
    checkerboard,
    coordinate_value,
    coordinates,
    label_origin,
    patch_spec,
    raw_centre,
    rows_for,
    write_aligned,
    write_dataset,
    write_group,
)

CLASSES = ("ids", "mask")
RAW = coordinates(RAW_SHAPE)
IDS_S0 = coordinates(LABEL_SHAPE, dtype=np.uint32, offset=S0_IDS).astype(np.float32)
IDS_S1 = coordinates([n // 2 for n in LABEL_SHAPE], dtype=np.uint32, offset=S1_IDS).astype(
    np.float32
)
MASK = checkerboard(LABEL_SHAPE).astype(np.float32)
OFFSET = np.asarray(CROP_OFFSET)  # crop1's first raw voxel
FLIP_X = np.diag([1.0, 1.0, -1.0])
SWAP_YX = np.eye(3)[[0, 2, 1]]


def stored_values(t: torch.Tensor) -> torch.Tensor:
    """A raw or target transform that keeps the stored values (as float)."""
    return t.float()


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standard coordinate-valued store, written once for this module; not modified."""
    return write_aligned(tmp_path_factory.mktemp("aligned") / "ds.zarr")


def stored(
    root: Path,
    spec: Any,
    *,
    classes: Sequence[str] = CLASSES,
    row_classes: Sequence[str] = CLASSES,
) -> PatchDataset:
    """A dataset over crop1 of `root` returning stored values, raw and labels."""
    crops = load_crops(rows_for(root, {"crop1": row_classes}), classes, spec)
    return PatchDataset(crops, spec, raw_transform=stored_values, target_transform=stored_values)


def centre_for(first: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """The centre (nm) of a raw-voxel-sized patch whose voxel 0 sits on raw voxel `first`."""
    return raw_centre(np.asarray(first, dtype=float) + (np.asarray(shape) - 1) / 2)


def box(array: np.ndarray, first: Sequence[int], shape: Sequence[int], step: int = 1) -> Any:
    """`array[first : first + shape * step : step]` as a tensor, all three axes."""
    index = tuple(slice(f, f + n * step, step) for f, n in zip(first, shape, strict=True))
    return torch.from_numpy(np.ascontiguousarray(array[index]))


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal values and shapes, NaN equal to NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a, nan=-1.0), torch.nan_to_num(b, nan=-1.0))


def assert_samples_equal(a: Sequence[dict], b: Sequence[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"input", "output"}
        assert_same(x["input"], y["input"])
        assert_same(x["output"], y["output"])


# --- 1. Alignment: exact values -------------------------------------------------------------


def test_3d_even_patch_reads_the_exact_raw_and_4nm_label_voxels(aligned: Path) -> None:
    spec = patch_spec((4, 6, 6), RAW_SCALE, (8, 12, 12), (4, 4, 4))
    dataset = stored(aligned, spec)
    assert [label.level.path for label in dataset.crops[0].labels] == ["s0", "s0"]
    first = (6, 9, 11)  # raw voxel under input voxel 0
    sample = dataset.sample(0, centre_for(first, (4, 6, 6)))
    assert sample["input"].shape == (1, 4, 6, 6) and sample["input"].dtype == torch.float32
    assert torch.equal(sample["input"][0], box(RAW, first, (4, 6, 6)))
    # Two 4 nm label voxels split each raw voxel: label voxel 2 * (raw voxel - crop offset).
    label_first = 2 * (np.asarray(first) - OFFSET)
    assert tuple(label_first) == (4, 6, 6)
    assert sample["output"].shape == (2, 8, 12, 12)
    assert torch.equal(sample["output"][0], box(IDS_S0, label_first, (8, 12, 12)))
    assert torch.equal(sample["output"][1], box(MASK, label_first, (8, 12, 12)))
    assert sample["input"][0, 0, 0, 0] == 60911  # raw voxel (6, 9, 11), spelled out
    assert sample["output"][0, 0, 0, 0] == S0_IDS + 40606


def test_default_target_transform_gives_present_one_absent_zero(aligned: Path) -> None:
    spec = patch_spec((4, 6, 6), RAW_SCALE, (8, 12, 12), (4, 4, 4))
    crops = load_crops(rows_for(aligned, {"crop1": CLASSES}), CLASSES, spec)
    sample = PatchDataset(crops, spec).sample(0, centre_for((6, 9, 11), (4, 6, 6)))
    assert torch.equal(sample["output"][0], torch.ones(8, 12, 12))  # ids are all non-zero
    assert torch.equal(sample["output"][1], box(MASK, (4, 6, 6), (8, 12, 12)))
    # A float32 raw is passed through as stored by the default Normalize.
    assert torch.equal(sample["input"][0], box(RAW, (6, 9, 11), (4, 6, 6)))


def test_3d_odd_patch_at_8nm_reads_label_level_s1(aligned: Path) -> None:
    spec = patch_spec((3, 5, 5), RAW_SCALE)
    dataset = stored(aligned, spec)
    ids, mask = dataset.crops[0].labels
    assert ids is not None and mask is not None
    assert (ids.level.path, ids.level.scale) == ("s1", (8.0, 8.0, 8.0))
    assert (mask.level.path, mask.level.scale) == ("s0", (4.0, 4.0, 4.0))  # its only level
    first = (5, 8, 10)
    # Odd sizes: the centre is the middle voxel's own centre.
    centre = raw_centre(np.asarray(first) + np.array([1, 2, 2]))
    sample = dataset.sample(0, centre)
    assert torch.equal(sample["input"][0], box(RAW, first, (3, 5, 5)))
    # The 8 nm s1 sits on the raw voxels: s1 voxel = raw voxel - crop offset.
    assert torch.equal(sample["output"][0], box(IDS_S1, np.asarray(first) - OFFSET, (3, 5, 5)))
    # The mask has no 8 nm level: nearest 4 nm voxel, and an 8 nm centre lies halfway between
    # two of them; ties round up (the documented rule), to label voxel 2 * (raw - offset) + 1.
    expected = box(MASK, 2 * (np.asarray(first) - OFFSET) + 1, (3, 5, 5), step=2)
    assert torch.equal(sample["output"][1], expected)
    assert torch.equal(expected, torch.ones(3, 5, 5))  # odd + odd + odd: all present


@pytest.mark.parametrize(
    ("shape", "scale", "plane"),
    [((1, 6, 6), (8, 8, 8), 0), ((6, 6), (8, 8), 0), ((6, 1, 6), (8, 8, 8), 1)],
    ids=["1x6x6", "6x6", "6x1x6"],
)
def test_2d_patch_drops_the_singleton_axis(
    aligned: Path, shape: tuple[int, ...], scale: tuple[float, ...], plane: int
) -> None:
    dataset = stored(aligned, patch_spec(shape, scale))
    assert dataset.spec.plane_axis == plane
    grid = dataset.spec.input.shape  # (z, y, x), the singleton included
    first = (5, 10, 12)
    sample = dataset.sample(0, centre_for(first, grid))
    assert sample["input"].shape == (1, 6, 6) and sample["output"].shape == (2, 6, 6)
    assert torch.equal(sample["input"][0], box(RAW, first, grid).squeeze(plane))
    ids = box(IDS_S1, np.asarray(first) - OFFSET, grid).squeeze(plane)
    assert torch.equal(sample["output"][0], ids)


def test_even_patch_centre_convention_in_world_nm(aligned: Path) -> None:
    """Output voxel i sits at centre + (i - (n - 1) / 2) * scale, spelled out in nm."""
    dataset = stored(aligned, patch_spec((2, 2, 4), RAW_SCALE))
    centre = np.array([60.0, 100.0, 80.0])
    # Voxel 0 at centre - (0.5, 0.5, 1.5) * 8 = (56, 96, 68) nm: raw voxel (6.5, 10.5, 11),
    # half-way between raw voxels in z and y, where linear interpolation of a linear volume
    # gives the linear value.
    assert np.array_equal(
        (centre - np.array([0.5, 0.5, 1.5]) * 8 - RAW_ORIGIN) / 8, [6.5, 10.5, 11]
    )
    expected = coordinate_value(
        *np.meshgrid(6.5 + np.arange(2), 10.5 + np.arange(2), 11 + np.arange(4), indexing="ij")
    )
    sample = dataset.sample(0, centre)
    assert torch.allclose(sample["input"][0], torch.from_numpy(expected).float(), atol=0.05)
    # Half a voxel further on z and y: on the raw grid, stored values bit for bit.
    on_grid = dataset.sample(0, centre + np.array([4.0, 4.0, 0.0]))
    assert torch.equal(on_grid["input"][0], box(RAW, (7, 11, 11), (2, 2, 4)))


def test_coarser_raw_than_stored_is_interpolated(aligned: Path) -> None:
    dataset = stored(aligned, patch_spec((2, 4, 4), (16, 16, 16)))
    assert dataset.crops[0].raw.level.scale == RAW_SCALE  # the only level: resampled
    # On the 8 nm grid (integer raw positions, step 2): stored values, bit for bit.
    sample = dataset.sample(0, raw_centre((9, 12, 15)))
    assert torch.equal(sample["input"][0], box(RAW, (8, 9, 12), (2, 4, 4), step=2))
    # Off the grid: output voxel i at raw position c + (i - (n - 1) / 2) * 2.
    c = np.array([9.25, 12.5, 15.75])
    sample = dataset.sample(0, raw_centre(c))
    axes = [c[d] + (np.arange(n) - (n - 1) / 2) * 2 for d, n in enumerate((2, 4, 4))]
    expected = coordinate_value(*np.meshgrid(*axes, indexing="ij"))
    assert expected[0, 0, 0] == 8.25 * 10000 + 9.5 * 100 + 12.75
    assert torch.allclose(sample["input"][0], torch.from_numpy(expected).float(), atol=0.05)


def test_integer_raw_is_scaled_to_unit_range_by_default(tmp_path: Path) -> None:
    raw = coordinates((4, 5, 6), dtype=np.uint16)
    label = LabelGroup((LevelArray(checkerboard((4, 5, 6)), (8.0,) * 3, (0.0,) * 3),))
    root = write_dataset(
        tmp_path / "u16.zarr", [LevelArray(raw, (8.0,) * 3, (0.0,) * 3)], {"crop1": {"mask": label}}
    )
    spec = patch_spec((2, 3, 4), (8, 8, 8))
    crops = load_crops(rows_for(root, {"crop1": ("mask",)}), ["mask"], spec)
    sample = PatchDataset(crops, spec).sample(0, (0.5 * 8, 1 * 8, 1.5 * 8))
    expected = torch.from_numpy(raw[:2, :3, :4].astype(np.float32)) / 65535
    assert torch.allclose(sample["input"][0], expected, rtol=1e-6, atol=0)
    assert float(sample["input"].max()) == pytest.approx(10203 / 65535)
    assert torch.equal(sample["output"][0], torch.from_numpy(checkerboard((2, 3, 4))).float())


# --- 2. Mirror and transpose: exact ----------------------------------------------------------


def test_flip_and_transpose_matrices_move_raw_and_labels_exactly(aligned: Path) -> None:
    dataset = stored(aligned, patch_spec((4, 6, 6), RAW_SCALE, (8, 12, 12), (4, 4, 4)))
    centre = centre_for((6, 9, 11), (4, 6, 6))
    plain = dataset.sample(0, centre)
    flipped = dataset.sample(0, centre, FLIP_X)
    swapped = dataset.sample(0, centre, SWAP_YX)
    for key in ("input", "output"):
        assert torch.equal(flipped[key], plain[key].flip(-1))
        assert torch.equal(swapped[key], plain[key].transpose(-1, -2))
        assert not torch.equal(flipped[key], plain[key])


def test_spatial_matrix_from_the_config_format() -> None:
    rng = np.random.default_rng(0)
    assert np.array_equal(spatial_matrix({"mirror": {"axes": {"x": 1.0}}}, rng), FLIP_X)
    assert np.array_equal(spatial_matrix({"mirror": {"axes": {"z": 0.0}}}, rng), np.eye(3))
    assert np.array_equal(spatial_matrix(None, rng), np.eye(3))
    drawn = {spatial_matrix({"transpose": {"axes": ["x", "y"]}}, rng).tobytes() for _ in range(40)}
    assert drawn == {np.eye(3).tobytes(), SWAP_YX.tobytes()}
    turn = spatial_matrix({"rotate": {"axes": {"z": [90, 90]}}}, rng)
    assert np.allclose(turn, rotation(0, 90)) and np.allclose(turn @ turn.T, np.eye(3))


# --- 3. Rotation ------------------------------------------------------------------------------


def test_quarter_turn_about_z_is_rot90_exactly(aligned: Path) -> None:
    dataset = stored(aligned, patch_spec((4, 6, 6), RAW_SCALE, (8, 12, 12), (4, 4, 4)))
    centre = centre_for((6, 9, 11), (4, 6, 6))
    plain = dataset.sample(0, centre)
    turned = dataset.sample(0, centre, rotation(0, 90))
    # M (dz, dy, dx) = (dz, -dx, dy): output (y, x) = (j, k) reads (n - 1 - k, j), which is
    # np.rot90 with k=-1 over the (y, x) axes.
    for key in ("input", "output"):
        assert torch.equal(turned[key], torch.rot90(plain[key], -1, dims=(-2, -1)))


def test_45_degree_rotation_interpolates_raw_without_undefined_corners(aligned: Path) -> None:
    dataset = stored(aligned, patch_spec((3, 7, 7), RAW_SCALE))
    c = np.array([10, 15, 20])  # raw voxel at the patch centre, far from the raw's edges
    matrix = rotation(0, 45)
    sample = dataset.sample(0, raw_centre(c), matrix)
    image = sample["input"][0]
    assert not image.isnan().any() and (image != 0).all()
    # Same voxel size: output voxel i reads raw position c + M (i - 3); linear interpolation
    # of a linear volume is the linear value there.
    offsets = np.stack(
        np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in (3, 7, 7)], indexing="ij"), axis=-1
    )
    positions = c + offsets @ matrix.T  # (Z, Y, X, 3)
    expected = coordinate_value(positions[..., 0], positions[..., 1], positions[..., 2])
    assert torch.allclose(image, torch.from_numpy(expected).float(), atol=0.05)
    assert abs(float(image[1, 3, 3]) - float(RAW[tuple(c)])) < 0.01  # the centre is fixed


def test_rotated_labels_are_nearest_voxels_and_nan_outside(aligned: Path) -> None:
    spec = patch_spec((1, 9, 9), RAW_SCALE)
    rotated = stored(aligned, spec)
    defaults = PatchDataset(rotated.crops, spec)
    ids = rotated.crops[0].labels[0]
    assert ids is not None and ids.level.path == "s1"
    # Centred on the crop's first s1 voxel in y: about half the patch lies outside the crop.
    c = OFFSET + np.array([3, 0, 6])
    matrix = rotation(0, 30)
    sample = rotated.sample(0, raw_centre(c), matrix)
    target = sample["output"][0].numpy()
    offsets = np.stack(
        [np.zeros((9, 9)), *np.meshgrid(np.arange(9) - 4, np.arange(9) - 4, indexing="ij")], axis=-1
    )
    positions = (c - OFFSET) + offsets @ matrix.T  # s1 voxel positions, (Y, X, 3)
    nearest = np.floor(positions + 0.5).astype(int)
    inside = np.all((nearest >= 0) & (nearest < IDS_S1.shape), axis=-1)
    clear = np.all(np.abs(positions - np.rint(positions)) < 0.49, axis=-1)  # no near-ties
    assert inside.any() and (~inside).any() and clear.mean() > 0.9
    assert np.array_equal(np.isnan(target)[clear], ~inside[clear])
    wanted = IDS_S1[
        nearest[..., 0], np.clip(nearest[..., 1], 0, 11), np.clip(nearest[..., 2], 0, 11)
    ]
    assert np.array_equal(target[clear & inside], wanted[clear & inside])
    # With the default target transform: only 0, 1 and NaN, all three present.
    mask = defaults.sample(0, raw_centre(c), rotation(0, 45))["output"][1]
    values = set(torch.nan_to_num(mask, nan=-1.0).unique().tolist())
    assert values == {-1.0, 0.0, 1.0}


def test_a_batch_equals_its_samples_read_one_by_one(tmp_path: Path) -> None:
    """Reads are issued together and rotated patches resampled together: no mix-ups between
    crops, label grids (crop1's "ids" at s1 and "mask" at s0 are two) or samples."""
    root = write_aligned(tmp_path / "ds.zarr")
    small = LevelArray(checkerboard((6, 10, 10)), (4.0,) * 3, label_origin((2, 3, 4)))
    write_group(root / "recon-1/labels/groundtruth/crop2/mask", [small], label=LabelGroup((small,)))
    rows = rows_for(root, {"crop1": CLASSES, "crop2": ("mask",)})
    spec = patch_spec((1, 6, 6), RAW_SCALE)
    transforms = {"mirror": {"axes": {"x": 0.5}}, "rotate": {"axes": {"z": [-180, 180]}}}
    train = TrainPatches(
        load_crops(rows, CLASSES, spec),
        spec,
        num_samples=24,
        seed=0,
        spatial_transforms=transforms,
        target_transform=stored_values,
    )
    keys = [(1, i) for i in range(24)]
    assert {train.draw(*key)[0] for key in keys} == {0, 1}
    assert_samples_equal(train.__getitems__(keys), [train[key] for key in keys])


# --- 4. NaN semantics -------------------------------------------------------------------------


def test_raw_beyond_its_array_is_zero_from_tensorstore_and_from_memory(aligned: Path) -> None:
    """A patch over the raw's corner: zeros outside the raw, stored values inside; the same
    once the crop's region is held in memory."""
    dataset = stored(aligned, patch_spec((4, 6, 6), RAW_SCALE))
    centre = centre_for((-2, -3, -1), (4, 6, 6))  # voxel 0 of the patch: raw voxel (-2, -3, -1)
    reads = [dataset.sample(0, centre)["input"][0] for _ in range(3)]
    assert any(state.box is not None for state in dataset._regions.values())
    expected = torch.zeros((4, 6, 6))
    expected[2:, 3:, 1:] = box(RAW, (0, 0, 0), (2, 3, 5))
    for image in reads:
        assert_same(image, expected)


def test_class_not_annotated_in_the_crop_is_all_nan(aligned: Path) -> None:
    spec = patch_spec((4, 6, 6), RAW_SCALE, (8, 12, 12), (4, 4, 4))
    for classes in (("ids", "mask"), ("mask", "ids")):
        crops = load_crops(rows_for(aligned, {"crop1": ("ids",)}), classes, spec)
        missing = classes.index("mask")
        assert crops[0].labels[missing] is None
        output = PatchDataset(crops, spec).sample(0, centre_for((6, 9, 11), (4, 6, 6)))["output"]
        assert output.shape == (2, 8, 12, 12)
        assert output[missing].isnan().all()
        assert torch.equal(output[1 - missing], torch.ones(8, 12, 12))


def test_patch_leaving_the_crop_is_nan_outside_and_labels_inside(aligned: Path) -> None:
    spec = patch_spec((4, 6, 6), RAW_SCALE, (8, 12, 12), (4, 4, 4))
    crops = load_crops(rows_for(aligned, {"crop1": CLASSES}), CLASSES, spec)
    dataset = PatchDataset(crops, spec, raw_transform=stored_values)
    # Three raw voxels (six label voxels) left of the crop in x, two past its end in y.
    first = (6, OFFSET[1] + 12 - 4, OFFSET[2] - 3)
    sample = dataset.sample(0, centre_for(first, (4, 6, 6)))
    assert torch.equal(sample["input"][0], box(RAW, first, (4, 6, 6)))  # raw exists there
    mask = sample["output"][1]
    outside = torch.zeros(8, 12, 12, dtype=torch.bool)
    outside[:, 8:, :] = True  # label y 24.. do not exist
    outside[:, :, :6] = True  # label x -6..-1 do not exist
    assert torch.equal(mask.isnan(), outside)
    inside = box(MASK, (4, 16, 0), (8, 8, 6))
    assert torch.equal(mask[:, :8, 6:], inside)
    assert torch.equal(sample["output"][0].isnan(), outside)


def test_unknown_label_value_is_nan(tmp_path: Path) -> None:
    data = checkerboard(LABEL_SHAPE)
    data[2:5, 6:9, 10:20] = 255
    labels = LabelGroup(
        (LevelArray(data, (4.0,) * 3, label_origin()),),
        encoding={"absent": 0, "present": 1, "unknown": 255},
    )
    raw = [LevelArray(coordinates(RAW_SHAPE), RAW_SCALE, RAW_ORIGIN)]
    root = write_dataset(tmp_path / "ds.zarr", raw, {"crop1": {"mask": labels}})
    spec = patch_spec((4, 6, 6), RAW_SCALE, (8, 12, 12), (4, 4, 4))
    crops = load_crops(rows_for(root, {"crop1": ("mask",)}), ["mask"], spec)
    label = crops[0].labels[0]
    assert label is not None and label.unknown == 255
    assert label.foreground == np.count_nonzero(data == 1)  # complement_counts: absent, unknown
    output = PatchDataset(crops, spec).sample(0, centre_for(OFFSET, (4, 6, 6)))["output"][0]
    expected = torch.from_numpy(data[:8, :12, :12].astype(np.float32))
    expected[expected == 255] = float("nan")
    assert expected.isnan().sum() == 3 * 3 * 2
    assert_same(output, expected)
    # Rotated (packed label codes): a quarter turn plus a hair, so the affine path runs.
    turned = PatchDataset(crops, spec).sample(
        0, centre_for(OFFSET, (4, 6, 6)), rotation(0, 90 + 1e-3)
    )["output"][0]
    assert_same(turned, torch.rot90(expected, k=-1, dims=(1, 2)))


# --- 5. Epochs from a config ------------------------------------------------------------------


def loader_config(root: Path, csv: Path, **changes: Any) -> TrainConfig:
    rows = rows_for(root, {"crop1": CLASSES}) + rows_for(root, {"crop1": CLASSES}, usage="validate")
    write_datasplit(rows, csv, overwrite=True)
    values = {
        "datasplit_path": str(csv),
        "classes": list(CLASSES),
        "input_array_info": {"shape": (1, 8, 8), "scale": (8, 8, 8)},
        "target_array_info": {"shape": (1, 8, 8), "scale": (8, 8, 8)},
        "iterations_per_epoch": 3,
        "batch_size": 4,
        "spatial_transforms": {
            "mirror": {"axes": {"x": 0.5}},
            "rotate": {"axes": {"z": [-180, 180]}},
        },
        "weighted_sampler": False,
        "dataloader_kwargs": {},
        "validation_batch_limit": 1,
        "random_seed": 7,
    }
    return build_config({**values, **changes})


def epoch(loader: Any) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def test_an_epoch_is_iterations_per_epoch_batches(aligned: Path, tmp_path: Path) -> None:
    config = loader_config(aligned, tmp_path / "split.csv")
    loaders = build_loaders(config)
    assert len(loaders.train) == 3
    first, second = epoch(loaders.train), epoch(loaders.train)
    assert len(first) == len(second) == 3
    for batch in first + second:
        assert batch["input"].shape == (4, 1, 8, 8) and batch["output"].shape == (4, 2, 8, 8)
        assert batch["input"].dtype == batch["output"].dtype == torch.float32
    assert not torch.equal(first[0]["input"], second[0]["input"])
    again = build_loaders(config)
    assert_samples_equal(epoch(again.train), first)
    again.sampler.set_epoch(2)
    assert_samples_equal(epoch(again.train), second)
    other = build_loaders(dataclasses.replace(config, random_seed=8))
    assert not torch.equal(epoch(other.train)[0]["input"], first[0]["input"])
    assert loaders.validate is not None
    tiles = epoch(loaders.validate)
    assert [b["input"].shape[0] for b in tiles] == [4]  # validation_batch_limit 1 x batch 4
    assert_samples_equal(tiles, epoch(build_loaders(config).validate))


@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 8, 8)], ids=["2D", "3D"])
def test_crop_regions_in_memory_give_the_same_batches(
    aligned: Path, tmp_path: Path, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Patches cut from crop regions held in memory equal patches read by tensorstore, bit for
    bit, over epochs (regions admitted, then widened): coordinate values, rotations, edges."""
    from csc.data import datasets

    info = {"shape": shape, "scale": (8, 8, 8)}
    base = loader_config(
        aligned,
        tmp_path / "split.csv",
        iterations_per_epoch=6,
        input_array_info=info,
        target_array_info=info,
        validation_batch_limit=None,
    )
    settings = {"off": 0, "on": 256, "too big": 256}
    runs = {}
    for name, megabytes in settings.items():
        if name == "too big":  # every region over its share of the cache: read patch by patch
            monkeypatch.setattr(datasets, "REGION_MAX_SHARE", 1e-9)
        loaders = build_loaders(dataclasses.replace(base, crop_cache_mb=megabytes))
        assert loaders.validate is not None
        runs[name] = [epoch(loaders.train) for _ in range(3)] + [epoch(loaders.validate)] * 2
        regions = loaders.train.dataset._regions
        held = [state.box for state in regions.values() if state.box is not None]
        assert bool(held) == (name == "on"), name
    for name in ("on", "too big"):
        for got, expected in zip(runs[name], runs["off"], strict=True):
            assert_samples_equal(got, expected)


def test_the_region_cache_keeps_the_most_recent_within_its_limit(aligned: Path) -> None:
    from csc.data.sources import PendingRead, RegionCache, RegionRead

    crops = load_crops(
        rows_for(aligned, {"crop1": CLASSES}),
        CLASSES,
        PatchSpec.from_arrays(ArrayInfo((1, 8, 8), (8, 8, 8)), ArrayInfo((1, 8, 8), (8, 8, 8))),
    )
    raw = crops[0].raw
    itemsize = PendingRead(raw, (0, 0, 0), (1, 1, 1), cache_mb=16).dtype.itemsize
    cache = RegionCache(3 * 4**3 * itemsize)  # room for three regions of 4^3 voxels
    boxes = [((0, 0, i), (4, 4, 4 + i)) for i in range(4)]
    for box in boxes:
        cache.get(raw, box, cache_mb=16)
    assert [key[1] for key in cache.entries] == boxes[1:]  # the oldest went first
    region = cache.get(raw, boxes[1], cache_mb=16)  # a hit: now the most recent
    assert [key[1] for key in cache.entries] == [boxes[2], boxes[3], boxes[1]]
    assert not region.flags.writeable
    direct = PendingRead(raw, (-2, 0, 1), (2, 4, 5), cache_mb=16).result()
    served = RegionRead(region, boxes[1][0], (-2, 0, 1), (2, 4, 5), raw.level.shape).result()
    np.testing.assert_array_equal(served, direct)  # zeros outside the array, as tensorstore's
    assert (served[:2] == 0).all()


@pytest.mark.slow
def test_workers_give_the_same_batches_and_no_duplicates(aligned: Path, tmp_path: Path) -> None:
    config = loader_config(aligned, tmp_path / "split.csv", iterations_per_epoch=4)
    serial = epoch(build_loaders(config).train)
    assert tensorstore_used_here()  # so workers must start fresh: fork would abort
    assert loader_kwargs({"num_workers": 2})["multiprocessing_context"] == "spawn"
    workers = build_loaders(dataclasses.replace(config, dataloader_kwargs={"num_workers": 2}))
    assert workers.train.num_workers == 2
    assert_samples_equal(epoch(workers.train), serial)
    patches = [patch.numpy().tobytes() for batch in serial for patch in batch["input"]]
    assert len(patches) == 16 and len(set(patches)) == 16


def test_ranks_share_an_epoch_between_them(aligned: Path, tmp_path: Path) -> None:
    assert list(EpochSampler(3, start_epoch=5, rank=1, world_size=2)) == [(5, 1), (5, 3), (5, 5)]
    config = loader_config(aligned, tmp_path / "split.csv", iterations_per_epoch=2, batch_size=2)
    train, _ = build_datasets(config)
    for rank in (0, 1):
        loaders = build_loaders(config, rank=rank, world_size=2, start_epoch=4)
        batches = epoch(loaders.train)
        assert len(batches) == 2
        expected = train.__getitems__([(4, 2 * i + rank) for i in range(4)])
        got = [{k: b[k][i] for k in b} for b in batches for i in range(2)]
        assert_samples_equal(got, expected)


def test_loader_kwargs_keep_what_csc_sets() -> None:
    with pytest.raises(ValueError, match="dataloader_kwargs may not set batch_size, shuffle: csc"):
        loader_kwargs({"shuffle": True, "batch_size": 2})
    assert loader_kwargs({"num_workers": 0, "prefetch_factor": 4, "pin_memory": True}) == {
        "num_workers": 0,
        "pin_memory": True,
    }
    context = {"num_workers": 2, "multiprocessing_context": "forkserver"}
    assert loader_kwargs(context) == {**context, "persistent_workers": True}  # csc's default
    assert loader_kwargs({**context, "persistent_workers": False})["persistent_workers"] is False


def test_datasets_pickle_before_and_after_reading(aligned: Path, tmp_path: Path) -> None:
    train, validate = build_datasets(loader_config(aligned, tmp_path / "split.csv"))
    assert validate is not None
    keys = [(1, 0), (1, 1)]
    fresh = pickle.loads(pickle.dumps(train))
    read = train.__getitems__(keys)
    used = pickle.loads(pickle.dumps(train))
    assert_samples_equal(fresh.__getitems__(keys), read)
    assert_samples_equal(used.__getitems__(keys), read)
    assert_samples_equal([pickle.loads(pickle.dumps(validate))[0]], [validate[0]])


# --- 7. Class-balanced sampling ---------------------------------------------------------------

NUM_CROPS, RARE = 10, 3


def write_skewed(root: Path, *, counts: bool = True) -> list[DatasplitRow]:
    """10 crops of 4x4x4 voxels at 8 nm: "common" has 8 voxels in each, "rare" 8 in crop 3."""
    raw = [LevelArray(coordinates(RAW_SHAPE), RAW_SCALE, RAW_ORIGIN)]
    crops = {}
    for n in range(NUM_CROPS):
        origin = tuple(float(v) for v in raw_centre((1 + n, 2, 3)))
        common = np.zeros((4, 4, 4), dtype=np.uint8)
        common[:2, :2, :2] = 1
        rare = common if n == RARE else np.zeros_like(common)
        crops[f"crop{n}"] = {
            name: LabelGroup((LevelArray(data, RAW_SCALE, origin),), counts=counts)
            for name, data in (("common", common), ("rare", rare))
        }
    write_dataset(root, raw, crops)
    return rows_for(root, {crop: ("common", "rare") for crop in crops})


def rare_share(crops: Sequence[Any], probabilities: np.ndarray, num_draws: int = 4000) -> float:
    spec = patch_spec((1, 4, 4), RAW_SCALE)
    train = TrainPatches(crops, spec, num_samples=num_draws, seed=5, probabilities=probabilities)
    drawn = np.array([train.draw(1, i)[0] for i in range(num_draws)])
    return float(np.mean(drawn == RARE))


def test_weighted_sampler_draws_the_rare_class_crop_often(tmp_path: Path) -> None:
    rows = write_skewed(tmp_path / "skewed.zarr")
    crops = load_crops(rows, ("common", "rare"), patch_spec((1, 4, 4), RAW_SCALE))
    assert [c.labels[1].foreground for c in crops] == [8 if n == RARE else 0 for n in range(10)]
    plain = crop_probabilities(crops, weighted=False)
    weighted = crop_probabilities(crops, weighted=True)
    assert np.allclose(plain, 0.1)
    # Half the draws pick "rare" (all from crop 3), half "common" (a tenth of them crop 3).
    expected = np.full(NUM_CROPS, 0.05)
    expected[RARE] = 0.55
    assert np.allclose(weighted, expected)
    assert abs(rare_share(crops, plain) - 0.1) < 0.02
    share = rare_share(crops, weighted)
    assert share >= 0.4 and abs(share - 0.55) < 0.03


def test_class_without_foreground_anywhere_warns(tmp_path: Path) -> None:
    rows = [r for r in write_skewed(tmp_path / "skewed.zarr") if r.crop != f"crop{RARE}"]
    crops = load_crops(rows, ("common", "rare"), patch_spec((1, 4, 4), RAW_SCALE))
    with pytest.warns(UserWarning, match="classes rare have no foreground voxels"):
        probabilities = crop_probabilities(crops, weighted=True, classes=("common", "rare"))
    assert np.allclose(probabilities, 1 / 9)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_foreground_is_counted_once_into_the_cache_not_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CSC_CACHE_DIR", str(tmp_path / "cache"))
    rows = write_skewed(tmp_path / "data" / "skewed.zarr", counts=False)
    before = snapshot(tmp_path / "data")
    config = build_config(
        {
            "classes": ["common", "rare"],
            "weighted_sampler": True,
            "spatial_transforms": None,
            "input_array_info": {"shape": (1, 4, 4), "scale": (8, 8, 8)},
        }
    )
    crops = load_crops(rows, config.classes, patch_spec((1, 4, 4), RAW_SCALE))
    assert all(label.foreground is None for c in crops for label in c.labels if label)
    train, _ = build_datasets(config, rows)
    expected = np.full(NUM_CROPS, 0.05)
    expected[RARE] = 0.55
    assert np.allclose(train.probabilities, expected)
    assert snapshot(tmp_path / "data") == before
    cache_file = tmp_path / "cache" / "foreground-counts.json"
    cache = json.loads(cache_file.read_text())
    root = tmp_path / "data" / "skewed.zarr"
    for n in range(NUM_CROPS):
        common = cache[f"{root}/recon-1/labels/groundtruth/crop{n}/common/s0"]
        rare = cache[f"{root}/recon-1/labels/groundtruth/crop{n}/rare/s0"]
        assert common == {"shape": [4, 4, 4], "foreground": 8}
        assert rare == {"shape": [4, 4, 4], "foreground": 8 if n == RARE else 0}
    # Counted once: the next run takes the cached numbers (edited here to tell them apart).
    cache[f"{root}/recon-1/labels/groundtruth/crop0/rare/s0"]["foreground"] = 8
    cache_file.write_text(json.dumps(cache))
    train, _ = build_datasets(config, rows)
    assert train.probabilities[0] == pytest.approx(train.probabilities[RARE])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["foreground-counts.json"]


def test_counted_foreground_excludes_unknown_voxels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting from the data must agree with complement_counts: "unknown" is not foreground."""
    monkeypatch.setenv("CSC_CACHE_DIR", str(tmp_path / "cache"))
    data = checkerboard(LABEL_SHAPE)
    data[:4] = 255
    raw = [LevelArray(coordinates(RAW_SHAPE), RAW_SCALE, RAW_ORIGIN)]
    encoding = {"absent": 0, "present": 1, "unknown": 255}
    foreground = []
    for counts in (True, False):
        labels = LabelGroup((LevelArray(data, (4.0,) * 3, label_origin()),), encoding, counts)
        root = write_dataset(tmp_path / f"{counts}.zarr", raw, {"crop1": {"mask": labels}})
        crops = load_crops(
            rows_for(root, {"crop1": ("mask",)}), ["mask"], patch_spec((1, 4, 4), RAW_SCALE)
        )
        (crop,) = fill_foreground(crops)
        foreground.append(crop.labels[0].foreground)
    assert foreground == [np.count_nonzero(data == 1)] * 2


# --- 8. Validation tiles ----------------------------------------------------------------------


def test_validation_tiles_cover_each_crop_once_in_a_fixed_order(tmp_path: Path) -> None:
    root = write_aligned(tmp_path / "ds.zarr")
    small = LevelArray(
        coordinates((2, 4, 4), dtype=np.uint32, offset=7), (4.0,) * 3, label_origin((1, 1, 1))
    )
    write_group(root / "recon-1/labels/groundtruth/small/ids", [small], label=LabelGroup((small,)))
    rows = rows_for(root, {"crop1": CLASSES, "small": ("ids",)}, usage="validate")
    spec = patch_spec((2, 6, 6), RAW_SCALE, (4, 12, 12), (4, 4, 4))  # tiles of 16 x 48 x 48 nm
    crops = load_crops(rows, CLASSES, spec)
    tiles = ValidationTiles(
        crops, spec, raw_transform=stored_values, target_transform=stored_values
    )
    # crop1 is 64 x 96 x 96 nm: 4 x 2 x 2 tiles; "small" (8 x 16 x 16 nm) gets one.
    assert len(tiles) == tiles.num_tiles == 17
    assert tiles.crop_index.tolist() == [0] * 16 + [1]
    assert [tuple(c) for c in tiles.centres[:16]] == sorted(tuple(c) for c in tiles.centres[:16])
    ids = torch.cat([tiles[k]["output"][0].flatten() for k in range(16)])
    assert not ids.isnan().any()
    assert torch.equal(ids.sort().values, torch.from_numpy(IDS_S0).flatten())
    again = ValidationTiles(crops, spec)
    assert np.array_equal(again.centres, tiles.centres)
    subset = ValidationTiles(crops, spec, limit=5, seed=3)
    same = ValidationTiles(crops, spec, limit=5, seed=3)
    other = ValidationTiles(crops, spec, limit=5, seed=4)
    assert len(subset) == 5 and subset.num_tiles == 17
    assert np.array_equal(subset.centres, same.centres)
    assert np.array_equal(subset.crop_index, same.crop_index)
    assert not np.array_equal(subset.centres, other.centres)
    everything = {tuple(c) for c in tiles.centres}
    assert {tuple(c) for c in subset.centres} <= everything


def test_validation_tiles_never_overlap_when_snapped_to_the_raw_grid(tmp_path: Path) -> None:
    """Tiles of 24 nm (3 raw voxels) with an even input: each tile centre must move half a raw
    voxel to put the input on raw voxels; moving them all the same way keeps them disjoint."""
    root = write_aligned(tmp_path / "ds.zarr")
    spec = patch_spec((2, 4, 4), RAW_SCALE, (4, 6, 6), (4, 4, 4))  # tiles of 16 x 24 x 24 nm
    crops = load_crops(rows_for(root, {"crop1": CLASSES}, usage="validate"), CLASSES, spec)
    tiles = ValidationTiles(crops, spec, target_transform=stored_values)
    assert len(tiles) == 4 * 4 * 4
    # Two target boxes are disjoint when their centres are a tile apart along some axis.
    gap = np.abs(tiles.centres[:, None] - tiles.centres[None]) >= spec.target.extent - 1e-6
    overlapping = [(a, b) for a, b in zip(*np.nonzero(~gap.any(axis=-1)), strict=True) if a < b]
    a, b = overlapping[0] if overlapping else (0, 0)
    assert not overlapping, f"tiles overlap, e.g. centres {tiles.centres[a]}, {tiles.centres[b]}"
    ids = torch.cat([tiles[k]["output"][0].flatten() for k in range(len(tiles))])
    ids = ids[~ids.isnan()]
    assert len(ids.unique()) == len(ids)  # no label voxel in two tiles


# --- 9. S3 --------------------------------------------------------------------------------------

SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
SYNTH_CLASSES = ("nuc", "mito", "er")


def synth_rows(search_root: str) -> list[DatasplitRow]:
    crops = crawl(CrawlOptions(search_path=f"{search_root}/{SEARCH}", classes=SYNTH_CLASSES)).crops
    return [dataclasses.replace(row, usage="train") for row in crops]


def synth_samples(rows: Sequence[DatasplitRow]) -> list[dict[str, torch.Tensor]]:
    spec = patch_spec((1, 16, 16), (8, 8, 8))
    crops = load_crops(rows, SYNTH_CLASSES, spec)
    train = TrainPatches(
        crops,
        spec,
        num_samples=8,
        seed=3,
        spatial_transforms={"rotate": {"axes": {"z": [-180, 180]}}},
    )
    return train.__getitems__([(1, i) for i in range(8)])


def test_s3_samples_equal_local_samples(s3_env: str, s3_synth: str, tiny_synth: Path) -> None:
    local, remote = synth_rows(str(tiny_synth)), synth_rows(f"s3://{s3_synth}-public")
    assert len(local) == len(remote) == 4
    assert remote[0].raw_root.startswith("s3://synth-public/")
    samples = synth_samples(local)
    assert_samples_equal(synth_samples(remote), samples)
    assert 0 < float(samples[0]["input"].mean()) < 1  # uint8 raw scaled to [0, 1]


def test_s3_private_bucket_read_anonymously_is_a_storage_error(
    s3_env: str, s3_synth: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = [
        dataclasses.replace(
            row,
            raw_root=row.raw_root.replace("-public", "-private"),
            gt_root=row.gt_root.replace("-public", "-private"),
        )
        for row in synth_rows(f"s3://{s3_synth}-public")
    ]
    spec = patch_spec((1, 16, 16), (8, 8, 8))
    denied = (
        r"access to s3://synth-private/jrc_synth\d/jrc_synth\d\.zarr/recon-1/\S+/\.zattrs at "
        rf"{re.escape(s3_env)} was denied"
    )
    with pytest.raises(StorageError, match=denied):
        load_crops(private, SYNTH_CLASSES, spec)
    # Metadata read with credentials, array data then read without: tensorstore's error.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    crops = load_crops(private, SYNTH_CLASSES, spec)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match=r"cannot read s3://synth-private/jrc_synth\d/"):
        PatchDataset(crops, spec).sample(0, np.asarray(crops[0].low) + 64)


# --- 10. Value transforms ---------------------------------------------------------------------

VALUE_TRANSFORMS = [RandomGamma, RandomContrast, GaussianNoise, GaussianBlur]


@pytest.mark.parametrize("transform", VALUE_TRANSFORMS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("shape", [(1, 6, 6), (1, 4, 6, 6)], ids=["2d", "3d"])
def test_value_transform_keeps_shape_and_follows_p(transform: Any, shape: tuple) -> None:
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(transform(p=0)(x), x)
    changed = transform(p=1)(x)
    assert changed.shape == x.shape and changed.dtype == x.dtype
    assert not torch.equal(changed, x) and torch.isfinite(changed).all()
    with sample_generator(11):
        first = transform(p=1)(x)
    with sample_generator(11):
        assert torch.equal(transform(p=1)(x), first)


def test_value_transform_rejects_p_outside_unit_range() -> None:
    with pytest.raises(ValueError, match=r"GaussianNoise: p must be in \[0, 1\], got 1.5"):
        GaussianNoise(p=1.5)


def test_noisy_training_samples_are_reproducible_by_key(aligned: Path) -> None:
    spec = patch_spec((1, 8, 8), RAW_SCALE)
    crops = load_crops(rows_for(aligned, {"crop1": CLASSES}), CLASSES, spec)

    def patches(raw_transform: Any) -> TrainPatches:
        return TrainPatches(crops, spec, num_samples=4, seed=1, raw_transform=raw_transform)

    noisy = patches(Compose([Normalize(), GaussianNoise(std=(1.0, 2.0), p=1)]))
    keys = [(1, 0), (1, 1)]
    first = noisy.__getitems__(keys)
    assert_samples_equal(noisy.__getitems__(keys), first)
    assert_samples_equal([noisy[(1, 1)]], first[1:])  # alone or in a batch: the same
    clean = patches(None).__getitems__(keys)
    assert not torch.equal(first[0]["input"], clean[0]["input"])
    assert_same(first[0]["output"], clean[0]["output"])
    assert 0.5 < float((first[0]["input"] - clean[0]["input"]).std()) < 2.5


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["about z", "about y", "about x"])
@pytest.mark.parametrize("where", ["middle", "corner"])
def test_rotated_3d_patch_as_2d_slices_equals_the_3d_resampling(
    aligned: Path, monkeypatch: pytest.MonkeyPatch, axis: int, where: str
) -> None:
    """Rotations about one axis (and flips of it) resample slice by slice (labels straight out
    of the crop regions held in memory, also where the patch leaves the labels: NaN there); a
    full 3D grid over padded boxes agrees. Raw on its voxel centres along the axis; labels
    1 nm off them (nearest-voxel ties round differently)."""
    from csc.data import geometry

    spec = patch_spec((4, 6, 5), (8, 8, 8))
    dataset = stored(aligned, spec)
    crop = dataset.crops[0]
    low, high = np.asarray(crop.low), np.asarray(crop.high)
    centre = raw_centre(((low + high) / 2 if where == "middle" else low) // 8)
    nudge, flip = np.zeros(3), np.ones(3)
    nudge[axis] = 1.0
    requests = [
        (0, centre + shift + 8 * k, rotation(axis, 25 + 40 * k) @ np.diag(flip * [1, -1][k % 2]), k)
        for k in range(3)
        for shift in (np.zeros(3), nudge)
    ]
    for _ in range(3):  # from the second read on, crop regions are held in memory
        sliced = dataset.read(requests)
    assert any(state.box is not None for state in dataset._regions.values())
    monkeypatch.setattr(geometry, "_aligned_axis", lambda *args, **kwargs: None)
    full = dataset.read(requests)
    assert sliced[0]["input"].shape == (1, 4, 6, 5)
    for one, other in zip(sliced[::2], full[::2], strict=True):
        assert torch.allclose(one["input"], other["input"], rtol=1e-6)
    for one, other in zip(sliced[1::2], full[1::2], strict=True):
        assert_same(one["output"], other["output"])
    if where == "corner":  # the patch leaves the labels: NaN there, numbers elsewhere
        outputs = torch.stack([sample["output"] for sample in sliced])
        assert outputs.isnan().any() and not outputs.isnan().all()


def test_a_batch_is_written_once_and_handed_on_as_it_is(aligned: Path, tmp_path: Path) -> None:
    """Datasets fill a batch in place: csc's collate passes it on without a copy, and torch's
    default_collate, given the same batch, sees its samples."""
    from csc.data.datasets import Batch, collate

    loaders = build_loaders(loader_config(aligned, tmp_path / "split.csv"))
    train = loaders.train.dataset
    batch = train.__getitems__([(1, i) for i in range(4)])
    assert isinstance(batch, Batch) and len(batch) == 4
    tensors = collate(batch)
    assert tensors["input"] is batch.tensors["input"]
    assert tensors["input"].shape == (4, 1, 8, 8) and tensors["output"].shape == (4, 2, 8, 8)
    stacked = torch.utils.data.default_collate(batch)
    for key in ("input", "output"):
        assert_same(stacked[key], tensors[key])
        assert_same(batch[2][key], tensors[key][2])


def test_inside_fills_exactly_the_voxels_outside() -> None:
    """`Inside` (runs per axis and a broadcast mask) marks the same voxels as the whole mask."""
    from csc.data.geometry import Inside

    rng = np.random.default_rng(3)
    plane = rng.random((1, 5, 6)) > 0.3  # (1, Y, X): a plane mask shared by every slice
    inside = Inside(((1, 3), (0, 4), (2, 6)), plane)
    whole = np.zeros((4, 5, 6), dtype=bool)
    whole[1:3, 0:4, 2:6] = True
    whole &= plane
    out = np.zeros((2, 4, 5, 6), dtype=np.float32)  # two classes
    inside.fill_outside(out, np.nan)
    assert np.array_equal(np.isnan(out), np.broadcast_to(~whole, out.shape))
    runs_only = np.zeros((4, 5, 6), dtype=np.float32)
    Inside(((0, 4), (5, 5), (0, 6))).fill_outside(runs_only, np.nan)  # an empty run: all out
    assert np.isnan(runs_only).all()


def test_runs_and_sub_indices_of_slices_match_their_positions() -> None:
    """The arithmetic on slices (runs of output indices inside an array, parts of an axis
    index) agrees with the same computed from the positions themselves."""
    from csc.data.geometry import _run, as_slice, index_array, true_run
    from csc.data.sampling import _sub_index

    rng = np.random.default_rng(5)
    for _ in range(2000):
        step, count = int(rng.choice([-3, -2, -1, 1, 2, 3])), int(rng.integers(1, 12))
        start = int(rng.integers(0, 20)) if step > 0 else int(rng.integers(count * -step, 40))
        index = as_slice(np.arange(count) * step + start)
        if not isinstance(index, slice):  # one voxel, or steps of 2 and 3: make the slice
            stop = start + count * step
            index = slice(start, stop if stop >= 0 else None, step)
        positions = index_array(index)
        assert len(positions) == count
        offset, size = int(rng.integers(-30, 30)), int(rng.integers(1, 25))
        x = positions + offset
        assert _run(index, offset, size) == true_run((x >= 0) & (x < size))
        low = int(rng.integers(0, count))
        high = int(rng.integers(low + 1, count + 1))
        shift = int(rng.integers(0, 10))
        part = _sub_index(index, low, high, shift)
        source = np.arange(80)
        assert np.array_equal(source[part], source[positions[low:high] + shift])


# --- Spatial transforms on the device (run here on the CPU, through the same code) -----------


def assert_close_patches(device: dict, cpu: dict, *, max_label_mismatch: float = 0.0) -> None:
    """Raw within float tolerance (coordinate values up to ~1e5: relative 1e-6), labels equal
    (NaN where NaN) but for a share `max_label_mismatch` of voxels (nearest ties in float32)."""
    assert device["input"].shape == cpu["input"].shape
    assert device["output"].shape == cpu["output"].shape
    torch.testing.assert_close(device["input"], cpu["input"], rtol=1e-5, atol=1e-3)
    a, b = torch.nan_to_num(device["output"], nan=-1.0), torch.nan_to_num(cpu["output"], nan=-1.0)
    assert (a != b).float().mean().item() <= max_label_mismatch
    assert device["output"].isnan().any() == cpu["output"].isnan().any()


@pytest.mark.parametrize(
    ("shape", "rotate"),
    [
        ((1, 8, 8), {"z": [-180, 180]}),
        ((4, 8, 8), {"z": [-180, 180]}),
        ((4, 8, 8), {"x": [-30, 30], "z": [-180, 180]}),
    ],
    ids=["2D", "3D", "3D oblique"],
)
def test_spatial_transforms_on_the_device_give_the_cpu_patches(
    aligned: Path, tmp_path: Path, shape: tuple[int, ...], rotate: dict
) -> None:
    """The same seed and keys: boxes resampled by `csc.data.device` (here on the CPU) equal the
    CPU path's patches, over two epochs, with mirror, transpose and rotation, coordinate-valued
    raw and labels, patches leaving the crop (NaN) and an unannotated class (NaN)."""
    info = {"shape": shape, "scale": (8, 8, 8)}
    transforms = {
        "mirror": {"axes": {"x": 0.5, "y": 0.5}},
        "transpose": {"axes": ["x", "y"]},
        "rotate": {"axes": rotate},
    }
    config = loader_config(
        aligned,
        tmp_path / "split.csv",
        input_array_info=info,
        target_array_info=info,
        spatial_transforms=transforms,
    )
    cpu = build_loaders(config)
    device = build_loaders(dataclasses.replace(config, spatial_transforms_on_device=True))
    assert not cpu.train.dataset.on_device and device.train.dataset.on_device
    for _ in range(2):
        for got, expected in zip(epoch(device.train), epoch(cpu.train), strict=True):
            assert_close_patches(got, expected, max_label_mismatch=1e-3 if "x" in rotate else 0.0)


def test_value_transforms_on_the_device_draw_each_samples_own_numbers(
    aligned: Path, tmp_path: Path
) -> None:
    """Raw value transforms run after resampling on the device with each sample's generator:
    the same gamma, contrast, noise and blur as the CPU path."""
    transform = Compose(
        [Normalize(), RandomContrast(p=1.0), GaussianNoise(p=1.0), GaussianBlur(p=1.0)]
    )
    config = loader_config(aligned, tmp_path / "split.csv", train_raw_value_transforms=transform)
    cpu = epoch(build_loaders(config).train)
    device = epoch(
        build_loaders(dataclasses.replace(config, spatial_transforms_on_device=True)).train
    )
    for got, expected in zip(device, cpu, strict=True):
        assert_close_patches(got, expected)


def test_spatial_transforms_on_the_device_default_and_refusals(
    aligned: Path, tmp_path: Path
) -> None:
    """None: on only for CUDA with rotations; True with a target transform: an error naming
    the key; a bad value: refused by the config."""
    from csc.data.device import use_device_transforms

    config = loader_config(aligned, tmp_path / "split.csv")
    crops = build_datasets(config)[0].crops
    assert not use_device_transforms(config, "cpu", crops)
    assert use_device_transforms(config, "cuda", crops)
    unrotated = dataclasses.replace(config, spatial_transforms={"mirror": {"axes": {"x": 0.5}}})
    assert not use_device_transforms(unrotated, "cuda", crops)
    assert use_device_transforms(
        dataclasses.replace(unrotated, spatial_transforms_on_device=True), "cpu", crops
    )
    target = dataclasses.replace(config, target_value_transforms=stored_values)
    assert not use_device_transforms(target, "cuda", crops)
    with pytest.raises(ValueError, match="spatial_transforms_on_device = True"):
        use_device_transforms(
            dataclasses.replace(target, spatial_transforms_on_device=True), "cuda", crops
        )
    with pytest.raises(ValueError, match="spatial_transforms_on_device must be"):
        loader_config(aligned, tmp_path / "split.csv", spatial_transforms_on_device="yes")


@pytest.mark.slow
def test_boxes_from_workers_give_the_same_patches(aligned: Path, tmp_path: Path) -> None:
    """Spatial transforms on the device with two workers: their boxes (in shared memory)
    give the one-process loader's patches."""
    config = loader_config(aligned, tmp_path / "split.csv", spatial_transforms_on_device=True)
    serial = epoch(build_loaders(config).train)
    workers = build_loaders(dataclasses.replace(config, dataloader_kwargs={"num_workers": 2}))
    assert_samples_equal(epoch(workers.train), serial)
