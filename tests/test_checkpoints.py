"""Checkpoints: atomic save, weights_only loading, resume (latest/best), pruning, RNG state."""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import types
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from csc.checkpoints import (
    CheckpointReadError,
    CheckpointWarning,
    best_epoch,
    drop_old_states,
    find_checkpoints,
    get_best_val_epoch,
    get_latest_checkpoint_epoch,
    get_model,
    legacy_state_path,
    link_best,
    load_best_val,
    load_for_resume,
    load_latest,
    load_model,
    load_weights,
    model_path,
    prune_checkpoints,
    read_run,
    rng_state,
    save_best,
    save_checkpoint,
    set_rng_state,
    state_path,
    to_safe,
)
from csc.config import TrainConfig
from csc.models import UNet
from csc.runtime import ModelArguments, unwrap
from csc.tracking import EPOCH_TAG, read_scalars

NAME = "2d_unet"


@pytest.fixture
def template(tmp_path: Path) -> str:
    return str(tmp_path / "checkpoints" / "{model_name}_{epoch}.pth")


def tiny_model(seed: int) -> nn.Module:
    """A model whose weights identify the seed (and so the epoch) they came from."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def train_state(model: nn.Module, epoch: int) -> dict:
    """What the training loop stores: optimizer/scheduler state after one step, RNG, config."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    model(torch.rand(1, 1, 5, 5)).sum().backward()
    optimizer.step()
    scheduler.step()
    config = TrainConfig(train_raw_value_transforms=lambda x: x, model=model)
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": 10 * epoch,
        "rng": rng_state(),
        "best_score": 0.5,
        "best_epoch": 1,
        "config": config,  # save_checkpoint makes it safe
    }


def save_epochs(template: str, epochs: Sequence[int]) -> dict[int, nn.Module]:
    models = {}
    for epoch in epochs:
        models[epoch] = tiny_model(seed=epoch)
        state = train_state(models[epoch], epoch)
        save_checkpoint(
            models[epoch].state_dict(), state, template=template, model_name=NAME, epoch=epoch
        )
    return models


