"""`csc evaluate` on real zarr stores: predictions written like `csc predict` writes them, from
the ground truth itself, a 2x coarser copy, shifted copies and hand-made shapes."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from csc.cli import cli
from csc.datasplit import (
    CrawlOptions,
    DatasplitRow,
    SplitOptions,
    make_datasplit,
    select_crops,
    write_datasplit,
)
from csc.evaluation import (
    METRICS,
    ClassResult,
    EvaluationReport,
    EvaluationWarning,
    evaluate,
    format_table,
    nearest_indices,
    write_json,
)
from csc.metrics import COUNT_NAMES, batch_counts
from csc.storage import Level, annotation_attrs, multiscales_attrs, parse_multiscales, write_array
from csc.synth import SynthSpec, write_synthetic
from tests.s3server import upload_tree

CLASSES = ("nuc", "mito", "er")
# Seed 8: crop1 annotates nuc, mito and er (each with foreground), crop2 only nuc and mito.
SPEC = SynthSpec(
    num_datasets=1,
    num_crops=2,
    shape=(16, 48, 48),
    crop_shape=(16, 64, 64),
    chunks=(16, 32, 32),
    missing_class_prob=0.4,
    seed=8,
)
SEARCH = "{dataset}/{dataset}.zarr/recon-1/{name}"
Vec3 = tuple[float, float, float]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[DatasplitRow]]:
    """Synthetic crops (4 nm labels) and their datasplit rows, crop1 then crop2."""
    out = tmp_path_factory.mktemp("evaluate-data")
    write_synthetic(out, SPEC)
    crawl = CrawlOptions(search_path=f"{out}/{SEARCH}", classes=CLASSES)
    rows, _ = make_datasplit(crawl, SplitOptions(0.5, 0, None))
    write_datasplit(rows, out / "datasplit.csv")
    return out, sorted(rows, key=lambda row: row.crop)


def truth_level(row: DatasplitRow, name: str, level: int) -> tuple[np.ndarray, Level]:
    """A ground-truth level's data (z, y, x) and its placement (nm)."""
    group = zarr.open_group(f"{row.gt_root}/{row.gt_path}/{name}", mode="r")
    placement = parse_multiscales(dict(group.attrs), name)[level]
    return group[placement.path][...], placement


def write_prediction(
    root: Path,
    row: DatasplitRow,
    name: str,
    values: np.ndarray,
    scale: Sequence[float],
    translation: Sequence[float],
) -> None:
    """A prediction group as `csc predict` writes it; uint8 values are round(p * 255)."""
    group = zarr.open_group(str(root / f"{row.dataset}.zarr"), mode="a", zarr_format=2)
    crop = group.require_group(f"{row.crop}/{name}")
    encoding = {np.dtype(np.uint8): "uint8", np.dtype(np.float16): "float16"}[values.dtype]
    crop.attrs.update(multiscales_attrs(name, [(scale, translation)]))
    crop.attrs["csc_prediction"] = {"class": name, "encoding": encoding}
    write_array(crop, "s0", values, chunks=(16, 32, 32), compressor="zstd")


def perfect_predictions(root: Path, rows: Sequence[DatasplitRow]) -> None:
    """Every annotated class predicted as its own ground truth (255 or 0), on its own grid."""
    for row in rows:
        for name in row.classes:
            labels, level = truth_level(row, name, 0)
            values = (labels > 0).astype(np.uint8) * 255
            write_prediction(root, row, name, values, level.scale, level.translation)


def write_truth(
    root: Path,
    labels: np.ndarray,
    scale: Vec3,
    *,
    name: str = "blob",
    unknown: int | None = None,
    translation: Vec3 = (100.0, 200.0, 300.0),
) -> DatasplitRow:
    """A one-crop, one-class ground truth with CellMap annotation attrs, and its row."""
    store = root / "jrc_own" / "jrc_own.zarr"
    group = zarr.open_group(str(store), mode="a", zarr_format=2)
    label = group.require_group(f"recon-1/labels/groundtruth/crop1/{name}")
    label.attrs.update(multiscales_attrs(name, [(scale, translation)]))
    attrs = annotation_attrs(name, int(np.sum(labels == 0)))
    if unknown is not None:
        attrs["cellmap"]["annotation"]["annotation_type"]["encoding"]["unknown"] = unknown
    write_array(label, "s0", labels, chunks=(16, 32, 32), compressor="zstd", attrs=attrs)
    return DatasplitRow(
        "validate",
        str(store),
        "recon-1/em/fibsem-uint8",
        str(store),
        "recon-1/labels/groundtruth/crop1",
        (name,),
    )


