"""The challenge toolkit's checkpoint functions (`get_model`, `get_latest_checkpoint_epoch`,
`get_best_val_epoch`), thin over csc's own; `load_latest` and `load_best_val` take the
toolkit's arguments as they are (`csc.checkpoints.reading`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from csc.checkpoints.best import monitor_tag
from csc.checkpoints.reading import (
    best_epoch,
    epoch_files,
    load_best_val,
    load_latest,
    load_weights,
    read_epoch,
)
from csc.config import TrainConfig, monitor_mode


def get_model(config: Any) -> int:
    """Load the checkpoint ``config.load_model`` names ("latest", "best"; None: nothing) of
    ``config.model_to_load`` (default: ``model_name``) into ``config.model``, in place; the
    epoch loaded, 0 when there was none. "best" follows a csc `TrainConfig`'s ``monitor``,
    else the validation loss by ``low_is_best``.

    `config` is anything with the toolkit's config attributes: a csc `TrainConfig`, a loaded
    config file, or the toolkit's own. Paths default as in the toolkit, under
    ``base_experiment_path`` (default: the working directory).
    """
    model = getattr(config, "model", None)
    if model is None:
        raise ValueError("get_model needs config.model, the model to load the weights into")
    which = getattr(config, "load_model", "latest")
    name = getattr(config, "model_name", "model")
    to_load = getattr(config, "model_to_load", None) or name
    base = Path(getattr(config, "base_experiment_path", None) or ".")
    default_model = str(base / "checkpoints" / "{model_name}_{epoch}.pth")
    default_logs = str(base / "tensorboard" / "{model_name}")
    model_save_path = getattr(config, "model_save_path", None) or default_model
    logs_save_path = getattr(config, "logs_save_path", None) or default_logs
    checkpoints = str(model_save_path).replace("{model_name}", to_load)
    if which is None:
        return 0
    if str(which).lower() == "latest":
        return load_latest(checkpoints, model) or 0
    if str(which).lower() == "best":
        logs = str(logs_save_path).replace("{model_name}", to_load)
        window = getattr(config, "smoothing_window", 1)
        if not isinstance(config, TrainConfig):  # the toolkit's config: its validation loss
            low_is_best = getattr(config, "low_is_best", True)
            return load_best_val(logs, checkpoints, model, low_is_best, window) or 0
        low, tag = monitor_mode(config) == "min", monitor_tag(config.monitor)  # csc's: monitor
        epoch = best_epoch(logs, low_is_best=low, smoothing_window=window, tag=tag)
        if epoch is None:
            return 0
        load_weights(model, read_epoch(checkpoints, epoch).model_state)
        return epoch
    raise ValueError(f"load_model must be 'latest', 'best' or None, got {which!r}")


def get_latest_checkpoint_epoch(model_save_path: str) -> int | None:
    """The highest epoch with a model file, without reading it; None when there is none.

    `model_save_path` has ``{model_name}`` filled and ``{epoch}`` left in, or is the toolkit's
    wildcard form (``checkpoints/2d_unet_*.pth``). csc's ``best`` and training-state files
    never count as epochs."""
    return max(epoch_files(model_save_path), default=None)


def get_best_val_epoch(
    logs_save_path: str, low_is_best: bool = True, smoothing_window: int = 1
) -> int | None:
    """The epoch with the best smoothed ``validation`` score in the TensorBoard logs at
    `logs_save_path` (`best_epoch`); None without scores. It is the epoch number the
    checkpoint carries (the toolkit gives its 0-based index in the logs)."""
    return best_epoch(logs_save_path, low_is_best=low_is_best, smoothing_window=smoothing_window)
