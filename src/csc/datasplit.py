"""Crawl local folders or S3 buckets of zarr stores into a datasplit CSV, and read it back.

The CSV is the existing toolkit's format, which other tools read: no header, five quoted fields
per row, usage, raw store root, raw group, label store root, crop group with the classes present:

    "train","/abs/data/jrc_x/jrc_x.zarr","recon-1/em/fibsem-uint8","/abs/data/jrc_x/jrc_x.zarr","recon-1/labels/groundtruth/crop234/[nuc,er]"

The crawl lists prefixes level by level following the search-path template, so its number of
requests grows with the number of crop groups, never with the number of chunk files.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import os
import random
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from csc.config import (
    DEFAULT_SEARCH_PATH,
    ConfigWarning,
    TrainConfig,
    data_root,
    s3_search_path,
)
from csc.storage import (
    FINEST,
    S3_RETRY_BUDGET_S,
    S3_TIMEOUT_S,
    STORE_SUFFIXES,
    InputStores,
    MetadataReader,
    S3Options,
    count_foreground,
    filesystem_for,
    folder_names,
    is_s3,
    names_in,
    parse_multiscales,
    read_json,
    s3_errors,
    s3_url,
    split_store_path,
    thread_map,
    write_text_atomic,
)

USAGES = ("train", "validate")
FIELD = re.compile(r"\{(\w+)\}")


@dataclasses.dataclass(frozen=True)
class DatasplitRow:
    """One crop: where its raw and labels are, which requested classes it has, its split."""

    usage: str  # "train" or "validate"
    raw_root: str  # store root, ".../jrc_x.zarr" (local path or S3 URL)
    raw_path: str  # group inside it, "recon-1/em/fibsem-uint8"
    gt_root: str
    gt_path: str  # crop group inside gt_root, "recon-1/labels/groundtruth/crop234"
    classes: tuple[str, ...]  # requested classes annotated in this crop, in requested order

    @property
    def dataset(self) -> str:
        return _store_name(self.gt_root)

    @property
    def crop(self) -> str:
        return self.gt_path.rstrip("/").rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class CrawlOptions:
    """What to look for. `search_path` has {dataset} and {name}; `crop_name` {crop}, {label}."""

    search_path: str = DEFAULT_SEARCH_PATH
    raw_name: str = TrainConfig.raw_name
    crop_name: str = TrainConfig.crop_name
    classes: tuple[str, ...] = TrainConfig.classes
    datasets: tuple[str, ...] = ()  # names or globs; empty: all
    crops: tuple[str, ...] = ()  # names or globs; empty: all
    scale: tuple[float, ...] | None = None  # nm; keep a class only if its s0 is this fine
    endpoint_url: str | None = None  # S3 only; default from AWS_ENDPOINT_URL
    s3_timeout_s: float = S3_TIMEOUT_S  # S3 only: per request (connect, each next byte)
    s3_retry_budget_s: float = S3_RETRY_BUDGET_S  # S3 only: retrying one read at most this long

    @property
    def s3(self) -> S3Options:
        return S3Options(self.endpoint_url, self.s3_timeout_s, self.s3_retry_budget_s)


@dataclasses.dataclass
class CrawlReport:
    """The crops found (usage not yet assigned), what was skipped and why, requests made."""

    crops: list[DatasplitRow]
    skipped: list[str]
    num_requests: int


class NoCropsError(ValueError):
    """A crawl found no crop with the classes asked for."""


@dataclasses.dataclass(frozen=True)
class SplitOptions:
    validate_ratio: float = 0.1  # csc datasplit's own; a config splits by its validation_prob
    seed: int = TrainConfig.random_seed
    force_all_classes: str | None = None  # "train", "validate", "both" or None


# --- Crawling --------------------------------------------------------------------------------


def crawl(options: CrawlOptions, lister: Lister | None = None) -> CrawlReport:
    """Find every crop with at least one requested class, paired with its dataset's raw."""
    _check_crawl_options(options)
    lister = lister or Lister(filesystem_for(options.search_path, options.s3))
    template = options.search_path.replace("{name}", options.crop_name)
    filters = {
        "dataset": _glob_filter(options.datasets),
        "crop": _glob_filter(options.crops),
        "label": lambda name: name in options.classes,
    }
    with s3_errors(_url_root(options.search_path), options.endpoint_url):
        matches = lister.expand(template, filters)
        crops, skipped = _assemble(matches, options, lister)
    return CrawlReport(crops, skipped, lister.num_requests)


