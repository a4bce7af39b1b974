"""Score one label of one crop exactly as the CellMap challenge toolkit does.

Works on arrays already in the crop's space (resampling and zarr reads live elsewhere). The
rules, constants and edge cases follow /work/shared/challenge/scoring.md (the toolkit's code,
not its EVALUATION.md): instance labels get 26-connected components, a ratio cutoff, a 1:1
IoU matching, tp/fp/fn and capped, normalised Hausdorff distances in nm; semantic labels get
voxel tp/fp/fn. `combine_scores` pools the per-crop counts per class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

# The challenge's instance classes; every other label is scored as semantic.
from csc.config import INSTANCE_CLASSES

__all__ = [
    "INSTANCE_CLASSES",
    "LabelScore",
    "TooManyInstancesError",
    "combine_scores",
    "connected_components",
    "hausdorff_distances",
    "match_instances",
    "max_distance",
    "normalize_distance",
    "ratio_cutoff",
    "score_label",
]

# Ratio cutoff constants (EvaluationConfig defaults): final, initial, decay factor.
FINAL_RATIO, INITIAL_RATIO, RATIO_FACTOR = 10.0, 50.0, 5.0
COST_SCALE = 1_000_000  # mcmf_cost_scale: matched pair costs int((1 - iou) * scale)


class TooManyInstancesError(ValueError):
    """More predicted instances than `ratio_cutoff` allows for the truth's count."""


@dataclass(frozen=True)
class LabelScore:
    """The per-crop result of one label; `as_dict` gives the toolkit's `score_label` dict."""

    tp: int
    fp: int
    fn: int
    num_voxels: int
    voxel_size: tuple[float, ...]
    status: str = "scored"
    is_missing: bool = False
    # Instance labels only: Σ normalised distances and the number of entries.
    hausdorff_norm_sum: float | None = None
    n_hausdorff: int | None = None

    @property
    def is_instance(self) -> bool:
        return self.n_hausdorff is not None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"tp": self.tp, "fp": self.fp, "fn": self.fn}
        if self.is_instance:
            out |= {"hausdorff_norm_sum": self.hausdorff_norm_sum, "n_hausdorff": self.n_hausdorff}
        return out | {
            "status": self.status,
            "num_voxels": self.num_voxels,
            "voxel_size": list(self.voxel_size),
            "is_missing": self.is_missing,
        }


def ratio_cutoff(num_truth: int) -> float:
    """Largest allowed predicted/truth instance ratio: 10 + 50·exp(-nG/5)."""
    return FINAL_RATIO + INITIAL_RATIO * math.exp(-num_truth / RATIO_FACTOR)


def connected_components(pred: NDArray[np.generic]) -> tuple[NDArray[np.int64], int]:
    """cc3d's default labelling: 26-connected (8 in 2D), never joining different values, ids
    1..N in order of each component's first voxel in a C-order scan."""
    structure = np.ones((3,) * pred.ndim, dtype=bool)
    labels = np.zeros(pred.shape, dtype=np.int64)
    offset = 0
    for value in np.unique(pred[pred != 0]):
        part, num = ndimage.label(pred == value, structure=structure)
        labels[part > 0] = part[part > 0] + offset
        offset += int(num)
    if offset == 0:
        return labels, 0
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    order = ids[keep][np.argsort(first[keep], kind="stable")]
    lookup = np.zeros(offset + 1, dtype=np.int64)
    lookup[order] = np.arange(1, offset + 1)
    return lookup[labels], offset


def match_instances(truth: NDArray[np.integer], pred: NDArray[np.integer]) -> dict[int, int]:
    """Optimal 1:1 pred id → truth id matching by IoU (the toolkit's min-cost flow).

    Raises `TooManyInstancesError` when max(pred)/max(truth) exceeds `ratio_cutoff`.
    """
    num_truth, num_pred = int(truth.max(initial=0)), int(pred.max(initial=0))
    if num_truth == 0 and num_pred == 0:
        return {0: 0}
    if num_truth == 0 or num_pred == 0:
        return {}
    if num_pred / num_truth > ratio_cutoff(num_truth):
        raise TooManyInstancesError(
            f"too many instances: {num_pred} predicted vs {num_truth} ground truth "
            f"(ratio {num_pred / num_truth:.2f} exceeds cutoff {ratio_cutoff(num_truth):.2f})"
        )
    both = (truth > 0) & (pred > 0)
    pairs, inter = np.unique(
        np.stack([truth[both].astype(np.int64), pred[both].astype(np.int64)]),
        axis=1,
        return_counts=True,
    )
    if inter.size == 0:
        return {}
    truth_sizes = np.bincount(truth.ravel().astype(np.int64), minlength=num_truth + 1)
    pred_sizes = np.bincount(pred.ravel().astype(np.int64), minlength=num_pred + 1)
    union = truth_sizes[pairs[0]] + pred_sizes[pairs[1]] - inter
    # IoU stored as float32, cost int((1 - iou) · 10⁶) taken in float64, as the toolkit does.
    iou = (inter / union).astype(np.float32).astype(np.float64)
    cost = ((1.0 - iou) * COST_SCALE).astype(np.int64)
    # Min Σ cost + (10⁶+1)·#unmatched truth (its min-cost flow) == max Σ (10⁶+1 - cost) over
    # matched pairs. Exact ties may be broken differently from OR-Tools (golden case 024).
    gain = np.zeros((num_truth + 1, num_pred + 1), dtype=np.int64)
    gain[pairs[0], pairs[1]] = COST_SCALE + 1 - cost
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return {int(p): int(g) for g, p in zip(rows, cols, strict=True) if gain[g, p] > 0}


