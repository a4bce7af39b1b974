"""csc: train segmentation models on CellMap-style volume EM data.

The functions a user calls are here: ``csc.train(config_path)``, ``csc.predict``, ``csc.process``,
``csc.evaluate``, ``csc.load_config``, ``csc.TrainConfig`` and ``csc.build_model``. They are
imported on first use, so ``import csc`` (and ``csc --help``) stays free of numpy, zarr and torch.
``csc.predict`` and ``csc.process`` are the challenge toolkit's functions (its keywords and crop
spellings, from `csc.utils`), which also take csc's keywords and call csc.prediction.predict and
csc.processing.process (docs/utils.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that owns it
PUBLIC_API = {
    "train": "csc.training",
    "predict": "csc.utils",  # the toolkit's keywords over csc.prediction.predict
    "process": "csc.utils",  # the toolkit's keywords over csc.processing.process
    "evaluate": "csc.evaluation",
    "load_config": "csc.config",
    "TrainConfig": "csc.config",
    "build_model": "csc.models",
}

__all__ = [
    "TrainConfig",
    "__version__",
    "build_model",
    "evaluate",
    "load_config",
    "predict",
    "process",
    "train",
]

if TYPE_CHECKING:
    from csc.config import TrainConfig, load_config
    from csc.evaluation import evaluate
    from csc.models import build_model
    from csc.training import train
    from csc.utils import predict, process


def __getattr__(name: str) -> Any:
    if name not in PUBLIC_API:
        raise AttributeError(f"module 'csc' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC_API))