def _check_crawl_options(options: CrawlOptions) -> None:
    for field in ("{dataset}", "{name}"):
        if field not in options.search_path:
            raise ValueError(f"search path {options.search_path!r} must contain {field}")
    if "{crop}" not in options.crop_name or not options.crop_name.endswith("/{label}"):
        raise ValueError(
            f"crop name {options.crop_name!r} must contain {{crop}} and end in /{{label}}, "
            "e.g. labels/groundtruth/{crop}/{label}"
        )
    if not options.classes:
        raise ValueError("no classes requested; pass --classes, e.g. --classes nuc,mito")


def _glob_filter(patterns: Sequence[str]) -> Callable[[str], bool]:
    if not patterns:
        return lambda name: True
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Lister:
    """Directory listings through fsspec, counted, run concurrently level by level."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.num_requests = 0
        self._lock = threading.Lock()  # listings run in threads; += is not atomic

    def _count(self) -> None:
        with self._lock:
            self.num_requests += 1

    def children(self, path: str, *, must_exist: bool = False) -> list[str]:
        """Names of the sub-directories (prefixes) of `path`; none if it does not exist."""
        self._count()
        try:
            return folder_names(self.fs, path)
        except FileNotFoundError:
            if must_exist:
                raise FileNotFoundError(f"{path} does not exist: check the search path") from None
            return []

    def files(self, path: str) -> set[str]:
        """Names of everything directly in `path` (files and directories)."""
        self._count()
        return set(names_in(self.fs, path))

    def read_json(self, path: str) -> dict[str, Any]:
        self._count()
        return read_json(self.fs, path)

    def map(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return thread_map(function, items)

    def expand(
        self, template: str, filters: Mapping[str, Callable[[str], bool]]
    ) -> list[tuple[str, dict[str, str]]]:
        """Every existing path matching `template`, with the values of its {fields}.

        Components whose fields are all known are filled in without a request; the others are
        matched against a listing of the parent, one request per parent, concurrently.
        """
        base, components = _split_template(template)
        states: list[tuple[str, dict[str, str]]] = [(base, {})]
        for component in components:
            if not states:
                break
            if all(name in states[0][1] for name in FIELD.findall(component)):
                states = [(_join(p, component.format(**b)), b) for p, b in states]
                continue
            # The base has no fields, so it is listed first; if it is missing, that is an error.
            listings = self.map(
                lambda p: self.children(p, must_exist=p == base), [p for p, _ in states]
            )
            states = [
                (_join(path, child), new)
                for (path, bound), children in zip(states, listings, strict=True)
                for child in children
                if (new := _match(component, child, bound, filters)) is not None
            ]
        return states


def _split_template(template: str) -> tuple[str, list[str]]:
    """The longest field-free prefix of a template, and the components after it."""
    parts = template.rstrip("/").split("/")
    first = next((i for i, p in enumerate(parts) if FIELD.search(p)), len(parts))
    base = "/".join(parts[:first]) or ("/" if template.startswith("/") else ".")
    return base, parts[first:]


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}" if path not in ("", ".") else name


def _match(
    component: str,
    name: str,
    bound: Mapping[str, str],
    filters: Mapping[str, Callable[[str], bool]],
) -> dict[str, str] | None:
    """Bind the component's unknown fields from a listed `name`, or None if it does not fit."""
    pattern, seen = "", set(bound)
    for literal, field in re.findall(r"([^{]*)(?:\{(\w+)\})?", component):
        pattern += re.escape(literal)
        if not field:
            continue
        if field in bound:
            pattern += re.escape(bound[field])
        elif field in seen:
            pattern += f"(?P={field})"
        else:
            pattern += f"(?P<{field}>[^/]+)"
            seen.add(field)
    found = re.fullmatch(pattern, name)
    if found is None:
        return None
    new = {k: v for k, v in found.groupdict().items() if v is not None}
    if not all(filters[k](v) for k, v in new.items() if k in filters):
        return None
    return {**bound, **new}


