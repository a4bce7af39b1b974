"""Bring a label array into a test crop's space exactly as the CellMap challenge does.

The rules are the toolkit's `MatchedCrop.load_aligned` (scoring.md §2): resample with
`skimage.transform.rescale` when the voxel sizes differ (nearest neighbour for instance
classes, linear then > 0.5 for semantic ones), centre pad/crop when the voxel size is unknown,
then shift by the floor-snapped translation offset and pad/crop corner-aligned to the crop's
shape. Sizes and positions are nm, (z, y, x).

Not copied: above 500 MB (as float32) the toolkit resamples chunk by chunk, which can differ
from whole-array resampling near chunk borders; csc always resamples the whole array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from csc.storage import LabelArray

__all__ = ["DEFAULT_MAX_VOLUME_SIZE_RATIO", "match_crop_space", "max_volume_size_ratio"]

DEFAULT_MAX_VOLUME_SIZE_RATIO = 16.0**3  # source voxels per target voxel, at most
SEMANTIC_THRESHOLD = 0.5  # a resampled semantic label is foreground above this


def max_volume_size_ratio() -> float:
    """The largest source/target voxel count ratio accepted ($MAX_VOLUME_SIZE_RATIO)."""
    value = os.environ.get("MAX_VOLUME_SIZE_RATIO")
    if value is None:
        return DEFAULT_MAX_VOLUME_SIZE_RATIO
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"MAX_VOLUME_SIZE_RATIO must be a number, got {value!r}") from None


def match_crop_space(
    label: LabelArray,
    *,
    voxel_size: Sequence[float],
    shape: Sequence[int],
    translation: Sequence[float],
    instance: bool,
) -> np.ndarray:
    """`label` in the crop's space (`voxel_size`, `translation` in nm; `shape` in voxels);
    the array itself, in its dtype, when it is already there."""
    target_shape = tuple(int(n) for n in shape)
    _check_size_ratio(label, target_shape)
    image = label.data
    if label.voxel_size is not None:
        if not np.allclose(label.voxel_size, voxel_size):
            scale = np.asarray(label.voxel_size, float) / np.asarray(voxel_size, float)
            image = _rescale(image, scale, instance=instance)
    elif image.shape != target_shape:
        image = _centre_pad_crop(image, target_shape)
    offset: tuple[int, ...] = (0, 0, 0)
    if label.translation is not None:
        offset = _voxel_offset(label.translation, voxel_size, translation)
    if any(offset) or image.shape != target_shape:
        return _place(image, target_shape, offset)
    return image


def _check_size_ratio(label: LabelArray, shape: tuple[int, ...]) -> None:
    ratio = label.data.size / max(1, int(np.prod(shape)))
    limit = max_volume_size_ratio()
    if ratio > limit:
        raise ValueError(
            f"{label.path} has {label.data.size} voxels, {ratio:.0f}x the crop's {shape}: "
            f"more than the challenge's limit of {limit:.0f}x (MAX_VOLUME_SIZE_RATIO); write "
            "the label at the crop's voxel size, or covering only the crop"
        )


def _rescale(image: np.ndarray, scale: np.ndarray, *, instance: bool) -> np.ndarray:
    """skimage's rescale with the toolkit's arguments (its defaults otherwise: clip, and
    Gaussian anti-aliasing when downsampling, skipped for bool and order-0 integer input)."""
    from skimage.transform import rescale

    if instance:
        resampled = rescale(image, scale, order=0, mode="constant", preserve_range=True)
        return np.asarray(resampled).astype(image.dtype)
    if image.dtype == bool:
        image = image.astype(np.float32)
    resampled = rescale(image, scale, order=1, mode="constant", preserve_range=True)
    return np.asarray(resampled > SEMANTIC_THRESHOLD)


def _centre_pad_crop(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pad or crop each axis around its centre: pad (T - S)//2 before, crop from (S - T)//2."""
    for axis, (size, wanted) in enumerate(zip(image.shape, shape, strict=True)):
        if size < wanted:
            before = (wanted - size) // 2
            widths = [(0, 0)] * image.ndim
            widths[axis] = (before, wanted - size - before)
            image = np.pad(image, widths, mode="constant", constant_values=0)
        elif size > wanted:
            start = (size - wanted) // 2
            image = np.take(image, range(start, start + wanted), axis=axis)
    return image


def _voxel_offset(
    source: Sequence[float], voxel_size: Sequence[float], translation: Sequence[float]
) -> tuple[int, ...]:
    """Where the source's first voxel lands, in target voxels: the source translation
    floor-snapped to the target grid, its distance to the crop's truncated towards zero."""
    vs = np.asarray(voxel_size, float)
    snapped = np.floor(np.asarray(source, float) / vs) * vs
    difference = snapped - np.asarray(translation, float)
    offset = np.floor(np.abs(difference) / vs) * np.sign(difference)
    return tuple(int(v) for v in offset)


def _place(image: np.ndarray, shape: tuple[int, ...], offset: Sequence[int]) -> np.ndarray:
    """A zero array of `shape` with `image` put at `offset` (voxels; negative: its first
    voxels cut), corner-aligned."""
    out = np.zeros(shape, dtype=image.dtype)
    target, source = [], []
    for size, wanted, shift in zip(image.shape, shape, offset, strict=True):
        start, skip = max(shift, 0), max(-shift, 0)
        length = min(wanted - start, size - skip)
        if length <= 0:
            return out  # no overlap on this axis: nothing of the label is in the crop
        target.append(slice(start, start + length))
        source.append(slice(skip, skip + length))
    out[tuple(target)] = image[tuple(source)]
    return out
