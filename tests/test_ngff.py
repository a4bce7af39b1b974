"""OME-NGFF read and written by the spec: units, time and channel axes, composed
coordinateTransformations and zarr v3 / OME-NGFF 0.5 stores read as the nm / v2 original (the
same patches), or refused naming what is wrong; csc's outputs pass the ome-zarr-models
validator, their pyramid levels placed as the spec's transforms say."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ome_zarr_models.v04
import ome_zarr_models.v05
import pytest
import torch
import zarr

from csc.data.datasets import PatchDataset, PatchSpec
from csc.data.loaders import check_crops, load_crops
from csc.datasplit import CrawlOptions, DatasplitRow, crawl
from csc.evaluation import evaluate
from csc.prediction import predict
from csc.processing import process
from csc.storage import (
    MetadataReader,
    downsample_2x,
    multiscales_attrs,
    parse_multiscales,
    write_array,
    write_pyramid,
)
from csc.synth import SynthSpec, write_synthetic
from tests.s3server import upload_tree
from tests.test_predict import Echo, config_of
from tests.volumes import GT_PATH, RAW_PATH, patch_spec, raw_centre, rows_for, write_aligned

CLASSES = ("ids", "mask")
GROUPS = (RAW_PATH, f"{GT_PATH}/crop1/ids", f"{GT_PATH}/crop1/mask")
SHARED_TRANSLATION = (100.0, -50.0, 7.0)  # units: the multiscale-level translation


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a copy of the standard store writes its metadata (the voxels stay the same)."""

    zarr_format: int = 2  # 3: OME-NGFF 0.5, attributes under "ome" in zarr.json
    unit: str | None = "nanometer"
    per_nm: float = 1.0  # units per nm: 1e-3 for micrometer
    leading: tuple[tuple[str, str, int], ...] = ()  # (name, type, size) before (z, y, x)
    shared: bool = False  # split each level's transforms between dataset and multiscale
    names: tuple[str, str, str] = ("z", "y", "x")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The standard coordinate-valued store (nm, zarr v2, OME-NGFF 0.4)."""
    return write_aligned(tmp_path_factory.mktemp("original") / "ds.zarr")


def copy_as(original: Path, root: Path, layout: Layout) -> Path:
    """The original's groups rewritten at `root` with `layout`'s metadata."""
    for path in GROUPS:
        source = zarr.open_group(str(original / path), mode="r")
        levels = parse_multiscales(dict(source.attrs), path)
        group = zarr.open_group(str(root / path), mode="w", zarr_format=layout.zarr_format)
        group.attrs.update(_multiscales_of(path, levels, layout))
        for level in levels:
            array = source[level.path]
            shape = tuple(size for _, _, size in layout.leading) + array.shape
            data = np.broadcast_to(array[...], shape)
            names = [name for name, _, _ in layout.leading] + list(layout.names)
            v3: dict[str, Any] = {"dimension_names": names} if layout.zarr_format == 3 else {}
            stored = group.create_array(
                level.path,
                shape=shape,
                chunks=(1,) * len(layout.leading) + (8, 8, 8),
                dtype=array.dtype,
                fill_value=0,
                **v3,
            )
            stored[...] = data
            stored.attrs.update(dict(array.attrs))
    return root


def _multiscales_of(name: str, levels: Sequence[Any], layout: Layout) -> dict[str, Any]:
    """The ``multiscales`` (0.4) or ``ome`` (0.5) attributes placing `levels` as `layout` says."""
    lead = len(layout.leading)
    tm = np.asarray(SHARED_TRANSLATION)
    datasets = []
    for level in levels:
        scale = np.asarray(level.scale) * layout.per_nm
        translation = np.asarray(level.translation) * layout.per_nm
        if layout.shared:  # (i * s/2 + t_d) * 2 + t_m = i * s + t when t_d = (t - t_m) / 2
            scale, translation = scale / 2, (translation - tm) / 2
        datasets.append(
            {
                "path": level.path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0] * lead + scale.tolist()},
                    {"type": "translation", "translation": [0.0] * lead + translation.tolist()},
                ],
            }
        )
    axes = [{"name": n, "type": t} for n, t, _ in layout.leading]
    for axis in layout.names:
        axes.append(
            {"name": axis, "type": "space"} | ({"unit": layout.unit} if layout.unit else {})
        )
    multiscale: dict[str, Any] = {"name": name, "axes": axes, "datasets": datasets}
    if layout.shared:
        multiscale["coordinateTransformations"] = [
            {"type": "scale", "scale": [1.0] * lead + [2.0] * 3},
            {"type": "translation", "translation": [0.0] * lead + list(SHARED_TRANSLATION)},
        ]
    if layout.zarr_format == 3:
        return {"ome": {"version": "0.5", "multiscales": [multiscale]}}
    return {"multiscales": [{"version": "0.4", **multiscale}]}


def samples(root: Path | str, spec: PatchSpec, firsts: Sequence[Sequence[int]]) -> list[dict]:
    """Stored raw and label values of patches whose voxel 0 sits on raw voxels `firsts` (a
    local store, or one on S3)."""
    rows = [DatasplitRow("train", str(root), RAW_PATH, str(root), f"{GT_PATH}/crop1", CLASSES)]
    crops = load_crops(rows, CLASSES, spec)
    check_crops(crops, spec, datasplit="test")  # chunk keys found (no refusal, no warning)
    dataset = PatchDataset(crops, spec, raw_transform=_float, target_transform=_float)
    shape = np.asarray(spec.input.shape)
    return [dataset.sample(0, raw_centre(np.asarray(f) + (shape - 1) / 2)) for f in firsts]


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float()


SPECS = {
    "4nm labels": patch_spec((4, 6, 6), (8.0,) * 3, (8, 12, 12), (4.0,) * 3),
    "8nm labels (s1)": patch_spec((3, 5, 5), (8.0,) * 3),
}
FIRSTS = [(6, 9, 11), (4, 6, 8), (8, 12, 14)]
LAYOUTS = {
    "micrometer": Layout(unit="micrometer", per_nm=1e-3),
    "angstrom": Layout(unit="angstrom", per_nm=10.0),
    "no unit (nm)": Layout(unit=None),
    "size-1 channel axis": Layout(leading=(("c", "channel", 1),)),
    "size-1 time and channel axes": Layout(leading=(("t", "time", 1), ("c", "channel", 1))),
    "dataset and multiscale transforms": Layout(shared=True),
    "zarr v3, OME-NGFF 0.5": Layout(zarr_format=3),
    "zarr v3, micrometer, channel, shared": Layout(
        zarr_format=3, unit="micrometer", per_nm=1e-3, leading=(("c", "channel", 1),), shared=True
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_a_store_read_by_the_spec_gives_the_originals_patches(
    original: Path, tmp_path: Path, layout: Layout, spec: PatchSpec
) -> None:
    copy = copy_as(original, tmp_path / "ds.zarr", layout)
    expected, got = samples(original, spec, FIRSTS), samples(copy, spec, FIRSTS)
    for a, b in zip(expected, got, strict=True):
        for key in ("input", "output"):
            assert a[key].shape == b[key].shape
            assert torch.equal(a[key].nan_to_num(-1.0), b[key].nan_to_num(-1.0))


def test_a_zarr_v3_store_on_s3_gives_the_originals_patches(
    original: Path, tmp_path: Path, s3_env: str
) -> None:
    layout = LAYOUTS["zarr v3, micrometer, channel, shared"]
    copy_as(original, tmp_path / "bucket" / "ds.zarr", layout)
    upload_tree(s3_env, tmp_path / "bucket", "ngff-v3", public=True)
    spec = SPECS["4nm labels"]
    expected, got = samples(original, spec, FIRSTS), samples("s3://ngff-v3/ds.zarr", spec, FIRSTS)
    for a, b in zip(expected, got, strict=True):
        for key in ("input", "output"):
            assert torch.equal(a[key].nan_to_num(-1.0), b[key].nan_to_num(-1.0))


def test_the_crawl_finds_a_zarr_v3_stores_crops_and_their_s0_voxel_size(
    original: Path, tmp_path: Path
) -> None:
    copy = copy_as(original, tmp_path / "ds" / "ds.zarr", LAYOUTS["zarr v3, OME-NGFF 0.5"])
    search = f"{tmp_path}/{{dataset}}/{{dataset}}.zarr/recon-1/{{name}}"
    options = CrawlOptions(search_path=search, raw_name="em/raw", classes=CLASSES, scale=(4.0,))
    (row,) = crawl(options).crops
    assert (row.dataset, row.crop, row.classes) == ("ds", "crop1", CLASSES)
    assert row.raw_root == str(copy)
    too_coarse = dataclasses.replace(options, scale=(2.0,))  # s0 labels are 4 nm
    assert crawl(too_coarse).crops == []


def test_levels_are_placed_in_nm_whatever_the_unit_and_transforms(
    original: Path, tmp_path: Path
) -> None:
    layout = LAYOUTS["zarr v3, micrometer, channel, shared"]
    copy = copy_as(original, tmp_path / "ds.zarr", layout)
    group = str(copy / GROUPS[1])
    source = MetadataReader(group).source(group, (8.0,) * 3, label=True)
    want = MetadataReader(str(original)).source(str(original / GROUPS[1]), (8.0,) * 3, label=True)
    assert source.level == want.level and source.level.scale == (8.0, 8.0, 8.0)
    assert (source.zarr_format, source.num_leading) == (3, 1)
    assert source.chunking is not None and source.chunking.prefix == "c/0/"
    assert (source.absent, source.foreground) == (want.absent, want.foreground)
    ome_zarr_models.v05.Image.from_zarr(zarr.open_group(group, mode="r"))  # the copy is valid


REFUSED = {
    "time axis of 3": (
        Layout(leading=(("t", "time", 3),)),
        r"recon-1/em/raw/s0 has axes t \(time\), z \(space\), y \(space\), x \(space\) and "
        r"shape \(3 t, 20 z, 30 y, 40 x\).*time or channel axis must have size 1",
    ),
    "channel axis of 2": (
        Layout(zarr_format=3, leading=(("c", "channel", 2),)),
        r"recon-1/em/raw/s0 has axes c \(channel\).*must have size 1",
    ),
    "x, y, z order": (
        Layout(names=("x", "y", "z")),
        r"recon-1/em/raw: csc reads space axes in the order \(z, y, x\); its axes are "
        r"x \(space\), y \(space\), z \(space\)",
    ),
    "unit no length": (
        Layout(unit="second"),
        r"recon-1/em/raw: axis 'z' has unit 'second', which is no OME-NGFF length unit",
    ),
}


@pytest.mark.parametrize(("layout", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_a_store_csc_cannot_read_is_refused_naming_the_group_and_axes(
    original: Path, tmp_path: Path, layout: Layout, message: str
) -> None:
    copy = copy_as(original, tmp_path / "ds.zarr", layout)
    with pytest.raises(ValueError, match=message):
        load_crops(rows_for(copy, {"crop1": CLASSES}), CLASSES, SPECS["4nm labels"])


def multiscales(axes: list[dict[str, str]], transforms: list[dict[str, Any]]) -> dict[str, Any]:
    """A one-level OME-NGFF 0.4 ``multiscales`` attribute."""
    dataset = {"path": "s0", "coordinateTransformations": transforms}
    return {"multiscales": [{"version": "0.4", "axes": axes, "datasets": [dataset]}]}


ZYX = [{"name": n, "type": "space"} for n in "zyx"]
BAD_METADATA = {
    "two space axes": (
        multiscales(ZYX[1:], [{"type": "scale", "scale": [4.0, 4.0]}]),
        r"g: csc reads three space axes \(z, y, x\), after any time or channel axis; its axes "
        r"are y \(space\), x \(space\)",
    ),
    "channel after space": (
        multiscales(
            [*ZYX, {"name": "c", "type": "channel"}], [{"type": "scale", "scale": [1] * 4}]
        ),
        r"g: csc reads three space axes .* its axes are z \(space\), y \(space\), x \(space\), c",
    ),
    "a path transform": (
        multiscales(ZYX, [{"type": "scale", "path": "scale.bin"}]),
        r"g has no usable OME-NGFF 'multiscales' metadata \(KeyError: 'scale'\)",
    ),
    "a translation of words": (
        multiscales(
            ZYX,
            [
                {"type": "scale", "scale": [4] * 3},
                {"type": "translation", "translation": ["a", 0, 0]},
            ],
        ),
        r"g: a translation transform must be a list of numbers, got \['a', 0, 0\]",
    ),
    "a scale of two values": (
        multiscales(ZYX, [{"type": "scale", "scale": [4, 4]}]),
        r"g: a scale transform has 2 values for 3 axes",
    ),
}


@pytest.mark.parametrize(("attrs", "message"), BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_metadata_csc_cannot_place_is_refused_naming_the_group(
    attrs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_multiscales(attrs, "g")


# --- What csc writes: valid OME-NGFF, pyramids placed by the spec ----------------------------

# Raw 8 nm, 16 x 80 x 80; crops of 16 x 128 x 128 label voxels at 4 nm: 8 x 64 x 64 output
# voxels at 8 nm, so predictions get s0 (8 x 64 x 64) and s1 (4 x 32 x 32).
BIG_CROPS = SynthSpec(
    num_datasets=1,
    num_crops=1,
    shape=(16, 80, 80),
    crop_shape=(16, 128, 128),
    chunks=(16, 32, 32),
    missing_class_prob=0.0,
)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One crop predicted by a model that echoes the raw, and processed: (crop's prediction
    group, its processed group)."""
    base = tmp_path_factory.mktemp("outputs")
    write_synthetic(base / "data", BIG_CROPS)
    config = config_of(base / "data", base / "run", model=Echo(), model_name="echo")
    torch.save({}, base / "echo.pth")
    (written,) = predict(config, all_crops=True, checkpoint=str(base / "echo.pth"), progress=False)
    (processed,) = process(config, progress=False)
    return written.path, processed


