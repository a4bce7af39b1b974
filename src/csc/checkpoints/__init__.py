"""Checkpoints, their one owner: save, find, read, latest/best, prune, load weights, and
rebuild a model from its checkpoint alone (see docs/training.md).

Modules: `reading` (paths, finding and reading checkpoints, the best epoch, loading weights
and models), `saving` (atomic writes, the best link, pruning, RNG states) and `runs` (one run's
files kept apart from another's: `start_run`).
"""

from csc.checkpoints.reading import (
    Checkpoint,
    CheckpointReadError,
    CheckpointWarning,
    Resumed,
    best_epoch,
    centred_mean,
    checkpoint_weights,
    find_checkpoints,
    format_checkpoint_path,
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
    state_path,
)
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

__all__ = [
    "Checkpoint",
    "CheckpointReadError",
    "CheckpointWarning",
    "Resumed",
    "RunStart",
    "RunWriteError",
    "atomic_save",
    "best_epoch",
    "centred_mean",
    "check_destinations",
    "checkpoint_weights",
    "drop_old_states",
    "find_checkpoints",
    "format_checkpoint_path",
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
    "rng_state",
    "save_best",
    "save_checkpoint",
    "set_rng_state",
    "start_run",
    "state_path",
    "to_safe",
]
