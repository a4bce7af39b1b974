"""csc.metrics: hand-made cases, scikit-learn on random data, boundary F1 and empty classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from torch import Tensor

from csc.metrics import (
    COUNT_NAMES,
    METRIC_NAMES,
    SegmentationMetrics,
    batch_counts,
    boundary,
    dilate,
)

NAN = math.nan
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def as_logits(pred: Tensor) -> Tensor:
    """A 0/1 prediction as logits far from the threshold."""
    return (pred.float() * 2 - 1) * 10


def square(size: int, top: int, left: int, side: int) -> Tensor:
    """A (1, 1, size, size) float mask with a filled square."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., top : top + side, left : left + side] = 1
    return mask


def scores(metrics: SegmentationMetrics, class_name: str) -> dict[str, float | None]:
    result = metrics.compute()
    return {name: result[name][class_name] for name in METRIC_NAMES}  # type: ignore[index]


def test_hand_computed_counts_and_scores() -> None:
    # (1, 1, 2, 3): truth [[1, 1, 0], [0, NaN, 1]], prediction [[1, 0, 1], [0, 1, 1]].
    target = torch.tensor([[[[1.0, 1.0, 0.0], [0.0, NAN, 1.0]]]])
    pred = torch.tensor([[[[1, 0, 1], [0, 1, 1]]]])
    metrics = SegmentationMetrics(["mito"])
    metrics.update(as_logits(pred), target)
    tp, fp, fn, tn = metrics.counts[:4, 0].tolist()
    assert (tp, fp, fn, tn) == (2, 1, 1, 1)  # the NaN voxel counts nowhere
    result = scores(metrics, "mito")
    assert result["iou"] == pytest.approx(2 / 4)
    assert result["dice"] == pytest.approx(4 / 6)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert metrics.compute()["num_scored"] == 1


def test_threshold_is_on_the_probability() -> None:
    target = torch.tensor([[[[1.0, 1.0, 1.0]]]])
    probs = torch.tensor([[[[0.7999, 0.8001, 0.95]]]], dtype=torch.float64)
    metrics = SegmentationMetrics(["a"], threshold=0.8)
    metrics.update(torch.logit(probs), target.double())
    assert metrics.counts[:3, 0].tolist() == [2, 0, 1]  # TP, FP, FN: 0.7999 is a miss


def test_counts_accumulate_over_batches_instead_of_averaging_scores() -> None:
    metrics = SegmentationMetrics(["a"])
    metrics.update(as_logits(torch.ones(1, 1, 1, 1)), torch.ones(1, 1, 1, 1))  # IoU 1 alone
    metrics.update(as_logits(torch.zeros(1, 1, 1, 3)), torch.ones(1, 1, 1, 3))  # IoU 0 alone
    assert scores(metrics, "a")["iou"] == pytest.approx(1 / 4)  # not (1 + 0) / 2


def test_reset_forgets_the_counts() -> None:
    metrics = SegmentationMetrics(["a"])
    metrics.update(as_logits(torch.ones(1, 1, 2, 2)), torch.ones(1, 1, 2, 2))
    metrics.reset()
    assert metrics.counts.sum() == 0 and metrics.compute()["num_scored"] == 0


def random_pass(shape: tuple[int, ...], num_batches: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Batches of logits and targets with NaN for whole classes and for scattered voxels."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        logits = torch.randn(shape, generator=gen)
        target = (torch.rand(shape, generator=gen) < 0.4).float()
        target[torch.rand(shape, generator=gen) < 0.2] = NAN  # scattered unknown voxels
        target[torch.rand(shape[:2], generator=gen) < 0.3] = NAN  # classes missing in a crop
        batches.append((logits, target))
    return batches


def sklearn_scores(batches: list[tuple[Tensor, Tensor]], index: int) -> dict[str, float]:
    """Scores of one class from all annotated voxels of the pass, by scikit-learn."""
    truth, pred = [], []
    for logits, target in batches:
        keep = ~target[:, index].isnan()
        truth.append(target[:, index][keep].numpy().astype(int))
        pred.append((torch.sigmoid(logits[:, index][keep]) > 0.5).numpy().astype(int))
    y_true, y_pred = np.concatenate(truth), np.concatenate(pred)
    return {
        "iou": skm.jaccard_score(y_true, y_pred, zero_division=0),
        "dice": skm.f1_score(y_true, y_pred, zero_division=0),
        "precision": skm.precision_score(y_true, y_pred, zero_division=0),
        "recall": skm.recall_score(y_true, y_pred, zero_division=0),
        "accuracy": skm.accuracy_score(y_true, y_pred),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 4, 4, 8, 8)], ids=["2d", "3d"])
