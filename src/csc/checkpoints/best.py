"""What "best" means: the monitored score (`monitor`, `monitor_mode` in the config) of a
validation, comparing two scores, ranking epochs for ``save_top_k``, and the score's history
read back from the TensorBoard logs (see docs/training.md, "Choosing what best means").

The score of an epoch is the mean validation loss (``monitor = "loss"``), or a metric of
`csc.metrics.SegmentationMetrics` as the mean over classes (``"iou"``) or of one class
(``"iou/nuc"``). A metric that scored nothing (None) counts as NaN: never the best.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from csc.config import MONITOR_LOSS, TrainConfig, monitor_mode, monitor_parts
from csc.tracking import VALIDATION_TAG, validation_by_epoch

BEST_TAG = "best/{monitor}"  # TensorBoard: the best monitored score so far, once per epoch


def monitor_tag(monitor: str) -> str:
    """The TensorBoard scalar the training loop logs the monitored score under:
    ``validation`` for the loss, ``metrics/{metric}/{class}`` (class ``mean``) for a metric."""
    if monitor == MONITOR_LOSS:
        return VALIDATION_TAG
    metric, name = monitor_parts(monitor)
    return f"metrics/{metric}/{name}"


def monitored_score(scores: Mapping[str, Any], monitor: str) -> float:
    """The monitored score of one validation (``{"loss": x, "metrics": {...}}``, what
    `csc.training.validate` returns); NaN for a metric that scored nothing. Rounded to
    float32, as TensorBoard stores it: the ``best`` link, kept as the run goes, and the best
    epoch read back from the logs (``load_model="best"``, a resume with a changed monitor)
    then agree, also on ties."""
    if monitor == MONITOR_LOSS:
        value = scores["loss"]
    else:
        metric, name = monitor_parts(monitor)
        value = scores["metrics"].get(metric, {}).get(name)
    return math.nan if value is None else float(np.float32(value))


def is_better(score: float, best: float | None, *, mode: str) -> bool:
    """Whether `score` beats `best` (None: nothing yet) in `mode` ("min" or "max"). A
    non-finite score never does; a non-finite best always loses (a run from before this
    check may have kept one)."""
    if not math.isfinite(score):
        return False
    if best is None or not math.isfinite(best):
        return True
    return score < best if mode == "min" else score > best


def ranked_epochs(
    scores: Mapping[int, float | None], epochs: Iterable[int], *, mode: str
) -> list[int]:
    """`epochs` from best to worst by their monitored score: ties go to the earlier epoch
    (as the best is kept); epochs without a finite score (no validation) come last, the
    newest of them first."""

    def key(epoch: int) -> tuple[int, float, int]:
        value = scores.get(epoch)
        if value is None or not math.isfinite(value):
            return (1, 0.0, -epoch)
        return (0, value if mode == "min" else -value, epoch)

    return sorted(epochs, key=key)


def best_of(scores: Mapping[int, float | None], *, mode: str) -> int | None:
    """The epoch with the best finite score; None when none has one."""
    ranked = ranked_epochs(scores, scores, mode=mode)
    first = scores.get(ranked[0]) if ranked else None
    return ranked[0] if first is not None and math.isfinite(first) else None


def scores_from_logs(log_dir: str | Path, monitor: str, *, last_epoch: int) -> dict[int, float]:
    """The monitored score of epochs 1..`last_epoch` as the run's TensorBoard logs hold it
    (empty without logs): for a resume whose checkpoint tracked another monitor."""
    by_epoch = validation_by_epoch(log_dir, tag=monitor_tag(monitor))
    return {epoch: value for epoch, value in by_epoch.items() if epoch <= last_epoch}


@dataclasses.dataclass
class Tracking:
    """What a resumed run knows of its monitored scores: the best, the epochs since it (early
    stopping) and every finished epoch's score (save_top_k); `note` says what changed."""

    best_score: float | None = None
    best_epoch: int | None = None
    stale_epochs: int = 0
    scores: dict[int, float] = dataclasses.field(default_factory=dict)
    note: str | None = None  # a warning, when the checkpoint tracked another monitor


def saved_monitor(state: Mapping[str, Any]) -> tuple[str, str]:
    """(monitor, mode) a training state's best score follows; a state from before `monitor`
    followed the validation loss, its way as its config's `low_is_best` said."""
    if "monitor" in state:
        return str(state["monitor"]), str(state["monitor_mode"])
    low_is_best = (state.get("config") or {}).get("low_is_best", True)
    return MONITOR_LOSS, "min" if low_is_best else "max"


def resumed_tracking(
    state: Mapping[str, Any], config: TrainConfig, *, log_dir: str | Path, last_epoch: int
) -> Tracking:
    """The tracking a resume of `state` (a training state of epoch `last_epoch`) goes on with.
    The same monitor and mode: the state's (the scores of an older state without them from
    the logs in `log_dir`). Another one: a `note`, and best epoch, early-stopping count and
    scores start again from the new monitor's scores in the logs (none there: from scratch)."""
    saved, mode = saved_monitor(state), monitor_mode(config)
    if saved == (config.monitor, mode):
        scores = dict(state.get("scores") or {})
        if not scores:  # read only when needed: the logs hold every batch's loss too
            scores = scores_from_logs(log_dir, config.monitor, last_epoch=last_epoch)
        stale = int(state.get("stale_epochs", 0))
        return Tracking(state.get("best_score"), state.get("best_epoch"), stale, scores)
    logged = scores_from_logs(log_dir, config.monitor, last_epoch=last_epoch)
    best = best_of(logged, mode=mode)
    found = "no logged scores of it: best tracking starts afresh"
    if best is not None:
        found = f"from the logged scores of epochs 1-{last_epoch}, epoch {best} "
        found += f"({logged[best]:.4g}) is the best and `best` points at it"
    note = (
        f"warning: the checkpoint tracked monitor {saved[0]!r} ({saved[1]}) as best; this run "
        f"monitors {config.monitor!r} ({mode}): {found}"
    )
    if best is None:
        return Tracking(scores=logged, note=note)
    return Tracking(logged[best], best, last_epoch - best, logged, note)
