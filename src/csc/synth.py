"""Synthetic CellMap-layout data that a small model can learn, written as OME-NGFF zarr v2.

Each dataset is a raw FIB-SEM-like uint8 volume (8 nm at s0) with objects of every class
(ellipsoids of class-specific size, intensity and texture), and label crops at 4 nm that cover
sub-regions of it, placed by their OME-NGFF translation. Geometry is defined in world
coordinates (nm), so raw and labels agree wherever they overlap. Same seed, same bytes.

Layout (matching the public CellMap data)::

    OUT/{dataset}/{dataset}.zarr/recon-1/em/fibsem-uint8/s0..s2
    OUT/{dataset}/{dataset}.zarr/recon-1/labels/groundtruth/crop{N}/{class}/s0..s2

With test crops (``--test-crops K``: K per dataset, held out of the layout above, so no
datasplit trains on them), their labels go where the challenge keeps its ground truth and their
target space into a test crop manifest of the challenge's columns::

    OUT/ground_truth.zarr/crop{1000+N}/{class}     zarr v2, attrs voxel_size, translation, shape
    OUT/test_crop_manifest.csv                     crop_name,dataset,class_label,voxel_size,...

Instance classes (csc.config.INSTANCE_CLASSES) get one uint32 id per object there, the others
uint8 0/1, as in the challenge's ground truth.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from csc.config import INSTANCE_CLASSES
from csc.storage import (
    annotation_attrs,
    downsample_2x,
    level_transforms,
    multiscales_attrs,
    open_group,
    write_array,
)

DEFAULT_CLASSES = ("nuc", "mito", "er")
RAW_NAME = "em/fibsem-uint8"
TRUTH_NAME = "ground_truth.zarr"  # the challenge's name for the test crops' ground truth
MANIFEST_NAME = "test_crop_manifest.csv"
FIRST_TEST_CROP = 1001  # test crop ids: 1001, 1002, ... (the training crops count from 1)


@dataclasses.dataclass(frozen=True)
class Look:
    """How a class is drawn: ellipsoid radii ranges (nm), density, intensity and texture."""

    radii_min: tuple[float, float, float]
    radii_max: tuple[float, float, float]
    per_um3: float  # objects per cubic micrometre of raw volume
    intensity: float  # mean uint8 value inside the object
    texture_amplitude: float  # amplitude of a sinusoidal texture (uint8 units)
    texture_period: float  # its period in nm


LOOKS = {
    # Nuclei: large, round, dark and mottled.
    "nuc": Look((300, 300, 300), (480, 480, 480), 0.8, 70, 12, 90),
    # Mitochondria: elongated, very dark, with fine cristae-like stripes.
    "mito": Look((50, 50, 140), (80, 80, 280), 25.0, 40, 25, 40),
    # ER: thin sheets, mid-grey, smooth.
    "er": Look((14, 90, 90), (22, 220, 220), 30.0, 115, 4, 200),
}
BACKGROUND = Look((0, 0, 0), (0, 0, 0), 0, 175, 10, 300)


def look_for(name: str, index: int) -> Look:
    """A class's look; classes csc has no look for get distinct medium blobs by position."""
    if name in LOOKS:
        return LOOKS[name]
    intensity = 20 + (index * 47) % 200  # spread over the uint8 range, stable per position
    return Look((60, 60, 60), (150, 150, 150), 15.0, intensity, 15, 60 + 20 * (index % 5))


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    """What to write. Shapes are (z, y, x) voxels; raw at `raw_scale`, labels at `label_scale`."""

    num_datasets: int = 2
    num_crops: int = 3
    shape: tuple[int, int, int] = (96, 256, 256)
    crop_shape: tuple[int, int, int] = (64, 256, 256)
    classes: tuple[str, ...] = DEFAULT_CLASSES
    seed: int = 0
    missing_class_prob: float = 0.2
    chunks: tuple[int, int, int] = (64, 128, 128)
    compressor: str = "zstd"
    raw_scale: float = 8.0  # nm per voxel at s0, isotropic
    label_scale: float = 4.0  # nm per label voxel at s0; must divide raw_scale
    num_levels: int = 3
    noise: float = 12.0  # std of Gaussian noise in the raw, uint8 units
    num_test_crops: int = 0  # held-out crops per dataset, labels only in OUT/ground_truth.zarr
    test_crop_shape: tuple[int, int, int] = (32, 128, 128)  # voxels at label_scale


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    class_index: int
    centre: np.ndarray  # (z, y, x) nm
    radii: np.ndarray  # nm along the rotated axes
    rotation: np.ndarray  # 3x3, columns are the ellipsoid axes in world (z, y, x)


