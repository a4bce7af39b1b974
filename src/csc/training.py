"""The training loop (docs/training.md): `train(config)` wires data, model, loss, optimizer and
resume, then runs epochs of `train_epoch` -> `validate` -> log -> `save`.

The module is callable, so a config file can end with
``if __name__ == "__main__": from csc import train; train(__file__)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from csc import board, distributed
from csc.checkpoints import (
    BEST_TAG,
    RunStart,
    drop_old_states,
    is_better,
    link_best,
    load_for_resume,
    load_weights,
    log_dir,
    monitored_score,
    prune_by_score,
    repair_best,
    resumed_tracking,
    resumes_own_run,
    rng_state,
    save_checkpoint,
    set_rng_state,
    start_run,
    to_safe,
)
from csc.config import TrainConfig, config_folder, format_config, load_config, monitor_mode
from csc.data.datasets import PatchSpec, TrainPatches
from csc.data.loaders import Loaders, batches_of, build_loaders, close_batches, read_crops
from csc.datasplit import ensure_datasplit
from csc.distributed import Dist
from csc.losses import build_loss, check_criterion, pos_weight_from_counts
from csc.metrics import COUNT_NAMES, SegmentationMetrics, count_true
from csc.models import enable_activation_checkpointing
from csc.optim import (
    Schedule,
    check_plateau_mode,
    fit_saved_state,
    make_optimizer,
    make_scheduler,
    parameter_names,
)
from csc.reproducibility import deterministic_mode
from csc.runtime import (
    autocast,
    channels_last_format,
    choose_device,
    in_memory_format,
    make_model,
    model_arguments,
    unwrap,
    wrap_model,
)
from csc.tracking import EPOCH_TAG, Tracker, make_tracker
from csc.training_log import (
    BatchDebug,
    log_step,
    log_train_metrics,
    make_train_metrics,
    num_debug_batches,
    record_run,
    validation_due,
    validation_line,
)

DATA_BOUND_SHARE = 0.3  # of an epoch spent waiting for batches: warn that the run is data-bound


@dataclasses.dataclass(frozen=True)
class Throughput:
    """One epoch, over every rank: samples per second and the share of time spent waiting for
    data (the mean over ranks)."""

    samples_per_s: float
    data_wait_fraction: float


@dataclasses.dataclass
class SkippedSteps:
    """Optimizer steps skipped because a loss or the gradients were not finite."""

    in_epoch: int = 0
    in_a_row: int = 0  # across epochs; `max_nonfinite_steps` of them stop the run
    pending: bool = False  # a loss since the last step was not finite (gradient accumulation)
    buffers: list[torch.Tensor] = dataclasses.field(default_factory=list)  # after the last update


class NonFiniteTrainingError(ValueError):
    """Too many optimizer steps in a row had a non-finite loss or gradients."""


@dataclasses.dataclass
class Run:
    """Everything one training run holds; the loop reads and updates it."""

    config: TrainConfig
    device: torch.device
    spec: PatchSpec  # the patch shapes, built once from the config
    loaders: Loaders
    model: torch.nn.Module
    ema: AveragedModel | None
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule  # warm-up, then the config's scheduler (csc.optim)
    scaler: torch.amp.GradScaler
    tracker: Tracker
    place: Dist = dataclasses.field(default_factory=Dist)  # rank and world size (torchrun)
    memory_format: torch.memory_format | None = None  # channels_last for inputs, when used
    epoch: int = 0  # the last finished epoch (epochs count from 1)
    global_step: int = 0  # training batches so far, over every run resumed into this one
    best_score: float | None = None  # the monitored score (`monitor`, `monitor_mode`)
    best_epoch: int | None = None
    scores: dict[int, float] = dataclasses.field(default_factory=dict)  # monitored, by epoch
    stale_epochs: int = 0  # epochs since the best one, for early stopping
    throughput: Throughput | None = None  # the last epoch's
    warned_data_bound: bool = False
    skipped: SkippedSteps = dataclasses.field(default_factory=SkippedSteps)
    train_metrics: SegmentationMetrics | None = None  # counts over the epoch's batches
    # Per class (foreground, annotated) voxels of the epoch's batches, (2, C) int64 on the
    # device, added by train_step without a host sync when train_metrics is off (its counts
    # hold them otherwise: `epoch_sampled`); read once at the epoch's end.
    sampled: torch.Tensor | None = None
    debug_batches_left: int = 0  # batches `debug` still reports


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did: its epochs, losses and last validation."""

    first_epoch: int
    last_epoch: int
    losses: list[float]  # every training batch's loss, in order
    validation: list[dict[str, Any]]  # per epoch: loss and metrics (empty without validation)
    best_epoch: int | None
    best_score: float | None
    model: torch.nn.Module


