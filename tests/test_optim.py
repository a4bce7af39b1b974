"""csc.optim and the training options around it: optimizer_kwargs, the weight decay groups,
SGD's momentum, RAdam's saved state, warm-up and the scheduler's cadence, resume with other
groups, and activation checkpointing in csc's models."""

from __future__ import annotations

import copy
import io
import itertools
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from csc.checkpoints import to_safe
from csc.config import TrainConfig, build_config
from csc.models import UNet, build_model, enable_activation_checkpointing
from csc.optim import (
    Schedule,
    fit_saved_state,
    make_optimizer,
    make_scheduler,
    parameter_names,
)
from csc.tracking import read_scalars
from csc.training import train
from tests.faults import assert_unchanged, snapshot
from tests.test_train import data, settings  # noqa: F401 (data: the module's fixture)

LR = 1e-3  # settings()' learning_rate


def config(**values: Any) -> TrainConfig:
    """A config without data: for building optimizers and schedules only."""
    return build_config({"learning_rate": LR, "epochs": 2, "iterations_per_epoch": 5, **values})


def tiny_unet() -> UNet:
    return UNet(2, 1, 2, base_channels=4, num_levels=1)  # batch norm: convs without bias


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


def train_state(run: Path, epoch: int) -> dict[str, Any]:
    path = run / f"checkpoints/csc-extras/2d_unet_{epoch}.state.pth"
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state


# --- Optimizer -----------------------------------------------------------------------------


def test_optimizer_kwargs_reach_the_optimizer() -> None:
    kwargs = {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}
    optimizer = make_optimizer(config(optimizer="adamw", optimizer_kwargs=kwargs), tiny_unet())
    assert isinstance(optimizer, torch.optim.AdamW)
    first = optimizer.param_groups[0]
    assert (first["betas"], first["eps"], first["weight_decay"], first["lr"]) == (
        (0.8, 0.95),
        1e-6,
        0.05,
        LR,
    )


