"""`csc process`: the config's `process_func` applied block by block to predictions
(docs/prediction.md), e.g. a threshold or connected components, into a new OME-NGFF store.

`process_func(probabilities) -> array` gets one class's probabilities as float32 in [0, 1],
(Z, Y, X), one block (`prediction_block_shape`) at a time, and returns an array of the same
shape (any numeric or bool dtype; bool is stored as uint8). With ``process_input = "logits"``
it gets their logits instead, log(p / (1 - p)) (-inf and inf at 0 and 1), which is what the
challenge toolkit's process_func gets: the toolkit stores the model's raw outputs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from csc.config import TrainConfig, load_config
from csc.datasplit import crop_matches, input_stores
from csc.storage import blocks, check_targets, create_array, open_group, staged_group

PROCESS_FUNC_HINT = (
    "set process_func in the config: a function of one class's probabilities (float32 in "
    "[0, 1], (Z, Y, X)) returning an array of the same shape, e.g. "
    "process_func = lambda p: (p > 0.5).astype('uint8')"
)
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
    """Apply `process_func` to every predicted crop (or those matching `crops`, crop or
    dataset/crop globs) of `source` (default: predictions_path) into `output` (default:
    processed_path), with the same layout, voxel size and translation."""
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    if config.process_func is None:
        raise ValueError(PROCESS_FUNC_HINT)
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
                    progress=progress,
                    logits=config.process_input == "logits",
                )
    return targets


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
    function: Callable[..., Any],
    *,
    block_shape: tuple[int, int, int],
    progress: bool = True,
    logits: bool = False,
) -> None:
    """One class group: `function` over the probabilities (or, with `logits`, their logits)
    of `source`/s0 block by block into `group`/`name`/s0, with the source's OME-NGFF
    metadata."""
    stored = open_group(str(source), mode="r")
    array = stored["s0"]
    attrs = dict(stored.attrs)
    scale = 255.0 if array.dtype == np.uint8 else 1.0  # uint8 holds round(p * 255)
    child = group.require_group(name)
    child.attrs.update({key: value for key, value in attrs.items() if key != "csc_prediction"})
    child.attrs["csc_processed"] = {"source": str(source), "function": _describe(function)}
    out = None
    parts = list(blocks(array.shape, block_shape))
    for box in tqdm(
        parts, desc=f"{source.parent.name}/{name}", unit="block", disable=None if progress else True
    ):
        values = np.asarray(array[box], dtype=np.float32) / np.float32(scale)
        if logits:
            values = to_logits(values)
        result = np.asarray(function(values))
        _check_result(result, values, function)
        if result.dtype == bool:
            result = result.astype(np.uint8)
        if out is None:
            out = create_array(
                child,
                "s0",
                shape=array.shape,
                chunks=array.chunks,
                dtype=result.dtype,
                compressor="zstd",
            )
        out[box] = result


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
