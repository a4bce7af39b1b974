"""csc.submissions against the challenge toolkit's own scores of the golden mini submissions
(tests/data/golden/submissions), and the layouts, checks and files around them."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from csc import __version__
from csc.cli import cli
from csc.submissions import find_submission, score_submission
from tests.test_scoring import assert_close

GOLDEN = Path(__file__).parent / "data" / "golden" / "submissions"
TRUTH = GOLDEN / "truth.zarr"
MANIFEST = GOLDEN / "test_crop_manifest.csv"
SUBMISSIONS = ["s1_pack_results", "s2_missing_crop", "s3_missing_label"]


def expected(name: str, file: str) -> dict[str, Any]:
    return dict(json.loads((GOLDEN / name / file).read_text()))


def assert_matches(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Every key and number (to 1e-6) but git_version, which is csc's own."""
    assert got["git_version"] == f"csc {__version__}"
    assert_close(
        {k: v for k, v in got.items() if k != "git_version"},
        {k: v for k, v in want.items() if k != "git_version"},
        where,
    )


def score(submission: Path, **options: Any) -> dict[str, Any]:
    return score_submission(submission, TRUTH, manifest=MANIFEST, **options)


@pytest.mark.parametrize("name", SUBMISSIONS)
def test_golden_submissions_score_as_the_challenge_scored_them(name: str, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    returned = score(GOLDEN / name / "submission.zip", result_path=result)
    assert_matches(returned, expected(name, "score_submission_return.json"), "returned")
    public = json.loads(result.read_text())
    assert_matches(public, expected(name, "result.json"), "result.json")
    extended = json.loads((tmp_path / "result_extended.json").read_text())
    assert_matches(extended, expected(name, "result_extended.json"), "result_extended.json")
    assert result.read_text() == json.dumps(public, indent=4)  # json.dump(indent=4)


def rezip(source: Path, target: Path, rename: Callable[[str], str | None]) -> Path:
    """`source`'s members under new names (None: left out)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            name = rename(info.filename)
            if name is not None:
                new.writestr(name, old.read(info))
    return target


S3 = GOLDEN / "s3_missing_label" / "submission.zip"
LAYOUTS: dict[str, Callable[[str], str | None]] = {
    "nested x.zarr": lambda name: f"outer/x.zarr/{name}",
    "crop groups named <id>": lambda name: name.removeprefix("crop"),
    "no .zgroup anywhere": lambda name: None if name.endswith(".zgroup") else name,
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tolerated_layouts_give_the_same_scores(layout: str, tmp_path: Path) -> None:
    variant = rezip(S3, tmp_path / "variant.zip", LAYOUTS[layout])
    assert_matches(score(variant), expected("s3_missing_label", "result_extended.json"), layout)


def test_a_folder_a_folder_with_one_zip_and_a_zarr_folder_score_alike(tmp_path: Path) -> None:
    want = expected("s2_missing_crop", "result_extended.json")
    holder = tmp_path / "holder"
    holder.mkdir()
    shutil.copy(GOLDEN / "s2_missing_crop" / "submission.zip", holder)
    assert_matches(score(holder), want, "folder holding one zip")
    folder = tmp_path / "submission.zarr"
    with zipfile.ZipFile(holder / "submission.zip") as archive:
        archive.extractall(folder)
    assert_matches(score(folder), want, "zarr folder")


def test_an_empty_crop_group_scores_like_a_missing_crop(tmp_path: Path) -> None:
    variant = rezip(GOLDEN / "s2_missing_crop" / "submission.zip", tmp_path / "v.zip", str)
    with zipfile.ZipFile(variant, "a") as archive:
        archive.writestr("crop9002/.zgroup", '{"zarr_format": 2}')
    assert "crop9002" in find_submission(variant).crops
    assert_matches(score(variant), expected("s2_missing_crop", "result_extended.json"), "empty")


def test_the_zip_is_read_in_place_not_a_stale_extraction_beside_it(tmp_path: Path) -> None:
    # The toolkit would reuse <zip>.zarr if it exists; csc scores what the zip holds.
    submission = tmp_path / "submission.zip"
    shutil.copy(GOLDEN / "s1_pack_results" / "submission.zip", submission)
    with zipfile.ZipFile(GOLDEN / "s3_missing_label" / "submission.zip") as archive:
        archive.extractall(tmp_path / "submission.zarr")
    assert_matches(score(submission), expected("s1_pack_results", "result_extended.json"), "s1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.zarr", "submission.zip"]


def test_zips_with_escaping_paths_or_links_are_refused(tmp_path: Path) -> None:
    escaping = rezip(S3, tmp_path / "escaping.zip", lambda name: name)
    with zipfile.ZipFile(escaping, "a") as archive:
        archive.writestr("../outside.txt", "x")
    with pytest.raises(ValueError, match=r"escaping.zip is refused.*\.\./outside.txt would be"):
        find_submission(escaping)
    linked = rezip(S3, tmp_path / "linked.zip", lambda name: name)
    link = zipfile.ZipInfo("crop9001/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(linked, "a") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match=r"linked.zip is refused.*crop9001/link is a symbolic"):
        score(linked)


def test_a_zip_over_max_uncompressed_size_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_UNCOMPRESSED_SIZE", "1000")
    with pytest.raises(ValueError, match="bytes uncompressed, more than the scorer's 1000"):
        score(S3)


def test_errors_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ground truth .*nowhere.zarr does not exist"):
        score_submission(S3, tmp_path / "nowhere.zarr", manifest=MANIFEST)
    with pytest.raises(FileNotFoundError, match=r"submission .*none.zip does not exist"):
        score(tmp_path / "none.zip")
    short = tmp_path / "short.csv"
    short.write_text("".join(MANIFEST.read_text().splitlines(keepends=True)[:3]))  # no nuc
    with pytest.raises(ValueError, match=rf"no row in the test crop manifest \({short}\) for "):
        score_submission(S3, TRUTH, manifest=short)
    other = rezip(S3, tmp_path / "other.zip", lambda name: name.replace("crop900", "crop7"))
    with pytest.raises(ValueError, match="no crop of the ground truth: it holds crop71, crop72"):
        score(other)


def write_array(path: Path, data: np.ndarray, voxel_size: tuple[float, ...]) -> None:
    array = zarr.open_array(path, mode="w", shape=data.shape, dtype=data.dtype, zarr_format=2)
    array[...] = data
    array.attrs["voxel_size"] = list(voxel_size)


def test_a_mask_hides_voxels_and_is_itself_a_missing_label(tmp_path: Path) -> None:
    truth = tmp_path / "truth.zarr"
    shutil.copytree(TRUTH, truth)
    write_array(truth / "crop9001" / "er_mask", np.zeros((32, 32, 32), np.uint8), (8, 8, 8))
    result = score_submission(S3, truth, manifest=MANIFEST)
    assert result["crop9001"]["er_mask"] == {
        "tp": 0,
        "fp": 0,
        "fn": 32768,
        "num_voxels": 32768,
        "voxel_size": [8.0, 8.0, 8.0],
        "is_missing": True,
        "status": "missing",
    }
    submitted = rezip(S3, tmp_path / "with_er.zip", lambda name: name)
    with zipfile.ZipFile(GOLDEN / "s1_pack_results" / "submission.zip") as s1:
        members = [n for n in s1.namelist() if n.startswith("crop9001/er/")]
        with zipfile.ZipFile(submitted, "a") as archive:
            for name in members:
                archive.writestr(name, s1.read(name))
    masked = score_submission(submitted, truth, manifest=MANIFEST)["crop9001"]["er"]
    assert (masked["tp"], masked["fp"], masked["fn"], masked["status"]) == (0, 0, 0, "scored")


def test_instance_classes_choose_how_labels_are_scored() -> None:
    result = score(S3, instance_classes=["nuc"])
    assert set(result["label_scores"]["mito"]) == {"iou", "tp", "fp", "fn"}
    assert "combined_score" in result["label_scores"]["nuc"]


def test_csc_evaluate_submission_writes_both_files_and_keeps_foreign_ones(tmp_path: Path) -> None:
    result = tmp_path / "out.json"
    args = ["evaluate", "-s", str(S3), "-t", str(TRUTH), "--test-crop-manifest", str(MANIFEST)]
    run = CliRunner().invoke(cli, [*args, "-r", str(result)])
    assert run.exit_code == 0, run.output
    assert "overall 0.5938 (instance 0.9404, semantic 0.3750)" in run.output
    assert "missing: crop9001/er" in run.output
    assert_matches(json.loads(result.read_text()), expected("s3_missing_label", "result.json"), "")
    extended = json.loads((tmp_path / "out_extended.json").read_text())
    assert_matches(extended, expected("s3_missing_label", "result_extended.json"), "extended")
    again = CliRunner().invoke(cli, [*args, "-r", str(result)])
    assert again.exit_code == 1 and "out.json already exists; pass --overwrite" in again.output
    replaced = CliRunner().invoke(cli, [*args, "-r", str(result), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    foreign = tmp_path / "theirs.json"
    shutil.copy(GOLDEN / "s3_missing_label" / "result.json", foreign)  # the toolkit's
    refused = CliRunner().invoke(cli, [*args, "-r", str(foreign), "--overwrite"])
    assert refused.exit_code == 1 and "is not a challenge result csc wrote" in refused.output
    assert foreign.read_text() == (GOLDEN / "s3_missing_label" / "result.json").read_text()
    assert not (tmp_path / "theirs_extended.json").exists()


def test_csc_evaluate_takes_one_mode_and_only_its_options() -> None:
    neither = CliRunner().invoke(cli, ["evaluate"])
    assert neither.exit_code == 2 and "give either --predictions" in neither.output
    mixed = CliRunner().invoke(cli, ["evaluate", "-s", str(S3), "--threshold", "0.3"])
    assert mixed.exit_code == 2 and "--threshold: not an option of csc evaluate with -s" in (
        mixed.output
    )
    other = ["evaluate", "--predictions", ".", "--test-crop-manifest", str(MANIFEST), "-r", "r"]
    wrong = CliRunner().invoke(cli, other)
    assert "--result-file, --test-crop-manifest: not an option of csc evaluate with --pred" in (
        wrong.output
    )
