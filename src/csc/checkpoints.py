"""Save checkpoints atomically, prune old ones, read them back to resume a run, and keep one
run's files apart from another's (`start_run`).

Each epoch writes two files from ``model_save_path``: the training state
(``2d_unet_3.state.pth``: optimizer, scheduler, scaler, EMA, epoch, step, RNG states, best
score, config) and then the model's plain ``state_dict`` (``2d_unet_3.pth``), which marks the
epoch as complete. Each file is written under a temporary name in the same folder and renamed,
so a crash never leaves a half-written file under a checkpoint's name. Everything stored is
plain data (`to_safe`), so ``torch.load(path, weights_only=True)`` reads every file.
Training states are kept for the last two epochs and the best one (`drop_old_states`); the
``best`` file is a hard link to the best epoch's model file (`link_best`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import os
import random
import shutil
import tempfile
import time
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
    model_path,
    read_epoch,
    read_latest,
    state_path,
    template_files,
    unwrap,
)
from csc.models.loading import best_epoch as best_validation_epoch
from csc.storage import StorageError

__all__ = [
    "Resumed",
    "RunStart",
    "RunWriteError",
    "check_destinations",
    "drop_old_states",
    "link_best",
    "load_for_resume",
    "log_dir",
    "model_path",
    "prune_checkpoints",
    "rng_state",
    "save_best",
    "save_checkpoint",
    "set_rng_state",
    "start_run",
    "to_safe",
    "unwrap",
]

TEMPORARY = ".{name}.{hex}.tmp"  # what `atomic_save` writes first, beside the file `name`
MOVED = "{name}.moved-{stamp}"  # where existing_run = "move" puts an old run's files

# What `load_for_resume` returns: epoch, path (the model file), model_state and train_state
# (None when the checkpoint has no training state file, e.g. one from the existing toolkit).
Resumed = Checkpoint


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
    """Make ``best`` (``2d_unet_best.pth``) the model file of `epoch`: a hard link (no extra
    bytes), else a copy; replaced atomically. Return its path."""
    source = format_checkpoint_path(template, model_name=model_name, epoch=epoch)
    best = format_checkpoint_path(template, model_name=model_name, epoch="best")
    temporary = _temporary(best)
    try:
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
    # Earlier csc versions copied the training state too; that copy would disagree with `best`.
    state_path(best).unlink(missing_ok=True)
    return best


def repair_best(template: str, model_name: str, best_epoch: int | None) -> Path | None:
    """Point ``best`` at `best_epoch`'s model file when it does not (a kill between the epoch's
    checkpoint and its best link); the repaired path, or None when it already agreed."""
    if best_epoch is None:
        return None
    source = format_checkpoint_path(template, model_name=model_name, epoch=best_epoch)
    best = format_checkpoint_path(template, model_name=model_name, epoch="best")
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
        state = state_path(path)
        if epoch not in needed and state.is_file():
            state.unlink()
            removed.append(state)
    return removed


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


# --- One run's files, kept apart from another's ------------------------------------------


@dataclasses.dataclass
class RunStart:
    """What `start_run` found and did: the checkpoint to resume from (None: start fresh) and a
    line for each thing it changed on disk."""

    resumed: Resumed | None
    notes: list[str]


def start_run(config: TrainConfig, *, is_main: bool = True) -> RunStart:
    """Before any data is read: check that checkpoints and logs can be written, read the
    checkpoint to resume from, and keep this run's files apart from another run's.

    A run that does not resume its own checkpoints (``load_model = None``, nothing found to
    load, or a fine-tune from another ``model_to_load``) refuses with `FileExistsError` when
    its checkpoint files or TensorBoard folder hold files already, unless ``existing_run =
    "move"``: then the old run is moved aside whole. A resume from ``"best"`` that would
    overwrite later epochs refuses too. Rank 0 (`is_main`) then removes temporary files of
    killed writes and, on a resume, points ``best`` at the state's best epoch.
    """
    check_destinations(config, probe=is_main)  # rank 0 alone writes (and probes)
    resumed = load_for_resume(config)
    # The run's own checkpoint, when it resumes one (not a fine-tune from another model).
    own = resumed if resumed is not None and config.model_to_load == config.model_name else None
    if own is not None:
        _check_resume_point(config, own)
    elif config.existing_run != "move" and not _logs_only(config):
        _refuse_existing_run(config, resumed)
    notes: list[str] = []
    if not is_main:
        return RunStart(resumed, notes)
    names = {"template": config.model_save_path, "model_name": config.model_name}
    removed = remove_temporary_files(**names)
    if removed:
        notes.append(
            f"removed {len(removed)} temporary file(s) of an interrupted write: "
            + ", ".join(str(path) for path in removed)
        )
    if own is None and any(_existing_files(config)):
        notes.append(move_run_aside(config, reason=_move_reason(config)))
    if own is not None:
        moved = move_damaged_aside(config, resumed_epoch=own.epoch)
        if moved:
            notes.append(
                f"kept {len(moved)} unreadable checkpoint file(s) of later epochs aside, "
                f"byte for byte, as {', '.join(str(path) for path in moved)}; epoch "
                f"{own.epoch + 1} is trained again"
            )
    if own is not None and own.train_state is not None:
        best_epoch = own.train_state.get("best_epoch")
        repaired = repair_best(best_epoch=best_epoch, **names)
        if repaired is not None:
            notes.append(
                f"{repaired} did not hold the best epoch {best_epoch} (interrupted "
                f"run): it is the model file of epoch {best_epoch} again"
            )
    return RunStart(resumed, notes)


def log_dir(config: TrainConfig) -> Path:
    """The run's TensorBoard folder: ``logs_save_path`` with ``{model_name}`` filled."""
    return Path(config.logs_save_path.replace("{model_name}", config.model_name))


