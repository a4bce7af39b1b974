"""The test crop manifest: the shipped one, the user's own by path or by the challenge's
variable, and clear errors for a bad one."""

from pathlib import Path

import pytest

from csc import manifests
from csc.utils import get_test_crop_labels, get_test_crops

ROWS = """crop_name,dataset,class_label,voxel_size,translation,shape
9001,synth_a,mito,[8;8;8],[800;800;800],[32;32;32]
9001,synth_a,er,[4;8;8],[800;796;800],[64;32;32]
9002,synth_b,nuc,[4;4;4],[0;0;0],[32;32;32]
"""


def write_manifest(folder: Path, text: str = ROWS) -> Path:
    path = folder / "my_manifest.csv"
    path.write_text(text)
    return path


def test_shipped_manifest_has_the_challenge_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(manifests.MANIFEST_VARIABLE, raising=False)
    rows = manifests.scored_crop_rows()
    assert len(rows) == 413
    assert {row.id for row in rows} == set(range(557, 563)) | set(range(980, 990))


def test_own_manifest_by_path_and_by_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_manifest(tmp_path)
    rows = manifests.scored_crop_rows(path)
    assert [(r.id, r.class_label) for r in rows] == [(9001, "mito"), (9001, "er"), (9002, "nuc")]
    assert rows[1].voxel_size == (4.0, 8.0, 8.0) and rows[1].shape == (64, 32, 32)
    monkeypatch.setenv(manifests.MANIFEST_VARIABLE, f"file://{path}")
    merged = get_test_crops()
    assert [c.name for c in merged] == ["crop9001", "crop9002"]
    # The toolkit's merge: smallest voxel size and translation, largest shape per axis.
    assert merged[0].voxel_size == (4.0, 8.0, 8.0)
    assert merged[0].translation == (800.0, 796.0, 800.0)
    assert merged[0].shape == (64, 32, 32)
    assert get_test_crop_labels("crop9001") == ["mito", "er"]


def test_bad_manifests_say_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.csv"):
        manifests.scored_crop_rows(tmp_path / "nothing.csv")
    monkeypatch.setenv(manifests.MANIFEST_VARIABLE, str(tmp_path / "gone.csv"))
    with pytest.raises(FileNotFoundError, match="CSC_TEST_CROP_MANIFEST_URL"):
        manifests.scored_crop_rows()
    with pytest.raises(ValueError, match="download it"):
        manifests.scored_crop_rows("https://example.org/test_crop_manifest.csv")
    no_shape = write_manifest(tmp_path, ROWS.replace(",shape", ",size"))
    with pytest.raises(ValueError, match=r"lacks the column.*shape"):
        manifests.scored_crop_rows(no_shape)
    bad = write_manifest(tmp_path, ROWS.replace("[8;8;8]", "[8;8]"))
    with pytest.raises(ValueError, match="line 2"):
        manifests.scored_crop_rows(bad)
