"""Segmentation losses that ignore unannotated (NaN) target voxels.

Every loss takes raw logits and a target of the same shape, ``(B, C, Y, X)`` or
``(B, C, Z, Y, X)``: 1 where a class is present, 0 where it is absent, NaN where it is not
annotated. NaN voxels add nothing to the loss and get a zero gradient; averages run over
annotated voxels only. A batch without annotated voxels gives a loss of 0 that is still
connected to the logits, so ``loss.backward()`` works (every gradient is 0).

All csc losses take ``fp_weight`` (default 0): it adds ``fp_weight`` times the mean predicted
probability over annotated background voxels (target 0, all classes pooled), a penalty on
false positives on top of the loss itself.
"""

from __future__ import annotations

import abc
import copy
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own spelling)
from torch import Tensor, nn

from csc import registries
from csc.config import check_keywords

__all__ = [
    "LOSSES",
    "BCELoss",
    "DiceBCELoss",
    "DiceLoss",
    "FocalLoss",
    "MaskedLoss",
    "SegmentationLoss",
    "build_loss",
    "check_criterion",
    "pos_weight_from_counts",
]


def annotated(target: Tensor) -> tuple[Tensor, Tensor]:
    """The annotation mask (bool) and the target with NaN replaced by 0, both like `target`."""
    mask = torch.isfinite(target)
    return mask, torch.where(mask, target, torch.zeros_like(target))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` is set; 0 (still connected to `values`) where it never is."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _class_shaped(weight: Tensor, logits: Tensor) -> Tensor:
    """A per-class `(C,)` weight reshaped to broadcast over `(B, C, *spatial)`."""
    num_classes = logits.shape[1]
    if weight.numel() != num_classes:
        raise ValueError(
            f"pos_weight has {weight.numel()} values but the logits have {num_classes} classes "
            f"(shape {tuple(logits.shape)}); give one weight per class"
        )
    return weight.to(logits.device, logits.dtype).reshape(num_classes, *([1] * (logits.dim() - 2)))


def _check_pair(logits: Tensor, target: Tensor) -> None:
    if logits.shape != target.shape or logits.dim() < 3:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same "
            "shape (B, C, *spatial)"
        )


class SegmentationLoss(nn.Module, abc.ABC):
    """Base of csc's losses: NaN-masking, shape checks and the optional false-positive term."""

    def __init__(self, *, fp_weight: float = 0.0) -> None:
        super().__init__()
        if fp_weight < 0:
            raise ValueError(f"fp_weight must be >= 0, got {fp_weight}")
        self.fp_weight = float(fp_weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_pair(logits, target)
        logits = logits.float()  # bf16/fp16 sums over a whole batch would lose precision
        mask, clean = annotated(target.float())
        loss = self.masked_loss(logits, clean, mask)
        if self.fp_weight > 0:
            background = mask & (clean == 0)
            loss = loss + self.fp_weight * masked_mean(torch.sigmoid(logits), background)
        return loss

    @abc.abstractmethod
    def masked_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """The loss over voxels where `mask` is set; `target` has no NaN."""


class BCELoss(SegmentationLoss):
    """Binary cross-entropy with logits, averaged over annotated voxels.

    `pos_weight` (shape ``(C,)``) multiplies the loss on each class's positive voxels.
    """

    pos_weight: Tensor | None

    def __init__(self, pos_weight: Tensor | None = None, *, fp_weight: float = 0.0) -> None:
        super().__init__(fp_weight=fp_weight)
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight)

    def masked_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        weight = None if self.pos_weight is None else _class_shaped(self.pos_weight, logits)
        values = F.binary_cross_entropy_with_logits(
            logits, target, reduction="none", pos_weight=weight
        )
        return masked_mean(values, mask)


class DiceLoss(SegmentationLoss):
    """Soft Dice loss: ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` per class.

    Sums run over the annotated voxels of the whole batch; the loss is the mean over the classes
    that have annotated voxels in the batch.
    """

    def __init__(self, smooth: float = 1.0, *, fp_weight: float = 0.0) -> None:
        super().__init__(fp_weight=fp_weight)
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.smooth = float(smooth)

    def masked_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        dims = [0, *range(2, logits.dim())]  # every axis but C of (B, C, *spatial)
        weight = mask.to(logits.dtype)
        probs = torch.sigmoid(logits) * weight
        target = target * weight
        intersection = (probs * target).sum(dims)  # (C,)
        denominator = probs.sum(dims) + target.sum(dims)  # (C,)
        # smooth = 0 on a class without foreground or predictions would give 0/0.
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth).clamp(min=1e-12)
        has_annotation = mask.any(dim=0).flatten(1).any(dim=1)  # (C,)
        return masked_mean(1 - dice, has_annotation)


class DiceBCELoss(SegmentationLoss):
    """``dice_weight * DiceLoss + bce_weight * BCELoss``."""

    def __init__(
        self,
        dice_weight: float = 0.5,
        bce_weight: float = 0.5,
        pos_weight: Tensor | None = None,
        *,
        smooth: float = 1.0,
        fp_weight: float = 0.0,
    ) -> None:
        super().__init__(fp_weight=fp_weight)
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.dice = DiceLoss(smooth)
        self.bce = BCELoss(pos_weight)

    def masked_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        dice = self.dice.masked_loss(logits, target, mask)
        bce = self.bce.masked_loss(logits, target, mask)
        return self.dice_weight * dice + self.bce_weight * bce


class FocalLoss(SegmentationLoss):
    """Focal loss ``alpha_t (1 - p_t)^gamma BCE``, averaged over annotated voxels.

    ``alpha`` weights positives (``1 - alpha`` negatives); ``None`` leaves both at 1.
    """

    def __init__(
        self, gamma: float = 2.0, alpha: float | None = 0.25, *, fp_weight: float = 0.0
    ) -> None:
        super().__init__(fp_weight=fp_weight)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
        self.gamma = float(gamma)
        self.alpha = alpha

    def masked_loss(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        probs = torch.sigmoid(logits)
        p_true = probs * target + (1 - probs) * (1 - target)  # probability of the true label
        values = (1 - p_true) ** self.gamma * bce
        if self.alpha is not None:
            values = (self.alpha * target + (1 - self.alpha) * (1 - target)) * values
        return masked_mean(values, mask)


class MaskedLoss(nn.Module):
    """Any elementwise torch loss (e.g. ``nn.MSELoss``) with NaN targets ignored.

    `loss_fn` is a loss class, built with ``reduction="none"`` and `kwargs`, or an instance,
    copied with its reduction set to ``"none"``. The inner loss sees channels-last tensors
    ``(B, *spatial, C)``, so per-class weights such as ``pos_weight`` have shape ``(C,)`` in 2D
    and 3D alike.
    """

    def __init__(self, loss_fn: type[nn.Module] | nn.Module, **kwargs: Any) -> None:
        super().__init__()
        if isinstance(loss_fn, nn.Module):
            if kwargs:
                raise ValueError(
                    f"keyword arguments {sorted(kwargs)} need a loss class, not an instance; "
                    f"pass {type(loss_fn).__name__} itself"
                )
            self.loss = copy.deepcopy(loss_fn)
            # The ignore: torch types Module.__setattr__ for tensors and modules; a str works.
            self.loss.reduction = "none"  # type: ignore[assignment]
        else:
            self.loss = loss_fn(reduction="none", **kwargs)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_pair(logits, target)
        logits = logits.float()  # bf16/fp16 sums over a whole batch would lose precision
        mask, clean = annotated(target.float())
        # (B, C, *spatial) -> (B, *spatial, C) so that (C,) weights broadcast over classes.
        values = self.loss(logits.movedim(1, -1), clean.movedim(1, -1))
        if values.shape != mask.movedim(1, -1).shape:
            raise ValueError(
                f"{type(self.loss).__name__} is not elementwise: with reduction='none' it "
                f"returned shape {tuple(values.shape)} for inputs {tuple(logits.shape)}"
            )
        return masked_mean(values, mask.movedim(1, -1))


# The registry's names (csc.registries.LOSSES), each with its class (defined above).
LOSSES: dict[str, type[SegmentationLoss]] = {
    name: registries.resolve(reference) for name, reference in registries.LOSSES.items()
}


def build_loss(
    criterion: str | type | nn.Module,
    *,
    criterion_kwargs: Mapping[str, Any] | None = None,
    pos_weight: Tensor | None = None,
) -> nn.Module:
    """A loss from a registry name, a csc or torch loss class, or a loss instance.

    `pos_weight` (``(C,)``) goes only to losses whose constructor takes it (``bce``,
    ``dice_bce``, ``torch.nn.BCEWithLogitsLoss``); a ``pos_weight`` in `criterion_kwargs` wins,
    in the toolkit's shape too (``w[:, None, None]``: per class, trailing singleton axes).
    Torch losses are wrapped in `MaskedLoss`. An instance is used as given (a torch one
    wrapped), without `criterion_kwargs` or `pos_weight`.
    """
    kwargs = dict(criterion_kwargs or {})
    if kwargs.get("pos_weight") is not None:
        kwargs["pos_weight"] = per_class(kwargs["pos_weight"])
    criterion = check_criterion(criterion, kwargs)
    if isinstance(criterion, nn.Module):
        return criterion if isinstance(criterion, SegmentationLoss) else MaskedLoss(criterion)
    if pos_weight is not None and "pos_weight" in inspect.signature(criterion).parameters:
        kwargs = {"pos_weight": pos_weight, **kwargs}
    if issubclass(criterion, SegmentationLoss):
        return criterion(**kwargs)
    return MaskedLoss(criterion, **kwargs)


def per_class(weight: Any) -> Tensor:
    """A per-class weight as ``(C,)``: the toolkit's ``(C, 1, 1)`` (or ``(C, 1, 1, 1)``) weights
    classes on the channel axis of ``(B, C, *spatial)``, which `MaskedLoss` moves last. Other
    shapes stay as given."""
    tensor = torch.as_tensor(weight, dtype=torch.float32)
    if tensor.dim() > 1 and all(n == 1 for n in tensor.shape[1:]):
        return tensor.reshape(-1)
    return tensor


def check_criterion(
    criterion: str | type | nn.Module, criterion_kwargs: Mapping[str, Any] | None = None
) -> type[nn.Module] | nn.Module:
    """The loss class (or instance) `criterion` names, checked with its `criterion_kwargs`
    before anything is built: `ValueError` naming the key for an unknown name or argument."""
    kwargs = dict(criterion_kwargs or {})
    if isinstance(criterion, str):
        criterion = _registered(criterion)
    if isinstance(criterion, nn.Module):
        if kwargs:
            raise ValueError(
                "criterion_kwargs need a loss name or class; the criterion is already an "
                f"instance of {type(criterion).__name__}"
            )
        return criterion
    if not (isinstance(criterion, type) and issubclass(criterion, nn.Module)):
        raise ValueError(
            f"criterion must be a loss name ({', '.join(sorted(LOSSES))}), a torch loss class "
            f"or a loss instance, got {criterion!r}"
        )
    if not issubclass(criterion, SegmentationLoss) and "reduction" in kwargs:
        raise ValueError(
            "criterion_kwargs: csc sets 'reduction' of a torch loss itself ('none', then the "
            "mean over annotated voxels); leave it out"
        )
    check_keywords(criterion, kwargs, key="criterion_kwargs")
    return criterion


def _registered(name: str) -> type[SegmentationLoss]:
    if name.lower() not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name.lower()]


def pos_weight_from_counts(
    foreground: Sequence[float], total: Sequence[float], *, max_weight: float = 100.0
) -> Tensor:
    """Per-class ``pos_weight`` = negatives / positives = ``(total - fg) / fg``, as ``(C,)``.

    Clipped to ``[1 / max_weight, max_weight]``. A class with no foreground voxels gets
    `max_weight` (the limit as fg -> 0; it has no positives to weight anyway); a class with no
    annotated voxels at all (total 0) gets 1.
    """
    fg = torch.as_tensor(foreground, dtype=torch.float64)
    tot = torch.as_tensor(total, dtype=torch.float64)
    _check_counts(fg, tot, max_weight)
    ratio = (tot - fg) / torch.where(fg > 0, fg, 1.0)  # fg == 0 gets max_weight below
    weight = torch.where(fg > 0, ratio, max_weight).clamp(1 / max_weight, max_weight)
    return torch.where(tot > 0, weight, 1.0).to(torch.float32)


def _check_counts(fg: Tensor, tot: Tensor, max_weight: float) -> None:
    if fg.shape != tot.shape or fg.dim() != 1:
        raise ValueError(
            f"foreground {tuple(fg.shape)} and total {tuple(tot.shape)} must be flat sequences "
            "of the same length (one count per class)"
        )
    if not (torch.isfinite(fg).all() and torch.isfinite(tot).all()):
        raise ValueError("foreground and total voxel counts must be finite")
    if (fg < 0).any() or (fg > tot).any():
        raise ValueError(
            f"need 0 <= foreground <= total for every class, got foreground {fg.tolist()} "
            f"and total {tot.tolist()}"
        )
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight}")
