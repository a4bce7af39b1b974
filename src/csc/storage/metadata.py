"""Metadata of zarr stores: OME-NGFF ``multiscales`` and CellMap annotation attributes written
(OME-NGFF 0.4, zarr v2) and read (0.4 from ``.zattrs`` and ``.zarray``, zarr v2; 0.5 from
``zarr.json``, zarr v3), array shapes, and which chunks are stored (keys, never data).

Reading follows the spec: space axes in any length unit are converted to nm; leading time or
channel axes of size 1 are dropped (other sizes refused); a dataset's and the multiscale's
``coordinateTransformations`` are composed, the dataset's first.

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
# nm per unit of the OME-NGFF (UDUNITS-2) length units that an axis of type "space" may have.
UNITS_NM = {
    "angstrom": 0.1,
    "attometer": 1e-9,
    "centimeter": 1e7,
    "decimeter": 1e8,
    "exameter": 1e27,
    "femtometer": 1e-6,
    "foot": 3.048e8,
    "gigameter": 1e18,
    "hectometer": 1e11,
    "inch": 2.54e7,
    "kilometer": 1e12,
    "megameter": 1e15,
    "meter": 1e9,
    "micrometer": 1e3,
    "mile": 1.609344e12,
    "millimeter": 1e6,
    "nanometer": 1.0,
    "parsec": 3.0856775814913673e25,
    "petameter": 1e24,
    "picometer": 1e-3,
    "terameter": 1e21,
    "yard": 9.144e8,
    "yoctometer": 1e-15,
    "yottameter": 1e33,
    "zeptometer": 1e-12,
    "zettameter": 1e30,
}
# Short forms that some writers use instead of the spec's names.
UNIT_ALIASES = {
    "nm": "nanometer",
    "um": "micrometer",
    "\u00b5m": "micrometer",
    "\u03bcm": "micrometer",
    "mm": "millimeter",
}
# The type of an axis that gives none (it is optional in OME-NGFF 0.4), by its name.
GUESSED_TYPES = {"z": "space", "y": "space", "x": "space", "c": "channel", "t": "time"}


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
    """How a zarr array stores its chunks, from its ``.zarray`` (v2) or ``zarr.json`` (v3)."""

    chunks: tuple[int, int, int]  # voxels per chunk, (z, y, x)
    separator: str  # between a chunk key's indices: "/" (nested, z/y/x) or "." (z.y.x)
    fill_value: float  # what a missing chunk reads as
    # What a chunk key starts with before the (z, y, x) indices: "c/" for zarr v3's default
    # keys, and index 0 of each leading size-1 axis ("0/"): e.g. "c/0/" for (c, z, y, x).
    prefix: str = ""


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
    zarr_format: int = 2  # 3: OME-NGFF 0.5 (zarr.json), read with tensorstore's zarr3 driver
    num_leading: int = 0  # size-1 time/channel axes before (z, y, x), read at index 0

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
    """The levels of an OME-NGFF 0.4 or 0.5 ``multiscales`` attribute, placed in nm (z, y, x):
    units converted, dataset and multiscale ``coordinateTransformations`` composed."""
    return _multiscale(attrs, group)[0]


def _multiscale(attrs: dict[str, Any], group: str) -> tuple[list[Level], Axes]:
    """The levels of a ``multiscales`` attribute and its axes."""
    try:
        multiscale = ome_attrs(attrs)["multiscales"][0]
        axes = parse_axes(multiscale.get("axes"), group)
        shared = list(multiscale.get("coordinateTransformations") or [])
        levels = []
        for dataset in multiscale["datasets"]:
            # The spec's order: a dataset's transforms first, then the multiscale's.
            own = list(dataset["coordinateTransformations"])
            if not any(t.get("type") == "scale" for t in own):
                raise KeyError("scale")
            scale, translation = compose(own + shared, axes.ndim, group)
            levels.append(Level(dataset["path"], *axes.in_nm(scale, translation)))
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{group} has no usable OME-NGFF 'multiscales' metadata ({type(error).__name__}: "
            f"{error}); each level needs a 'scale' (and may have a 'translation') transform"
        ) from None
    if not levels:
        raise ValueError(f"{group}: 'multiscales' lists no datasets (levels)")
    return levels, axes


def ome_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """OME-NGFF attributes at the top level: 0.5 keeps them under ``ome``, 0.4 does not."""
    ome = attrs.get("ome")
    return {**attrs, **ome} if isinstance(ome, dict) else attrs


@dataclasses.dataclass(frozen=True)
class Axes:
    """A multiscale's axes as csc reads them: leading non-space axes (time, channel; read at
    index 0, so each must have size 1), then three space axes (z, y, x) and their units."""

    names: tuple[str, ...]
    kinds: tuple[str, ...]  # "space", "time", "channel" or another (custom) type
    to_nm: Vec3  # per space axis: nm per unit

    @property
    def ndim(self) -> int:
        return len(self.names)

    @property
    def num_leading(self) -> int:
        return self.ndim - 3

    def in_nm(self, scale: Sequence[float], translation: Sequence[float]) -> tuple[Vec3, Vec3]:
        """The space axes' entries of a composed transform, in nm."""
        space = slice(self.num_leading, None)
        return (
            _vec3([_nm(s, f) for s, f in zip(scale[space], self.to_nm, strict=True)]),
            _vec3([_nm(t, f) for t, f in zip(translation[space], self.to_nm, strict=True)]),
        )

    def describe(self) -> str:
        return ", ".join(f"{n} ({k})" for n, k in zip(self.names, self.kinds, strict=True))


