"""Score saved predictions against ground-truth crops: `csc evaluate`.

Predictions are the stores `csc predict` writes, ``{PATH}/{dataset}.zarr/{crop}/{class}/s0``,
probabilities as uint8 (``round(p * 255)``) or float16. Each class of each crop is compared on
the ground truth's own voxel grid (its finest level): every ground-truth voxel takes the value of
the prediction voxel nearest to its centre in world coordinates (nm, (z, y, x)). Scores are the
training validation's (`csc.metrics`) plus a 95th-percentile Hausdorff distance in nm. The
rules are in docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from csc.datasplit import DatasplitRow
from csc.metrics import (
    COUNT_NAMES,
    METRIC_NAMES,
    batch_counts,
    boundary,
    check_scoring,
    scores_from_counts,
)
from csc.storage import (
    FINEST,
    ArraySource,
    Level,
    MetadataReader,
    absolute,
    check_json_path,
    filesystem_for,
    finite,
    group_names,
    is_folder,
    is_s3,
    names_in,
    read_box,
    write_text_atomic,
)

METRICS = (*METRIC_NAMES, "hausdorff95_nm")
ENCODINGS = {"uint8": 255.0, "float16": 1.0}  # probability = stored value / divisor


class EvaluationWarning(UserWarning):
    """Something was left out of the scores (e.g. ground truth outside the prediction)."""


@dataclasses.dataclass(frozen=True)
class ClassResult:
    """The scores of one class in one crop and the voxel counts behind them."""

    dataset: str
    crop: str
    class_name: str
    scores: dict[str, float | None]  # METRICS -> value; None where a score is undefined
    counts: dict[str, int]  # COUNT_NAMES -> voxels (csc.metrics.batch_counts)
    num_scored: int  # annotated ground-truth voxels compared with a prediction voxel
    num_outside: int  # ground-truth voxels whose nearest prediction voxel is outside it


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A crop (`class_name` None) or a class of a crop that was not scored, and why."""

    dataset: str
    crop: str
    class_name: str | None
    reason: str


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Per crop and class results, what was skipped, and per class means over crops."""

    predictions: str
    threshold: float
    boundary_tolerance: int  # voxels (Chebyshev distance)
    results: list[ClassResult]
    skipped: list[Skipped]
    # class -> {"num_crops": n, metric: mean over the crops where it is not None, or None}
    means: dict[str, dict[str, float | int | None]]


# --- Choosing crops and classes ------------------------------------------------------------


def _crop_dir(root: str, row: DatasplitRow) -> str:
    return f"{root}/{row.dataset}.zarr/{row.crop}"


def _predicted_classes(fs: Any, root: str, row: DatasplitRow) -> set[str]:
    """The class groups (folders with a .zattrs) in a crop's prediction folder."""
    return group_names(fs, _crop_dir(root, row))


def _prediction_root(predictions: str | Path) -> tuple[Any, str]:
    """The filesystem and absolute location of the predictions folder, which must exist."""
    root = absolute(predictions)
    fs = filesystem_for(root)
    if not is_folder(fs, root):
        raise ValueError(
            f"predictions folder {root} does not exist; pass the folder `csc predict` wrote "
            "(it holds one {dataset}.zarr store per dataset)"
        )
    return fs, root


