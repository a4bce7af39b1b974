"""Where a run's numbers, images and notes go: a small `Tracker` interface.

The training loop calls ``tracker.log({"train/loss": x}, step)`` and ``tracker.close()`` and
never imports tensorboard; `make_tracker` picks TensorBoard or nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np


class Tracker(Protocol):
    """Records scalars, images and text by step."""

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Record each ``tag: value`` at `step`."""

    def log_images(self, images: Mapping[str, np.ndarray], step: int) -> None:
        """Record images, floats in [0, 1], (H, W) grey or (H, W, 3) RGB."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Record a note (Markdown) at `step`."""

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

    def restart_at(self, step: int) -> None:
        """A restart marker, as ``SummaryWriter(purge_step=step)`` writes: TensorBoard and
        `csc.models.loading.read_scalars` drop the steps >= `step` of earlier event files."""
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
