"""Sliding-window prediction into OME-NGFF zarr (docs/prediction.md).

A region (a crop's annotated extent, a test crop's box from the test crop manifest, or a box
in nm) gets an output grid at the target voxel size. Windows of the target patch shape tile
that grid with `prediction_overlap`; each window's probabilities are weighted by a Gaussian
that falls towards the window's edges, and every output voxel is the weighted mean of the
windows over it, so tile seams do not show. The grid is
computed block by block (`prediction_block_shape` output voxels at a time): a block takes every
window that touches it, so memory is bounded by the block, not the volume, and the result does
not depend on the block shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from csc import distributed, manifests
from csc.checkpoints import checkpoint_weights, load_weights
from csc.config import (
    DEFAULT_PREDICTION_CHECKPOINT,
    DEFAULT_S3_SEARCH_PATH,
    RAW_NAME,
    TrainConfig,
    load_config,
    s3_search_path,
)
from csc.data.datasets import Crop, PatchDataset, PatchSpec
from csc.data.geometry import Grid
from csc.data.loaders import check_crops, load_crops
from csc.datasplit import (
    DatasplitRow,
    crop_matches,
    input_stores,
    read_datasplit,
    s3_options,
    select_crops,
)
from csc.distributed import Dist
from csc.manifests import TestCrop
from csc.runtime import (
    autocast,
    channels_last_format,
    choose_device,
    in_memory_format,
    make_model,
)
from csc.storage import (
    ArraySource,
    InputStores,
    MetadataReader,
    blocks,
    check_replaceable,
    check_targets,
    clean_stale,
    create_array,
    fs_path,
    is_csc_output,
    is_s3,
    level_transforms,
    mark_csc_output,
    multiscales_attrs,
    open_group,
    pyramid_levels,
    s3_errors,
    swap_in,
    write_pyramid,
    write_text_atomic,
)

Vec3 = tuple[float, float, float]
GAUSSIAN_SIGMA = 1 / 8  # of the window size: weights fall to ~0.0003 of the centre's at edges
MIN_WEIGHT = 1e-3  # relative: edge voxels of a lone window still count
CHUNK = 64  # output chunk edge (voxels), as neuroglancer likes them
PREDICT = "predict"  # the command named in the csc marker of its output groups
WHOLE_RAW = "raw"  # the region name (output group) of a dataset's whole raw


@dataclasses.dataclass(frozen=True)
class Region:
    """A box to predict in one dataset's raw: world edges in nm, (z, y, x)."""

    dataset: str
    name: str  # the crop's name, or bbox_z0_y0_x0_z1_y1_x1
    raw_group: str  # the raw multiscale group
    low: Vec3
    high: Vec3
    classes: tuple[str, ...] | None = None  # the model's classes written; None: all of them


@dataclasses.dataclass(frozen=True)
class OutputGrid:
    """The voxels written for a region: shape (z, y, x), voxel size and voxel 0's centre, nm."""

    shape: tuple[int, int, int]
    scale: Vec3
    translation: Vec3

    @classmethod
    def covering(cls, region: Region, scale: Vec3) -> OutputGrid:
        """Voxels of `scale` from the region's low edge on (wherever it lies: 6 nm at 16 nm
        voxels is voxel 0's edge), as many as reach its high edge."""
        low, high, size = (np.asarray(v, dtype=float) for v in (region.low, region.high, scale))
        shape = np.maximum(1, np.ceil((high - low) / size - 1e-6)).astype(int)
        return cls(_ints(shape), scale, _vec(low + size / 2))


@dataclasses.dataclass(frozen=True)
class Written:
    """One region's output: its group and grid."""

    region: Region
    path: Path
    grid: OutputGrid
    blocks: BlockCounts | None = None  # predicted now, and recorded by an earlier run


@dataclasses.dataclass
class Predictor:
    """A model in eval mode and how to feed it: one patch spec per plane orientation (three
    with --orthoplanes, whose probabilities are averaged), batches of `batch_size` windows."""

    model: torch.nn.Module
    device: torch.device
    specs: list[PatchSpec]
    classes: tuple[str, ...]
    batch_size: int
    overlap: float
    block_shape: tuple[int, int, int]
    precision: str = "32"
    memory_format: torch.memory_format | None = None
    raw_transform: Any = None
    chunk_cache_mb: int = 256
    progress: bool = True
    checkpoint: str = ""  # where the weights came from


# --- Model -----------------------------------------------------------------------------------


def load_predictor(
    config: TrainConfig,
    *,
    checkpoint: str = DEFAULT_PREDICTION_CHECKPOINT,
    orthoplanes: bool = False,
    overlap: float | None = None,
    progress: bool = True,
    spec: PatchSpec | None = None,
) -> Predictor:
    """The config's model with the weights `checkpoint` names (latest, best, or a file), as
    training resumes them; `spec` is the config's (`PatchSpec.from_config`) unless given."""
    spec = spec or PatchSpec.from_config(config)
    specs = [spec]
    if orthoplanes:
        specs = orthoplane_specs(spec)
    device = distributed.rank_device(distributed.from_env(), choose_device(config.device))
    model = make_model(config, spec)
    state, source = checkpoint_weights(config, checkpoint)
    load_weights(model, state, source=source)
    memory_format = channels_last_format(config, device, spec)
    model = in_memory_format(model.to(device).eval(), memory_format)
    return Predictor(
        model,
        device,
        specs,
        config.classes,
        batch_size=config.prediction_batch_size or config.batch_size,
        overlap=config.prediction_overlap if overlap is None else overlap,
        block_shape=config.prediction_block_shape,
        precision=config.precision,
        memory_format=memory_format,
        raw_transform=prediction_transform(config),
        chunk_cache_mb=config.chunk_cache_mb,
        progress=progress,
        checkpoint=source,
    )


def prediction_transform(config: TrainConfig) -> Any:
    """The raw transform of prediction windows: `value_transforms` (the toolkit's key for
    it), else validation's `val_raw_value_transforms` (None: csc's default normalisation)."""
    if config.value_transforms is not None:
        return config.value_transforms
    return config.val_raw_value_transforms


