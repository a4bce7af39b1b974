"""What TensorBoard shows of a run (csc.board): the custom-scalars layout, labelled image panels
whose colours tell unannotated voxels from p = 0.5, validation examples spread over the tiles,
training patches, the model summary, the epoch scalar out of the way; `csc init`'s example
configs; the end-of-training TensorBoard command; and the real TensorBoard serving it all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from csc import board
from csc.cli import cli, tensorboard_command
from csc.config import build_config, load_config
from csc.metrics import METRIC_NAMES
from csc.scaffold import EXAMPLE_NAMES, example_text
from csc.synth import write_synthetic
from csc.tracking import EPOCH_TAG, LEGACY_EPOCH_TAG, read_scalars, validation_by_epoch
from csc.training import TrainResult, train
from tests.test_train import CLASSES, SPEC, settings

REPO = Path(__file__).resolve().parent.parent
NUM_EXAMPLES = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """Two epochs of the tiny 2D run: 4 validation tiles (2 batches of 2), 3 examples."""
    folder = tmp_path_factory.mktemp("board")
    write_synthetic(folder / "data", SPEC)
    config = build_config(
        settings(folder / "data", folder, tensorboard_images=NUM_EXAMPLES, epochs=2)
    )
    return folder / "tensorboard/2d_unet", train(config)


def events(log_dir: Path) -> EventAccumulator:
    guidance = {"scalars": 0, "images": 0, "tensors": 0}
    accumulator = EventAccumulator(str(log_dir), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def png_pixels(data: bytes) -> np.ndarray:
    """A PNG's pixels, (H, W, 3) uint8."""
    return np.asarray(Image.open(BytesIO(data)).convert("RGB"))


def decoded(event: Any) -> np.ndarray:
    """An image event's pixels, (H, W, 3) uint8."""
    return png_pixels(event.encoded_image_string)


def rows_of(image: np.ndarray, columns: int) -> list[np.ndarray]:
    """The panels' rows of an `example_images` grid, label row dropped (its geometry)."""
    width = image.shape[1] // columns - board.GAP
    cell = width + board.GAP  # square patches
    count = (image.shape[0] - board.LABEL_HEIGHT) // cell
    return [
        image[board.LABEL_HEIGHT + r * cell : board.LABEL_HEIGHT + r * cell + width]
        for r in range(count)
    ]


# --- The layout ----------------------------------------------------------------------------


def charts_drawing(layout: board.Layout, tag: str) -> list[tuple[str, str]]:
    return [
        (category, title)
        for category, charts in layout.items()
        for title, patterns in charts.items()
        if any(re.search(pattern, tag) for pattern in patterns)
    ]


def test_layout_puts_both_losses_on_one_chart_and_groups_metrics_per_class() -> None:
    layout = board.scalar_layout(CLASSES)
    assert charts_drawing(layout, "loss") == charts_drawing(layout, "validation")
    assert len(charts_drawing(layout, "loss")) == 1
    assert len(charts_drawing(layout, "lr")) == 1
    assert charts_drawing(layout, "best/iou") == charts_drawing(layout, "best/dice/nuc")
    assert len(charts_drawing(layout, "best/loss")) == 1
    for metric in METRIC_NAMES:
        for name in (*CLASSES, "mean"):
            validation = charts_drawing(layout, f"metrics/{metric}/{name}")
            assert validation == charts_drawing(layout, f"train/{metric}/{name}")
            assert len(validation) == 1 and validation[0][0] == f"metric: {metric}"
    assert charts_drawing(layout, "metrics/iou/nuclear") == []  # whole tags, not prefixes
    assert charts_drawing(layout, EPOCH_TAG) == []


# --- Panels and colours --------------------------------------------------------------------


def test_unannotated_truth_looks_like_no_probability() -> None:
    """Every unannotated pixel's colour is far from every colour a probability can take."""
    ramp = board.colour_map(np.linspace(0, 1, 201)[None, :])[0]  # (201, 3)
    truth = np.full((12, 12), np.nan)
    truth[:, :3] = 0.0
    truth[:, 3:6] = 1.0
    colours = board.truth_colours(truth)
    hatched = colours[:, 6:].reshape(-1, 3)
    distance = np.linalg.norm(hatched[:, None] - ramp[None], axis=-1).min()
    assert distance > 0.25
    assert len(np.unique(hatched.round(3), axis=0)) == 2  # stripes of two colours
    np.testing.assert_allclose(colours[0, 0], board.colour_map(np.zeros((1, 1)))[0, 0])
    np.testing.assert_allclose(colours[0, 4], board.colour_map(np.ones((1, 1)))[0, 0])
    half = board.colour_map(np.full((1, 1), 0.5))[0, 0]
    assert np.linalg.norm(half - colours[0, 0]) > 0.3 and np.linalg.norm(half - colours[0, 4]) > 0.3


