"""Find and read checkpoints: paths, the latest epoch by number or the best by validation
score, loading weights into a model, and rebuilding a model from its checkpoint alone.

A checkpoint is a model file, ``model_save_path`` with ``{model_name}`` and ``{epoch}`` filled
(``checkpoints/2d_unet_3.pth``), holding the plain ``state_dict`` as the challenge toolkit
writes it. csc's own files sit in a ``csc-extras`` folder beside it, so that nothing else
matches the toolkit's ``{model_name}_*.pth``: the training state
(``checkpoints/csc-extras/2d_unet_3.state.pth``, written by `csc.checkpoints.saving`) and the
``best`` link (``checkpoints/csc-extras/2d_unet_best.pth``). Earlier csc versions kept both
beside the model files (``2d_unet_3.state.pth``, ``2d_unet_best.pth``); those are still read.
Every file loads with ``torch.load(path, weights_only=True)``. The model file is written last,
so an epoch whose model file exists is complete.
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

from csc.checkpoints.best import monitor_tag
from csc.config import TrainConfig, load_model_file, monitor_mode
from csc.runtime import ModelArguments, strip_wrapper_prefixes, unwrap
from csc.tracking import VALIDATION_TAG, validation_by_epoch

STATE_SUFFIX = ".state"  # the training state of "x_3.pth" is "x_3.state.pth"
EXTRAS = "csc-extras"  # the folder beside the model files that holds csc's other files
# The key of the model file's state_dict `_metadata` (which torch saves and loads with it, and
# load_state_dict ignores unless a module has this path) that holds its `ModelArguments`.
MODEL_ARGUMENTS = "csc:model_arguments"


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
    """Where the training state of a model file goes: ``x_3.pth`` ->
    ``csc-extras/x_3.state.pth`` (beside it when the model file is in ``csc-extras``)."""
    beside = legacy_state_path(model_path)
    if beside.parent.name == EXTRAS:
        return beside
    return beside.parent / EXTRAS / beside.name


def legacy_state_path(model_path: Path) -> Path:
    """Where csc before the ``csc-extras`` folder put it: ``x_3.pth`` -> ``x_3.state.pth``."""
    model_path = Path(model_path)
    if model_path.suffix == ".pth":
        return model_path.with_suffix(STATE_SUFFIX + ".pth")
    return model_path.with_name(model_path.name + STATE_SUFFIX)


def state_files(model_path: Path) -> tuple[Path, Path]:
    """Both places a model file's training state may be: `state_path`, `legacy_state_path`."""
    return state_path(model_path), legacy_state_path(model_path)


def existing_state(model_path: Path) -> Path | None:
    """The training state file of a model file that exists (the current place first)."""
    return next((path for path in state_files(model_path) if path.is_file()), None)


def best_path(template: str, model_name: str) -> Path:
    """The ``best`` link: ``checkpoints/csc-extras/2d_unet_best.pth``."""
    beside = legacy_best_path(template, model_name)
    return beside.parent / EXTRAS / beside.name


def legacy_best_path(template: str, model_name: str) -> Path:
    """Where csc before the ``csc-extras`` folder put ``best``: ``2d_unet_best.pth``."""
    return format_checkpoint_path(template, model_name=model_name, epoch="best")


def model_path(state_file: Path) -> Path:
    """The model file of a training state (`state_path` inverted, also for the earlier place):
    ``csc-extras/x_3.state.pth`` -> ``x_3.pth``; the path unchanged when it is no state file's
    name."""
    state_file = Path(state_file)
    for suffix, model_suffix in ((STATE_SUFFIX + ".pth", ".pth"), (STATE_SUFFIX, "")):
        if state_file.name.endswith(suffix):
            name = state_file.name[: -len(suffix)] + model_suffix
            folder = state_file.parent
            if folder.name == EXTRAS and not (folder / name).is_file():
                folder = folder.parent  # an epoch's state; a best copy's model is beside it
            return folder / name
    return state_file


def find_checkpoints(template: str, model_name: str) -> dict[int, Path]:
    """Model files of `model_name` with an integer epoch, by epoch, in ascending order.

    ``best`` copies, training-state files and temporary files do not match the template's
    integer ``{epoch}`` and are not returned.
    """
    return epoch_files(template.replace("{model_name}", model_name))