def reference_counts(pred: np.ndarray, truth: np.ndarray, annotated: np.ndarray) -> dict[str, int]:
    """csc.metrics counts of bool (z, y, x) masks, the training validation's definition."""
    masks = [torch.from_numpy(m)[None, None] for m in (pred & annotated, truth, annotated)]
    counts = batch_counts(*masks, tolerance=1)[:, 0].tolist()
    return dict(zip(COUNT_NAMES, counts, strict=True))


def only(report: EvaluationReport, crop: str = "crop1", name: str = "blob") -> ClassResult:
    [result] = [r for r in report.results if (r.crop, r.class_name) == (crop, name)]
    return result


# --- Synthetic crops ---------------------------------------------------------------------


def test_a_perfect_prediction_scores_one_and_unannotated_classes_are_skipped(
    data: tuple[Path, list[DatasplitRow]], tmp_path: Path
) -> None:
    _, rows = data
    perfect_predictions(tmp_path, rows)
    crop2 = rows[1]
    assert "er" not in crop2.classes
    # A prediction of er where crop2 does not annotate it: skipped, never scored.
    write_prediction(tmp_path, crop2, "er", np.full((4, 4, 4), 255, np.uint8), (4,) * 3, (0,) * 3)
    report = evaluate(tmp_path, rows)
    assert [(r.crop, r.class_name) for r in report.results] == [
        ("crop1", "er"),
        ("crop1", "mito"),
        ("crop1", "nuc"),
        ("crop2", "mito"),
        ("crop2", "nuc"),
    ]
    for result in report.results:
        assert result.num_outside == 0 and result.num_scored == 16 * 64 * 64
        assert result.counts["fp"] == result.counts["fn"] == 0
        assert {m: result.scores[m] for m in METRICS} == {
            "iou": 1.0,
            "dice": 1.0,
            "precision": 1.0,
            "recall": 1.0,
            "accuracy": 1.0,
            "boundary_f1": 1.0,
            "fwiou": 1.0,
            "pixel_accuracy": 1.0,
            "hausdorff95_nm": 0.0,
        }
    [skip] = report.skipped
    assert (skip.crop, skip.class_name) == ("crop2", "er") and "not annotated" in skip.reason
    assert report.means["er"] == {
        "num_crops": 1,
        **dict.fromkeys(METRICS[:-1], 1.0),
        "hausdorff95_nm": 0.0,
    }
    assert report.means["nuc"]["num_crops"] == 2


def test_an_8nm_prediction_is_resampled_to_the_4nm_ground_truth_by_nearest_voxel(
    data: tuple[Path, list[DatasplitRow]], tmp_path: Path
) -> None:
    _, rows = data
    row = rows[0]
    for name in row.classes:  # the 8 nm level (translation t0 + 2 nm) as the prediction
        coarse, level = truth_level(row, name, 1)
        assert level.scale == (8.0, 8.0, 8.0)
        write_prediction(
            tmp_path, row, name, coarse * np.uint8(255), level.scale, level.translation
        )
    report = evaluate(tmp_path, [row])
    for name in row.classes:
        labels, _ = truth_level(row, name, 0)
        coarse, _ = truth_level(row, name, 1)
        # 4 nm voxel i is centred at t0 + 4 i, nearest to 8 nm voxel i // 2 (centre t0 + 2 + 8 j).
        nearest = coarse.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2) > 0
        annotated = np.ones(labels.shape, bool)
        expected = reference_counts(nearest, labels > 0, annotated)
        result = only(report, "crop1", name)
        assert result.counts == expected
        assert result.counts["tp"] == int(np.sum(nearest & (labels > 0)))
        assert result.counts["fp"] + result.counts["fn"] > 0  # coarser: not a copy


def test_nearest_indices_follow_voxel_centres() -> None:
    truth = Level("s0", (4.0, 4.0, 4.0), (-2.0, 6.0, 10.0), (6, 6, 6))
    coarse = Level("s0", (8.0, 8.0, 8.0), (0.0, 8.0, 12.0), (3, 3, 3))
    for index in nearest_indices(truth, coarse):
        assert index.tolist() == [0, 0, 1, 1, 2, 2]
    moved = Level("s0", (4.0, 4.0, 4.0), (6.0, 2.0, 10.0), (6, 6, 6))  # 2, -1, 0 voxels
    z, y, x = nearest_indices(truth, moved)
    assert (z.tolist(), y.tolist(), x.tolist()) == (
        [-2, -1, 0, 1, 2, 3],
        [1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 5],
    )