def level_centres(attrs: dict[str, Any], group: str) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """Per level: its Level, and the nm centres of its first and last voxel along each axis."""
    found = []
    for level in parse_multiscales(attrs, group):
        shape = zarr.open_array(f"{group}/{level.path}", mode="r").shape
        scale, translation = np.asarray(level.scale), np.asarray(level.translation)
        found.append((level, translation, translation + (np.asarray(shape) - 1) * scale))
    return found


def assert_pyramid_placed(group: Path) -> None:
    """Level n voxel j is centred where the 2**n x 2**n x 2**n s0 voxels it summarises are."""
    attrs = dict(zarr.open_group(str(group), mode="r").attrs)
    levels = level_centres(attrs, str(group))
    assert [level.path for level, _, _ in levels] == ["s0", "s1"]
    (s0, first0, _), *coarser = levels
    size0 = np.asarray(s0.scale)
    for n, (level, first, last) in enumerate(coarser, start=1):
        factor = 2**n
        assert np.allclose(level.scale, size0 * factor)
        shape = zarr.open_array(f"{group}/{level.path}", mode="r").shape
        for j, centre in ((0, first), (np.asarray(shape) - 1, last)):
            summarised = factor * np.asarray(j) + np.arange(factor)[:, None]  # s0 voxels
            assert np.allclose(centre, (first0 + summarised * size0).mean(axis=0))