def _assemble(
    matches: Iterable[tuple[str, dict[str, str]]], options: CrawlOptions, lister: Lister
) -> tuple[list[DatasplitRow], list[str]]:
    """Group class groups into crops, pair each dataset with its raw, apply the scale filter."""
    by_crop: dict[tuple[str, str], set[str]] = {}
    for _, fields in matches:
        by_crop.setdefault((fields["dataset"], fields["crop"]), set()).add(fields["label"])
    if options.scale is not None:
        by_crop = _filter_by_scale(by_crop, options, lister)
    datasets = sorted({dataset for dataset, _ in by_crop})
    found = lister.map(lambda dataset: _find_raw(dataset, options, lister), datasets)
    raws = dict(zip(datasets, found, strict=True))
    crops, skipped = [], []
    for (dataset, crop), labels in sorted(by_crop.items(), key=lambda item: _sort_key(item[0])):
        if raws[dataset] is None:
            skipped.append(f"{dataset}/{crop}: no raw '{options.raw_name}' found for {dataset}")
            continue
        raw_root, raw_path = raws[dataset]
        gt_full = _fill(options.search_path, dataset, options.crop_name.format(crop=crop, label=""))
        gt_root, gt_path = split_store_path(_url(gt_full, options.search_path))
        classes = tuple(c for c in options.classes if c in labels)
        crops.append(
            DatasplitRow("train", raw_root, raw_path, gt_root, gt_path.rstrip("/"), classes)
        )
    return crops, skipped


def _fill(search_path: str, dataset: str, name: str) -> str:
    return search_path.replace("{dataset}", dataset).replace("{name}", name)


def _find_raw(dataset: str, options: CrawlOptions, lister: Lister) -> tuple[str, str] | None:
    """The raw group's (root, path): in the dataset's .zarr, else the same path in a .n5."""
    path = _fill(options.search_path, dataset, options.raw_name)
    candidates = [path]
    root, inner = split_store_path(path)
    if root.endswith(".zarr"):
        candidates.append(f"{root.removesuffix('.zarr')}.n5/{inner}")
    for candidate in candidates:
        if lister.files(candidate) & {".zattrs", ".zgroup", "attributes.json", "zarr.json"}:
            return split_store_path(_url(candidate, options.search_path))
    return None


def _filter_by_scale(
    by_crop: dict[tuple[str, str], set[str]], options: CrawlOptions, lister: Lister
) -> dict[tuple[str, str], set[str]]:
    """Keep a class of a crop only if its s0 voxel size is <= the requested one on every axis."""
    wanted = options.scale
    assert wanted is not None, "called only when the crawl filters by scale"
    keys = [(d, c, label) for (d, c), labels in by_crop.items() for label in sorted(labels)]

    def s0_scale(key: tuple[str, str, str]) -> list[float]:
        dataset, crop, label = key
        group = _fill(
            options.search_path, dataset, options.crop_name.format(crop=crop, label=label)
        )
        return read_s0_scale(lister, group)

    kept: dict[tuple[str, str], set[str]] = {}
    for (dataset, crop, label), scale in zip(keys, lister.map(s0_scale, keys), strict=True):
        if is_fine_enough(scale, wanted):
            kept.setdefault((dataset, crop), set()).add(label)
    return kept


def is_fine_enough(scale: Sequence[float], wanted: Sequence[float]) -> bool:
    """Whether voxel size `scale` (z, y, x nm) is <= `wanted` on every axis. One wanted value
    applies to all axes; two are (y, x), for 2D patches."""
    if len(wanted) == 1:
        wanted = tuple(wanted) * len(scale)
    return all(s <= w for s, w in zip(scale[-len(wanted) :], wanted, strict=True))


def read_s0_scale(lister: Lister, group: str) -> list[float]:
    """Voxel size (nm) of level s0 from an OME-NGFF multiscales group's .zattrs (zarr v2),
    else from its zarr.json (v3, OME-NGFF 0.5)."""
    try:
        attrs = lister.read_json(f"{group}/.zattrs")
    except FileNotFoundError:
        attrs = lister.read_json(f"{group}/zarr.json").get("attributes") or {}
    return list(parse_multiscales(attrs, group)[0].scale)


