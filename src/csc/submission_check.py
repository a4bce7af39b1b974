"""`csc check-submission`: a submission zip (or folder) checked before upload the way the
challenge's scorer will read it (scoring.md §9, submission.md §1), against the test crop
manifest. Reads only the small JSON files (.zgroup, .zarray, .zattrs), never the voxels.

Each finding is a `Problem`: an ``error`` (the scorer refuses the submission, or would read
the label differently from the crop's space), ``missing`` (a manifest label not submitted:
scored as missing, i.e. zero), ``ignored`` (not in the manifest: not scored) or a ``note``
(tolerated by the scorer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from csc.manifests import ScoredCropRow, scored_crop_rows
from csc.storage import TRANSLATION_KEYS, VOXEL_SIZE_KEYS

DEFAULT_MAX_UNCOMPRESSED_SIZE = 50 * 2**30  # bytes (50 GiB), the scorer's limit

Level = Literal["error", "missing", "ignored", "note"]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding about a submission: its level, where (member or crop/label) and what."""

    level: Level
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class _Files:
    """The files of a submission: their '/'-separated names and a reader of small ones."""

    names: frozenset[str]
    read: Callable[[str], bytes]

    def json(self, name: str) -> dict[str, Any] | None:
        if name not in self.names:
            return None
        try:
            value = json.loads(self.read(name))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None


def max_uncompressed_size() -> int:
    """The largest total uncompressed size accepted, bytes ($MAX_UNCOMPRESSED_SIZE)."""
    value = os.environ.get("MAX_UNCOMPRESSED_SIZE")
    try:
        return DEFAULT_MAX_UNCOMPRESSED_SIZE if value is None else int(value)
    except ValueError:
        raise ValueError(f"MAX_UNCOMPRESSED_SIZE must be a byte count, got {value!r}") from None


def submission_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(bytes on disk, bytes uncompressed) of a submission zip or folder."""
    if os.path.isdir(path):
        total = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return total, total
    with zipfile.ZipFile(path) as archive:
        return os.path.getsize(path), sum(info.file_size for info in archive.infolist())


def check_submission(
    path: str | os.PathLike[str], *, manifest: str | os.PathLike[str] | None = None
) -> list[Problem]:
    """Every finding about the submission zip or folder `path` against the manifest rows."""
    rows = scored_crop_rows(manifest)
    problems: list[Problem] = []
    path = the_zip_inside(Path(path))
    if os.path.isdir(path):
        folder = Path(path)
        names = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}
        files = _Files(frozenset(names), lambda name: (folder / name).read_bytes())
        return _check_zarr(files, rows)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        return [Problem("error", os.fspath(path), f"cannot be read as a zip file ({error})")]
    with archive:
        problems += check_members(archive)
        if any(p.level == "error" for p in problems):
            return problems  # the scorer stops before it extracts anything
        names = {i.filename for i in archive.infolist() if not i.is_dir()}
        problems += _check_zarr(_Files(frozenset(names), archive.read), rows)
    return problems


def the_zip_inside(path: Path) -> Path:
    """The one zip at the top of the folder `path`, which the scorer reads instead of the
    folder; else `path` itself."""
    if not path.is_dir() or (path / ".zgroup").exists():
        return path
    zips = [entry for entry in path.iterdir() if entry.suffix == ".zip" and entry.is_file()]
    return zips[0] if len(zips) == 1 else path


def check_members(archive: zipfile.ZipFile) -> list[Problem]:
    """The scorer's checks before extraction: size, links, members outside the folder."""
    problems = []
    infos = archive.infolist()
    total, limit = sum(i.file_size for i in infos), max_uncompressed_size()
    if total > limit:
        problems.append(
            Problem(
                "error",
                "zip",
                f"{total} bytes uncompressed, more than the scorer's {limit} "
                "(MAX_UNCOMPRESSED_SIZE)",
            )
        )
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            problems.append(Problem("error", info.filename, "is a symbolic link"))
        parts = PurePosixPath(info.filename.replace("\\", "/")).parts
        if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
            problems.append(Problem("error", info.filename, "would be extracted outside"))
    return problems


