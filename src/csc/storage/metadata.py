"""Metadata of zarr v2 stores: OME-NGFF 0.4 ``multiscales`` and CellMap annotation attributes
written and read, ``.zarray`` shapes, and which chunks are stored (keys, never data).

Metadata is read with fsspec, never tensorstore: tensorstore aborts a process forked after it
has been used, and DataLoader workers are forked from the process that builds the datasets.

Coordinates follow OME-NGFF: axes are (z, y, x) in nanometers, and a level's ``translation`` is
the world position of the centre of its voxel 0, so voxel ``i`` is centred at
``translation + i * scale`` and covers ``translation + (i - 1/2) * scale`` to ``... + (i + 1/2)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from csc.storage.files import names_in
from csc.storage.s3 import S3Options, filesystem_for, s3_errors
from csc.storage.urls import fs_path, is_s3

if TYPE_CHECKING:
    import numpy as np

AXES = ("z", "y", "x")
Vec3 = tuple[float, float, float]
FINEST = (0.0, 0.0, 0.0)  # nm: no level is this fine, so `choose_level` returns the finest


# --- Writing -------------------------------------------------------------------------------


def level_transforms(
    scale: Sequence[float], translation: Sequence[float], num_levels: int
) -> list[tuple[list[float], list[float]]]:
    """(scale, translation) in nm for levels s0.. of a pyramid downsampled 2x per level.

    A 2x average moves the centre of voxel 0 half an s0 voxel per level step:
    ``t_n = t_0 + (2**n - 1) * s_0 / 2``.
    """
    levels = []
    for n in range(num_levels):
        factor = 2**n
        level_scale = [float(s * factor) for s in scale]
        level_translation = [
            float(t + (factor - 1) * s / 2) for s, t in zip(scale, translation, strict=True)
        ]
        levels.append((level_scale, level_translation))
    return levels


def multiscales_attrs(
    name: str, levels: Sequence[tuple[Sequence[float], Sequence[float]]]
) -> dict[str, Any]:
    """The OME-NGFF 0.4 ``multiscales`` attribute for a group holding arrays s0, s1, ..."""
    datasets = [
        {
            "path": f"s{n}",
            "coordinateTransformations": [
                {"type": "scale", "scale": list(scale)},
                {"type": "translation", "translation": list(translation)},
            ],
        }
        for n, (scale, translation) in enumerate(levels)
    ]
    axes = [{"name": axis, "type": "space", "unit": "nanometer"} for axis in AXES]
    return {"multiscales": [{"version": "0.4", "name": name, "axes": axes, "datasets": datasets}]}


def image_label_attrs() -> dict[str, Any]:
    """The OME-NGFF 0.4 ``image-label`` attribute that marks a group's arrays as labels (integer
    ids or 0/1), beside its ``multiscales``."""
    return {"image-label": {"version": "0.4"}}


def annotation_attrs(class_name: str, num_absent: int) -> dict[str, Any]:
    """CellMap's per-array annotation attributes for a 0/1 semantic label array."""
    return {
        "cellmap": {
            "annotation": {
                "class_name": class_name,
                "annotation_type": {
                    "type": "semantic_segmentation",
                    "encoding": {"absent": 0, "present": 1},
                },
                "complement_counts": {"absent": int(num_absent)},
            }
        }
    }


# --- Reading -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Level:
    """One scale level of a multiscale group: its array path, voxel size and placement."""

    path: str  # array inside the group, e.g. "s1"
    scale: Vec3  # nm per voxel, (z, y, x)
    translation: Vec3  # nm, centre of voxel 0
    shape: tuple[int, int, int] = (0, 0, 0)  # voxels; filled in once the level is chosen

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World extent (nm) of the level's voxels: first and last voxel edges, (z, y, x)."""
        import numpy as np

        scale, origin = np.asarray(self.scale), np.asarray(self.translation)
        return origin - scale / 2, origin + (np.asarray(self.shape) - 0.5) * scale


@dataclasses.dataclass(frozen=True)
class Chunking:
    """How a zarr v2 array stores its chunks, from its ``.zarray``."""

    chunks: tuple[int, int, int]  # voxels per chunk, (z, y, x)
    separator: str  # between a chunk key's indices: "/" (nested, z/y/x) or "." (z.y.x)
    fill_value: float  # what a missing chunk reads as


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """One array to read patches from: a multiscale group and the level chosen for a scale."""

    group: str  # group URL: a local path or an S3 URL (s3, bucket, key)
    level: Level
    absent: int | None = None  # label encoding: the value for background (None: raw data)
    unknown: int | None = None  # label encoding: the value for "not annotated here"
    foreground: int | None = None  # label voxels that are present, from complement_counts
    dtype: str | None = None  # numpy type of the stored values, native byte order ("uint8")
    chunking: Chunking | None = None
    s3: S3Options | None = None  # endpoint, timeouts and retry budget of a group on S3

    @property
    def url(self) -> str:
        return f"{self.group}/{self.level.path}"


