"""Spatial transforms on the training device (`spatial_transforms_on_device`).

On one CPU core, resampling a rotated patch costs more than reading it (docs/performance.md:
3D 64^3 with rotation reaches about 0.2 of a plain read, 2D 256^2 batch 16 about 0.15). With
this option the loader ships each sample's axis-aligned boxes instead (`TrainPatches.read_boxes`:
raw as stored, labels as uint8 codes, the maps from output voxels into the boxes), and the
training process resamples them on its device with torch: raw (tri)linear (`grid_sample`, zeros
beyond the level), labels nearest (ties up) by gathering codes, then the raw value transforms
with each sample's own generator. The patches equal the CPU path's within float tolerance
(tests/test_data.py compares the two on the CPU, through this same code).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

from csc.config import TrainConfig
from csc.data.datasets import LABEL_CODES, Crop, TrainPatches, raw_dtype_problem
from csc.data.sampling import affine_grid
from csc.data.transforms import Normalize, sample_generator


def use_device_transforms(config: TrainConfig, device_type: str, crops: Sequence[Crop]) -> bool:
    """Whether the training loader leaves spatial transforms to the device: the config's
    `spatial_transforms_on_device`, or for None, on when training on CUDA with rotations
    (mirrors and transposes are views on the CPU: shipping boxes would not pay)."""
    problem = device_problem(config, crops)
    setting = config.spatial_transforms_on_device
    if setting is None:
        return device_type == "cuda" and rotates(config.spatial_transforms) and problem is None
    if setting and problem is not None:
        raise ValueError(f"spatial_transforms_on_device = True: {problem}; set it to None or False")
    return bool(setting)


def device_problem(config: TrainConfig, crops: Sequence[Crop]) -> str | None:
    """Why spatial transforms cannot run on the device for this config (None: they can)."""
    if config.target_value_transforms is not None:
        return "target_value_transforms act on stored label values, which stay on the CPU"
    return raw_dtype_problem(crops) if crops else None


def rotates(transforms: Mapping[str, Any] | None) -> bool:
    """Whether spatial transforms rotate by a nonzero angle about some axis."""
    axes = (transforms or {}).get("rotate", {}).get("axes", {})
    return any(low != 0 or high != 0 for low, high in axes.values())


class DeviceLoader(torch.utils.data.DataLoader[Any]):
    """The training DataLoader whose batches (boxes, `TrainPatches.read_boxes`) come out
    resampled on the training device: ``input`` and ``output`` as the CPU path gives them."""

    def __init__(self, *args: Any, device_type: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.device_type = device_type

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:  # type: ignore[override]
        device = torch.device(self.device_type)
        if self.device_type == "cuda":  # this process's GPU (csc.distributed sets it)
            device = torch.device("cuda", torch.cuda.current_device())
        dataset = self.dataset
        assert isinstance(dataset, TrainPatches), "DeviceLoader samples TrainPatches"
        for boxes in super().__iter__():
            yield resample_on_device(boxes, dataset, device)


def resample_on_device(
    batch: Mapping[str, torch.Tensor], dataset: TrainPatches, device: torch.device
) -> dict[str, torch.Tensor]:
    """``input`` (N, 1, *shape) and ``output`` (N, C, *shape) on `device` from a batch of
    boxes; 2D patches without their singleton axis, as the CPU path gives them."""
    spec = dataset.spec
    boxes = batch["input_box"].to(device, non_blocking=True)
    raw = sample_linear(boxes, batch["input_map"], spec.input.shape)
    inputs = raw_values(raw, batch["seed"].tolist(), dataset.raw_dtype, dataset.raw_transform)
    codes = batch["output_box"].to(device, non_blocking=True)
    targets = sample_codes(codes, batch["output_map"], spec.target.shape)
    if dataset.exclusions is not None:
        annotated = batch["annotated"].to(device, non_blocking=True)
        infer_absent(targets, annotated, dataset.exclusions)
    return {"input": dataset._squeeze(inputs), "output": dataset._squeeze(targets)}


def sample_linear(boxes: torch.Tensor, maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(N, 1, *shape) float32: boxes (N, 1, Z', Y', X') sampled trilinearly at the positions
    of maps (N, 3, 4), zero outside the boxes (the boxes hold zeros beyond the level)."""
    sizes = boxes.shape[2:]
    # grid_sample (align_corners=True) maps -1..1 onto box voxels 0..size-1, x first.
    scale = torch.tensor([2 / (n - 1) if n > 1 else 0.0 for n in sizes], dtype=torch.float64)
    normal = maps.to(torch.float64) * scale[None, :, None]
    normal[:, :, 3] -= torch.tensor([1.0 if n > 1 else 0.0 for n in sizes], dtype=torch.float64)
    grid = affine_grid(normal.flip(1).to(torch.float32).to(boxes.device), shape)
    return F.grid_sample(
        boxes.to(torch.float32), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )


