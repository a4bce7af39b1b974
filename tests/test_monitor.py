"""What "best" means (`monitor`, `monitor_mode`, `save_top_k`) and `load_model` naming a file.

The runs use a scripted model: it trains a 1x1 convolution, but validates with constant
logits, one value per epoch (`SCRIPT`), and the criterion is the mean predicted probability.
So the validation loss of epoch e is sigmoid(SCRIPT[e - 1]), known exactly, while the IoU is 0
for a negative logit (nothing predicted) and the foreground share (the same every epoch) for a
positive one: the loss and the IoU pick different epochs, whatever the synthetic data hold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from csc import registries
from csc.checkpoints import (
    get_model,
    load_for_resume,
    prune_by_score,
    ranked_epochs,
    save_checkpoint,
)
from csc.config import build_config, monitor_mode
from csc.losses import SegmentationLoss, masked_mean
from csc.metrics import SegmentationMetrics
from csc.models import UNet
from csc.synth import write_synthetic
from csc.tracking import read_scalars
from csc.training import train
from tests.test_train import CLASSES, SPEC, settings

ITERATIONS = 3  # per epoch (tests.test_train.settings)
# Validation logits per epoch. Loss sigmoid(v): .007 .881 .993 .018 -> best epoch 1. IoU: 0, s,
# s, 0 for the foreground share s > 0 -> best epoch 2 (ties keep the earlier epoch).
SCRIPT = (-5.0, 2.0, 5.0, -4.0)


class ScriptedLogits(nn.Module):
    """A 1x1 convolution in training; in validation, constant logits `script[e - 1]` after
    training epoch e (its training batches, counted in a buffer that checkpoints carry)."""

    def __init__(self, script: Sequence[float]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, len(CLASSES), 1)
        self.script = list(script)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, Y, X) -> (B, C, Y, X)
        out = self.conv(x)
        if self.training:
            self.steps += 1
            return out
        epoch = max(int(self.steps) // ITERATIONS, 1)
        return torch.full_like(out, self.script[epoch - 1])


class MeanProbability(SegmentationLoss):
    """The mean predicted probability over annotated voxels: higher for more foreground."""

    def masked_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return masked_mean(torch.sigmoid(logits), mask)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monitor-data")
    write_synthetic(out, SPEC)
    return out


def scripted(data: Path, run: Path, script: Sequence[float] = SCRIPT, **overrides: Any) -> Any:
    values = settings(data, run, model=ScriptedLogits(script), criterion=MeanProbability)
    return build_config({**values, "epochs": len(script), **overrides})


def state_of(run: Path, epoch: int) -> dict[str, Any]:
    path = run / f"checkpoints/csc-extras/2d_unet_{epoch}.state.pth"
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state


def by_step(log_dir: Path, tag: str) -> list[float]:
    return [value for _, value in read_scalars(log_dir, tag)]


# --- Config ---------------------------------------------------------------------------------


def test_monitor_names_are_the_metrics_of_a_validation() -> None:
    computed = SegmentationMetrics(["a"]).compute()
    metrics = [name for name, value in computed.items() if isinstance(value, dict)]
    assert tuple(metrics) == registries.METRIC_NAMES


@pytest.mark.parametrize(
    ("values", "monitor", "mode"),
    [
        ({}, "loss", "min"),
        ({"low_is_best": False}, "loss", "max"),
        ({"monitor": "iou"}, "iou", "max"),
        ({"monitor": "F1/nuc"}, "dice/nuc", "max"),
        ({"monitor": "iou/mean", "monitor_mode": "min"}, "iou", "min"),
        ({"monitor": "loss", "monitor_mode": "max"}, "loss", "max"),
        ({"monitor": "iou", "low_is_best": False}, "iou", "max"),
    ],
)
def test_monitor_and_its_mode(values: dict[str, Any], monitor: str, mode: str) -> None:
    config = build_config({"classes": ["nuc", "er"], **values})
    assert (config.monitor, monitor_mode(config)) == (monitor, mode)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"monitor": "iuo"}, "unknown monitor 'iuo'.*available: 'loss', 'iou', 'dice'"),
        ({"monitor": "iou/mito"}, "names class 'mito'.*available: 'mean', 'nuc', 'er'"),
        ({"monitor_mode": "lowest"}, "unknown monitor_mode 'lowest'; available: 'min', 'max'"),
        ({"monitor": "iou", "low_is_best": True}, "low_is_best = True says a lower.*'iou'"),
        ({"monitor_mode": "min", "low_is_best": False}, "low_is_best = False.*monitor_mode"),
        ({"save_top_k": 0}, "save_top_k must be an integer >= 1"),
        ({"load_model": "lates"}, "unknown load_model 'lates'.*or the path of a checkpoint"),
    ],
)
def test_a_wrong_monitor_setting_is_an_error_naming_the_key(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_config({"classes": ["nuc", "er"], **values})


def test_a_load_model_path_is_relative_to_the_config_folder(tmp_path: Path) -> None:
    config = build_config({"load_model": "runs/a/x_3.pth"}, config_dir=tmp_path)
    assert config.load_model == str(tmp_path / "runs/a/x_3.pth")
    assert build_config({"load_model": "best"}, config_dir=tmp_path).load_model == "best"


def test_epochs_rank_by_score_ties_to_the_earlier_and_unscored_last() -> None:
    scores = {1: 0.5, 2: 0.2, 3: 0.2, 4: math.nan, 6: 0.9}
    assert ranked_epochs(scores, [1, 2, 3, 4, 5, 6], mode="min") == [2, 3, 1, 6, 5, 4]
    assert ranked_epochs(scores, [1, 2, 3, 4, 5, 6], mode="max") == [6, 1, 2, 3, 5, 4]


# --- Runs -----------------------------------------------------------------------------------


def test_the_monitored_metric_picks_another_best_epoch_than_the_loss(
    data: Path, tmp_path: Path
) -> None:
    """One scripted run per monitor: loss -> epoch 1, IoU -> epoch 2; the best link, the
    training state and TensorBoard's best/{monitor} follow; load_model="best" reads the
    logs by the monitor."""
    by_loss = train(scripted(data, tmp_path / "loss"))
    by_iou = train(scripted(data, tmp_path / "iou", monitor="iou"))
    assert (by_loss.best_epoch, by_iou.best_epoch) == (1, 2)
    losses = [scores["loss"] for scores in by_iou.validation]
    torch.testing.assert_close(torch.tensor(losses), torch.sigmoid(torch.tensor(SCRIPT)))
    ious = [scores["metrics"]["iou"]["mean"] for scores in by_iou.validation]
    assert ious[0] == ious[3] == 0 and ious[1] == ious[2] > 0
    folder = tmp_path / "iou/checkpoints"
    assert (folder / "csc-extras/2d_unet_best.pth").samefile(folder / "2d_unet_2.pth")
    state = state_of(tmp_path / "iou", 4)
    assert (state["monitor"], state["monitor_mode"], state["best_epoch"]) == ("iou", "max", 2)
    assert state["scores"] == pytest.approx(dict(enumerate(ious, start=1)))
    assert state["score"] == ious[3] and state["best_score"] == pytest.approx(ious[1])
    logs = tmp_path / "iou/tensorboard/2d_unet"
    assert by_step(logs, "best/iou") == pytest.approx([0.0, ious[1], ious[1], ious[1]])
    assert by_step(tmp_path / "loss/tensorboard/2d_unet", "best/loss") == pytest.approx(
        [losses[0]] * 4
    )
    for monitor, epoch in (("loss", 1), ("iou", 2)):  # both read the IoU run's logs
        again = scripted(data, tmp_path / "iou", load_model="best", monitor=monitor)
        found = load_for_resume(again)
        assert found is not None and found.epoch == epoch
        assert get_model(again) == epoch  # the toolkit's loader, given a csc config


def test_early_stopping_follows_the_monitor(data: Path, tmp_path: Path) -> None:
    """Patience 1: the loss worsens in epoch 2 (stop after 2); the IoU improves in epoch 2
    and ties in epoch 3 (stop after 3)."""
    by_loss = train(scripted(data, tmp_path / "loss", early_stopping_patience=1))
    by_iou = train(scripted(data, tmp_path / "iou", early_stopping_patience=1, monitor="iou"))
    assert (by_loss.last_epoch, by_iou.last_epoch) == (2, 3)


def test_the_plateau_scheduler_follows_the_monitor(data: Path, tmp_path: Path) -> None:
    """Patience 0, factor 0.5, the learning rate after each epoch: the loss worsens from epoch
    2 on (halved twice); the IoU improves until epoch 2 and ties in epoch 3 (halved once)."""
    plateau = {"scheduler": "plateau", "scheduler_kwargs": {"patience": 0, "factor": 0.5}}
    script = SCRIPT[:3]
    for monitor, expected in (("loss", [1e-3, 5e-4, 2.5e-4]), ("iou", [1e-3, 1e-3, 5e-4])):
        run = tmp_path / monitor
        train(scripted(data, run, script, monitor=monitor, **plateau))
        assert by_step(run / "tensorboard/2d_unet", "lr") == pytest.approx(expected), monitor


def test_a_plateau_mode_against_the_monitor_is_an_error_before_data_is_read(
    data: Path, tmp_path: Path
) -> None:
    kwargs = {"mode": "min"}
    config = scripted(data, tmp_path, monitor="iou", scheduler="plateau", scheduler_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau has mode 'min'.*monitor 'iou'"):
        train(config)
    assert not (tmp_path / "datasplit.csv").exists()


def test_a_resume_with_another_monitor_tracks_the_best_from_the_logs(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two epochs by the loss (best 1), then two more by the IoU: the logged IoU of epochs 1
    and 2 makes epoch 2 the best at once, and `best` points at it; epoch 3 ties, epoch 4 is 0."""
    train(scripted(data, tmp_path, epochs=2))
    assert state_of(tmp_path, 2)["best_epoch"] == 1
    capsys.readouterr()
    result = train(scripted(data, tmp_path, epochs=2, monitor="iou"))
    out = capsys.readouterr().out
    assert "tracked monitor 'loss' (min) as best; this run monitors 'iou' (max)" in out
    assert "epoch 2" in out and (result.first_epoch, result.best_epoch) == (3, 2)
    folder = tmp_path / "checkpoints"
    assert (folder / "csc-extras/2d_unet_best.pth").samefile(folder / "2d_unet_2.pth")
    state = state_of(tmp_path, 4)
    assert (state["monitor"], state["stale_epochs"]) == ("iou", 2)
    assert sorted(state["scores"]) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("top_k", "keep_last", "kept"),
    [(2, None, [2, 4, 6]), (2, 2, [2, 4, 5, 6]), (1, None, [2, 6])],
)
def test_save_top_k_keeps_the_best_epochs_and_the_newest(
    data: Path, tmp_path: Path, top_k: int, keep_last: int | None, kept: list[int]
) -> None:
    """Losses sigmoid(v): .50 .05 .73 .12 .88 .95, so the best two are epochs 2 and 4; the
    newest (6) stays for resume; keep_last_checkpoints adds the last N (the union)."""
    script = (0.0, -3.0, 1.0, -2.0, 2.0, 3.0)
    config = scripted(data, tmp_path, script, save_top_k=top_k, keep_last_checkpoints=keep_last)
    assert train(config).best_epoch == 2
    folder = tmp_path / "checkpoints"
    assert sorted(int(p.stem.split("_")[-1]) for p in folder.glob("2d_unet_*.pth")) == kept
    states = sorted(p.name for p in (folder / "csc-extras").glob("*.state.pth"))
    assert states == [f"2d_unet_{e}.state.pth" for e in sorted({2, 6} | {5} & set(kept))]
    assert (folder / "csc-extras/2d_unet_best.pth").samefile(folder / "2d_unet_2.pth")


