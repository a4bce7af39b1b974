"""Score a whole challenge submission as the challenge does: `csc evaluate -s SUBMISSION`.

The steps are the toolkit's `score_submission` (scoring.md §0, §7 to §11): check the zip, find
the crops present in both the submission and the ground truth, score every truth label of
every truth crop (in the test crop manifest row's space, `csc.alignment.match_crop_space`,
then `csc.scoring.score_label`; missing crops and labels by `missing_label_score`), pool per
class and write the challenge's two result files. Unlike the toolkit, a zip is read in place:
nothing is extracted next to it, so no stale extraction is ever scored instead of it.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csc import __version__
from csc.alignment import match_crop_space
from csc.config import DEFAULT_TRUTH_PATH, INSTANCE_CLASSES
from csc.manifests import ScoredCropRow, manifest_source, scored_crop_rows
from csc.scoring import LabelScore, combine_scores, missing_label_score, score_label
from csc.storage import (
    LabelArray,
    NodeRoot,
    check_json_path,
    finite,
    open_nodes,
    read_label,
    write_text_atomic,
)
from csc.submission_check import check_members, the_zip_inside, zarr_root

__all__ = [
    "DEFAULT_TRUTH_PATH",
    "VERSION",
    "Submission",
    "extended_path",
    "find_submission",
    "format_result",
    "match_crops",
    "score_submission",
    "truth_labels",
]

VERSION = f"csc {__version__}"  # the results' git_version: also what marks them as csc's
FINEST = (1e-9, 1e-9, 1e-9)  # a target voxel size (nm) that picks a label's finest level
METRIC_KEYS = ("f1", "normalized_hausdorff_distance", "combined_score", "iou")


@dataclass(frozen=True)
class Submission:
    """Where a submission's zarr is: the zip or folder, the zarr root inside it ('' or
    'x.zarr/'), and its crop folders with the label nodes each holds."""

    location: Path
    prefix: str
    crops: dict[str, frozenset[str]]


def find_submission(path: str | os.PathLike[str]) -> Submission:
    """The submission at `path`: a zip, a folder holding exactly one zip, or a zarr folder;
    a zip must pass the challenge's checks (size, links, paths) before anything is read."""
    location = Path(path)
    if not location.exists():
        raise FileNotFoundError(f"submission {location} does not exist; pass -s/--submission-path")
    location = the_zip_inside(location)
    if location.is_dir():
        names = [f.relative_to(location).as_posix() for f in location.rglob("*") if f.is_file()]
    else:
        names = _zip_names(location)
    problems: list[Any] = []
    prefix = zarr_root(names, problems)
    if prefix is None:
        raise ValueError(f"submission {location}: {'; '.join(str(p) for p in problems)}")
    return Submission(location, prefix, _crop_folders(names, prefix))


def _zip_names(path: Path) -> list[str]:
    """The file members of the zip at `path`, refused as the challenge refuses a zip."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"submission {path} is neither a folder nor a zip ({error})") from None
    with archive:
        problems = check_members(archive)
        if problems:
            found = "; ".join(f"{p.where} {p.message}" for p in problems)
            raise ValueError(f"submission {path} is refused, as the challenge refuses it: {found}")
        return [info.filename for info in archive.infolist() if not info.is_dir()]


def _crop_folders(names: Sequence[str], prefix: str) -> dict[str, frozenset[str]]:
    """Crop folder -> the label nodes (folders) in it, from the file names below `prefix`."""
    crops: dict[str, set[str]] = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        if len(parts) >= 2:
            crops.setdefault(parts[0], set()).update(parts[1:2] if len(parts) >= 3 else [])
    return {crop: frozenset(labels) for crop, labels in sorted(crops.items())}


def truth_labels(truth: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Crop -> its labels (sorted): the zarr arrays, or multiscale groups, in each crop group of
    the ground truth zarr folder `truth`."""
    root = Path(truth)
    if not root.is_dir():
        raise FileNotFoundError(
            f"ground truth {root} does not exist; pass -t/--truth-path, a zarr folder of "
            "crop<id>/<label> arrays"
        )
    crops = {
        crop.name: sorted(n.name for n in crop.iterdir() if _is_node(n))
        for crop in sorted(root.iterdir())
        if crop.is_dir()
    }
    crops = {name: labels for name, labels in crops.items() if labels}
    if not crops:
        raise ValueError(f"ground truth {root} holds no crop<id>/<label> arrays")
    return crops


def _is_node(path: Path) -> bool:
    """A zarr array or group (a multiscale label) folder."""
    return any((path / name).is_file() for name in (".zarray", ".zgroup", "zarr.json"))