def train(
    config: TrainConfig | str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    strict: bool = False,
) -> TrainResult:
    """Train from a config (a `TrainConfig`, or the path of a config file and KEY=VALUE
    overrides); resume as `load_model` says; return what was done. Under torchrun each rank
    runs this; rank 0 prints, logs and saves."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides, strict=strict)
    place = distributed.from_env()
    # The config's code runs where it was written; torch's determinism flags are the run's.
    with config_folder(config.config_path), deterministic_mode(config.deterministic):
        return distributed.report_failure(place)(run_epochs)(config, place)


def run_epochs(config: TrainConfig, place: Dist) -> TrainResult:
    """Set up, resume, then epochs of train -> validate -> log -> save."""
    say = print if place.is_main else _silent
    say(format_config(config))
    start = start_run(config, is_main=place.is_main)  # before any data is read
    for note in start.notes:
        say(note)
    seed_everything(config.random_seed)
    run = setup(config, place)
    first = resume(run, say=say, start=start) + 1
    loaded = None if start.resumed is None else str(start.resumed.path)
    record = record_run(run, loaded_from=loaded)
    if record is not None:
        say(f"run record (versions, commit, machine, config): {record}")
    if run.loaders.validate is None:
        say("no validation crops in the datasplit: training without validation")
    result = TrainResult(first, first - 1, [], [], None, None, unwrap(run.model))
    try:
        for epoch in range(first, first + config.epochs):
            result.losses += train_epoch(run, epoch)
            scores = validate(run, epoch)
            if scores is not None:
                result.validation.append(scores)
            stop = end_epoch(run, epoch, scores)
            losses = result.losses[-config.iterations_per_epoch :]
            skipped = run.skipped.in_epoch
            say(epoch_line(epoch, losses, scores, run.throughput, skipped_steps=skipped))
            if config.debug_memory:
                say(memory_line(run))
            warn_if_data_bound(run, say)
            result.last_epoch = epoch
            if stop:
                say(f"early stopping: no improvement for {run.stale_epochs} epochs")
                break
    finally:
        run.tracker.close()
    result.best_epoch, result.best_score = run.best_epoch, run.best_score
    del run  # the DDP wrapper and optimizer go before the process group (distributed.shutdown)
    distributed.shutdown(place)
    return result


def _silent(*_args: Any, **_kwargs: Any) -> None:
    """`print` on ranks other than 0."""


def epoch_line(
    epoch: int,
    losses: Sequence[float],
    scores: dict[str, Any] | None,
    throughput: Throughput | None = None,
    *,
    skipped_steps: int = 0,
) -> str:
    """The epoch's summary; the training loss is the mean over the batches whose loss was
    finite, and skipped optimizer steps are counted beside it."""
    finite = [loss for loss in losses if math.isfinite(loss)]
    mean = sum(finite) / len(finite) if finite else math.nan
    line = f"epoch {epoch}: training loss {mean:.4f}"
    if skipped_steps:
        line += f" ({skipped_steps} steps skipped: non-finite loss or gradients)"
    if scores is not None:
        mean_iou = scores["metrics"].get("iou", {}).get("mean")
        line += f", validation loss {scores['loss']:.4f}"
        line += "" if mean_iou is None else f", mean IoU {mean_iou:.3f}"
    if throughput is not None:
        line += (
            f"; {throughput.samples_per_s:.1f} samples/s, "
            f"{throughput.data_wait_fraction:.0%} waiting for data"
        )
    return line


def memory_line(run: Run) -> str:
    """`debug_memory`: this process's peak memory so far (MiB), logged as memory/* scalars."""
    import resource  # POSIX only; debug_memory is read nowhere else

    # ru_maxrss: KiB on Linux, bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    peaks = {"memory/host_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit}
    if run.device.type == "cuda":
        peaks["memory/gpu_allocated_peak_mib"] = torch.cuda.max_memory_allocated(run.device)
        peaks["memory/gpu_reserved_peak_mib"] = torch.cuda.max_memory_reserved(run.device)
    mib = {key: value / 2**20 for key, value in peaks.items()}
    run.tracker.log(mib, run.global_step)
    parts = (f"{key.removeprefix('memory/')} {value:.0f}" for key, value in mib.items())
    return "memory (MiB): " + ", ".join(parts)