@pytest.mark.slow  # predicts and processes a crop (about 7 s)
def test_predictions_are_valid_ome_ngff_images_with_an_averaged_pyramid(
    outputs: tuple[Path, Path],
) -> None:
    prediction, _ = outputs
    for name in ("nuc", "mito", "er"):
        group = zarr.open_group(str(prediction / name), mode="r")
        image = ome_zarr_models.v04.Image.from_zarr(group)
        (multiscale,) = image.attributes.multiscales
        assert [axis.unit for axis in multiscale.axes] == ["nanometer"] * 3
        assert [axis.type for axis in multiscale.axes] == ["space"] * 3
        s0, s1 = np.asarray(group["s0"][...]), np.asarray(group["s1"][...])
        assert s0.shape == (8, 64, 64) and s1.shape == (4, 32, 32)
        np.testing.assert_array_equal(s1, downsample_2x(s0, "mean"))
        assert_pyramid_placed(prediction / name)


@pytest.mark.slow  # predicts and processes a crop (about 7 s)
def test_processed_labels_are_valid_ome_ngff_labels_whose_pyramid_keeps_the_ids(
    outputs: tuple[Path, Path],
) -> None:
    _, processed = outputs
    for name in ("nuc", "mito", "er"):
        group = zarr.open_group(str(processed / name), mode="r")
        ome_zarr_models.v04.ImageLabel.from_zarr(group)
        assert group.attrs["image-label"] == {"version": "0.4"}
        s0, s1 = np.asarray(group["s0"][...]), np.asarray(group["s1"][...])
        np.testing.assert_array_equal(s1, downsample_2x(s0, "mode"))
        assert set(np.unique(s1)) <= set(np.unique(s0))  # ids kept, never averaged
        assert_pyramid_placed(processed / name)


