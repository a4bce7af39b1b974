"""Save checkpoints atomically and prune old ones.

Each epoch writes two files from ``model_save_path``: the training state
(``csc-extras/2d_unet_3.state.pth``: optimizer, scheduler, scaler, EMA, epoch, step, RNG
states, best score, config) and then the model's plain ``state_dict`` (``2d_unet_3.pth``),
which marks the epoch as complete. Each file is written under a temporary name in the same
folder and renamed, so a crash never leaves a half-written file under a checkpoint's name.
Everything stored is plain data (`to_safe`), so ``torch.load(path, weights_only=True)`` reads
every file. Training states are kept for the last two epochs and the best one
(`drop_old_states`); ``csc-extras/2d_unet_best.pth`` is a hard link to the best epoch's model
file (`link_best`). Only the model files match the toolkit's ``{model_name}_*.pth``.
``keep_last_checkpoints`` and ``save_top_k`` prune old epochs (`prune_by_score`).
"""

from __future__ import annotations

import collections
import dataclasses
import filecmp
import os
import random
import shutil
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from csc.checkpoints.best import ranked_epochs
from csc.checkpoints.reading import (
    MODEL_ARGUMENTS,
    best_path,
    find_checkpoints,
    format_checkpoint_path,
    legacy_best_path,
    state_files,
    state_path,
)
from csc.runtime import ModelArguments
from csc.storage import StorageError

TEMPORARY = ".{name}.{hex}.tmp"  # what `atomic_save` writes first, beside the file `name`


class RunWriteError(StorageError, OSError):
    """A checkpoint or log file cannot be written; the message names the path (one line)."""


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
    model_arguments: ModelArguments | None = None,
) -> Path:
    """Write one epoch's training state, then its model file; return the model file's path.

    `model_state` is the unwrapped model's ``state_dict()``; `train_state` is passed through
    `to_safe` (None: weights only); `model_arguments` (a registry model's) are stored in the
    model file, so that `load_model` rebuilds the model from it alone.
    """
    path = format_checkpoint_path(template, model_name=model_name, epoch=epoch)
    _write_pair(model_state, train_state, path, model_arguments)
    return path


def save_best(
    model_state: Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any] | None,
    *,
    template: str,
    model_name: str,
) -> Path:
    """Write the ``best`` copy (``csc-extras/2d_unet_best.pth`` and its ``.state.pth``);
    return its path."""
    path = best_path(template, model_name)
    _write_pair(model_state, train_state, path)
    return path


def _write_pair(
    model_state: Mapping[str, torch.Tensor],
    train_state: Mapping[str, Any] | None,
    path: Path,
    model_arguments: ModelArguments | None = None,
) -> None:
    if train_state is not None:
        atomic_save(to_safe(train_state), state_path(path))
    # A plain dict of tensors; an OrderedDict from state_dict() also loads with weights_only.
    weights = model_state if isinstance(model_state, dict) else dict(model_state)
    atomic_save(with_arguments(weights, model_arguments), path)


def with_arguments(
    weights: dict[str, torch.Tensor], model_arguments: ModelArguments | None
) -> dict[str, torch.Tensor]:
    """`weights`, or a shallow copy whose ``_metadata`` (saved and loaded with a state dict,
    even with weights_only) also holds `model_arguments` under `MODEL_ARGUMENTS`. Arguments
    that would not read back as themselves (objects, stored as their repr) are left out."""
    if model_arguments is None or not _reads_back(list(vars(model_arguments).values())):
        return weights
    copy = collections.OrderedDict(weights)
    metadata = collections.OrderedDict(getattr(weights, "_metadata", {}))
    metadata[MODEL_ARGUMENTS] = to_safe(model_arguments)  # a dict of the fields
    setattr(copy, "_metadata", metadata)  # noqa: B010 (OrderedDict's stubs lack _metadata)
    return copy