def run_files(template: str, model_name: str) -> list[Path]:
    """The checkpoint files of `model_name`: epoch and ``best`` model files, and their training
    states (also those of an epoch whose model file was never written)."""
    search = template.replace("{model_name}", model_name)
    epochs = {"epoch": "[0-9]+|best"}
    found = template_files(search, epochs) + template_files(str(state_path(Path(search))), epochs)
    return sorted({path for _, path in found})


def temporary_files(template: str, model_name: str) -> list[Path]:
    """The temporary files `atomic_save` leaves when killed while writing a file of
    `run_files` (``.2d_unet_3.pth.1a2b3c4d.tmp``)."""
    search = Path(template.replace("{model_name}", model_name))
    found = []
    for model_file in (search, state_path(search)):
        temporary = model_file.with_name(TEMPORARY.format(name=model_file.name, hex="{hex}"))
        patterns = {"epoch": "[0-9]+|best", "hex": "[0-9a-f]{8}"}
        found += [path for _, path in template_files(str(temporary), patterns)]
    return sorted(set(found))


def remove_temporary_files(template: str, model_name: str) -> list[Path]:
    """Delete the temporary files of killed writes (`temporary_files`); return them."""
    removed = temporary_files(template, model_name)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def check_destinations(config: TrainConfig, *, probe: bool = True) -> None:
    """`RunWriteError` when the checkpoint or log folder cannot be created or written: the
    nearest existing folder is a file, or is read-only; with `probe`, a file is really
    written (and removed) in each, which also finds a read-only file system or a full disk
    that permissions do not show (tests run as root, whom permissions never stop)."""
    checkpoint = format_checkpoint_path(
        config.model_save_path, model_name=config.model_name, epoch=1
    )
    for what, folder, key in (
        ("checkpoints", checkpoint.parent, "model_save_path"),
        ("TensorBoard logs", log_dir(config), "logs_save_path"),
    ):
        existing = folder.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problem = f"{existing} is a file, not a folder"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable (read-only or no permission)"
        elif probe and (failure := write_probe(folder)) is not None:
            problem = failure
        else:
            continue
        raise RunWriteError(
            f"cannot write {what} into {folder}: {problem}; fix it or set {key} to another folder"
        )


def write_probe(folder: Path) -> str | None:
    """Why a file cannot be written in `folder` (None: it can). Creates the folder and its
    missing parents, writes a small file and removes it, then removes the folders it made
    (the run makes them again when it writes): the check leaves nothing behind."""
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".csc-write-check-") as file:
            file.write(b"csc")
            file.flush()
            os.fsync(file.fileno())  # a full disk may only say so when the data goes out
    except OSError as error:
        return f"{error.strerror or error} ({error.filename or folder})"
    finally:
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir()
    return None


