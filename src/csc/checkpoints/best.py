"""What "best" means: the monitored score (`monitor`, `monitor_mode` in the config) of a
validation, comparing two scores, ranking epochs for ``save_top_k``, and the score's history
read back from the TensorBoard logs (see docs/training.md, "Choosing what best means").

The score of an epoch is the mean validation loss (``monitor = "loss"``), or a metric of
`csc.metrics.SegmentationMetrics` as the mean over classes (``"iou"``) or of one class
(``"iou/nuc"``). A metric that scored nothing (None) counts as NaN: never the best.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from csc.config import MONITOR_LOSS, monitor_parts
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