def test_sgd_has_momentum_09_unless_optimizer_kwargs_set_it() -> None:
    default = make_optimizer(config(optimizer="sgd"), tiny_unet())
    assert isinstance(default, torch.optim.SGD) and default.param_groups[0]["momentum"] == 0.9
    kwargs = {"momentum": 0.5, "nesterov": True}
    set_here = make_optimizer(config(optimizer="SGD", optimizer_kwargs=kwargs), tiny_unet())
    assert (set_here.param_groups[0]["momentum"], set_here.param_groups[0]["nesterov"]) == (
        0.5,
        True,
    )
    # Momentum at work: two steps on a constant gradient move 1 + (1 + 0.9) = 2.9 x lr.
    weight = nn.Parameter(torch.zeros(1))
    holder = nn.Module()
    holder.weight = weight
    optimizer = make_optimizer(config(optimizer="sgd", learning_rate=0.1), holder)
    for _ in range(2):
        weight.grad = torch.ones(1)
        optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.29]))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"optimizer": "sgd", "optimizer_kwargs": {"momentun": 0.9}},
            "optimizer_kwargs: SGD takes no argument 'momentun'; it takes lr, momentum, "
            "dampening, weight_decay, nesterov",
        ),
        (
            {"optimizer": torch.optim.Adam, "optimizer_kwargs": {"beta": (0.9, 0.99)}},
            "optimizer_kwargs: Adam takes no argument 'beta'; it takes lr, betas, eps",
        ),
    ],
    ids=["name", "class"],
)
def test_unknown_optimizer_kwargs_name_the_key_and_the_accepted_names(
    values: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        make_optimizer(config(**values), tiny_unet())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"optimizer_kwargs": {"lr": 0.1}}, "optimizer_kwargs sets lr: csc passes"),
        ({"optimizer_kwargs": [("eps", 1)]}, "optimizer_kwargs must be a dict"),
        (
            {
                "optimizer": torch.optim.SGD(tiny_unet().parameters(), lr=1.0),
                "optimizer_kwargs": {"momentum": 0.9},
            },
            "optimizer_kwargs ['momentum'] need an optimizer name or class, but optimizer is "
            "an instance of SGD",
        ),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"warmup_start_factor": 1.5}, "warmup_start_factor must be in [0, 1]"),
        ({"scheduler_interval": "batch", "scheduler": "step"}, "unknown scheduler_interval"),
        ({"scheduler_interval": "step"}, "scheduler_interval 'step' needs a scheduler"),
        (
            {"scheduler": "plateau", "scheduler_interval": "step"},
            "scheduler_interval 'step' cannot drive ReduceLROnPlateau",
        ),
        (
            {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau, "scheduler_interval": "step"},
            "scheduler_interval 'step' cannot drive ReduceLROnPlateau",
        ),
        ({"weight_decay_norm_and_bias": 1}, "weight_decay_norm_and_bias must be True or False"),
        ({"activation_checkpointing": "yes"}, "activation_checkpointing must be True or False"),
    ],
    ids=[
        "lr",
        "not-a-dict",
        "instance",
        "warmup-negative",
        "factor",
        "interval-name",
        "interval-alone",
        "plateau-name",
        "plateau-class",
        "groups-bool",
        "checkpointing-bool",
    ],
)
def test_the_config_refuses_bad_optimisation_values(values: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        config(**values)


def test_bad_optimizer_kwargs_are_refused_before_any_data_is_read(
    data: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    before, before_data = snapshot(tmp_path), snapshot(data)
    options = {"optimizer": "adamw", "optimizer_kwargs": {"weight_decays": 0.1}}
    with pytest.raises(ValueError, match="optimizer_kwargs: AdamW takes no argument 'weight_d"):
        train(build_config(settings(data, tmp_path, **options)))
    assert not (tmp_path / "datasplit.csv").exists()
    assert_unchanged(before, tmp_path)
    assert_unchanged(before_data, data)


def test_biases_and_norm_weights_get_no_weight_decay_unless_asked() -> None:
    """AdamW with weight decay 0.1 and zero gradients: a step only decays, by lr x 0.1, the
    conv weights (group 0); biases and BatchNorm's weight and bias (group 1) stay."""
    model = tiny_unet()
    values = {"optimizer": "adamw", "optimizer_kwargs": {"weight_decay": 0.1}}
    optimizer = make_optimizer(config(**values), model)
    decayed, kept = optimizer.param_groups
    assert (decayed["weight_decay"], kept["weight_decay"]) == (0.1, 0.0)
    named = dict(model.named_parameters())
    kept_names = {name for name, p in named.items() if any(p is q for q in kept["params"])}
    assert kept_names == {name for name in named if name.endswith(("bias", "1.weight", "4.weight"))}
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in kept["params"])
    assert len(decayed["params"]) + len(kept["params"]) == len(named)
    before = {name: p.detach().clone() for name, p in named.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in named.items():
        factor = 1.0 if name in kept_names else 1 - LR * 0.1
        torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)
    everything = make_optimizer(config(**values, weight_decay_norm_and_bias=True), model)
    assert len(everything.param_groups) == 1 and everything.param_groups[0]["weight_decay"] == 0.1


def test_without_weight_decay_there_is_one_group() -> None:
    """RAdam's default has no weight decay: nothing to split, the state keeps one group (as
    every state saved before the groups)."""
    optimizer = make_optimizer(config(), tiny_unet())
    assert len(optimizer.param_groups) == 1


def test_radam_saves_what_the_docs_say(
    data: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """The default optimizer, as docs/configuration.md describes it: RAdam with the toolkit's
    decoupled_weight_decay=True and weight decay 0 (none); optimizer_kwargs' weight_decay is
    decoupled, on the decay group only."""
    train(build_config(settings(data, tmp_path / "default", epochs=1)))
    (group,) = train_state(tmp_path / "default", 1)["optimizer"]["param_groups"]
    assert (group["weight_decay"], group["decoupled_weight_decay"], group["lr"]) == (0, True, LR)
    options = {"epochs": 1, "optimizer_kwargs": {"weight_decay": 1e-2}}
    train(build_config(settings(data, tmp_path / "decay", **options)))
    groups = train_state(tmp_path / "decay", 1)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["decoupled_weight_decay"]) for g in groups] == [
        (1e-2, True),
        (0.0, True),
    ]


# --- Resuming with other groups -----------------------------------------------------------


