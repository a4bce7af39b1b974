"""csc fetch-data: download ground-truth crops and the EM around them from a bucket into the
CellMap layout csc reads (``DEST/{dataset}/{dataset}.zarr/recon-1/...``).

What is fetched follows the challenge toolkit (the crops of the crop manifest and the test
crops; the EM levels at least as coarse as the crop, `LEVEL_RATIO`; only the chunks that touch
the crop and its padding); how follows csc: resumable (files complete by size are kept), each
file written under a temporary name and renamed, a user's file never replaced (the record in
csc.storage.fetch), bounded concurrency, training's S3 retries and timeouts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from csc.manifests import TrainingCropRow, scored_crops, training_crop_rows
from csc.storage import (
    ArrayLayout,
    FetchRecord,
    FetchState,
    Level,
    S3Options,
    Transfer,
    array_layout,
    check_source,
    chunk_keys,
    clean_partials,
    download,
    list_tree,
    local_path,
    parse_multiscales,
    read_optional,
    source_filesystem,
    split_store_path,
    state_of,
    touched_chunks,
)

Vec3 = tuple[float, float, float]
DEFAULT_DEST = "data"
DEFAULT_WORKERS = 16
# The toolkit's rule: an EM level is fetched if its voxel size over the crop's is above this
# on every axis (the crop's own resolution and every coarser level); 0 with all resolutions.
LEVEL_RATIO = 0.8
GROUP_FILES = (".zgroup", ".zattrs")
ARRAY_FILES = (".zarray", ".zattrs")


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    """What to fetch and how (the options of csc fetch-data)."""

    crops: str = "all"  # "all" (training and test crops), "test" (EM only) or "1,2,..."
    dest: str = DEFAULT_DEST
    raw_padding: int = 0  # EM voxels of each level added on every side of a crop
    all_resolutions: bool = False  # every EM level, also those finer than the crop
    workers: int = DEFAULT_WORKERS  # files downloaded (and folders listed) at once
    manifest: str | None = None  # the crop manifest (None: $CSC_FETCH_DATA_MANIFEST_URL, csc's)
    test_crop_manifest: str | None = None  # None: $CSC_TEST_CROP_MANIFEST_URL, else csc's
    s3: S3Options = dataclasses.field(default_factory=S3Options)
    anonymous: bool = True  # unsigned requests (the public bucket); False: AWS credentials

    def __post_init__(self) -> None:
        if self.raw_padding < 0:
            raise ValueError(f"--raw-padding {self.raw_padding}: give a number of voxels >= 0")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: give at least 1")


@dataclasses.dataclass(frozen=True)
class CropSpace:
    """Where a crop lies, in nm (z, y, x): its voxel size and its first and last coordinates."""

    voxel_size: Vec3
    first: Vec3
    last: Vec3


@dataclasses.dataclass(frozen=True)
class CropTarget:
    """One crop to fetch: a training crop (ground truth and EM; its space read from its
    ground truth) or a test crop (EM only; its space from the test crop manifest)."""

    id: int
    dataset: str
    em_url: str
    crop_url: str | None = None  # None: a test crop, no ground truth
    space: CropSpace | None = None  # a test crop's

    @property
    def name(self) -> str:
        return f"crop{self.id}"


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """What one crop needs: its EM levels and files (ground truth, EM chunks)."""

    crop: CropTarget
    levels: tuple[str, ...]
    num_truth_files: int
    num_chunks: int


@dataclasses.dataclass
class FetchPlan:
    """Every file the selected crops need, once each, and what is already there."""

    dest: Path
    crops: list[CropPlan]
    transfers: dict[Path, Transfer]
    states: dict[Path, FetchState]

    def with_state(self, *states: FetchState) -> list[Transfer]:
        return [t for path, t in self.transfers.items() if self.states[path] in states]

    @property
    def to_fetch(self) -> list[Transfer]:
        """Files missing, or csc's own that no longer match the source."""
        return self.with_state("missing", "replace")

    @property
    def num_bytes(self) -> int:
        return sum(t.size for t in self.to_fetch)


@dataclasses.dataclass(frozen=True)
class FetchReport:
    """What a run did: files and bytes fetched, csc's own files replaced, a user's kept."""

    plan: FetchPlan
    num_fetched: int
    num_bytes: int
    replaced: tuple[Path, ...]
    kept: tuple[Path, ...]
    num_partials_removed: int


# --- Which crops -------------------------------------------------------------------------------