def match_crops(submitted: Sequence[str], truth: Sequence[str], where: Path) -> dict[str, str]:
    """Truth crop -> its submitted folder: the names in both, else folders ``<id>`` for
    truth crops ``crop<id>`` (the toolkit renames them); none at all is an error."""
    found = {name: name for name in truth if name in submitted}
    if not found:
        bare = {name: name.removeprefix("crop") for name in truth if name.startswith("crop")}
        found = {name: folder for name, folder in bare.items() if folder in submitted}
    if not found:
        raise ValueError(
            f"submission {where} holds no crop of the ground truth: it holds "
            f"{', '.join(submitted) or 'nothing'}; the truth holds {', '.join(truth)}"
        )
    return found


def score_submission(
    submission: str | os.PathLike[str],
    truth: str | os.PathLike[str] = DEFAULT_TRUTH_PATH,
    *,
    manifest: str | os.PathLike[str] | None = None,
    instance_classes: Sequence[str] | None = None,
    result_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score `submission` against the ground truth zarr `truth` as the challenge does; the
    extended result (every crop's entries, the class and overall scores). With
    `result_path`, also write the public result there and the extended one beside it as
    ``<stem>_extended<suffix>`` (an existing file only with `overwrite`, and only csc's)."""
    paths = _result_paths(result_path, overwrite=overwrite)  # before any work
    rows = scored_crop_rows(manifest)
    classes = INSTANCE_CLASSES if instance_classes is None else tuple(instance_classes)
    labels = truth_labels(truth)
    found = find_submission(submission)
    crops = match_crops(list(found.crops), list(labels), found.location)
    spaces = _spaces(rows, crops, labels, found, manifest)
    scores: dict[str, dict[str, LabelScore]] = {}
    for crop in (c for c in labels if c not in crops):  # missing crops first, as the toolkit
        scores[crop] = {label: _missing(truth, crop, label, classes) for label in labels[crop]}
    with open_nodes(found.location, found.prefix) as nodes:
        for crop, folder in crops.items():
            submitted = found.crops[folder]
            scores[crop] = {
                label: _score(truth, crop, label, labels[crop], (nodes, folder), spaces, classes)
                if label in submitted
                else _missing(truth, crop, label, classes)
                for label in labels[crop]
            }
    extended = _extended(scores, total_evals=len(rows))
    if paths is not None:
        present = {name for e in scores.values() for name, s in e.items() if not s.is_missing}
        write_text_atomic(paths[0], json.dumps(_public(extended, present), indent=4))
        write_text_atomic(paths[1], json.dumps(extended, indent=4))
    return extended


def extended_path(result_path: str | os.PathLike[str]) -> Path:
    """Where the extended result goes: ``<stem>_extended<suffix>`` beside `result_path`."""
    path = Path(result_path)
    return path.with_name(f"{path.stem}_extended{path.suffix}")


def _result_paths(
    result_path: str | os.PathLike[str] | None, *, overwrite: bool
) -> tuple[Path, Path] | None:
    if result_path is None:
        return None
    kind, option = "a challenge result", "-r/--result-file"
    public, extended = Path(result_path), extended_path(result_path)
    for path in (public, extended):
        check_json_path(path, overwrite=overwrite, is_ours=_is_result, option=option, kind=kind)
    return public, extended


def _is_result(value: Any) -> bool:
    """Whether a parsed JSON file is a result csc wrote (its git_version names csc)."""
    return isinstance(value, dict) and str(value.get("git_version", "")).startswith("csc ")


def _spaces(
    rows: Sequence[ScoredCropRow],
    crops: dict[str, str],
    labels: dict[str, list[str]],
    found: Submission,
    manifest: str | os.PathLike[str] | None,
) -> dict[tuple[str, str], ScoredCropRow]:
    """(crop, label) -> its manifest row, for every submitted truth label; one without a row
    is an error, before any voxel is read."""
    by_key = {(row.name, row.class_label): row for row in rows}
    wanted = [
        (crop, label)
        for crop, folder in crops.items()
        for label in labels[crop]
        if label in found.crops[folder]
    ]
    lacking = [f"{crop}/{label}" for crop, label in wanted if (crop, label) not in by_key]
    if lacking:
        source = manifest_source(manifest)
        name = "csc's shipped test crop manifest" if source is None else f"{source}"
        raise ValueError(
            f"no row in the test crop manifest ({name}) for {', '.join(lacking)}: the target "
            "space of a scored label comes from its row; pass --test-crop-manifest with rows "
            "for every crop and label of the ground truth"
        )
    return {key: by_key[key] for key in wanted}


def _missing(
    truth: str | os.PathLike[str], crop: str, label: str, classes: Sequence[str]
) -> LabelScore:
    """A truth label the submission lacks, with the truth array's own voxel_size attribute."""
    array = read_label(Path(truth, crop, label), target_voxel_size=FINEST)
    if array.voxel_size is None:
        raise ValueError(
            f"{array.path} has no voxel_size attribute; the challenge needs it to score a "
            "label that is not submitted"
        )
    return missing_label_score(array.data, array.voxel_size, instance=label in classes)


def _score(
    truth: str | os.PathLike[str],
    crop: str,
    label: str,
    truth_names: Sequence[str],
    node: tuple[NodeRoot, str],
    spaces: dict[tuple[str, str], ScoredCropRow],
    classes: Sequence[str],
) -> LabelScore:
    """One submitted truth label, in its manifest row's space, masked by ``<label>_mask``."""
    row = spaces[(crop, label)]
    nodes, folder = node
    target = _truth_array(truth, crop, label, row)
    pred = read_label(f"{folder}/{label}", target_voxel_size=row.voxel_size, root=nodes)
    aligned = match_crop_space(
        pred,
        voxel_size=row.voxel_size,
        shape=row.shape,
        translation=row.translation,
        instance=label in INSTANCE_CLASSES,  # the toolkit resamples by its own list, always
    )
    mask = None
    if f"{label}_mask" in truth_names:
        mask = _truth_array(truth, crop, f"{label}_mask", row).data
    instance = label in classes
    return score_label(target.data, aligned, row.voxel_size, instance=instance, mask=mask)


def _truth_array(
    truth: str | os.PathLike[str], crop: str, label: str, row: ScoredCropRow
) -> LabelArray:
    array = read_label(Path(truth, crop, label), target_voxel_size=row.voxel_size)
    if array.data.shape != row.shape:
        raise ValueError(
            f"{array.path} has shape {array.data.shape}, but its test crop manifest row "
            f"{row.name}/{row.class_label} says {row.shape}: use the manifest of this truth"
        )
    return array


def _extended(scores: dict[str, dict[str, LabelScore]], *, total_evals: int) -> dict[str, Any]:
    """The extended result: each crop's entries, the class and overall scores, the counts."""
    by_label: dict[str, list[LabelScore]] = {}
    for entries in scores.values():
        for label, score in entries.items():
            by_label.setdefault(label, []).append(score)
    result: dict[str, Any] = {
        crop: {label: score.as_dict() for label, score in entries.items()}
        for crop, entries in scores.items()
    }
    result |= combine_scores(by_label, include_missing=True)
    result |= {
        "total_evals": total_evals,
        "num_evals_done": sum(len(e) for crop, e in scores.items() if "crop" in crop),
        "git_version": VERSION,
    }
    return dict(finite(result))


def _public(extended: dict[str, Any], found: set[str]) -> dict[str, Any]:
    """The public result: class scores (no counts) of the `found` classes (an entry that is
    not missing), the overall scores (missing classes included) and the counts."""
    label_scores = {
        label: {key: value for key, value in scores.items() if key in METRIC_KEYS}
        for label, scores in extended["label_scores"].items()
        if label in found
    }
    keys = ("overall_instance_score", "overall_semantic_score", "overall_score")
    counts = ("total_evals", "num_evals_done", "git_version")
    return {"label_scores": label_scores} | {key: extended[key] for key in (*keys, *counts)}


def format_result(result: dict[str, Any]) -> str:
    """The per-class and overall scores as a fixed-width table, then the entries that were
    missing or skipped; '-' where a class has no such score."""
    header = ["class", "score", "f1", "hausdorff", "iou", "tp", "fp", "fn"]
    rows = [header]
    for label, scores in result["label_scores"].items():
        score = scores.get("combined_score", scores.get("iou"))
        values = [score, *(scores.get(k) for k in METRIC_KEYS[:2]), scores.get("iou")]
        counts = [str(scores[k]) for k in ("tp", "fp", "fn")]
        rows.append([label, *("-" if v is None else f"{v:.4f}" for v in values), *counts])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append(
        f"overall {_number(result['overall_score'])} (instance "
        f"{_number(result['overall_instance_score'])}, semantic "
        f"{_number(result['overall_semantic_score'])}); {result['num_evals_done']} of "
        f"{result['total_evals']} manifest rows evaluated"
    )
    for status in ("missing", "skipped_too_many_instances", "matching_failed"):
        where = [
            f"{crop}/{label}"
            for crop, entries in result.items()
            if crop != "label_scores" and isinstance(entries, dict)
            for label, entry in entries.items()
            if entry.get("status") == status
        ]
        if where:
            lines.append(f"{status.replace('_', ' ')}: {', '.join(where)}")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
