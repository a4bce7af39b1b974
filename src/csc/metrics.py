"""Validation metrics from voxel counts accumulated over a whole pass.

`SegmentationMetrics.update` adds integer counts per class (TP, FP, FN, TN over annotated
voxels, and boundary counts); `compute` turns the totals into IoU, Dice, precision, recall,
accuracy, boundary F1, frequency-weighted IoU and pixel accuracy. Never an average of
per-batch scores. The rules for empty classes are in docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from csc import registries

__all__ = [
    "COUNT_NAMES",
    "METRIC_NAMES",
    "POOLED_MEANS",
    "SegmentationMetrics",
    "batch_counts",
    "boundary",
    "count_true",
    "dilate",
    "pooled_accuracy",
    "scores_from_counts",
]

# Rows of `SegmentationMetrics.counts`, shape (len(COUNT_NAMES), C).
COUNT_NAMES = (
    "tp",
    "fp",
    "fn",
    "tn",
    "pred_boundary",  # predicted boundary voxels
    "pred_boundary_matched",  # ... within the tolerance of a ground-truth boundary voxel
    "true_boundary",  # ground-truth boundary voxels
    "true_boundary_matched",  # ... within the tolerance of a predicted boundary voxel
)
METRIC_NAMES = registries.METRIC_NAMES  # their one home, torch-free (config checks `monitor`)
POOLED_MEANS = ("pixel_accuracy",)  # means over all scored voxels, not over the classes


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Voxels within Chebyshev distance `radius` of a set voxel of `mask` (bool, (B, C, ...));
    outside the patch nothing is set.

    A box is separable: OR over shifts of up to `radius` voxels along each spatial axis in
    turn, on bool tensors (tens of times faster than a float max-pool, CPU and GPU alike)."""
    if radius == 0:
        return mask
    result = mask
    for axis in range(2, mask.dim()):  # the spatial axes of (B, C, *spatial)
        size, shifted = result.shape[axis], result.clone()
        for shift in range(1, min(radius, size - 1) + 1):
            shifted.narrow(axis, shift, size - shift).logical_or_(
                result.narrow(axis, 0, size - shift)
            )
            shifted.narrow(axis, 0, size - shift).logical_or_(
                result.narrow(axis, shift, size - shift)
            )
        result = shifted
    return result


def boundary(mask: Tensor) -> Tensor:
    """Set voxels of `mask` with an unset neighbour (3x3 or 3x3x3); outside the patch counts
    as set, so a patch's edge is not a boundary."""
    return mask & dilate(~mask, 1)  # a set voxel next to an unset one


def check_scoring(threshold: float, boundary_tolerance: int | None) -> None:
    """`ValueError` unless threshold is a probability in (0, 1) and the boundary tolerance a
    whole number of voxels >= 0 (or None: no boundaries)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
    if boundary_tolerance is None:
        return
    if isinstance(boundary_tolerance, bool) or not isinstance(boundary_tolerance, int):
        raise ValueError(f"boundary_tolerance must be an integer, got {boundary_tolerance!r}")
    if boundary_tolerance < 0:
        raise ValueError(f"boundary_tolerance must be >= 0 voxels, got {boundary_tolerance}")


def batch_counts(
    pred: Tensor, truth: Tensor, annotated: Tensor, *, tolerance: int | None
) -> Tensor:
    """The int64 counts ``(len(COUNT_NAMES), C)`` of bool masks ``(B, C, *spatial)``.

    `pred` and `truth` must be False where `annotated` is. ``tolerance = None`` leaves the
    boundary rows 0 (no boundary F1): the boundaries and their dilations are about three
    quarters of the cost of the counts.
    """
    masks = [
        pred & truth,  # tp
        pred,  # tp + fp: one mask op fewer than pred & ~truth
        truth,  # tp + fn
        ~pred & ~truth & annotated,
    ]
    if tolerance is not None:
        pred_edge, true_edge = boundary(pred), boundary(truth)
        masks += [
            pred_edge,
            pred_edge & dilate(true_edge, tolerance),
            true_edge,
            true_edge & dilate(pred_edge, tolerance),
        ]
    stacked = torch.stack(masks)  # (rows, B, C, *spatial)
    counts = count_true(stacked, axes=[1, *range(3, stacked.dim())])  # over B and space
    counts[1:3] -= counts[0]  # fp = predicted - tp, fn = true - tp
    if tolerance is None:
        counts = torch.cat([counts, torch.zeros_like(counts)])  # the boundary rows: 0
    return counts


def count_true(masks: Tensor, *, axes: list[int]) -> Tensor:
    """The int64 number of True values of a bool tensor over `axes`. Summed as bytes into
    int32 when the count cannot overflow it: 2-3x faster on a CPU than a bool sum into int64
    (the training-side metrics count every batch)."""
    if math.prod(masks.shape[axis] for axis in axes) < 2**31:  # values summed into one count
        return masks.view(torch.uint8).sum(axes, dtype=torch.int32).to(torch.int64)
    return masks.sum(axes, dtype=torch.int64)


class SegmentationMetrics:
    """Per-class and mean IoU, Dice (F1), precision, recall, accuracy, boundary F1, FWIoU and
    pixel accuracy (docs/metrics.md).

    A voxel is predicted where ``sigmoid(logits) > threshold``. `boundary_tolerance` is in
    voxels (Chebyshev distance); None counts no boundaries (boundary F1 is None), as the
    training-side metrics do. ``counts`` is an int64 tensor ``(len(COUNT_NAMES), C)``; under
    DDP, ``torch.distributed.all_reduce(metrics.counts)`` before `compute` gives global scores.
    """

    def __init__(
        self,
        classes: Sequence[str],
        *,
        threshold: float = 0.5,
        boundary_tolerance: int | None = 1,
    ) -> None:
        if isinstance(classes, str) or not classes:
            raise ValueError(f"classes must be a non-empty list of names, got {classes!r}")
        check_scoring(threshold, boundary_tolerance)
        self.classes = list(classes)
        self.threshold = threshold
        self.boundary_tolerance = boundary_tolerance
        self._logit_threshold = math.log(threshold / (1 - threshold))
        self.counts = torch.zeros(len(COUNT_NAMES), len(self.classes), dtype=torch.int64)

    def reset(self) -> None:
        """Forget all counts (start of a validation pass)."""
        self.counts = torch.zeros_like(self.counts)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add the counts of one batch: logits and target (1, 0 or NaN) ``(B, C, *spatial)``."""
        self._check(logits, target)
        annotated = torch.isfinite(target)
        truth = target > 0.5  # NaN compares False: unannotated voxels are background
        pred = (logits > self._logit_threshold) & annotated
        batch = batch_counts(pred, truth, annotated, tolerance=self.boundary_tolerance)
        self.counts = self.counts.to(logits.device) + batch

    def _check(self, logits: Tensor, target: Tensor) -> None:
        if logits.shape != target.shape or logits.dim() not in (4, 5):
            raise ValueError(
                f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the "
                "same shape, (B, C, Y, X) or (B, C, Z, Y, X)"
            )
        if logits.shape[1] != len(self.classes):
            raise ValueError(
                f"logits have {logits.shape[1]} channels but the metrics were made for "
                f"{len(self.classes)} classes {self.classes}"
            )

    def compute(self) -> dict[str, dict[str, float | None] | int]:
        """``{metric: {class: value or None, ..., "mean": value or None}, "num_scored": n}``.

        Also ``"num_scored_boundary"``: the classes averaged into ``boundary_f1["mean"]``.
        """
        per_class = scores_from_counts(self.counts)
        result: dict[str, dict[str, float | None] | int] = {}
        for metric in METRIC_NAMES:
            values = dict(zip(self.classes, (s[metric] for s in per_class), strict=True))
            mean = _mean(list(values.values()))
            if metric in POOLED_MEANS:
                mean = pooled_accuracy(self.counts, per_class)
            result[metric] = {**values, "mean": mean}
        result["num_scored"] = sum(scores["iou"] is not None for scores in per_class)
        result["num_scored_boundary"] = sum(s["boundary_f1"] is not None for s in per_class)
        return result