def max_distance(shape: Sequence[int], voxel_size: Sequence[float]) -> float:
    """Hausdorff cap in nm: half the crop's shortest physical side."""
    return float(min(s * v for s, v in zip(shape, voxel_size, strict=True)) / 2)


def normalize_distance(distance: float, voxel_size: Sequence[float]) -> float:
    """1.01 ** (-d / ‖voxel_size‖₂); inf gives 0."""
    if math.isinf(distance):
        return 0.0
    return float(1.01 ** (-distance / float(np.linalg.norm(np.asarray(voxel_size, float)))))


def hausdorff_distances(
    truth: NDArray[np.integer],
    pred: NDArray[np.integer],
    voxel_size: Sequence[float],
    *,
    num_unmatched: int,
) -> list[float]:
    """Per-entry distances in nm: one per truth id (ascending) against the same id in the
    remapped prediction, capped, stored as float32; then one cap per unmatched prediction."""
    cap = max_distance(truth.shape, voxel_size)
    out = []
    for tid in np.unique(truth[truth != 0]):
        a, b = truth == tid, pred == tid
        if not b.any():
            out.append(cap)
            continue
        d_ab = ndimage.distance_transform_edt(~b, sampling=voxel_size)[a].max()
        d_ba = ndimage.distance_transform_edt(~a, sampling=voxel_size)[b].max()
        out.append(float(np.float32(min(float(max(d_ab, d_ba)), cap))))
    return out + [cap] * num_unmatched


def score_label(
    truth: NDArray[Any],
    pred: NDArray[Any],
    voxel_size: Sequence[float],
    *,
    instance: bool,
    mask: NDArray[Any] | None = None,
) -> LabelScore:
    """Score one (crop, label); `pred` must already be in the truth's space (shape, voxels)."""
    if mask is not None:
        truth, pred = truth * mask, pred * mask
    vs = tuple(float(v) for v in voxel_size)
    if not instance:
        return _score_semantic(truth > 0, pred > 0, vs)
    return _score_instance(np.asarray(truth).astype(np.int64), pred, vs)


def _score_semantic(
    truth: NDArray[np.bool_], pred: NDArray[np.bool_], vs: tuple[float, ...]
) -> LabelScore:
    tp = int(np.count_nonzero(truth & pred))
    fp, fn = int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp
    return LabelScore(tp=tp, fp=fp, fn=fn, num_voxels=truth.size, voxel_size=vs)


def _score_instance(
    truth: NDArray[np.int64], pred: NDArray[np.generic], vs: tuple[float, ...]
) -> LabelScore:
    labels, num_pred = connected_components(pred)
    try:
        mapping = match_instances(truth, labels)
    except TooManyInstancesError:
        return LabelScore(0, 0, 0, truth.size, vs, "skipped_too_many_instances", False, 0.0, 0)
    if mapping and mapping != {0: 0}:
        # Matched ids take their truth id; unmatched ones keep their component id (fastremap).
        lookup = np.arange(num_pred + 1, dtype=np.int64)
        lookup[list(mapping)] = list(mapping.values())
        labels = lookup[labels]
    matched_truth, matched_pred = set(mapping.values()) - {0}, set(mapping) - {0}
    num_unmatched = num_pred - len(matched_pred)
    distances = hausdorff_distances(truth, labels, vs, num_unmatched=num_unmatched)
    num_truth = len(np.unique(truth[truth != 0]))
    return LabelScore(
        tp=len(matched_truth),
        fp=num_unmatched,
        fn=num_truth - len(matched_truth),
        num_voxels=truth.size,
        voxel_size=vs,
        hausdorff_norm_sum=sum(normalize_distance(d, vs) for d in distances),
        n_hausdorff=len(distances),
    )


def combine_scores(scores: Mapping[str, Sequence[LabelScore]]) -> dict[str, object]:
    """Per-class scores pooled over crops (label → its crops' results) and the overall means."""
    label_scores = {label: _class_score(results) for label, results in scores.items()}
    instance = [s["combined_score"] for s in label_scores.values() if "combined_score" in s]
    semantic = [s["iou"] for s in label_scores.values() if "iou" in s]
    mean_instance = float(np.mean(instance)) if instance else 0.0
    mean_semantic = float(np.mean(semantic)) if semantic else 0.0
    return {
        "label_scores": label_scores,
        "overall_instance_score": mean_instance,
        "overall_semantic_score": mean_semantic,
        "overall_score": math.sqrt(mean_instance * mean_semantic),
    }


def _class_score(results: Sequence[LabelScore]) -> dict[str, float]:
    tp, fp, fn = (sum(getattr(r, k) for r in results) for k in ("tp", "fp", "fn"))
    counts = {"tp": tp, "fp": fp, "fn": fn}
    if not all(r.is_instance for r in results):
        return {"iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0} | counts
    norm_sum = sum(r.hausdorff_norm_sum or 0.0 for r in results)
    num_entries = sum(r.n_hausdorff or 0 for r in results)
    if 2 * tp + fp + fn == 0 and num_entries == 0:
        return {"f1": 1.0, "normalized_hausdorff_distance": 1.0, "combined_score": 1.0} | counts
    f1 = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0
    hausdorff = norm_sum / num_entries if num_entries else 0.0
    return {
        "f1": f1,
        "normalized_hausdorff_distance": hausdorff,
        "combined_score": math.sqrt(f1 * hausdorff),
    } | counts
