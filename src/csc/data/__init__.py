"""Patch sampling from local and S3 zarr crops, built on tensorstore (see docs/data.md).

Modules, in the order data flows: `sources` (tensorstore reads and crop regions held in
memory; opening arrays and their metadata belong to `csc.storage`), `geometry`
(world coordinates to voxels: planning reads), `sampling` (carrying the plans out),
`transforms` (augmentations), `datasets` (samples, tiles, sampler) and `loaders` (from a config
to DataLoaders).
"""

from csc.data.datasets import (
    Crop,
    EpochSampler,
    PatchDataset,
    PatchSpec,
    TrainPatches,
    ValidationTiles,
    crop_probabilities,
)
from csc.data.geometry import Grid
from csc.data.loaders import Loaders, build_datasets, build_loaders, load_crops, read_crops
from csc.data.sources import DataWarning
from csc.data.transforms import (
    Compose,
    GaussianBlur,
    GaussianNoise,
    Normalize,
    RandomContrast,
    RandomGamma,
)

__all__ = [
    "Compose",
    "Crop",
    "DataWarning",
    "EpochSampler",
    "GaussianBlur",
    "GaussianNoise",
    "Grid",
    "Loaders",
    "Normalize",
    "PatchDataset",
    "PatchSpec",
    "RandomContrast",
    "RandomGamma",
    "TrainPatches",
    "ValidationTiles",
    "build_datasets",
    "build_loaders",
    "crop_probabilities",
    "load_crops",
    "read_crops",
]