def test_ground_truth_and_predictions_on_s3_score_like_local_ones(
    s3_env: str, s3_synth: str, tiny_synth: Path, tmp_path: Path
) -> None:
    crawl = CrawlOptions(search_path=f"{tiny_synth}/{SEARCH}", classes=CLASSES)
    local = make_datasplit(crawl, SplitOptions(0.5, 0, None))[0][:1]  # one crop: S3 is slow
    relative = Path(local[0].gt_root).relative_to(tiny_synth)
    remote = [dataclasses.replace(local[0], gt_root=f"s3://{s3_synth}-public/{relative}")]
    perfect_predictions(tmp_path, local)
    upload_tree(s3_env, tmp_path, "evaluate-predictions", public=True)
    report = evaluate("s3://evaluate-predictions", remote)
    assert report.results == evaluate(tmp_path, local).results and len(report.results) > 0
    assert report.predictions == "s3://evaluate-predictions"


# --- Hand-made shapes --------------------------------------------------------------------


@pytest.mark.parametrize(("axis", "shift"), [(2, 2), (1, 3), (0, 1)])
def test_a_shifted_slab_has_the_shift_as_hausdorff95_in_nm(
    tmp_path: Path, axis: int, shift: int
) -> None:
    scale = (6.0, 4.0, 2.0)  # nm, (z, y, x): anisotropic, so the distance must use it
    labels = np.zeros((16, 16, 24), np.uint8)
    slab = [slice(None)] * 3
    # A slab across the crop: its only boundary is its two faces (the crop's edge is none), and
    # it stays clear of the edge when shifted, which would take away its far face.
    slab[axis] = slice(4, 11)
    labels[tuple(slab)] = 1
    row = write_truth(tmp_path / "gt", labels, scale)
    translation = [100.0, 200.0, 300.0]
    translation[axis] += shift * scale[axis]  # the prediction's world origin moves `shift` voxels
    write_prediction(tmp_path / "pred", row, "blob", labels * np.uint8(255), scale, translation)
    with pytest.warns(EvaluationWarning, match="crop1: ground truth outside the prediction"):
        report = evaluate(tmp_path / "pred", [row])
    result = only(report)
    assert result.scores["hausdorff95_nm"] == shift * scale[axis]
    outside = shift * labels.size // labels.shape[axis]  # the first `shift` layers
    assert result.num_outside == outside and result.num_scored == labels.size - outside
    assert result.counts["tp"] == (7 - shift) * outside // shift
    assert result.counts["fp"] == result.counts["fn"] == outside


def test_a_prediction_beside_the_crop_is_skipped(tmp_path: Path) -> None:
    labels = np.ones((4, 8, 8), np.uint8)
    row = write_truth(tmp_path / "gt", labels, (4.0, 4.0, 4.0))
    write_prediction(tmp_path / "pred", row, "blob", labels, (4.0, 4.0, 4.0), (100, 200, 332))
    report = evaluate(tmp_path / "pred", [row])  # x: 300-328 nm in truth, 332-360 predicted
    [skip] = report.skipped
    assert report.results == [] and report.means == {}
    assert skip.class_name == "blob" and "does not overlap the ground truth" in skip.reason


def boundary_of(mask: np.ndarray) -> np.ndarray:
    """Set voxels with an unset voxel among their 26 neighbours; outside counts as set."""
    padded = np.pad(mask, 1, constant_values=True)
    edge = np.zeros_like(mask)
    for dz, dy, dx in itertools.product((0, 1, 2), repeat=3):
        edge |= ~padded[dz : dz + mask.shape[0], dy : dy + mask.shape[1], dx : dx + mask.shape[2]]
    return mask & edge


