"""Score one label of one crop exactly as the CellMap challenge toolkit does.

Works on arrays already in the crop's space (resampling and zarr reads live elsewhere). The
rules, constants and edge cases follow /work/shared/challenge/scoring.md (the toolkit's code,
not its EVALUATION.md): instance labels get 26-connected components, a ratio cutoff, a 1:1
IoU matching, tp/fp/fn and capped, normalised Hausdorff distances in nm; semantic labels get
voxel tp/fp/fn. `combine_scores` pools the per-crop counts per class. The toolkit's own
libraries do the steps whose numbering or tie-breaking shows in the numbers: cc3d labels,
fastremap remaps, OR-Tools' min-cost flow matches (on the same graph, so ties break alike).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cc3d
import fastremap
import numpy as np
from numpy.typing import NDArray
from ortools.graph.python import min_cost_flow
from scipy import ndimage, spatial

# The challenge's instance classes; every other label is scored as semantic.
from csc.config import INSTANCE_CLASSES

__all__ = [
    "INSTANCE_CLASSES",
    "LabelScore",
    "MatchingFailedError",
    "TooManyInstancesError",
    "combine_scores",
    "connected_components",
    "hausdorff_distances",
    "match_instances",
    "max_distance",
    "missing_label_score",
    "normalize_distance",
    "ratio_cutoff",
    "score_label",
]

# Ratio cutoff constants (EvaluationConfig defaults): final, initial, decay factor.
FINAL_RATIO, INITIAL_RATIO, RATIO_FACTOR = 10.0, 50.0, 5.0
COST_SCALE = 1_000_000  # mcmf_cost_scale: matched pair costs int((1 - iou) * scale)
MAX_OVERLAP_EDGES = 5_000_000  # more overlapping (truth, pred) pairs: the crop is skipped
# The challenge's environment variables that override those constants, read at each use.
OVERRIDES = {
    "FINAL_INSTANCE_RATIO_CUTOFF": FINAL_RATIO,
    "INITIAL_INSTANCE_RATIO_CUTOFF": INITIAL_RATIO,
    "INSTANCE_RATIO_FACTOR": RATIO_FACTOR,
    "MCMF_COST_SCALE": COST_SCALE,
    "MAX_OVERLAP_EDGES": MAX_OVERLAP_EDGES,
}


def setting(name: str) -> float:
    """A scoring constant, or its override from the environment variable `name`."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return OVERRIDES[name]
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"${name}={text!r} must be a number (the challenge's default is {OVERRIDES[name]:g})"
        ) from None


class TooManyInstancesError(ValueError):
    """More predicted instances than `ratio_cutoff` allows for the truth's count, or more
    overlapping pairs than `MAX_OVERLAP_EDGES`: the crop is skipped."""


class MatchingFailedError(RuntimeError):
    """The min-cost flow found no optimal matching: the crop is scored `matching_failed`."""


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
        where = {"num_voxels": self.num_voxels, "voxel_size": list(self.voxel_size)}
        if self.is_missing:  # the toolkit's key order for a missing label
            return out | where | {"is_missing": True, "status": self.status}
        return out | {"status": self.status} | where | {"is_missing": False}


def ratio_cutoff(num_truth: int) -> float:
    """Largest allowed predicted/truth instance ratio: 10 + 50·exp(-nG/5) by default."""
    final = setting("FINAL_INSTANCE_RATIO_CUTOFF")
    initial = setting("INITIAL_INSTANCE_RATIO_CUTOFF")
    return final + initial * math.exp(-num_truth / setting("INSTANCE_RATIO_FACTOR"))


def connected_components(pred: NDArray[Any]) -> tuple[NDArray[np.integer], int]:
    """cc3d's default labelling (the toolkit's): 26-connected (8 in 2D), never joining
    different values, ids 1..N in order of each component's first voxel in a C-order scan."""
    labels, num = cc3d.connected_components(pred, return_N=True)
    return labels, int(num)


