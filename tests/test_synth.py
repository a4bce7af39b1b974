"""csc synth: layout, determinism, OME-NGFF metadata read back with tensorstore, alignment."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr

from csc.synth import downsample, write_synthetic
from tests.conftest import TINY_SPEC

RAW = "recon-1/em/fibsem-uint8"


def read_attrs(group: Path) -> dict:
    """A group's .zattrs through tensorstore's key-value store, as any NGFF reader sees it."""
    store = ts.KvStore.open({"driver": "file", "path": f"{group}/"}).result()
    return json.loads(store.read(".zattrs").result().value)


def read_array(path: Path) -> np.ndarray:
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}
    return ts.open(spec).result().read().result()


def levels(group: Path) -> list[tuple[list[float], list[float]]]:
    """(scale, translation) per level from the multiscales attribute."""
    (multiscale,) = read_attrs(group)["multiscales"]
    assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in multiscale["axes"]} == {"nanometer"}
    result = []
    for n, dataset in enumerate(multiscale["datasets"]):
        assert dataset["path"] == f"s{n}"
        scale, translation = dataset["coordinateTransformations"]
        result.append((scale["scale"], translation["translation"]))
    return result


def crop_groups(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*.zarr/recon-1/labels/groundtruth/crop*/*") if p.is_dir())


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_matches_cellmap(tiny_synth: Path) -> None:
    for dataset in ("jrc_synth1", "jrc_synth2"):
        root = tiny_synth / dataset / f"{dataset}.zarr"
        for n in range(3):
            assert (root / RAW / f"s{n}" / ".zarray").is_file()
    crops = sorted({p.parent.name for p in crop_groups(tiny_synth)})
    assert crops == ["crop1", "crop2", "crop3", "crop4"]
    for group in crop_groups(tiny_synth):
        assert group.name in ("nuc", "mito", "er")
        assert all((group / f"s{n}" / ".zarray").is_file() for n in range(3))
        zarray = json.loads((group / "s0" / ".zarray").read_text())
        assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
        assert zarray["compressor"] == {"id": "zstd", "level": 6}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_SPEC, num_datasets=1)
    write_synthetic(tmp_path / "a", spec)
    write_synthetic(tmp_path / "b", spec)
    write_synthetic(tmp_path / "c", dataclasses.replace(spec, seed=1))
    assert checksums(tmp_path / "a") == checksums(tmp_path / "b")
    raw = [read_array(tmp_path / x / "jrc_synth1/jrc_synth1.zarr" / RAW / "s0") for x in "ac"]
    assert not np.array_equal(*raw)


def test_raw_metadata_read_back_with_tensorstore(tiny_synth: Path) -> None:
    group = tiny_synth / "jrc_synth1/jrc_synth1.zarr" / RAW
    assert levels(group) == [
        ([8.0] * 3, [0.0] * 3),
        ([16.0] * 3, [4.0] * 3),  # centre of a 2x2x2 block of s0 voxels
        ([32.0] * 3, [12.0] * 3),
    ]
    shapes = [read_array(group / f"s{n}").shape for n in range(3)]
    assert shapes == [(16, 32, 32), (8, 16, 16), (4, 8, 8)]
    s0 = read_array(group / "s0")
    assert s0.dtype == np.uint8
    np.testing.assert_array_equal(zarr.open_group(str(group), mode="r")["s0"][...], s0)
    np.testing.assert_array_equal(read_array(group / "s1"), downsample(s0, is_label=False))


def test_label_metadata_and_annotation_attrs(tiny_synth: Path) -> None:
    for group in crop_groups(tiny_synth):
        (s0_scale, t0), (s1_scale, t1), (s2_scale, t2) = levels(group)
        assert (s0_scale, s1_scale, s2_scale) == ([4.0] * 3, [8.0] * 3, [16.0] * 3)
        # 4 nm label voxels subdivide 8 nm raw voxels: voxel 0 starts at a raw voxel's corner.
        assert all((t + 2) % 8 == 0 for t in t0)
        assert t1 == [t + 2 for t in t0] and t2 == [t + 6 for t in t0]
        for n in range(3):
            data = read_array(group / f"s{n}")
            assert set(np.unique(data)) <= {0, 1}
            annotation = read_attrs(group / f"s{n}")["cellmap"]["annotation"]
            assert annotation["class_name"] == group.name
            assert annotation["annotation_type"] == {
                "type": "semantic_segmentation",
                "encoding": {"absent": 0, "present": 1},
            }
            assert annotation["complement_counts"] == {"absent": int((data == 0).sum())}
        crop_attrs = read_attrs(group.parent)["cellmap"]["annotation"]
        assert group.name in crop_attrs["class_names"]


def test_labels_line_up_with_raw_in_world_coordinates(tmp_path: Path) -> None:
    """Where the 8 nm labels say 'mito', the raw is mito-dark; elsewhere it is not."""
    spec = dataclasses.replace(
        TINY_SPEC, num_datasets=1, num_crops=1, shape=(32, 64, 64), crop_shape=(64, 128, 128)
    )
    spec = dataclasses.replace(spec, missing_class_prob=0.0, classes=("mito",), noise=0.0)
    write_synthetic(tmp_path, spec)
    root = tmp_path / "jrc_synth1/jrc_synth1.zarr/recon-1"
    (crop,) = crop_groups(tmp_path)
    scale, translation = levels(crop)[1]  # labels at 8 nm, the raw's grid
    offset = [int(t / 8) for t in translation]  # raw voxel i is centred at 8 * i nm
    labels = read_array(crop / "s1")
    raw = read_array(root / "em/fibsem-uint8/s0")
    region = raw[tuple(slice(o, o + n) for o, n in zip(offset, labels.shape, strict=True))]
    assert scale == [8.0] * 3 and labels.any() and not labels.all()
    # mito is drawn at 40 +- 25 and background at 175 +- 10 (no noise here). Boundary voxels
    # may differ (majority of 4 nm voxels vs 8 nm centre), so compare agreement with a shift.
    agreement = np.mean((region < 100) == (labels == 1))
    shifted = np.mean((region[..., 1:] < 100) == (labels[..., :-1] == 1))  # one voxel off in x
    assert agreement > 0.99
    assert 1 - shifted > 3 * (1 - agreement)  # misaligned by one voxel: many more mismatches


def test_missing_classes_leave_crops_partly_annotated(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_SPEC, num_datasets=1, num_crops=6, missing_class_prob=0.6)
    crops = write_synthetic(tmp_path, spec)
    annotated = [set(c.classes) for c in crops]
    assert all(annotated)  # every crop keeps at least one class
    assert any(len(a) < 3 for a in annotated)
    for crop in crops:
        groups = tmp_path / crop.dataset / f"{crop.dataset}.zarr/recon-1/labels/groundtruth"
        assert {p.name for p in (groups / crop.crop).iterdir() if p.is_dir()} == set(crop.classes)


@pytest.mark.parametrize(
    ("compressor", "codec"),
    [
        ("zstd", {"id": "zstd", "level": 6}),
        ("blosc-lz4", {"id": "blosc", "cname": "lz4"}),
        ("gzip", {"id": "gzip"}),
        ("none", None),
    ],
)
def test_compressors(tmp_path: Path, compressor: str, codec: dict | None) -> None:
    spec = dataclasses.replace(TINY_SPEC, num_datasets=1, num_crops=1, compressor=compressor)
    write_synthetic(tmp_path, spec)
    array = tmp_path / "jrc_synth1/jrc_synth1.zarr" / RAW / "s0"
    written = json.loads((array / ".zarray").read_text())["compressor"]
    assert written == codec or codec.items() <= written.items()
    assert read_array(array).shape == (16, 32, 32)


def test_custom_classes_and_chunks(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_SPEC, num_datasets=1, classes=("cell", "ves"), chunks=(4, 8, 8))
    crops = write_synthetic(tmp_path, spec)
    assert {c for crop in crops for c in crop.classes} <= {"cell", "ves"}
    zarray = json.loads((tmp_path / "jrc_synth1/jrc_synth1.zarr" / RAW / "s0/.zarray").read_text())
    assert zarray["chunks"] == [4, 8, 8]


def test_existing_data_is_never_overwritten_silently(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_SPEC, num_datasets=1, num_crops=1)
    write_synthetic(tmp_path, spec)
    marker = tmp_path / "jrc_synth1" / "keep.txt"
    marker.write_text("user data")
    with pytest.raises(FileExistsError, match=r"jrc_synth1 already exists.*--overwrite"):
        write_synthetic(tmp_path, spec)
    assert marker.read_text() == "user data"
    write_synthetic(tmp_path, spec, overwrite=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"crop_shape": (64, 16, 16)}, "does not fit in --shape"),
        ({"missing_class_prob": 1.0}, "missing-class-prob"),
        ({"classes": ("a", "a")}, "distinct"),
        ({"shape": (2, 32, 32), "crop_shape": (4, 16, 16)}, "too small"),
        ({"chunks": (0, 16, 16)}, "--chunks must be positive"),
        ({"label_scale": 3.0}, "must divide"),
    ],
)
def test_impossible_specs_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic(tmp_path, dataclasses.replace(TINY_SPEC, **change))
    assert not any(tmp_path.iterdir())


def test_downsample_on_coordinate_values() -> None:
    z, y, x = np.meshgrid(np.arange(4), np.arange(4), np.arange(6), indexing="ij")
    values = (z * 100 + y * 10 + x).astype(np.float64)
    # Block (1, 0, 2) averages z 2..3, y 0..1, x 4..5: 250 + 5 + 4.5, rounded half to even.
    assert downsample(values, is_label=False)[1, 0, 2] == np.rint(259.5)
    labels = np.zeros((2, 2, 2), np.uint8)
    labels[0, 0, :] = 1
    labels[1, 0, 0] = 1
    assert downsample(labels, is_label=False).item() == 0  # rounds 0.375 down for raw
    assert downsample(labels, is_label=True).item() == 0  # 3 of 8 present: absent
    labels[1, 0, 1] = 1
    assert downsample(labels, is_label=True).item() == 1  # a tie counts as present


def test_test_crops_are_held_out_in_the_challenge_layout(tmp_path: Path) -> None:
    spec = dataclasses.replace(TINY_SPEC, num_test_crops=1, test_crop_shape=(8, 16, 16))
    crops = write_synthetic(tmp_path / "t", spec)
    plain = write_synthetic(tmp_path / "p", TINY_SPEC)
    # The training crops are the same bytes with or without test crops: they are added after.
    assert [c for c in crops if not c.test] == plain
    for dataset in ("jrc_synth1", "jrc_synth2"):
        store = Path(dataset) / f"{dataset}.zarr"
        assert checksums(tmp_path / "t" / store) != {}
    tests = [c for c in crops if c.test]
    assert [c.crop for c in tests] == ["crop1001", "crop1002"]
    # Nothing of the test crops in the CellMap layout a datasplit crawls.
    crawled = {p.parent.name for p in crop_groups(tmp_path / "t")}
    assert crawled.isdisjoint({"crop1001", "crop1002"})
    truth = zarr.open_group(str(tmp_path / "t/ground_truth.zarr"), mode="r")
    rows = (tmp_path / "t/test_crop_manifest.csv").read_text().splitlines()
    assert rows[0] == "crop_name,dataset,class_label,voxel_size,translation,shape"
    assert len(rows) == 1 + sum(len(c.classes) for c in tests)
    for crop in tests:
        for name in crop.classes:
            array = truth[f"{crop.crop}/{name}"]
            assert array.shape == (8, 16, 16)
            assert array.attrs["voxel_size"] == [4.0, 4.0, 4.0]
            assert array.attrs["translation"] == list(crop.translation)
            assert array.attrs["shape"] == [8, 16, 16]
            # Instance classes: one uint32 id per object, 1..N; semantic ones 0/1.
            values = np.unique(array[...])
            if name in ("nuc", "mito"):
                assert array.dtype == np.uint32
                assert list(values) == list(range(len(values)))
            else:
                assert array.dtype == np.uint8 and set(values) <= {0, 1}
            row = f"{crop.crop[4:]},{crop.dataset},{name},[4;4;4]"
            assert any(line.startswith(row) for line in rows)