def test_matches_sklearn_over_a_pass(shape: tuple[int, ...], device: str) -> None:
    classes = ["nuc", "mito", "er", "ves"]
    batches = random_pass(shape, num_batches=4, seed=len(shape))
    metrics = SegmentationMetrics(classes)
    for logits, target in batches:
        metrics.update(logits.to(device), target.to(device))
    result = metrics.compute()
    assert result["num_scored"] == len(classes)
    for index, name in enumerate(classes):
        expected = sklearn_scores(batches, index)
        for metric, value in expected.items():
            assert result[metric][name] == pytest.approx(value), (metric, name)  # type: ignore[index]
    for metric in expected:
        mean = np.mean([result[metric][name] for name in classes])  # type: ignore[index]
        assert result[metric]["mean"] == pytest.approx(mean)  # type: ignore[index]


@pytest.mark.parametrize(("tolerance", "expected"), [(0, 2 / 8), (1, 1.0)])
def test_boundary_f1_of_a_shifted_square(tolerance: int, expected: float) -> None:
    # Truth: 3x3 square at (1, 1); prediction: the same square at (2, 2). Each has an 8-voxel
    # ring; the rings share (2, 3) and (3, 2), and every voxel of one ring lies within one voxel
    # of the other ring.
    metrics = SegmentationMetrics(["a"], boundary_tolerance=tolerance)
    metrics.update(as_logits(square(7, 2, 2, 3)), square(7, 1, 1, 3))
    counts = dict(zip(COUNT_NAMES, metrics.counts[:, 0].tolist(), strict=True))
    assert counts["pred_boundary"] == counts["true_boundary"] == 8
    assert scores(metrics, "a")["boundary_f1"] == pytest.approx(expected)


def test_boundary_of_a_square_is_its_ring_and_the_patch_edge_is_not_a_boundary() -> None:
    ring = boundary(square(5, 1, 1, 3).bool())[0, 0]
    assert ring.sum() == 8 and not ring[2, 2]
    assert boundary(torch.ones(1, 1, 4, 4, dtype=torch.bool)).sum() == 0
    assert boundary(torch.ones(1, 1, 3, 3, 3, dtype=torch.bool)).sum() == 0
    cube = torch.zeros(1, 1, 5, 5, 5, dtype=torch.bool)
    cube[..., 1:4, 1:4, 1:4] = True
    assert boundary(cube).sum() == 27 - 1


def brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Set voxels with an unset neighbour in the 3^n cube (out of bounds counts as set)."""
    padded = np.pad(mask, 1, constant_values=True)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3,) * mask.ndim)
    return mask & ~windows.reshape(*mask.shape, -1).all(axis=-1)


def brute_matched(points: np.ndarray, others: np.ndarray, tolerance: int) -> int:
    """How many of `points` lie within Chebyshev distance `tolerance` of one of `others`."""
    if len(points) == 0 or len(others) == 0:
        return 0
    distance = np.abs(points[:, None, :] - others[None, :, :]).max(axis=-1)
    return int((distance <= tolerance).any(axis=1).sum())


def brute_boundary_f1(pairs: list[tuple[np.ndarray, np.ndarray]], tolerance: int) -> float:
    """Boundary F1 of one class from (prediction, truth) masks, by loops over voxel lists."""
    pred_total = pred_matched = true_total = true_matched = 0
    for pred, truth in pairs:
        pred_points = np.argwhere(brute_boundary(pred))
        true_points = np.argwhere(brute_boundary(truth))
        pred_total, true_total = pred_total + len(pred_points), true_total + len(true_points)
        pred_matched += brute_matched(pred_points, true_points, tolerance)
        true_matched += brute_matched(true_points, pred_points, tolerance)
    precision, recall = pred_matched / pred_total, true_matched / true_total
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("tolerance", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 1, 12, 12), (2, 1, 6, 8, 8)], ids=["2d", "3d"])
def test_boundary_f1_matches_a_brute_force_count(shape: tuple[int, ...], tolerance: int) -> None:
    batches = random_pass(shape, num_batches=2, seed=tolerance)
    metrics = SegmentationMetrics(["a"], boundary_tolerance=tolerance)
    pairs = []
    for logits, target in batches:
        metrics.update(logits, target)
        annotated = ~target.isnan()
        pred = ((logits > 0) & annotated).numpy()
        truth = (target == 1).numpy()
        pairs += [(pred[b, 0], truth[b, 0]) for b in range(shape[0])]
    expected = brute_boundary_f1(pairs, tolerance)
    assert scores(metrics, "a")["boundary_f1"] == pytest.approx(expected)


def empty_case_metrics() -> SegmentationMetrics:
    """Five classes over two batches of (1, 5, 4, 4), each an empty case of docs/metrics.md."""
    classes = ["good", "absent", "missed", "false_alarm", "unannotated"]
    metrics = SegmentationMetrics(classes)
    for _ in range(2):
        target, pred = torch.zeros(1, 5, 4, 4), torch.zeros(1, 5, 4, 4)
        target[0, 0, :2, :2] = pred[0, 0, :2, :2] = 1  # good: perfect
        target[0, 2, 1:3, 1:3] = 1  # missed: in the truth, never predicted
        pred[0, 3, 1:3, 1:3] = 1  # false_alarm: predicted, never in the truth
        target[0, 4] = NAN  # unannotated: predictions there do not count
        pred[0, 4] = 1
        metrics.update(as_logits(pred), target)
    return metrics


def test_empty_cases() -> None:
    result = empty_case_metrics().compute()
    for metric in METRIC_NAMES:
        assert result[metric]["absent"] is None and result[metric]["unannotated"] is None  # type: ignore[index]
    assert result["iou"]["good"] == result["boundary_f1"]["good"] == 1.0  # type: ignore[index]
    for name in ("missed", "false_alarm"):
        for metric in ("iou", "dice", "precision", "recall", "boundary_f1"):
            assert result[metric][name] == 0.0, (metric, name)  # type: ignore[index]
    assert result["accuracy"]["missed"] == pytest.approx(12 / 16)  # type: ignore[index]
    assert result["num_scored"] == 3 and result["num_scored_boundary"] == 3
    assert result["iou"]["mean"] == pytest.approx(1 / 3)  # type: ignore[index]


def test_no_value_is_nan() -> None:
    result = empty_case_metrics().compute()
    values = [v for m in METRIC_NAMES for v in result[m].values()]  # type: ignore[union-attr]
    assert all(v is None or math.isfinite(v) for v in values)


def test_no_scored_class_gives_none_means() -> None:
    metrics = SegmentationMetrics(["a", "b"])
    target = torch.zeros(2, 2, 3, 3)
    target[:, 1] = NAN
    metrics.update(as_logits(torch.zeros(2, 2, 3, 3)), target)
    result = metrics.compute()
    assert result["num_scored"] == 0 and result["num_scored_boundary"] == 0
    assert all(result[m] == {"a": None, "b": None, "mean": None} for m in METRIC_NAMES)


def test_no_metrics_before_any_update() -> None:
    assert SegmentationMetrics(["a"]).compute()["iou"] == {"a": None, "mean": None}


def test_boundary_f1_is_none_when_neither_side_has_a_boundary() -> None:
    # A class that fills the whole patch in truth and prediction: IoU 1, no boundary to compare.
    metrics = SegmentationMetrics(["a", "b"])
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0] = 1
    target[0, 1, 1:3, 1:3] = 1
    metrics.update(as_logits(target), target)
    result = metrics.compute()
    assert result["iou"]["a"] == 1.0 and result["boundary_f1"]["a"] is None  # type: ignore[index]
    assert result["num_scored"] == 2 and result["num_scored_boundary"] == 1
    assert result["boundary_f1"]["mean"] == 1.0  # type: ignore[index]


def test_update_keeps_no_graph() -> None:
    logits = torch.randn(1, 1, 4, 4, requires_grad=True)
    metrics = SegmentationMetrics(["a"])
    metrics.update(logits * 2, torch.ones(1, 1, 4, 4))
    assert metrics.counts.dtype == torch.int64 and not metrics.counts.requires_grad


@pytest.mark.parametrize(
    ("logits_shape", "target_shape", "message"),
    [
        ((1, 2, 4, 4), (1, 2, 4, 5), "same shape"),
        ((1, 2, 4), (1, 2, 4), r"\(B, C, Y, X\) or \(B, C, Z, Y, X\)"),
        ((1, 3, 4, 4), (1, 3, 4, 4), "3 channels but the metrics were made for 2 classes"),
    ],
)
def test_update_rejects_bad_shapes(
    logits_shape: tuple[int, ...], target_shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentationMetrics(["a", "b"]).update(torch.zeros(logits_shape), torch.zeros(target_shape))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": []}, "non-empty list"),
        ({"classes": "mito"}, "non-empty list"),
        ({"classes": ["a"], "threshold": 1.0}, r"threshold is a probability in \(0, 1\)"),
        ({"classes": ["a"], "boundary_tolerance": -1}, "boundary_tolerance must be >= 0"),
        ({"classes": ["a"], "boundary_tolerance": 1.5}, "must be an integer"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentationMetrics(**kwargs)  # type: ignore[arg-type]


def test_fwiou_and_pixel_accuracy_by_hand() -> None:
    # Class a, 4 x 4 all annotated: truth a 2x2 square, prediction 6 voxels holding 3 of it:
    # TP 3, FP 3, FN 1, TN 9. Class b: the right half unannotated; truth and prediction agree
    # on 2 of its 8 annotated voxels: TP 2, TN 6.
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, :2, :2] = 1
    pred = torch.zeros(1, 2, 4, 4)
    pred[0, 0, 0, :3] = pred[0, 0, 1, 0] = pred[0, 0, 3, 2:] = 1
    target[0, 1, :, 2:] = NAN
    target[0, 1, :2, 0] = pred[0, 1, :2, 0] = 1
    metrics = SegmentationMetrics(["a", "b"])
    metrics.update(as_logits(pred), target)
    assert metrics.counts[:4, 0].tolist() == [3, 3, 1, 9]
    assert metrics.counts[:4, 1].tolist() == [2, 0, 0, 6]
    result = metrics.compute()
    # FWIoU: foreground IoU 3/7 weighted by the truth's 4/16, background IoU 9/13 by 12/16.
    assert result["fwiou"]["a"] == pytest.approx(4 / 16 * 3 / 7 + 12 / 16 * 9 / 13)  # type: ignore[index]
    assert result["fwiou"]["b"] == pytest.approx(1.0)  # type: ignore[index]
    assert result["fwiou"]["mean"] == pytest.approx((4 / 16 * 3 / 7 + 12 / 16 * 9 / 13 + 1) / 2)  # type: ignore[index]
    assert result["pixel_accuracy"]["a"] == result["accuracy"]["a"] == pytest.approx(12 / 16)  # type: ignore[index]
    assert result["pixel_accuracy"]["b"] == pytest.approx(1.0)  # type: ignore[index]
    # Pooled over both classes' 24 annotated voxels (20 right), not the classes' mean 0.875.
    assert result["pixel_accuracy"]["mean"] == pytest.approx(20 / 24)  # type: ignore[index]
    assert result["accuracy"]["mean"] == pytest.approx(0.875)  # type: ignore[index]


def test_pooled_pixel_accuracy_leaves_out_skipped_classes() -> None:
    metrics = empty_case_metrics()
    result = metrics.compute()
    # good (16 + 16 right of 32), missed (12 + 12 of 32), false_alarm (12 + 12 of 32).
    assert result["pixel_accuracy"]["mean"] == pytest.approx((32 + 24 + 24) / 96)  # type: ignore[index]
    assert result["fwiou"]["absent"] is None and result["pixel_accuracy"]["absent"] is None  # type: ignore[index]


@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 2, 5, 6, 4)])
@pytest.mark.parametrize("radius", [0, 1, 2, 7])
def test_dilate_and_boundary_equal_max_pooling(shape: tuple[int, ...], radius: int) -> None:
    """The shift-and-OR box against max pooling (outside the patch: -inf, i.e. unset)."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(radius)) > 0.7
    pool = torch.nn.functional.max_pool2d if len(shape) == 4 else torch.nn.functional.max_pool3d
    kernel = 2 * radius + 1
    expected = pool(mask.float(), kernel_size=kernel, stride=1, padding=radius) > 0
    assert torch.equal(dilate(mask, radius), expected)
    unset_near = pool((~mask).float(), kernel_size=3, stride=1, padding=1) > 0
    assert torch.equal(boundary(mask), mask & unset_near)