def epoch_files(search_path: str) -> dict[int, Path]:
    """`find_checkpoints` for a template whose ``{model_name}`` is filled already, or for the
    toolkit's wildcard form (``checkpoints/2d_unet_*.pth``, ``checkpoints/*.pth``: see
    `wildcard_files`)."""
    if "{epoch}" not in search_path:
        if glob.has_magic(search_path):
            return wildcard_files(search_path)
        raise ValueError(
            f"checkpoint path {search_path!r} must contain {{epoch}} (csc's form, "
            "checkpoints/2d_unet_{epoch}.pth) or a wildcard (checkpoints/2d_unet_*.pth)"
        )
    found = {int(fields["epoch"]): path for fields, path in template_files(search_path)}
    return dict(sorted(found.items()))


def wildcard_files(pattern: str) -> dict[int, Path]:
    """The files matching the glob `pattern` whose name ends in an epoch number before its
    extension (``2d_unet_12.pth``), by epoch, in ascending order.

    Others are passed over: csc's ``best`` and training states (also an earlier csc's
    ``2d_unet_best.pth`` and ``2d_unet_3.state.pth``), hidden and temporary files. When files
    of several runs match (``*.pth`` over ``unet_3.pth`` and ``resnet_5.pth``), the run whose
    file was modified last counts, as the toolkit picks the newest file.
    """
    runs: dict[str, dict[int, Path]] = {}
    for name in sorted(glob.glob(pattern)):
        path = Path(name)
        match = re.fullmatch(r"(.*?)([0-9]+)", path.name.removesuffix(path.suffix))
        if match and not path.name.startswith(".") and path.is_file():
            run = match[1] + path.suffix  # e.g. "2d_unet_.pth"
            runs.setdefault(str(path.parent / run), {})[int(match[2])] = path
    if not runs:
        return {}
    newest = max(runs.values(), key=lambda files: max(p.stat().st_mtime for p in files.values()))
    return dict(sorted(newest.items()))


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


# What `load_for_resume` returns: epoch, path (the model file), model_state and train_state
# (None when the checkpoint has no training state file, e.g. one from the existing toolkit).
Resumed = Checkpoint


def read_checkpoint(model_path: Path, *, epoch: int, with_state: bool = False) -> Checkpoint:
    """Read a model file (and its training state, when `with_state` and the file exists)."""
    model_state = torch.load(model_path, map_location="cpu", weights_only=True)
    if not isinstance(model_state, Mapping):
        raise ValueError(f"{model_path} holds a {type(model_state).__name__}, not a state dict")
    train_state, state = None, existing_state(model_path) if with_state else None
    if state is not None:
        train_state = torch.load(state, map_location="cpu", weights_only=True)
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
    """Copy weights into `model`, whether it or the saved one was wrapped by DDP/compile, and
    from a UNet saved by csc before its layers took the toolkit's names (`legacy_unet_keys`).
    Weights of another architecture are a ValueError naming `source` and the first mismatches."""
    target = unwrap(model)
    weights = strip_wrapper_prefixes(model_state)
    if any(key.startswith("encoders.0.") for key in weights) and "inc" in dict(
        target.named_children()
    ):
        weights = legacy_unet_keys(weights)
    try:
        target.load_state_dict(weights)
    except RuntimeError as error:
        lines = [_shorten(line.strip()) for line in str(error).splitlines()[1:] if line.strip()]
        shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
        raise ValueError(
            f"the weights in {source} do not fit the model this config builds ({shown}); check "
            "model_name and model_kwargs against the run that saved them, or load another "
            f"checkpoint{_legacy_hint(weights)}"
        ) from None


