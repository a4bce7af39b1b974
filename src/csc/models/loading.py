"""Find and load saved weights: the latest epoch by number, or the best one by validation score.

A checkpoint is a model file, ``model_save_path`` with ``{model_name}`` and ``{epoch}`` filled
(``checkpoints/2d_unet_3.pth``), holding the plain ``state_dict``, and beside it the training
state (``checkpoints/2d_unet_3.state.pth``), written by `csc.checkpoints`. Both load with
``torch.load(path, weights_only=True)``. The model file is written last, so an epoch whose model
file exists is complete.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

STATE_SUFFIX = ".state"  # the training state of "x_3.pth" is "x_3.state.pth"
VALIDATION_TAG = "validation"  # the scalar the training loop logs once per epoch
EPOCH_TAG = "epoch"  # logged at the same step as VALIDATION_TAG, value = epoch number
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added by DDP/DataParallel and torch.compile


class CheckpointWarning(UserWarning):
    """A checkpoint file could not be read and an earlier one is used instead."""


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read from disk; `train_state` is None when only the weights were read."""

    epoch: int
    path: Path  # the model file
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None


def format_checkpoint_path(template: str, *, model_name: str, epoch: int | str) -> Path:
    """The template with ``{model_name}`` and ``{epoch}`` (a number or ``"best"``) filled."""
    return Path(template.replace("{model_name}", model_name).replace("{epoch}", str(epoch)))


def state_path(model_path: Path) -> Path:
    """Where the training state of a model file lives: ``x_3.pth`` -> ``x_3.state.pth``."""
    model_path = Path(model_path)
    if model_path.suffix == ".pth":
        return model_path.with_suffix(STATE_SUFFIX + ".pth")
    return model_path.with_name(model_path.name + STATE_SUFFIX)


def find_checkpoints(template: str, model_name: str) -> dict[int, Path]:
    """Model files of `model_name` with an integer epoch, by epoch, in ascending order.

    ``best`` copies, training-state files and temporary files do not match the template's
    integer ``{epoch}`` and are not returned.
    """
    return epoch_files(template.replace("{model_name}", model_name))


