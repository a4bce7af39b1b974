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
START = 1  # tensorboard's SessionLog.START: a (re)started run; steps from here on are new


class CheckpointWarning(UserWarning):
    """A checkpoint file could not be read and an earlier one is used instead."""


class CheckpointReadError(ValueError):
    """No checkpoint of a run can be read; the message names them and says what to do."""


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


def model_path(state_file: Path) -> Path:
    """The model file of a training state (`state_path` inverted): ``x_3.state.pth`` ->
    ``x_3.pth``; the path unchanged when it is no state file's name."""
    state_file = Path(state_file)
    for suffix, model_suffix in ((STATE_SUFFIX + ".pth", ".pth"), (STATE_SUFFIX, "")):
        if state_file.name.endswith(suffix):
            return state_file.with_name(state_file.name[: -len(suffix)] + model_suffix)
    return state_file


def find_checkpoints(template: str, model_name: str) -> dict[int, Path]:
    """Model files of `model_name` with an integer epoch, by epoch, in ascending order.

    ``best`` copies, training-state files and temporary files do not match the template's
    integer ``{epoch}`` and are not returned.
    """
    return epoch_files(template.replace("{model_name}", model_name))


def epoch_files(search_path: str) -> dict[int, Path]:
    """`find_checkpoints` for a template whose ``{model_name}`` is filled already."""
    if "{epoch}" not in search_path:
        raise ValueError(f"checkpoint path {search_path!r} must contain {{epoch}}")
    found = {int(fields["epoch"]): path for fields, path in template_files(search_path)}
    return dict(sorted(found.items()))


def template_files(
    template: str, patterns: Mapping[str, str] | None = None
) -> list[tuple[dict[str, str], Path]]:
    """The files that match `template`: each with the values of its placeholders.

    `patterns` maps a placeholder (``epoch`` for ``{epoch}``) to the regular expression its
    value matches; by default ``{epoch}`` is an integer. A placeholder that occurs several times
    must hold the same value each time.
    """
    patterns = {"epoch": "[0-9]+", **(patterns or {})}
    template = os.path.normpath(template)
    placeholders = "|".join(re.escape("{" + name + "}") for name in patterns)
    pieces = re.split(f"({placeholders})", template)
    wildcard, regex, seen = "", "", set()
    for index, piece in enumerate(pieces):
        if index % 2 == 0:  # the text between placeholders
            wildcard += glob.escape(piece)
            regex += re.escape(piece)
            continue
        name = piece[1:-1]
        wildcard += "*"
        regex += f"(?P={name})" if name in seen else f"(?P<{name}>{patterns[name]})"
        seen.add(name)
    found = []
    for name in sorted(glob.glob(wildcard)):
        match = re.fullmatch(regex, os.path.normpath(name))
        if match and os.path.isfile(name):
            found.append((match.groupdict(), Path(name)))
    return found


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
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
                f"cannot read checkpoint {path} ({type(error).__name__}: "
                f"{_first_line(error)}); falling back to the previous epoch",
                CheckpointWarning,
                stacklevel=2,
            )
    if checkpoints:
        raise CheckpointReadError(
            f"none of the {len(checkpoints)} checkpoints matching {search_path} can be read; "
            "move the damaged files away, or start a new run (load_model=None with "
            "existing_run='move' keeps them aside)"
        )
    return None


def _first_line(error: BaseException) -> str:
    """torch.load's errors run to paragraphs; a warning line needs their first sentence."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


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


def load_weights(
    model: nn.Module, model_state: Mapping[str, torch.Tensor], *, source: str = "the checkpoint"
) -> None:
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

    Files are read in the order they were created. When several runs wrote the same step (a
    resumed run), the latest written wins; a restart marker (``SummaryWriter(purge_step=S)``,
    written when a run resumes at step S) hides every step >= S written before it, as
    TensorBoard does, so the steps an interrupted run logged after its last checkpoint are gone.
    """
    latest: dict[int, float] = {}
    for events in _event_files(Path(log_dir)):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == START:
                latest = {step: value for step, value in latest.items() if step < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    latest[event.step] = _scalar(value)
    return sorted(latest.items())


def _event_files(log_dir: Path) -> list[list[Any]]:
    """The events of each event file under `log_dir`, files by creation (first wall time)."""
    # Imported here: tensorboard takes half a second to import and only this function needs it.
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = []
    for path in sorted(log_dir.rglob("*tfevents*")):
        if path.is_file():
            events = list(LegacyEventFileLoader(str(path)).Load())
            if events:
                files.append((events[0].wall_time, str(path), events))
    return [events for _, _, events in sorted(files, key=lambda item: item[:2])]


def _scalar(value: Any) -> float:
    """A summary value's number: ``simple_value`` (torch's writer) or a scalar tensor."""
    if value.HasField("simple_value"):
        return float(value.simple_value)
    from tensorboard.util.tensor_util import make_ndarray

    return float(make_ndarray(value.tensor))


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