def _check_zarr(files: _Files, rows: Sequence[ScoredCropRow]) -> list[Problem]:
    """The zarr hierarchy: its root, its crop groups and each manifest label."""
    problems: list[Problem] = []
    if any(PurePosixPath(name).name == "zarr.json" for name in files.names):
        return [Problem("error", "zarr.json", "zarr format 3: the scorer reads zarr 2 only")]
    root = zarr_root(files.names, problems)
    if root is None:
        return problems
    if f"{root}.zgroup" not in files.names:
        problems.append(Problem("note", f"{root}.zgroup", "missing; the scorer writes one"))
    crops = _crop_names(files, root, rows, problems)
    wanted: dict[str, set[str]] = {}
    for row in rows:
        wanted.setdefault(row.name, set()).add(row.class_label)
        folder = crops.get(row.name)
        where = f"{row.name}/{row.class_label}"
        if folder is None:
            problems.append(Problem("missing", where, "crop not submitted: scored as missing"))
            continue
        problems += _check_label(files, f"{root}{folder}/{row.class_label}", where, row)
    for name, folder in crops.items():
        for label in sorted(_children(files, f"{root}{folder}/") - wanted.get(name, set())):
            problems.append(Problem("ignored", f"{folder}/{label}", "not in the manifest"))
    return problems


def zarr_root(names: Iterable[str], problems: list[Problem]) -> str | None:
    """The zarr root's prefix inside the submission ('' or 'x.zarr/'): the scorer moves the
    one .zarr folder it finds to the root, and refuses more than one."""
    nested = sorted(
        {
            "/".join(parts[: i + 1])
            for parts in (name.split("/") for name in names)
            for i, part in enumerate(parts[:-1])
            if part.endswith(".zarr")
        }
    )
    if len(nested) > 1:
        problems.append(Problem("error", ", ".join(nested), "more than one .zarr folder"))
        return None
    if nested:
        problems.append(Problem("note", nested[0], "zarr nested in folders; the scorer moves it"))
        return f"{nested[0]}/"
    return ""


def _crop_names(
    files: _Files, root: str, rows: Sequence[ScoredCropRow], problems: list[Problem]
) -> dict[str, str]:
    """Manifest crop name -> the folder submitted for it (``crop<id>``, or ``<id>`` which the
    scorer renames when no ``crop<id>`` matches); other folders are reported as ignored."""
    folders = _children(files, root)
    names = {row.name for row in rows}
    found = {name: name for name in names if name in folders}
    if not found:
        found = {name: name.removeprefix("crop") for name in names if name[4:] in folders}
        if found:
            problems.append(Problem("note", root or ".", "crop groups without 'crop'; renamed"))
    for folder in sorted(folders - set(found.values())):
        problems.append(Problem("ignored", folder, "crop not in the manifest"))
    return found


def _check_label(files: _Files, node: str, where: str, row: ScoredCropRow) -> list[Problem]:
    """One manifest label: present, and an integer or bool array in the row's space."""
    array = files.json(f"{node}/.zarray")
    if array is None:
        if f"{node}/.zgroup" in files.names:
            return [Problem("note", where, "a multiscale group: its levels are not checked")]
        return [Problem("missing", where, "label not submitted: scored as missing")]
    problems = []
    if list(array.get("shape", [])) != list(row.shape):
        problems.append(Problem("error", where, f"shape {array.get('shape')} != {list(row.shape)}"))
    try:
        kind: str = np.dtype(array.get("dtype")).kind
    except (TypeError, ValueError):
        kind = "?"
    if kind not in "biu":
        problems.append(Problem("error", where, f"dtype {array.get('dtype')}: not integer or bool"))
    attrs = files.json(f"{node}/.zattrs") or {}
    for keys, want in (
        (VOXEL_SIZE_KEYS, row.voxel_size),
        (TRANSLATION_KEYS, row.translation),
        (("shape",), row.shape),
    ):
        problems += _check_attr(attrs, keys, want, where)
    return problems


def _check_attr(
    attrs: dict[str, Any], keys: Sequence[str], want: Sequence[float], where: str
) -> list[Problem]:
    key = next((k for k in keys if k in attrs), None)
    if key is None:
        return [Problem("note", where, f"no {keys[0]!r} attribute (the row's {list(want)})")]
    try:
        matches = np.allclose(np.asarray(attrs[key], float), np.asarray(want, float))
    except (TypeError, ValueError):
        matches = False
    if not matches:
        return [Problem("error", where, f"attribute {key} {attrs[key]} != the row's {list(want)}")]
    return []


def _children(files: _Files, prefix: str) -> set[str]:
    """The folder names directly under `prefix` ('' or ending in '/')."""
    return {
        name[len(prefix) :].split("/", 1)[0]
        for name in files.names
        if name.startswith(prefix) and "/" in name[len(prefix) :]
    }
