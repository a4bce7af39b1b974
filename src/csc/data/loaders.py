"""From a config and its datasplit to torch DataLoaders: crops, datasets, sampler, workers."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from csc.config import TrainConfig
from csc.data.datasets import (
    Crop,
    EpochSampler,
    PatchSpec,
    TrainPatches,
    ValidationTiles,
    collate,
    crop_probabilities,
)
from csc.data.device import DeviceLoader, use_device_transforms
from csc.data.sources import DataWarning
from csc.datasplit import DatasplitRow, read_datasplit, s3_options
from csc.manifests.classes import exclusions
from csc.storage import (
    ArraySource,
    MetadataReader,
    S3Options,
    any_chunk_stored,
    count_foreground,
    is_s3,
    tensorstore_used_here,
    thread_map,
    write_text_atomic,
)

# DataLoader arguments csc sets itself; a config's dataloader_kwargs may not override them.
OWN_LOADER_ARGS = (
    "dataset",
    "batch_size",
    "shuffle",
    "sampler",
    "batch_sampler",
    "collate_fn",
    "drop_last",
)
WORKER_ONLY_ARGS = ("prefetch_factor", "persistent_workers", "multiprocessing_context")


# --- Crops from datasplit rows -------------------------------------------------------------


def load_crops(
    rows: Sequence[DatasplitRow],
    classes: Sequence[str],
    spec: PatchSpec,
    *,
    endpoint_url: str | None = None,
    s3: S3Options | None = None,
) -> list[Crop]:
    """Resolve rows into crops from metadata only (no array data), reading concurrently."""
    roots = [root for row in rows for root in (row.raw_root, row.gt_root)]
    readers = _readers(roots, s3=s3 or S3Options(endpoint_url=endpoint_url))
    raw_scale, label_scale = spec.input.scale, spec.target.scale

    def source(group: str, scale: tuple[float, float, float], *, label: bool) -> ArraySource:
        return readers[is_s3(group)].source(group, scale, label=label)

    def resolve(row: DatasplitRow) -> Crop:
        raw = source(f"{row.raw_root}/{row.raw_path}", raw_scale, label=False)
        labels = tuple(
            source(f"{row.gt_root}/{row.gt_path}/{name}", label_scale, label=True)
            if name in row.classes
            else None
            for name in classes
        )
        present = [label for label in labels if label is not None]
        if not present:
            raise ValueError(
                f"crop {row.dataset}/{row.crop} annotates none of {', '.join(classes)}"
            )
        bounds = [label.level.bounds() for label in present]
        low = np.min([b[0] for b in bounds], axis=0)
        high = np.max([b[1] for b in bounds], axis=0)
        return Crop(f"{row.dataset}/{row.crop}", raw, labels, _vec(low), _vec(high))

    return thread_map(resolve, list(rows))


def _readers(urls: Sequence[str], *, s3: S3Options) -> dict[bool, MetadataReader]:
    """One metadata reader per kind of location (S3 or not): raw and labels may differ."""
    kinds = {is_s3(url): url for url in urls}  # a location of each kind
    return {remote: MetadataReader(url, s3=s3) for remote, url in kinds.items()}


def _vec(values: np.ndarray) -> tuple[float, float, float]:
    return (float(values[0]), float(values[1]), float(values[2]))


# --- Chunks missing where data should be ---------------------------------------------------

MAX_NAMED_CROPS = 5  # crops spelled out in one refusal


def check_crops(
    crops: Sequence[Crop],
    spec: PatchSpec,
    *,
    datasplit: str,
    labels: bool = True,
    s3: S3Options | None = None,
) -> None:
    """Before any voxel is read: refuse crops whose raw stores no chunk where their patches
    read (they would train on the fill value, zeros), and warn once per label array whose
    CellMap metadata counts foreground that its missing chunks cannot hold. Chunk keys are
    asked for, not data (`any_chunk_stored`): about one request per crop."""
    urls = [source.url for crop in crops for source in (crop.raw, *crop.labels) if source]
    readers = _readers(urls, s3=s3 or S3Options())

    def raw_stored(crop: Crop) -> bool:
        start, stop = raw_box(crop, spec)
        return any_chunk_stored(readers[is_s3(crop.raw.url)], crop.raw, start, stop)

    empty = [
        crop for crop, ok in zip(crops, thread_map(raw_stored, list(crops)), strict=True) if not ok
    ]
    if empty:
        raise ValueError(_empty_raw_message(empty, spec, datasplit))
    if labels:
        unique = {label.url: label for crop in crops for label in crop.labels if label}
        for label in thread_map(
            lambda lab: _label_disagrees(readers[is_s3(lab.url)], lab), list(unique.values())
        ):
            if label is not None:
                warnings.warn(_missing_labels_message(label), DataWarning, stacklevel=2)


def raw_box(crop: Crop, spec: PatchSpec) -> tuple[list[int], list[int]]:
    """The raw voxels (start, stop; (z, y, x), of the raw's level) that a patch centred in
    `crop` can read: its annotated region widened by half the input patch's diagonal (any
    rotation), and a voxel more for interpolation."""
    level = crop.raw.level
    scale, origin = np.asarray(level.scale), np.asarray(level.translation)
    half = (np.asarray(spec.input.shape) - 1) / 2 * np.asarray(spec.input.scale)  # nm
    reach = float(np.linalg.norm(half)) / scale  # raw voxels
    low = np.floor((np.asarray(crop.low) - origin) / scale + 0.5 - reach) - 1
    high = np.ceil((np.asarray(crop.high) - origin) / scale - 0.5 + reach) + 2
    return [int(v) for v in low], [int(v) for v in high]


def _empty_raw_message(crops: Sequence[Crop], spec: PatchSpec, datasplit: str) -> str:
    named = []
    for crop in crops[:MAX_NAMED_CROPS]:
        start, stop = raw_box(crop, spec)
        named.append(f"{crop.name} (raw {crop.raw.url}, voxels {tuple(start)} to {tuple(stop)})")
    more = f" and {len(crops) - MAX_NAMED_CROPS} more" if len(crops) > MAX_NAMED_CROPS else ""
    return (
        f"no raw chunk is stored where the patches of crop {', '.join(named)}{more} read, so "
        "they would train on the fill value (zeros): check that the raw was copied completely "
        f"and the datasplit points at the right array, or remove those rows from {datasplit}"
    )


def _label_disagrees(reader: MetadataReader, label: ArraySource) -> ArraySource | None:
    """`label` when its CellMap metadata counts foreground voxels but no chunk of it is
    stored, so that it reads as its fill value everywhere, which says otherwise."""
    assert label.chunking is not None
    fill = label.chunking.fill_value
    implied = 0 if fill in (label.absent, label.unknown) else math.prod(label.level.shape)
    if label.foreground is None or label.foreground == implied:
        return None  # no count to hold it against, or the count agrees with a missing array
    return None if any_chunk_stored(reader, label, (0, 0, 0), label.level.shape) else label


def _missing_labels_message(label: ArraySource) -> str:
    assert label.chunking is not None
    fill = label.chunking.fill_value
    meanings: dict[float | None, str] = {label.absent: "background", label.unknown: "not annotated"}
    reads = meanings.get(fill, "foreground")
    return (
        f"{label.url}: its CellMap metadata (complement_counts) counts {label.foreground} "
        f"foreground voxels, but no chunk of it is stored, so it reads as {fill:g} ({reads}) "
        "everywhere; check that the labels were copied completely (csc trains on what it reads)"
    )


# --- Foreground counts for the weighted sampler --------------------------------------------


def cache_dir() -> Path:
    """Where csc caches what it computed about the data: $CSC_CACHE_DIR or ~/.cache/csc."""
    if os.environ.get("CSC_CACHE_DIR"):
        return Path(os.environ["CSC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "csc"


def fill_foreground(crops: Sequence[Crop], *, endpoint_url: str | None = None) -> list[Crop]:
    """Crops whose label sources all know their foreground voxels: from CellMap's
    complement_counts metadata, else counted once and cached in `cache_dir()` (never in the
    user's data)."""
    missing = {lab.url: lab for c in crops for lab in c.labels if lab and lab.foreground is None}
    if not missing:
        return list(crops)
    path = cache_dir() / "foreground-counts.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    for url, label in sorted(missing.items()):
        entry = cache.get(url)
        if entry is None or entry.get("shape") != list(label.level.shape):
            count = count_foreground(
                label.url,
                absent=label.absent,
                unknown=label.unknown,
                s3=label.s3 or S3Options(endpoint_url=endpoint_url),
            )
            cache[url] = {"shape": list(label.level.shape), "foreground": count}
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a concurrent reader sees the old or the new file
    write_text_atomic(path, json.dumps(cache, indent=1, sort_keys=True))

    def counted(label: ArraySource | None) -> ArraySource | None:
        if label is None or label.foreground is not None:
            return label
        return dataclasses.replace(label, foreground=int(cache[label.url]["foreground"]))

    return [
        dataclasses.replace(crop, labels=tuple(counted(lab) for lab in crop.labels))
        for crop in crops
    ]


# --- Datasets and loaders from a config ----------------------------------------------------


@dataclasses.dataclass
class Loaders:
    """The training loader (exactly `iterations_per_epoch` batches per epoch) and validation."""

    train: torch.utils.data.DataLoader[Any]
    validate: torch.utils.data.DataLoader[Any] | None
    sampler: EpochSampler


def read_crops(
    config: TrainConfig,
    rows: Sequence[DatasplitRow] | None = None,
    *,
    spec: PatchSpec | None = None,
) -> tuple[list[Crop], list[Crop]]:
    """The training and validation crops of a config (rows default to its datasplit CSV, the
    spec to `PatchSpec.from_config`), from their metadata and, for the weighted sampler,
    foreground counts."""
    rows = read_datasplit(config.datasplit_path) if rows is None else rows
    spec = spec or PatchSpec.from_config(config)
    crops = load_crops(rows, config.classes, spec, s3=s3_options(config))
    # Before any voxel is read (on rank 0 under torchrun, which shares the crops).
    check_crops(crops, spec, datasplit=str(config.datasplit_path), s3=s3_options(config))
    train = [c for c, r in zip(crops, rows, strict=True) if r.usage == "train"]
    validate = [c for c, r in zip(crops, rows, strict=True) if r.usage == "validate"]
    if not train:
        raise ValueError(
            f"{config.datasplit_path} has no 'train' crops; rebuild it (csc datasplit) or lower "
            "validation_prob"
        )
    if config.weighted_sampler:
        train = fill_foreground(train)
    return train, validate


def build_datasets(
    config: TrainConfig,
    rows: Sequence[DatasplitRow] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    crops: tuple[list[Crop], list[Crop]] | None = None,
    spec: PatchSpec | None = None,
    device_type: str = "cpu",
) -> tuple[TrainPatches, ValidationTiles | None]:
    """The training and validation datasets of a config (rows default to its datasplit CSV;
    `crops`, from `read_crops`, skip reading metadata); under torchrun, validation holds this
    rank's share of the tiles. The training set ships boxes when spatial transforms run on
    the device batches go to (`csc.data.device`)."""
    spec = spec or PatchSpec.from_config(config)
    train, validate = read_crops(config, rows, spec=spec) if crops is None else crops
    common = {
        "chunk_cache_mb": config.chunk_cache_mb,
        "crop_cache_mb": config.crop_cache_mb,
        "target_transform": config.target_value_transforms,
        "exclusions": exclusions(config.classes) if config.use_mutual_exclusion else None,
    }
    train_set = TrainPatches(
        train,
        spec,
        num_samples=config.iterations_per_epoch * config.batch_size,
        seed=config.random_seed,
        spatial_transforms=config.spatial_transforms,
        probabilities=crop_probabilities(
            train, weighted=config.weighted_sampler, classes=config.classes
        ),
        raw_transform=config.train_raw_value_transforms,
        on_device=use_device_transforms(config, device_type, train),
        **common,
    )
    validate_set = None
    if validate:
        limit = None
        if config.validation_time_limit is not None:  # wins over a batch limit
            limit = sys.maxsize  # every tile, in a seeded order: time cuts the same prefix
        elif config.validation_batch_limit is not None:
            limit = config.validation_batch_limit * config.batch_size
        validate_set = ValidationTiles(
            validate,
            spec,
            limit=limit,
            seed=config.random_seed,
            rank=rank,
            world_size=world_size,
            raw_transform=config.val_raw_value_transforms,
            **common,
        )
    return train_set, validate_set


def build_loaders(
    config: TrainConfig,
    rows: Sequence[DatasplitRow] | None = None,
    *,
    start_epoch: int = 1,
    rank: int = 0,
    world_size: int = 1,
    device_type: str = "cpu",
    processes_per_machine: int = 1,
    crops: tuple[list[Crop], list[Crop]] | None = None,
    spec: PatchSpec | None = None,
) -> Loaders:
    """DataLoaders for a config: an epoch of the training loader is exactly
    `iterations_per_epoch` batches of `batch_size` (per rank under torchrun); validation tiles
    come in a fixed order. Worker defaults depend on the device the batches go to and on how
    many training processes share this machine's cores."""
    train_set, validate_set = build_datasets(
        config,
        rows,
        rank=rank,
        world_size=world_size,
        crops=crops,
        spec=spec,
        device_type=device_type,
    )
    sampler = EpochSampler(
        train_set.num_samples, start_epoch=start_epoch, rank=rank, world_size=world_size
    )
    defaults = default_loader_kwargs(device_type, processes_per_machine=processes_per_machine)
    kwargs = loader_kwargs({**defaults, **config.dataloader_kwargs})
    train: torch.utils.data.DataLoader[Any]
    if train_set.on_device:  # batches of boxes, resampled on the device as they come out
        train = DeviceLoader(
            train_set,
            batch_size=config.batch_size,
            sampler=sampler,
            collate_fn=collate,
            device_type=device_type,
            **kwargs,
        )
    else:
        train = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collate, **kwargs
        )
    validate = None
    if validate_set is not None:
        validate = torch.utils.data.DataLoader(
            validate_set, batch_size=config.batch_size, shuffle=False, collate_fn=collate, **kwargs
        )
    return Loaders(train, validate, sampler)