def warn_if_data_bound(run: Run, say: Any) -> None:
    """Once per run: say so when training waited on data for much of an epoch, and which
    settings to change."""
    throughput = run.throughput
    if throughput is None or run.warned_data_bound:
        return
    if throughput.data_wait_fraction < DATA_BOUND_SHARE:
        return
    run.warned_data_bound = True
    config, loader = run.config, run.loaders.train
    cores = os.cpu_count() or 1
    say(
        f"warning: training waited for data {throughput.data_wait_fraction:.0%} of the epoch "
        f"(data-bound). Raise dataloader_kwargs num_workers (now {loader.num_workers}; "
        f"{cores} cores for {run.place.local_world_size} training process(es) here) or "
        f"chunk_cache_mb (now {config.chunk_cache_mb}), or use bigger crops per read",
        file=sys.stderr,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- Building the run ----------------------------------------------------------------------


def setup(config: TrainConfig, place: Dist | None = None) -> Run:
    """Check, then build, what a config asks for: device, model (a zero patch through it),
    optimizer, scheduler and loss arguments are checked before the datasplit is crawled or any
    data is read (`start_run` checked the folders before); then the datasplit, logging, data
    and the loss with its class weights. Under torchrun the model is wrapped in DDP and only
    rank 0 logs."""
    place = place or Dist()
    device = distributed.rank_device(place, choose_device(config.device))
    distributed.init(place, device)
    spec = PatchSpec.from_config(config)
    model = make_model(config, spec).to(device)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)  # a ValueError for a model without csc blocks
    output_shape = check_model_output(model, config, spec, device)
    memory_format = channels_last_format(config, device, spec)
    model = in_memory_format(model, memory_format)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer)
    check_plateau_mode(config, scheduler.scheduler)
    check_criterion(config.criterion, config.criterion_kwargs)
    # Every check passed: only now crawl (and write) the datasplit and read data.
    distributed.main_first(place, lambda: ensure_datasplit(config))
    if device.type == "cuda" and not config.deterministic:
        torch.backends.cudnn.benchmark = True  # patch shapes are fixed: pick the fastest convs
    ema = None
    if config.ema_decay is not None:
        average = get_ema_multi_avg_fn(config.ema_decay)
        ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    model = wrap_model(model, config, place, device)
    tracker = make_tracker(log_dir(config), enabled=place.is_main)
    tracker.log_text("config", "```\n" + format_config(config) + "\n```", 0)
    tracker.log_layout(board.scalar_layout(config.classes))
    say = print if place.is_main else _silent
    log_model_summary(unwrap(model), config, spec, tracker, output_shape=output_shape, say=say)
    crops = distributed.from_main(place, lambda: read_crops(config, spec=spec))  # read once
    loaders = build_loaders(  # its crops carry the foreground counts for pos_weight
        config,
        rank=place.rank,
        world_size=place.world_size,
        device_type=device.type,
        processes_per_machine=place.local_world_size,
        crops=crops,
        spec=spec,
    )
    loss_fn = make_loss(config, loaders, device)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "16-mixed")
    parts = (loaders, model, ema, loss_fn, optimizer, scheduler, scaler, tracker)
    run = Run(config, device, spec, *parts, place, memory_format)
    run.train_metrics = make_train_metrics(config)
    run.debug_batches_left = num_debug_batches(config)
    return run


def make_loss(config: TrainConfig, loaders: Loaders, device: torch.device) -> torch.nn.Module:
    """The config's `criterion` on `device`, with per-class `pos_weight` from the training
    crops' foreground when `weight_loss` is set."""
    pos_weight = None
    if config.weight_loss:
        pos_weight = class_pos_weight(config, loaders).to(device)
    loss = build_loss(
        config.criterion, criterion_kwargs=config.criterion_kwargs, pos_weight=pos_weight
    )
    return loss.to(device)


def log_model_summary(
    model: torch.nn.Module,
    config: TrainConfig,
    spec: PatchSpec,
    tracker: Tracker,
    *,
    output_shape: tuple[int, ...],
    say: Any,
) -> None:
    """The model summary (parameters per top-level module, the shapes of a patch in and out,
    as `check_model_output` found them): printed, and logged once as the ``model`` text."""
    input_shape = (1, 1, *spec.in_plane(spec.input.shape))
    text = board.model_summary(
        model, name=config.model_name, input_shape=input_shape, output_shape=output_shape
    )
    say(text)
    tracker.log_text("model", text, 0)


def check_model_output(
    model: torch.nn.Module, config: TrainConfig, spec: PatchSpec, device: torch.device
) -> tuple[int, ...]:
    """A zero input patch through the model (eval mode, no gradients), before any data is
    read: its output must have one channel per class and the target patch's shape, and, when
    it has the input's shape, the input's voxel size (csc's models predict on the input's
    grid). A `ValueError` names input_array_info and target_array_info otherwise. Returns the
    output's shape (1, C, *spatial)."""
    shape, target = spec.in_plane(spec.input.shape), spec.in_plane(spec.target.shape)
    output = zero_forward(model, (1, 1, *shape), device)
    inputs, targets = config.input_array_info, config.target_array_info
    keys = f"input_array_info {inputs.shape}, target_array_info {targets.shape}"
    num_classes = len(config.classes)
    if output.ndim != 2 + len(shape) or output.shape[1] != num_classes:
        raise ValueError(
            f"the model's output for a {(1, 1, *shape)} input patch ({keys}) has shape "
            f"{tuple(output.shape)}; it needs (1, {num_classes}, ...): one channel per class of "
            f"classes {list(config.classes)}"
        )
    same_as_input = {"shape": inputs.shape, "scale": inputs.scale}
    if tuple(output.shape[2:]) != target:
        raise ValueError(
            f"target_array_info shape {targets.shape} does not match the model's output, "
            f"{tuple(output.shape[2:])} voxels per class for input_array_info {inputs.shape}; "
            f"csc's models predict on the input's grid: set target_array_info = "
            f"{same_as_input} (or use a model whose output has the target's shape)"
        )
    if target == shape and spec.in_plane(spec.target.scale) != spec.in_plane(spec.input.scale):
        raise ValueError(
            f"target_array_info scale {targets.scale} differs from input_array_info scale "
            f"{inputs.scale}, but the model's output "
            "has the input's shape, so it predicts on the input's grid: the target would cover "
            f"another field of view. Set target_array_info = {same_as_input}"
        )
    return tuple(output.shape)


