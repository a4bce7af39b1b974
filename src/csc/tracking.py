"""Where a run's numbers, images and notes go: a small `Tracker` interface, and reading the
scalars back from TensorBoard files (`read_scalars`).

The training loop calls ``tracker.log({"train/loss": x}, step)`` and ``tracker.close()`` and
never imports tensorboard; `make_tracker` picks TensorBoard or nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

VALIDATION_TAG = "validation"  # the scalar the training loop logs once per epoch
# Logged at the same step as VALIDATION_TAG, value = the epoch number. The "~" sorts the tag
# after every other in TensorBoard's scalars tab: bookkeeping, out of the way of the curves.
EPOCH_TAG = "~bookkeeping/epoch"
LEGACY_EPOCH_TAG = "epoch"  # the same scalar in logs written before csc 0.1's EPOCH_TAG
# A custom-scalars layout: category -> chart title -> regular expressions of the tags it draws.
Layout = Mapping[str, Mapping[str, Sequence[str]]]
START = 1  # tensorboard's SessionLog.START: a (re)started run; steps from here on are new


class Tracker(Protocol):
    """Records scalars, images and text by step."""

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Record each ``tag: value`` at `step`."""

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Record images, floats in [0, 1], (H, W) grey or (H, W, 3) RGB."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Record a note (Markdown) at `step`."""

    def log_layout(self, layout: Layout) -> None:
        """Record how TensorBoard's custom-scalars tab groups the scalars (`Layout`); once."""

    def restart_at(self, step: int) -> None:
        """Hide what an interrupted run recorded at `step` and later: a resumed run records
        those steps anew, so no step shows twice."""

    def close(self) -> None:
        """Write everything out; the records are readable once this returns."""


class NullTracker:
    """A tracker that records nothing: for tests and for processes other than rank 0."""

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        pass

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        pass

    def log_text(self, tag: str, text: str, step: int) -> None:
        pass

    def log_layout(self, layout: Layout) -> None:
        pass

    def restart_at(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Writes TensorBoard event files into `log_dir`."""

    def __init__(self, log_dir: str | Path) -> None:
        # Imported here: torch's tensorboard writer takes over a second to import.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        for tag, image in images.items():
            image = np.asarray(image, dtype=np.float32)
            if image.ndim == 2:
                layout = "HW"
            elif image.ndim == 3 and image.shape[-1] == 3:
                layout = "HWC"
            else:
                raise ValueError(f"image {tag!r} has shape {image.shape}; give (H, W) or (H, W, 3)")
            # float images are scaled by 255 when written, so clip what would overflow uint8
            self.writer.add_image(tag, np.clip(image, 0, 1), global_step=step, dataformats=layout)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def log_layout(self, layout: Layout) -> None:
        """Each chart draws every scalar whose tag matches one of its regular expressions."""
        charts = {
            category: {title: ["Multiline", list(tags)] for title, tags in per_chart.items()}
            for category, per_chart in layout.items()
        }
        self.writer.add_custom_scalars(charts)

    def restart_at(self, step: int) -> None:
        """A restart marker, as ``SummaryWriter(purge_step=step)`` writes: TensorBoard and
        `read_scalars` drop the steps >= `step` of earlier event files."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        start = SessionLog(status=SessionLog.START)
        self.writer._get_file_writer().add_event(Event(step=step, session_log=start))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def make_tracker(log_dir: str | Path | None, *, enabled: bool = True) -> Tracker:
    """A `TensorBoardTracker` writing into `log_dir`, or a `NullTracker` when disabled/None."""
    if log_dir is None or not enabled:
        return NullTracker()
    return TensorBoardTracker(log_dir)


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


def validation_by_epoch(log_dir: str | Path, *, tag: str = VALIDATION_TAG) -> dict[int, float]:
    """The ``validation`` score (or another scalar `tag` logged with it, such as
    ``metrics/iou/mean``) of each epoch, in epoch order.

    The epoch of a score is the `EPOCH_TAG` scalar logged at the same step (`LEGACY_EPOCH_TAG`
    in older csc logs; a resumed run's may hold both). Logs without either (the existing
    toolkit's) count validations: the i-th by step (from 0) is epoch i + 1, the epoch that was
    validated (the existing toolkit loaded epoch i, one before).
    """
    scores = read_scalars(log_dir, tag)
    epoch_at = {
        step: round(value)
        for name in (LEGACY_EPOCH_TAG, EPOCH_TAG)  # the current tag wins at a step with both
        for step, value in read_scalars(log_dir, name)
    }
    if not epoch_at:
        return {i + 1: value for i, (_, value) in enumerate(scores)}
    by_epoch = {epoch_at[step]: value for step, value in scores if step in epoch_at}
    return dict(sorted(by_epoch.items()))
