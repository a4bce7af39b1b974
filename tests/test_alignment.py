"""csc.alignment against the toolkit's aligned predictions (tests/data/golden), and
csc.storage.read_label on label nodes written here (plain arrays, s0/s1 groups, OME-NGFF)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from csc.alignment import match_crop_space
from csc.storage import LabelArray, multiscales_attrs, open_label_root, read_label

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("case_*.json"))


def golden(case: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    with np.load(GOLDEN / f"{case}.npz") as arrays:
        return meta, {key: arrays[key] for key in arrays.files}


def vec(values: Any) -> tuple[float, float, float] | None:
    return None if values is None else (float(values[0]), float(values[1]), float(values[2]))


@pytest.mark.parametrize("case", CASES)
def test_match_crop_space_matches_toolkit(case: str) -> None:
    meta, arrays = golden(case)
    written = meta["prediction"].get("attrs_written") or {}
    label = LabelArray(
        arrays["prediction"], vec(written.get("voxel_size")), vec(written.get("translation")), case
    )
    row = meta["test_crop_manifest_row"]
    aligned = match_crop_space(
        label,
        voxel_size=row["voxel_size"],
        shape=row["shape"],
        translation=row["translation"],
        instance=meta["type"] == "instance",
    )
    want = arrays["aligned_prediction"]
    if meta["mask_npz_key"] is not None:
        aligned = aligned * arrays[meta["mask_npz_key"]]
    else:
        assert aligned.dtype == want.dtype
    assert aligned.shape == want.shape
    np.testing.assert_array_equal(aligned, want)


def test_golden_cases_cover_resampling_and_offsets() -> None:
    resampled = [c for c in CASES if golden(c)[0]["prediction"]["shape"] != [32, 32, 32]]
    assert len(CASES) == 48 and len(resampled) >= 8


def test_unknown_voxel_size_pads_and_crops_around_the_centre() -> None:
    data = np.arange(5 * 2 * 3, dtype=np.uint16).reshape(5, 2, 3) + 1
    label = LabelArray(data, None, None, "centre")
    out = match_crop_space(
        label, voxel_size=(8, 8, 8), shape=(3, 4, 3), translation=(0, 0, 0), instance=True
    )
    assert out.shape == (3, 4, 3) and out.dtype == np.uint16
    # z: crop from (5 - 3)//2 = 1; y: pad (4 - 2)//2 = 1 before and 1 after; x unchanged
    np.testing.assert_array_equal(out[:, 1:3, :], data[1:4])
    assert not out[:, 0].any() and not out[:, 3].any()


def test_an_array_already_in_place_is_returned_unchanged() -> None:
    data = np.full((4, 4, 4), 0.3, dtype=np.float32)
    label = LabelArray(data, (8.0, 8.0, 8.0), (80.0, 0.0, 0.0), "float")
    out = match_crop_space(
        label, voxel_size=(8, 8, 8), shape=(4, 4, 4), translation=(80, 0, 0), instance=False
    )
    assert out is data  # still float: a semantic map needing no resampling is not thresholded


def test_a_label_outside_the_crop_aligns_to_zeros() -> None:
    label = LabelArray(np.ones((4, 4, 4), np.uint8), (8.0, 8.0, 8.0), (0.0, 0.0, 800.0), "far")
    out = match_crop_space(
        label, voxel_size=(8, 8, 8), shape=(4, 4, 4), translation=(0, 0, 0), instance=True
    )
    assert out.shape == (4, 4, 4) and not out.any()


def test_too_large_a_label_is_refused_naming_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    label = LabelArray(np.zeros((8, 8, 8), np.uint8), (1.0, 1.0, 1.0), None, "big/mito")
    space = {"voxel_size": (8, 8, 8), "shape": (1, 1, 2), "translation": (0, 0, 0)}
    assert match_crop_space(label, **space, instance=True).shape == (1, 1, 2)  # 256x: allowed
    monkeypatch.setenv("MAX_VOLUME_SIZE_RATIO", "100")
    with pytest.raises(ValueError, match=r"big/mito .*MAX_VOLUME_SIZE_RATIO"):
        match_crop_space(label, **space, instance=True)


# --- read_label ----------------------------------------------------------------------------


def write(group: Any, name: str, data: np.ndarray, attrs: dict[str, Any]) -> None:
    array = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape)
    array[...] = data
    array.attrs.update(attrs)


def test_read_label_plain_array_with_each_attribute_spelling(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "p.zarr", mode="w", zarr_format=2)
    data = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    write(root, "a", data, {"voxel_size": [8, 4, 4], "translation": [1, 2, 3]})
    write(root, "b", data, {"resolution": [2, 2, 2], "offset": [4, 5, 6]})
    write(root, "c", data, {"scale": [1, 1, 1]})
    write(root, "d", data, {})
    a = read_label(tmp_path / "p.zarr" / "a", target_voxel_size=(8, 8, 8))
    assert (a.voxel_size, a.translation) == ((8.0, 4.0, 4.0), (1.0, 2.0, 3.0))
    np.testing.assert_array_equal(a.data, data)
    b = read_label(tmp_path / "p.zarr" / "b", target_voxel_size=(8, 8, 8))
    assert (b.voxel_size, b.translation) == ((2.0, 2.0, 2.0), (4.0, 5.0, 6.0))
    c = read_label(tmp_path / "p.zarr" / "c", target_voxel_size=(8, 8, 8))
    assert (c.voxel_size, c.translation) == ((1.0, 1.0, 1.0), None)
    d = read_label(tmp_path / "p.zarr" / "d", target_voxel_size=(8, 8, 8))
    assert (d.voxel_size, d.translation) == (None, None)


def test_read_label_picks_a_non_ome_level_by_the_toolkit_score(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "g.zarr" / "mito", mode="w", zarr_format=2)
    for n, size in enumerate((2.0, 4.0, 8.0)):
        write(group, f"s{n}", np.full((2, 2, 2), n, np.uint8), {"voxel_size": [size] * 3})
    path = tmp_path / "g.zarr" / "mito"
    assert read_label(path, target_voxel_size=(4, 4, 4)).path.endswith("mito/s1")
    assert read_label(path, target_voxel_size=(5, 5, 5)).voxel_size == (4.0, 4.0, 4.0)
    assert read_label(path, target_voxel_size=(1, 1, 1)).voxel_size == (2.0, 2.0, 2.0)
    assert int(read_label(path, target_voxel_size=(64, 64, 64)).data[0, 0, 0]) == 2


def test_read_label_reads_an_ome_ngff_level_and_its_transforms(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "o.zarr" / "er", mode="w", zarr_format=2)
    group.attrs.update(multiscales_attrs("er", [([4, 4, 4], [2, 2, 2]), ([8, 8, 8], [4, 4, 4])]))
    write(group, "s0", np.zeros((4, 4, 4), np.uint8), {})
    write(group, "s1", np.ones((2, 2, 2), np.uint8), {"voxel_size": [99, 99, 99]})
    s1 = read_label(tmp_path / "o.zarr" / "er", target_voxel_size=(8, 8, 8))
    assert (s1.voxel_size, s1.translation, s1.data.shape) == ((8.0,) * 3, (4.0,) * 3, (2, 2, 2))
    s0 = read_label(tmp_path / "o.zarr" / "er", target_voxel_size=(2, 2, 2))  # none fine enough
    assert (s0.voxel_size, s0.translation) == ((4.0,) * 3, (2.0,) * 3)


def test_read_label_inside_a_zip_root(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=2)
    write(
        root.require_group("crop1"),
        "nuc",
        np.full((2, 2, 2), 7, np.uint16),
        {"voxel_size": [8, 8, 8]},
    )
    zipped = shutil.make_archive(str(tmp_path / "s"), "zip", tmp_path / "s.zarr")
    label = read_label("crop1/nuc", target_voxel_size=(8, 8, 8), root=open_label_root(zipped))
    assert (
        label.voxel_size == (8.0,) * 3 and int(label.data.max()) == 7 and "crop1/nuc" in label.path
    )
    with pytest.raises(FileNotFoundError, match="crop1/mito"):
        read_label("crop1/mito", target_voxel_size=(8, 8, 8), root=open_label_root(zipped))


def test_read_label_names_a_missing_node_and_a_bare_group(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.zarr"):
        read_label(tmp_path / "nothing.zarr" / "mito", target_voxel_size=(8, 8, 8))
    zarr.open_group(tmp_path / "e.zarr" / "mito", mode="w", zarr_format=2)
    with pytest.raises(ValueError, match="neither OME-NGFF"):
        read_label(tmp_path / "e.zarr" / "mito", target_voxel_size=(8, 8, 8))