def zero_forward(
    model: torch.nn.Module, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The model's output for zeros of `shape` (B, C, *spatial); a model that cannot take
    them is a `ValueError` naming input_array_info."""
    training = model.training
    model.eval()  # no batch statistics from a batch of 1 and no dropout: nothing changes
    try:
        with torch.no_grad():
            output = model(torch.zeros(shape, device=device))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"the model fails on a zero input patch of shape {shape} (input_array_info): {first}"
        ) from None
    finally:
        model.train(training)
    if not isinstance(output, torch.Tensor):
        kind = type(output).__name__
        raise ValueError(f"the model must return one tensor (B, C, *spatial), got a {kind}")
    return output


def class_pos_weight(config: TrainConfig, loaders: Loaders) -> torch.Tensor:
    """Per class (background / foreground) volume over the training crops that annotate it."""
    dataset = loaders.train.dataset
    assert isinstance(dataset, TrainPatches), "the training loader samples TrainPatches"
    crops = dataset.crops
    foreground, total = np.zeros(len(config.classes)), np.zeros(len(config.classes))
    for crop in crops:
        for k, label in enumerate(crop.labels):
            if label is not None and label.foreground is not None:
                foreground[k] += label.foreground * math.prod(label.level.scale)  # nm^3
                total[k] += crop.volume
    return pos_weight_from_counts(foreground.tolist(), total.tolist())


def resume(run: Run, *, say: Any = print, start: RunStart | None = None) -> int:
    """Load what `load_model` asks for (as `start_run` read it, else read now); the last
    finished epoch (0: start at epoch 1). Another `model_to_load` than `model_name` is a
    fine-tune: its weights, from epoch 1. The tracker hides what an interrupted run logged
    after the resumed step."""
    config = run.config
    resumed = load_for_resume(config) if start is None else start.resumed
    if resumed is None:
        return 0
    state = resumed.train_state
    if not resumes_own_run(config, resumed):  # a fine-tune: another run's weights, epoch 1 on
        load_weights(run.model, resumed.model_state, source=str(resumed.path))
        of_epoch = f" (epoch {resumed.epoch})" if resumed.epoch else ""
        say(f"loaded weights from {resumed.path}{of_epoch}; training starts at epoch 1")
        return 0
    if state is None:  # weights only (the existing toolkit's, or a hand-saved file)
        load_weights(run.model, resumed.model_state, source=str(resumed.path))
        run.epoch, run.global_step = resumed.epoch, resumed.epoch * config.iterations_per_epoch
        run.tracker.restart_at(run.global_step + 1)
        say(
            f"loaded weights from {resumed.path} (epoch {resumed.epoch}; no training state "
            "beside it: optimizer, scheduler and random state start afresh)"
        )
        return resumed.epoch
    # The model file holds the trained weights, unless it holds the EMA's: then the state does.
    load_weights(run.model, state.get("model") or resumed.model_state, source=str(resumed.path))
    load_optimizer_state(run, state, source=resumed.path)
    tracking = resumed_tracking(state, config, log_dir=log_dir(config), last_epoch=resumed.epoch)
    run.scheduler.load_state_dict(
        saved_schedule(run, state, monitor_changed=tracking.note is not None)
    )
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None and state.get("ema") is not None:
        run.ema.load_state_dict(state["ema"])
    run.epoch, run.global_step = resumed.epoch, int(state["global_step"])
    run.best_score, run.best_epoch = tracking.best_score, tracking.best_epoch
    run.stale_epochs, run.scores = tracking.stale_epochs, tracking.scores
    if tracking.note is not None:  # another monitor: `best` follows the new best epoch
        say(tracking.note)
        if run.place.is_main:
            repair_best(config.model_save_path, config.model_name, best_epoch=run.best_epoch)
    set_rng_state(state["rng"])
    run.tracker.restart_at(run.global_step + 1)  # the killed run's later steps are redone
    say(f"resumed from {resumed.path}: epoch {resumed.epoch}, step {run.global_step}")
    return resumed.epoch


def saved_schedule(
    run: Run, state: Mapping[str, Any], *, monitor_changed: bool
) -> Mapping[str, Any] | None:
    """The saved `Schedule` state to load (None: saved without a scheduler). A plateau
    scheduler that counted another monitor's score starts afresh; the learning rate it lowered
    stays, in the optimizer's state."""
    saved = state.get("scheduler")
    if not monitor_changed or not isinstance(run.scheduler.scheduler, ReduceLROnPlateau):
        return saved
    if saved is None or "num_steps" not in saved:  # no state, or the plateau's own (older run)
        return None
    return {**saved, "scheduler": None}


def load_optimizer_state(run: Run, state: Mapping[str, Any], *, source: os.PathLike[str]) -> None:
    """Load a saved optimizer state, fitted to this run's parameter groups (a state saved
    with other groups, e.g. before the weight decay groups, `csc.optim.fit_saved_state`);
    one saved by another kind of optimizer (its settings and this optimizer's each have names
    the other lacks, e.g. RAdam's betas and SGD's momentum) is a ValueError naming the file,
    instead of a KeyError at the first step."""
    optimizer, config, saved = run.optimizer, run.config, state["optimizer"]
    groups = saved.get("param_groups") or [{}]
    stored, current = set(groups[0]) - {"params"}, set(optimizer.param_groups[0]) - {"params"}
    if stored and stored - current and current - stored:
        raise ValueError(
            f"the training state in {source} was saved by another optimizer (settings "
            f"{', '.join(sorted(stored - current))}) than this config's "
            f"{type(optimizer).__name__}: resume with the optimizer it was trained with, or "
            f"start from its weights with a new run (model_name='NEW_NAME' "
            f"model_to_load={config.model_name!r})"
        )
    names = state.get("optimizer_parameters")
    try:
        fitted = fit_saved_state(saved, optimizer, unwrap(run.model), saved_names=names)
    except ValueError as error:
        raise ValueError(
            f"the training state in {source} cannot resume this run: {error}; start from its "
            f"weights with a new run (model_name='NEW_NAME' model_to_load={config.model_name!r})"
        ) from None
    optimizer.load_state_dict(fitted)


# --- The loop ------------------------------------------------------------------------------


def train_epoch(run: Run, epoch: int) -> list[float]:
    """One epoch: exactly `iterations_per_epoch` batches. Logs `loss` every
    `log_every_n_steps` batches, validates every `validate_every_n_steps` optimizer steps,
    and at the end logs throughput, sampling shares, the steps skipped for a non-finite loss
    and the training metrics."""
    config, model = run.config, run.model
    model.train()
    run.skipped.in_epoch = 0
    if run.train_metrics is not None:
        run.train_metrics.reset()
    num_steps = 0  # optimizer steps in this epoch
    run.loaders.sampler.set_epoch(epoch)  # the epoch's patches: a function of (seed, epoch)
    losses: list[float] = []
    run.sampled = torch.zeros(2, len(config.classes), dtype=torch.int64, device=run.device)
    waited, started = 0.0, time.perf_counter()
    bar = tqdm(
        total=config.iterations_per_epoch,
        desc=f"epoch {epoch}",
        unit="batch",
        leave=False,
        disable=None if run.place.is_main else True,
    )
    batches = batches_of(run.loaders.train)  # read ahead in a thread without workers
    try:
        for index in range(config.iterations_per_epoch):
            before = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - before
            waited += wait
            debug = start_debug(run, wait)
            if index == 0:  # the epoch's first batch, as the model sees it (after augmentation)
                log_train_images(run, batch)
            step_now = (index + 1) % config.gradient_accumulation_steps == 0
            step_now |= index + 1 == config.iterations_per_epoch
            loss = train_step(run, batch, step_now=step_now, debug=debug)
            losses.append(loss)
            run.global_step += 1
            log_step(run, {"loss": loss})
            if debug is not None and run.place.is_main:
                debug.lap("step")
                tqdm.write(debug.report(run.global_step, loss))
            num_steps += step_now
            if step_now and validation_due(config, epoch, num_steps):
                started += validate_mid_epoch(run, epoch)  # not training time: out of samples/s
            update_bar(bar, loss=loss, samples=(index + 1) * config.batch_size, started=started)
    finally:
        close_batches(batches)  # the batch read ahead is not needed
    bar.close()
    run.throughput = epoch_throughput(run, time.perf_counter() - started, waited)
    log_epoch_counts(run)
    log_train_metrics(run)
    return losses


def start_debug(run: Run, waited_s: float) -> BatchDebug | None:
    """`debug`: a report for each of the first batches of this call of train, else None."""
    if run.debug_batches_left <= 0:
        return None
    run.debug_batches_left -= 1
    return BatchDebug(run.device, waited_s=waited_s)


def update_bar(bar: tqdm, *, loss: float, samples: int, started: float) -> None:
    """One more batch on the progress bar; its loss and samples/s are redrawn with the bar,
    at most every `mininterval` (0.1 s), not at each batch."""
    if not bar.disable:
        rate = samples / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.1f}", refresh=False)
    bar.update()