def select_crops(
    selection: str, *, manifest: str | None = None, test_crop_manifest: str | None = None
) -> list[CropTarget]:
    """The crops of `selection`: "all" (every training crop, then the test crops), "test"
    (the test crops, EM only) or comma-separated training crop numbers ("111,crop112")."""
    rows = training_crop_rows(manifest)
    text = selection.strip()
    if text in ("all", "test"):
        training = [] if text == "test" else [_training(r) for r in rows]
        return training + _test_crops(rows, test_crop_manifest)
    by_id = {row.id: row for row in rows}
    wanted = [_crop_number(part) for part in text.split(",") if part.strip()]
    unknown = [n for n in wanted if n not in by_id]
    if unknown or not wanted:
        raise ValueError(
            f"--crops {selection}: {', '.join(f'crop{n}' for n in unknown) or 'no crop'} not in "
            "the crop manifest; give 'all', 'test' or training crop numbers, e.g. 111,112"
        )
    return [_training(by_id[n]) for n in dict.fromkeys(wanted)]


def _crop_number(text: str) -> int:
    try:
        return int(text.strip().removeprefix("crop"))
    except ValueError:
        raise ValueError(
            f"--crops: {text.strip()!r} is no crop number; give 'all', 'test' or e.g. 111,112"
        ) from None


def _training(row: TrainingCropRow) -> CropTarget:
    check_source(row.crop_url, f"crop{row.id}'s crop_url")
    check_source(row.em_url, f"crop{row.id}'s em_url")
    return CropTarget(row.id, row.dataset, row.em_url, row.crop_url)


def _test_crops(rows: Sequence[TrainingCropRow], manifest: str | None) -> list[CropTarget]:
    """The test crops, each with its dataset's EM URL from the crop manifest."""
    em_urls = {row.dataset: row.em_url for row in rows}
    targets = []
    for crop in scored_crops(manifest):
        if crop.dataset not in em_urls:
            raise ValueError(
                f"test crop {crop.id}'s dataset {crop.dataset} has no row in the crop manifest, "
                "which gives its EM location; use a crop manifest that lists it (--manifest), "
                "or select training crops by number"
            )
        end = tuple(
            t + v * n for t, v, n in zip(crop.translation, crop.voxel_size, crop.shape, strict=True)
        )
        targets.append(
            CropTarget(
                crop.id,
                crop.dataset,
                em_urls[crop.dataset],
                space=CropSpace(crop.voxel_size, crop.translation, (end[0], end[1], end[2])),
            )
        )
    return targets


# --- Which EM levels and chunks ------------------------------------------------------------


def em_levels(
    levels: Sequence[Level], voxel_size: Sequence[float], *, all_resolutions: bool
) -> list[Level]:
    """The EM levels to fetch for a crop of `voxel_size` (nm): level / crop voxel size above
    LEVEL_RATIO on every axis (above 0 with `all_resolutions`); levels with a size-1 axis
    are skipped, as the toolkit does."""
    ratio = 0.0 if all_resolutions else LEVEL_RATIO
    return [
        level
        for level in levels
        if min(level.shape) > 1
        and all(s / v > ratio for s, v in zip(level.scale, voxel_size, strict=True))
    ]