def _existing_files(config: TrainConfig) -> tuple[list[Path], list[Path]]:
    """The files of another run of `model_name`: its checkpoint files, its TensorBoard files."""
    folder = log_dir(config)
    logs = sorted(path for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else []
    checkpoints = [
        path for path in run_files(config.model_save_path, config.model_name) if path not in logs
    ]
    return checkpoints, logs


def _logs_only(config: TrainConfig) -> bool:
    """Whether the run's folders hold TensorBoard files but no checkpoint: a run stopped
    before its first epoch ended. Its logs are moved aside (kept whole), not refused, so that
    rerunning after a Ctrl-C in epoch 1 just works."""
    checkpoints, logs = _existing_files(config)
    return bool(logs) and not checkpoints


def _refuse_existing_run(config: TrainConfig, resumed: Resumed | None) -> None:
    """`FileExistsError` naming the folders when a fresh run would mix with an old one."""
    checkpoints, logs = _existing_files(config)
    if not checkpoints and not logs:
        return
    folders = sorted({str(path.parent) for path in checkpoints})
    folders += [str(log_dir(config))] if logs else []
    files = checkpoints + logs
    shown = ", ".join(path.name for path in files[:3])
    shown += f" and {len(files) - 3} more" if len(files) > 3 else ""
    if config.load_model is None:
        why = "starts fresh (load_model=None)"
    elif resumed is None:
        why = f"finds nothing of {config.model_to_load} to resume"
        why += f" (load_model={config.load_model!r})"
    else:
        why = f"starts from the weights of {config.model_to_load} (a fine-tune, from epoch 1)"
    ways = []
    if find_checkpoints(config.model_save_path, config.model_name):
        ways.append(f"resume it with load_model='latest' model_to_load={config.model_name!r}")
    ways.append("give this run another model_name, model_save_path or logs_save_path")
    moved = MOVED.format(name=config.model_name, stamp="DATE-TIME")
    ways.append(f"set existing_run='move' to move the old run aside (into {moved} folders)")
    raise FileExistsError(
        f"{' and '.join(folders)} already hold a run of {config.model_name} ({shown}) that "
        f"this run would mix with: it {why}. To go on, " + "; or ".join(ways)
    )


def _check_resume_point(config: TrainConfig, resumed: Resumed) -> None:
    """`FileExistsError` when resuming an earlier epoch (``load_model = "best"``) would
    overwrite the run's later epochs. ("latest" falls back past a damaged latest epoch only:
    that epoch is redone and its damaged files replaced.)"""
    if config.load_model != "best":
        return
    later = [
        e for e in find_checkpoints(config.model_save_path, config.model_name) if e > resumed.epoch
    ]
    if not later:
        return
    raise FileExistsError(
        f"load_model='best' resumes {config.model_name} at epoch "
        f"{resumed.epoch}, but {resumed.path.parent} holds its epochs up to {later[-1]}, which "
        "this run would overwrite: resume from the last epoch with load_model='latest', or "
        "start a new run from these weights with model_name=NEW "
        f"model_to_load={config.model_name!r} load_model={config.load_model!r}"
    )


def move_damaged_aside(config: TrainConfig, *, resumed_epoch: int) -> list[Path]:
    """Rename the files of epochs after `resumed_epoch` (which "latest" skipped because they
    do not read) to ``*.damaged-{date}-{time}``, a name no template matches: the epoch is
    trained again without replacing them. Returns the new names."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    found = find_checkpoints(config.model_save_path, config.model_name)
    moved = []
    for epoch, path in found.items():
        if epoch <= resumed_epoch:
            continue
        for file in (path, state_path(path)):
            if file.exists():
                target = file.with_name(f"{file.name}.damaged-{stamp}")
                os.rename(file, target)
                moved.append(target)
    return moved


def _move_reason(config: TrainConfig) -> str:
    if config.existing_run == "move":
        return "existing_run='move'"
    return "no checkpoint of an earlier run, only its logs (stopped before epoch 1 ended)"


def move_run_aside(config: TrainConfig, *, reason: str = "existing_run='move'") -> str:
    """Move the TensorBoard folder and checkpoint files of `model_name` into new folders named
    ``{name}.moved-{date}-{time}`` beside them; nothing is overwritten. A line saying where."""
    logs, template = log_dir(config), config.model_save_path
    # The fixed folder of the template, before its first placeholder: files keep their paths
    # relative to it (a template with {epoch} in a folder name keeps those folders).
    base = Path(os.path.dirname(os.path.normpath(template.split("{", 1)[0] + "x")))
    stamp, count = time.strftime("%Y%m%d-%H%M%S"), 1
    while True:  # a second move within the same second gets "-2"
        suffix = stamp if count == 1 else f"{stamp}-{count}"
        moved_logs = logs.with_name(MOVED.format(name=logs.name, stamp=suffix))
        moved_checkpoints = base / MOVED.format(name=config.model_name, stamp=suffix)
        if not moved_logs.exists() and not moved_checkpoints.exists():
            break
        count += 1
    lines = []
    if logs.is_dir() and any(path.is_file() for path in logs.rglob("*")):
        os.rename(logs, moved_logs)
        lines.append(f"logs {logs} -> {moved_logs}")
    files = run_files(template, config.model_name)  # those not inside the logs folder
    for path in files:
        target = moved_checkpoints / os.path.relpath(path, base)
        if target.exists():  # only where logs and checkpoints share a folder
            raise FileExistsError(f"cannot move {path} aside: {target} exists; move it by hand")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
    if files:
        lines.append(f"{len(files)} checkpoint file(s) -> {moved_checkpoints}")
    return f"{reason}: moved the previous run of {config.model_name} aside: " + ("; ".join(lines))