def test_what_csc_synth_writes_is_valid_ome_ngff(tiny_synth: Path) -> None:
    groups = sorted(tiny_synth.glob("*/*.zarr/recon-1/em/fibsem-uint8"))
    groups += sorted(tiny_synth.glob("*/*.zarr/recon-1/labels/groundtruth/crop*/*"))
    groups = [path for path in groups if path.is_dir()]
    assert len(groups) > 2
    for path in groups:
        image = ome_zarr_models.v04.Image.from_zarr(zarr.open_group(str(path), mode="r"))
        assert len(image.attributes.multiscales[0].datasets) == 3


def test_a_pyramid_is_written_block_by_block(tmp_path: Path) -> None:
    """Each level read in boxes no bigger than the block (memory bounded by the block), and
    equal to the whole volume downsampled at once."""
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=2)
    ids = np.random.default_rng(0).integers(0, 4, size=(40, 70, 130), dtype=np.uint32)
    group.create_array("s0", data=ids, chunks=(8, 16, 16))
    reads: list[int] = []
    write_pyramid(Recording(group, reads), 3, method="mode", block_shape=(8, 16, 32))
    assert max(reads) <= 8 * 16 * 32
    np.testing.assert_array_equal(group["s1"][...], downsample_2x(ids, "mode"))
    s2 = downsample_2x(downsample_2x(ids, "mode"), "mode")
    np.testing.assert_array_equal(group["s2"][...], s2)
    assert group["s2"].shape == (10, 17, 32)  # odd edges dropped