def epoch_files(search_path: str) -> dict[int, Path]:
    """`find_checkpoints` for a template whose ``{model_name}`` is filled already."""
    parts = os.path.normpath(search_path).split("{epoch}")
    if len(parts) < 2:
        raise ValueError(f"checkpoint path {search_path!r} must contain {{epoch}}")
    # Every {epoch} in the template must hold the same number: a group, then back-references.
    escaped = [re.escape(part) for part in parts]
    regex = escaped[0] + "(?P<epoch>[0-9]+)" + "(?P=epoch)".join(escaped[1:])
    found = {}
    for name in glob.glob("*".join(glob.escape(part) for part in parts)):
        match = re.fullmatch(regex, os.path.normpath(name))
        if match and os.path.isfile(name):
            found[int(match["epoch"])] = Path(name)
    return dict(sorted(found.items()))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without ``module.``/``_orig_mod.`` prefixes that every key shares."""
    stripped = state
    while stripped:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in stripped)), "")
        if not prefix:
            break
        stripped = {key[len(prefix) :]: value for key, value in stripped.items()}
    # An unchanged state dict keeps its `_metadata` (module versions that load_state_dict uses).
    return stripped if isinstance(stripped, dict) else dict(stripped)


def read_checkpoint(model_path: Path, *, epoch: int, with_state: bool = False) -> Checkpoint:
    """Read a model file (and its training state, when `with_state` and the file exists)."""
    model_state = torch.load(model_path, map_location="cpu", weights_only=True)
    if not isinstance(model_state, Mapping):
        raise ValueError(f"{model_path} holds a {type(model_state).__name__}, not a state dict")
    train_state = None
    if with_state and state_path(model_path).exists():
        train_state = torch.load(state_path(model_path), map_location="cpu", weights_only=True)
    return Checkpoint(epoch, Path(model_path), strip_wrapper_prefixes(model_state), train_state)


def read_latest(search_path: str, *, with_state: bool = False) -> Checkpoint | None:
    """The checkpoint with the highest epoch number that reads; None when there is none.

    `search_path` is ``model_save_path`` with ``{model_name}`` filled. An unreadable file
    (truncated or corrupt, or its training state is) gives a `CheckpointWarning` and the
    previous epoch is tried; when none reads, `RuntimeError`.
    """
    checkpoints = epoch_files(search_path)
    for epoch, path in reversed(checkpoints.items()):
        try:
            return read_checkpoint(path, epoch=epoch, with_state=with_state)
        except Exception as error:  # torch.load raises many types for a damaged file
            warnings.warn(
                f"cannot read checkpoint {path} ({type(error).__name__}: {error}); "
                "falling back to the previous epoch",
                CheckpointWarning,
                stacklevel=2,
            )
    if checkpoints:
        raise RuntimeError(
            f"none of the {len(checkpoints)} checkpoints matching {search_path} can be read; "
            "remove the damaged files or set load_model = None to start fresh"
        )
    return None


def read_epoch(search_path: str, epoch: int, *, with_state: bool = False) -> Checkpoint:
    """The checkpoint of one epoch; `FileNotFoundError` naming the folder when it is missing."""
    path = Path(search_path.replace("{epoch}", str(epoch)))
    if not path.is_file():
        available = list(epoch_files(search_path)) or "none"
        raise FileNotFoundError(
            f"no checkpoint for epoch {epoch}: {path.name} is not in {path.parent.resolve()} "
            f"(epochs found there: {available})"
        )
    return read_checkpoint(path, epoch=epoch, with_state=with_state)


def load_weights(model: nn.Module, model_state: Mapping[str, torch.Tensor], *,
                 source: str = "the checkpoint") -> None:  # fmt: skip
    """Copy weights into `model`, whether it or the saved one was wrapped by DDP/compile. Weights
    of another architecture are a ValueError naming `source` and the first mismatches."""
    try:
        unwrap(model).load_state_dict(strip_wrapper_prefixes(model_state))
    except RuntimeError as error:
        lines = [_shorten(line.strip()) for line in str(error).splitlines()[1:] if line.strip()]
        shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
        raise ValueError(
            f"the weights in {source} do not fit the model this config builds ({shown}); check "
            "model_name and model_kwargs against the run that saved them, or load another "
            "checkpoint"
        ) from None


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_latest(search_path: str, model: nn.Module) -> int | None:
    """Load the highest-numbered epoch of `search_path` into `model`; its epoch, or None.

    `search_path` is ``model_save_path`` with ``{model_name}`` filled and ``{epoch}`` left in.
    Damaged files fall back to the previous epoch with a `CheckpointWarning`.
    """
    checkpoint = read_latest(search_path)
    if checkpoint is None:
        return None
    load_weights(model, checkpoint.model_state)
    return checkpoint.epoch


def load_best_val(
    logs_save_path: str,
    model_save_path: str,
    model: nn.Module,
    *,
    low_is_best: bool = True,
    smoothing_window: int = 1,
) -> int | None:
    """Load the epoch with the best validation score (see `best_epoch`); its epoch, or None.

    Both paths have ``{model_name}`` filled; None when the logs hold no validation scores.
    The existing toolkit loaded the checkpoint one epoch before the best; this loads the best.
    """
    epoch = best_epoch(logs_save_path, low_is_best=low_is_best, smoothing_window=smoothing_window)
    if epoch is None:
        return None
    load_weights(model, read_epoch(model_save_path, epoch).model_state)
    return epoch


def read_scalars(log_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar from every event file under `log_dir`, sorted by step.

    When several runs wrote the same step (a resumed run), the latest written wins.
    """
    # Imported here: tensorboard takes half a second to import and only this function needs it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[int, tuple[float, float]] = {}  # step -> (wall_time, value)
    for path in sorted(Path(log_dir).rglob("*tfevents*")):
        # All events are kept (no purge of out-of-order steps): duplicates are resolved here.
        events = EventAccumulator(
            str(path), size_guidance={"scalars": 0}, purge_orphaned_data=False
        )
        events.Reload()
        if tag not in events.Tags()["scalars"]:
            continue
        for event in events.Scalars(tag):
            if event.step not in latest or event.wall_time >= latest[event.step][0]:
                latest[event.step] = (event.wall_time, event.value)
    return [(step, value) for step, (_, value) in sorted(latest.items())]


def validation_by_epoch(log_dir: str | Path) -> dict[int, float]:
    """The ``validation`` score of each epoch, in epoch order.

    The epoch of a score is the ``epoch`` scalar logged at the same step. Logs without an
    ``epoch`` tag (the existing toolkit's) count validations: the i-th by step (from 0) is
    epoch i + 1, the epoch that was validated (the existing toolkit loaded epoch i, one before).
    """
    scores = read_scalars(log_dir, VALIDATION_TAG)
    epoch_at = {step: round(value) for step, value in read_scalars(log_dir, EPOCH_TAG)}
    if not epoch_at:
        return {i + 1: value for i, (_, value) in enumerate(scores)}
    by_epoch = {epoch_at[step]: value for step, value in scores if step in epoch_at}
    return dict(sorted(by_epoch.items()))


def best_epoch(
    log_dir: str | Path, *, low_is_best: bool = True, smoothing_window: int = 1
) -> int | None:
    """The epoch with the best smoothed ``validation`` score in the logs; None without scores.

    The smoothed score of epoch e is the mean over a window of `smoothing_window` epochs
    centred on e (epochs e - (w-1)//2 .. e + w//2), shrunk at the first and last epochs. So
    the chosen epoch sits in the middle of a good stretch rather than at its end. A NaN score
    counts as the worst; ties go to the earliest epoch.
    """
    scores = validation_by_epoch(log_dir)
    if not scores:
        return None
    worst = np.inf if low_is_best else -np.inf
    values = np.array(list(scores.values()), dtype=float)
    values[np.isnan(values)] = worst
    smoothed = centred_mean(values, smoothing_window)
    index = np.argmin(smoothed) if low_is_best else np.argmax(smoothed)
    return list(scores)[int(index)]


def centred_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average over `window` values centred on each one, shrunk at the ends."""
    if window < 1:
        raise ValueError(f"smoothing_window must be an integer >= 1, got {window}")
    before, after = (window - 1) // 2, window // 2
    return np.array([values[max(0, i - before) : i + after + 1].mean() for i in range(len(values))])