def orthoplane_specs(spec: PatchSpec) -> list[PatchSpec]:
    """A 2D patch spec in the three orientations: planes across z, then y, then x."""
    if spec.plane_axis is None:
        raise ValueError("--orthoplanes needs a 2D model (a singleton axis in the array shapes)")
    grids = (spec.input, spec.target)
    if any(len(set(grid.scale)) != 1 for grid in grids):
        raise ValueError(
            "--orthoplanes needs isotropic voxels: input_array_info and target_array_info "
            f"scales are {spec.input.scale} and {spec.target.scale}"
        )
    specs = []
    for axis in range(3):
        moved = [_move_plane(grid, spec.plane_axis, axis) for grid in grids]
        specs.append(PatchSpec(moved[0], moved[1], axis))
    return specs


def _move_plane(grid: Grid, source: int, axis: int) -> Grid:
    """The grid with its singleton axis moved from `source` to `axis` (the plane's (H, W)
    keep their order)."""
    shape = [n for k, n in enumerate(grid.shape) if k != source]
    shape.insert(axis, 1)
    return Grid(_ints(shape), grid.scale)


# --- Regions ---------------------------------------------------------------------------------


def crop_regions(
    config: TrainConfig,
    *,
    crops: Sequence[str] = (),
    all_crops: bool = False,
    spec: PatchSpec | None = None,
    rows: Sequence[DatasplitRow] | None = None,
    manifest: str | os.PathLike[str] | None = None,
) -> list[Region]:
    """The annotated extents of datasplit crops (or of `rows`, e.g. a fresh crawl): those named
    in `crops` (crop or dataset/crop, globs allowed), all of them, or by default the validation
    crops. A name cropN that matches no datasplit crop but is a test crop of the manifest is
    that test crop (`manifest_regions`)."""
    source = str(config.datasplit_path) if rows is None else f"the crawl of {config.search_path}"
    if rows is None:
        rows = read_datasplit(config.datasplit_path)
    patterns, ids = split_test_ids(rows, crops, manifest=manifest)
    spec = spec or PatchSpec.from_config(config)
    regions = []
    if patterns or not ids:
        chosen = select_rows(rows, patterns, all_crops=all_crops, source=source)
        regions = datasplit_regions(config, chosen, spec=spec, source=source)
    if ids:
        regions += manifest_regions(config, ids=ids, manifest=manifest, spec=spec, rows=rows)
    return regions


def datasplit_regions(
    config: TrainConfig, chosen: Sequence[DatasplitRow], *, spec: PatchSpec, source: str
) -> list[Region]:
    """The annotated extents of the datasplit rows `chosen`, from their labels' metadata."""
    resolved = load_crops(chosen, config.classes, spec, s3=s3_options(config))
    # A crop over raw with no stored chunk would be predicted from zeros: refused here too.
    check_crops(resolved, spec, datasplit=source, labels=False, s3=s3_options(config))
    return [
        Region(row.dataset, row.crop, f"{row.raw_root}/{row.raw_path}", crop.low, crop.high)
        for row, crop in zip(chosen, resolved, strict=True)
    ]


