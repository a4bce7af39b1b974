"""The optimizers and learning-rate schedules a config can name, and building them.

`make_optimizer` builds `optimizer` with `optimizer_kwargs` over two parameter groups (weight
decay, and none for biases and norm weights) unless `weight_decay_norm_and_bias`;
`make_scheduler` builds the run's `Schedule`: `warmup_steps` of linear warm-up, then the
config's scheduler at its cadence (`scheduler_interval`). `fit_saved_state` fits a saved
optimizer state into other parameter groups, so runs saved before the groups still resume.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
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
# Named optimizers' arguments unless optimizer_kwargs sets them. RAdam: the toolkit's
# decoupled_weight_decay=True, so a weight_decay set in optimizer_kwargs is decoupled (AdamW's
# kind); its weight_decay stays torch's 0, as the toolkit's: no decay unless set. SGD: momentum.
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "radam": {"decoupled_weight_decay": True},
    "sgd": {"momentum": 0.9},
}
# Stepped after every optimizer step when scheduler_interval is None: they span the run's steps.
PER_STEP_SCHEDULERS = (
    torch.optim.lr_scheduler.CosineAnnealingLR,
    torch.optim.lr_scheduler.OneCycleLR,
)
Plateau = torch.optim.lr_scheduler.ReduceLROnPlateau


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """`optimizer`: an instance (used as is), a class, or a name in OPTIMIZERS, built with
    `learning_rate` and `optimizer_kwargs` (checked against its signature: a ValueError names
    the key and the accepted names) over `parameter_groups`."""
    choice = config.optimizer
    if isinstance(choice, torch.optim.Optimizer):
        held = {id(p) for group in choice.param_groups for p in group["params"]}
        if not any(id(p) in held for p in model.parameters()):
            raise ValueError(
                "optimizer is an instance over other parameters than the model's, so training "
                "would change nothing; give a name or class, or build it on the `model` you set"
            )
        return choice
    kwargs = dict(config.optimizer_kwargs)
    if isinstance(choice, str):
        kwargs = {**OPTIMIZER_DEFAULTS.get(choice.lower(), {}), **kwargs}
        choice = OPTIMIZERS[choice.lower()]
    check_keywords(choice, kwargs, key="optimizer_kwargs", num_positional=1)
    decay = kwargs.get("weight_decay", _default(choice, "weight_decay"))
    split = not config.weight_decay_norm_and_bias and bool(decay)
    return choice(parameter_groups(model, split=split), lr=config.learning_rate, **kwargs)


def _default(function: Any, name: str) -> Any:
    """The default of `function`'s argument `name`; 0 when it has none (no weight decay)."""
    try:
        parameter = inspect.signature(function).parameters.get(name)
    except (TypeError, ValueError):
        return 0
    return 0 if parameter is None or parameter.default is parameter.empty else parameter.default


def takes_no_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases and norm layers' scales and shifts: every parameter of at most one axis (the
    usual rule: they set offsets and scales, which decay towards 0 would only distort)."""
    return parameter.ndim <= 1 or name.endswith("bias")


def parameter_groups(model: torch.nn.Module, *, split: bool) -> list[dict[str, Any]]:
    """The model's parameters in one group, or (`split`) two: those with the optimizer's
    weight decay, then the biases and norm weights (`takes_no_decay`) with weight_decay 0."""
    if not split:
        return [{"params": list(model.parameters())}]
    named = list(model.named_parameters())
    decay = [p for name, p in named if not takes_no_decay(name, p)]
    no_decay = [p for name, p in named if takes_no_decay(name, p)]
    groups: list[dict[str, Any]] = [
        {"params": decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def parameter_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """The name in `model` of each parameter the optimizer holds, in its state's order (its
    groups one after the other); "" for one the model does not hold. Saved with the state,
    so that `fit_saved_state` can find each parameter's state in other groups."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names.get(id(p), "") for group in optimizer.param_groups for p in group["params"]]