def sampled_counts(target: torch.Tensor) -> torch.Tensor:
    """Per class (2, C) int64: the batch's foreground voxels and its annotated (finite)
    voxels; on the target's device, without a host sync."""
    masks = torch.stack([target == 1, target.isfinite()])  # (2, B, C, *spatial)
    return count_true(masks, axes=[1, *range(3, masks.ndim)])  # every axis but the class


def epoch_sampled(run: Run) -> torch.Tensor:
    """Per class (2, C): the foreground and the annotated voxels of the epoch's batches. The
    training metrics counted them already (targets are 1, 0 or NaN: foreground tp + fn,
    annotated tp + fp + fn + tn); `train_step` counts them itself only without."""
    if run.train_metrics is None:
        assert run.sampled is not None, "counted by train_step"
        return run.sampled
    counts = dict(zip(COUNT_NAMES, run.train_metrics.counts, strict=False))
    annotated = counts["tp"] + counts["fp"] + counts["fn"] + counts["tn"]
    return torch.stack([counts["tp"] + counts["fn"], annotated])


def log_epoch_counts(run: Run) -> None:
    """The epoch's throughput, skipped steps and per class the share of sampled annotated
    voxels that are foreground (summed over ranks; one host copy)."""
    assert run.throughput is not None, "logged after epoch_throughput"
    sampled = distributed.reduce_sum(run.place, epoch_sampled(run)).double()
    shares = (sampled[0] / sampled[1].clamp(min=1)).tolist()
    classes = run.config.classes
    run.tracker.log(
        {
            "perf/samples_per_s": run.throughput.samples_per_s,
            "perf/data_wait_fraction": run.throughput.data_wait_fraction,
            "skipped_steps": run.skipped.in_epoch,
            **{f"sampling/{name}": s for name, s in zip(classes, shares, strict=True)},
        },
        run.global_step,
    )


