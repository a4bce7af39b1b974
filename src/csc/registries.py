"""Every name a config may give for a model, optimizer, scheduler, loss, spatial transform or
post-processing method, mapped to where its implementation lives (``"module:attribute"``).

This is the one home of those names. It imports nothing of csc or torch: `csc.config` checks a
file's names against these dicts when it loads it (so ``csc config`` stays torch-free), and the
builders (`csc.models.build_model`, `csc.losses.build_loss`, csc's optimizer and scheduler
builders, `csc.data.transforms.spatial_matrix`, `csc.processing.process`) import an entry only
when they use it (`resolve`). tests/test_registries.py resolves every entry.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A model class and the constructor arguments the registry fixes (dimension, 1 input
    channel). The class takes the number of classes as ``out_channels``; its other keyword
    arguments are the options a config may set in ``model_kwargs``."""

    reference: str  # "module:Class"
    fixed: Mapping[str, Any]


MODELS: dict[str, ModelEntry] = {
    "2d_unet": ModelEntry("csc.models.unet:UNet", {"ndim": 2, "in_channels": 1}),
    "3d_unet": ModelEntry("csc.models.unet:UNet", {"ndim": 3, "in_channels": 1}),
    "2d_resnet": ModelEntry("csc.models.resnet:ResidualNet", {"ndim": 2, "in_channels": 1}),
    "3d_resnet": ModelEntry("csc.models.resnet:ResidualNet", {"ndim": 3, "in_channels": 1}),
    # 2D or 3D as len(img_size); training passes the patch shape as img_size.
    "vitnet": ModelEntry("csc.models.vit:ViTNet", {"in_channels": 1}),
}
OPTIMIZERS: dict[str, str] = {
    "adam": "torch.optim:Adam",
    "adamw": "torch.optim:AdamW",
    "radam": "torch.optim:RAdam",
    "sgd": "torch.optim:SGD",
}
SCHEDULERS: dict[str, str] = {
    "cosine": "torch.optim.lr_scheduler:CosineAnnealingLR",
    "onecycle": "torch.optim.lr_scheduler:OneCycleLR",
    "plateau": "torch.optim.lr_scheduler:ReduceLROnPlateau",
    "step": "torch.optim.lr_scheduler:StepLR",
}
LOSSES: dict[str, str] = {
    "bce": "csc.losses:BCELoss",
    "dice": "csc.losses:DiceLoss",
    "dice_bce": "csc.losses:DiceBCELoss",
    "focal": "csc.losses:FocalLoss",
}
# The keys of `spatial_transforms`; each function turns the 3x3 (z, y, x) matrix rows of a
# sample by its random draw (see csc.data.transforms).
SPATIAL_TRANSFORMS: dict[str, str] = {
    "mirror": "csc.data.transforms:mirror",
    "transpose": "csc.data.transforms:transpose",
    "rotate": "csc.data.transforms:rotate",
}

# The names `process_func` may give instead of a callable: csc process's own methods, each a
# function of one class's `csc.labelling.ClassJob` (docs/prediction.md).
PROCESS_FUNCS: dict[str, str] = {
    "threshold": "csc.labelling:threshold",  # every class: p > threshold, 0/1
    "instances": "csc.labelling:instances",  # instance classes: connected components
    "watershed": "csc.labelling:watershed",  # instance classes: components split by watershed
}

# The validation metrics `csc.metrics.SegmentationMetrics.compute` returns per class and as
# their mean: the names `monitor` may give (tests/test_monitor.py holds the two equal).
METRIC_NAMES: tuple[str, ...] = (
    "iou",
    "dice",
    "precision",
    "recall",
    "accuracy",
    "boundary_f1",
    "fwiou",  # frequency-weighted IoU of the class's foreground and background
    "pixel_accuracy",  # per class = accuracy; its mean pools every class's voxels
)


def resolve(reference: str) -> Any:
    """The object a ``"package.module:attribute"`` reference names, importing its module."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)