def test_save_top_k_without_scores_keeps_the_newest_epochs(tmp_path: Path) -> None:
    """Epochs without a monitored score (a run without validation) rank newest first."""
    template = f"{tmp_path}/{{model_name}}_{{epoch}}.pth"
    for epoch in range(1, 6):
        save_checkpoint({"w": torch.zeros(1)}, None, template=template, model_name="m", epoch=epoch)
    prune_by_score(template, "m", keep_last=None, top_k=2, scores={}, mode="min", best_epoch=None)
    assert sorted(p.name for p in tmp_path.glob("m_*.pth")) == ["m_4.pth", "m_5.pth"]


# --- load_model = "path/to/x.pth" -----------------------------------------------------------


def test_load_model_naming_this_runs_checkpoint_resumes_it(data: Path, tmp_path: Path) -> None:
    """A relative path (from the config's folder) to the last epoch resumes it as "latest"
    would: the same losses as one uninterrupted run; an earlier epoch with later ones on disk
    is refused, as for "best"."""
    whole = train(build_config(settings(data, tmp_path / "whole", epochs=3)))
    run = tmp_path / "parts"
    first = train(build_config(settings(data, run, epochs=2)))
    named = {"epochs": 1, "load_model": "checkpoints/2d_unet_2.pth"}
    second = train(build_config(settings(data, run, **named), config_dir=run))
    assert (second.first_epoch, second.last_epoch) == (3, 3)
    torch.testing.assert_close(
        torch.tensor(first.losses + second.losses), torch.tensor(whole.losses)
    )
    # Its model file, its training state, and `best` (a hard link to the best epoch's file).
    files = {"2d_unet_3.pth": 3, "csc-extras/2d_unet_3.state.pth": 3}
    files["csc-extras/2d_unet_best.pth"] = second.best_epoch
    for name, epoch in files.items():
        named = {"load_model": str(run / "checkpoints" / name)}
        found = load_for_resume(build_config(settings(data, run, **named)))
        assert found is not None and found.epoch == epoch and found.train_state is not None
    earlier = settings(data, run, epochs=1, load_model=str(run / "checkpoints/2d_unet_1.pth"))
    with pytest.raises(FileExistsError, match=r"resumes 2d_unet at epoch 1.*up to 3"):
        train(build_config(earlier))