def _url(path: str, search_path: str) -> str:
    """Paths from s3fs lack the scheme; put it back for S3 search paths."""
    return s3_url(path) if is_s3(search_path) else path


def _url_root(search_path: str) -> str:
    base, _ = _split_template(search_path)
    return base


def _store_name(root: str) -> str:
    name = root.rstrip("/").rsplit("/", 1)[-1]
    for suffix in STORE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _sort_key(key: tuple[str, str]) -> tuple[Any, ...]:
    """Dataset, then crop in natural order (crop2 before crop10): the same on every platform."""
    dataset, crop = key
    return (dataset, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", crop)])


# --- Splitting -------------------------------------------------------------------------------


def split(
    crops: Sequence[DatasplitRow], classes: Sequence[str], options: SplitOptions
) -> tuple[list[DatasplitRow], list[str]]:
    """Assign train/validate with a seeded shuffle; return the rows and what was excluded.

    Crops missing a requested class are moved out of the split named by `force_all_classes`
    (both: left out). With at least two crops and a ratio above 0 each split gets one or more.
    """
    if not 0 <= options.validate_ratio < 1:
        raise ValueError(f"validation ratio must be in [0, 1), got {options.validate_ratio}")
    mode = options.force_all_classes
    forced_train, forced_val, free, excluded = [], [], [], []
    for crop in crops:
        complete = set(classes) <= set(crop.classes)
        if complete or mode is None:
            free.append(crop)
        elif mode == "validate":
            forced_train.append(crop)
        elif mode == "train":
            forced_val.append(crop)
        else:
            excluded.append(f"{crop.dataset}/{crop.crop}: lacks {_missing(crop, classes)}")
    num_validate = _num_validate(len(forced_train), len(forced_val), len(free), options)
    shuffled = list(free)
    random.Random(options.seed).shuffle(shuffled)
    validate = {id(c) for c in forced_val + shuffled[:num_validate]}
    rows = [
        dataclasses.replace(c, usage="validate" if id(c) in validate else "train")
        for c in crops
        if c in forced_train + forced_val + free
    ]
    if rows and all(r.usage == "validate" for r in rows):
        raise ValueError(
            f"no crop has every class of {list(classes)}, so force_all_classes={mode!r} leaves "
            "nothing to train on; use 'validate' or none"
        )
    if len(rows) > 1 and options.validate_ratio > 0 and not validate:
        excluded.append(f"validation is empty: no crop has every class of {list(classes)}")
    return rows, excluded


def _missing(crop: DatasplitRow, classes: Sequence[str]) -> str:
    return ", ".join(c for c in classes if c not in crop.classes)


def _num_validate(num_train: int, num_val: int, num_free: int, options: SplitOptions) -> int:
    """How many of the freely placed crops go to validation."""
    total = num_train + num_val + num_free
    if options.validate_ratio <= 0 or total < 2:
        return 0
    target = max(1, round(options.validate_ratio * total))
    count = min(max(target - num_val, 0), num_free)
    if num_train == 0 and count == num_free and count > 0 and (num_val or count > 1):
        count -= 1  # leave at least one crop to train on
    return count


# --- The CSV ---------------------------------------------------------------------------------


def format_rows(rows: Iterable[DatasplitRow], *, relative_to: str | Path | None = None) -> str:
    """The CSV text: five quoted fields per row, no header; roots optionally made relative."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for row in rows:
        raw_root, gt_root = row.raw_root, row.gt_root
        if relative_to is not None:
            raw_root, gt_root = _relative(raw_root, relative_to), _relative(gt_root, relative_to)
        labels = f"{row.gt_path}/[{','.join(row.classes)}]"
        writer.writerow([row.usage, raw_root, row.raw_path, gt_root, labels])
    return buffer.getvalue()


def _relative(root: str, folder: str | Path) -> str:
    return root if is_s3(root) else os.path.relpath(root, os.path.abspath(folder))


def write_datasplit(
    rows: Sequence[DatasplitRow],
    csv_path: str | Path,
    *,
    relative: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the CSV atomically (a temporary file in its folder, renamed over it, removed on
    failure); an existing file is replaced only with `overwrite`, and only if it is a
    datasplit CSV."""
    path = check_writable(csv_path, overwrite=overwrite, kind="datasplit")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = format_rows(rows, relative_to=path.parent if relative else None)
    write_text_atomic(path, text)
    return path


def check_writable(
    csv_path: str | Path,
    *,
    overwrite: bool,
    kind: str | None = None,
) -> Path:
    """Refuse, before any work, a CSV path csc cannot or must not write: a folder, a path
    below a file, or an existing file unless `overwrite` is given and it reads as a CSV of
    `kind` ("datasplit" or "counts"; default: either), the only files csc replaces."""
    path = Path(csv_path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder; give the CSV file's path, e.g. {path / 'datasplit.csv'}"
        )
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{path} cannot be written: {blocking} is a file, not a folder")
    if not (path.exists() or path.is_symlink()):
        return path
    if not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass --overwrite to replace it, or --dry-run to preview"
        )
    kinds = [kind] if kind else list(CSV_KINDS)
    if not (path.is_file() and any(CSV_KINDS[k](path) for k in kinds)):
        raise FileExistsError(
            f"{path} does not read as a {' or '.join(kinds)} CSV, so --overwrite will not "
            "replace it (it replaces only CSVs csc writes): choose another path, or move the "
            "file away yourself"
        )
    return path