def _reads_back(value: Any) -> bool:
    """Whether `value` is plain data that ``torch.load(weights_only=True)`` returns unchanged."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if type(value) in (list, tuple):
        return all(_reads_back(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _reads_back(v) for k, v in value.items())
    return False


def atomic_save(value: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it to `path`.

    The temporary name starts with a dot and ends in ``.tmp``, so it never matches a
    checkpoint template; it is removed when writing fails. A failed write (disk full, file
    too large, read-only) is a `RunWriteError` naming `path`; `path` itself is untouched.
    """
    temporary = _temporary(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as file:
            torch.save(value, file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        _raise_write_error(error, path)
        raise


def _temporary(path: Path) -> Path:
    return path.with_name(TEMPORARY.format(name=path.name, hex=uuid.uuid4().hex[:8]))


def _raise_write_error(error: BaseException, path: Path) -> None:
    """Raise `RunWriteError` for `path` when `error` comes from the file system."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        # torch.save reports a failed write as a RuntimeError; the OSError is its context.
        cause = cause.__cause__ or cause.__context__
    if cause is None or isinstance(cause, RunWriteError):
        return
    reason = cause.strerror or str(cause)
    raise RunWriteError(
        f"cannot write {path}: {reason} (the partial file was removed; earlier checkpoints "
        "are kept): free disk space or make the folder writable, then run again to resume, "
        "or set model_save_path to another folder"
    ) from cause


def link_best(*, template: str, model_name: str, epoch: int) -> Path:
    """Make ``best`` (``csc-extras/2d_unet_best.pth``) the model file of `epoch`: a hard link
    (no extra bytes), else a copy; replaced atomically. Return its path."""
    source = format_checkpoint_path(template, model_name=model_name, epoch=epoch)
    best = best_path(template, model_name)
    temporary = _temporary(best)
    try:
        best.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, temporary)
        except OSError:  # a file system without hard links: copy the bytes
            with open(source, "rb") as reader, open(temporary, "xb") as writer:
                shutil.copyfileobj(reader, writer)
                writer.flush()
                os.fsync(writer.fileno())
        os.replace(temporary, best)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        _raise_write_error(error, best)
        raise
    # Earlier csc versions copied the training state too, and kept `best` beside the model
    # files, where the toolkit's loaders read "best" as an epoch: both would disagree now.
    legacy = legacy_best_path(template, model_name)
    for stale in (*state_files(best), legacy, *state_files(legacy)):
        stale.unlink(missing_ok=True)
    return best


def repair_best(template: str, model_name: str, best_epoch: int | None) -> Path | None:
    """Point ``best`` at `best_epoch`'s model file when it does not (a kill between the epoch's
    checkpoint and its best link); the repaired path, or None when it already agreed."""
    if best_epoch is None:
        return None
    source = format_checkpoint_path(template, model_name=model_name, epoch=best_epoch)
    best = best_path(template, model_name)
    if not source.is_file():
        return None  # nothing to agree with (deleted by hand); `best` is left as it is
    if best.is_file() and (
        os.path.samefile(best, source) or filecmp.cmp(best, source, shallow=False)
    ):
        return None
    return link_best(template=template, model_name=model_name, epoch=best_epoch)


def drop_old_states(
    template: str, model_name: str, *, best_epoch: int | None, keep: int = 2
) -> list[Path]:
    """Delete the training states of all but the last `keep` epochs and `best_epoch`.

    Resume needs the latest state, and the one before it when the latest file is damaged;
    ``load_model = "best"`` needs the best epoch's. Older epochs keep their model files
    (weights only). Returns the deleted files.
    """
    checkpoints = find_checkpoints(template, model_name)
    needed = set(list(checkpoints)[-keep:]) | {best_epoch}
    removed = []
    for epoch, path in checkpoints.items():
        for state in state_files(path) if epoch not in needed else ():
            if state.is_file():
                state.unlink()
                removed.append(state)
    return removed


def prune_checkpoints(
    template: str,
    model_name: str,
    *,
    keep_last: int,
    best_epoch: int | None,
    keep: Collection[int] = (),
) -> list[Path]:
    """Delete all but the last `keep_last` epochs (both files), never `best_epoch` nor the
    epochs in `keep` (`save_top_k`'s).

    Returns the deleted files. Model files go first, so an interrupted prune leaves no model
    file without its state.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last_checkpoints must be an integer >= 1, got {keep_last}")
    checkpoints = find_checkpoints(template, model_name)
    kept = set(list(checkpoints)[-keep_last:]) | {best_epoch} | set(keep)
    removed = []
    for epoch, path in checkpoints.items():
        if epoch in kept:
            continue
        for file in (path, *state_files(path)):
            if file.exists():
                file.unlink()
                removed.append(file)
    return removed


def prune_by_score(
    template: str,
    model_name: str,
    *,
    keep_last: int | None,
    top_k: int | None,
    scores: Mapping[int, float | None],
    mode: str,
    best_epoch: int | None,
) -> list[Path]:
    """`keep_last_checkpoints` and `save_top_k` together: keep the union of the last
    `keep_last` epochs, the `top_k` epochs with the best monitored `scores` (`ranked_epochs`
    over the epochs on disk) and `best_epoch`; with `top_k` alone, the newest epoch too (what
    a resume continues from). Neither set: nothing is deleted. Returns the deleted files."""
    if keep_last is None and top_k is None:
        return []
    top: list[int] = []
    if top_k is not None:
        top = ranked_epochs(scores, find_checkpoints(template, model_name), mode=mode)[:top_k]
    last = 1 if keep_last is None else keep_last
    return prune_checkpoints(template, model_name, keep_last=last, best_epoch=best_epoch, keep=top)