def unet() -> UNet:
    """The 2d_unet of `settings`, built by hand (with seeded weights) to set its optimizer."""
    torch.manual_seed(7)
    return UNet(2, 1, len(CLASSES), num_levels=2, base_channels=4)


@pytest.mark.parametrize("source", ["another run", "a plain state_dict"])
def test_load_model_naming_another_file_fine_tunes_from_epoch_1(
    data: Path, tmp_path: Path, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another run's checkpoint, or the toolkit's plain `state_dict` file: its weights, then
    epochs from 1 under this run's name. A learning rate of 0 (and no batch norm) keeps the
    weights as loaded."""
    if source == "another run":
        other = train(build_config(settings(data, tmp_path / "other", epochs=1)))
        path = tmp_path / "other/checkpoints/2d_unet_1.pth"
        expected = other.model.state_dict()
    else:
        path, expected = tmp_path / "toolkit.pth", unet().state_dict()
        torch.save(expected, path)
    model = unet()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.5)  # unlike the file's weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    values = settings(data, tmp_path / "tuned", epochs=1, model=model, optimizer=optimizer)
    result = train(build_config({**values, "load_model": str(path)}))
    assert (result.first_epoch, result.last_epoch) == (1, 1)
    assert f"loaded weights from {path}" in capsys.readouterr().out
    for name, value in result.model.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name], msg=name)
    assert (tmp_path / "tuned/checkpoints/2d_unet_1.pth").is_file()


def test_a_missing_load_model_file_is_an_error_before_data_is_read(
    data: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere/2d_unet_9.pth"
    message = re.escape(f"load_model '{missing}' does not exist")
    with pytest.raises(FileNotFoundError, match=message):
        train(build_config(settings(data, tmp_path, load_model=str(missing))))
    assert not (tmp_path / "datasplit.csv").exists()
