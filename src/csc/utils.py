"""The challenge toolkit's Python names (``cellmap_segmentation_challenge.utils``, its
``predict``, ``process``, submission packing and scoring), as thin adapters over csc's own
functions (docs/utils.md).

They keep the toolkit's names, keywords and crop spellings ("test", "1,2", "*"); what they do
is csc's: `csc.config` runs the config, `csc.datasplit` crawls and splits,
`csc.prediction.predict` and `csc.processing.process` predict and post-process,
`csc.packing` packs, `csc.alignment` resamples and `csc.submissions` scores.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from string import Formatter
from typing import TYPE_CHECKING, Any

from csc import manifests
from csc.config import (
    CROP_NAME,
    DEFAULT_PREDICTION_CHECKPOINT,
    DEFAULT_S3_SEARCH_PATH,
    INSTANCE_CLASSES,
    PATH_KEYS,
    PREDICTIONS_PATH,
    PROCESSED_PATH,
    RAW_NAME,
    SEARCH_PATH,
    SUBMISSION_PATH,
    TRUTH_PATH,
    TrainConfig,
    load_config,
    public_names,
    run_config_file,
    s3_search_path,
    validate,
)
from csc.datasplit import (
    CrawlOptions,
    DatasplitRow,
    SplitOptions,
    crawl_config,
    format_rows,
    make_datasplit,
    summarise,
    write_datasplit,
)
from csc.manifests import TestCrop
from csc.storage import is_url

if TYPE_CHECKING:
    import numpy as np

    from csc.packing import PackReport
    from csc.prediction import Written

ConfigArg = TrainConfig | str | os.PathLike[str]
UNSAFE_MODULES = ("os", "subprocess", "sys")  # a config importing these is reported
UNSAFE_CALLS = ("eval", "exec")
FORCE_SAFE_ENV = "FORCE_SAFE_CONFIG"  # set to one of TRUE_WORDS: such a config is refused
TRUE_WORDS = ("1", "true", "yes", "on")
TEST = "test"  # the crops spelling for the challenge's test crops
ALL = "*"  # the crops spelling for every crop
# What the toolkit's output templates may be, below a root folder: csc's layout.
LAYOUT_SUFFIXES = ("/{dataset}.zarr/{crop}/{label}", "/{dataset}.zarr/{crop}")


# --- Submissions -----------------------------------------------------------------------------


def package_submission(
    input_search_path: str = PROCESSED_PATH,
    output_path: str | os.PathLike[str] = SUBMISSION_PATH,
    overwrite: bool = False,
    max_workers: int | None = None,
) -> PackReport:
    """The toolkit's `package_submission` (`csc pack-results`): csc.packing.pack_results."""
    from csc.packing import pack_results

    return pack_results(input_search_path, output_path, overwrite=overwrite, workers=max_workers)