def _numbers(values: Any, what: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of numbers, got {values!r}") from None


def _nm(value: float, factor: float) -> float:
    """`value` units in nm, 12 significant digits (0.004 micrometer: 4.0, not 4.000000000000001)"""
    return value if factor == 1.0 else float(f"{value * factor:.12g}")


def parse_axes(axes: Any, group: str) -> Axes:
    """The ``axes`` of a multiscale; none listed (before OME-NGFF 0.4): (z, y, x) in nm.
    Refused: other than three space axes, last; space axes named x, y, z in another order
    than (z, y, x); a unit that is no length."""
    if axes is None:
        return Axes(AXES, ("space",) * 3, (1.0, 1.0, 1.0))
    entries = [a if isinstance(a, dict) else {"name": a} for a in axes]
    names = tuple(str(a.get("name", "")) for a in entries)
    kinds = tuple(
        str(a.get("type") or GUESSED_TYPES.get(n, "custom"))
        for a, n in zip(entries, names, strict=True)
    )
    found = Axes(names, kinds, (1.0, 1.0, 1.0))
    if len(names) < 3 or kinds[-3:] != ("space",) * 3 or "space" in kinds[:-3]:
        raise ValueError(
            f"{group}: csc reads three space axes (z, y, x), after any time or channel axis; "
            f"its axes are {found.describe()}"
        )
    space = names[-3:]
    if sorted(space) == sorted(AXES) and space != AXES:
        raise ValueError(
            f"{group}: csc reads space axes in the order (z, y, x); its axes are "
            f"{found.describe()}: write the array with axes z, y, x"
        )
    to_nm = [_unit_nm(a.get("unit"), group, n) for a, n in zip(entries[-3:], space, strict=True)]
    return Axes(names, kinds, _vec3(to_nm))


def _unit_nm(unit: Any, group: str, axis: str) -> float:
    """nm per `unit` (a spec unit name or a short form); no unit: nanometer."""
    if unit is None:
        return 1.0
    factor = UNITS_NM.get(str(unit)) or UNITS_NM.get(UNIT_ALIASES.get(str(unit), ""))
    if factor is None:
        raise ValueError(
            f"{group}: axis {axis!r} has unit {unit!r}, which is no OME-NGFF length unit; "
            f"csc reads {', '.join(sorted(UNITS_NM))} (or {', '.join(UNIT_ALIASES)})"
        )
    return factor


def compose(
    transforms: Sequence[dict[str, Any]], ndim: int, group: str
) -> tuple[list[float], list[float]]:
    """One scale and translation (index to position: ``i * scale + translation``) equal to
    applying `transforms` in order: a scale multiplies both, a translation adds."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    for transform in transforms:
        kind = transform.get("type")
        if kind == "identity":
            continue
        if kind not in ("scale", "translation"):
            raise ValueError(
                f"{group}: coordinateTransformations of type {kind!r} are not read by csc; "
                "write 'scale' and 'translation' vectors"
            )
        values = _numbers(transform[kind], f"{group}: a {kind} transform")
        if len(values) != ndim:
            raise ValueError(
                f"{group}: a {kind} transform has {len(values)} values for {ndim} axes"
            )
        if kind == "scale":
            scale = [s * v for s, v in zip(scale, values, strict=True)]
            translation = [t * v for t, v in zip(translation, values, strict=True)]
        else:
            translation = [t + v for t, v in zip(translation, values, strict=True)]
    return scale, translation


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
        value = self._get(path)
        if value is None:
            if missing_ok:
                return {}
            raise FileNotFoundError(
                f"{path} not found: is the datasplit CSV out of date? Rebuild it with "
                "`csc datasplit ... --overwrite`"
            )
        return value

    def _get(self, path: str) -> dict[str, Any] | None:
        """A JSON file read once, threads waiting for the first read; None: it is missing."""
        with self._lock:
            reading = self._reading.setdefault(path, threading.Lock())
        with reading:
            with self._lock:
                cached = self._cache.get(path, ...)
            return self._read(path) if cached is ... else cached

    def _read(self, path: str) -> dict[str, Any] | None:
        with s3_errors(path, self.endpoint_url):
            try:  # caught inside: s3_errors turns a missing key into a StorageError
                value = read_json(self.fs, path)
            except FileNotFoundError:
                value = None
        with self._lock:
            self._cache[path] = value
        return value

    def attrs(self, node: str) -> dict[str, Any]:
        """A group's or array's attributes: its ``.zattrs`` (zarr v2), else the attributes of
        its ``zarr.json`` (v3; OME-NGFF 0.5's ``ome`` key kept); {} when it has none."""
        v2 = self._get(f"{node}/.zattrs")
        if v2 is not None:
            return v2
        v3 = self._get(f"{node}/zarr.json")
        return dict(v3.get("attributes") or {}) if v3 is not None else {}

    def array_meta(self, array: str) -> tuple[int, dict[str, Any]]:
        """An array's zarr format and metadata: its ``.zarray`` (v2), else its ``zarr.json``."""
        v2 = self._get(f"{array}/.zarray")
        if v2 is not None:
            return 2, v2
        v3 = self._get(f"{array}/zarr.json")
        if v3 is not None and v3.get("node_type") == "array":
            return 3, v3
        raise FileNotFoundError(
            f"{array} is no zarr array (no .zarray or zarr.json): is the datasplit CSV out of "
            "date? Rebuild it with `csc datasplit ... --overwrite`"
        )

    def group_attrs(self, group: str) -> dict[str, Any]:
        """A multiscale group's attributes; FileNotFoundError naming it when it has none."""
        attrs = self.attrs(group)
        missing = self._get(f"{group}/.zattrs") is None  # an empty {} is there, not missing
        if missing and self._get(f"{group}/zarr.json") is None:
            raise FileNotFoundError(
                f"{group}/.zattrs not found (nor zarr.json): is the datasplit CSV out of "
                "date? Rebuild it with `csc datasplit ... --overwrite`"
            )
        return attrs

    def source(self, group: str, scale: Sequence[float], *, label: bool) -> ArraySource:
        """The level of `group` to read at `scale` (nm), with its shape and label encoding."""
        if ".n5/" in group + "/":
            raise ValueError(
                f"{group}: N5 arrays are not read by csc's data loader yet; convert the raw "
                "to OME-NGFF zarr"
            )
        levels, axes = _multiscale(self.group_attrs(group), group)
        level = choose_level(levels, scale)
        where = f"{group}/{level.path}"
        zarr_format, array = self.array_meta(where)
        shape = _space_shape(array, axes, where)
        level = dataclasses.replace(level, shape=shape)
        stored: dict[str, Any] = {
            "dtype": _dtype(array, zarr_format, where),
            "chunking": _chunking(array, zarr_format, axes.num_leading, where),
            "s3": self.s3 if is_s3(group) else None,
            "zarr_format": zarr_format,
            "num_leading": axes.num_leading,
        }
        if not label:
            return ArraySource(group, level, **stored)
        own = array.get("attributes") or {}  # v3: in zarr.json; v2: in the array's .zattrs
        if zarr_format == 2:
            own = self.json(f"{where}/.zattrs", missing_ok=True)
        annotation = own.get("cellmap", {}).get("annotation", {})
        encoding = annotation.get("annotation_type", {}).get("encoding", {})
        counts = annotation.get("complement_counts")
        foreground = None
        if isinstance(counts, dict):
            foreground = math.prod(level.shape) - int(sum(counts.values()))
        return ArraySource(
            group, level, encoding.get("absent", 0), encoding.get("unknown"), foreground, **stored
        )


def _space_shape(array: dict[str, Any], axes: Axes, where: str) -> tuple[int, int, int]:
    """The (z, y, x) shape of an array with `axes`; leading axes other than size 1 refused."""
    shape = [int(n) for n in array.get("shape", [])]
    if len(shape) != axes.ndim:
        raise ValueError(
            f"{where} has {len(shape)} dimensions, but its group's axes are {axes.describe()}"
        )
    if any(n != 1 for n in shape[: axes.num_leading]):
        sizes = ", ".join(f"{n} {name}" for n, name in zip(shape, axes.names, strict=False))
        raise ValueError(
            f"{where} has axes {axes.describe()} and shape ({sizes}): csc reads one (z, y, x) "
            "volume, so a time or channel axis must have size 1 (it is then dropped); write "
            "each channel or time point as its own array"
        )
    return _vec3i(shape[axes.num_leading :], where)


def _dtype(array: dict[str, Any], zarr_format: int, where: str) -> str:
    """The numpy type name of an array's dtype ("<u8" or "uint64" -> "uint64"): byte order
    aside, which tensorstore converts to native on reading."""
    import numpy as np

    stored = array.get("dtype" if zarr_format == 2 else "data_type")
    try:
        return np.dtype(stored).newbyteorder("=").name
    except (TypeError, ValueError):
        raise ValueError(
            f"{where} has no dtype csc can read ({stored!r}); csc reads integer, bool and "
            "float arrays"
        ) from None


def _chunking(array: dict[str, Any], zarr_format: int, num_leading: int, where: str) -> Chunking:
    """Chunk shape, key layout and fill value of a v2 ``.zarray`` or v3 ``zarr.json``."""
    if zarr_format == 2:
        chunks = array.get("chunks", array["shape"])
        separator, prefix = array.get("dimension_separator") or ".", ""
    else:
        chunks = array.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        encoding = array.get("chunk_key_encoding") or {"name": "default"}
        default = encoding.get("name") != "v2"
        separator = (encoding.get("configuration") or {}).get("separator") or (
            "/" if default else "."
        )
        prefix = f"c{separator}" if default else ""
    try:  # a number, "NaN"/"Infinity", or false for bool; null reads as zeros
        fill_value = float(array.get("fill_value") or 0)
    except (TypeError, ValueError):
        fill_value = 0.0
    prefix += f"0{separator}" * num_leading
    return Chunking(
        _vec3i(list(chunks or array["shape"])[num_leading:], where), separator, fill_value, prefix
    )


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
    separator, prefix = source.chunking.separator, source.chunking.prefix
    middle = prefix + separator.join(str(r[len(r) // 2]) for r in ranges)
    with s3_errors(source.url, reader.endpoint_url):
        try:
            if fs.exists(f"{path}/{middle}"):
                return True
            if separator == "/":  # the prefix's parts are folders: "c/0/" is c/0/z/y/x
                return _nested_stored(fs, f"{path}/{prefix}".rstrip("/"), ranges)
            names = [n.removeprefix(prefix) for n in names_in(fs, path) if n.startswith(prefix)]
            return any(in_ranges(name.split("."), ranges) for name in names)
        except PermissionError:  # listing refused (a bucket that allows reads only): can't tell
            return True


def _nested_stored(fs: Any, path: str, ranges: Sequence[range]) -> bool:
    """Whether a nested key ``path/i/j/k`` exists with each index in its range."""
    inside = [name for name in names_in(fs, path) if name.isdigit() and int(name) in ranges[0]]
    if len(ranges) == 1:
        return bool(inside)
    return any(_nested_stored(fs, f"{path}/{name}", ranges[1:]) for name in inside)


def in_ranges(indices: Sequence[str], ranges: Sequence[range]) -> bool:
    """Whether a chunk key's indices (z, y, x as text) all lie in the per-axis `ranges`."""
    return len(indices) == len(ranges) and all(
        i.isdigit() and int(i) in r for i, r in zip(indices, ranges, strict=True)
    )