@dataclasses.dataclass(frozen=True)
class CropInfo:
    dataset: str
    crop: str
    classes: tuple[str, ...]  # the annotated classes
    translation: tuple[float, float, float]  # nm, s0 voxel-0 centre
    shape: tuple[int, int, int]  # s0 voxels at label_scale
    test: bool = False  # a held-out test crop (labels in OUT/ground_truth.zarr only)


def write_synthetic(
    out_dir: str | Path, spec: SynthSpec, *, overwrite: bool = False
) -> list[CropInfo]:
    """Write `spec.num_datasets` datasets under `out_dir`; return what crops were written."""
    _check_spec(spec)
    out = Path(out_dir)
    names = [f"jrc_synth{i + 1}" for i in range(spec.num_datasets)]
    existing = [out / n for n in names if (out / n).exists()]
    if spec.num_test_crops:
        existing += [p for p in (out / TRUTH_NAME, out / MANIFEST_NAME) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists; choose another folder or pass --overwrite to replace it"
        )
    truth = _test_truth_group(out, spec)
    crops = []
    for index, name in enumerate(names):
        if (out / name).exists():
            shutil.rmtree(out / name)
        first_crop = 1 + index * spec.num_crops
        crops += write_dataset(out / name / f"{name}.zarr", name, spec, index, first_crop, truth)
    if truth is not None:
        write_manifest(out / MANIFEST_NAME, [c for c in crops if c.test], spec)
    return crops


def _test_truth_group(out: Path, spec: SynthSpec) -> Any:
    """OUT/ground_truth.zarr, created fresh, when test crops are asked for."""
    if not spec.num_test_crops:
        return None
    if (out / TRUTH_NAME).exists():
        shutil.rmtree(out / TRUTH_NAME)
    return open_group(str(out / TRUTH_NAME), mode="w")


def write_manifest(path: Path, crops: Sequence[CropInfo], spec: SynthSpec) -> None:
    """The test crops' rows in the challenge's test crop manifest format ([z;y;x] vectors)."""

    def vector(values: Sequence[float]) -> str:
        return "[" + ";".join(f"{v:g}" for v in values) + "]"

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["crop_name", "dataset", "class_label", "voxel_size", "translation", "shape"]
        )
        for crop in crops:
            for name in crop.classes:
                writer.writerow(
                    [
                        crop.crop.removeprefix("crop"),
                        crop.dataset,
                        name,
                        vector((spec.label_scale,) * 3),
                        vector(crop.translation),
                        vector(crop.shape),
                    ]
                )


def _check_spec(spec: SynthSpec) -> None:
    if spec.num_datasets < 1 or spec.num_crops < 0 or spec.num_test_crops < 0:
        raise ValueError("--datasets must be >= 1, --crops and --test-crops >= 0")
    ratio = spec.raw_scale / spec.label_scale
    if ratio != int(ratio) or ratio < 1:
        raise ValueError(f"label_scale {spec.label_scale} must divide raw_scale {spec.raw_scale}")
    shapes = [("--crop-shape", spec.crop_shape)]
    if spec.num_test_crops:
        shapes.append(("test crops", spec.test_crop_shape))
    for option, shape in shapes:
        extent = [c * spec.label_scale for c in shape]
        if any(e > s * spec.raw_scale for e, s in zip(extent, spec.shape, strict=True)):
            raise ValueError(
                f"{option} {shape} at {spec.label_scale} nm does not fit in --shape "
                f"{spec.shape} at {spec.raw_scale} nm; make the crops smaller or the volume larger"
            )
    if not 0 <= spec.missing_class_prob < 1:
        raise ValueError(f"--missing-class-prob must be in [0, 1), got {spec.missing_class_prob}")
    if len(set(spec.classes)) != len(spec.classes) or not spec.classes:
        raise ValueError(f"--classes must be distinct names, got {list(spec.classes)}")
    if min(spec.chunks) < 1:
        raise ValueError(f"--chunks must be positive sizes, got {spec.chunks}")
    if min(spec.shape) < 2 ** (spec.num_levels - 1) or min(spec.crop_shape) < 2 ** (
        spec.num_levels - 1
    ):
        raise ValueError(f"shapes are too small for {spec.num_levels} pyramid levels")