def log_train_images(run: Run, batch: Mapping[str, torch.Tensor]) -> None:
    """The first `tensorboard_images` patches of a training batch (after augmentation and
    value transforms): ``train_images/{class}``, panels raw | truth."""
    count = min(run.config.tensorboard_images, len(batch["input"]))
    if count == 0 or not run.place.is_main:
        return
    examples = [board.example_of(batch["input"][i], batch["output"][i]) for i in range(count)]
    images = board.example_images(run.config.classes, examples, prefix="train_images")
    run.tracker.log_images(images, run.global_step + 1)  # the step of the batch's loss


def validate_mid_epoch(run: Run, epoch: int) -> float:
    """A validation inside the epoch (`validate_every_n_steps`), logged at the current step as
    the epoch's own are and printed; it never decides the best epoch (docs/training.md).
    Returns the seconds it took."""
    started = time.perf_counter()
    scores = validate(run, epoch)
    if scores is not None and run.place.is_main:
        tqdm.write(validation_line(epoch, run.global_step, scores))
    return time.perf_counter() - started


def epoch_throughput(run: Run, seconds: float, waited: float) -> Throughput:
    """Samples/s of all ranks together (the slowest rank's time) and the mean waiting share."""
    place, config = run.place, run.config
    slowest = distributed.reduce_max(place, seconds)
    waiting = distributed.reduce_sum(place, torch.tensor([waited / seconds], dtype=torch.float64))
    samples = config.iterations_per_epoch * config.batch_size * place.world_size
    return Throughput(samples / slowest, float(waiting) / place.world_size)


def train_step(
    run: Run,
    batch: Mapping[str, torch.Tensor],
    *,
    step_now: bool,
    debug: BatchDebug | None = None,
) -> float:
    """Forward and backward of one batch; an optimizer step every
    `gradient_accumulation_steps` batches (and at the end of the epoch), skipped when a loss
    since the last step or the gradients are not finite (`skip_step`). Returns the loss.
    `debug` times the phases and keeps the tensors."""
    if not run.skipped.buffers:  # after resume: the buffers a skipped step goes back to
        run.skipped.buffers = [buffer.detach().clone() for buffer in run.model.buffers()]
    inputs, target = to_device(run, batch)
    if run.sampled is not None and run.train_metrics is None:  # else: `epoch_sampled`
        run.sampled += sampled_counts(target)
    if debug is not None:
        debug.lap("to device")
    loss = forward(run, inputs, target, debug)
    run.scaler.scale(loss / run.config.gradient_accumulation_steps).backward()
    if debug is not None:
        debug.lap("backward")
    if not step_now:
        value = float(loss.detach())  # the batch's one host sync
        run.skipped.pending |= not math.isfinite(value)
        return value
    value, finite = checked_loss(run, loss.detach())
    if finite:
        optimizer_step(run)
    else:
        skip_step(run)
    return value


def forward(
    run: Run, inputs: torch.Tensor, target: torch.Tensor, debug: BatchDebug | None
) -> torch.Tensor:
    """The batch's loss; its counts added to the training metrics on the device (no host
    sync)."""
    with autocast(run.device, run.config.precision):
        logits = run.model(inputs).float()
        loss = run.loss_fn(logits, target)
    if debug is not None:
        debug.lap("forward")
        debug.keep(input=inputs, target=target, logits=logits)
    if run.train_metrics is not None:
        run.train_metrics.update(logits.detach(), target)
        if debug is not None:
            debug.lap("metrics")
    return loss