def test_hausdorff95_of_shifted_balls_matches_brute_force(tmp_path: Path) -> None:
    scale = (8.0, 4.0, 4.0)
    z, y, x = np.meshgrid(*(np.arange(n) for n in (10, 20, 20)), indexing="ij")
    ball = ((z - 5) * 2.0) ** 2 + (y - 10.0) ** 2 + (x - 9.0) ** 2 <= 36
    moved = ((z - 6) * 2.0) ** 2 + (y - 12.0) ** 2 + (x - 10.0) ** 2 <= 30  # shifted, smaller
    row = write_truth(tmp_path / "gt", ball.astype(np.uint8), scale)
    write_prediction(
        tmp_path / "pred", row, "blob", moved * np.uint8(255), scale, (100.0, 200.0, 300.0)
    )
    result = only(evaluate(tmp_path / "pred", [row]))
    points = [np.argwhere(boundary_of(m)) * np.array(scale) for m in (moved, ball)]  # nm
    pairwise = np.linalg.norm(points[0][:, None] - points[1][None], axis=-1)
    pooled = np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)])
    assert result.scores["hausdorff95_nm"] == pytest.approx(np.percentile(pooled, 95))
    assert 0 < result.scores["hausdorff95_nm"] < pooled.max()
    assert result.counts == reference_counts(moved, ball, np.ones(ball.shape, bool))


def probability_blocks() -> tuple[np.ndarray, np.ndarray]:
    """Truth (z, y, x) and probabilities 0.2, 0.5, 0.6, 0.8 in four x blocks of 4 voxels."""
    truth = np.zeros((4, 8, 16), bool)
    truth[:, :4] = True
    probability = np.repeat(np.array([0.2, 0.5, 0.6, 0.8]), 4)[None, None].repeat(8, axis=1)
    return truth, np.repeat(probability, 4, axis=0)


@pytest.mark.parametrize("encoding", ["uint8", "float16"])
@pytest.mark.parametrize(("threshold", "num_above"), [(0.5, 2), (0.3, 3), (0.7, 1), (0.1, 4)])
def test_encodings_and_thresholds(
    tmp_path: Path, encoding: str, threshold: float, num_above: int
) -> None:
    truth, probability = probability_blocks()
    row = write_truth(tmp_path / "gt", truth.astype(np.uint8), (4.0, 4.0, 4.0))
    values = probability.astype(np.float16)
    if encoding == "uint8":
        values = np.round(probability * 255).astype(np.uint8)  # 0.5 -> 128 -> 0.502 > 0.5
        num_above += threshold == 0.5
    write_prediction(tmp_path / "pred", row, "blob", values, (4.0, 4.0, 4.0), (100, 200, 300))
    result = only(evaluate(tmp_path / "pred", [row], threshold=threshold))
    pred = np.zeros(truth.shape, bool)
    pred[..., 16 - 4 * num_above :] = True  # probability > threshold (0.5 itself is not)
    assert result.counts == reference_counts(pred, truth, np.ones(truth.shape, bool))


def test_unknown_voxels_are_not_scored_and_instance_ids_are_foreground(tmp_path: Path) -> None:
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[:, :3, :3] = 3  # two instances
    labels[:, 5:, 5:] = 7
    labels[:, :, 6:] = 255  # not annotated
    row = write_truth(tmp_path / "gt", labels, (4.0, 4.0, 4.0), unknown=255)
    prediction = np.zeros(labels.shape, np.uint8)
    prediction[:, :3, :3] = 255
    prediction[:, :, 6:] = 255  # predicted where nothing is annotated: neither TP nor FP
    write_prediction(tmp_path / "pred", row, "blob", prediction, (4.0, 4.0, 4.0), (100, 200, 300))
    result = only(evaluate(tmp_path / "pred", [row]))
    annotated = labels != 255
    assert result.num_scored == int(annotated.sum()) == 4 * 8 * 6
    truth = (labels > 0) & annotated
    assert result.counts == reference_counts(prediction > 0, truth, annotated)
    # Instance 3: 36 voxels predicted; instance 7: 12 annotated voxels (x = 5) missed.
    assert (result.counts["tp"], result.counts["fp"], result.counts["fn"]) == (36, 0, 12)