def default_loader_kwargs(
    device_type: str, *, processes_per_machine: int = 1, cpu_count: int | None = None
) -> dict[str, Any]:
    """Loader settings for a config that leaves them out. Feeding a GPU: worker processes (all
    of this process's share of the cores but one, up to 8), 4 batches prefetched each, pinned
    memory. Training on the CPU: the model step needs the cores itself, so patches are read in
    the training process (tensorstore still reads on its own threads) unless there are 8+
    cores per process to spare."""
    cores = max(1, (cpu_count or os.cpu_count() or 1) // max(processes_per_machine, 1))
    if device_type == "cuda":
        workers = min(8, cores - 1)
        extra = {"prefetch_factor": 4} if workers else {}
        return {"num_workers": workers, "pin_memory": True, **extra}
    return {"num_workers": 0 if cores < 8 else min(4, cores // 4)}


def loader_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The config's dataloader_kwargs for torch's DataLoader, checked, with csc's defaults."""
    taken = sorted(set(options) & set(OWN_LOADER_ARGS))
    if taken:
        raise ValueError(
            f"dataloader_kwargs may not set {', '.join(taken)}: csc sets them from batch_size, "
            "iterations_per_epoch and the datasplit"
        )
    kwargs = dict(options)
    if not kwargs.get("num_workers"):
        for name in WORKER_ONLY_ARGS:  # meaningless without workers; torch would refuse them
            kwargs.pop(name, None)
        return kwargs
    # Workers that live across epochs keep their open stores and chunk caches; restarting them
    # every epoch cost more than they gained (measured: benchmarks/data_loader.py).
    kwargs.setdefault("persistent_workers", True)
    if "multiprocessing_context" not in kwargs and tensorstore_used_here():
        # A fork of a process that has used tensorstore aborts; start workers fresh instead.
        kwargs["multiprocessing_context"] = "spawn"
    return kwargs


T = TypeVar("T")
PREFETCH_POLL_S = 0.1  # how often a reader blocked on a full queue checks for `close`


class Prefetched(Generic[T]):
    """The items of `items`, `depth` of them read ahead in a thread while the caller works on
    the current one. The training loop reads its batches so when the loader has no worker
    processes (num_workers = 0): reading and transforming the next batch (tensorstore and
    numpy release the GIL) then overlaps the model's step instead of adding to it. The
    values are unchanged: a patch is a function of (seed, epoch, index), not of when it is
    read. An error raised while reading is raised by `__next__`; `close` stops the thread
    (what it read ahead is dropped)."""

    def __init__(self, items: Iterator[T], depth: int = 1) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._fill, args=(items,), name="csc-prefetch", daemon=True
        )
        self._thread.start()

    def _fill(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
        except BaseException as error:  # raised in the caller's thread by __next__
            self._put(("error", error))
            return
        self._put(("end", None))

    def _put(self, entry: tuple[str, Any]) -> bool:
        """Queue `entry`; False once `close` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=PREFETCH_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetched[T]:
        return self

    def __next__(self) -> T:
        kind, value = self._queue.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        item: T = value
        return item

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (at most one item's reading)."""
        self._stop.set()
        self._thread.join()


def batches_of(loader: torch.utils.data.DataLoader[Any]) -> Prefetched[Any] | Iterator[Any]:
    """The training loop's iterator over `loader`: read ahead in a thread (`Prefetched`) when
    the loader has no worker processes (which read ahead themselves). A `DeviceLoader` is
    read in the caller's thread: its resampling runs on the caller's GPU (CUDA's current
    device is per thread)."""
    if loader.num_workers == 0 and not isinstance(loader, DeviceLoader):
        return Prefetched(iter(loader))
    return iter(loader)


def close_batches(batches: Prefetched[Any] | Iterator[Any]) -> None:
    """Stop a `batches_of` iterator's reading ahead (nothing to do without a thread)."""
    if isinstance(batches, Prefetched):
        batches.close()
