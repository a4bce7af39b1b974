"""What the training loop records besides its losses (docs/training.md): metrics over the
training batches (`train/{metric}/{class}`), the per-batch scalars every `log_every_n_steps`,
when to validate mid-epoch (`validate_every_n_steps`), the run record at start, and the
`debug` report of the first batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from csc import distributed
from csc.checkpoints import record_json, save_run_record
from csc.config import TrainConfig
from csc.metrics import SegmentationMetrics
from csc.reproducibility import record_markdown, run_record

if TYPE_CHECKING:
    from csc.training import Run

TRAIN_PREFIX = "train"  # training-side metrics: train/{metric}/{class}, beside metrics/...
RECORD_TAG = "run_record"  # TensorBoard text: the run record of each start
DEBUG_BATCHES = 3  # the batches `debug = True` reports


# --- Training-side metrics -----------------------------------------------------------------


def make_train_metrics(config: TrainConfig) -> SegmentationMetrics | None:
    """Counts over the training batches (the validation's metrics but boundary F1, whose
    boundaries are three quarters of the counts' cost), or None when `train_metrics` is off."""
    if not config.train_metrics:
        return None
    return SegmentationMetrics(config.classes, boundary_tolerance=None)


def log_train_metrics(run: Run) -> dict[str, Any] | None:
    """The epoch's training metrics, from counts summed over ranks (one collective, one host
    copy per epoch), logged as ``train/{metric}/{class}`` and ``train/{metric}/mean``."""
    metrics = run.train_metrics
    if metrics is None:
        return None
    metrics.counts = distributed.reduce_sum(run.place, metrics.counts)
    scores = metrics.compute()
    run.tracker.log(metric_scalars(TRAIN_PREFIX, scores), run.global_step)
    return scores


def metric_scalars(prefix: str, scores: Mapping[str, Any]) -> dict[str, float]:
    """``{prefix}/{metric}/{class}: value`` for every metric and class (and ``mean``) that has
    a value; counts such as ``num_scored`` are left out."""
    values: dict[str, float] = {}
    for name, per_class in scores.items():
        if isinstance(per_class, Mapping):
            values |= {f"{prefix}/{name}/{c}": v for c, v in per_class.items() if v is not None}
    return values


# --- Cadences ------------------------------------------------------------------------------


def log_step(run: Run, scalars: Mapping[str, float]) -> None:
    """Per-batch scalars at the run's step, when it is a multiple of `log_every_n_steps`
    (steps count training batches from 1, over resumes)."""
    if run.global_step % run.config.log_every_n_steps == 0:
        run.tracker.log(scalars, run.global_step)


def optimizer_steps_per_epoch(config: TrainConfig) -> int:
    """Every `gradient_accumulation_steps` batches, and the epoch's last batch, step."""
    return math.ceil(config.iterations_per_epoch / config.gradient_accumulation_steps)


def validation_due(config: TrainConfig, epoch: int, steps_in_epoch: int) -> bool:
    """Whether a mid-epoch validation follows the `steps_in_epoch`-th optimizer step of
    `epoch`: every `validate_every_n_steps` optimizer steps of the run (counted from its first
    epoch, so the same steps after a resume), but not after the epoch's last step, which the
    epoch's own validation follows."""
    every = config.validate_every_n_steps
    per_epoch = optimizer_steps_per_epoch(config)
    if every is None or steps_in_epoch >= per_epoch:
        return False
    return ((epoch - 1) * per_epoch + steps_in_epoch) % every == 0


def validation_line(epoch: int, step: int, scores: Mapping[str, Any]) -> str:
    """A mid-epoch validation's summary."""
    mean_iou = scores["metrics"].get("iou", {}).get("mean")
    line = f"epoch {epoch}, step {step}: validation loss {scores['loss']:.4f}"
    return line if mean_iou is None else line + f", mean IoU {mean_iou:.3f}"


# --- The run record ------------------------------------------------------------------------


def record_run(run: Run, *, loaded_from: str | None = None) -> Path | None:
    """Rank 0: the run record of this start (`csc.reproducibility.run_record`) as JSON beside
    the checkpoints and as TensorBoard text (`RECORD_TAG`) at the step it starts from; its
    path. Other ranks write nothing."""
    if not run.place.is_main:
        return None
    config = run.config
    record = run_record(
        config,
        device=run.device,
        world_size=run.place.world_size,
        resumed_epoch=run.epoch,
        global_step=run.global_step,
        loaded_from=loaded_from,
    )
    path = save_run_record(record, template=config.model_save_path, model_name=config.model_name)
    run.tracker.log_text(RECORD_TAG, record_markdown(record, record_json(record)), run.global_step)
    return path


# --- debug ---------------------------------------------------------------------------------


def num_debug_batches(config: TrainConfig) -> int:
    """How many first batches of each run `debug` reports: 3 for True, 0 for False."""
    debug = config.debug
    return DEBUG_BATCHES if debug is True else int(debug)


class BatchDebug:
    """One batch under `debug`: seconds per phase (`lap`) and its tensors (`keep`). A lap
    waits for the device first, so GPU work is timed where it runs, not where it is queued."""

    def __init__(self, device: torch.device, *, waited_s: float) -> None:
        self.device = device
        self.laps: dict[str, float] = {"data wait": waited_s}
        self.tensors: dict[str, torch.Tensor] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now

    def keep(self, **tensors: torch.Tensor) -> None:
        self.tensors |= {name: tensor.detach() for name, tensor in tensors.items()}

    def report(self, step: int, loss: float) -> str:
        """Timings (ms), then per tensor its shape, dtype, device and finite value range."""
        laps = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in self.laps.items())
        lines = [f"debug: step {step}: loss {loss:.4f}; {laps}"]
        lines += [f"  {name:<6} {describe(t)}" for name, t in self.tensors.items()]
        return "\n".join(lines)


def describe(tensor: torch.Tensor) -> str:
    """Shape, dtype, device, min/mean/max over the finite values and the share that is NaN
    (a target's unannotated voxels)."""
    values = tensor.detach().float()
    finite = values[values.isfinite()]
    text = f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} {tensor.device}"
    if finite.numel():
        low, mean, high = finite.min().item(), finite.mean().item(), finite.max().item()
        text += f" min {low:.4g} mean {mean:.4g} max {high:.4g}"
    nan = values.isnan().float().mean().item() if values.numel() else 0.0
    return text + f", NaN {nan:.1%}"
