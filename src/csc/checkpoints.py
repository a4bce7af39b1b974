"""Save checkpoints atomically, prune old ones, and read them back to resume a run.

Each epoch writes two files from ``model_save_path``: the training state
(``2d_unet_3.state.pth``: optimizer, scheduler, scaler, EMA, epoch, step, RNG states, best
score, config) and then the model's plain ``state_dict`` (``2d_unet_3.pth``), which marks the
epoch as complete. Each file is written under a temporary name in the same folder and renamed,
so a crash never leaves a half-written file under a checkpoint's name. Everything stored is
plain data (`to_safe`), so ``torch.load(path, weights_only=True)`` reads every file.
"""

from __future__ import annotations

import dataclasses
import os
import random
import uuid
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from csc.config import TrainConfig
from csc.models.loading import (
    Checkpoint,
    find_checkpoints,
    format_checkpoint_path,
    read_epoch,
    read_latest,
    state_path,
    unwrap,
)
from csc.models.loading import best_epoch as best_validation_epoch

__all__ = [
    "Resumed",
    "load_for_resume",
    "prune_checkpoints",
    "rng_state",
    "save_best",
    "save_checkpoint",
    "set_rng_state",
    "to_safe",
    "unwrap",
]

# What `load_for_resume` returns: epoch, path (the model file), model_state and train_state
# (None when the checkpoint has no training state file, e.g. one from the existing toolkit).
Resumed = Checkpoint


def rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from, as `weights_only`-safe data."""
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": to_safe(np.random.get_state(legacy=False)),
        "random": [version, list(internal), gauss_next],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by `rng_state` (CUDA ones only when CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        # One state per GPU; a machine with fewer GPUs restores the ones it has.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = dict(numpy_state["state"])
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))


def to_safe(value: Any) -> Any:
    """Plain data that ``torch.load(weights_only=True)`` reads: tensors, numbers, strings,
    bools, None, lists, tuples and dicts. Dataclasses become dicts, numpy values lists or
    numbers, paths strings, and any other object its ``repr()``.
    """
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    for kind in (bool, int, float, str):  # also turns subclasses (enums) into the plain type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_safe_key(k): to_safe(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(to_safe(v) for v in value)
    if isinstance(value, list | tuple):  # named tuples too: weights_only reads no classes
        return [to_safe(v) for v in value]
    return repr(value)


def _safe_key(key: Any) -> Any:
    safe = to_safe(key)
    return safe if safe is None or isinstance(safe, bool | int | float | str) else repr(key)


def save_checkpoint(
    model_state: Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any] | None,
    *,
    template: str,
    model_name: str,
    epoch: int,
) -> Path:
    """Write one epoch's training state, then its model file; return the model file's path.

    `model_state` is the unwrapped model's ``state_dict()``; `train_state` is passed through
    `to_safe` (None: weights only).
    """
    path = format_checkpoint_path(template, model_name=model_name, epoch=epoch)
    _write_pair(model_state, train_state, path)
    return path


def save_best(
    model_state: Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any] | None,
    *,
    template: str,
    model_name: str,
) -> Path:
    """Write the ``best`` copy (``2d_unet_best.pth`` and its ``.state.pth``); return its path."""
    path = format_checkpoint_path(template, model_name=model_name, epoch="best")
    _write_pair(model_state, train_state, path)
    return path


def _write_pair(
    model_state: Mapping[str, torch.Tensor], train_state: Mapping[str, Any] | None, path: Path
) -> None:
    if train_state is not None:
        atomic_save(to_safe(train_state), state_path(path))
    # A plain dict of tensors; an OrderedDict from state_dict() also loads with weights_only.
    atomic_save(model_state if isinstance(model_state, dict) else dict(model_state), path)


def atomic_save(value: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it to `path`.

    The temporary name starts with a dot and ends in ``.tmp``, so it never matches a
    checkpoint template; it is removed when writing fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "xb") as file:
            torch.save(value, file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def prune_checkpoints(
    template: str, model_name: str, *, keep_last: int, best_epoch: int | None
) -> list[Path]:
    """Delete all but the last `keep_last` epochs (both files), never `best_epoch`.

    Returns the deleted files. Model files go first, so an interrupted prune leaves no model
    file without its state.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last_checkpoints must be an integer >= 1, got {keep_last}")
    checkpoints = find_checkpoints(template, model_name)
    keep = set(list(checkpoints)[-keep_last:]) | {best_epoch}
    removed = []
    for epoch, path in checkpoints.items():
        if epoch in keep:
            continue
        for file in (path, state_path(path)):
            if file.exists():
                file.unlink()
                removed.append(file)
    return removed


def load_for_resume(config: TrainConfig) -> Resumed | None:
    """The checkpoint `config.load_model` asks for, with its training state when saved.

    ``"latest"``: the highest epoch of `config.model_to_load` that reads (damaged files fall
    back to the previous epoch with a warning). ``"best"``: the epoch with the best smoothed
    validation score in its TensorBoard logs (`csc.models.loading.best_epoch`); a missing file
    for that epoch is a `FileNotFoundError`. None when there is nothing to load.
    """
    if config.load_model is None:
        return None
    search_path = config.model_save_path.replace("{model_name}", config.model_to_load)
    if config.load_model == "latest":
        return read_latest(search_path, with_state=True)
    log_dir = config.logs_save_path.replace("{model_name}", config.model_to_load)
    epoch = best_validation_epoch(
        log_dir, low_is_best=config.low_is_best, smoothing_window=config.smoothing_window
    )
    if epoch is None:
        return None
    return read_epoch(search_path, epoch, with_state=True)