def level_region(
    level: Level, first: Sequence[float], last: Sequence[float], padding: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Voxels [start, stop) of `level` for a crop from `first` to `last` (nm, z, y, x): each
    mapped to the nearest voxel centre (a tie to the higher index, as the toolkit's nearest
    selection), widened by `padding` voxels of this level, clipped to the array."""
    start, stop = [], []
    for a, b, scale, origin, size in zip(
        first, last, level.scale, level.translation, level.shape, strict=True
    ):
        low, high = sorted(_nearest(x, scale, origin, size) for x in (a, b))
        start.append(max(0, low - padding))
        stop.append(min(size, high + padding + 1))
    return tuple(start), tuple(stop)


def _nearest(position: float, scale: float, origin: float, size: int) -> int:
    """The index of the voxel centre nearest `position` (nm), within [0, size)."""
    return min(size - 1, max(0, math.floor((position - origin) / scale + 0.5)))


# --- The plan: every file, once ------------------------------------------------------------


class _Planner:
    """Reads what the plan needs (metadata, listings) through one filesystem, each once."""

    def __init__(self, options: FetchOptions, fs: object) -> None:
        self.options, self.fs = options, fs
        self.dest = Path(options.dest).absolute()
        self.endpoint = options.s3.endpoint_url
        self.transfers: dict[Path, Transfer] = {}
        self._groups: dict[str, tuple[list[Level], dict[str, ArrayLayout]]] = {}
        self._copied: set[str] = set()

    def add(self, url: str, size: int, data: bytes | None = None) -> Transfer:
        transfer = Transfer(url, local_path(self.dest, url), size, data)
        self.transfers.setdefault(transfer.path, transfer)
        return transfer

    def small_files(self, folder: str, names: Sequence[str]) -> dict[str, bytes]:
        """The files `names` of `folder` that exist, read now and planned as they are."""
        found = {}
        for name in names:
            data = read_optional(self.fs, f"{folder}/{name}", self.endpoint)
            if data is not None:
                self.add(f"{folder}/{name}", len(data), data)
                found[name] = data
        return found

    def ancestors(self, group: str, *, inclusive: bool) -> None:
        """The group metadata from the store root down to `group` (`inclusive`: its own)."""
        root, inside = split_store_path(group)
        parts = inside.split("/") if inside else []
        for depth in range(len(parts) + (1 if inclusive else 0)):
            folder = "/".join([root, *parts[:depth]])
            if folder not in self._copied:
                self._copied.add(folder)
                self.small_files(folder, GROUP_FILES)

    def em_group(self, url: str) -> tuple[list[Level], dict[str, ArrayLayout]]:
        """The EM group's levels (with shapes) and layouts; all levels' metadata planned."""
        if url not in self._groups:
            self.ancestors(url, inclusive=True)
            attrs = read_optional(self.fs, f"{url}/.zattrs", self.endpoint)
            if attrs is None:
                raise FileNotFoundError(
                    f"{url}/.zattrs not found: the EM group needs OME-NGFF 0.4 multiscales "
                    "(zarr v2); check the crop manifest's em_url"
                )
            levels, layouts = [], {}
            for level in parse_multiscales(json.loads(attrs), url):
                meta = self.small_files(f"{url}/{level.path}", ARRAY_FILES)
                if ".zarray" not in meta:
                    raise FileNotFoundError(f"{url}/{level.path}/.zarray not found")
                layout = array_layout(meta[".zarray"], f"{url}/{level.path}")
                layouts[level.path] = layout
                levels.append(dataclasses.replace(level, shape=layout.shape))
            self._groups[url] = (levels, layouts)
        return self._groups[url]

    def truth(self, crop: CropTarget) -> tuple[int, CropSpace]:
        """Plan every file of a training crop's group; its number of files, and the voxel
        size and first/last voxel centres (nm) of its first multiscale class group's finest
        level (the toolkit's ground-truth voxel size)."""
        assert crop.crop_url is not None
        self.ancestors(crop.crop_url, inclusive=False)
        files = list_tree(self.fs, crop.crop_url, self.endpoint)
        read: dict[str, bytes] = {}
        for name in sorted({p.split("/")[0] for p in files if "/" in p}):
            data = self._read_listed(crop.crop_url, f"{name}/.zattrs", files, read)
            attrs = json.loads(data) if data else {}
            if isinstance(attrs, dict) and attrs.get("multiscales"):
                space = self._finest(crop.crop_url, name, attrs, files, read)
                break
        else:
            raise ValueError(
                f"{crop.crop_url} has no class group with OME-NGFF multiscales, so its voxel "
                "size is unknown; check the crop manifest's crop_url"
            )
        for path, size in files.items():
            self.add(f"{crop.crop_url}/{path}", size, read.get(path))
        return len(files), space

    def _finest(
        self,
        crop_url: str,
        name: str,
        attrs: dict[str, Any],
        files: dict[str, int],
        read: dict[str, bytes],
    ) -> CropSpace:
        group = f"{crop_url}/{name}"
        finest = min(parse_multiscales(attrs, group), key=lambda lv: math.prod(lv.scale))
        zarray = self._read_listed(crop_url, f"{name}/{finest.path}/.zarray", files, read)
        if zarray is None:
            raise FileNotFoundError(f"{group}/{finest.path}/.zarray not found")
        shape = array_layout(zarray, f"{group}/{finest.path}").shape
        last = tuple(
            t + s * (n - 1) for t, s, n in zip(finest.translation, finest.scale, shape, strict=True)
        )
        return CropSpace(finest.scale, finest.translation, (last[0], last[1], last[2]))

    def _read_listed(
        self, crop_url: str, path: str, files: dict[str, int], read: dict[str, bytes]
    ) -> bytes | None:
        if path not in files:
            return None
        data = read_optional(self.fs, f"{crop_url}/{path}", self.endpoint)
        if data is not None:
            read[path] = data
        return data

    def chunks(self, crop: CropTarget, space: CropSpace) -> tuple[tuple[str, ...], int]:
        """Plan the EM chunks a crop touches (with its padding) at each chosen level."""
        levels, layouts = self.em_group(crop.em_url)
        chosen = em_levels(levels, space.voxel_size, all_resolutions=self.options.all_resolutions)
        count = 0
        for level in chosen:
            layout = layouts[level.path]
            start, stop = level_region(level, space.first, space.last, self.options.raw_padding)
            array = f"{crop.em_url}/{level.path}"
            keys = chunk_keys(
                self.fs,
                array,
                touched_chunks(start, stop, layout.chunks),
                layout.separator,
                workers=self.options.workers,
                endpoint_url=self.endpoint,
            )
            for key, size in keys.items():
                self.add(f"{array}/{key}", size)
            count += len(keys)
        return tuple(level.path for level in chosen), count

    def crop(self, crop: CropTarget) -> CropPlan:
        if crop.crop_url is not None:
            num_files, space = self.truth(crop)
        else:
            assert crop.space is not None
            num_files, space = 0, crop.space
        levels, num_chunks = self.chunks(crop, space)
        return CropPlan(crop, levels, num_files, num_chunks)


def plan_fetch(options: FetchOptions, fs: object | None = None) -> FetchPlan:
    """Every file the selected crops need and its local state; reads metadata and listings
    from the bucket, writes nothing."""
    dest = Path(options.dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"--dest {dest} is a file; give a folder")
    crops = select_crops(
        options.crops, manifest=options.manifest, test_crop_manifest=options.test_crop_manifest
    )
    fs = fs if fs is not None else _filesystem(options)
    planner = _Planner(options, fs)
    plans = [planner.crop(crop) for crop in crops]
    record = FetchRecord(planner.dest)
    states = {path: state_of(t, record) for path, t in planner.transfers.items()}
    return FetchPlan(planner.dest, plans, planner.transfers, states)


def _filesystem(options: FetchOptions) -> object:
    return source_filesystem(options.s3, anon=options.anonymous, connections=options.workers)


def fetch_data(
    options: FetchOptions,
    *,
    on_start: Callable[[FetchPlan], Callable[[Transfer], None]] | None = None,
) -> FetchReport:
    """Fetch what the plan lacks: missing files, and csc's own files that no longer match the
    source; a user's files are kept. `on_start(plan)` returns a callback per finished file
    (a progress bar)."""
    fs = _filesystem(options)
    plan = plan_fetch(options, fs)
    removed = clean_partials({t.path.parent for t in plan.transfers.values()})
    todo = plan.to_fetch
    on_done = on_start(plan) if on_start is not None else (lambda _t: None)
    record = FetchRecord(plan.dest)
    download(
        fs,
        todo,
        record,
        workers=options.workers,
        on_done=on_done,
        endpoint_url=options.s3.endpoint_url,
    )
    return FetchReport(
        plan,
        len(todo),
        sum(t.size for t in todo),
        tuple(t.path for t in plan.with_state("replace")),
        tuple(t.path for t in plan.with_state("keep")),
        removed,
    )


def progress_bar(*, quiet: bool) -> Callable[[FetchPlan], Callable[[Transfer], None]]:
    """An `on_start` for `fetch_data`: a tqdm bar of bytes with its ETA on stderr, shown only
    on a terminal and unless `quiet`."""

    def start(plan: FetchPlan) -> Callable[[Transfer], None]:
        from tqdm import tqdm

        bar = tqdm(
            total=plan.num_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="fetch-data",
            file=sys.stderr,
            disable=quiet or not sys.stderr.isatty(),
        )
        return lambda transfer: bar.update(transfer.size)

    return start


# --- What a plan says ----------------------------------------------------------------------


def size_text(num_bytes: int) -> str:
    """Bytes as people read them: 1.5 MiB."""
    value, unit = float(num_bytes), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{num_bytes} B" if unit == "B" else f"{value:.1f} {unit}"


def describe_plan(plan: FetchPlan) -> list[str]:
    """One line per crop (ground-truth files, EM levels and chunks), then the totals."""
    lines = []
    for crop in plan.crops:
        truth = (
            "test crop, no ground truth"
            if crop.crop.crop_url is None
            else (f"ground truth {crop.num_truth_files} files")
        )
        levels = " ".join(crop.levels) or "none"
        lines.append(
            f"{crop.crop.name} {crop.crop.dataset}: {truth}; EM levels {levels}: "
            f"{crop.num_chunks} chunks"
        )
    complete = len(plan.with_state("complete"))
    kept = len(plan.with_state("keep"))
    lines.append(
        f"would fetch {len(plan.to_fetch)} files ({size_text(plan.num_bytes)}) into {plan.dest}; "
        f"{complete} already complete, {kept} kept (they differ from the source and csc did "
        "not write them)"
    )
    return lines