def test_example_images_have_a_labelled_row_per_example() -> None:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for k in range(2):
        raw = torch.rand((1, 1, 16, 16), generator=generator)
        target = (torch.rand((3, 1, 16, 16), generator=generator) > 0.5).float()
        target[:, :, :4] = torch.nan
        prediction = torch.full((3, 1, 16, 16), 0.25 * k)
        examples.append(board.example_of(raw[0], target, prediction))
    images = board.example_images(["a", "b", "c"], examples)
    assert set(images) == {"images/a", "images/b", "images/c"}
    image = images["images/b"]
    zoom = board.MIN_PANEL_WIDTH // 16
    cell = 16 * zoom + board.GAP
    assert image.shape == (board.LABEL_HEIGHT + 2 * cell, 3 * cell, 3)
    label = image[: board.LABEL_HEIGHT]
    for c in range(3):  # each panel has its title written above it
        assert (label[:, c * cell : (c + 1) * cell] < 0.5).any()
    grey, _, ramp = (image[board.LABEL_HEIGHT + cell + 8, c * cell + 8] for c in range(3))
    assert grey[0] == grey[1] == grey[2]
    np.testing.assert_allclose(ramp, board.colour_map(np.full((1, 1), 0.25))[0, 0], atol=0.01)
    hatched = image[board.LABEL_HEIGHT : board.LABEL_HEIGHT + 4 * zoom, cell : 2 * cell - 2]
    assert (np.abs(hatched - board.HATCH[0]).sum(-1) < 0.02).any()  # the unannotated rows
    patches = board.example_images(["a"], [board.example_of(raw[0], target)], prefix="train_images")
    assert patches["train_images/a"].shape == (board.LABEL_HEIGHT + cell, 2 * cell, 3)


def test_spread_keeps_examples_over_the_whole_stream_the_same_each_time() -> None:
    def positions(length: int, count: int) -> list[int]:
        spread = board.Spread[int](count)
        for item in range(length):
            if spread.take():
                spread.keep(item)
        return [index for index, _ in spread.chosen()]

    assert positions(1000, 3) == positions(1000, 3)
    chosen = positions(1000, 3)
    assert len(chosen) == 3 and chosen[0] == 0 and chosen[-1] >= 500
    assert positions(4, 3) == [0, 2, 3]
    assert positions(2, 3) == [0, 1]
    assert positions(10, 0) == []


# --- A training run's logs -----------------------------------------------------------------


def test_a_run_logs_several_validation_examples_from_different_tiles(
    run: tuple[Path, TrainResult],
) -> None:
    log = events(run[0])
    for name in CLASSES:
        shown = log.Images(f"images/{name}")
        assert [event.step for event in shown] == [3, 6]  # after each epoch's 3 batches
        rows = rows_of(decoded(shown[-1]), columns=3)
        assert len(rows) == NUM_EXAMPLES
        raws = [row[:, : row.shape[0]] for row in rows]  # the raw panels
        assert all(not np.array_equal(raws[0], other) for other in raws[1:])


def test_a_run_logs_augmented_training_patches_each_epoch(run: tuple[Path, TrainResult]) -> None:
    log = events(run[0])
    for name in CLASSES:
        shown = log.Images(f"train_images/{name}")
        assert [event.step for event in shown] == [1, 4]  # each epoch's first batch
        rows = rows_of(decoded(shown[0]), columns=2)  # raw | truth
        assert len(rows) == 2  # a batch of 2 < tensorboard_images


def test_a_run_logs_its_model_summary_and_layout_once(run: tuple[Path, TrainResult]) -> None:
    log_dir, result = run
    log = events(log_dir)
    summaries = log.Tensors("model/text_summary")
    assert len(summaries) == 1
    text = summaries[0].tensor_proto.string_val[0].decode()
    total = sum(p.numel() for p in result.model.parameters())
    assert f"**{total:,}**" in text and "input (1, 1, 32, 32) -> output (1, 3, 32, 32)" in text
    children = [name for name, _ in result.model.named_children()]
    assert all(f"| {name} |" in text for name in children)
    assert len(log.Tensors("custom_scalars__config__")) == 1


