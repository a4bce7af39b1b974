"""The optimizers and learning-rate schedulers a config can name, and building them."""

from __future__ import annotations

import math
from typing import Any

import torch

from csc import registries
from csc.config import TrainConfig, check_keywords, monitor_mode

# The names and where their classes live are csc.registries' (torch-free, so the config checks
# names without torch); here they are resolved once.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    name: registries.resolve(reference) for name, reference in registries.OPTIMIZERS.items()
}
SCHEDULERS: dict[str, Any] = {
    name: registries.resolve(reference) for name, reference in registries.SCHEDULERS.items()
}
PER_STEP_SCHEDULERS = (
    torch.optim.lr_scheduler.CosineAnnealingLR,
    torch.optim.lr_scheduler.OneCycleLR,
)


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`optimizer`: an instance (used as is), a class, or a name in OPTIMIZERS."""
    choice = config.optimizer
    if isinstance(choice, torch.optim.Optimizer):
        held = {id(p) for group in choice.param_groups for p in group["params"]}
        if not any(id(p) in held for p in model.parameters()):
            raise ValueError(
                "optimizer is an instance over other parameters than the model's, so training "
                "would change nothing; give a name or class, or build it on the `model` you set"
            )
        return choice
    if isinstance(choice, str):
        choice = OPTIMIZERS[choice.lower()]
    return choice(model.parameters(), lr=config.learning_rate)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """`scheduler`: None, an instance, a class (given `scheduler_kwargs`) or a name. Named
    cosine and onecycle span the run's optimizer steps; plateau steps on the monitored score."""
    choice, kwargs = config.scheduler, dict(config.scheduler_kwargs)
    if choice is None or not isinstance(choice, str | type):
        if kwargs:
            what = "None" if choice is None else f"an instance of {type(choice).__name__}"
            raise ValueError(
                f"scheduler_kwargs {sorted(kwargs)} need a scheduler name or class, but "
                f"scheduler is {what}"
            )
        return choice
    steps = config.epochs * math.ceil(
        config.iterations_per_epoch / config.gradient_accumulation_steps
    )
    if isinstance(choice, str):
        name = choice.lower()
        choice = SCHEDULERS[name]
        defaults_by_name: dict[str, dict[str, Any]] = {
            "cosine": {"T_max": steps},
            "onecycle": {"max_lr": config.learning_rate, "total_steps": steps},
            "plateau": {"mode": monitor_mode(config)},  # it steps on the monitored score
            "step": {"step_size": max(1, config.epochs // 3)},
        }
        defaults = defaults_by_name[name]
        kwargs = {**defaults, **kwargs}
    check_keywords(choice, kwargs, key="scheduler_kwargs", num_positional=1)
    return choice(optimizer, **kwargs)


def check_plateau_mode(config: TrainConfig, scheduler: Any) -> None:
    """A `ReduceLROnPlateau` steps on the monitored score (`monitor`): a `ValueError` when its
    mode says the other way than `monitor_mode`, before any data is read."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    mode = monitor_mode(config)
    if scheduler.mode != mode:
        raise ValueError(
            f"scheduler ReduceLROnPlateau has mode {scheduler.mode!r}, but it steps on the "
            f"monitored score, monitor {config.monitor!r}, which is better when "
            f"{'lower' if mode == 'min' else 'higher'} (mode {mode!r}): leave mode out of "
            "scheduler_kwargs (it follows monitor_mode), or set monitor_mode"
        )
