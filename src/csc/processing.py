"""`csc process`: predictions to labels, into a new OME-NGFF store (docs/prediction.md).

The config's `process_func` says how: unset or a name (csc.registries.PROCESS_FUNCS) runs one
of csc's own methods (csc.labelling): "instances", the default, gives instance classes
(csc.config.INSTANCE_CLASSES) ids consistent over the whole crop and semantic classes p >
process_threshold; "threshold" thresholds every class; "watershed" also splits touching objects.

A callable, `process_func(probabilities) -> array`, gets one class's probabilities as float32
in [0, 1], (Z, Y, X), one block (`prediction_block_shape`) at a time, and returns an array of
the same shape (any numeric or bool dtype; bool is stored as uint8). With ``process_input =
"logits"`` it gets their logits instead, log(p / (1 - p)) (-inf and inf at 0 and 1), which is
what the challenge toolkit's process_func gets: the toolkit stores the model's raw outputs. The
integer ids (any integer dtype but uint8) it returns for an instance class are made consistent
across blocks: offset per block, then merged where they touch across a block face.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from csc.config import INSTANCE_CLASSES, TrainConfig, load_config
from csc.datasplit import crop_matches, input_stores
from csc.labelling import ID_DTYPE, ClassJob, ProcessOptions, stitch_blocks
from csc.registries import PROCESS_FUNCS, resolve
from csc.storage import (
    Level,
    blocks,
    check_targets,
    create_array,
    image_label_attrs,
    level_transforms,
    multiscales_attrs,
    open_group,
    parse_multiscales,
    pyramid_levels,
    staged_group,
    write_pyramid,
)

DEFAULT_PROCESS_FUNC = "instances"  # what an unset process_func runs
PROCESS = "process"  # the command named in the csc marker of its output groups


@dataclasses.dataclass(frozen=True)
class PredictedCrop:
    """A crop's prediction group: {root}/{dataset}.zarr/{crop}, one group per class."""

    dataset: str
    crop: str
    path: Path
    classes: tuple[str, ...]


def find_predictions(root: str | os.PathLike[str]) -> list[PredictedCrop]:
    """Every crop group under a `csc predict` output folder."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"no predictions at {base}: run csc predict first, or pass --input")
    found = []
    for store in sorted(base.glob("*.zarr")):
        for crop in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            classes = tuple(sorted(c.name for c in crop.iterdir() if (c / "s0").is_dir()))
            if classes:
                found.append(
                    PredictedCrop(store.name.removesuffix(".zarr"), crop.name, crop, classes)
                )
    if not found:
        raise FileNotFoundError(f"{base} holds no {{dataset}}.zarr/{{crop}}/{{class}}/s0 arrays")
    return found


def process(
    config: TrainConfig | str | os.PathLike[str],
    *,
    source: str | os.PathLike[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    crops: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Apply `process_func` (a callable, or csc's method it names; unset: "instances") to
    every predicted crop (or those matching `crops`, crop or dataset/crop globs) of `source`
    (default: predictions_path) into `output` (default: processed_path), with the same
    layout, voxel size and translation."""
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    names = {"model_name": config.model_name}
    source = source or config.predictions_path.format(**names)
    output = Path(output or config.processed_path.format(**names))
    found = find_predictions(source)
    chosen = [c for c in found if _wanted(c, crops)]
    if not chosen:
        raise ValueError(f"no predicted crop in {source} matches {', '.join(crops)}")
    targets = [output / f"{c.dataset}.zarr" / c.crop for c in chosen]
    input_stores(config).check_outside(targets)
    check_not_source(targets, found, output=output)
    check_targets(targets, PROCESS, overwrite=overwrite)
    for crop, target in zip(chosen, targets, strict=True):
        with staged_group(target, command=PROCESS, overwrite=overwrite) as group:
            for name in crop.classes:
                process_array(
                    crop.path / name,
                    group,
                    name,
                    config.process_func,
                    block_shape=config.prediction_block_shape,
                    options=process_options(config),
                    progress=progress,
                    logits=config.process_input == "logits",
                )
    return targets


def process_options(config: TrainConfig) -> ProcessOptions:
    """The settings of csc's own methods, from the config."""
    return ProcessOptions(
        threshold=config.process_threshold,
        min_instance_size=config.min_instance_size,
        watershed_min_distance=config.watershed_min_distance,
        memory_mb=config.process_memory_mb,
    )


def check_not_source(
    targets: list[Path], sources: list[PredictedCrop], *, output: str | os.PathLike[str]
) -> None:
    """Refuse an output whose groups would be, hold or lie inside the predictions read."""
    for target in targets:
        for source in sources:
            written, read = Path(os.path.realpath(target)), Path(os.path.realpath(source.path))
            if written == read or read in written.parents or written in read.parents:
                raise ValueError(
                    f"--output {output} would write {target} over the predictions it reads "
                    f"({source.path}): choose another --output (or processed_path)"
                )


def _wanted(crop: PredictedCrop, patterns: tuple[str, ...]) -> bool:
    if not patterns:
        return True
    return crop_matches(crop.dataset, crop.crop, patterns)


