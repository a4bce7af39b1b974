"""Keep one run's files apart from another's: `start_run` checks the folders, reads the
checkpoint to resume from and moves an old run aside (or refuses to mix with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from csc.checkpoints.reading import (
    EXTRAS,
    Resumed,
    best_path,
    find_checkpoints,
    format_checkpoint_path,
    legacy_best_path,
    legacy_state_path,
    load_for_resume,
    model_path,
    resumes_own_run,
    state_files,
    state_path,
    template_files,
)
from csc.checkpoints.records import run_records
from csc.checkpoints.saving import TEMPORARY, RunWriteError, repair_best
from csc.config import TrainConfig, load_model_file

MOVED = "{name}.moved-{stamp}"  # where existing_run = "move" puts an old run's files
PROBE_PREFIX = ".csc-write-check-"  # write_probe's file, in a folder for a moment


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
    load, or a fine-tune from another ``model_to_load`` or from a named file that is no epoch
    of this run with its state: `resumes_own_run`) refuses with `FileExistsError` when its
    checkpoint files or TensorBoard folder hold files already, unless ``existing_run =
    "move"``: then the old run is moved aside whole. A resume from ``"best"`` or a named file
    that would overwrite later epochs refuses too; a named file that does not exist is a
    `FileNotFoundError`. Rank 0 (`is_main`) then removes temporary files of
    killed writes and, on a resume, points ``best`` at the state's best epoch.

    Under torchrun rank 0 alone decides whether to refuse: it is the rank that writes, and the
    other ranks would otherwise look at folders rank 0 is probing or writing at that moment.
    """
    check_destinations(config, probe=is_main)  # rank 0 alone writes (and probes)
    resumed = load_for_resume(config)
    # The run's own checkpoint, when it resumes one (not a fine-tune from another model).
    own = resumed if resumes_own_run(config, resumed) else None
    notes: list[str] = []
    if not is_main:
        return RunStart(resumed, notes)
    if own is not None:
        _check_resume_point(config, own)
    elif config.existing_run != "move":
        checkpoints, logs = _existing_files(config)  # one look, for the decision and the error
        if checkpoints:  # logs alone: a run stopped in epoch 1, moved aside below
            _refuse_existing_run(config, resumed, checkpoints, logs)
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
        legacy = move_legacy_files(**names)
        if legacy:
            notes.append(
                f"moved {len(legacy)} training state / best file(s) of an earlier csc into "
                f"{legacy[0].parent}, where the toolkit's loaders do not read them as epochs"
            )
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
    states (also those of an epoch whose model file was never written), in the current places
    and an earlier csc's."""
    found = [path for search in _file_templates(template, model_name) for path in _matches(search)]
    return sorted(set(found))


def _file_templates(template: str, model_name: str) -> list[str]:
    """Templates (``{epoch}`` left in) of every file `run_files` lists."""
    model = Path(template.replace("{model_name}", model_name))
    best = best_path(template, model_name)
    return [str(path) for path in (model, *state_files(model), best, state_path(best))]


def _matches(search: str) -> list[Path]:
    epochs = {"epoch": "[0-9]+|best"}
    if "{epoch}" not in search:  # `best` in csc-extras, a path without placeholders
        return [Path(search)] if os.path.isfile(search) else []
    return [path for _, path in template_files(search, epochs)]


def temporary_files(template: str, model_name: str) -> list[Path]:
    """The temporary files `atomic_save` leaves when killed while writing a file of
    `run_files` (``.2d_unet_3.pth.1a2b3c4d.tmp``)."""
    found = []
    for search in _file_templates(template, model_name):
        file = Path(search)
        temporary = file.with_name(TEMPORARY.format(name=file.name, hex="{hex}"))
        patterns = {"epoch": "[0-9]+|best", "hex": "[0-9a-f]{8}"}
        found += [path for _, path in template_files(str(temporary), patterns)]
    return sorted(set(found))


def move_legacy_files(template: str, model_name: str) -> list[Path]:
    """Move an earlier csc's training states and ``best`` from beside the model files (where
    the toolkit's loaders read them as epochs) into ``csc-extras``; return the new paths.
    A file whose new place is taken already stays where it is."""
    moved = []
    pairs = [(legacy_best_path(template, model_name), best_path(template, model_name))]
    states = legacy_state_path(Path(template.replace("{model_name}", model_name)))
    for _, state in template_files(str(states), {"epoch": "[0-9]+|best"}):
        pairs.append((state, state_path(model_path(state))))  # also of unfinished epochs
    for old, new in pairs:
        if old.is_file() and not new.exists():
            new.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old, new)
            moved.append(new)
    return moved


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
        with tempfile.NamedTemporaryFile(dir=folder, prefix=PROBE_PREFIX) as file:
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
    found = folder.rglob("*") if folder.is_dir() else []
    # A write probe's file (`write_probe`) is csc's own and gone a moment later.
    logs = sorted(p for p in found if p.is_file() and not p.name.startswith(PROBE_PREFIX))
    checkpoints = [
        path for path in run_files(config.model_save_path, config.model_name) if path not in logs
    ]
    return checkpoints, logs


def _refuse_existing_run(
    config: TrainConfig, resumed: Resumed | None, checkpoints: list[Path], logs: list[Path]
) -> None:
    """`FileExistsError` naming the folders of the other run's `checkpoints` and `logs`, which
    this fresh run would mix with."""
    owners = (p.parent.parent if p.parent.name == EXTRAS else p.parent for p in checkpoints)
    folders = sorted({str(folder) for folder in owners})  # csc-extras counts as its folder
    folders += [str(log_dir(config))] if logs else []
    files = checkpoints + logs
    shown = ", ".join(path.name for path in files[:3])
    shown += f" and {len(files) - 3} more" if len(files) > 3 else ""
    if config.load_model is None:
        why = "starts fresh (load_model=None)"
    elif resumed is None:
        why = f"finds nothing of {config.model_to_load} to resume"
        why += f" (load_model={config.load_model!r})"
    elif load_model_file(config) is not None:
        why = f"starts from the weights in {resumed.path} (a fine-tune, from epoch 1: it is "
        why += f"no epoch of {config.model_name} with its training state)"
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
    """`FileExistsError` when resuming an earlier epoch (``load_model = "best"`` or a named
    file) would overwrite the run's later epochs. ("latest" falls back past a damaged latest
    epoch only: that epoch is redone and its damaged files replaced.)"""
    if config.load_model == "latest":
        return
    later = [
        e for e in find_checkpoints(config.model_save_path, config.model_name) if e > resumed.epoch
    ]
    if not later:
        return
    raise FileExistsError(
        f"load_model={config.load_model!r} resumes {config.model_name} at epoch "
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
        for file in (path, *state_files(path)):
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
    files += run_records(template, config.model_name)  # they go with the run they describe
    for path in files:
        target = moved_checkpoints / os.path.relpath(path, base)
        if target.exists():  # only where logs and checkpoints share a folder
            raise FileExistsError(f"cannot move {path} aside: {target} exists; move it by hand")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)
    if files:
        lines.append(f"{len(files)} checkpoint file(s) -> {moved_checkpoints}")
    return f"{reason}: moved the previous run of {config.model_name} aside: " + ("; ".join(lines))