# A datasplit CSV is a few hundred bytes per crop: anything far larger is something else.
MAX_CSV_BYTES = 64 * 2**20
COUNTS_HEADER = "dataset,class,crops,foreground_voxels"


def is_datasplit_csv(path: Path) -> bool:
    """Whether `path` is a datasplit CSV, as csc writes it or a person edited it: every line
    blank, a # comment or a row `read_datasplit` reads; one with no rows (empty, or only
    comments) only if its name ends in .csv, so an empty .zattrs or .zgroup never counts."""
    lines = _text_lines(path)
    if lines is None:
        return False
    rows = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for line in rows:
        try:
            _parse_row([f.strip() for f in next(csv.reader([line]))], path.parent)
        except (ValueError, csv.Error):
            return False
    return bool(rows) or path.suffix == ".csv"


def is_counts_csv(path: Path) -> bool:
    """Whether `path` is a table `csc counts --csv` wrote: its header, then dataset, class
    and two counts per line."""
    lines = _text_lines(path)
    if not lines or lines[0] != COUNTS_HEADER:
        return False
    try:
        fields = list(csv.reader(lines[1:]))
    except csv.Error:
        return False
    return all(len(f) == 4 and f[2].isdigit() and f[3].isdigit() for f in fields)


# The CSVs csc writes, each recognised by its content: what --overwrite may replace.
CSV_KINDS: dict[str, Callable[[Path], bool]] = {
    "datasplit": is_datasplit_csv,
    "counts": is_counts_csv,
}


def _text_lines(path: Path) -> list[str] | None:
    """The lines of a regular, not too large UTF-8 text file, or None."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_CSV_BYTES:
            return None
        return path.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None


def read_datasplit(csv_path: str | Path) -> list[DatasplitRow]:
    """Read a datasplit CSV: 5-column rows, or 3-column usage,raw,gt; '#' lines are comments.

    Relative roots are resolved against the CSV's own folder.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"datasplit CSV not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # comments are whole lines, never parsed as CSV
        try:
            fields = next(csv.reader([line]))
            rows.append(_parse_row([f.strip() for f in fields], path.parent))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}") from None
    return rows


def _parse_row(fields: list[str], folder: Path) -> DatasplitRow:
    if len(fields) == 5:
        usage, raw_root, raw_path, gt_root, labels = fields
    elif len(fields) == 3:
        usage, raw, labels_full = fields
        raw_root, raw_path = split_store_path(raw)
        gt_root, labels = split_store_path(labels_full)
    else:
        raise ValueError(f"expected 5 fields (or 3: usage,raw,gt), got {len(fields)}: {fields}")
    if usage not in USAGES:
        raise ValueError(f"usage must be 'train' or 'validate', got {usage!r}")
    found = re.fullmatch(r"(.*)/\[([^\]]*)\]", labels)
    if found is None:
        raise ValueError(f"label path {labels!r} must end in /[class,class,...]")
    classes = tuple(c.strip() for c in found.group(2).split(",") if c.strip())
    return DatasplitRow(
        usage,
        _absolute(raw_root, folder),
        raw_path,
        _absolute(gt_root, folder),
        found.group(1),
        classes,
    )