def scores_from_counts(counts: Tensor) -> list[dict[str, float | None]]:
    """Per class, ``{metric: value or None}`` (METRIC_NAMES) from counts
    ``(len(COUNT_NAMES), C)``, with the empty-class rules of docs/metrics.md."""
    columns = counts.T.tolist()  # one list of counts per class, COUNT_NAMES order
    return [_class_scores(**dict(zip(COUNT_NAMES, c, strict=True))) for c in columns]


def _class_scores(
    *,
    tp: int,
    fp: int,
    fn: int,
    tn: int,
    pred_boundary: int,
    pred_boundary_matched: int,
    true_boundary: int,
    true_boundary_matched: int,
) -> dict[str, float | None]:
    """One class's scores from its counts; None for every score of a class that is skipped."""
    if tp + fp + fn == 0:  # nothing in ground truth or prediction, or nothing annotated
        return dict.fromkeys(METRIC_NAMES)
    scores: dict[str, float | None] = {
        "iou": tp / (tp + fp + fn),
        "dice": 2 * tp / (2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "accuracy": (tp + tn) / (tp + fp + fn + tn),
        "boundary_f1": None,
        "fwiou": _fwiou(tp=tp, fp=fp, fn=fn, tn=tn),
        "pixel_accuracy": (tp + tn) / (tp + fp + fn + tn),
    }
    if pred_boundary + true_boundary > 0:
        precision = _ratio(pred_boundary_matched, pred_boundary)
        recall = _ratio(true_boundary_matched, true_boundary)
        scores["boundary_f1"] = _ratio(2 * precision * recall, precision + recall)
    return scores


def _fwiou(*, tp: int, fp: int, fn: int, tn: int) -> float:
    """Frequency-weighted IoU of one class's two categories, foreground and background: each
    one's IoU weighted by its share of the annotated ground truth (Long et al., FCN, 2015)."""
    total = tp + fp + fn + tn
    foreground_iou = _ratio(tp, tp + fp + fn)
    background_iou = _ratio(tn, tn + fn + fp)
    return ((tp + fn) * foreground_iou + (tn + fp) * background_iou) / total


def pooled_accuracy(counts: Tensor, per_class: Sequence[dict[str, float | None]]) -> float | None:
    """Pixel accuracy over every scored class's annotated voxels together: correct decisions
    (TP + TN) over all of them, as multi-class trainers report it; classes with more annotated
    voxels weigh more. None when no class is scored."""
    rows = counts[[COUNT_NAMES.index(name) for name in ("tp", "fp", "fn", "tn")]].T.tolist()
    scored = [row for row, scores in zip(rows, per_class, strict=True) if scores["iou"] is not None]
    total = sum(sum(row) for row in scored)
    return (sum(row[0] + row[3] for row in scored) / total) if total else None


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, 0 where the denominator is 0 (nothing predicted, or no truth)."""
    return numerator / denominator if denominator > 0 else 0.0


def _mean(values: list[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None