def match_instances(truth: NDArray[np.integer], pred: NDArray[np.integer]) -> dict[int, int]:
    """Optimal 1:1 pred id → truth id matching by IoU (the toolkit's min-cost flow).

    Raises `TooManyInstancesError` when max(pred)/max(truth) exceeds `ratio_cutoff` or the
    overlapping (truth, pred) pairs are more than `MAX_OVERLAP_EDGES`.
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
    truth_ids, pred_ids, iou = _overlaps(truth, pred, num_pred)
    if iou.size == 0:
        return {}
    return _min_cost_matching(num_truth, num_pred, truth_ids, pred_ids, iou)


def _overlaps(
    truth: NDArray[np.integer], pred: NDArray[np.integer], num_pred: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float32]]:
    """The overlapping (truth id, pred id) pairs, ascending by truth then pred id, and their
    IoU as float32 (the toolkit's)."""
    truth_fg, pred_fg = truth > 0, pred > 0
    both = truth_fg & pred_fg
    # One int64 key per overlapping voxel: truth id · (nP + 1) + pred id.
    keys = truth[both].astype(np.int64) * (num_pred + 1) + pred[both]
    del both
    pairs, inter = np.unique(keys, return_counts=True)
    most = int(setting("MAX_OVERLAP_EDGES"))
    if pairs.size > most:
        raise TooManyInstancesError(f"too many overlapping instance pairs: {pairs.size} > {most}")
    truth_ids, pred_ids = pairs // (num_pred + 1), pairs % (num_pred + 1)
    truth_sizes = _sizes(truth[truth_fg], truth_ids)
    pred_sizes = _sizes(pred[pred_fg], pred_ids)
    iou = (inter / (truth_sizes + pred_sizes - inter)).astype(np.float32)
    return truth_ids, pred_ids, iou


def _sizes(values: NDArray[np.integer], ids: NDArray[np.int64]) -> NDArray[np.int64]:
    """Voxel counts of `ids` among the foreground `values`."""
    unique, counts = fastremap.unique(values, return_counts=True)
    return np.asarray(counts, np.int64)[np.searchsorted(unique, ids)]


def _min_cost_matching(
    num_truth: int,
    num_pred: int,
    truth_ids: NDArray[np.int64],
    pred_ids: NDArray[np.int64],
    iou: NDArray[np.float32],
) -> dict[int, int]:
    """OR-Tools min-cost flow, built as the toolkit builds it (the arc order decides ties)."""
    # Nodes: source 0, truth ids 1..nG, pred ids nG+1..nG+nP, sink nG+nP+1.
    sink = num_truth + num_pred + 1
    gt_nodes = np.arange(1, num_truth + 1)
    pred_nodes = np.arange(num_truth + 1, sink)
    # Arcs, capacity 1: source→truth (0), truth→sink (unmatched: scale + 1), truth→pred for
    # each overlapping pair (int((1 - iou) · scale), iou in float64), pred→sink (0).
    scale = int(setting("MCMF_COST_SCALE"))
    pair_costs = [int((1.0 - float(v)) * scale) for v in iou]
    tails = np.concatenate([np.zeros(num_truth), gt_nodes, truth_ids, pred_nodes])
    heads = np.concatenate(
        [gt_nodes, np.full(num_truth, sink), num_truth + pred_ids, np.full(num_pred, sink)]
    )
    costs = np.concatenate(
        [np.zeros(num_truth), np.full(num_truth, scale + 1), pair_costs, np.zeros(num_pred)]
    )
    flow = min_cost_flow.SimpleMinCostFlow()
    arcs = flow.add_arcs_with_capacity_and_unit_cost(
        tails.astype(np.int32),
        heads.astype(np.int32),
        np.ones(tails.size, np.int64),
        costs.astype(np.int64),
    )
    flow.set_node_supply(0, num_truth)
    flow.set_node_supply(sink, -num_truth)
    status = flow.solve()
    if status != flow.OPTIMAL:
        raise MatchingFailedError(f"instance matching failed: min-cost flow status {status}")
    first = 2 * num_truth  # the truth→pred arcs, in pair order
    used = flow.flows(arcs[first : first + iou.size]) == 1
    return {int(p): int(g) for g, p in zip(truth_ids[used], pred_ids[used], strict=True)}


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
    vs = tuple(float(v) for v in voxel_size)
    truth_boxes, pred_boxes = ndimage.find_objects(truth), ndimage.find_objects(pred)
    pred_ids, pred_counts = fastremap.unique(pred, return_counts=True)
    pred_count = dict(zip(pred_ids.tolist(), pred_counts.tolist(), strict=True))
    clouds: dict[int, NDArray[Any]] | None = None  # pred id -> voxel indices, made if needed
    out = []
    for tid in (int(t) for t in fastremap.unique(truth) if t != 0):
        if tid not in pred_count:  # no predicted voxel carries this id
            out.append(cap)
            continue
        truth_box, pred_box = truth_boxes[tid - 1], pred_boxes[tid - 1]
        assert truth_box is not None
        assert pred_box is not None
        box = _union(truth_box, pred_box)
        a = truth[truth_box] == tid
        if math.prod(s.stop - s.start for s in box) <= DENSE_BOX * (a.size + pred_count[tid]):
            distance = _distance_in_box(truth[box] == tid, pred[box] == tid, vs)
        else:  # the id's predicted voxels lie far apart: nearest neighbours, not a box
            clouds = clouds if clouds is not None else fastremap.point_cloud(pred)
            offset = np.array([s.start for s in truth_box])
            distance = _distance_of_points(np.argwhere(a) + offset, clouds[tid], vs)
        out.append(float(np.float32(min(distance, cap))))
    return out + [cap] * num_unmatched


# A union box larger than this many times both objects' voxels is searched point by point.
DENSE_BOX = 32


def _union(first: tuple[slice, ...], second: tuple[slice, ...]) -> tuple[slice, ...]:
    """The smallest box holding two boxes."""
    pairs = zip(first, second, strict=True)
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in pairs)