def test_json_writes_null_for_undefined_scores_and_keeps_existing_files(tmp_path: Path) -> None:
    empty = np.zeros((4, 8, 8), np.uint8)
    row = write_truth(tmp_path / "gt", empty, (4.0, 4.0, 4.0))
    write_prediction(tmp_path / "pred", row, "blob", empty, (4.0, 4.0, 4.0), (100, 200, 300))
    report = evaluate(tmp_path / "pred", [row])
    assert only(report).scores == dict.fromkeys(METRICS)  # nothing in truth nor prediction
    path = write_json(report, tmp_path / "out" / "scores.json", overwrite=False)
    written = json.loads(path.read_text())
    assert written["results"][0]["scores"] == dict.fromkeys(METRICS)
    assert written["means"]["blob"] == {"num_crops": 1, **dict.fromkeys(METRICS)}
    assert "null" in path.read_text() and "NaN" not in path.read_text()
    with pytest.raises(FileExistsError, match=r"scores\.json already exists.*--overwrite"):
        write_json(report, path, overwrite=False)
    nan = dataclasses.replace(only(report), scores={**only(report).scores, "iou": float("nan")})
    write_json(dataclasses.replace(report, results=[nan]), path, overwrite=True)
    assert json.loads(path.read_text())["results"][0]["scores"]["iou"] is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.json"]  # no temporary left


# --- Errors, crop selection and the command line -------------------------------------------


def test_errors_name_what_is_wrong(data: tuple[Path, list[DatasplitRow]], tmp_path: Path) -> None:
    _, rows = data
    with pytest.raises(ValueError, match=f"predictions folder {tmp_path}/missing does not exist"):
        evaluate(tmp_path / "missing", rows)
    (tmp_path / "other.zarr").mkdir()
    looked = f"looked for {tmp_path}/jrc_synth1.zarr/crop1, {tmp_path}/jrc_synth1.zarr/crop2"
    with pytest.raises(ValueError, match=f"no crop of the datasplit has predictions.*{looked}"):
        evaluate(tmp_path, rows)
    with pytest.raises(ValueError, match=r"holds: other\.zarr"):
        evaluate(tmp_path, rows)
    perfect_predictions(tmp_path, rows[:1])
    for threshold in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"threshold is a probability in \(0, 1\)"):
            evaluate(tmp_path, rows, threshold=threshold)
    with pytest.raises(ValueError, match=r"no crop has predictions of ves.*predicted classes: er"):
        evaluate(tmp_path, rows, classes=["ves"])
    report = evaluate(tmp_path, rows, classes=["nuc"])
    assert [(r.crop, r.class_name) for r in report.results] == [("crop1", "nuc")]
    [skip] = report.skipped
    assert (skip.crop, skip.class_name) == ("crop2", None) and "no predictions in" in skip.reason
    assert format_table(report).endswith("\nskipped 1 crop without predictions: jrc_synth1/crop2")


def test_select_crops_by_name_dataset_and_glob(data: tuple[Path, list[DatasplitRow]]) -> None:
    _, rows = data
    assert select_crops(rows, []) == rows
    assert [r.crop for r in select_crops(rows, ["crop2"])] == ["crop2"]
    assert [r.crop for r in select_crops(rows, ["jrc_synth1/crop*"])] == ["crop1", "crop2"]
    with pytest.raises(ValueError, match=r"--crops crop9 matches no crop.*jrc_synth1/crop1"):
        select_crops(rows, ["crop1", "crop9"])


def test_csc_evaluate_prints_the_table_and_writes_json(
    data: tuple[Path, list[DatasplitRow]], tmp_path: Path
) -> None:
    out, rows = data
    perfect_predictions(tmp_path / "pred", rows)
    args = [
        "evaluate",
        "--predictions",
        str(tmp_path / "pred"),
        "--datasplit",
        str(out / "datasplit.csv"),
        "--crops",
        "crop1",
        "--json",
        str(tmp_path / "s.json"),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["crop", "class", *METRICS]
    assert lines[2].split() == ["jrc_synth1/crop1", "er", *["1.000"] * 8, "0.0"]
    assert lines[5].split() == ["mean", "of", "1", "crop", "er", *["1.000"] * 8, "0.0"]
    assert lines[-1] == f"wrote {tmp_path}/s.json"
    assert json.loads((tmp_path / "s.json").read_text())["results"][0]["class"] == "er"
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "s.json already exists; pass --overwrite" in again.output
    bad = CliRunner().invoke(cli, [*args, "--overwrite", "--threshold", "2"])
    assert bad.exit_code == 1 and "Error: threshold is a probability in (0, 1)" in bad.output


def test_format_table_marks_undefined_scores() -> None:
    result = ClassResult("jrc_x", "crop1", "nuc", dict.fromkeys(METRICS), {}, 0, 0)
    report = EvaluationReport("p", 0.5, 1, [result], [], means={})
    row = format_table(report).splitlines()[2].split()
    assert row == ["jrc_x/crop1", "nuc", *["-"] * len(METRICS)]
