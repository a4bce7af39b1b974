"""csc pack-results against the toolkit's own packed submission (golden s1), and csc
check-submission on small zips written here."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from csc.cli import cli
from csc.packing import pack_results, submission_values
from csc.storage import multiscales_attrs, open_label_root, read_label
from csc.submission_check import Problem, check_submission

SUBMISSIONS = Path(__file__).parent / "data" / "golden" / "submissions"
S1 = SUBMISSIONS / "s1_pack_results"
MANIFEST = SUBMISSIONS / "test_crop_manifest.csv"
LABELS = ["crop9001/mito", "crop9001/er", "crop9001/nuc", "crop9002/mito", "crop9002/cyto"]


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    """The golden s1 processed predictions, unzipped: {dataset}.zarr/{crop}/{label}."""
    with zipfile.ZipFile(S1 / "processed_inputs.zip") as archive:
        archive.extractall(tmp_path / "processed")
    return tmp_path / "processed"


def packed_array(zip_path: Path, label: str) -> Any:
    return open_label_root(zip_path)[label]


def pack(processed: Path, output: Path, **options: Any) -> Any:
    template = str(processed / "{dataset}.zarr" / "{crop}")
    return pack_results(template, output, manifest=MANIFEST, **options)


def test_pack_results_matches_the_toolkit_where_it_loses_nothing(
    processed: Path, tmp_path: Path
) -> None:
    report = pack(processed, tmp_path / "out" / "submission.zarr", workers=2)
    assert report.zip_path == tmp_path / "out" / "submission.zip"
    assert sorted(report.packed) == sorted(LABELS) and report.missing == ()
    for label in ("crop9001/mito", "crop9002/mito", "crop9002/cyto"):  # resampled and shifted
        ours, theirs = (
            packed_array(report.zip_path, label),
            packed_array(S1 / "submission.zip", label),
        )
        assert ours.dtype == theirs.dtype == np.uint8
        np.testing.assert_array_equal(ours[...], theirs[...])


def test_pack_results_keeps_what_the_toolkit_cast_loses(processed: Path, tmp_path: Path) -> None:
    report = pack(processed, tmp_path / "submission.zarr")
    source = processed / "synth_a.zarr" / "crop9001"
    nuc_in = read_label(source / "nuc", target_voxel_size=(8, 8, 8)).data
    nuc_ours = packed_array(report.zip_path, "crop9001/nuc")[...]
    nuc_theirs = packed_array(S1 / "submission.zip", "crop9001/nuc")[...]
    assert 256 in nuc_in and nuc_ours.dtype == np.uint8
    ids_in = np.unique(nuc_in[nuc_in > 0])
    assert len(np.unique(nuc_ours[nuc_ours > 0])) == len(ids_in)  # id 256 kept as an object
    assert len(np.unique(nuc_theirs[nuc_theirs > 0])) == len(ids_in) - 1  # wrapped to 0
    np.testing.assert_array_equal(nuc_ours > 0, nuc_in > 0)
    er_in = read_label(source / "er", target_voxel_size=(8, 8, 8)).data
    er_ours = packed_array(report.zip_path, "crop9001/er")[...]
    assert er_in.dtype == np.float32 and set(np.unique(er_in)) >= {np.float32(0.9)}
    np.testing.assert_array_equal(er_ours, (er_in > 0.5).astype(np.uint8))  # 0.9 kept as 1
    assert not packed_array(S1 / "submission.zip", "crop9001/er")[...].any()  # truncated to 0


def test_packed_layout_is_the_toolkits(processed: Path, tmp_path: Path) -> None:
    report = pack(processed, tmp_path / "submission.zarr")
    with zipfile.ZipFile(report.zip_path) as ours, zipfile.ZipFile(S1 / "submission.zip") as theirs:
        assert sorted(ours.namelist()) == sorted(
            json.loads((S1 / "zip_member_names.json").read_text())
        )
        assert {i.compress_type for i in ours.infolist()} == {zipfile.ZIP_DEFLATED}
        for name in ours.namelist():
            if name.endswith(".zarray"):
                keys = ("chunks", "compressor", "dtype", "fill_value", "filters", "order", "shape")
                mine, golden = json.loads(ours.read(name)), json.loads(theirs.read(name))
                assert {k: mine[k] for k in keys} == {k: golden[k] for k in keys}, name
    metadata = json.loads((S1 / "packed_zarr_metadata.json").read_text())
    for label, want in metadata.items():
        array = packed_array(report.zip_path, label)
        assert list(array.shape) == want["shape"] and list(array.chunks) == want["chunks"]
        assert dict(array.attrs) == want["attrs"], label
        if label != "crop9001/er" and label != "crop9001/nuc":  # csc keeps what these lose
            assert array.dtype.name == want["dtype"]
            assert int(np.count_nonzero(array[...])) == want["nonzero"], label


def test_pack_results_refuses_to_replace_what_csc_did_not_write(
    processed: Path, tmp_path: Path
) -> None:
    output = tmp_path / "submission.zarr"
    pack(processed, output)
    with pytest.raises(FileExistsError, match="--overwrite"):
        pack(processed, output)
    pack(processed, output, overwrite=True)  # its own output is replaced
    other = tmp_path / "mine.zip"
    other.write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match="not written by csc"):
        pack(processed, tmp_path / "mine.zarr", overwrite=True)
    assert other.read_bytes() == b"a user's file"
    zarr.open_group(tmp_path / "theirs.zarr", mode="w", zarr_format=2)
    with pytest.raises(FileExistsError, match="no csc marker"):
        pack(processed, tmp_path / "theirs.zarr", overwrite=True)
    assert not (tmp_path / "theirs.zip").exists()


def test_pack_results_skips_missing_rows_and_needs_one(processed: Path, tmp_path: Path) -> None:
    (processed / "synth_b.zarr").rename(tmp_path / "elsewhere.zarr")
    report = pack(processed, tmp_path / "submission.zarr")
    assert sorted(report.packed) == sorted(LABELS[:3]) and len(report.missing) == 2
    assert "crop9002/mito (not found at" in report.missing[0]
    assert open_label_root(report.zip_path)["crop9002"] is not None  # an empty crop group
    with pytest.raises(ValueError, match="none of the 5 test crop labels"):
        pack_results(str(tmp_path / "nothing/{crop}"), tmp_path / "s.zarr", manifest=MANIFEST)
    with pytest.raises(ValueError, match=r"only the placeholders \{crop\} and \{dataset\}"):
        pack_results("{crop}/{label}", tmp_path / "s.zarr", manifest=MANIFEST)


def test_submission_values() -> None:
    small = np.array([0, 3, 255], np.uint16)
    assert submission_values(small, instance=True, where="x").dtype == np.uint8
    big = np.array([0, 70000, 123456, 70000], np.uint32)
    np.testing.assert_array_equal(submission_values(big, instance=True, where="x"), [0, 1, 2, 1])
    many = np.arange(300, dtype=np.uint32)
    with pytest.warns(UserWarning, match="299 instances do not fit uint8; written as uint16"):
        relabelled = submission_values(many, instance=True, where="x")
    assert relabelled.dtype == np.uint16 and len(np.unique(relabelled)) == 300
    probabilities = np.array([0.1, 0.5, 0.9], np.float32)
    np.testing.assert_array_equal(
        submission_values(probabilities, instance=False, where="x"), [0, 0, 1]
    )
    semantic_ids = np.array([0, 7, 300], np.uint16)
    np.testing.assert_array_equal(
        submission_values(semantic_ids, instance=False, where="x"), [0, 1, 1]
    )
    np.testing.assert_array_equal(
        submission_values(np.array([0, 255], np.uint8), instance=False, where="x"), [0, 255]
    )


def test_pack_results_cli_checks_what_it_wrote(processed: Path, tmp_path: Path) -> None:
    output = tmp_path / "submission.zarr"
    args = ["pack-results", "-i", str(processed / "{dataset}.zarr" / "{crop}"), "-o", str(output)]
    result = CliRunner().invoke(cli, [*args, "--test-crop-manifest", str(MANIFEST), "--check"])
    assert result.exit_code == 0, result.output
    assert "packed 5 labels of 2 crops" in result.output and "0 errors, 0 missing" in result.output
    again = CliRunner().invoke(cli, [*args, "--test-crop-manifest", str(MANIFEST)])
    assert again.exit_code == 1 and "pass --overwrite" in again.output


# --- check-submission ----------------------------------------------------------------------


def golden_zip(
    tmp_path: Path,
    name: str = "s.zip",
    *,
    drop: str = "",
    extra: dict[str, bytes] | None = None,
    rename: Any = None,
    change: dict[str, Any] | None = None,
) -> Path:
    """The golden s1 submission rewritten: members starting with `drop` left out, `extra`
    added, names passed through `rename`, JSON members updated with `change`."""
    target = tmp_path / name
    with zipfile.ZipFile(S1 / "submission.zip") as source, zipfile.ZipFile(target, "w") as out:
        for info in source.infolist():
            if drop and info.filename.startswith(drop):
                continue
            data = source.read(info)
            if change and info.filename in change:
                data = json.dumps({**json.loads(data), **change[info.filename]}).encode()
            out.writestr(rename(info.filename) if rename else info.filename, data)
        for member, data in (extra or {}).items():
            out.writestr(member, data)
    return target


def levels(problems: list[Problem]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in problems:
        found.setdefault(problem.level, []).append(f"{problem.where}: {problem.message}")
    return found


def test_the_toolkits_submission_passes(tmp_path: Path) -> None:
    assert check_submission(S1 / "submission.zip", manifest=MANIFEST) == []


def test_check_submission_lists_missing_and_ignored(tmp_path: Path) -> None:
    extra = {"crop9001/ld/.zarray": b"{}", "crop1/.zgroup": b"{}"}
    path = golden_zip(tmp_path, drop="crop9002", extra=extra)
    found = levels(check_submission(path, manifest=MANIFEST))
    assert set(found) == {"missing", "ignored"}
    assert [m.split(":")[0] for m in found["missing"]] == ["crop9002/mito", "crop9002/cyto"]
    assert [m.split(":")[0] for m in found["ignored"]] == ["crop1", "crop9001/ld"]
    no_er = levels(
        check_submission(golden_zip(tmp_path, "e.zip", drop="crop9001/er"), manifest=MANIFEST)
    )
    assert no_er == {"missing": ["crop9001/er: label not submitted: scored as missing"]}


def test_check_submission_finds_wrong_shapes_dtypes_and_attrs(tmp_path: Path) -> None:
    change = {
        "crop9001/mito/.zarray": {"shape": [32, 32, 16], "dtype": "<f4"},
        "crop9001/nuc/.zattrs": {"voxel_size": [4.0, 4.0, 4.0]},
        "crop9002/cyto/.zattrs": {"translation": [0.0, 0.0, 8.0], "shape": [1, 2, 3]},
    }
    found = levels(check_submission(golden_zip(tmp_path, change=change), manifest=MANIFEST))
    assert set(found) == {"error"}
    errors = "\n".join(found["error"])
    assert "crop9001/mito: shape [32, 32, 16] != [32, 32, 32]" in errors
    assert "crop9001/mito: dtype <f4: not integer or bool" in errors
    assert (
        "crop9001/nuc: attribute voxel_size [4.0, 4.0, 4.0] != the row's [8.0, 8.0, 8.0]" in errors
    )
    assert (
        "crop9002/cyto: attribute translation" in errors
        and "crop9002/cyto: attribute shape" in errors
    )


def test_check_submission_refuses_what_the_scorer_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip")
    assert levels(check_submission(broken, manifest=MANIFEST))["error"][0].endswith(
        "cannot be read as a zip file (File is not a zip file)"
    )
    outside = golden_zip(tmp_path, "o.zip", extra={"../evil": b"x"})
    assert levels(check_submission(outside, manifest=MANIFEST)) == {
        "error": ["../evil: would be extracted outside"]
    }
    link = tmp_path / "l.zip"
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("crop9001/link")
        info.external_attr = 0o120777 << 16  # a symbolic link
        archive.writestr(info, "/etc/passwd")
    assert (
        "crop9001/link: is a symbolic link"
        in levels(check_submission(link, manifest=MANIFEST))["error"]
    )
    monkeypatch.setenv("MAX_UNCOMPRESSED_SIZE", "1000")
    big = levels(check_submission(S1 / "submission.zip", manifest=MANIFEST))["error"]
    assert big == [
        "zip: 5833 bytes uncompressed, more than the scorer's 1000 (MAX_UNCOMPRESSED_SIZE)"
    ]


def test_check_submission_notes_what_the_scorer_tolerates(tmp_path: Path) -> None:
    nested = golden_zip(
        tmp_path, rename=lambda name: f"team/submission.zarr/{name}", drop=".zgroup"
    )
    found = levels(check_submission(nested, manifest=MANIFEST))
    assert set(found) == {"note"} and len(found["note"]) == 2  # nested, no root .zgroup
    bare = golden_zip(tmp_path, "b.zip", rename=lambda name: name.removeprefix("crop"))
    assert levels(check_submission(bare, manifest=MANIFEST)) == {
        "note": [".: crop groups without 'crop'; renamed"]
    }


def test_check_submission_cli_exits_1_on_errors(tmp_path: Path) -> None:
    good = CliRunner().invoke(
        cli, ["check-submission", str(S1 / "submission.zip"), "--test-crop-manifest", str(MANIFEST)]
    )
    assert good.exit_code == 0 and "bytes (5833 uncompressed)" in good.output, good.output
    bad = golden_zip(tmp_path, change={"crop9001/mito/.zarray": {"dtype": "<f4"}})
    result = CliRunner().invoke(
        cli, ["check-submission", str(bad), "--test-crop-manifest", str(MANIFEST)]
    )
    assert result.exit_code == 1 and "1 errors" in result.output


def test_check_submission_on_the_toolkits_own_zips() -> None:
    missing_crop = levels(
        check_submission(SUBMISSIONS / "s2_missing_crop" / "submission.zip", manifest=MANIFEST)
    )
    assert set(found.split(":")[0] for found in missing_crop["missing"]) == {
        "crop9002/mito",
        "crop9002/cyto",
    }
    missing_label = levels(
        check_submission(SUBMISSIONS / "s3_missing_label" / "submission.zip", manifest=MANIFEST)
    )
    assert missing_label["missing"] == ["crop9001/er: label not submitted: scored as missing"]
    assert missing_label["ignored"] == ["crop9001/ld: not in the manifest"]
    assert "error" not in missing_crop and "error" not in missing_label


def test_check_submission_reads_a_folder_and_the_one_zip_in_it(
    processed: Path, tmp_path: Path
) -> None:
    report = pack(processed, tmp_path / "submission.zarr")
    assert check_submission(report.zarr_path, manifest=MANIFEST) == []  # the zarr folder
    folder = tmp_path / "upload"
    folder.mkdir()
    (folder / "s.zip").write_bytes(report.zip_path.read_bytes())
    assert check_submission(folder, manifest=MANIFEST) == []


def test_pack_results_reads_csc_ome_ngff_outputs(tmp_path: Path) -> None:
    crop = zarr.open_group(tmp_path / "synth_b.zarr" / "crop9002", mode="w", zarr_format=2)
    mito = crop.require_group("mito")
    mito.attrs.update(multiscales_attrs("mito", [([2.0] * 3, [0.0] * 3), ([4.0] * 3, [0.0] * 3)]))
    ids = np.zeros((32, 32, 32), np.uint16)
    ids[4:12, 4:12, 4:12], ids[20:28, 20:28, 20:28] = 300, 7
    fine = np.zeros((64, 64, 64), np.uint16)
    mito.create_array("s0", shape=fine.shape, dtype=fine.dtype)[...] = fine
    mito.create_array("s1", shape=ids.shape, dtype=ids.dtype)[...] = ids
    report = pack_results(
        str(tmp_path / "{dataset}.zarr/{crop}"), tmp_path / "s.zarr", manifest=MANIFEST
    )
    assert report.packed == ("crop9002/mito",) and len(report.missing) == 4
    packed = packed_array(report.zip_path, "crop9002/mito")[...]
    assert packed.dtype == np.uint8  # 2 ids: renumbered to fit
    np.testing.assert_array_equal(packed, np.select([ids == 7, ids == 300], [1, 2], 0))


def test_a_label_that_cannot_be_read_fails_and_writes_nothing(tmp_path: Path) -> None:
    crop = zarr.open_group(tmp_path / "synth_a.zarr" / "crop9001", mode="w", zarr_format=2)
    array = crop.create_array("mito", shape=(32, 32, 32), dtype=np.uint8)
    array.attrs["voxel_size"] = "eight"
    with pytest.raises(ValueError, match=r"crop9001/mito attribute 'voxel_size' must be 3 numbers"):
        pack_results(
            str(tmp_path / "{dataset}.zarr/{crop}"), tmp_path / "s.zarr", manifest=MANIFEST
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_a.zarr"]


def test_a_coarse_csc_output_is_placed_by_voxel_edges(tmp_path: Path) -> None:
    """An 8 nm prediction of a 2 nm crop, laid out as csc predict covers the crop (its grid's
    edge on the crop's edge, OME-NGFF translation = voxel 0's centre), lands on the crop's
    voxels exactly: each coarse voxel becomes 4 x 4 x 4 crop voxels, none shifted."""
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "crop_name,dataset,class_label,voxel_size,translation,shape\n"
        "9003,synth_c,mito,[2;2;2],[7599;7599;7599],[32;32;32]\n"
    )
    group = zarr.open_group(tmp_path / "synth_c.zarr/crop9003/mito", mode="w", zarr_format=2)
    # The crop's first voxel spans 7598-7600 nm, so the 8 nm grid starts at 7598: centre 7602.
    group.attrs.update(multiscales_attrs("mito", [([8.0] * 3, [7602.0] * 3)]))
    coarse = np.zeros((8, 8, 8), np.uint8)
    coarse[1:3, 2:5, 6:8] = 1
    group.create_array("s0", shape=coarse.shape, dtype=coarse.dtype)[...] = coarse
    report = pack_results(
        str(tmp_path / "{dataset}.zarr/{crop}"), tmp_path / "s.zarr", manifest=manifest
    )
    packed = packed_array(report.zip_path, "crop9003/mito")[...]
    expected = coarse.repeat(4, 0).repeat(4, 1).repeat(4, 2)
    np.testing.assert_array_equal(packed, expected)
