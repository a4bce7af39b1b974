"""OME-NGFF 0.4 and CellMap metadata for zarr format 2 stores: building and writing it.

Coordinates follow OME-NGFF: axes are (z, y, x) in nanometers, and a level's ``translation`` is
the world position of the centre of its voxel 0, so voxel ``i`` is centred at
``translation + i * scale``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

AXES = ("z", "y", "x")
COMPRESSORS = ("zstd", "blosc-lz4", "gzip", "none")


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


def make_compressor(name: str) -> Any:
    """A numcodecs codec by csc's name for it; Zstd level 6 is what public CellMap raw uses."""
    import numcodecs

    codecs = {
        "zstd": lambda: numcodecs.Zstd(level=6),
        "blosc-lz4": lambda: numcodecs.Blosc(
            cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE
        ),
        "gzip": lambda: numcodecs.GZip(level=5),
        "none": lambda: None,
    }
    if name not in codecs:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(COMPRESSORS)}")
    return codecs[name]()


def write_array(
    group: Any,
    name: str,
    data: Any,
    *,
    chunks: Sequence[int],
    compressor: str,
    attrs: dict[str, Any] | None = None,
) -> None:
    """Write `data` as zarr format 2 array `name` in `group`, chunk keys nested like CellMap's."""
    codec = make_compressor(compressor)
    array = group.create_array(
        name,
        shape=data.shape,
        chunks=tuple(min(c, s) for c, s in zip(chunks, data.shape, strict=True)),
        dtype=data.dtype,
        compressors=codec if codec is not None else None,
        fill_value=0,
        chunk_key_encoding={"name": "v2", "separator": "/"},
    )
    array[...] = data
    if attrs:
        array.attrs.update(attrs)
