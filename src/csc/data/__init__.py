"""Patch sampling from local and S3 zarr crops, built on tensorstore (see docs/data.md).

Modules, in the order data flows: `sources` (tensorstore reads and crop regions held in
memory; opening arrays and their metadata belong to `csc.storage`), `geometry`
(world coordinates to voxels: planning reads), `sampling` (carrying the plans out),
`transforms` (augmentations), `datasets` (samples, tiles, sampler), `device` (spatial transforms
on the training device) and `loaders` (from a config to DataLoaders).

Here are the names a config or a script uses: the value transforms a config sets,
`build_loaders` (a config's DataLoaders) and `DataWarning`. csc's own modules import the rest
from the submodules.
"""

from csc.data.loaders import Loaders, build_loaders
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
    "DataWarning",
    "GaussianBlur",
    "GaussianNoise",
    "Loaders",
    "Normalize",
    "RandomContrast",
    "RandomGamma",
    "build_loaders",
]