def stepped_adamw(model: nn.Module, *, split: bool) -> torch.optim.Optimizer:
    values = {"optimizer": "adamw", "weight_decay_norm_and_bias": not split}
    optimizer = make_optimizer(config(**values), model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer


def test_a_state_of_one_group_saved_without_names_fits_two_groups() -> None:
    """As csc saved every optimizer before the groups: one group, the model's order."""
    model = tiny_unet()
    saved = stepped_adamw(model, split=False).state_dict()
    optimizer = make_optimizer(config(optimizer="adamw"), model)  # two groups
    optimizer.load_state_dict(fit_saved_state(saved, optimizer, model, saved_names=None))
    old = dict(zip(model.parameters(), saved["state"].values(), strict=True))
    for group in optimizer.param_groups:
        for p in group["params"]:
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], old[p]["exp_avg"])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-2, 0.0]


def test_a_state_of_two_groups_fits_one_by_the_saved_names() -> None:
    model = tiny_unet()
    first = stepped_adamw(model, split=True)
    saved, saved_names = first.state_dict(), parameter_names(first, model)
    optimizer = make_optimizer(config(optimizer="adamw", weight_decay_norm_and_bias=True), model)
    optimizer.load_state_dict(fit_saved_state(saved, optimizer, model, saved_names=saved_names))
    for p in model.parameters():
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], first.state[p]["exp_avg"])
    other = UNet(2, 1, 2, base_channels=4, num_levels=2)
    with pytest.raises(ValueError, match="do not match this model"):
        fit_saved_state(saved, make_optimizer(config(), other), other, saved_names=saved_names)


def test_a_run_saved_before_the_groups_resumes_with_them(
    data: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """An AdamW run (weight decay 0.01) whose state has one group and neither parameter names
    nor a warm-up schedule, as csc saved them, resumes into two groups and goes on."""
    options = {"optimizer": "adamw", "scheduler": "cosine", "epochs": 1}
    train(build_config(settings(data, tmp_path, weight_decay_norm_and_bias=True, **options)))
    path = tmp_path / "checkpoints/csc-extras/2d_unet_1.state.pth"
    state = torch.load(path, weights_only=True)
    del state["optimizer_parameters"]
    state["scheduler"] = state["scheduler"]["scheduler"]  # CosineAnnealingLR's own state
    torch.save(state, path)
    resumed = train(build_config(settings(data, tmp_path, **options)))
    assert (resumed.first_epoch, resumed.last_epoch) == (2, 2)
    state = train_state(tmp_path, 2)
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-2, 0.0]
    assert groups[0]["lr"] == groups[1]["lr"] != LR  # both follow the cosine
    assert state["scheduler"]["scheduler"]["base_lrs"] == [LR, LR]


# --- Warm-up and the scheduler's cadence ---------------------------------------------------


def single_parameter_optimizer(**values: Any) -> tuple[torch.optim.Optimizer, Schedule]:
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(2, 2))
    optimizer = make_optimizer(config(optimizer="sgd", **values), holder)
    return optimizer, make_scheduler(config(**values), optimizer)


