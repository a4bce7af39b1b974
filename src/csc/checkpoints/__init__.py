"""Checkpoints, their one owner: save, find, read, latest/best, prune, load weights, and
rebuild a model from its checkpoint alone (see docs/training.md).

Modules: `reading` (paths, finding and reading checkpoints, the best epoch, loading weights
and models), `saving` (atomic writes, the best link, pruning, RNG states), `records` (a
JSON record of each start of a run), `runs` (one run's
files kept apart from another's: `start_run`) and `toolkit` (the challenge toolkit's
`get_model`, `get_latest_checkpoint_epoch`, `get_best_val_epoch`).
"""

from csc.checkpoints.reading import (
    Checkpoint,
    CheckpointReadError,
    CheckpointWarning,
    Resumed,
    best_epoch,
    best_path,
    centred_mean,
    checkpoint_weights,
    find_checkpoints,
    format_checkpoint_path,
    legacy_best_path,
    legacy_state_path,
    load_best_val,
    load_for_resume,
    load_latest,
    load_model,
    load_weights,
    model_path,
    read_checkpoint,
    read_epoch,
    read_latest,
    read_run,
    read_weights,
    state_files,
    state_path,
)
from csc.checkpoints.records import record_json, run_records, save_run_record
from csc.checkpoints.runs import RunStart, check_destinations, log_dir, start_run
from csc.checkpoints.saving import (
    RunWriteError,
    atomic_save,
    drop_old_states,
    link_best,
    prune_checkpoints,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
    to_safe,
)
from csc.checkpoints.toolkit import get_best_val_epoch, get_latest_checkpoint_epoch, get_model

__all__ = [
    "Checkpoint",
    "CheckpointReadError",
    "CheckpointWarning",
    "Resumed",
    "RunStart",
    "RunWriteError",
    "atomic_save",
    "best_epoch",
    "best_path",
    "centred_mean",
    "check_destinations",
    "checkpoint_weights",
    "drop_old_states",
    "find_checkpoints",
    "format_checkpoint_path",
    "get_best_val_epoch",
    "get_latest_checkpoint_epoch",
    "get_model",
    "legacy_best_path",
    "legacy_state_path",
    "link_best",
    "load_best_val",
    "load_for_resume",
    "load_latest",
    "load_model",
    "load_weights",
    "log_dir",
    "model_path",
    "prune_checkpoints",
    "read_checkpoint",
    "read_epoch",
    "read_latest",
    "read_run",
    "read_weights",
    "record_json",
    "rng_state",
    "run_records",
    "save_best",
    "save_checkpoint",
    "save_run_record",
    "set_rng_state",
    "start_run",
    "state_files",
    "state_path",
    "to_safe",
]
