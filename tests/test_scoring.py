"""csc.scoring against the challenge toolkit's own per-label results (tests/data/golden)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from csc import scoring

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("case_*.json"))
# Cases 009 and 024 hold exact IoU ties (two halves of one truth object), broken as OR-Tools
# breaks them on the toolkit's graph: pred 1 in 009, pred 2 in 024.


def load(case: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    meta = json.loads((GOLDEN / f"{case}.json").read_text())
    with np.load(GOLDEN / f"{case}.npz") as arrays:
        return meta, {key: arrays[key] for key in arrays.files}


def score(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> scoring.LabelScore:
    mask_key = meta["mask_npz_key"]
    return scoring.score_label(
        arrays["truth"],
        arrays["aligned_prediction"],
        meta["test_crop_manifest_row"]["voxel_size"],
        instance=meta["type"] == "instance",
        mask=None if mask_key is None else arrays[mask_key],
    )


def assert_close(got: object, want: object, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list | tuple) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, bool | str) or want is None:
        assert got == want, f"{where}: {got!r} != {want!r}"
    else:
        assert isinstance(got, int | float), where
        assert math.isclose(got, want, rel_tol=0, abs_tol=1e-6), f"{where}: {got} != {want}"


def test_cases_are_all_here() -> None:
    assert len(CASES) == 48  # the golden folder's per-label cases


@pytest.mark.parametrize("case", CASES)
def test_score_label_matches_toolkit(case: str) -> None:
    meta, arrays = load(case)
    result = score(meta, arrays)
    assert_close(result.as_dict(), meta["score_label_result"], "score_label_result")


@pytest.mark.parametrize("case", CASES)
def test_combine_scores_single_crop_matches_toolkit(case: str) -> None:
    meta, arrays = load(case)
    combined = scoring.combine_scores({meta["class_label"]: [score(meta, arrays)]})
    assert_close(combined, meta["combine_scores_single_crop"], "combine_scores_single_crop")


INSTANCE_CASES = [c for c in CASES if load(c)[0]["type"] == "instance"]


@pytest.mark.parametrize("case", INSTANCE_CASES)
def test_instance_intermediates_match_toolkit(case: str) -> None:
    meta, arrays = load(case)
    want = meta["intermediate"]
    truth, aligned = arrays["truth"], arrays["aligned_prediction"]
    if meta["mask_npz_key"] is not None:
        truth = truth * arrays[meta["mask_npz_key"]]
    vs = meta["test_crop_manifest_row"]["voxel_size"]
    labels, num_pred = scoring.connected_components(aligned)
    assert num_pred == want["n_pred_after_connected_components"]
    np.testing.assert_array_equal(labels, arrays["relabelled_prediction"])
    assert int(truth.max()) == want["nG_max_truth_id"]
    if want["ratio_cutoff"] is not None:  # None where nG = 0: the check is never reached
        assert_close(scoring.ratio_cutoff(int(truth.max())), want["ratio_cutoff"], "cutoff")
    cap = scoring.max_distance(truth.shape, vs)
    assert_close(cap, want["hausdorff_distance_max_nm"], "cap")
    if "matching_error" in want:
        assert want["matching_error"].startswith("TooManyInstancesError")
        with pytest.raises(scoring.TooManyInstancesError):
            scoring.match_instances(truth, labels)
        return
    mapping = scoring.match_instances(truth, labels)
    assert mapping == {int(p): g for p, g in want["mapping_pred_to_truth"].items()}
    remapped = labels.copy()
    for p, g in mapping.items():
        remapped[labels == p] = g
    num_unmatched = num_pred - len(set(mapping) - {0})
    distances = scoring.hausdorff_distances(truth, remapped, vs, num_unmatched=num_unmatched)
    assert_close(distances, want["hausdorff_distances_nm"], "hausdorff_distances_nm")
    normalized = [scoring.normalize_distance(d, vs) for d in distances]
    assert_close(normalized, want["normalized_hausdorff"], "normalized_hausdorff")


def test_too_many_instances_is_skipped_and_scores_one_alone() -> None:
    truth = np.zeros((8, 8, 8), np.uint32)
    truth[0, 0, 0] = 1
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[::2, ::2, ::2] = 1  # 64 isolated voxels vs 1 truth: ratio 64 > 50.94
    result = scoring.score_label(truth, pred, (8, 8, 8), instance=True)
    assert result.status == "skipped_too_many_instances"
    assert (result.tp, result.fp, result.fn, result.n_hausdorff) == (0, 0, 0, 0)
    label = scoring.combine_scores({"mito": [result]})["label_scores"]
    assert label["mito"]["combined_score"] == 1.0  # type: ignore[index]  # nested dict of object


def test_semantic_both_empty_scores_one_alone() -> None:
    # scoring.md §8 (golden 045, not in the folder): IoU 1.0 from the aggregation rule.
    empty = np.zeros((4, 4, 4), np.uint8)
    result = scoring.score_label(empty, empty, (8, 8, 8), instance=False)
    assert (result.tp, result.fp, result.fn) == (0, 0, 0)
    combined = scoring.combine_scores({"er": [result]})
    assert combined["label_scores"] == {"er": {"iou": 1.0, "tp": 0, "fp": 0, "fn": 0}}


def test_empty_prediction_gives_one_capped_entry_per_truth_instance() -> None:
    # scoring.md §8 (golden 005, not in the folder): m truth instances, nothing predicted.
    truth = np.zeros((32, 32, 32), np.uint32)
    truth[2:5, 2:5, 2:5], truth[20:25, 20:25, 20:25] = 1, 2
    result = scoring.score_label(truth, np.zeros_like(truth), (8, 8, 8), instance=True)
    assert (result.tp, result.fp, result.fn, result.n_hausdorff) == (0, 0, 2, 2)
    assert result.hausdorff_norm_sum == pytest.approx(2 * 0.9121806575139008, abs=1e-9)


@pytest.mark.parametrize("voxel_size", [(8.0, 8.0, 8.0), (3.48, 4.0, 4.0), (16.0, 4.0, 4.0)])
def test_far_apart_voxels_are_measured_as_the_distance_transform_measures(
    voxel_size: tuple[float, float, float],
) -> None:
    # A truth object and a prediction of the same id: a shifted copy plus a far speck, whose
    # union box is mostly empty, so csc measures it point by point (k-d trees), not by EDT.
    truth = np.zeros((48, 48, 48), np.uint32)
    pred = np.zeros_like(truth)
    truth[4:10, 5:12, 3:9] = 1
    pred[5:11, 5:13, 3:8] = 1
    pred[44, 40, 45] = 1
    a, b = truth == 1, pred == 1
    want = max(
        ndimage.distance_transform_edt(~b, sampling=voxel_size)[a].max(),
        ndimage.distance_transform_edt(~a, sampling=voxel_size)[b].max(),
    )
    capped = min(float(want), scoring.max_distance(truth.shape, voxel_size))
    got = scoring.hausdorff_distances(truth, pred, voxel_size, num_unmatched=0)
    assert got == [float(np.float32(capped))]
    points = np.argwhere(a), np.argwhere(b)
    assert scoring._distance_of_points(*points, voxel_size) == want  # bit for bit


def test_too_many_overlapping_pairs_skip_the_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = np.zeros((8, 8, 8), np.uint32)
    truth[:4], truth[4:] = 1, 2
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[2:6] = 1  # one prediction over both truth instances: 2 overlapping pairs
    monkeypatch.setenv("MAX_OVERLAP_EDGES", "1")  # the challenge's override
    result = scoring.score_label(truth, pred, (8, 8, 8), instance=True)
    assert (result.status, result.tp, result.fp, result.fn) == (
        "skipped_too_many_instances",
        0,
        0,
        0,
    )
    monkeypatch.setenv("MAX_OVERLAP_EDGES", "2")
    assert scoring.score_label(truth, pred, (8, 8, 8), instance=True).status == "scored"


def test_the_challenges_environment_overrides_the_ratio_cutoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    truth = np.zeros((8, 8, 8), np.uint32)
    truth[0, 0, 0] = 1
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[::2, ::2, :4:2] = 1  # 32 isolated voxels vs 1 truth: below the default 50.94
    assert scoring.score_label(truth, pred, (8, 8, 8), instance=True).status == "scored"
    monkeypatch.setenv("INITIAL_INSTANCE_RATIO_CUTOFF", "20")  # 10 + 20·e^-0.2 = 26.4 < 32
    assert scoring.ratio_cutoff(1) == pytest.approx(10 + 20 * np.exp(-0.2))
    result = scoring.score_label(truth, pred, (8, 8, 8), instance=True)
    assert result.status == "skipped_too_many_instances"
    monkeypatch.setenv("FINAL_INSTANCE_RATIO_CUTOFF", "ten")
    with pytest.raises(ValueError, match=r"FINAL_INSTANCE_RATIO_CUTOFF='ten' must be a number"):
        scoring.ratio_cutoff(1)