def _absolute(root: str, folder: Path) -> str:
    if is_s3(root) or os.path.isabs(root):
        return root
    return os.path.normpath(folder / root)


# --- From a config ---------------------------------------------------------------------------


def crawl_scale(config: TrainConfig) -> tuple[float, ...] | None:
    """The voxel size (nm per axis) a crawled class must reach, from `filter_by_scale`."""
    wanted = config.filter_by_scale
    if wanted is True:
        return tuple(float(s) for s in config.target_array_info.scale)
    if wanted is False:
        return None
    if isinstance(wanted, tuple):
        return tuple(float(s) for s in wanted) or None
    return (float(wanted),)


def options_from_config(
    config: TrainConfig, *, search_path: str | None = None
) -> tuple[CrawlOptions, SplitOptions]:
    """The crawl and split that `csc train` uses when the config's datasplit CSV is missing;
    `search_path` (one of its `search_path_candidates`) instead of the config's."""
    search_path = search_path or config.search_path
    if config.use_s3:
        search_path = s3_search_path(search_path, config.s3_bucket)
    crawl_options = CrawlOptions(
        search_path=search_path,
        raw_name=config.raw_name,
        crop_name=config.crop_name,
        classes=config.classes,
        scale=crawl_scale(config),
        endpoint_url=config.s3_endpoint_url,
        s3_timeout_s=config.s3_timeout_s,
        s3_retry_budget_s=config.s3_retry_budget_s,
    )
    split_options = SplitOptions(
        config.validation_prob, config.random_seed, config.force_all_classes
    )
    return crawl_options, split_options


def s3_options(config: TrainConfig) -> S3Options:
    """The S3 endpoint, timeouts and retry budget a config sets."""
    return S3Options(config.s3_endpoint_url, config.s3_timeout_s, config.s3_retry_budget_s)


def input_stores(config: TrainConfig) -> InputStores:
    """The local stores a config reads, which csc never writes into: the raw and ground-truth
    roots of its datasplit CSV (if it exists), and every store its search_path can name."""
    csv = Path(config.datasplit_path)
    stores = []
    for row in read_datasplit(csv) if csv.is_file() else ():
        for root, kind in ((row.raw_root, "raw"), (row.gt_root, "ground truth")):
            stores.append((root, f"the {kind} store of {row.dataset} in {csv}"))
    return InputStores.of(stores, search_path=None if config.use_s3 else config.search_path)


def ensure_datasplit(config: TrainConfig, *, echo: Callable[[str], None] = print) -> Path:
    """The config's datasplit CSV, built from its search path first if it does not exist.
    Either way every class of the config must be annotated by some crop of it, and every crop
    must annotate one of the config's classes (`check_classes`); a CSV listing more classes
    than the config is fine."""
    path = Path(config.datasplit_path)
    if path.exists():
        rows = read_datasplit(path)
        check_classes(rows, config, source=path)
        check_raw_name(rows, config, source=path)
        return path
    rows, report, crawl_options = crawl_config(config)
    check_classes(rows, config, source=None)
    write_datasplit(rows, path)
    echo(f"wrote datasplit {path} ({summarise(rows)}) from {crawl_options.search_path}")
    for line in report:
        echo(f"skipped {line}")
    return path