@pytest.mark.parametrize("shape", [(3, 2, 17, 19), (2, 3, 5, 9, 11)])
@pytest.mark.parametrize("tolerance", [0, 1, 2, None])
def test_batch_counts_equal_the_counts_of_their_definitions(
    shape: tuple[int, ...], tolerance: int | None
) -> None:
    """The counts (summed as bytes, FP and FN derived) equal each mask of COUNT_NAMES counted
    on its own, with some voxels unannotated; without a tolerance the boundary rows are 0."""
    generator = torch.Generator().manual_seed(7)
    annotated = torch.rand(shape, generator=generator) > 0.3
    truth = (torch.rand(shape, generator=generator) > 0.6) & annotated
    pred = (torch.rand(shape, generator=generator) > 0.5) & annotated
    pred_edge, true_edge = boundary(pred), boundary(truth)
    masks = {
        "tp": pred & truth,
        "fp": pred & ~truth,
        "fn": ~pred & truth,
        "tn": ~pred & ~truth & annotated,
        "pred_boundary": pred_edge,
        "pred_boundary_matched": pred_edge & dilate(true_edge, tolerance or 0),
        "true_boundary": true_edge,
        "true_boundary_matched": true_edge & dilate(pred_edge, tolerance or 0),
    }
    axes = [0, *range(2, len(shape))]  # every axis but the class
    expected = torch.stack([masks[name].sum(axes) for name in COUNT_NAMES])
    if tolerance is None:
        expected[4:] = 0
    counts = batch_counts(pred, truth, annotated, tolerance=tolerance)
    assert counts.dtype == torch.int64
    assert torch.equal(counts, expected)