class Recording:
    """A zarr group whose arrays record the voxels of each box read from them."""

    def __init__(self, group: Any, reads: list[int]) -> None:
        self.group, self.reads = group, reads

    def __getitem__(self, name: str) -> Any:
        return RecordingArray(self.group[name], self.reads)

    def create_array(self, name: str, **kwargs: Any) -> Any:
        return RecordingArray(self.group.create_array(name, **kwargs), self.reads)


class RecordingArray:
    def __init__(self, array: Any, reads: list[int]) -> None:
        self.array, self.reads = array, reads
        self.shape, self.chunks, self.dtype = array.shape, array.chunks, array.dtype

    def __getitem__(self, box: Any) -> Any:
        data = self.array[box]
        self.reads.append(int(np.asarray(data).size))
        return data

    def __setitem__(self, box: Any, values: Any) -> None:
        self.array[box] = values


def test_mode_prefers_the_most_frequent_id_then_the_larger() -> None:
    cells = [[5, 5, 5, 0, 0, 0, 0, 7], [3, 3, 3, 9, 9, 9, 0, 1], [2, 2, 2, 2, 0, 0, 0, 0]]
    volume = np.zeros((2, 2, 2 * len(cells)), dtype=np.uint32)
    for k, cell in enumerate(cells):  # cell k: the 2x2x2 voxels at x 2k, 2k + 1
        volume[:, :, 2 * k : 2 * k + 2] = np.reshape(cell, (2, 2, 2))
    assert downsample_2x(volume, "mode").ravel().tolist() == [0, 9, 2]


def test_evaluate_scores_a_spec_store_as_the_original(original: Path, tmp_path: Path) -> None:
    """Ground truth in micrometres, with a channel axis, as zarr v3: the same counts."""
    copy = copy_as(
        original, tmp_path / "copy" / "ds.zarr", LAYOUTS["zarr v3, micrometer, channel, shared"]
    )
    group = zarr.open_group(str(original / GROUPS[2]), mode="r")
    (s0,) = parse_multiscales(dict(group.attrs), "mask")
    mask = np.asarray(group["s0"][...])
    guess = mask.copy()
    guess[:4] = 1 - guess[:4]  # wrong in the first 4 slices: a score below 1
    crop = zarr.open_group(str(tmp_path / "predictions" / "ds.zarr"), mode="a", zarr_format=2)
    crop = crop.require_group("crop1/mask")
    crop.attrs.update(multiscales_attrs("mask", [(s0.scale, s0.translation)]))
    crop.attrs["csc_prediction"] = {"class": "mask", "encoding": "uint8"}
    write_array(crop, "s0", guess * 255, chunks=(8, 8, 8), compressor="zstd")
    reports = [
        evaluate(tmp_path / "predictions", rows_for(root, {"crop1": CLASSES}), classes=["mask"])
        for root in (original, copy)
    ]
    (want,), (got,) = (report.results for report in reports)
    assert got.counts == want.counts and got.scores == want.scores
    assert want.counts["fp"] > 0 and want.counts["tp"] > 0
