"""Segmentation architectures for 2D and 3D, the model registry, and the input shape check.

Every model returns raw logits with the input's spatial shape. `UNet` and `ResidualNet` take
csc's argument names (``ndim``, ``in_channels``, ``out_channels``); `UNet_2D`, `UNet_3D`, `ResNet`
and `ViTVNet` keep the CellMap challenge toolkit's constructor names and arguments.
`ViTNet` is csc's ViT-V-Net, `ViTVNet` its toolkit name. The toolkit's checkpoint functions
(`load_latest`, `load_best_val`, `get_model`, `get_latest_checkpoint_epoch`,
`get_best_val_epoch`) load checkpoints into a model (see docs/training.md).
"""

import importlib
from typing import Any

from csc.models.layers import enable_activation_checkpointing
from csc.models.registry import MODELS, build_model, check_input_shape
from csc.models.resnet import ResidualNet, ResNet
from csc.models.unet import UNet, UNet_2D, UNet_3D
from csc.models.vit import ViTNet, ViTVNet

# The challenge toolkit's names for loading checkpoints, kept here at the compatibility
# boundary. They live in csc.checkpoints, which imports csc.models to rebuild a model, so they
# are resolved on first use (a module __getattr__), never imported here: no import circle.
CHECKPOINT_NAMES = (
    "get_best_val_epoch",
    "get_latest_checkpoint_epoch",
    "get_model",
    "load_best_val",
    "load_latest",
)

__all__ = [
    "MODELS",
    "ResNet",
    "ResidualNet",
    "UNet",
    "UNet_2D",
    "UNet_3D",
    "ViTNet",
    "ViTVNet",
    "build_model",
    "check_input_shape",
    "enable_activation_checkpointing",
    "get_best_val_epoch",
    "get_latest_checkpoint_epoch",
    "get_model",
    "load_best_val",
    "load_latest",
]


def __getattr__(name: str) -> Any:
    """The toolkit's checkpoint functions from csc.checkpoints (see CHECKPOINT_NAMES)."""
    if name in CHECKPOINT_NAMES:
        return getattr(importlib.import_module("csc.checkpoints"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