def checked_loss(run: Run, loss: torch.Tensor) -> tuple[float, bool]:
    """The batch's loss, and whether the update may go ahead on every rank: every loss since
    the last step finite and, without fp16's gradient scaler (which checks its own), the
    gradient norm (clipped to `max_grad_norm` here) too. One host sync, as reading the loss
    alone would be; under torchrun the verdict is summed over ranks so all skip together."""
    bad = (~loss.isfinite()).float() + float(run.skipped.pending)
    if not run.scaler.is_enabled():
        bad = bad + (~gradient_norm(run).isfinite()).float()
    bad = distributed.reduce_sum(run.place, bad)
    value, num_bad = torch.stack([loss.float(), bad]).tolist()
    return value, num_bad == 0


def gradient_norm(run: Run) -> torch.Tensor:
    """The total gradient norm, after clipping the gradients to `max_grad_norm` when set; on
    the device, without a host sync."""
    parameters = [p for p in run.model.parameters() if p.grad is not None]
    if not parameters:
        return torch.zeros((), device=run.device)
    if run.config.max_grad_norm is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, run.config.max_grad_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def optimizer_step(run: Run) -> None:
    """The update (under fp16 through the gradient scaler, which skips a step with inf
    gradients and lowers its scale), the EMA and a per-step scheduler; the buffers it left are
    remembered for `skip_step`."""
    if run.scaler.is_enabled() and run.config.max_grad_norm is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(unwrap(run.model))
    run.scheduler.after_optimizer_step()  # warm-up, or a per-step scheduler
    copy_tensors(run.skipped.buffers, list(run.model.buffers()))
    run.skipped.in_a_row = 0