def choose_level(levels: Sequence[Level], scale: Sequence[float]) -> Level:
    """The coarsest level not coarser than `scale` on any axis; else the finest level."""
    fine = [
        lv
        for lv in levels
        if all(s <= w * (1 + 1e-6) for s, w in zip(lv.scale, scale, strict=True))
    ]
    if fine:
        return max(fine, key=lambda lv: math.prod(lv.scale))
    return min(levels, key=lambda lv: math.prod(lv.scale))


def parse_multiscales(attrs: dict[str, Any], group: str) -> list[Level]:
    """The levels of an OME-NGFF 0.4 ``multiscales`` attribute (scale and translation, nm)."""
    try:
        multiscale = attrs["multiscales"][0]
        levels = []
        for dataset in multiscale["datasets"]:
            transforms = {t["type"]: t for t in dataset.get("coordinateTransformations", [])}
            scale = transforms["scale"]["scale"]
            translation = transforms.get("translation", {}).get("translation", [0.0] * len(scale))
            levels.append(Level(dataset["path"], _vec3(scale), _vec3(translation)))
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise ValueError(
            f"{group} has no usable OME-NGFF 'multiscales' metadata ({type(error).__name__}: "
            f"{error}); each level needs 'scale' and 'translation' transforms in (z, y, x) nm"
        ) from None
    if not levels:
        raise ValueError(f"{group}: 'multiscales' lists no datasets (levels)")
    return levels


def _vec3(values: Sequence[float]) -> Vec3:
    if len(values) != 3:
        raise ValueError(f"expected 3 values (z, y, x), got {list(values)}")
    return (float(values[0]), float(values[1]), float(values[2]))


def read_json(fs: Any, url: str) -> dict[str, Any]:
    """A JSON file through the fsspec filesystem `fs` (one GET on S3)."""
    return json.loads(fs.cat_file(fs_path(url)))


class MetadataReader:
    """Reads the small JSON files of zarr v2 groups and arrays, locally or on S3, cached.
    `root` is a location of the kind it reads (any S3 URL, or a local path); `fs`, if given,
    is the filesystem to read through (one client and listing cache shared with a crawl)."""

    def __init__(
        self,
        root: str,
        *,
        endpoint_url: str | None = None,
        s3: S3Options | None = None,
        fs: Any | None = None,
    ) -> None:
        self.root = root
        self.s3 = s3 or S3Options(endpoint_url=endpoint_url)
        self.endpoint_url = self.s3.endpoint_url
        self.fs = fs if fs is not None else filesystem_for(root, self.s3)
        self._cache: dict[str, dict[str, Any] | None] = {}  # None: the file does not exist
        self._lock = threading.Lock()
        self._reading: dict[str, threading.Lock] = {}  # one per path: threads read it once

    def json(self, path: str, *, missing_ok: bool = False) -> dict[str, Any]:
        """A JSON file, read once (one GET on S3); a missing one is remembered as missing."""
        with self._lock:
            reading = self._reading.setdefault(path, threading.Lock())
        with reading:
            with self._lock:
                cached = self._cache.get(path, ...)
            value = self._read(path) if cached is ... else cached
        if value is None:
            if missing_ok:
                return {}
            raise FileNotFoundError(
                f"{path} not found: is the datasplit CSV out of date? Rebuild it with "
                "`csc datasplit ... --overwrite`"
            )
        return value

    def _read(self, path: str) -> dict[str, Any] | None:
        try:
            with s3_errors(path, self.endpoint_url):
                value = read_json(self.fs, path)
        except FileNotFoundError:
            value = None
        with self._lock:
            self._cache[path] = value
        return value

    def source(self, group: str, scale: Sequence[float], *, label: bool) -> ArraySource:
        """The level of `group` to read at `scale` (nm), with its shape and label encoding."""
        if ".n5/" in group + "/":
            raise ValueError(
                f"{group}: N5 arrays are not read by csc's data loader yet; convert the raw "
                "to OME-NGFF zarr"
            )
        level = choose_level(parse_multiscales(self.json(f"{group}/.zattrs"), group), scale)
        array = self.json(f"{group}/{level.path}/.zarray")
        where = f"{group}/{level.path}"
        level = dataclasses.replace(level, shape=_vec3i(array["shape"], where))
        s3 = self.s3 if is_s3(group) else None
        stored: dict[str, Any] = {
            "dtype": _dtype(array, where),
            "chunking": _chunking(array, where),
            "s3": s3,
        }
        if not label:
            return ArraySource(group, level, **stored)
        attrs = self.json(f"{group}/{level.path}/.zattrs", missing_ok=True)
        annotation = attrs.get("cellmap", {}).get("annotation", {})
        encoding = annotation.get("annotation_type", {}).get("encoding", {})
        counts = annotation.get("complement_counts")
        foreground = None
        if isinstance(counts, dict):
            foreground = math.prod(level.shape) - int(sum(counts.values()))
        return ArraySource(
            group, level, encoding.get("absent", 0), encoding.get("unknown"), foreground, **stored
        )