def _nothing_found(fs: Any, root: str, rows: Sequence[DatasplitRow]) -> str:
    looked = ", ".join(_crop_dir(root, row) for row in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    held = sorted(names_in(fs, root))
    return (
        f"no crop of the datasplit has predictions in {root}: looked for {looked}{more}, each "
        f"holding one group per class; {root} holds: {', '.join(held[:20]) or 'nothing'}. "
        "Check --predictions and --datasplit (or --crops)"
    )


def _wanted_classes(
    classes: Sequence[str] | None, predicted: dict[tuple[str, str], set[str]], root: str
) -> list[str]:
    """`classes`, or every class predicted for some crop; a class predicted nowhere is an error."""
    everywhere = set().union(*predicted.values())
    if isinstance(classes, str):
        raise ValueError(f"classes must be a list of names, got the string {classes!r}")
    if classes is None:
        return sorted(everywhere)
    missing = [name for name in classes if name not in everywhere]
    if missing:
        raise ValueError(
            f"no crop has predictions of {', '.join(missing)} in {root}; predicted classes: "
            f"{', '.join(sorted(everywhere))}"
        )
    return list(dict.fromkeys(classes))


# --- Evaluating ----------------------------------------------------------------------------


def evaluate(
    predictions: str | Path,
    rows: Sequence[DatasplitRow],
    *,
    classes: Sequence[str] | None = None,
    threshold: float = 0.5,
    boundary_tolerance: int = 1,
) -> EvaluationReport:
    """Score the predictions in the folder `predictions` against each row's ground truth.

    A voxel is predicted where its probability > `threshold`; `boundary_tolerance` is in voxels.
    `classes` defaults to every class predicted for some crop. Each (crop, class) pair gives a
    `ClassResult` or a `Skipped` entry.
    """
    check_scoring(threshold, boundary_tolerance)
    fs, root = _prediction_root(predictions)
    predicted = {(row.dataset, row.crop): _predicted_classes(fs, root, row) for row in rows}
    if not any(predicted.values()):
        raise ValueError(_nothing_found(fs, root, rows))
    wanted = _wanted_classes(classes, predicted, root)
    readers: dict[bool, MetadataReader] = {}
    results: list[ClassResult] = []
    skipped: list[Skipped] = []
    for row in rows:
        found = predicted[(row.dataset, row.crop)]
        if not found:
            reason = f"no predictions in {_crop_dir(root, row)}"
            skipped.append(Skipped(row.dataset, row.crop, None, reason))
            continue
        outcomes = [
            _evaluate_one(
                row,
                name,
                found,
                root=root,
                readers=readers,
                threshold=threshold,
                tolerance=boundary_tolerance,
            )
            for name in wanted
        ]
        scored = [o for o in outcomes if isinstance(o, ClassResult)]
        _warn_outside(row, scored)
        results += scored
        skipped += [o for o in outcomes if isinstance(o, Skipped)]
    means = class_means(results)
    return EvaluationReport(root, threshold, boundary_tolerance, results, skipped, means)


def _reader(readers: dict[bool, MetadataReader], url: str) -> MetadataReader:
    """One metadata reader per kind of location (local, S3), made when first needed."""
    s3 = is_s3(url)
    if s3 not in readers:
        readers[s3] = MetadataReader(url)
    return readers[s3]


def _evaluate_one(
    row: DatasplitRow,
    name: str,
    found: set[str],
    *,
    root: str,
    readers: dict[bool, MetadataReader],
    threshold: float,
    tolerance: int,
) -> ClassResult | Skipped:
    """One class of one crop: scored where annotated and predicted, else skipped."""
    group = f"{_crop_dir(root, row)}/{name}"
    if name not in row.classes:
        reason = "not annotated in this crop (not among the datasplit row's classes)"
        return Skipped(row.dataset, row.crop, name, reason)
    if name not in found:
        return Skipped(row.dataset, row.crop, name, f"no prediction {group}")
    truth_group = f"{row.gt_root}/{row.gt_path}/{name}"
    truth = _reader(readers, truth_group).source(truth_group, FINEST, label=True)
    prediction, divisor = _prediction_source(_reader(readers, group), group)
    outcome = _evaluate_class(
        truth, prediction, divisor=divisor, threshold=threshold, tolerance=tolerance
    )
    if outcome is None:
        reason = f"the prediction {group} does not overlap the ground truth {truth_group}"
        return Skipped(row.dataset, row.crop, name, reason)
    scores, counts, num_outside = outcome
    num_scored = counts["tp"] + counts["fp"] + counts["fn"] + counts["tn"]
    return ClassResult(row.dataset, row.crop, name, scores, counts, num_scored, num_outside)


def _prediction_source(reader: MetadataReader, group: str) -> tuple[ArraySource, float]:
    """A prediction group's finest level, and the divisor that turns values into
    probabilities (its `csc_prediction` encoding, else from the array's dtype)."""
    source = reader.source(group, FINEST, label=False)
    dtype = np.dtype(source.dtype)
    encoding = reader.attrs(group).get("csc_prediction", {}).get("encoding")
    encoding = encoding or dtype.name
    if encoding not in ENCODINGS or np.dtype(encoding) != dtype:
        raise ValueError(
            f"{source.url}: cannot read {dtype.name} values with encoding {encoding!r} as "
            f"probabilities; csc predict writes {' or '.join(ENCODINGS)}: write it again"
        )
    return source, ENCODINGS[encoding]


def _warn_outside(row: DatasplitRow, results: Sequence[ClassResult]) -> None:
    """One warning per crop with ground-truth voxels outside the prediction."""
    outside = [r for r in results if r.num_outside > 0]
    if outside:
        counts = ", ".join(f"{r.class_name}: {r.num_outside} voxels" for r in outside)
        warnings.warn(
            f"{row.dataset}/{row.crop}: ground truth outside the prediction is not scored "
            f"({counts})",
            EvaluationWarning,
            stacklevel=3,
        )


def _evaluate_class(
    truth: ArraySource,
    prediction: ArraySource,
    *,
    divisor: float,
    threshold: float,
    tolerance: int,
) -> tuple[dict[str, float | None], dict[str, int], int] | None:
    """Scores, counts and the number of ground-truth voxels outside the prediction, on the
    ground truth's grid; None when no ground-truth voxel lies inside the prediction.

    Prediction values / `divisor` are probabilities; `tolerance` is in voxels."""
    indices = nearest_indices(truth.level, prediction.level)
    box = tuple(_inside(i, n) for i, n in zip(indices, prediction.level.shape, strict=True))
    if any(b.stop <= b.start for b in box):
        return None
    labels = read_box(truth, box)  # (z, y, x): the ground-truth voxels that are scored
    annotated = np.ones(labels.shape, bool)
    if truth.unknown is not None:
        annotated = labels != truth.unknown
    true_mask = (labels != truth.absent) & annotated
    inside = [i[b] for i, b in zip(indices, box, strict=True)]
    pred_mask = _resampled(prediction, inside, divisor=divisor, threshold=threshold)
    pred_mask &= annotated  # a prediction on an unannotated voxel is not scored
    scores, counts = score_masks(
        pred_mask, true_mask, annotated, truth.level.scale, tolerance=tolerance
    )
    return scores, counts, math.prod(truth.level.shape) - labels.size


def nearest_indices(truth: Level, prediction: Level) -> list[np.ndarray]:
    """Per axis (z, y, x), the index of the prediction voxel nearest each ground-truth voxel
    centre, ``floor((t_gt + i * s_gt - t_pred) / s_pred + 0.5)``; it may lie outside the
    prediction. Scales and translations are in nm."""
    indices = []
    for axis, n in enumerate(truth.shape):
        centres = truth.translation[axis] + np.arange(n) * truth.scale[axis]  # nm
        position = (centres - prediction.translation[axis]) / prediction.scale[axis]  # voxels
        # Rounded to 1e-6 voxel first, so float error cannot move an exact tie across .5.
        indices.append(np.floor(np.round(position, 6) + 0.5).astype(np.int64))
    return indices


def _inside(index: np.ndarray, size: int) -> slice:
    """The ground-truth voxels along one axis whose prediction voxel is in [0, size): one
    range, since the prediction index never decreases as the ground-truth index grows."""
    valid = np.flatnonzero((index >= 0) & (index < size))
    return slice(int(valid[0]), int(valid[-1]) + 1) if valid.size else slice(0, 0)


def _resampled(
    prediction: ArraySource, indices: Sequence[np.ndarray], *, divisor: float, threshold: float
) -> np.ndarray:
    """Predicted foreground (probability = value / divisor > threshold) at per-axis voxel
    indices, all inside the prediction; bool (z, y, x)."""
    low = [int(i[0]) for i in indices]
    high = [int(i[-1]) + 1 for i in indices]
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    values = read_box(prediction, box)  # only the part that the ground truth covers
    foreground = values / divisor > threshold  # on the prediction's grid: never finer than needed
    local = [i - a for i, a in zip(indices, low, strict=True)]
    return foreground[np.ix_(*local)]  # separable nearest-neighbour resampling


# --- Scores --------------------------------------------------------------------------------


def score_masks(
    pred: np.ndarray,
    truth: np.ndarray,
    annotated: np.ndarray,
    scale: Sequence[float],
    *,
    tolerance: int,
) -> tuple[dict[str, float | None], dict[str, int]]:
    """Scores (METRICS) and counts (COUNT_NAMES) of bool masks (z, y, x) with voxel size
    `scale` (nm, (z, y, x)); `pred` and `truth` must be False where `annotated` is."""
    # (1, 1, Z, Y, X): one batch item, one class, as csc.metrics takes them.
    masks = (pred, truth, annotated)
    tensors = [torch.from_numpy(np.ascontiguousarray(m))[None, None] for m in masks]
    counts = batch_counts(*tensors, tolerance=tolerance)  # (len(COUNT_NAMES), 1)
    scores = scores_from_counts(counts)[0]
    pred_edge, true_edge = (boundary(t)[0, 0].numpy() for t in tensors[:2])
    scores["hausdorff95_nm"] = hausdorff95(pred_edge, true_edge, scale)
    return scores, dict(zip(COUNT_NAMES, counts[:, 0].tolist(), strict=True))


def hausdorff95(
    pred_edge: np.ndarray, true_edge: np.ndarray, scale: Sequence[float]
) -> float | None:
    """The 95th percentile (numpy's linear interpolation) of the pooled distances in nm from
    each predicted boundary voxel to the nearest true boundary voxel and from each true one to
    the nearest predicted one; None when either has no boundary voxel."""
    if not pred_edge.any() or not true_edge.any():
        return None
    box = _bounding_box(pred_edge | true_edge)  # exact: every nearest voxel lies inside it
    pred_edge, true_edge = pred_edge[box], true_edge[box]
    to_true = distance_transform_edt(~true_edge, sampling=scale)[pred_edge]  # nm
    to_pred = distance_transform_edt(~pred_edge, sampling=scale)[true_edge]
    return float(np.percentile(np.concatenate([to_true, to_pred]), 95))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every set voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        set_ = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(set_[0]), int(set_[-1]) + 1))
    return tuple(box)