def copy_tensors(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """`targets[i].copy_(sources[i])` for all i, in one fused call (a model's few hundred
    buffers: no per-tensor kernel launches each step)."""
    if targets:
        torch._foreach_copy_(targets, sources)


def skip_step(run: Run) -> None:
    """No update: the accumulated gradients are dropped and the buffers (BatchNorm running
    statistics, which a non-finite forward spoils) put back as the last update left them.
    Counted and logged (`skipped_steps`); `max_nonfinite_steps` in a row stop the run."""
    skipped, config = run.skipped, run.config
    run.optimizer.zero_grad(set_to_none=True)
    copy_tensors(list(run.model.buffers()), skipped.buffers)
    skipped.pending = False
    skipped.in_epoch += 1
    skipped.in_a_row += 1
    step, epoch = run.global_step + 1, run.epoch + 1
    run.tracker.log({"skipped_steps": skipped.in_epoch}, step)
    if skipped.in_epoch == 1 and run.place.is_main:
        message = (
            f"warning: epoch {epoch}, batch {step}: non-finite loss or gradients; the update "
            "was skipped (counted in the epoch line and TensorBoard's skipped_steps)"
        )
        print(message, file=sys.stderr, flush=True)
    if skipped.in_a_row >= config.max_nonfinite_steps:
        raise NonFiniteTrainingError(
            f"training stopped in epoch {epoch} at batch {step}: {skipped.in_a_row} optimizer "
            f"steps in a row had a non-finite loss or gradients (max_nonfinite_steps = "
            f"{config.max_nonfinite_steps}). Likely causes: learning_rate {config.learning_rate:g} "
            "too high, NaN or inf values in the raw data or made by a value transform, or "
            "float16 overflow under precision '16-mixed'. The model was left at its last finite "
            "update; checkpoints of finished epochs are kept"
        )


def to_device(run: Run, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and target on the run's device: asynchronous copies from pinned memory; the input
    in channels_last when the model is."""
    inputs = batch["input"].to(run.device, non_blocking=True)
    if run.memory_format is not None:
        inputs = inputs.contiguous(memory_format=run.memory_format)
    return inputs, batch["output"].to(run.device, non_blocking=True)


def validate(run: Run, epoch: int) -> dict[str, Any] | None:
    """Mean loss and metrics over the validation tiles (EMA weights when `ema_decay` is set),
    limited by `validation_time_limit` (at least one batch) or the batch limit set in the
    data; None without validation crops. Under torchrun each rank validates its share of the
    tiles and the loss and metric counts are summed over ranks."""
    loader, config = run.loaders.validate, run.config
    if loader is None:
        return None
    model = run.ema.module if run.ema is not None else unwrap(run.model, keep_compiled=True)
    distributed.broadcast_buffers(run.place, model)  # every rank validates rank 0's model
    model.eval()
    metrics = SegmentationMetrics(config.classes)
    total, count = 0.0, 0
    examples = board.Spread[board.Example](config.tensorboard_images)  # spread over the tiles
    started = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            inputs, target = to_device(run, batch)
            with autocast(run.device, run.config.precision):
                logits = model(inputs).float()
            total += float(run.loss_fn(logits, target)) * len(inputs)
            count += len(inputs)
            metrics.update(logits, target)
            for i in range(len(inputs)):
                if examples.take():
                    examples.keep(board.example_of(inputs[i], target[i], logits[i].sigmoid()))
            limit = config.validation_time_limit
            if limit is not None and time.perf_counter() - started >= limit:
                break
    run.model.train()
    sums = distributed.reduce_sum(run.place, torch.tensor([total, count], dtype=torch.float64))
    metrics.counts = distributed.reduce_sum(run.place, metrics.counts)
    scores = {
        "epoch": epoch,
        "loss": float(sums[0] / sums[1].clamp(min=1)),
        "metrics": metrics.compute(),
    }
    log_validation(run, scores, [example for _, example in examples.chosen()])
    return scores


def log_validation(run: Run, scores: dict[str, Any], examples: Sequence[board.Example]) -> None:
    """TensorBoard: `validation`, `metrics/{name}/{class}` and per class ``images/{class}``:
    a row of labelled panels raw | truth | prediction per example (middle slice of a 3D
    patch), the examples spread over the tiles validated (`board.Spread`)."""
    values = {"validation": scores["loss"]}
    for name, per_class in scores["metrics"].items():
        if isinstance(per_class, Mapping):
            values |= {f"metrics/{name}/{c}": v for c, v in per_class.items() if v is not None}
    run.tracker.log(values, run.global_step)
    if examples:
        images = board.example_images(run.config.classes, examples)
        run.tracker.log_images(images, run.global_step)


def end_epoch(run: Run, epoch: int, scores: dict[str, Any] | None) -> bool:
    """Log the epoch, step epoch schedulers, save checkpoints; True to stop early."""
    config = run.config
    run.epoch = epoch
    score = None if scores is None else monitored_score(scores, config.monitor)
    improved = score is not None and update_best(run, epoch, score)
    run.scheduler.end_epoch(score)  # a per-epoch scheduler; ReduceLROnPlateau on the score
    run.tracker.log({EPOCH_TAG: epoch, "lr": run.optimizer.param_groups[0]["lr"]}, run.global_step)
    if run.best_score is not None:
        best = {BEST_TAG.format(monitor=config.monitor): run.best_score}
        run.tracker.log(best, run.global_step)
    if run.place.is_main:  # every rank holds the same weights: one writer
        save(run, epoch, improved=improved)
    patience = config.early_stopping_patience
    return patience is not None and run.stale_epochs >= patience


def update_best(run: Run, epoch: int, score: float) -> bool:
    """Whether the monitored `score` is the best so far, recorded as such; else one more epoch
    without improvement. A non-finite score is never the best (nor is a non-finite best kept,
    e.g. from a run before this check)."""
    run.scores[epoch] = score
    improved = is_better(score, run.best_score, mode=monitor_mode(run.config))
    if improved:
        run.best_score, run.best_epoch, run.stale_epochs = score, epoch, 0
        return True
    run.stale_epochs += 1
    if not math.isfinite(score) and run.place.is_main:
        kept = "none yet" if run.best_epoch is None else f"epoch {run.best_epoch}"
        what = "validation loss" if run.config.monitor == "loss" else run.config.monitor
        message = f"warning: epoch {epoch}: {what} {score} is not finite; best stays {kept}"
        print(message, file=sys.stderr, flush=True)
    return False


def save(run: Run, epoch: int, *, improved: bool) -> None:
    """The epoch's checkpoint (weights used for validation) and training state; ``best``
    linked to it when the monitored score improved; training states kept only for the last
    two epochs and the best; older checkpoints pruned by `keep_last_checkpoints` and
    `save_top_k` (never the best)."""
    config = run.config
    weights = unwrap(run.ema.module if run.ema is not None else run.model).state_dict()
    state = {
        # The model file holds the trained weights unless they are the EMA's: not stored twice.
        "model": None if run.ema is None else unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": to_safe(run.scheduler.state_dict()),
        # Each optimizer state entry's parameter, by name: a resume with other groups finds it.
        "optimizer_parameters": parameter_names(run.optimizer, unwrap(run.model)),
        "scaler": run.scaler.state_dict(),
        "ema": None if run.ema is None else run.ema.state_dict(),
        "epoch": epoch,
        "global_step": run.global_step,
        "rng": rng_state(),
        "monitor": config.monitor,  # what best_score and scores are: resume checks it
        "monitor_mode": monitor_mode(config),
        "score": run.scores.get(epoch),  # this epoch's monitored score (None: no validation)
        "scores": dict(run.scores),  # every epoch's so far: save_top_k ranks by them
        "best_score": run.best_score,
        "best_epoch": run.best_epoch,
        "stale_epochs": run.stale_epochs,
        "config": to_safe(config),
    }
    template, name = config.model_save_path, config.model_name
    arguments = model_arguments(config, run.spec)  # stored with the weights: `load_model`
    save_checkpoint(
        weights, state, template=template, model_name=name, epoch=epoch, model_arguments=arguments
    )
    if improved:  # a kill before this line leaves `best` behind: `start_run` repairs it
        link_best(template=template, model_name=name, epoch=epoch)
    drop_old_states(template, name, best_epoch=run.best_epoch)
    prune_by_score(
        template,
        name,
        keep_last=config.keep_last_checkpoints,
        top_k=config.save_top_k,
        scores=run.scores,
        mode=monitor_mode(config),
        best_epoch=run.best_epoch,
    )
