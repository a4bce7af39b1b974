"""Trackers: what TensorBoardTracker writes reads back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from csc.tracking import NullTracker, TensorBoardTracker, make_tracker, read_scalars


def read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_tracker_writes_readable_events(tmp_path: Path) -> None:
    tracker = make_tracker(tmp_path / "run")
    assert isinstance(tracker, TensorBoardTracker)
    tracker.log({"train/loss": 0.5, "validation": torch.tensor(0.25)}, step=3)
    tracker.log({"train/loss": 0.4}, step=4)
    rng = np.random.default_rng(0)
    tracker.log_images({"grey": rng.random((8, 6)), "rgb": rng.random((4, 5, 3))}, step=4)
    tracker.log_text("notes", "resumed from **epoch 2**", step=4)
    tracker.log_layout({"loss": {"both": ["^loss$", "^validation$"]}})
    tracker.close()

    events = read_events(tmp_path / "run")
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(3, 0.5), (4, pytest.approx(0.4))]
    assert read_scalars(tmp_path / "run", "validation") == [(3, 0.25)]
    grey, rgb = events.Images("grey")[0], events.Images("rgb")[0]
    assert (grey.step, grey.height, grey.width) == (4, 8, 6)
    assert (rgb.height, rgb.width) == (4, 5)
    text = events.Tensors("notes/text_summary")[0]
    assert text.step == 4 and text.tensor_proto.string_val[0] == b"resumed from **epoch 2**"
    layout = layout_pb2.Layout.FromString(
        events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    )
    (category,) = layout.category
    (chart,) = category.chart
    assert (category.title, chart.title) == ("loss", "both")
    assert list(chart.multiline.tag) == ["^loss$", "^validation$"]


def test_images_must_be_grey_or_rgb(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(tmp_path)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        tracker.log_images({"channels_first": np.zeros((3, 4, 5))}, step=0)
    tracker.close()


@pytest.mark.parametrize(("log_dir", "enabled"), [(None, True), ("run", False)])
def test_disabled_tracker_writes_nothing(
    tmp_path: Path, log_dir: str | None, enabled: bool
) -> None:
    tracker = make_tracker(log_dir and tmp_path / log_dir, enabled=enabled)
    assert isinstance(tracker, NullTracker)
    tracker.log({"train/loss": 1.0}, step=0)
    tracker.log_images({"grey": np.zeros((2, 2))}, step=0)
    tracker.log_text("notes", "nothing", step=0)
    tracker.log_layout({"loss": {"both": ["^loss$", "^validation$"]}})
    tracker.close()
    assert list(tmp_path.iterdir()) == []