def legacy_unet_keys(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A csc UNet's weights from before its layers took the toolkit's names, renamed:
    ``encoders.0`` -> ``inc``, ``encoders.i`` -> ``down{i}.maxpool_conv.1``, ``decoders.j`` ->
    ``up{j+1}``, ``head`` -> ``outc.conv``; each double conv's two (conv, norm, ReLU) blocks
    become one ``double_conv`` Sequential. Keys that fit no rule are kept as they are."""
    has_norm = any(key.startswith("encoders.0.0.1.") for key in weights)
    per_block = 3 if has_norm else 2  # a block without norm is (conv, ReLU) now
    renamed = {}
    for key, value in weights.items():
        new = re.sub(r"^encoders\.0\.", "inc.", key)
        new = re.sub(r"^encoders\.([0-9]+)\.", r"down\1.maxpool_conv.1.", new)
        new = re.sub(r"^decoders\.([0-9]+)\.", lambda m: f"up{int(m[1]) + 1}.", new)
        new = re.sub(r"^head\.", "outc.conv.", new)
        new = re.sub(
            r"^(inc|down[0-9]+\.maxpool_conv\.1|up[0-9]+\.conv)\.([01])\.([01])\.",
            lambda m: f"{m[1]}.double_conv.{int(m[2]) * per_block + int(m[3])}.",
            new,
        )
        renamed[new] = value
    return renamed


def _legacy_hint(weights: Mapping[str, torch.Tensor]) -> str:
    """A note for weights in the layer names csc used before the toolkit's."""
    if not any(
        key.startswith(("encoders.", "decoders.", "embed.", "model.0.0.")) for key in weights
    ):
        return ""
    return (
        " (they have the layer names csc used before its models took the toolkit's; only a "
        "UNet with upsample='transposed' and batch or group norm is renamed on load: retrain "
        "others)"
    )


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_latest(search_path: str, model: nn.Module) -> int | None:
    """Load the highest-numbered epoch of `search_path` into `model`; its epoch, or None.

    `search_path` is ``model_save_path`` with ``{model_name}`` filled and ``{epoch}`` left in,
    or the toolkit's wildcard form (``checkpoints/2d_unet_*.pth``; `wildcard_files`). Damaged
    files fall back to the previous epoch with a `CheckpointWarning`.
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


def best_epoch(
    log_dir: str | Path,
    *,
    low_is_best: bool = True,
    smoothing_window: int = 1,
    tag: str = VALIDATION_TAG,
) -> int | None:
    """The epoch with the best smoothed ``validation`` score (or the scalar `tag`, e.g. the
    monitored ``metrics/iou/mean``) in the logs; None without scores.

    The smoothed score of epoch e is the mean over a window of `smoothing_window` epochs
    centred on e (epochs e - (w-1)//2 .. e + w//2), shrunk at the first and last epochs. So
    the chosen epoch sits in the middle of a good stretch rather than at its end. A NaN score
    counts as the worst; ties go to the earliest epoch.
    """
    scores = validation_by_epoch(log_dir, tag=tag)
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


# --- A run's checkpoint by name; weights and models from files ----------------------------


def read_run(
    config: TrainConfig, which: str | int, *, model_name: str, with_state: bool = False
) -> Checkpoint | None:
    """The checkpoint `which` of `model_name` under the config's paths; None when there is
    nothing to load.

    ``"latest"``: the highest epoch that reads (damaged files fall back to the previous epoch
    with a warning). ``"best"``: the epoch with the best smoothed monitored score (`monitor`:
    the validation loss unless set) in its TensorBoard logs (`best_epoch`). An epoch number:
    that epoch. A missing file for a best or numbered epoch is a `FileNotFoundError`.
    """
    search_path = config.model_save_path.replace("{model_name}", model_name)
    if which == "latest":
        return read_latest(search_path, with_state=with_state)
    if isinstance(which, int):
        return read_epoch(search_path, which, with_state=with_state)
    log_dir = config.logs_save_path.replace("{model_name}", model_name)
    epoch = best_epoch(
        log_dir,
        low_is_best=monitor_mode(config) == "min",
        smoothing_window=config.smoothing_window,
        tag=monitor_tag(config.monitor),
    )
    if epoch is None:
        return None
    return read_epoch(search_path, epoch, with_state=with_state)


def load_for_resume(config: TrainConfig) -> Resumed | None:
    """The checkpoint `config.load_model` asks for: "latest" or "best" of
    `config.model_to_load` (`read_run`), with its training state when saved, or the file it
    names (`read_named`); None when there is nothing to load. Whether the run resumes it or
    fine-tunes from it is `resumes_own_run`'s to say."""
    if config.load_model is None:
        return None
    file = load_model_file(config)
    if file is not None:
        return read_named(config, file)
    return read_run(config, config.load_model, model_name=config.model_to_load, with_state=True)


def read_named(config: TrainConfig, path: Path) -> Checkpoint:
    """``load_model = "path/to/x.pth"``: an epoch of this run (`model_name` under
    `model_save_path`: its model file, its training state or the ``best`` link to it) that has
    its training state, read with it, to resume; anything else (another run's checkpoint, an
    epoch whose state was dropped, the toolkit's plain state dict) as weights alone, epoch 0,
    to fine-tune from. A missing file is a `FileNotFoundError` naming it."""
    if not path.is_file():
        raise FileNotFoundError(
            f"load_model {str(path)!r} does not exist (a relative path is from the config's "
            "folder); give an existing checkpoint file, or 'latest', 'best' or None"
        )
    epoch, file = own_epoch(config, model_path(path))
    if file is not None and existing_state(file) is not None:
        return read_checkpoint(file, epoch=epoch, with_state=True)
    weights, source = read_weights(path)
    return Checkpoint(0, source, weights, None)


def own_epoch(config: TrainConfig, file: Path) -> tuple[int, Path | None]:
    """The epoch of this run (`model_name`) whose model file `file` is (the same file: the
    ``best`` hard link counts) and that model file; (0, None) when it is none of them."""
    if file.is_file():
        for epoch, path in find_checkpoints(config.model_save_path, config.model_name).items():
            if os.path.samefile(path, file):
                return epoch, path
    return 0, None


def resumes_own_run(config: TrainConfig, resumed: Resumed | None) -> bool:
    """Whether the run continues `resumed` (optimizer, epochs, best) rather than starting at
    epoch 1 from its weights (a fine-tune): for "latest"/"best" when `model_to_load` is
    `model_name`; for a named file when it is an epoch of this run with its training state."""
    if resumed is None:
        return False
    if load_model_file(config) is not None:
        return resumed.train_state is not None
    return config.model_to_load == config.model_name


def checkpoint_weights(config: TrainConfig, checkpoint: str) -> tuple[dict[str, Any], str]:
    """The model weights of `checkpoint`: "latest" or "best" of `model_name` (as `load_model`
    resumes them), or a .pth file (`read_weights`); and where they came from."""
    if checkpoint not in ("latest", "best"):
        weights, path = read_weights(Path(checkpoint).expanduser())
        return weights, str(path)
    # With the training state, as resume reads it: a latest epoch whose state does not read is
    # passed over here too, so these are the weights a resume would continue from.
    found = read_run(config, checkpoint, model_name=config.model_name, with_state=True)
    if found is None:
        template = config.model_save_path.replace("{model_name}", config.model_name)
        raise FileNotFoundError(
            f"no {checkpoint} checkpoint of {config.model_name} matches {template}: train "
            "first (csc train), or pass --checkpoint PATH"
        )
    return found.model_state, str(found.path)


def read_weights(path: Path) -> tuple[dict[str, Any], Path]:
    """The weights in a .pth file, and the file they came from: a model file's state dict; a
    training state's raw weights (``"model"``, kept when the model file holds the EMA's), or
    else those of the model file beside it."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass latest, best or a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a NAME_e.state.pth training state
    elif isinstance(state, dict) and "model" in state and "optimizer" in state:
        path = model_path(path)  # a training state whose weights are the model file's
        state = torch.load(path, map_location="cpu", weights_only=True)
    return strip_wrapper_prefixes(state), path


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """The model of a checkpoint file (``2d_unet_3.pth``, ``2d_unet_best.pth``; for a training
    state, its model file), rebuilt from the `ModelArguments` saved in it, with its weights.

    Model files saved by csc before this version, by the challenge toolkit, or of a config's
    own `model` do not say how to build their model: a `ValueError` says what to do instead.
    """
    path = model_path(Path(path).expanduser())
    weights, _ = read_weights(path)
    stored = getattr(weights, "_metadata", {}).get(MODEL_ARGUMENTS)
    if not isinstance(stored, dict):
        raise ValueError(
            f"{path} holds weights but not how to build their model (saved by an earlier csc, "
            "the challenge toolkit, or from a config's own `model`): build the model as its "
            "config does (csc.build_model(model_name, num_classes=..., **model_kwargs)) and "
            "load the weights into it with csc.checkpoints.load_weights(model, "
            "torch.load(path, weights_only=True))"
        )
    model = ModelArguments(**stored).build()
    load_weights(model, weights, source=str(path))
    return model