def step(optimizer: torch.optim.Optimizer) -> None:
    """An optimizer step on zero gradients (torch wants one before a scheduler's step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()


def run_steps(
    optimizer: torch.optim.Optimizer, schedule: Schedule, steps: int, *, per_epoch: int = 5
) -> list[float]:
    """The learning rate each optimizer step used; epochs end every `per_epoch` steps."""
    used = []
    for _ in range(steps):
        used.append(lrs(optimizer)[0])
        step(optimizer)
        schedule.after_optimizer_step()
        if schedule.num_steps % per_epoch == 0:
            schedule.end_epoch(0.5)
    return used


def test_warm_up_is_linear_in_optimizer_steps_without_a_scheduler() -> None:
    optimizer, schedule = single_parameter_optimizer(warmup_steps=4, warmup_start_factor=0.01)
    used = run_steps(optimizer, schedule, 7)
    expected = [LR * f for f in (0.01, 0.2575, 0.505, 0.7525, 1.0, 1.0, 1.0)]
    torch.testing.assert_close(torch.tensor(used), torch.tensor(expected), rtol=1e-12, atol=0)
    assert used[4:] == [LR] * 3  # exactly the rate after warm-up


def test_cosine_starts_after_warm_up_and_ends_with_the_run() -> None:
    """10 optimizer steps, 4 of warm-up: cosine spans the other 6 (T_max = 6)."""
    optimizer, schedule = single_parameter_optimizer(warmup_steps=4, scheduler="cosine")
    used = run_steps(optimizer, schedule, 10)
    assert used[3] < used[4] == LR and used[4] > used[5] > used[9]
    cosine = [LR * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)]
    torch.testing.assert_close(torch.tensor(used[4:]), torch.tensor(cosine))
    assert schedule.scheduler.T_max == 6


def test_an_epoch_scheduler_steps_at_epoch_ends_after_warm_up() -> None:
    """StepLR halving every epoch (5 steps), 7 warm-up steps: the epoch end at step 5 falls in
    warm-up and is not counted; the one at step 10 halves."""
    values = {"scheduler": "step", "scheduler_kwargs": {"step_size": 1, "gamma": 0.5}}
    optimizer, schedule = single_parameter_optimizer(warmup_steps=7, **values)
    used = run_steps(optimizer, schedule, 16)
    assert used[7:10] == [LR] * 3 and used[10:15] == [LR / 2] * 5 and used[15] == LR / 4


@pytest.mark.parametrize(
    ("interval", "expected_changes"),
    [(None, 2), ("epoch", 2), ("step", 11)],
    ids=["default-epoch", "epoch", "step"],
)
def test_a_scheduler_class_follows_scheduler_interval(
    interval: str | None, expected_changes: int
) -> None:
    """A user's StepLR class: per epoch by default (2 epoch ends in 12 steps), per optimizer
    step with scheduler_interval 'step'."""
    values = {
        "scheduler": torch.optim.lr_scheduler.StepLR,
        "scheduler_kwargs": {"step_size": 1, "gamma": 0.9},
        "scheduler_interval": interval,
    }
    optimizer, schedule = single_parameter_optimizer(**values)
    used = run_steps(optimizer, schedule, 12)
    assert sum(a != b for a, b in itertools.pairwise(used)) == expected_changes


def test_a_cosine_instance_is_stepped_per_epoch_when_told() -> None:
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD(holder.parameters(), lr=LR)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    values = {"optimizer": optimizer, "scheduler": cosine}
    by_type = make_scheduler(config(**values), optimizer)
    assert by_type.interval == "step"
    per_epoch = make_scheduler(config(**values, scheduler_interval="epoch"), optimizer)
    used = run_steps(optimizer, per_epoch, 10)
    assert len(set(used[:5])) == 1 and used[5] < used[4]


def test_plateau_waits_for_warm_up_and_steps_on_the_score() -> None:
    values = {"scheduler": "plateau", "scheduler_kwargs": {"patience": 0, "factor": 0.5}}
    optimizer, schedule = single_parameter_optimizer(warmup_steps=6, **values)
    used = run_steps(optimizer, schedule, 20)  # score 0.5 every epoch: no improvement
    assert used[6:10] == [LR] * 4  # epoch end 5 in warm-up; 10 sets the best; 15 halves
    assert used[10:15] == [LR] * 5 and used[15:] == [LR / 2] * 5


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """Through torch.save and a weights_only load, as a checkpoint's state."""
    buffer = io.BytesIO()
    torch.save(to_safe(state), buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


@pytest.mark.parametrize("scheduler", [None, "cosine", "onecycle", "step"])
def test_a_schedule_resumed_mid_warm_up_goes_on_bit_exactly(scheduler: str | None) -> None:
    values = {"warmup_steps": 4, "scheduler": scheduler}
    optimizer, schedule = single_parameter_optimizer(**values)
    whole = run_steps(optimizer, schedule, 10)
    first_optimizer, first = single_parameter_optimizer(**values)
    before = run_steps(first_optimizer, first, 2)
    saved = roundtrip({"optimizer": first_optimizer.state_dict(), "scheduler": first.state_dict()})
    optimizer, schedule = single_parameter_optimizer(**values)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    after = [lrs(optimizer)[0]]
    for _ in range(8):
        step(optimizer)
        schedule.after_optimizer_step()
        if schedule.num_steps % 5 == 0:
            schedule.end_epoch(0.5)
        after.append(lrs(optimizer)[0])
    assert before + after[:8] == whole  # equal floats, not close ones


def test_a_run_warms_up_and_resumes_mid_warm_up_exactly(
    data: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    """3 batches per epoch, 4 warm-up steps: TensorBoard's lr after epoch 1 is the warm-up's
    rate for step 4, then the full rate; a run resumed after epoch 1 (mid warm-up) has the
    losses of the uninterrupted one."""
    options = {"warmup_steps": 4, "warmup_start_factor": 0.1}
    whole = train(build_config(settings(data, tmp_path / "whole", epochs=3, **options)))
    rates = read_scalars(tmp_path / "whole/tensorboard/2d_unet", "lr")
    expected = [(3, LR * (0.1 + 0.9 * 3 / 4)), (6, LR), (9, LR)]  # TensorBoard: float32
    assert rates == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
    first = train(build_config(settings(data, tmp_path / "parts", epochs=1, **options)))
    second = train(build_config(settings(data, tmp_path / "parts", epochs=2, **options)))
    assert first.losses + second.losses == whole.losses
    assert train_state(tmp_path / "parts", 1)["scheduler"]["num_steps"] == 3


# --- Activation checkpointing ---------------------------------------------------------------

CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "2d_unet": ({"base_channels": 4, "num_levels": 2}, (16, 16)),
    "3d_unet": ({"base_channels": 2, "num_levels": 1, "upsample": "linear"}, (4, 8, 8)),
    "2d_resnet": ({"ngf": 4, "n_blocks": 2, "norm": "batch", "use_dropout": True}, (16, 16)),
    "3d_resnet": ({"ngf": 2, "n_blocks": 1, "norm": "group"}, (8, 8, 8)),
    "vitnet": (
        {
            "hidden_size": 16,
            "num_layers": 2,
            "num_heads": 2,
            "mlp_dim": 32,
            "encoder_channels": (4, 8),
            "patch_size": 2,
            "img_size": (16, 16),
            "dropout": 0.2,
        },
        (16, 16),
    ),
}


def forward_backward(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # the same dropout masks for both models
    output = model(inputs)
    (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
    return output.detach()


def count_calls(module: nn.Module) -> Callable[[], int]:
    calls = [0]

    def hook(*_args: Any) -> None:
        calls[0] += 1

    module.register_forward_pre_hook(hook)  # a recomputation may stop before the end
    return lambda: calls[0]


@pytest.mark.parametrize("name", list(CASES))
def test_checkpointed_models_give_the_same_outputs_gradients_and_statistics(name: str) -> None:
    kwargs, shape = CASES[name]
    torch.manual_seed(0)
    plain = build_model(name, num_classes=2, **kwargs).train()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    first_conv = next(m for m in checkpointed.modules() if isinstance(m, nn.Conv2d | nn.Conv3d))
    calls = count_calls(first_conv)
    inputs = torch.randn(2, 1, *shape)
    torch.testing.assert_close(
        forward_backward(checkpointed, inputs), forward_backward(plain, inputs)
    )
    assert calls() == 2  # the forward, and its recomputation in the backward pass
    plain_parameters = dict(plain.named_parameters())
    for key, p in checkpointed.named_parameters():
        assert p.grad is not None, key
        torch.testing.assert_close(p.grad, plain_parameters[key].grad, msg=key)
    plain_buffers = dict(plain.named_buffers())  # BatchNorm statistics updated once
    for key, buffer in checkpointed.named_buffers():
        torch.testing.assert_close(buffer, plain_buffers[key], msg=key)
    with torch.no_grad():  # evaluation: a plain forward, nothing recomputed
        checkpointed.eval()
        torch.testing.assert_close(checkpointed(inputs), plain.eval()(inputs))


def test_a_model_without_csc_blocks_refuses_activation_checkpointing(
    data: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"works with csc.s models .* but the model is a Conv2d"):
        enable_activation_checkpointing(nn.Conv2d(1, 3, 3, padding=1))
    model = nn.Conv2d(1, 3, 3, padding=1)
    options = {"model": model, "model_name": "mine", "activation_checkpointing": True}
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="set activation_checkpointing = False"):
        train(build_config(settings(data, tmp_path, **options)))
    assert not (tmp_path / "datasplit.csv").exists()
    assert_unchanged(before, tmp_path)


def test_a_checkpointed_run_trains_as_a_plain_one(
    data: Path,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    plain = train(build_config(settings(data, tmp_path / "plain", epochs=1)))
    options = {"epochs": 1, "activation_checkpointing": True}
    checkpointed = train(build_config(settings(data, tmp_path / "on", **options)))
    torch.testing.assert_close(torch.tensor(checkpointed.losses), torch.tensor(plain.losses))