def sample_codes(codes: torch.Tensor, maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(N, C, *shape) float32 targets: label codes (N, C, Z'', Y'', X'') at the nearest voxel
    (ties up: floor(x + 0.5), as the CPU path) of maps (N, C, 3, 4); 1, 0, NaN."""
    num, classes, sizes = codes.shape[0], codes.shape[1], codes.shape[2:]
    shifted = maps.to(torch.float64).reshape(num * classes, 3, 4).clone()
    shifted[:, :, 3] += 0.5  # nearest, ties up, added before the float32 grid (as the CPU)
    positions = affine_grid(shifted.to(torch.float32).to(codes.device), shape)  # (N C, ..., 3)
    flat = torch.zeros(positions.shape[:-1], dtype=torch.int64, device=codes.device)
    for p, n in enumerate(sizes):  # box voxel (z, y, x), clipped: only rounding at the box's
        # edge reaches past it; one axis at a time (no (N C, ..., 3) int64 index)
        flat = flat * n + positions[..., p].floor().clamp(0, n - 1).to(torch.int64)
    values = torch.gather(codes.reshape(num * classes, -1), 1, flat.reshape(num * classes, -1))
    table = torch.full((max(LABEL_CODES.values()) + 1,), math.nan, device=codes.device)
    table[LABEL_CODES["absent"]], table[LABEL_CODES["present"]] = 0.0, 1.0
    return table[values.to(torch.int64)].reshape(num, classes, *shape)


def raw_values(
    raw: torch.Tensor, seeds: Sequence[int], dtype: np.dtype, transform: Any | None
) -> torch.Tensor:
    """Sampled raw (N, 1, ...) to the model's input, as `PatchDataset._input` does: stored
    integers scaled to [0, 1], or the value transform on values rounded back to the stored
    type, each sample with its own generator."""
    integer = np.issubdtype(dtype, np.integer)
    if transform is None:
        return raw / float(np.iinfo(dtype).max) if integer else raw
    values = raw
    if integer:
        info = np.iinfo(dtype)
        torch_dtype = torch.from_numpy(np.zeros(0, dtype=dtype)).dtype
        values = raw.round().clamp(info.min, info.max).to(torch_dtype)
    out = torch.empty_like(raw)
    for n, seed in enumerate(seeds):
        with sample_generator(seed):
            out[n] = (transform or Normalize())(values[n]).to(torch.float32)
    return out


def infer_absent(
    targets: torch.Tensor, annotated: torch.Tensor, exclusions: Sequence[Sequence[int]]
) -> None:
    """`use_mutual_exclusion` on the device: 0 for a class a sample's crop does not annotate
    where an annotated class that excludes it is present (target > 0), in place."""
    ones = [1] * (targets.ndim - 2)
    for k, others in enumerate(exclusions):
        for j in others:
            rows = (~annotated[:, k]) & annotated[:, j]  # (N,)
            hit = rows.view(-1, *ones) & (targets[:, j] > 0)
            targets[:, k] = torch.where(hit, torch.zeros_like(targets[:, k]), targets[:, k])