def _dtype(array: dict[str, Any], where: str) -> str:
    """The numpy type name of a ``.zarray``'s dtype ("<u8" -> "uint64"): byte order aside,
    which tensorstore converts to native on reading."""
    import numpy as np

    try:
        return np.dtype(array["dtype"]).newbyteorder("=").name
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"{where}/.zarray has no dtype csc can read ({array.get('dtype')!r}); csc reads "
            "integer, bool and float arrays"
        ) from None


def _chunking(array: dict[str, Any], where: str) -> Chunking:
    chunks = _vec3i(array.get("chunks", array["shape"]), where)
    try:  # a number, "NaN"/"Infinity", or false for bool; null reads as zeros
        fill_value = float(array.get("fill_value") or 0)
    except (TypeError, ValueError):
        fill_value = 0.0
    return Chunking(chunks, array.get("dimension_separator") or ".", fill_value)


def _vec3i(values: Sequence[int], where: str) -> tuple[int, int, int]:
    if len(values) != 3:
        raise ValueError(f"{where} has {len(values)} dimensions; csc reads 3D (z, y, x) arrays")
    return (int(values[0]), int(values[1]), int(values[2]))


# --- Which chunks are stored: keys, not voxels ---------------------------------------------


def chunk_ranges(source: ArraySource, start: Sequence[int], stop: Sequence[int]) -> list[range]:
    """Per axis (z, y, x), the chunk indices of `source`'s level that voxels [start, stop)
    overlap, within the array (an empty range: the box lies outside it)."""
    assert source.chunking is not None
    return [
        range(max(0, a // c), min(-(-n // c), -(-b // c)))
        for a, b, c, n in zip(start, stop, source.chunking.chunks, source.level.shape, strict=True)
    ]


def any_chunk_stored(
    reader: MetadataReader, source: ArraySource, start: Sequence[int], stop: Sequence[int]
) -> bool:
    """Whether any chunk of `source`'s level overlapping voxels [start, stop) is stored (a
    missing chunk reads as the fill value), through `reader`'s filesystem. Asks for keys,
    never data: the middle chunk first (one request when it is there, the usual case), then
    listings that descend the nested keys z/y/x only where indices in range exist (one
    listing when none is stored)."""
    assert source.chunking is not None
    ranges = chunk_ranges(source, start, stop)
    if any(len(r) == 0 for r in ranges):
        return False
    fs, path = reader.fs, fs_path(source.url)
    separator = source.chunking.separator
    middle = separator.join(str(r[len(r) // 2]) for r in ranges)
    with s3_errors(source.url, reader.endpoint_url):
        try:
            if fs.exists(f"{path}/{middle}"):
                return True
            if separator == "/":
                return _nested_stored(fs, path, ranges)
            return any(_in_ranges(name.split("."), ranges) for name in names_in(fs, path))
        except PermissionError:  # listing refused (a bucket that allows reads only): can't tell
            return True


def _nested_stored(fs: Any, path: str, ranges: Sequence[range]) -> bool:
    """Whether a nested key ``path/i/j/k`` exists with each index in its range."""
    inside = [name for name in names_in(fs, path) if name.isdigit() and int(name) in ranges[0]]
    if len(ranges) == 1:
        return bool(inside)
    return any(_nested_stored(fs, f"{path}/{name}", ranges[1:]) for name in inside)


def _in_ranges(indices: Sequence[str], ranges: Sequence[range]) -> bool:
    return len(indices) == len(ranges) and all(
        i.isdigit() and int(i) in r for i, r in zip(indices, ranges, strict=True)
    )