def write_dataset(
    root: Path, name: str, spec: SynthSpec, index: int, first_crop: int, truth: Any = None
) -> list[CropInfo]:
    """One zarr store: the raw pyramid and `spec.num_crops` label crops; and its
    `spec.num_test_crops` held-out crops into the `truth` group."""
    rng = np.random.default_rng([spec.seed, index])
    extent_nm = np.array(spec.shape) * spec.raw_scale
    objects = place_objects(rng, spec.classes, extent_nm)
    recon = open_group(str(root), mode="w").require_group("recon-1")
    raw_scale = (spec.raw_scale,) * 3
    class_map = paint(objects, spec.shape, raw_scale, (0.0, 0.0, 0.0))
    raw = render_raw(class_map, spec, rng)
    write_pyramid(
        recon.require_group(RAW_NAME),
        RAW_NAME.split("/")[-1],
        raw,
        raw_scale,
        (0.0, 0.0, 0.0),
        spec,
        label_name=None,
    )
    crops = []
    for n in range(spec.num_crops):
        crops.append(write_crop(recon, name, f"crop{first_crop + n}", objects, spec, rng))
    first_test = FIRST_TEST_CROP + index * spec.num_test_crops
    for n in range(spec.num_test_crops):
        crops.append(write_test_crop(truth, name, first_test + n, objects, spec, rng))
    return crops


def place_objects(
    rng: np.random.Generator, classes: Sequence[str], extent_nm: np.ndarray
) -> list[Ellipsoid]:
    """Random ellipsoids for every class, largest classes first (later ones paint over)."""
    volume_um3 = float(np.prod(extent_nm)) / 1e9
    objects = []
    for index, name in enumerate(classes):
        look = look_for(name, index)
        count = max(1, int(rng.poisson(look.per_um3 * volume_um3)))
        for _ in range(count):
            radii = rng.uniform(look.radii_min, look.radii_max)
            rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
            centre = rng.uniform(0, extent_nm)
            objects.append(Ellipsoid(index, centre, radii, rotation))
    objects.sort(key=lambda o: -float(np.prod(o.radii)))
    return objects