def _distance_in_box(a: NDArray[np.bool_], b: NDArray[np.bool_], vs: tuple[float, ...]) -> float:
    """Symmetric Hausdorff distance (nm) of two non-empty masks by distance transforms. Every
    voxel of both lies in the box, so it is the full volume's (the toolkit pads the box by the
    cap, which changes no distance)."""
    to_b = ndimage.distance_transform_edt(~b, sampling=vs)[a].max()
    to_a = ndimage.distance_transform_edt(~a, sampling=vs)[b].max()
    return float(max(to_b, to_a))


def _distance_of_points(a: NDArray[Any], b: NDArray[Any], vs: tuple[float, ...]) -> float:
    """Symmetric Hausdorff distance (nm) of two voxel index sets (N, 3) by k-d trees."""
    return max(_directed(a, b, vs), _directed(b, a, vs))


def _directed(a: NDArray[Any], b: NDArray[Any], vs: tuple[float, ...]) -> float:
    """Largest distance (nm) from a voxel of `a` to its nearest voxel of `b`, computed from the
    index differences as scipy's distance transform computes it, so both paths agree."""
    scale = np.asarray(vs)
    _, nearest = spatial.cKDTree(b * scale).query(a * scale)
    delta = (a.astype(np.float64) - b[nearest]) * scale  # (N, 3) nm
    squared = delta * delta
    return float(np.sqrt(squared[:, 0] + squared[:, 1] + squared[:, 2]).max())


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
    if truth.dtype == bool:  # ids for find_objects and the matching
        truth = truth.view(np.uint8)
    return _score_instance(truth, pred, vs)


def missing_label_score(
    truth: NDArray[Any], voxel_size: Sequence[float], *, instance: bool
) -> LabelScore:
    """A truth label that the submission lacks (the toolkit's `empty_label_score`): every
    truth instance a false negative with normalised Hausdorff 0, or every voxel of the crop
    (foreground or not) a false negative."""
    vs = tuple(float(v) for v in voxel_size)
    if not instance:
        size = truth.size
        return LabelScore(0, 0, size, size, vs, "missing", True)
    ids = fastremap.unique(truth)
    num_truth = int(np.count_nonzero(ids))
    return LabelScore(0, 0, num_truth, truth.size, vs, "missing", True, 0.0, num_truth)


def _score_semantic(
    truth: NDArray[np.bool_], pred: NDArray[np.bool_], vs: tuple[float, ...]
) -> LabelScore:
    tp = int(np.count_nonzero(truth & pred))
    fp, fn = int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp
    return LabelScore(tp=tp, fp=fp, fn=fn, num_voxels=truth.size, voxel_size=vs)


def _score_instance(
    truth: NDArray[np.integer], pred: NDArray[Any], vs: tuple[float, ...]
) -> LabelScore:
    labels, num_pred = connected_components(pred)
    try:
        mapping = match_instances(truth, labels)
    except (TooManyInstancesError, MatchingFailedError) as error:
        status = "matching_failed" if isinstance(error, MatchingFailedError) else None
        status = status or "skipped_too_many_instances"
        return LabelScore(0, 0, 0, truth.size, vs, status, False, 0.0, 0)
    if mapping and mapping != {0: 0}:
        # Matched ids take their truth id; unmatched ones keep their component id.
        labels = fastremap.remap(labels, {0: 0, **mapping}, preserve_missing_labels=True)
    matched_truth, matched_pred = set(mapping.values()) - {0}, set(mapping) - {0}
    num_unmatched = num_pred - len(matched_pred)
    distances = hausdorff_distances(truth, labels, vs, num_unmatched=num_unmatched)
    num_truth = len(distances) - num_unmatched
    return LabelScore(
        tp=len(matched_truth),
        fp=num_unmatched,
        fn=num_truth - len(matched_truth),
        num_voxels=truth.size,
        voxel_size=vs,
        hausdorff_norm_sum=sum(normalize_distance(d, vs) for d in distances),
        n_hausdorff=len(distances),
    )


def combine_scores(
    scores: Mapping[str, Sequence[LabelScore]], *, include_missing: bool = True
) -> dict[str, object]:
    """Per-class scores pooled over crops (label → its crops' results) and the overall means;
    without `include_missing`, missing entries are left out (and classes with only those)."""
    if not include_missing:
        found = {
            label: [r for r in results if not r.is_missing] for label, results in scores.items()
        }
        scores = {label: results for label, results in found.items() if results}
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