def crawl_config(config: TrainConfig) -> tuple[list[DatasplitRow], list[str], CrawlOptions]:
    """The crawl and split of the config's data: the rows, a line per crop left out, and the
    crawl made. A config that leaves search_path at its default tries each of its
    `search_path_candidates` in turn; when none holds crops the error names every one."""
    places = config.search_path_candidates or (config.search_path,)
    failures: list[tuple[str, Exception]] = []
    for place in dict.fromkeys((config.search_path, *places)):  # the chosen one first
        crawl_options, split_options = options_from_config(config, search_path=place)
        try:
            rows, report = make_datasplit(crawl_options, split_options)
        except (NoCropsError, FileNotFoundError) as error:  # nothing there, or no such folder
            failures.append((place, error))
            continue
        return rows, report, crawl_options
    if len(failures) == 1:
        raise failures[0][1]
    looked = "".join(f"\n  {place}: {_failure(place, error)}" for place, error in failures)
    raise NoCropsError(
        f"no crops with classes {','.join(config.classes)} found in any place csc looked for "
        f"the data of {config.config_path or 'the config'} (search_path at its default):{looked}\n"
        "put the data under one of them (e.g. `csc synth data`, or the challenge's "
        "fetch-data into data/), or set search_path to where it is"
    )


def _failure(search_path: str, error: Exception) -> str:
    """Why a crawl of `search_path` found nothing, in a line."""
    root = data_root(search_path)
    return f"no folder {root}" if not os.path.isdir(root) else str(error).splitlines()[0]


def check_classes(
    rows: Sequence[DatasplitRow], config: TrainConfig, *, source: Path | None
) -> None:
    """Raise `ValueError` when a class of the config is annotated by no crop of `rows`, or a
    crop annotates none of them: a CSV made for other classes (`source`), or, freshly
    crawled (`source` None), classes the data does not have."""
    if not rows and source is not None:
        raise ValueError(
            f"datasplit {source} lists no crops; rebuild it with `{rebuild_command(config)}`"
        )
    listed = {name for row in rows for name in row.classes}
    unlisted = [name for name in config.classes if name not in listed]
    unused = [row for row in rows if not set(row.classes) & set(config.classes)]
    if not unlisted and not unused:
        return
    if unused:
        example = f"{unused[0].dataset}/{unused[0].crop} [{','.join(unused[0].classes)}]"
        problem = f"{len(unused)} of its {len(rows)} crops annotate none of them, e.g. {example}"
    else:
        problem = f"no crop of it annotates {', '.join(unlisted)}"
    wanted = f"the config's classes are {', '.join(config.classes)}"
    if source is None:
        raise ValueError(
            f"the crawl of {config.search_path} found crops for classes "
            f"{', '.join(sorted(listed)) or 'none'}, but {wanted}: {problem}; check classes and "
            "crop_name, or drop the classes the data does not have"
        )
    raise ValueError(
        f"datasplit {source} lists classes {', '.join(sorted(listed)) or 'none'}, but {wanted}: "
        f"{problem}. It was made for other classes: rebuild it with "
        f"`{rebuild_command(config)}` (or delete it and csc train rebuilds it), or change "
        "classes (or datasplit_path)"
    )


def check_raw_name(rows: Sequence[DatasplitRow], config: TrainConfig, *, source: Path) -> None:
    """Warn (once) when the CSV's crops read raw arrays other than the config's `raw_name`:
    the CSV decides what is read, so a changed raw_name would go unnoticed."""
    other = [row for row in rows if not row.raw_path.rstrip("/").endswith(config.raw_name)]
    if not other:
        return
    warnings.warn(
        f"datasplit {source} reads raw from {other[0].raw_path} ({len(other)} of {len(rows)} "
        f"crops), not the config's raw_name {config.raw_name!r}; the CSV decides. To read "
        f"{config.raw_name}, rebuild it with `{rebuild_command(config)}`",
        ConfigWarning,
        stacklevel=2,
    )


def rebuild_command(config: TrainConfig) -> str:
    """The `csc datasplit` command that writes the config's datasplit CSV as `csc train`
    would build it."""
    crawl_options, split_options = options_from_config(config)
    parts = ["csc datasplit", f"--search-path '{crawl_options.search_path}'"]
    if crawl_options.raw_name != CrawlOptions.raw_name:
        parts.append(f"--raw-name '{crawl_options.raw_name}'")
    if crawl_options.crop_name != CrawlOptions.crop_name:
        parts.append(f"--crop-name '{crawl_options.crop_name}'")
    parts.append(f"--classes {','.join(config.classes)}")
    if crawl_options.scale:
        parts.append(f"--scale {','.join(f'{s:g}' for s in crawl_options.scale)}")
    parts.append(f"--validate-ratio {split_options.validate_ratio:g}")
    parts.append(f"--force-all-classes {split_options.force_all_classes or 'none'}")
    parts.append(f"--seed {split_options.seed}")
    parts.append(f"--csv-path '{config.datasplit_path}' --overwrite")
    return " ".join(parts)