def files_under(folder: Path) -> list[str]:
    """Every file below `folder`, as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def same_weights(model: nn.Module, expected: nn.Module) -> bool:
    ours, theirs = model.state_dict(), expected.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# --- Saving -------------------------------------------------------------------------------


def test_save_writes_weights_only_files(template: str) -> None:
    model = tiny_model(seed=0)
    path = save_checkpoint(
        model.state_dict(), train_state(model, 3), template=template, model_name=NAME, epoch=3
    )
    assert path == Path(template).parent / "2d_unet_3.pth"
    assert files_under(path.parent) == ["2d_unet_3.pth", "csc-extras/2d_unet_3.state.pth"]
    weights = torch.load(path, weights_only=True)
    loaded = tiny_model(seed=1)
    loaded.load_state_dict(weights)  # a plain state_dict
    assert same_weights(loaded, model)
    state = torch.load(state_path(path), weights_only=True)
    assert state["epoch"] == 3 and state["step"] == 30
    assert state["config"]["train_raw_value_transforms"].startswith("<function")
    assert state["config"]["model"].startswith("Sequential(")
    assert state["config"]["input_array_info"] == {"shape": (1, 128, 128), "scale": (8.0,) * 3}
    optimizer = torch.optim.Adam(loaded.parameters())
    optimizer.load_state_dict(state["optimizer"])


def test_save_best_writes_best_copy(template: str) -> None:
    model = tiny_model(seed=0)
    path = save_best(model.state_dict(), {"epoch": 4}, template=template, model_name=NAME)
    folder = Path(template).parent / "csc-extras"
    assert path == folder / "2d_unet_best.pth"
    assert state_path(path) == folder / "2d_unet_best.state.pth"
    assert torch.load(state_path(path), weights_only=True) == {"epoch": 4}
    assert find_checkpoints(template, NAME) == {}  # the best copy is not an epoch


def test_state_path() -> None:
    assert state_path(Path("out/2d_unet_3.pth")) == Path("out/csc-extras/2d_unet_3.state.pth")
    assert state_path(Path("out/2d_unet_3.pt")) == Path("out/csc-extras/2d_unet_3.pt.state")
    assert legacy_state_path(Path("out/2d_unet_3.pth")) == Path("out/2d_unet_3.state.pth")
    assert model_path(Path("out/csc-extras/2d_unet_3.state.pth")) == Path("out/2d_unet_3.pth")
    assert model_path(Path("out/2d_unet_3.state.pth")) == Path("out/2d_unet_3.pth")


def test_to_safe_keeps_only_plain_data(tmp_path: Path) -> None:
    @dataclasses.dataclass
    class Settings:
        path: Path
        values: np.ndarray
        scale: np.float32
        where: object

    value = {"settings": Settings(Path("a/b"), np.arange(3), np.float32(0.5), object()), 1: (2,)}
    safe = to_safe(value)
    torch.save(safe, tmp_path / "safe.pth")
    loaded = torch.load(tmp_path / "safe.pth", weights_only=True)
    settings = loaded["settings"]
    assert settings["path"] == "a/b" and settings["values"] == [0, 1, 2]
    assert settings["scale"] == 0.5 and type(settings["scale"]) is float
    assert settings["where"].startswith("<object object at")
    assert loaded[1] == (2,)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.standard_normal()  # leaves numpy with a cached Gaussian
    torch.save(rng_state(), tmp_path / "rng.pth")

    def draw() -> tuple:
        return torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), random.random()

    first = draw()
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert draw() == first


def test_failed_write_leaves_previous_checkpoints(
    template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = save_epochs(template, [1])
    folder = Path(template).parent

    def partial_save(value: object, file: BinaryIO) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        save_epochs(template, [2])
    monkeypatch.undo()
    assert files_under(folder) == ["2d_unet_1.pth", "csc-extras/2d_unet_1.state.pth"]
    model = tiny_model(seed=5)
    assert load_latest(template.replace("{model_name}", NAME), model) == 1
    assert same_weights(model, models[1])


def test_epoch_without_model_file_is_incomplete(
    template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_epochs(template, [1])
    real_save = torch.save

    def fail_on_model_file(value: object, file: BinaryIO) -> None:
        if "state" not in file.name:
            raise OSError("killed")
        real_save(value, file)

    monkeypatch.setattr(torch, "save", fail_on_model_file)
    with pytest.raises(OSError, match="killed"):
        save_epochs(template, [2])
    monkeypatch.undo()
    assert state_path(Path(template.format(model_name=NAME, epoch=2))).exists()
    assert list(find_checkpoints(template, NAME)) == [1]


# --- Finding and loading ------------------------------------------------------------------


def test_find_checkpoints_counts_only_epoch_files(template: str) -> None:
    save_epochs(template, [1, 2, 10])
    folder = Path(template).parent
    for name in ("2d_unet_best.pth", ".2d_unet_11.pth.1a2b3c4d.tmp", "2d_unet_v2_12.pth"):
        (folder / name).write_bytes(b"")
    assert find_checkpoints(template, NAME) == {e: folder / f"2d_unet_{e}.pth" for e in (1, 2, 10)}


def test_latest_is_highest_epoch_not_newest_file(template: str) -> None:
    models = save_epochs(template, [1, 2, 3])
    os.utime(Path(template.format(model_name=NAME, epoch=1)), (4e9, 4e9))  # newest mtime
    model = tiny_model(seed=9)
    assert load_latest(template.replace("{model_name}", NAME), model) == 3
    assert same_weights(model, models[3])


def test_truncated_latest_falls_back_to_previous_epoch(template: str) -> None:
    models = save_epochs(template, [1, 2, 3])
    latest = Path(template.format(model_name=NAME, epoch=3))
    latest.write_bytes(latest.read_bytes()[:100])
    model = tiny_model(seed=9)
    with pytest.warns(CheckpointWarning, match=r"2d_unet_3\.pth.*falling back"):
        assert load_latest(template.replace("{model_name}", NAME), model) == 2
    assert same_weights(model, models[2])


def test_unreadable_state_falls_back_on_resume(template: str) -> None:
    save_epochs(template, [1, 2])
    state_path(Path(template.format(model_name=NAME, epoch=2))).write_bytes(b"garbage")
    config = TrainConfig(model_save_path=template, load_model="latest")
    with pytest.warns(CheckpointWarning, match=r"2d_unet_2\.pth"):
        resumed = load_for_resume(config)
    assert resumed is not None and resumed.epoch == 1 and resumed.train_state is not None
    assert resumed.train_state["epoch"] == 1


def test_no_readable_checkpoint_is_an_error(template: str) -> None:
    save_epochs(template, [1])
    Path(template.format(model_name=NAME, epoch=1)).write_bytes(b"")
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(CheckpointReadError, match="load_model=None"),
    ):
        load_latest(template.replace("{model_name}", NAME), tiny_model(seed=0))


def test_load_for_resume_restores_full_state(template: str) -> None:
    models = save_epochs(template, [1, 2])
    resumed = load_for_resume(TrainConfig(model_save_path=template, load_model="latest"))
    assert resumed is not None and resumed.epoch == 2
    assert resumed.path == Path(template.format(model_name=NAME, epoch=2))
    assert resumed.train_state is not None and resumed.train_state["step"] == 20
    set_rng_state(resumed.train_state["rng"])
    model = tiny_model(seed=0)
    model.load_state_dict(resumed.model_state)
    assert same_weights(model, models[2])


def test_load_for_resume_without_state_file_gives_weights(template: str) -> None:
    model = tiny_model(seed=0)
    save_checkpoint(model.state_dict(), None, template=template, model_name=NAME, epoch=1)
    resumed = load_for_resume(TrainConfig(model_save_path=template, load_model="latest"))
    assert resumed is not None and resumed.epoch == 1 and resumed.train_state is None


def test_load_for_resume_finds_nothing(template: str) -> None:
    assert load_for_resume(TrainConfig(model_save_path=template, load_model="latest")) is None
    save_epochs(template, [1])
    assert load_for_resume(TrainConfig(model_save_path=template, load_model=None)) is None


def test_wrapped_models_load_each_others_weights(template: str) -> None:
    class Compiled(nn.Module):  # what torch.compile's wrapper looks like to a state_dict
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self._orig_mod = module

    source = tiny_model(seed=1)
    wrapped = nn.DataParallel(Compiled(source))
    assert unwrap(wrapped) is source
    state = wrapped.state_dict()
    assert next(iter(state)).startswith("module._orig_mod.")
    save_checkpoint(state, None, template=template, model_name=NAME, epoch=1)
    target = tiny_model(seed=2)
    assert load_latest(template.replace("{model_name}", NAME), Compiled(target)) == 1
    assert same_weights(target, source)


def test_read_run_reads_an_epoch_by_number(template: str) -> None:
    models = save_epochs(template, [1, 2, 3])
    config = TrainConfig(model_save_path=template)
    found = read_run(config, 2, model_name=NAME)
    assert found is not None and found.epoch == 2 and found.train_state is None
    model = tiny_model(seed=0)
    model.load_state_dict(found.model_state)
    assert same_weights(model, models[2])
    with pytest.raises(FileNotFoundError, match=r"epoch 5.*\[1, 2, 3\]"):
        read_run(config, 5, model_name=NAME)


def test_a_model_file_rebuilds_its_model(template: str) -> None:
    """`load_model` needs no config: the model file holds its `ModelArguments`."""
    arguments = ModelArguments("2d_unet", 2, {"num_levels": 2, "base_channels": 2})
    model = arguments.build()
    save_checkpoint(
        model.state_dict(),
        None,
        template=template,
        model_name=NAME,
        epoch=1,
        model_arguments=arguments,
    )
    path = Path(template.format(model_name=NAME, epoch=1))
    rebuilt = load_model(path)
    assert isinstance(rebuilt, UNet) and rebuilt.ndim == 2 and same_weights(rebuilt, model)
    weights = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    model.load_state_dict(weights)  # still a plain state_dict


def test_a_model_file_without_arguments_says_what_to_do(template: str) -> None:
    """Files of earlier versions and the toolkit, and arguments holding objects (which would
    not read back as themselves), leave the model to be built by the caller."""
    model = tiny_model(seed=0)
    save_checkpoint(model.state_dict(), None, template=template, model_name=NAME, epoch=1)
    odd = ModelArguments("2d_unet", 2, {"activation": nn.ReLU})
    save_checkpoint(
        model.state_dict(), None, template=template, model_name=NAME, epoch=2, model_arguments=odd
    )
    for epoch in (1, 2):
        with pytest.raises(ValueError, match=r"not how to build their model.*load_weights"):
            load_model(template.format(model_name=NAME, epoch=epoch))


# --- Pruning ------------------------------------------------------------------------------


def test_prune_keeps_last_epochs_and_best(template: str) -> None:
    save_epochs(template, range(1, 7))
    model = tiny_model(seed=0)
    save_best(model.state_dict(), {}, template=template, model_name=NAME)
    removed = prune_checkpoints(template, NAME, keep_last=2, best_epoch=2)
    folder = Path(template).parent
    assert sorted(p.name for p in removed) == sorted(
        f"2d_unet_{e}{suffix}" for e in (1, 3, 4) for suffix in (".pth", ".state.pth")
    )
    assert list(find_checkpoints(template, NAME)) == [2, 5, 6]
    extras = folder / "csc-extras"
    assert (extras / "2d_unet_best.pth").exists() and (extras / "2d_unet_5.state.pth").exists()


# --- Best epoch from TensorBoard logs ---------------------------------------------------


def write_log(
    log_dir: Path,
    scores: Sequence[float],
    *,
    epochs: Sequence[int] | None = None,
    first_step: int = 10,
    walltime: float = 1e9,
) -> None:
    """What the training loop logs at the end of each epoch: `validation` and `EPOCH_TAG`."""
    with SummaryWriter(str(log_dir)) as writer:
        for i, score in enumerate(scores):
            step = first_step + 10 * i
            writer.add_scalar("validation", score, step, walltime=walltime + i)
            if epochs is not None:
                writer.add_scalar(EPOCH_TAG, epochs[i], step, walltime=walltime + i)


@pytest.mark.parametrize(
    ("scores", "epochs", "low_is_best", "window", "expected"),
    [
        ([0.8, 0.5, 0.2, 0.4], [1, 2, 3, 4], True, 1, 3),
        ([0.3, 0.5, 0.9, 0.4], [1, 2, 3, 4], False, 1, 3),
        ([0.8, 0.5, 0.2, 0.4], [5, 6, 7, 8], True, 1, 7),  # the epoch tag, not the position
        ([0.8, 0.5, 0.2, 0.4], None, True, 1, 3),  # no epoch tag: i-th validation is epoch i+1
        ([float("nan"), 0.5, 0.2, 0.4], [1, 2, 3, 4], True, 1, 3),  # NaN is the worst score
        ([float("nan"), 0.5, 0.9, 0.4], [1, 2, 3, 4], False, 1, 3),
        # centred window of 3: epoch 2's lone low score loses to the good stretch around 5
        ([0.5, 0.05, 0.6, 0.18, 0.15, 0.35], [1, 2, 3, 4, 5, 6], True, 3, 5),
        ([0.5, 0.05, 0.6, 0.18, 0.15, 0.35], [1, 2, 3, 4, 5, 6], True, 1, 2),
        ([0.5, 0.95, 0.4, 0.82, 0.85, 0.65], [1, 2, 3, 4, 5, 6], False, 3, 5),
    ],
)
def test_best_epoch(
    tmp_path: Path,
    scores: list[float],
    epochs: list[int] | None,
    low_is_best: bool,
    window: int,
    expected: int,
) -> None:
    write_log(tmp_path, scores, epochs=epochs)
    assert best_epoch(tmp_path, low_is_best=low_is_best, smoothing_window=window) == expected


def test_best_epoch_prefers_latest_run_for_a_step(tmp_path: Path) -> None:
    # The first run's epoch 4 looked best; the resumed run redid epoch 4 (same step) worse.
    write_log(tmp_path, [0.8, 0.5, 0.2, 0.05], epochs=[1, 2, 3, 4])
    write_log(tmp_path, [0.9, 0.3], epochs=[4, 5], first_step=40, walltime=2e9)
    steps, values = zip(*read_scalars(tmp_path, "validation"), strict=True)
    assert steps == (10, 20, 30, 40, 50)
    assert values == pytest.approx((0.8, 0.5, 0.2, 0.9, 0.3))
    assert best_epoch(tmp_path) == 3


def test_best_epoch_without_logs(tmp_path: Path) -> None:
    assert best_epoch(tmp_path / "missing") is None


def test_load_best_val_loads_best_epoch(template: str, tmp_path: Path) -> None:
    models = save_epochs(template, [1, 2, 3, 4])
    log_dir = tmp_path / "tensorboard" / NAME
    write_log(log_dir, [0.8, 0.5, 0.2, 0.4], epochs=[1, 2, 3, 4])
    model = tiny_model(seed=9)
    assert load_best_val(str(log_dir), template.replace("{model_name}", NAME), model) == 3
    assert same_weights(model, models[3])
    config = TrainConfig(
        model_save_path=template,
        logs_save_path=str(tmp_path / "tensorboard" / "{model_name}"),
        load_model="best",
    )
    resumed = load_for_resume(config)
    assert resumed is not None and resumed.epoch == 3 and resumed.train_state is not None


def test_missing_best_checkpoint_is_a_clear_error(template: str, tmp_path: Path) -> None:
    save_epochs(template, [1, 2, 4])
    write_log(tmp_path / "logs", [0.8, 0.5, 0.2, 0.4], epochs=[1, 2, 3, 4])
    folder = Path(template).parent
    with pytest.raises(FileNotFoundError, match=rf"epoch 3.*{folder}.*\[1, 2, 4\]"):
        load_best_val(
            str(tmp_path / "logs"), template.replace("{model_name}", NAME), tiny_model(seed=0)
        )


# --- The toolkit's loaders and file names --------------------------------------------------


def toolkit_latest_epoch(pattern: str, model_name: str) -> int | None:
    """What the toolkit's latest loader does: int() of what follows ``{model_name}_`` in every
    file matching its wildcard (measured to crash on ``2d_unet_best.pth``)."""
    epochs = [int(Path(p).stem.removeprefix(f"{model_name}_")) for p in glob.glob(pattern)]
    return max(epochs, default=None)


def test_toolkit_wildcards_match_only_model_files(template: str) -> None:
    save_epochs(template, [1, 2, 3])
    link_best(template=template, model_name=NAME, epoch=2)
    folder = Path(template).parent
    assert toolkit_latest_epoch(str(folder / f"{NAME}_*.pth"), NAME) == 3
    assert sorted(p.name for p in folder.glob("*.pth")) == [f"{NAME}_{e}.pth" for e in (1, 2, 3)]
    assert (folder / "csc-extras" / f"{NAME}_best.pth").samefile(folder / f"{NAME}_2.pth")


def test_load_latest_takes_the_toolkits_wildcard(template: str) -> None:
    models = save_epochs(template, [1, 2, 10])
    folder = Path(template).parent
    for legacy in ("2d_unet_best.pth", "2d_unet_10.state.pth", ".2d_unet_11.pth.1a2b3c4d.tmp"):
        (folder / legacy).write_bytes(b"")  # an earlier csc's names: not epochs
    for pattern in (f"{folder}/2d_unet_*.pth", f"{folder}/*.pth", f"{folder}/*"):
        model = tiny_model(seed=0)
        assert load_latest(pattern, model) == 10, pattern
        assert same_weights(model, models[10])
    assert get_latest_checkpoint_epoch(f"{folder}/2d_unet_*.pth") == 10
    assert get_latest_checkpoint_epoch(template.replace("{model_name}", NAME)) == 10
    assert get_latest_checkpoint_epoch(f"{folder}/other_*.pth") is None


def test_wildcard_over_several_runs_takes_the_newest_run(template: str) -> None:
    save_epochs(template, [1, 2, 3])
    other = tiny_model(seed=7)
    save_checkpoint(other.state_dict(), None, template=template, model_name="other", epoch=1)
    for epoch in (1, 2, 3):  # 2d_unet's files are older than other_1.pth
        os.utime(Path(template.format(model_name=NAME, epoch=epoch)), (1e9, 1e9))
    model = tiny_model(seed=0)
    assert load_latest(f"{Path(template).parent}/*.pth", model) == 1
    assert same_weights(model, other)


def test_load_best_val_takes_low_is_best_positionally(template: str, tmp_path: Path) -> None:
    models = save_epochs(template, [1, 2, 3])
    log_dir = tmp_path / "tensorboard" / NAME
    write_log(log_dir, [0.2, 0.9, 0.5], epochs=[1, 2, 3])
    model = tiny_model(seed=0)
    assert load_best_val(str(log_dir), template.replace("{model_name}", NAME), model, False) == 2
    assert same_weights(model, models[2])
    assert get_best_val_epoch(str(log_dir)) == 1
    assert get_best_val_epoch(str(log_dir), False, 1) == 2


def test_get_model_loads_what_load_model_names(template: str, tmp_path: Path) -> None:
    models = save_epochs(template, [1, 2, 3])
    write_log(tmp_path / "tensorboard" / NAME, [0.5, 0.1, 0.9], epochs=[1, 2, 3])
    paths = {
        "model_name": NAME,
        "model_save_path": template,
        "logs_save_path": str(tmp_path / "tensorboard" / "{model_name}"),
    }
    for load_model_, epoch in (("latest", 3), ("best", 2), (None, 0)):
        config = types.SimpleNamespace(model=tiny_model(seed=0), load_model=load_model_, **paths)
        assert get_model(config) == epoch
        assert epoch == 0 or same_weights(config.model, models[epoch])
    fresh = types.SimpleNamespace(model=tiny_model(seed=0), base_experiment_path=tmp_path / "new")
    assert get_model(fresh) == 0  # nothing saved yet under the toolkit's default paths
    with pytest.raises(ValueError, match=r"get_model needs config\.model"):
        get_model(TrainConfig())


def test_an_earlier_csc_layout_is_read(template: str) -> None:
    """States and best beside the model files (csc before csc-extras) still resume."""
    models = save_epochs(template, [1, 2])
    folder = Path(template).parent
    for epoch in (1, 2):  # back to the earlier layout
        state = state_path(folder / f"{NAME}_{epoch}.pth")
        state.rename(legacy_state_path(folder / f"{NAME}_{epoch}.pth"))
    resumed = load_for_resume(TrainConfig(model_save_path=template, load_model="latest"))
    assert resumed is not None and resumed.epoch == 2 and resumed.train_state is not None
    assert resumed.train_state["epoch"] == 2
    model = tiny_model(seed=0)
    load_weights(model, resumed.model_state)
    assert same_weights(model, models[2])
    assert drop_old_states(template, NAME, best_epoch=None, keep=1) == [
        folder / f"{NAME}_1.state.pth"
    ]


def test_a_unet_saved_with_csc_earlier_layer_names_loads() -> None:
    """csc's UNet before it took the toolkit's names: encoders/decoders/head, renamed."""
    torch.manual_seed(0)
    model = UNet(2, 1, 2, base_channels=2, num_levels=2).eval()
    renames = {  # the module paths now -> then (csc's UNet until the toolkit's names)
        "inc.double_conv.": "encoders.0.",
        "down1.maxpool_conv.1.double_conv.": "encoders.1.",
        "down2.maxpool_conv.1.double_conv.": "encoders.2.",
        "up1.up.": "decoders.0.up.",
        "up1.conv.double_conv.": "decoders.0.conv.",
        "up2.up.": "decoders.1.up.",
        "up2.conv.double_conv.": "decoders.1.conv.",
        "outc.conv.": "head.",
    }
    old = {}
    for key, value in model.state_dict().items():
        prefix = next(p for p in renames if key.startswith(p))
        rest = key.removeprefix(prefix)
        if prefix.endswith("double_conv."):  # index 0, 1 | 3, 4 -> "0.0", "0.1" | "1.0", "1.1"
            index, rest = rest.split(".", 1)
            rest = f"{int(index) // 3}.{int(index) % 3}.{rest}"
        old[renames[prefix] + rest] = value
    assert {"encoders.1.1.1.running_var", "decoders.1.conv.0.0.weight", "head.bias"} <= set(old)
    loaded = UNet(2, 1, 2, base_channels=2, num_levels=2).eval()
    load_weights(loaded, old)
    assert same_weights(loaded, model)