def split_test_ids(
    rows: Sequence[DatasplitRow],
    patterns: Sequence[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
) -> tuple[list[str], set[int]]:
    """`patterns` as datasplit patterns and test crop ids: a name cropN that matches no crop
    of `rows` and is a test crop of the manifest is that test crop; every other name stays a
    datasplit pattern (the manifest is read only when some name matches no crop)."""
    kept, ids = [], set()
    known: set[int] | None = None
    for pattern in patterns:
        number = pattern.removeprefix("crop")
        if any(crop_matches(r.dataset, r.crop, [pattern]) for r in rows) or not (
            pattern.startswith("crop") and number.isdigit()
        ):
            kept.append(pattern)
            continue
        if known is None:
            known = {crop.id for crop in manifests.scored_crops(manifest)}
        if int(number) in known:
            ids.add(int(number))
        else:
            kept.append(pattern)  # select_crops names it as matching nothing
    return kept, ids


def select_rows(
    rows: Sequence[DatasplitRow], patterns: Sequence[str], *, all_crops: bool, source: str
) -> list[DatasplitRow]:
    if all_crops:
        return list(rows)
    if not patterns:
        chosen = [row for row in rows if row.usage == "validate"]
        if not chosen:
            raise ValueError(f"{source} has no validation crops; name crops with --crops or --all")
        return chosen
    return select_crops(rows, patterns)


def box_region(config: TrainConfig, dataset: str, bbox: Sequence[float]) -> Region:
    """A box (z0, y0, x0, z1, y1, x1 in world nm) in `dataset`'s raw, which must contain it."""
    if len(bbox) != 6 or any(bbox[d + 3] <= bbox[d] for d in range(3)):
        raise ValueError(
            f"--bbox must be z0,y0,x0,z1,y1,x1 in nm with each end above its start, got {bbox}"
        )
    group = dataset_raw_group(config, dataset)
    raw = raw_source(group, config)
    low, high = (np.asarray(bbox[:3], dtype=float), np.asarray(bbox[3:], dtype=float))
    what = f"--bbox {','.join(f'{v:g}' for v in bbox)}"
    check_inside(low, high, raw, what=what, dataset=dataset, hint="choose a box inside it")
    name = "bbox_" + "_".join(f"{v:g}" for v in bbox)
    return Region(dataset, name, group, _vec(low), _vec(high))


def raw_region(config: TrainConfig, dataset: str) -> Region:
    """The whole raw of `dataset` (its extent at the model's input scale), named "raw"."""
    group = dataset_raw_group(config, dataset)
    low, high = raw_source(group, config).level.bounds()
    return Region(dataset, WHOLE_RAW, group, _vec(low), _vec(high))


def dataset_raw_group(config: TrainConfig, dataset: str) -> str:
    """The raw group of `dataset`, as the datasplit gives it; a ValueError listing the
    datasplit's datasets when it has no row of `dataset`."""
    rows = read_datasplit(config.datasplit_path)
    mine = [row for row in rows if row.dataset == dataset]
    if not mine:
        known = sorted({row.dataset for row in rows})
        raise ValueError(
            f"dataset {dataset!r} is not in {config.datasplit_path}; known: {', '.join(known)}"
        )
    return f"{mine[0].raw_root}/{mine[0].raw_path}"


def raw_source(group: str, config: TrainConfig) -> Any:
    reader = MetadataReader(group, s3=s3_options(config))
    return reader.source(group, config.input_array_info.scale, label=False)


def check_inside(
    low: np.ndarray,
    high: np.ndarray,
    raw: ArraySource,
    *,
    what: str,
    dataset: str,
    hint: str,
    margin: float = 1e-6,
) -> None:
    """Refuse a box (world edges, nm) that reaches more than `margin` voxels of the raw's
    level outside the raw."""
    raw_low, raw_high = raw.level.bounds()
    reach = margin * np.asarray(raw.level.scale)
    if np.any(low < raw_low - reach) or np.any(high > raw_high + reach):
        edges = zip("zyx", raw_low, raw_high, strict=True)
        extent = ", ".join(f"{axis} {a:g} to {b:g}" for axis, a, b in edges)
        raise ValueError(
            f"{what} reaches outside the raw of {dataset} ({raw.url}), which covers {extent} "
            f"nm; {hint}"
        )


# --- Test crops ------------------------------------------------------------------------------


def manifest_regions(
    config: TrainConfig,
    *,
    ids: Collection[int] | None = None,
    manifest: str | os.PathLike[str] | None = None,
    spec: PatchSpec | None = None,
    rows: Sequence[DatasplitRow] | None = None,
) -> list[Region]:
    """The test crops of the manifest in use (all, or those `ids`), each with the model's
    classes the manifest scores in it, in the raw of its dataset (`raw_groups`; `rows`: the
    datasplit's, read from its CSV when None). Refused before any voxel is read: a dataset
    with no raw, a crop outside its raw, raw with no chunk stored around a crop."""
    source = manifests.manifest_name(manifest)
    chosen = scored_in(config.classes, manifests.scored_crops(manifest), ids=ids, source=source)
    groups = raw_groups(config, chosen, rows=rows)
    regions = [
        Region(crop.dataset, crop.name, groups[crop.dataset], *crop_box(crop), classes=classes)
        for crop, classes in chosen
    ]
    check_regions(config, regions, spec=spec or PatchSpec.from_config(config), source=source)
    return regions


def scored_in(
    classes: Sequence[str],
    crops: Sequence[TestCrop],
    *,
    ids: Collection[int] | None,
    source: str,
) -> list[tuple[TestCrop, tuple[str, ...]]]:
    """The crops (those `ids`, or all) with the model's `classes` each scores, in the model's
    order; a crop scoring none is skipped with a warning, and none left is an error."""
    picked = [crop for crop in crops if ids is None or crop.id in ids]
    chosen = [(crop, tuple(n for n in classes if n in crop.class_labels)) for crop in picked]
    skipped = [crop.name for crop, wanted in chosen if not wanted]
    if skipped and len(skipped) < len(chosen):
        warnings.warn(
            f"test crop(s) {', '.join(skipped)} of {source} score none of the model's classes "
            f"({', '.join(classes)}): skipped",
            stacklevel=3,
        )
    chosen = [(crop, wanted) for crop, wanted in chosen if wanted]
    if not chosen:
        scored = sorted({name for crop in picked for name in crop.class_labels})
        raise ValueError(
            f"no test crop of {source} scores any of the model's classes "
            f"({', '.join(classes)}); its crops score {', '.join(scored) or 'nothing'}"
        )
    return chosen


def crop_box(crop: TestCrop) -> tuple[Vec3, Vec3]:
    """World edges (nm) of a test crop's voxels, (z, y, x). Voxel i's centre is at translation
    + i * voxel_size, as OME-NGFF translations are everywhere in csc (a datasplit crop with
    that translation gets the same box), so the box starts half a voxel before it."""
    size, translation = np.asarray(crop.voxel_size), np.asarray(crop.translation)
    low = translation - size / 2
    return _vec(low), _vec(low + size * np.asarray(crop.shape))


def raw_groups(
    config: TrainConfig,
    chosen: Sequence[tuple[TestCrop, tuple[str, ...]]],
    *,
    rows: Sequence[DatasplitRow] | None,
) -> dict[str, str]:
    """Per dataset of the chosen crops, its raw multiscale group: that of its datasplit rows,
    else the first of `raw_places` holding one. Every dataset with none is named in one
    error."""
    csv = Path(config.datasplit_path)
    if rows is None:
        rows = read_datasplit(csv) if csv.is_file() else []
    from_rows = {row.dataset: f"{row.raw_root}/{row.raw_path}" for row in reversed(rows)}
    found, missing = {}, {}
    for dataset in dict.fromkeys(crop.dataset for crop, _ in chosen):
        places = raw_places(config, dataset)
        group = from_rows.get(dataset) or next((p for p in places if is_group(p, config)), None)
        if group is None:
            missing[dataset] = places
        else:
            found[dataset] = group
    if missing:
        raise FileNotFoundError(missing_raw_message(config, chosen, missing, csv=csv))
    return found


def raw_places(config: TrainConfig, dataset: str) -> list[str]:
    """Where the config's search_path (and, left at its default, each place it stands for)
    puts `dataset`'s raw; inside the bucket with use_s3."""
    templates = dict.fromkeys((config.search_path, *config.search_path_candidates))
    if config.use_s3:
        templates = dict.fromkeys(s3_search_path(t, config.s3_bucket) for t in templates)
    return [t.replace("{dataset}", dataset).replace("{name}", config.raw_name) for t in templates]


def is_group(place: str, config: TrainConfig) -> bool:
    """Whether a multiscale group (its .zattrs) is at `place` (one request on S3)."""
    reader = MetadataReader(place, s3=s3_options(config))
    with s3_errors(place, reader.endpoint_url):
        return bool(reader.fs.exists(fs_path(f"{place}/.zattrs")))


def missing_raw_message(
    config: TrainConfig,
    chosen: Sequence[tuple[TestCrop, tuple[str, ...]]],
    missing: dict[str, list[str]],
    *,
    csv: Path,
) -> str:
    """What is missing, where csc looked, and how to get it."""
    lines = []
    for dataset, places in missing.items():
        names = ", ".join(crop.name for crop, _ in chosen if crop.dataset == dataset)
        public = s3_search_path(DEFAULT_S3_SEARCH_PATH, TrainConfig.s3_bucket)
        url = public.replace("{dataset}", dataset).replace("{name}", RAW_NAME)
        lines.append(
            f"dataset {dataset} (test crop {names}): no rows of it in {csv} and no raw at "
            f"{' or '.join(places)}; public copy: {url}"
        )
    how = (
        "check the dataset names and search_path"
        if config.use_s3
        else "download the raw around each crop there (every level's metadata, the chunks at "
        "the model's scale), or stream it from S3: set use_s3 = True in the config (or add "
        "use_s3=True to the command)"
    )
    first = f"no raw for the test crops of {', '.join(missing)} here:\n  "
    return first + "\n  ".join(lines) + f"\n{how}"


def check_regions(
    config: TrainConfig, regions: Sequence[Region], *, spec: PatchSpec, source: str
) -> None:
    """Refuse a test crop that lies outside its raw (by more than a raw voxel, at the model's
    input scale) or over raw with no chunk stored where its windows read."""
    crops = []
    for region in regions:
        raw = raw_source(region.raw_group, config)
        low, high = np.asarray(region.low), np.asarray(region.high)
        what = f"test crop {region.name} of {source} (z, y, x {_box_text(low, high)} nm)"
        hint = "is the raw the crop's dataset, or the manifest row wrong?"
        check_inside(low, high, raw, what=what, dataset=region.dataset, hint=hint, margin=1.0)
        crops.append(Crop(f"{region.dataset}/{region.name}", raw, (), region.low, region.high))
    check_crops(crops, spec, datasplit=source, labels=False, s3=s3_options(config))


def _box_text(low: np.ndarray, high: np.ndarray) -> str:
    return ", ".join(f"{a:g} to {b:g}" for a, b in zip(low, high, strict=True))


# --- Windows and blending --------------------------------------------------------------------


def window_starts(size: int, window: int, overlap: float) -> np.ndarray:
    """First voxels of the windows along one axis of `size` voxels: a step of
    window * (1 - overlap), the last window flush with the end; one centred window when the
    axis is shorter than a window (it then reaches past both ends)."""
    if size <= window:
        return np.array([(size - window) // 2])
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return np.array(starts)


def gaussian_weights(shape: Sequence[int]) -> np.ndarray:
    """Per-voxel weights of a window, (z, y, x): a Gaussian per axis (sigma = size / 8)
    multiplied, highest at the centre, never below MIN_WEIGHT of it."""
    weights = np.ones((), dtype=np.float32)
    for n in shape:
        offsets = np.arange(n, dtype=np.float64) - (n - 1) / 2
        sigma = max(n * GAUSSIAN_SIGMA, 1e-6)
        axis = np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)
        weights = np.multiply.outer(weights, axis)
    return np.maximum(weights / weights.max(), MIN_WEIGHT).astype(np.float32)


def touching(starts: np.ndarray, window: int, part: slice) -> np.ndarray:
    """The window starts whose windows overlap the voxels `part`."""
    return starts[(starts < part.stop) & (starts + window > part.start)]


# --- Prediction ------------------------------------------------------------------------------


def predict_blocks(
    predictor: Predictor,
    region: Region,
    grid: OutputGrid,
    readers: Sequence[PatchDataset],
    boxes: Sequence[tuple[slice, ...]] | None = None,
) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Per block of the output grid (or of `boxes`, some of its blocks): its slices and
    float32 probabilities (C, *block)."""
    if boxes is None:
        boxes = list(blocks(grid.shape, predictor.block_shape))
    lattices = [
        (
            reader,
            [
                window_starts(n, w, predictor.overlap)
                for n, w in zip(grid.shape, reader.spec.target.shape, strict=True)
            ],
        )
        for reader in readers
    ]
    total = sum(
        math.prod(
            len(touching(s, w, part))
            for s, w, part in zip(starts, reader.spec.target.shape, box, strict=True)
        )
        for reader, starts in lattices
        for box in boxes
    )
    bar = tqdm(
        total=total,
        desc=f"{region.dataset}/{region.name}",
        unit="window",
        disable=None if predictor.progress else True,
    )
    try:
        for box in boxes:
            sums = [
                _blend(predictor, grid, reader, starts, box, bar) for reader, starts in lattices
            ]
            yield box, np.mean(sums, axis=0) if len(sums) > 1 else sums[0]
    finally:
        bar.close()


def _blend(
    predictor: Predictor,
    grid: OutputGrid,
    reader: PatchDataset,
    starts: list[np.ndarray],
    box: tuple[slice, ...],
    bar: Any,
) -> np.ndarray:
    """The Gaussian-weighted mean probabilities (C, *block) of one orientation's windows over
    the block `box`."""
    window = reader.spec.target.shape
    shape = tuple(part.stop - part.start for part in box)
    total = np.zeros((len(predictor.classes), *shape), dtype=np.float32)
    weight = np.zeros(shape, dtype=np.float32)
    weights = gaussian_weights(window)
    corners = list(
        itertools.product(
            *[touching(s, w, part) for s, w, part in zip(starts, window, box, strict=True)]
        )
    )
    for first in range(0, len(corners), predictor.batch_size):
        batch = corners[first : first + predictor.batch_size]
        probabilities = _forward(predictor, grid, reader, batch)
        for corner, values in zip(batch, probabilities, strict=True):
            inside, there = _overlap(corner, window, box)
            total[(slice(None), *inside)] += values[(slice(None), *there)] * weights[there]
            weight[inside] += weights[there]
        bar.update(len(batch))
    return total / weight


def _overlap(
    corner: Sequence[int], window: Sequence[int], box: tuple[slice, ...]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where a window starting at `corner` meets the block: slices into the block and into
    the window."""
    inside, there = [], []
    for c, w, part in zip(corner, window, box, strict=True):
        low, high = max(c, part.start), min(c + w, part.stop)
        inside.append(slice(low - part.start, high - part.start))
        there.append(slice(low - c, high - c))
    return tuple(inside), tuple(there)


def _forward(
    predictor: Predictor, grid: OutputGrid, reader: PatchDataset, corners: Sequence[tuple[int, ...]]
) -> np.ndarray:
    """Probabilities (B, C, *window) of windows starting at `corners` of the output grid."""
    spec = reader.spec
    window = np.asarray(spec.target.shape)
    translation, scale = np.asarray(grid.translation), np.asarray(grid.scale)
    identity = np.eye(3)
    requests = [
        (0, translation + (np.asarray(c) + (window - 1) / 2) * scale, identity, 0) for c in corners
    ]
    inputs = reader.read_inputs(requests).to(predictor.device, non_blocking=True)
    if predictor.memory_format is not None:
        inputs = inputs.contiguous(memory_format=predictor.memory_format)
    with torch.no_grad(), autocast(predictor.device, predictor.precision):
        logits = predictor.model(inputs).float()
    expected = (len(inputs), len(predictor.classes), *spec.in_plane(spec.target.shape))
    if tuple(logits.shape) != expected:
        raise ValueError(
            f"the model returned {tuple(logits.shape)} for input {tuple(inputs.shape)}; "
            f"prediction needs {expected} (target_array_info shape, one channel per class)"
        )
    probabilities = torch.sigmoid(logits).cpu().numpy()
    if spec.plane_axis is not None:  # 2D: (B, C, H, W) -> (B, C, *window) with the singleton
        probabilities = np.expand_dims(probabilities, spec.plane_axis + 2)
    return probabilities


def make_readers(predictor: Predictor, region: Region, config: TrainConfig) -> list[PatchDataset]:
    """Per orientation, a reader of model inputs around any centre in the region's raw. No
    crop cache: windows read each raw voxel a few times, all close together in time, which
    tensorstore's chunk cache serves, and the region may be far bigger than a crop."""
    raw = raw_source(region.raw_group, config)
    crop = Crop(
        f"{region.dataset}/{region.name}",
        raw,
        (None,) * len(predictor.classes),
        region.low,
        region.high,
    )
    return [
        PatchDataset(
            [crop],
            spec,
            raw_transform=predictor.raw_transform,
            chunk_cache_mb=predictor.chunk_cache_mb,
            crop_cache_mb=0,
        )
        for spec in predictor.specs
    ]


def predict_volume(predictor: Predictor, region: Region, config: TrainConfig) -> np.ndarray:
    """The whole region's probabilities (C, Z, Y, X) in memory (small regions, tests)."""
    grid = OutputGrid.covering(region, _vec(config.target_array_info.scale))
    out = np.zeros((len(predictor.classes), *grid.shape), dtype=np.float32)
    readers = make_readers(predictor, region, config)
    for box, values in predict_blocks(predictor, region, grid, readers):
        out[(slice(None), *box)] = values
    return out


# --- Writing ---------------------------------------------------------------------------------


def encode(probabilities: np.ndarray, encoding: str) -> np.ndarray:
    """uint8: round(p * 255); float16: p."""
    if encoding == "uint8":
        return np.rint(np.clip(probabilities, 0, 1) * 255).astype(np.uint8)
    return probabilities.astype(np.float16)


def output_path(output: str | os.PathLike[str], region: Region) -> Path:
    """{output}/{dataset}.zarr/{crop}: one group per class below it."""
    return Path(output) / f"{region.dataset}.zarr" / region.name


def predict(
    config: TrainConfig | str | os.PathLike[str],
    *,
    crops: Sequence[str] = (),
    all_crops: bool = False,
    test_crops: bool = False,
    manifest: str | os.PathLike[str] | None = None,
    bbox: Sequence[float] | None = None,
    dataset: str | None = None,
    output: str | os.PathLike[str] | None = None,
    checkpoint: str = DEFAULT_PREDICTION_CHECKPOINT,
    overwrite: bool = False,
    orthoplanes: bool = False,
    overlap: float | None = None,
    encoding: str | None = None,
    progress: bool = True,
    rows: Sequence[DatasplitRow] | None = None,
) -> list[Written]:
    """`csc predict`: the regions asked for (datasplit crops, by default the validation ones;
    with `test_crops` the test crops of the test crop `manifest` in use; a box in one
    dataset; or with `dataset` alone its whole raw), predicted with the `checkpoint` weights
    into `output` (default: `predictions_path`). `rows` replaces the datasplit's crops
    (csc.predict passes a crawl). Under torchrun every rank runs this, and the blocks of each
    region are split over the ranks (`write_region`)."""
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    place = distributed.from_env()
    resolved = config
    distributed.init(place, distributed.rank_device(place, choose_device(config.device)))
    regions = distributed.from_main(
        place,
        lambda: select_regions(
            resolved,
            crops=crops,
            all_crops=all_crops,
            test_crops=test_crops,
            manifest=manifest,
            bbox=bbox,
            dataset=dataset,
            rows=rows,
        ),
    )
    output = output or config.predictions_path.format(model_name=config.model_name)

    @distributed.report_failure(place)
    def run() -> list[Written]:
        check_free(output, regions, overwrite=overwrite, inputs=input_stores(config))
        predictor = load_predictor(
            resolved,
            checkpoint=checkpoint,
            orthoplanes=orthoplanes,
            overlap=overlap,
            progress=progress,
        )
        return write_predictions(
            resolved, regions, predictor, output=output, encoding=encoding, overwrite=overwrite
        )

    written = run()
    distributed.shutdown(place)
    return written


def select_regions(
    config: TrainConfig,
    *,
    crops: Sequence[str] = (),
    all_crops: bool = False,
    test_crops: bool = False,
    manifest: str | os.PathLike[str] | None = None,
    bbox: Sequence[float] | None = None,
    dataset: str | None = None,
    rows: Sequence[DatasplitRow] | None = None,
) -> list[Region]:
    """The regions `predict` is asked for (its arguments' meanings)."""
    spec = PatchSpec.from_config(config)
    if bbox is not None or (dataset is not None and not (crops or all_crops or test_crops)):
        if crops or all_crops or test_crops or dataset is None:
            raise ValueError("--bbox needs --dataset NAME and goes without --crops and --all")
        if bbox is None:
            return [raw_region(config, dataset)]
        return [box_region(config, dataset, bbox)]
    if dataset is not None:
        raise ValueError("--dataset goes with --bbox or alone (its whole raw), not with --crops")
    if test_crops:
        if crops or all_crops:
            raise ValueError("--crops test goes alone: without other crops and --all")
        return manifest_regions(config, manifest=manifest, spec=spec, rows=rows)
    return crop_regions(
        config, crops=crops, all_crops=all_crops, spec=spec, rows=rows, manifest=manifest
    )


def check_free(
    output: str | os.PathLike[str],
    regions: Sequence[Region],
    *,
    overwrite: bool,
    inputs: InputStores | None = None,
) -> None:
    """Refuse, before any work, output on S3 or inside an input store, and existing output
    unless `overwrite` is given and csc predict wrote it. csc predict's own output passes
    without `overwrite` too: `write_region` keeps it if it is this run's (same weights and
    settings: nothing to do) and refuses it otherwise."""
    if is_s3(str(output)):
        raise ValueError(f"--output {output}: csc writes predictions to a local folder")
    targets = [output_path(output, region) for region in regions]
    if inputs is not None:
        inputs.check_outside(targets)
    if not overwrite:
        targets = [t for t in targets if not is_csc_output(t, PREDICT)]
    check_targets(targets, PREDICT, overwrite=overwrite)


def write_predictions(
    config: TrainConfig,
    regions: Sequence[Region],
    predictor: Predictor,
    *,
    output: str | os.PathLike[str],
    encoding: str | None = None,
    overwrite: bool = False,
) -> list[Written]:
    """Predict each region into `output` as OME-NGFF zarr. A region's group is written under a
    temporary name and swapped in when complete, replacing (with `overwrite`) only output csc
    predict wrote, and only then."""
    encoding = encoding or config.prediction_encoding
    written = []
    for region in regions:
        grid = OutputGrid.covering(region, _vec(config.target_array_info.scale))
        path = output_path(output, region)
        counts = write_region(
            predictor, region, grid, config, path, encoding=encoding, overwrite=overwrite
        )
        written.append(Written(region, path, grid, counts))
    return written


def write_region(
    predictor: Predictor,
    region: Region,
    grid: OutputGrid,
    config: TrainConfig,
    path: Path,
    *,
    encoding: str,
    overwrite: bool = False,
    place: Dist | None = None,
) -> BlockCounts:
    """Predict one region block by block into its group at `path`, then its pyramid (levels
    averaged 2x, block by block). Under torchrun the blocks are split over the ranks
    (`rank_blocks`), each writing only its own into one staged group shared by all; a block
    is recorded once written, so a rerun of a killed job predicts only the blocks missing.
    The classes' pyramids are split over the ranks too; rank 0 swaps the group in. Ranks wait
    for each other by polling the records, never for long inside a collective (whose timeout
    a rank building a big pyramid would outlast)."""
    place = place or distributed.from_env()
    names = region.classes or predictor.classes
    channels = [predictor.classes.index(name) for name in names]
    total = block_count(grid.shape, predictor.block_shape)
    run = run_record(predictor, region, grid, names, encoding)
    if finished(path, run, overwrite=overwrite):
        return BlockCounts(total, 0, total)
    staging = staging_path(path)
    resumed = distributed.from_main(
        place, lambda: _prepare(staging, predictor, grid, names, encoding=encoding, run=run)
    )
    group = open_group(str(staging), mode="a")
    arrays = [group[name]["s0"] for name in names]
    mine = [
        i
        for i in rank_blocks(total, place)
        if not resumed or not _drop_unverified(staging, i, grid, predictor, arrays, run)
    ]
    shown = predictor.progress and place.enabled and place.is_main
    bar = JobBar(staging, total, region, enabled=shown)
    readers = make_readers(predictor, region, config)
    todo = [block_box(grid.shape, predictor.block_shape, i) for i in mine]
    # One process shows its windows; under torchrun rank 0 shows the whole job's blocks.
    quiet = dataclasses.replace(predictor, progress=predictor.progress and not place.enabled)
    started = time.perf_counter()
    results = zip(mine, predict_blocks(quiet, region, grid, readers, todo), strict=True)
    try:
        for done, (index, (box, values)) in enumerate(results, 1):
            for array, channel in zip(arrays, channels, strict=True):
                array[box] = encode(values[channel], encoding)
            record_block(staging, index, box, run)
            bar.update()
            _test_exit(done)
    except BaseException:
        if not place.enabled and bar.count() == 0:  # nothing to resume: leave nothing behind
            shutil.rmtree(staging, ignore_errors=True)
        raise
    own_s = time.perf_counter() - started

    # Rank 0 swaps the group in once all is built: a rank still waiting then sees it there.
    def swapped() -> bool:
        return _run_digest(path) == run["digest"]

    bar.wait(swapped)
    all_s = time.perf_counter() - started
    for name in names[place.rank :: place.world_size]:  # s0 complete: each rank its classes'
        build_pyramid(staging, name, grid, predictor.block_shape)
    wait_until(lambda: swapped() or all(_pyramid_built(staging, name) for name in names))
    if place.is_main:
        shutil.rmtree(staging / BLOCKS_DIR)
        swap_in(staging, path, command=PREDICT, overwrite=overwrite)
    wait_until(swapped)
    predicted = int(distributed.reduce_sum(place, torch.tensor([len(mine)]))[0])
    if "RANK" in os.environ:  # under torchrun: each rank's share, time and memory
        print(
            f"csc predict: rank {place.rank} of {place.world_size}: {region.dataset}/"
            f"{region.name}: {len(mine)} blocks in {own_s:.2f} s, all ranks' blocks in "
            f"{all_s:.2f} s, peak RSS {peak_rss_mib():.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    return BlockCounts(total, predicted, total - predicted)


def wait_until(
    condition: Callable[[], bool],
    *,
    poll_s: float = 0.5,
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Poll `condition` (records other ranks write) until it holds. A rank that dies ends the
    job through torchrun, so this needs no timeout."""
    while not condition():
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)


def block_count(shape: Sequence[int], block: Sequence[int]) -> int:
    """How many blocks `blocks(shape, block)` gives."""
    return math.prod(-(-n // b) for n, b in zip(shape, block, strict=True))


def block_box(shape: Sequence[int], block: Sequence[int], index: int) -> tuple[slice, ...]:
    """The `index`-th block of `blocks(shape, block)` ((z, y, x) order), without listing them
    (a whole dataset has hundreds of thousands)."""
    counts = [-(-n // b) for n, b in zip(shape, block, strict=True)]
    corner = np.unravel_index(index, counts)
    return tuple(
        slice(int(c) * b, min((int(c) + 1) * b, n))
        for c, b, n in zip(corner, block, shape, strict=True)
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB: VmHWM where there is one, since Linux
    carries ru_maxrss over fork and exec (a rank would report torchrun's peak)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclasses.dataclass(frozen=True)
class BlockCounts:
    """A region's blocks: in all, predicted by this run, and already recorded (a resumed or
    finished run's)."""

    total: int
    predicted: int
    recorded: int


def rank_blocks(count: int, place: Dist) -> list[int]:
    """The block numbers (in `blocks` order) this rank predicts: every world_size-th from its
    rank on. Deterministic, so a rerun with as many ranks assigns the same; neighbouring
    blocks go to different ranks, so a region's slow part (denser windows) is shared."""
    return list(range(place.rank, count, place.world_size))


def chunk_shape(grid_shape: Sequence[int], block_shape: Sequence[int]) -> tuple[int, int, int]:
    """Output chunks (z, y, x voxels) that tile every block exactly, so ranks writing
    different blocks never write one chunk: the axis itself when one block spans it (at most
    CHUNK), the block's side when it is at most CHUNK, else the largest divisor of the side
    up to CHUNK; a side with none from CHUNK / 4 up (e.g. 97) is refused."""
    edges = []
    for n, b in zip(grid_shape, block_shape, strict=True):
        if n <= b:
            edges.append(min(CHUNK, n))
        elif b <= CHUNK:
            edges.append(b)
        else:
            edge = next(c for c in range(CHUNK, 0, -1) if b % c == 0)
            if edge < CHUNK // 4:
                raise ValueError(
                    f"prediction_block_shape {tuple(block_shape)}: a side of {b} voxels splits "
                    f"into no output chunks of {CHUNK // 4} to {CHUNK} voxels; choose sides "
                    f"that are multiples of {CHUNK} (or at most {CHUNK})"
                )
            edges.append(edge)
    return _ints(edges)


# --- Resumable output: run record, block records ---------------------------------------------

RUN_KEY = "csc_run"  # the staged and the finished group's attribute: what this output is of
BLOCKS_DIR = ".csc-blocks"  # in the staged group: one {n}.json per block written
EXIT_AFTER_ENV = "CSC_PREDICT_EXIT_AFTER_BLOCKS"  # tests: a rank dies after K blocks


def run_record(
    predictor: Predictor, region: Region, grid: OutputGrid, names: Sequence[str], encoding: str
) -> dict[str, Any]:
    """What decides every output voxel: the weights (a digest of their bytes), the windows
    (patch shapes and scales, overlap), the grid, the classes and their encoding, and the
    raw read; with `digest`, a hash of it all. Outputs with one digest are byte-identical."""
    specs = [
        [list(s.input.shape), list(s.input.scale), list(s.target.shape), list(s.target.scale)]
        for s in predictor.specs
    ]
    record: dict[str, Any] = {
        "weights": weights_digest(predictor.model),
        "checkpoint": predictor.checkpoint,
        "raw": region.raw_group,
        "classes": list(names),
        "encoding": encoding,
        "overlap": predictor.overlap,
        "specs": specs,
        "shape": list(grid.shape),
        "scale": list(grid.scale),
        "translation": list(grid.translation),
        "block_shape": list(predictor.block_shape),
        "precision": predictor.precision,
        "raw_transform": _stable_repr(predictor.raw_transform),
    }
    text = json.dumps({k: v for k, v in record.items() if k != "checkpoint"}, sort_keys=True)
    record["digest"] = hashlib.sha256(text.encode()).hexdigest()
    return record


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's state (names, shapes, dtypes and bytes), in its order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _stable_repr(value: Any) -> str | None:
    """A transform's repr without memory addresses (which differ between runs)."""
    return None if value is None else re.sub(r" at 0x[0-9a-f]+", "", repr(value))


def staging_path(path: Path) -> Path:
    """Where a region's group is written until complete: .{crop}.partial beside it, one name
    for every rank and every rerun (csc.storage's clean_stale leaves it: no process id)."""
    return path.parent / f".{path.name}.partial"


def finished(path: Path, run: dict[str, Any], *, overwrite: bool) -> bool:
    """Whether `path` holds this run's complete output (its run record's digest), so there is
    nothing to do; without `overwrite`, other existing output is refused (`check_free` let
    csc predict's own through to be compared here)."""
    if not (path.exists() or path.is_symlink()):
        return False
    same = is_csc_output(path, PREDICT) and _run_digest(path) == run["digest"]
    if overwrite:
        check_replaceable(path, PREDICT, overwrite=True)
        return False
    if same:
        return True
    raise FileExistsError(
        f"{path} already exists, predicted by another run (other weights or settings than "
        "these); pass --overwrite to replace it"
    )


def _run_digest(path: Path) -> str | None:
    try:
        attrs = json.loads((path / ".zattrs").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = attrs.get(RUN_KEY) if isinstance(attrs, dict) else None
    return record.get("digest") if isinstance(record, dict) else None


def _prepare(
    staging: Path,
    predictor: Predictor,
    grid: OutputGrid,
    names: Sequence[str],
    *,
    encoding: str,
    run: dict[str, Any],
) -> bool:
    """The staged group, ready for every rank's blocks (rank 0 alone runs this): kept when an
    earlier run with this digest left it (True: resume), else made anew; a staged group of
    another run is csc's own unfinished output and is removed. What killed writes of other
    kinds left beside the real group (.partial-PID, .replaced-PID) is tidied first."""
    clean_stale(staging.parent / staging.name.removeprefix(".").removesuffix(".partial"))
    if staging.is_dir() and not staging.is_symlink():
        if is_csc_output(staging, PREDICT) and _run_digest(staging) == run["digest"]:
            return True
        if is_csc_output(staging, PREDICT):
            shutil.rmtree(staging)
        else:
            raise FileExistsError(
                f"{staging} exists and csc predict did not write it; move it away yourself"
            )
    staging.parent.mkdir(parents=True, exist_ok=True)
    group = open_group(str(staging.parent), mode="a").require_group(staging.name)
    _create_arrays(group, predictor, grid, names, encoding=encoding)
    (staging / BLOCKS_DIR).mkdir()
    group.attrs[RUN_KEY] = run
    mark_csc_output(staging, PREDICT)  # last: a group with the marker and run is usable
    return False


def record_block(staging: Path, index: int, box: tuple[slice, ...], run: dict[str, Any]) -> None:
    """Note that block `index` (voxels `box`) is written: after its chunks, atomically."""
    record = {"block": index, "box": _box_list(box), "run": run["digest"], "rank": _rank()}
    write_text_atomic(staging / BLOCKS_DIR / f"{index}.json", json.dumps(record))


def block_recorded(
    staging: Path, index: int, box: tuple[slice, ...], arrays: Sequence[Any], run: dict[str, Any]
) -> bool:
    """Whether block `index` was written by this run: its record names this run's digest and
    the block's voxels, and every chunk of the block is stored in every class's s0 (chunks
    are written before the record, all zero ones too)."""
    try:
        record = json.loads((staging / BLOCKS_DIR / f"{index}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    if record.get("run") != run["digest"] or record.get("box") != _box_list(box):
        return False
    return all(_chunks_stored(array, box) for array in arrays)


def _drop_unverified(
    staging: Path,
    index: int,
    grid: OutputGrid,
    predictor: Predictor,
    arrays: Sequence[Any],
    run: dict[str, Any],
) -> bool:
    """True when block `index` is recorded and verified (skip it); else its record, if any,
    is removed and False (predict it)."""
    box = block_box(grid.shape, predictor.block_shape, index)
    if block_recorded(staging, index, box, arrays, run):
        return True
    (staging / BLOCKS_DIR / f"{index}.json").unlink(missing_ok=True)
    return False


def _chunks_stored(array: Any, box: tuple[slice, ...]) -> bool:
    """Every chunk file of `box` of the local s0 `array` exists (nested keys z/y/x)."""
    folder = Path(str(array.store.root)) / array.path
    ranges = [
        range(part.start // c, -(-part.stop // c))
        for part, c in zip(box, array.chunks, strict=True)
    ]
    return all((folder / "/".join(map(str, key))).is_file() for key in itertools.product(*ranges))


def _box_list(box: tuple[slice, ...]) -> list[list[int]]:
    return [[int(part.start), int(part.stop)] for part in box]


def _rank() -> int:
    return distributed.from_env().rank


def _test_exit(done: int) -> None:
    """Tests of resumption: with CSC_PREDICT_EXIT_AFTER_BLOCKS=K every rank, with =R:K rank R
    alone, dies (no cleanup, as if killed) once it has written K blocks."""
    setting = os.environ.get(EXIT_AFTER_ENV, "").strip()
    if not setting:
        return
    rank, _, limit = setting.rpartition(":")
    if (not rank or int(rank) == _rank()) and done >= int(limit):
        os._exit(17)


class JobBar:
    """The whole job's progress in blocks of a region (rank 0, under torchrun): the blocks
    recorded by every rank, counted from the records in the staged group."""

    def __init__(self, staging: Path, total: int, region: Region, *, enabled: bool) -> None:
        self.folder = staging / BLOCKS_DIR
        self.total = total
        self.bar = tqdm(
            total=total,
            initial=self.count(),
            desc=f"{region.dataset}/{region.name}",
            unit="block",
            disable=None if enabled else True,
        )

    def count(self) -> int:
        try:
            return sum(1 for entry in os.scandir(self.folder) if entry.name.endswith(".json"))
        except FileNotFoundError:  # rank 0 removed the records: every block was written
            return self.total

    def update(self) -> None:
        self.bar.n = self.count()
        self.bar.refresh()

    def wait(self, swapped: Callable[[], bool]) -> None:
        """Until every block is recorded, or the group was swapped in (all done)."""
        wait_until(lambda: self.count() >= self.total or swapped(), on_poll=self.update)
        self.bar.n = self.total
        self.bar.close()


def build_pyramid(staging: Path, name: str, grid: OutputGrid, block_shape: Sequence[int]) -> None:
    """Levels s1, ... of class `name` from its complete s0, unless a record says they were
    built (levels a killed run left half-built are removed first); then that record."""
    if _pyramid_built(staging, name):
        return
    for level in range(1, pyramid_levels(grid.shape)):
        shutil.rmtree(staging / name / f"s{level}", ignore_errors=True)
    write_pyramid(
        open_group(str(staging / name), mode="a"),
        pyramid_levels(grid.shape),
        method="mean",
        block_shape=block_shape,
    )
    write_text_atomic(staging / BLOCKS_DIR / f"pyramid-{name}.done", "")


def _pyramid_built(staging: Path, name: str) -> bool:
    return (staging / BLOCKS_DIR / f"pyramid-{name}.done").is_file()


def _create_arrays(
    group: Any, predictor: Predictor, grid: OutputGrid, names: Sequence[str], *, encoding: str
) -> list[Any]:
    """One class group per class of `names`, OME-NGFF 0.4 listing levels s0 .. (the pyramid
    `pyramid_levels` gives the grid), and its empty s0 in chunks that tile the blocks."""
    chunks = chunk_shape(grid.shape, predictor.block_shape)
    levels = level_transforms(grid.scale, grid.translation, pyramid_levels(grid.shape))
    arrays = []
    for name in names:
        child = group.require_group(name)
        child.attrs.update(multiscales_attrs(name, levels))
        child.attrs["csc_prediction"] = {
            "class": name,
            "encoding": encoding,
            "checkpoint": predictor.checkpoint,
            "orthoplanes": len(predictor.specs) > 1,
            "overlap": predictor.overlap,
        }
        arrays.append(
            create_array(
                child,
                "s0",
                shape=grid.shape,
                chunks=chunks,
                dtype=encoding,
                compressor="zstd",
                write_empty_chunks=True,
            )
        )
    return arrays


def _ints(values: Sequence[Any] | np.ndarray) -> tuple[int, int, int]:
    return (int(values[0]), int(values[1]), int(values[2]))


def _vec(values: Sequence[Any] | np.ndarray) -> Vec3:
    return (float(values[0]), float(values[1]), float(values[2]))