def make_datasplit(
    crawl_options: CrawlOptions, split_options: SplitOptions
) -> tuple[list[DatasplitRow], list[str]]:
    """Crawl and split; return the rows and a line per crop left out."""
    report = crawl(crawl_options)
    rows, excluded = split(report.crops, crawl_options.classes, split_options)
    if not rows:
        reasons = "".join(f"\n  {line}" for line in report.skipped + excluded)
        raise NoCropsError(
            f"no crops with classes {','.join(crawl_options.classes)} found under "
            f"{crawl_options.search_path}; check the search path, crop name and classes{reasons}"
        )
    return rows, report.skipped + excluded


def summarise(rows: Sequence[DatasplitRow]) -> str:
    counts = {usage: sum(r.usage == usage for r in rows) for usage in USAGES}
    return f"{len(rows)} crops: {counts['train']} train, {counts['validate']} validate"


# --- Counting --------------------------------------------------------------------------------


def count_classes(options: CrawlOptions) -> tuple[list[dict[str, Any]], list[str]]:
    """Per dataset and class: crops annotated and foreground voxels at s0 (from CellMap's
    complement_counts metadata where present, counted from the data otherwise); and the
    crops skipped by the crawl."""
    lister = Lister(filesystem_for(options.search_path, options.s3))
    report = crawl(options, lister)  # one client (and its listing cache) for crawl and reads
    reader = MetadataReader(options.search_path, s3=options.s3, fs=lister.fs)
    keys = [(crop, label) for crop in report.crops for label in crop.classes]
    with s3_errors(_url_root(options.search_path), options.endpoint_url):
        voxels = lister.map(lambda key: _foreground(reader, key[0], key[1]), keys)
    totals: dict[tuple[str, str], list[int]] = {}
    for (crop, label), count in zip(keys, voxels, strict=True):
        entry = totals.setdefault((crop.dataset, label), [0, 0])
        entry[0] += 1
        entry[1] += count
    rows = [
        {"dataset": dataset, "class": label, "crops": crops, "foreground_voxels": count}
        for (dataset, label), (crops, count) in sorted(totals.items())
    ]
    return rows, report.skipped


def _foreground(reader: MetadataReader, crop: DatasplitRow, label: str) -> int:
    """Foreground voxels of a class of a crop at s0: from CellMap's complement_counts (absent
    and unknown voxels are not foreground) where present, else its non-zero voxels."""
    source = reader.source(f"{crop.gt_root}/{crop.gt_path}/{label}", FINEST, label=True)
    if source.foreground is not None:
        return source.foreground
    return count_foreground(source.url, s3=reader.s3)


def crop_matches(dataset: str, crop: str, patterns: Sequence[str]) -> bool:
    """Whether a crop matches a glob of `patterns`: its name, or dataset/crop for a pattern
    with '/'."""
    return any(fnmatch.fnmatchcase(f"{dataset}/{crop}" if "/" in p else crop, p) for p in patterns)


def select_crops(rows: Sequence[DatasplitRow], patterns: Sequence[str]) -> list[DatasplitRow]:
    """The rows whose crop (or dataset/crop, for a pattern with '/') matches a glob of
    `patterns`; every row when there are none."""
    if not patterns:
        return list(rows)

    unmatched = [p for p in patterns if not any(crop_matches(r.dataset, r.crop, [p]) for r in rows)]
    if unmatched:
        names = ", ".join(f"{row.dataset}/{row.crop}" for row in rows[:20])
        raise ValueError(
            f"--crops {','.join(unmatched)} matches no crop of the datasplit; give crop names or "
            f"dataset/crop, globs allowed. Its crops: {names or 'none'}"
        )
    return [row for row in rows if crop_matches(row.dataset, row.crop, patterns)]