def paint(
    objects: Sequence[Ellipsoid],
    shape: Sequence[int],
    scale: Sequence[float],
    translation: Sequence[float],
    *,
    ids: bool = False,
) -> np.ndarray:
    """Class map on a grid (voxel i centred at translation + i*scale, nm): 0 = background,
    k + 1 = class k; with `ids`, n + 1 = objects[n] (uint32) instead. Each ellipsoid is
    evaluated only within its bounding box."""
    class_map = np.zeros(shape, dtype=np.uint32 if ids else np.uint8)
    scale_a, origin = np.asarray(scale, float), np.asarray(translation, float)
    for number, obj in enumerate(objects, start=1):
        reach = float(obj.radii.max())
        lo = np.maximum(np.floor((obj.centre - reach - origin) / scale_a).astype(int), 0)
        hi = np.minimum(np.ceil((obj.centre + reach - origin) / scale_a).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        # World coordinates of the box's voxel centres, relative to the ellipsoid centre.
        axes = [origin[d] + np.arange(lo[d], hi[d]) * scale_a[d] - obj.centre[d] for d in range(3)]
        # Project onto the ellipsoid's own axes: u_k = sum_d R[d, k] * x_d, broadcast (Z, Y, X).
        inside = np.zeros(tuple(hi - lo), dtype=np.float32)
        for k in range(3):
            u = (
                obj.rotation[0, k] * axes[0][:, None, None]
                + obj.rotation[1, k] * axes[1][None, :, None]
                + obj.rotation[2, k] * axes[2][None, None, :]
            )
            inside += (u / obj.radii[k]) ** 2
        box = class_map[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        box[inside <= 1] = number if ids else obj.class_index + 1
    return class_map


def render_raw(class_map: np.ndarray, spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """uint8 raw: each class's intensity plus a sinusoidal texture, plus Gaussian noise."""
    coords = [np.arange(n, dtype=np.float32) * spec.raw_scale for n in class_map.shape]
    raw = np.zeros(class_map.shape, dtype=np.float32)
    looks = [BACKGROUND] + [look_for(c, i) for i, c in enumerate(spec.classes)]
    for value, look in enumerate(looks):
        mask = class_map == value
        if not mask.any():
            continue
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        phase = (2 * np.pi / look.texture_period) * (
            direction[0] * coords[0][:, None, None]
            + direction[1] * coords[1][None, :, None]
            + direction[2] * coords[2][None, None, :]
        )
        raw[mask] = look.intensity + look.texture_amplitude * np.sin(phase[mask])
    raw += rng.normal(0.0, spec.noise, size=raw.shape).astype(np.float32)
    return np.clip(np.rint(raw), 0, 255).astype(np.uint8)


def write_crop(
    recon: Any,  # a zarr group (zarr is imported where it is opened, not here)
    dataset: str,
    crop: str,
    objects: Sequence[Ellipsoid],
    spec: SynthSpec,
    rng: np.random.Generator,
) -> CropInfo:
    """One label crop: a random sub-region aligned to the raw voxel grid, one group per class."""
    translation = place_crop(spec, spec.crop_shape, rng)
    label_scale = (spec.label_scale,) * 3
    class_map = paint(objects, spec.crop_shape, label_scale, translation)
    annotated = annotated_classes(spec, rng)
    crop_group = recon.require_group(f"labels/groundtruth/{crop}")
    crop_group.attrs.update({"cellmap": {"annotation": {"class_names": annotated}}})
    for class_name in annotated:
        mask = (class_map == spec.classes.index(class_name) + 1).astype(np.uint8)
        write_pyramid(
            crop_group.require_group(class_name),
            class_name,
            mask,
            label_scale,
            translation,
            spec,
            label_name=class_name,
        )
    return CropInfo(dataset, crop, tuple(annotated), translation, spec.crop_shape)


def place_crop(
    spec: SynthSpec, shape: Sequence[int], rng: np.random.Generator
) -> tuple[float, float, float]:
    """The translation (nm, label voxel-0 centre) of a random crop aligned to the raw grid."""
    ratio = int(spec.raw_scale / spec.label_scale)
    crop_raw_voxels = [-(-c // ratio) for c in shape]  # ceil: raw voxels it touches
    offset = [
        int(rng.integers(0, s - c + 1)) for s, c in zip(spec.shape, crop_raw_voxels, strict=True)
    ]
    # Label voxel 0 sits in the first corner of raw voxel `offset`: raw centre - s_raw/2 + s_lab/2.
    z, y, x = (o * spec.raw_scale - spec.raw_scale / 2 + spec.label_scale / 2 for o in offset)
    return (z, y, x)


def annotated_classes(spec: SynthSpec, rng: np.random.Generator) -> list[str]:
    """The classes a crop annotates: each unless dropped by missing_class_prob, at least one."""
    annotated = [c for c in spec.classes if rng.random() >= spec.missing_class_prob]
    if not annotated:
        annotated = [spec.classes[int(rng.integers(len(spec.classes)))]]
    return annotated


def write_test_crop(
    truth: Any,  # the zarr group OUT/ground_truth.zarr
    dataset: str,
    crop_id: int,
    objects: Sequence[Ellipsoid],
    spec: SynthSpec,
    rng: np.random.Generator,
) -> CropInfo:
    """One held-out crop in the challenge's ground-truth layout: crop{id}/{class}, instance
    classes as one id per object (1..N in order of first voxel), others as 0/1."""
    translation = place_crop(spec, spec.test_crop_shape, rng)
    scale = (spec.label_scale,) * 3
    owner = paint(objects, spec.test_crop_shape, scale, translation, ids=True)
    object_class = np.array([-1] + [o.class_index for o in objects])
    annotated = annotated_classes(spec, rng)
    group = truth.require_group(f"crop{crop_id}")
    for name in annotated:
        inside = object_class[owner] == spec.classes.index(name)
        if name in INSTANCE_CLASSES:
            ids = np.where(inside, owner, 0).ravel()
            values, first = np.unique(ids, return_index=True)
            order = values[values != 0][np.argsort(first[values != 0], kind="stable")]
            lookup = np.zeros(len(objects) + 1, dtype=np.uint32)
            lookup[order] = np.arange(1, len(order) + 1, dtype=np.uint32)
            data = lookup[owner] * inside
        else:
            data = inside.astype(np.uint8)
        attrs = {"voxel_size": list(scale), "translation": list(translation)}
        write_array(
            group,
            name,
            data,
            chunks=spec.chunks,
            compressor=spec.compressor,
            attrs=attrs | {"shape": list(spec.test_crop_shape)},
        )
    return CropInfo(
        dataset, f"crop{crop_id}", tuple(annotated), translation, spec.test_crop_shape, test=True
    )


def write_pyramid(
    group: Any,  # a zarr group, as `write_array` takes
    name: str,
    data: np.ndarray,
    scale: Sequence[float],
    translation: Sequence[float],
    spec: SynthSpec,
    *,
    label_name: str | None,
) -> None:
    """Write s0..s{n-1}, each 2x smaller, with multiscales attrs (labels: annotation attrs)."""
    levels = level_transforms(scale, translation, spec.num_levels)
    group.attrs.update(multiscales_attrs(name, levels))
    level = data
    for n in range(spec.num_levels):
        attrs = None
        if label_name is not None:
            attrs = annotation_attrs(label_name, int(level.size - np.count_nonzero(level)))
        write_array(
            group, f"s{n}", level, chunks=spec.chunks, compressor=spec.compressor, attrs=attrs
        )
        level = downsample(level, is_label=label_name is not None)


def downsample(data: np.ndarray, *, is_label: bool) -> np.ndarray:
    """2x2x2 average (raw) or majority with ties to present (0/1 labels); odd edges dropped:
    `csc.storage.downsample_2x`, the rule of every pyramid csc writes (raw rounded)."""
    if is_label:
        return downsample_2x(data, "mode")
    return np.rint(downsample_2x(data.astype(np.float32), "mean")).astype(data.dtype)