def fit_saved_state(
    saved: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    *,
    saved_names: Sequence[str] | None,
) -> dict[str, Any]:
    """`saved` (an optimizer's state_dict) as `optimizer`'s groups hold the parameters: as it
    is when they match, else each parameter's state found by name (`saved_names`, or, for a
    state of one group saved without them, the model's order, as csc built every optimizer
    before the weight decay groups). Settings come from the saved group that held the
    parameter, except weight_decay, which is the group's now. ValueError when the names do
    not fit this model."""
    names = parameter_names(optimizer, model)
    groups = saved["param_groups"]
    sizes = [len(group["params"]) for group in groups]
    current = [len(group["params"]) for group in optimizer.param_groups]
    if saved_names is None:
        if sizes == current:
            return dict(saved)
        if len(groups) == 1:
            saved_names = [name for name, _ in model.named_parameters()]
    elif list(saved_names) == names and sizes == current:
        return dict(saved)
    keys = [key for group in groups for key in group["params"]]  # the state's, saved order
    if saved_names is None or len(saved_names) != len(keys) or not set(names) <= set(saved_names):
        raise ValueError(
            f"its optimizer state holds {sizes} parameters in {len(groups)} group(s) that do "
            f"not match this model's {current}"
        )
    position = {name: index for index, name in enumerate(saved_names)}
    group_of = [k for k, group in enumerate(groups) for _ in group["params"]]
    state, fitted, start = saved["state"], [], 0
    new_state: dict[int, Any] = {}
    for group in optimizer.param_groups:
        indices = list(range(start, start + len(group["params"])))
        source = groups[group_of[position[names[start]]]] if indices else groups[0]
        settings = {k: v for k, v in source.items() if k != "params"}
        if "weight_decay" in group:
            settings["weight_decay"] = group["weight_decay"]
        fitted.append({**settings, "params": indices})
        for index in indices:
            key = keys[position[names[index]]]
            if key in state:
                new_state[index] = state[key]
        start += len(indices)
    return {"state": new_state, "param_groups": fitted}


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Schedule:
    """The run's `Schedule`: `scheduler` is None, an instance, a class (given
    `scheduler_kwargs`) or a name. Named cosine and onecycle span the run's optimizer steps
    after warm-up; plateau steps on the monitored score."""
    scheduler = build_scheduler(config, optimizer)
    interval = config.scheduler_interval
    if interval is None:
        interval = "step" if isinstance(scheduler, PER_STEP_SCHEDULERS) else "epoch"
    if interval == "step" and isinstance(scheduler, Plateau):
        raise ValueError(  # the config caught names and classes; this is for an instance
            "scheduler_interval 'step' cannot drive ReduceLROnPlateau, which steps on the "
            "validation score once per epoch; use scheduler_interval = None or 'epoch'"
        )
    return Schedule(
        optimizer,
        scheduler,
        interval=interval,
        warmup_steps=config.warmup_steps,
        warmup_start_factor=config.warmup_start_factor,
    )


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The config's scheduler itself (None, the instance given, or built on `optimizer`)."""
    choice, kwargs = config.scheduler, dict(config.scheduler_kwargs)
    if choice is None or not isinstance(choice, str | type):
        if kwargs:
            what = "None" if choice is None else f"an instance of {type(choice).__name__}"
            raise ValueError(
                f"scheduler_kwargs {sorted(kwargs)} need a scheduler name or class, but "
                f"scheduler is {what}"
            )
        return choice
    per_epoch = math.ceil(config.iterations_per_epoch / config.gradient_accumulation_steps)
    steps = max(1, config.epochs * per_epoch - config.warmup_steps)  # after warm-up
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


class Schedule:
    """The learning rate of a run: `warmup_steps` optimizer steps of linear warm-up, from
    `warmup_start_factor` x each group's rate at the first step to the full rate after the
    last, then `scheduler` (None: constant), stepped after every optimizer step (`interval`
    "step") or at the end of every epoch ("epoch"; ReduceLROnPlateau on the epoch's score).
    The scheduler starts after warm-up: its first step follows the first optimizer step (or
    epoch end) after it. The rate is a function of the step count, so a resumed state goes on
    exactly as the uninterrupted run."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        interval: str,
        warmup_steps: int = 0,
        warmup_start_factor: float = 1.0,
    ) -> None:
        self.optimizer, self.scheduler, self.interval = optimizer, scheduler, interval
        self.warmup_steps, self.warmup_start_factor = warmup_steps, warmup_start_factor
        self.num_steps = 0  # optimizer steps so far
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]  # after warm-up
        self._set_warmup_lrs()

    @property
    def warming_up(self) -> bool:
        return self.num_steps < self.warmup_steps

    def warmup_factor(self) -> float:
        """The share of the full rate the next optimizer step uses (1 after warm-up)."""
        if not self.warming_up:
            return 1.0
        start = self.warmup_start_factor
        return start + (1.0 - start) * self.num_steps / self.warmup_steps

    def _set_warmup_lrs(self) -> None:
        """Each group's rate for the next step while warming up, and the full rate once
        warm-up has just ended; later the scheduler's, untouched."""
        if not self.warmup_steps or self.num_steps > self.warmup_steps:
            return  # warm-up over: the scheduler owns the rates
        factor = self.warmup_factor()  # 1.0 once num_steps == warmup_steps: the base rates
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step: warm-up, or a per-step scheduler."""
        stepping = not self.warming_up and self.interval == "step"
        self.num_steps += 1
        if stepping and self.scheduler is not None:
            self.scheduler.step()
        self._set_warmup_lrs()

    def end_epoch(self, score: float | None) -> None:
        """Called at the end of every epoch with the monitored validation score (None without
        validation): a per-epoch scheduler steps, once warm-up is over."""
        if self.scheduler is None or self.warming_up or self.interval != "epoch":
            return
        if isinstance(self.scheduler, Plateau):
            self.scheduler.step(score if score is not None else float("nan"))
        else:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        inner = None if self.scheduler is None else self.scheduler.state_dict()
        return {"num_steps": self.num_steps, "base_lrs": list(self.base_lrs), "scheduler": inner}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """A state of `state_dict`, or one saved before csc had warm-up (the scheduler's own
        state, or None without a scheduler): warm-up then counts as done."""
        num_groups = len(self.optimizer.param_groups)
        if state is None or "num_steps" not in state:
            self.num_steps = self.warmup_steps  # a resumed run does not warm up again
            inner = state
        else:
            self.num_steps = int(state["num_steps"])
            self.base_lrs = _fit_list(list(state["base_lrs"]), num_groups)
            inner = state["scheduler"]
        if self.scheduler is not None and inner is not None:
            self.scheduler.load_state_dict(_fit_groups(inner, num_groups))


# A scheduler state's entries that hold one value per parameter group.
PER_GROUP_KEYS = ("base_lrs", "_last_lr", "min_lrs")


def _fit_groups(state: Mapping[str, Any], num_groups: int) -> dict[str, Any]:
    """A scheduler state saved for another number of parameter groups (a run saved before the
    weight decay groups) with its per-group entries repeated or cut to `num_groups`; every
    group csc builds starts at learning_rate, so the values are the same."""
    fitted = dict(state)
    for key in PER_GROUP_KEYS:
        if isinstance(fitted.get(key), list) and fitted[key]:
            fitted[key] = _fit_list(fitted[key], num_groups)
    return fitted


def _fit_list(values: list[Any], length: int) -> list[Any]:
    return (values + values[-1:] * length)[:length]


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