def class_means(results: Sequence[ClassResult]) -> dict[str, dict[str, float | int | None]]:
    """Per class, the number of crops and each metric's mean over the crops where it is not
    None (None if it is None in every crop)."""
    means: dict[str, dict[str, float | int | None]] = {}
    for name in dict.fromkeys(r.class_name for r in results):
        scores = [r.scores for r in results if r.class_name == name]
        values = {metric: _mean([s[metric] for s in scores]) for metric in METRICS}
        means[name] = {"num_crops": len(scores), **values}
    return means


def _mean(values: Sequence[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


# --- Output --------------------------------------------------------------------------------


def format_table(report: EvaluationReport) -> str:
    """The results as a fixed-width table, one row per crop and class, then the per-class
    means over crops and the skipped entries; '-' where a score is None."""
    rows = [["crop", "class", *METRICS], *_table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    tolerance = report.boundary_tolerance
    lines = [
        f"predictions {report.predictions}: threshold {report.threshold}, boundary tolerance "
        f"{tolerance} voxel{'' if tolerance == 1 else 's'}",
        *("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows),
    ]
    for entry in report.skipped:
        if entry.class_name is not None:
            lines.append(f"skipped {entry.dataset}/{entry.crop} {entry.class_name}: {entry.reason}")
    crops = [f"{e.dataset}/{e.crop}" for e in report.skipped if e.class_name is None]
    if crops:  # one line: with default predictions, every training crop has none
        more = f" and {len(crops) - 10} more" if len(crops) > 10 else ""
        noun = "crop" if len(crops) == 1 else "crops"
        lines.append(
            f"skipped {len(crops)} {noun} without predictions: {', '.join(crops[:10])}{more}"
        )
    return "\n".join(lines)


def _table_rows(report: EvaluationReport) -> list[list[str]]:
    """One row of cells per result, then one per class mean."""
    rows = [
        [f"{r.dataset}/{r.crop}", r.class_name, *(_cell(m, r.scores[m]) for m in METRICS)]
        for r in report.results
    ]
    for name, mean in report.means.items():
        num_crops = mean["num_crops"]
        label = f"mean of {num_crops} crop{'' if num_crops == 1 else 's'}"
        rows.append([label, name, *(_cell(m, mean[m]) for m in METRICS)])
    return rows


def _cell(metric: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.1f}" if metric.endswith("_nm") else f"{value:.3f}"


def report_dict(report: EvaluationReport) -> dict[str, Any]:
    """The report as plain JSON-ready values (NaN and inf as None); see docs/evaluation.md."""
    results = [
        {
            "dataset": r.dataset,
            "crop": r.crop,
            "class": r.class_name,
            "scores": r.scores,
            "counts": r.counts,
            "num_scored": r.num_scored,
            "num_outside": r.num_outside,
        }
        for r in report.results
    ]
    skipped = [
        {"dataset": s.dataset, "crop": s.crop, "class": s.class_name, "reason": s.reason}
        for s in report.skipped
    ]
    return finite(
        {
            "predictions": report.predictions,
            "threshold": report.threshold,
            "boundary_tolerance": report.boundary_tolerance,
            "metrics": list(METRICS),
            "results": results,
            "means": report.means,
            "skipped": skipped,
        }
    )


# Top-level keys of the JSON report `write_json` writes: what marks a file as csc's own.
REPORT_KEYS = frozenset({"predictions", "threshold", "metrics", "results"})


def is_report(value: Any) -> bool:
    """Whether parsed JSON is a report `write_json` wrote (its top-level keys)."""
    return isinstance(value, dict) and value.keys() >= REPORT_KEYS


def write_json(report: EvaluationReport, path: str | Path, *, overwrite: bool) -> Path:
    """Write the report as JSON (None, NaN and inf as null), atomically: a temporary file in
    the same folder, then a rename."""
    path = check_json_path(path, overwrite=overwrite, is_ours=is_report)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report_dict(report), indent=2, allow_nan=False)
    write_text_atomic(path, text + "\n")
    return path