def test_the_epoch_scalar_is_bookkeeping_and_old_logs_still_read(
    run: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    log_dir, _ = run
    assert [value for _, value in read_scalars(log_dir, EPOCH_TAG)] == [1, 2]
    assert read_scalars(log_dir, LEGACY_EPOCH_TAG) == []
    assert list(validation_by_epoch(log_dir)) == [1, 2]
    # A log of an older csc (epoch under its old tag) resumed by this one (the new tag).
    with SummaryWriter(str(tmp_path)) as writer:
        for epoch, step, tag in ((1, 10, LEGACY_EPOCH_TAG), (2, 20, LEGACY_EPOCH_TAG)):
            writer.add_scalar("validation", 1.0 / epoch, step)
            writer.add_scalar(tag, epoch, step)
        writer.add_scalar("validation", 0.25, 30)
        writer.add_scalar(EPOCH_TAG, 3, 30)
    assert validation_by_epoch(tmp_path) == {1: 1.0, 2: 0.5, 3: 0.25}


def test_tensorboard_images_must_be_a_count() -> None:
    with pytest.raises(ValueError, match="tensorboard_images must be an integer >= 0"):
        build_config({"tensorboard_images": -1})


# --- csc init and the TensorBoard command --------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_the_shipped_examples_are_the_repositorys(name: str) -> None:
    assert example_text(name) == (REPO / "examples" / name).read_text(), (
        f"copy examples/{name} to src/csc/example_configs/{name} (csc init ships that copy)"
    )


def test_csc_init_writes_example_configs_that_load(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(cli, ["init", str(tmp_path)])
    assert outcome.exit_code == 0, outcome.output
    for name, model in (("train_2D.py", "2d_unet"), ("train_3D.py", "3d_unet")):
        path = tmp_path / "examples" / name
        assert path.read_text() == (REPO / "examples" / name).read_text()
        config = load_config(path)
        assert config.model_name == model
        for key in ("datasplit_path", "model_save_path", "logs_save_path", "search_path"):
            assert Path(getattr(config, key)).is_relative_to(tmp_path), key
    again = CliRunner().invoke(cli, ["init", str(tmp_path)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    (tmp_path / "examples/train_2D.py").write_text("epochs = 1\n")
    replaced = CliRunner().invoke(cli, ["init", str(tmp_path), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert load_config(tmp_path / "examples/train_2D.py").epochs != 1


@pytest.mark.parametrize("on_path", [False, True], ids=["python-m", "tensorboard-on-path"])
def test_the_tensorboard_command_works_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_path: bool
) -> None:
    """Without this environment's bin on PATH, ``python -m tensorboard.main`` of this Python;
    with it (an activated environment), plain ``tensorboard``. Both start from a folder
    without a .venv."""
    bin_folder = str(Path(sys.executable).parent)
    path = os.pathsep.join([*([bin_folder] if on_path else []), "/usr/bin", "/bin"])
    monkeypatch.setenv("PATH", path)
    command = tensorboard_command("tensorboard/2d_unet")
    arguments = shlex.split(command)
    assert arguments[-2:] == ["--logdir", str(Path.cwd() / "tensorboard/2d_unet")]
    assert (arguments[0] == "tensorboard") is on_path
    started = subprocess.run(
        [*arguments[:-2], "--version_tb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": path},
    )
    assert started.returncode == 0, started.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", started.stdout.strip())


# --- The real TensorBoard ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_serves_the_layout_and_the_image_tags(run: tuple[Path, TrainResult]) -> None:
    """TensorBoard itself, on 127.0.0.1, reads the run's logs: its HTTP API gives back the
    custom-scalars layout and the image tags, as a browser would get them."""
    log_dir = run[0]
    port = free_port()
    command = [
        *shlex.split(tensorboard_command(str(log_dir.parent))),
        *("--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"),
    ]
    base = f"http://127.0.0.1:{port}/data/plugin"
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as server:
        try:
            deadline, tags = time.monotonic() + 90, {}
            while time.monotonic() < deadline and not tags.get("2d_unet"):
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                with contextlib.suppress(OSError):  # not listening yet
                    tags = fetch(f"{base}/images/tags")
                time.sleep(0.5)
            layout = fetch(f"{base}/custom_scalars/layout")
            query = urllib.parse.urlencode({"run": "2d_unet", "tag": "images/nuc"})
            shown = fetch(f"{base}/images/images?{query}")
            with urllib.request.urlopen(
                f"{base}/images/individualImage?{shown[-1]['query']}", timeout=10
            ) as response:
                served = response.read()
        finally:
            server.terminate()
            server.wait(timeout=30)
    assert [image["step"] for image in shown] == [3, 6]
    rows = rows_of(png_pixels(served), columns=3)
    assert len(rows) == NUM_EXAMPLES  # the labelled grid, as the browser gets it
    expected = {f"{kind}/{name}" for kind in ("images", "train_images") for name in CLASSES}
    assert expected <= set(tags["2d_unet"])
    categories = {category["title"]: category["chart"] for category in layout["category"]}
    loss_charts = {chart["title"]: chart["multiline"]["tag"] for chart in categories["loss"]}
    assert ["^loss$", "^validation$"] in loss_charts.values()
    assert {f"metric: {m}" for m in METRIC_NAMES} <= set(categories)
    iou = {chart["title"]: chart["multiline"]["tag"] for chart in categories["metric: iou"]}
    assert iou["iou nuc"] == ["^metrics/iou/nuc$", "^train/iou/nuc$"]