def zip_submission(zarr_path: str | os.PathLike[str] = SUBMISSION_PATH) -> Path:
    """The toolkit's `zip_submission`: the zarr folder zipped beside it as ``.zip`` (a zip
    there is replaced only if csc pack-results wrote it)."""
    from csc.packing import PACK
    from csc.storage import check_zip_replaceable, zip_folder

    folder = Path(zarr_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no zarr folder at {folder} to zip")
    target = folder.with_suffix(".zip")
    check_zip_replaceable(target, PACK, overwrite=True)
    zip_folder(folder, target, command=PACK)
    return target


def score_submission(
    submission_path: str | os.PathLike[str],
    result_file: str | os.PathLike[str] | None = None,
    truth_path: str | os.PathLike[str] = TRUTH_PATH,
    instance_classes: Sequence[str] = INSTANCE_CLASSES,
) -> dict[str, Any]:
    """The toolkit's `score_submission` (`csc evaluate -s`): csc.submissions.score_submission;
    result files csc wrote before are replaced, anyone else's never."""
    from csc.submissions import score_submission as score

    return score(
        submission_path,
        truth_path,
        instance_classes=instance_classes,
        result_path=result_file,
        overwrite=True,
    )


def match_crop_space(
    path: str | os.PathLike[str],
    class_label: str,
    voxel_size: Sequence[float],
    shape: Sequence[int],
    translation: Sequence[float],
) -> np.ndarray:
    """The toolkit's `match_crop_space`: the label at `path` in a crop's space (nm, (z, y, x)),
    resampled as the challenge resamples it (csc.alignment)."""
    from csc.alignment import match_crop_space as align
    from csc.storage import read_label

    label = read_label(path, target_voxel_size=voxel_size)
    instance = class_label in INSTANCE_CLASSES
    return align(
        label, voxel_size=voxel_size, shape=shape, translation=translation, instance=instance
    )


# --- Configs ---------------------------------------------------------------------------------


class SafeConfig:
    """Every public name a config file defines, as attributes (``cfg.batch_size``,
    ``getattr(cfg, "epochs", 10)``), and as a mapping (``cfg.get``, ``cfg.to_dict()``)."""

    def __init__(self, values: Mapping[str, Any], path: Path) -> None:
        self.__dict__.update(values)
        self._path = path

    def __getattr__(self, name: str) -> Any:  # called only for names the file lacks
        if name.startswith("_"):  # copy and pickle look these up before __init__ ran
            raise AttributeError(name)
        raise AttributeError(f"config {self._path} defines no {name!r}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def __repr__(self) -> str:
        return f"SafeConfig({self._path}: {', '.join(sorted(self.to_dict()))})"


def load_safe_config(
    config_path: str | os.PathLike[str], force_safe: bool | None = None
) -> SafeConfig:
    """Run the config file in a fresh namespace (csc's config runner) and return its names.

    The file is first checked for imports of os, subprocess or sys and calls of eval or exec:
    each is reported on stderr, or, with `force_safe` (default: the FORCE_SAFE_CONFIG
    environment variable), the file is refused with a ValueError before it runs.
    """
    path = Path(config_path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    findings = unsafe_findings(path)
    if force_safe is None:
        force_safe = os.environ.get(FORCE_SAFE_ENV, "").strip().lower() in TRUE_WORDS
    if findings and force_safe:
        raise ValueError(
            f"{path} {findings[0]}, which a safe load (FORCE_SAFE_CONFIG or force_safe) refuses: "
            f"remove it from the config, or load it unforced ({len(findings)} finding(s))"
        )
    for finding in findings:
        print(f"warning: config {path} {finding}", file=sys.stderr)
    return SafeConfig(public_names(run_config_file(path)), path)


def unsafe_findings(path: Path) -> list[str]:
    """One line per import of os/subprocess/sys and call of eval/exec in the file."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError:
        return []  # running it reports the error, with the file's line
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for module in _imported(node):
                if module.split(".")[0] in UNSAFE_MODULES:
                    found.append((node.lineno, f"imports {module} (line {node.lineno})"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in UNSAFE_CALLS
        ):
            found.append((node.lineno, f"calls {node.func.id} (line {node.lineno})"))
    return [text for _, text in sorted(found)]


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module] if node.module and node.level == 0 else []


# --- Classes, crops and templates ------------------------------------------------------------


def get_tested_classes(csv_path: str | os.PathLike[str] | None = None) -> list[str]:
    """The 48 classes the challenge scores (tested_classes.csv, shipped with csc), or the
    names in another such file (one a line)."""
    if csv_path is None:
        return list(manifests.scored_classes())
    return [line.strip() for line in Path(csv_path).read_text().splitlines() if line.strip()]


def get_test_crops(manifest: str | os.PathLike[str] | None = None) -> list[TestCrop]:
    """The challenge's test crops, one per crop id, in id order, from the test crop manifest in
    use (`manifest`, $CSC_TEST_CROP_MANIFEST_URL or the one shipped with csc)."""
    return list(manifests.scored_crops(manifest))


def get_test_crop_labels(
    crop_id: int | str, manifest: str | os.PathLike[str] | None = None
) -> list[str]:
    """The classes scored in one test crop (``557`` or ``"crop557"``)."""
    number = int(str(crop_id).removeprefix("crop"))
    rows = manifests.scored_crop_rows(manifest)
    labels = [row.class_label for row in rows if row.id == number]
    if not labels:
        ids = sorted({row.id for row in rows})
        raise ValueError(f"crop {crop_id} is not a test crop; the test crops are {ids}")
    return labels


def get_formatted_fields(string: str) -> list[str]:
    """The ``{field}`` names of a template, in order (``"{a}/{b}"`` -> ``["a", "b"]``)."""
    return [name for _, name, _, _ in Formatter().parse(string) if name]


def format_string(string: str, format_kwargs: Mapping[str, Any]) -> str:
    """Fill the fields of `string` that `format_kwargs` names; leave the others as they are."""
    for key, value in format_kwargs.items():
        string = string.replace(f"{{{key}}}", str(value))
    return string


@dataclasses.dataclass(frozen=True)
class CropSelection:
    """The crops asked for: csc crop patterns, or all of them, or the test crops."""

    patterns: tuple[str, ...] = ()
    all_crops: bool = False
    test: bool = False


def parse_crops(crops: str | Sequence[str] | None) -> CropSelection:
    """The toolkit's crop spellings: a comma list ("1,2" means crop1, crop2; other names and
    csc's globs stay), "*" for all crops, "test" for the test crops; None or empty: none named."""
    items = crops.split(",") if isinstance(crops, str) else list(crops or ())
    names = [item.strip() for item in items if item.strip()]
    if TEST in names:
        if len(names) > 1:
            raise ValueError(f"crops {crops!r}: 'test' goes alone, not with other crops")
        return CropSelection(test=True)
    if ALL in names:
        return CropSelection(all_crops=True)
    return CropSelection(tuple(f"crop{n}" if n.isdigit() else n for n in names))


def get_test_crop_names(manifest: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """crop557, ...: the names the test crops' predictions carry."""
    return tuple(crop.name for crop in get_test_crops(manifest))


def scored_crop_patterns(manifest: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """dataset/crop557, ...: the test crops of the manifest in use, as process selects
    predicted crops (a datasplit crop of the same name in another dataset is not one)."""
    return tuple(f"{crop.dataset}/{crop.name}" for crop in get_test_crops(manifest))


def layout_root(template: str | os.PathLike[str], keyword: str) -> str:
    """The folder below which csc writes {dataset}.zarr/{crop}/{label}, from a toolkit path
    template such as PREDICTIONS_PATH; other templates are refused."""
    text = os.fspath(template).rstrip("/")
    for suffix in LAYOUT_SUFFIXES:
        root = f"/{text}".removesuffix(suffix)  # "/": a template may be the suffix alone
        if root != f"/{text}" and not get_formatted_fields(root):
            return root[1:] or "."
    raise ValueError(
        f"{keyword}={text!r}: csc's layout is ROOT/{{dataset}}.zarr/{{crop}}/{{label}}, so give "
        f"a template ending in {LAYOUT_SUFFIXES[1]} (like csc.config.PREDICTIONS_PATH) with "
        "no other fields; csc.prediction.predict and csc.processing.process take plain folders"
    )


# --- Datasplits ------------------------------------------------------------------------------


def make_datasplit_csv(
    classes: Sequence[str] = ("nuc", "mito"),
    scale: float | Sequence[float] | None = None,
    force_all_classes: bool | str = False,
    validation_prob: float = 0.1,
    datasets: Sequence[str] = ("*",),
    crops: Sequence[str] = ("*",),
    search_path: str = SEARCH_PATH,
    raw_name: str = RAW_NAME,
    crop_name: str = CROP_NAME,
    csv_path: str | os.PathLike[str] = "datasplit.csv",
    dry_run: bool = False,
) -> list[DatasplitRow]:
    """Crawl `search_path` and split the crops into `csv_path` (csc.datasplit); relative paths
    are relative to the working directory. With `dry_run` the CSV is printed, not written."""
    options = CrawlOptions(
        search_path=os.fspath(search_path),
        raw_name=raw_name,
        crop_name=crop_name,
        classes=tuple(classes),
        datasets=_globs(datasets),
        crops=_crop_globs(crops),
        scale=_scale(scale),
    )
    return _write_split(options, force_all_classes, validation_prob, csv_path, dry_run=dry_run)


def make_s3_datasplit_csv(
    classes: Sequence[str] = ("nuc", "mito"),
    scale: float | Sequence[float] | None = None,
    force_all_classes: bool | str = False,
    validation_prob: float = 0.1,
    datasets: Sequence[str] = ("*",),
    crops: Sequence[str] = ("*",),
    search_path: str = DEFAULT_S3_SEARCH_PATH,
    raw_name: str = RAW_NAME,
    crop_name: str = CROP_NAME,
    csv_path: str | os.PathLike[str] = "datasplit.csv",
    dry_run: bool = False,
    bucket: str = TrainConfig.s3_bucket,
) -> list[DatasplitRow]:
    """`make_datasplit_csv` over an S3 bucket: `search_path` is inside `bucket` (anonymous
    access; the endpoint from AWS_ENDPOINT_URL)."""
    return make_datasplit_csv(
        classes,
        scale,
        force_all_classes,
        validation_prob,
        datasets,
        crops,
        s3_search_path(search_path, bucket),
        raw_name,
        crop_name,
        csv_path,
        dry_run,
    )


def _globs(patterns: Sequence[str]) -> tuple[str, ...]:
    """Names or globs; the toolkit's ["*"] (every one) is csc's empty filter."""
    names = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    return () if ALL in names else names


def _crop_globs(crops: Sequence[str]) -> tuple[str, ...]:
    selection = parse_crops(_globs(crops))
    if selection.test:
        raise ValueError("crops=['test']: the test crops have no ground truth to split; name crops")
    return selection.patterns


def _scale(scale: float | Sequence[float] | None) -> tuple[float, ...] | None:
    if scale is None:
        return None
    values = [scale] if isinstance(scale, int | float) else list(scale)
    return tuple(float(v) for v in values)


def _write_split(
    options: CrawlOptions,
    force_all_classes: bool | str,
    validation_prob: float,
    csv_path: str | os.PathLike[str],
    *,
    dry_run: bool,
) -> list[DatasplitRow]:
    mode = force_all_classes if isinstance(force_all_classes, str) else None
    if force_all_classes is True:
        mode = "both"
    split = SplitOptions(validate_ratio=validation_prob, force_all_classes=mode)
    rows, skipped = make_datasplit(options, split)
    for line in skipped:
        print(f"skipped {line}")
    if dry_run:
        print(format_rows(rows), end="")
        return rows
    path = write_datasplit(rows, Path(csv_path), overwrite=True)  # replaces only a datasplit CSV
    print(f"wrote datasplit {path} ({summarise(rows)}) from {options.search_path}")
    return rows


# --- predict and process ---------------------------------------------------------------------


def predict(
    config_path: ConfigArg,
    crops: str | Sequence[str] = TEST,
    output_path: str | os.PathLike[str] | None = None,
    do_orthoplanes: bool = True,
    overwrite: bool = False,
    search_path: str | None = None,
    raw_name: str | None = None,
    crop_name: str | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    checkpoint: str = DEFAULT_PREDICTION_CHECKPOINT,
    overlap: float | None = None,
    encoding: str | None = None,
    bbox: Sequence[float] | None = None,
    dataset: str | None = None,
    manifest: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[Written]:
    """The toolkit's `predict`, done by `csc.prediction.predict` (docs/utils.md).

    `crops`: "test" (the default: the test crops of `manifest`, else
    $CSC_TEST_CROP_MANIFEST_URL, else csc's copy), a comma list ("1,2": crop1, crop2) or "*".
    `output_path`
    is a template ROOT/{dataset}.zarr/{crop} (default: the config's predictions_path if it
    sets one, else PREDICTIONS_PATH next to the config);
    `do_orthoplanes` averages z, y and x planes for a 2D model; `search_path`, `raw_name` and
    `crop_name` replace the config's, and then the crops come from a crawl of them, as they
    do when the config's datasplit CSV does not exist. The keywords after them are csc's.
    """
    selection = parse_crops(() if bbox is not None and crops == TEST else crops)
    if output is not None and output_path is not None:
        raise ValueError("give output_path (the toolkit's template) or output (a folder), not both")
    searched = {"search_path": search_path, "raw_name": raw_name, "crop_name": crop_name}
    changes = {key: value for key, value in searched.items() if value is not None}
    config = _load(config_path)
    if output is None:
        changes["predictions_path"] = _layout(config, "predictions_path", output_path)
    config = with_paths(config, changes)
    rows = _crop_rows(config, selection, located=bool(set(changes) & set(searched)))
    orthoplanes = do_orthoplanes and config.input_array_info.is_2d
    # Imported here: csc.utils stays free of torch, for the command line's --help.
    from csc.prediction import predict as csc_predict

    if orthoplanes:
        _check_orthoplanes(config)

    return csc_predict(
        config,
        crops=selection.patterns,
        all_crops=selection.all_crops,
        test_crops=selection.test,
        manifest=manifest,
        bbox=bbox,
        dataset=dataset,
        output=output,
        overwrite=overwrite,
        orthoplanes=orthoplanes,
        overlap=overlap,
        encoding=encoding,
        progress=progress,
        rows=rows,
        checkpoint=checkpoint,
    )


def _crop_rows(
    config: TrainConfig, selection: CropSelection, *, located: bool
) -> list[DatasplitRow] | None:
    """The crops predict chooses from: a crawl where the call says where the data are
    (`located`) or the config's datasplit CSV does not exist, else None (the CSV). Test crops
    need no crawl: their raw is the datasplit's, else at search_path (none: search_path)."""
    if selection.test:
        return [] if located else None
    if located or not Path(config.datasplit_path).is_file():
        return crawl_config(config)[0]
    return None


def _check_orthoplanes(config: TrainConfig) -> None:
    from csc.data.datasets import PatchSpec
    from csc.prediction import orthoplane_specs

    try:
        orthoplane_specs(PatchSpec.from_config(config))
    except ValueError as error:
        raise ValueError(
            f"do_orthoplanes=True (the toolkit's default for 2D models): {error}; pass "
            "do_orthoplanes=False to predict the trained planes only"
        ) from error


def process(
    config_path: ConfigArg,
    crops: str | Sequence[str] | None = None,
    input_path: str | os.PathLike[str] | None = None,
    output_path: str | os.PathLike[str] | None = None,
    device: str | None = None,
    max_workers: int | None = None,
    overwrite: bool = False,
    *,
    manifest: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """The toolkit's `process`, done by `csc.processing.process` (docs/utils.md).

    `crops`: None (every predicted crop), "test" (the predicted test crops of `manifest`, else
    $CSC_TEST_CROP_MANIFEST_URL, else csc's copy), a comma list or "*". `input_path` and
    `output_path` are templates ROOT/{dataset}.zarr/{crop} (defaults: the config's
    predictions_path and processed_path if it sets them, else PREDICTIONS_PATH and
    PROCESSED_PATH next to the config). `device` and `max_workers` change nothing in csc
    (process_func gets numpy blocks, one at a time): a warning says so when they would.
    """
    if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
        raise ValueError(f"max_workers must be a positive integer or None, got {max_workers!r}")
    warn_unused_process_options(device=device, max_workers=max_workers)
    selection = parse_crops(crops)
    patterns = scored_crop_patterns(manifest) if selection.test else selection.patterns
    config = _load(config_path)
    changes = {
        "predictions_path": _layout(config, "predictions_path", input_path, "input_path"),
        "processed_path": _layout(config, "processed_path", output_path),
    }
    from csc.processing import process as csc_process

    return csc_process(
        with_paths(config, changes), crops=patterns, overwrite=overwrite, progress=progress
    )


def warn_unused_process_options(*, device: str | None, max_workers: int | None) -> None:
    """The toolkit's process options that would change nothing in csc, said, never silent:
    process_func gets numpy blocks on the CPU, one block at a time."""
    if device not in (None, "cpu"):
        warnings.warn(
            f"device={device!r}: csc process hands process_func numpy blocks on the CPU; no "
            "device is used (move the data to a device inside process_func)",
            stacklevel=3,
        )
    if max_workers is not None and max_workers > 1:
        warnings.warn(
            f"max_workers={max_workers}: csc process works one block at a time; it has no effect",
            stacklevel=3,
        )


# The toolkit's folders, used where neither the call nor the config names one.
TOOLKIT_LAYOUTS = {"predictions_path": PREDICTIONS_PATH, "processed_path": PROCESSED_PATH}


def _load(config: ConfigArg) -> TrainConfig:
    return config if isinstance(config, TrainConfig) else load_config(config)


def _layout(
    config: TrainConfig,
    key: str,
    template: str | os.PathLike[str] | None,
    keyword: str = "output_path",
) -> str:
    """The folder for `key`: the root of the toolkit `template` given, else the config's own
    when it sets one, else the root of the toolkit's default (PREDICTIONS_PATH, ...)."""
    if template is not None:
        return layout_root(template, keyword)
    if sets(config, key):
        return str(getattr(config, key))
    return layout_root(TOOLKIT_LAYOUTS[key], keyword)


def sets(config: TrainConfig, key: str) -> bool:
    """Whether the config's `key` differs from csc's default (as written or resolved)."""
    default = getattr(TrainConfig, key)
    defaults = {default, os.path.normpath(_folder(config) / default)}
    return getattr(config, key) not in defaults


def with_paths(config: TrainConfig, changes: Mapping[str, str]) -> TrainConfig:
    """The config with `changes` to its path keys, relative ones resolved against the config
    file's folder as the file's own paths are; validated again."""
    if all(getattr(config, key) == value for key, value in changes.items()):
        return config
    folder = _folder(config)
    resolved: dict[str, Any] = {
        key: _anchored(key, value, folder, config) for key, value in changes.items()
    }
    changed = dataclasses.replace(config, **resolved)
    validate(changed)
    return changed


def _folder(config: TrainConfig) -> Path:
    return Path(config.config_path).parent if config.config_path else Path.cwd()


def _anchored(key: str, value: str, folder: Path, config: TrainConfig) -> str:
    on_s3 = key == "search_path" and config.use_s3  # then relative to the bucket
    if key not in PATH_KEYS or on_s3 or is_url(value) or os.path.isabs(value):
        return value
    return os.path.normpath(folder / os.path.expanduser(value))