def process_array(
    source: Path,
    group: Any,
    name: str,
    function: Callable[..., Any] | str | None,
    *,
    block_shape: tuple[int, int, int],
    options: ProcessOptions | None = None,
    progress: bool = True,
    logits: bool = False,
) -> None:
    """One class group: `function` (a callable, a method's name, None for "instances") over
    the probabilities of `source`/s0 into `group`/`name`/s0, then its pyramid (labels: the
    most frequent id of each 2x2x2 block), placed as the source's s0 (OME-NGFF 0.4), OME-NGFF
    label metadata for integer labels, and how it was made (csc_process)."""
    stored = open_group(str(source), mode="r")
    child = group.require_group(name)
    child.attrs.update({k: v for k, v in stored.attrs.items() if k != "csc_prediction"})
    job = class_job(
        stored["s0"],
        child,
        instance=name in INSTANCE_CLASSES,
        block_shape=block_shape,
        options=options or ProcessOptions(),
        desc=f"{source.parent.name}/{name}" if progress else None,
    )
    if callable(function):
        described = apply_callable(job, function, logits=logits)
    else:
        described = resolve(PROCESS_FUNCS[function or DEFAULT_PROCESS_FUNC])(job)
    labels = bool(np.issubdtype(child["s0"].dtype, np.integer))
    s0 = source_s0(stored.attrs, source)
    if s0 is not None:  # a pyramid placed as the source's s0; without metadata, s0 alone
        num_levels = pyramid_levels(child["s0"].shape)
        transforms = level_transforms(s0.scale, s0.translation, num_levels)
        child.attrs.update(multiscales_attrs(name, transforms))
        write_pyramid(
            child, num_levels, method="mode" if labels else "mean", block_shape=block_shape
        )
    if labels:
        child.attrs.update(image_label_attrs())
    child.attrs["csc_process"] = {"source": str(source), **described}


def source_s0(attrs: Any, source: Path) -> Level | None:
    """Level s0 of a prediction group's OME-NGFF ``multiscales`` (None: it has none)."""
    if "multiscales" not in attrs:
        return None
    levels = parse_multiscales(dict(attrs), str(source))
    return next((level for level in levels if level.path == "s0"), levels[0])


def class_job(
    array: Any,
    child: Any,
    *,
    instance: bool,
    block_shape: tuple[int, int, int],
    options: ProcessOptions,
    desc: str | None,
) -> ClassJob:
    """The job of one predicted class `array`: probabilities read by box, the output created
    as `child`/s0 with the same shape and chunks, tqdm over blocks unless `desc` is None."""
    scale = np.float32(255.0 if array.dtype == np.uint8 else 1.0)  # uint8 holds round(p * 255)

    def read(box: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(array[box], dtype=np.float32) / scale

    def create(dtype: Any) -> Any:
        chunks = array.chunks
        return create_array(
            child, "s0", shape=array.shape, chunks=chunks, dtype=dtype, compressor="zstd"
        )

    def progress(boxes: Iterable[tuple[slice, ...]]) -> Iterable[tuple[slice, ...]]:
        return tqdm(boxes, desc=desc, unit="block", disable=True if desc is None else None)

    shape = tuple(array.shape)
    return ClassJob(read, shape, block_shape, create, instance, options, progress)


def apply_callable(job: ClassJob, function: Callable[..., Any], *, logits: bool) -> dict[str, Any]:
    """A user's `function` block by block; integer ids of an instance class made consistent
    over the crop (`csc.labelling.stitch_blocks`)."""
    described = {"method": "callable", "function": _describe(function), "logits": logits}
    boxes = list(blocks(job.shape, job.block_shape))
    first = boxes[0]
    result = _call(function, job.read(first), logits=logits)  # its dtype decides what follows
    if job.instance and _is_ids(result.dtype):
        pending = {_box_key(first): result}

        def label(box: tuple[slice, ...]) -> np.ndarray:
            early = pending.pop(_box_key(box), None)
            return early if early is not None else _call(function, job.read(box), logits=logits)

        out = job.create(ID_DTYPE)
        stitch_blocks(job, out, label, min_size=0)
        return {**described, "ids": "consistent over the crop, stitched across block faces"}
    out = job.create(result.dtype)
    for box in job.progress(boxes):
        out[box] = result if box == first else _call(function, job.read(box), logits=logits)
    return described


def _call(function: Callable[..., Any], values: np.ndarray, *, logits: bool) -> np.ndarray:
    argument = to_logits(values) if logits else values
    result = np.asarray(function(argument))
    _check_result(result, values, function)
    return result.astype(np.uint8) if result.dtype == bool else result


def _is_ids(dtype: np.dtype[Any]) -> bool:
    """Integer results but bool and uint8 (masks, as the toolkit's examples return) are ids."""
    return bool(np.issubdtype(dtype, np.integer)) and dtype != np.uint8


def _box_key(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.start for s in box)


def to_logits(probabilities: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), float32: -inf at 0 and inf at 1, where the stored encoding saturated."""
    with np.errstate(divide="ignore"):
        return (np.log(probabilities) - np.log1p(-probabilities)).astype(np.float32)


def _check_result(result: np.ndarray, values: np.ndarray, function: Callable[..., Any]) -> None:
    if result.shape != values.shape:
        raise ValueError(
            f"process_func {_describe(function)} returned shape {result.shape} for a block of "
            f"{values.shape}; it must return an array of the same shape"
        )
    if not (np.issubdtype(result.dtype, np.number) or result.dtype == bool):
        raise ValueError(f"process_func {_describe(function)} returned dtype {result.dtype}")


def _describe(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or repr(function)
