"""csc.losses: NaN targets are ignored, hand-checked values, the registry and build_loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from csc import config
from csc.losses import (
    LOSSES,
    BCELoss,
    DiceBCELoss,
    DiceLoss,
    FocalLoss,
    MaskedLoss,
    build_loss,
    pos_weight_from_counts,
)

NAN = math.nan


def softplus(x: float) -> float:
    """-log(sigmoid(-x)) = log(1 + e^x): BCE of logit x against target 0."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def random_batch(shape: tuple[int, ...], seed: int = 0) -> tuple[Tensor, Tensor]:
    """Logits and a 0/1 target with about a third of the voxels NaN."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * 3
    target = (torch.rand(shape, generator=gen) < 0.3).float()
    target[torch.rand(shape, generator=gen) < 0.3] = NAN
    return logits, target


LOSS_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    **LOSSES,
    "bce_pos_weight": lambda: BCELoss(torch.tensor([2.0, 0.5, 3.0])),
    "dice_bce_fp": lambda: DiceBCELoss(pos_weight=torch.tensor([2.0, 1.0, 1.0]), fp_weight=0.3),
    "focal_no_alpha": lambda: FocalLoss(gamma=1.5, alpha=None, fp_weight=1.0),
    "masked_mse": lambda: MaskedLoss(nn.MSELoss),
    "masked_bce": lambda: MaskedLoss(nn.BCEWithLogitsLoss, pos_weight=torch.tensor([2.0, 1, 1])),
}


def test_registry_matches_config_names() -> None:
    assert tuple(sorted(LOSSES)) == config.LOSS_NAMES


@pytest.mark.parametrize("name", LOSS_FACTORIES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 3, 3, 4, 5)], ids=["2d", "3d"])
def test_nan_voxels_are_ignored(name: str, shape: tuple[int, ...]) -> None:
    loss_fn = LOSS_FACTORIES[name]()
    logits, target = random_batch(shape)
    unannotated = target.isnan()
    changed = torch.where(unannotated, torch.randn(shape) * 100, logits)
    results = []
    for values in (logits, changed):
        values = values.clone().requires_grad_(True)
        loss = loss_fn(values, target)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert torch.isfinite(values.grad).all()
        assert (values.grad[unannotated] == 0).all()
        assert values.grad[~unannotated].abs().sum() > 0
        results.append(loss.detach())
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_all_nan_batch_gives_zero_and_backward_works(name: str) -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = LOSS_FACTORIES[name]()(logits, torch.full((2, 3, 4, 4), NAN))
    assert loss.item() == 0 and loss.grad_fn is not None
    loss.backward()
    assert (logits.grad == 0).all()


def test_bce_value_by_hand() -> None:
    logits = torch.tensor([[[2.0, -1.0, 0.5, 7.0]]])  # (B=1, C=1, X=4)
    target = torch.tensor([[[1.0, 0.0, 0.0, NAN]]])
    expected = (softplus(-2.0) + softplus(-1.0) + softplus(0.5)) / 3
    assert BCELoss()(logits, target).item() == pytest.approx(expected)


def test_bce_pos_weight_scales_positive_voxels_of_each_class() -> None:
    logits = torch.tensor([[[[1.0, -2.0]], [[0.5, 3.0]]]])  # (B=1, C=2, Y=1, X=2)
    target = torch.tensor([[[[1.0, 0.0]], [[1.0, NAN]]]])
    loss = BCELoss(pos_weight=torch.tensor([4.0, 10.0]))(logits, target)
    expected = (4 * softplus(-1.0) + softplus(-2.0) + 10 * softplus(-0.5)) / 3
    assert loss.item() == pytest.approx(expected)


def test_dice_value_by_hand_on_2x2() -> None:
    # Class 0: probabilities 0.5 everywhere, target [[1, 0], [1, NaN]] -> three annotated voxels,
    # sum p = 1.5, sum t = 2, intersection = 1; Dice = (2 + 1) / (3.5 + 1) = 2/3.
    # Class 1 is not annotated at all and stays out of the mean.
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [1.0, NAN]], [[NAN, NAN], [NAN, NAN]]]])
    assert DiceLoss(smooth=1.0)(logits, target).item() == pytest.approx(1 / 3)


def test_dice_perfect_prediction_is_near_zero() -> None:
    target = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    logits = (target * 2 - 1) * 30  # sigmoid ~ 0 or 1
    assert DiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_focal_value_by_hand() -> None:
    logits = torch.tensor([[[1.5, -0.5, 2.0]]])
    target = torch.tensor([[[1.0, 0.0, NAN]]])
    p_pos, p_neg = sigmoid(1.5), sigmoid(-0.5)
    positive = 0.25 * (1 - p_pos) ** 2 * -math.log(p_pos)
    negative = 0.75 * p_neg**2 * -math.log(1 - p_neg)
    assert FocalLoss()(logits, target).item() == pytest.approx((positive + negative) / 2)
    unweighted = ((1 - p_pos) ** 2 * -math.log(p_pos) + p_neg**2 * -math.log(1 - p_neg)) / 2
    assert FocalLoss(alpha=None)(logits, target).item() == pytest.approx(unweighted)


def test_focal_with_gamma_zero_and_no_alpha_is_bce() -> None:
    logits, target = random_batch((2, 3, 4, 4))
    focal = FocalLoss(gamma=0.0, alpha=None)(logits, target)
    torch.testing.assert_close(focal, BCELoss()(logits, target))


def test_dice_bce_is_the_weighted_sum() -> None:
    logits, target = random_batch((2, 3, 4, 4))
    weight = torch.tensor([2.0, 1.0, 0.5])
    combined = DiceBCELoss(dice_weight=0.3, bce_weight=0.7, pos_weight=weight)(logits, target)
    expected = 0.3 * DiceLoss()(logits, target) + 0.7 * BCELoss(weight)(logits, target)
    torch.testing.assert_close(combined, expected)


def test_fp_weight_adds_mean_probability_on_annotated_background() -> None:
    logits = torch.tensor([[[0.0, 2.0, -1.0, 5.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0, NAN]]])
    penalty = (sigmoid(2.0) + sigmoid(-1.0)) / 2
    for cls in LOSSES.values():
        plain = cls()(logits, target).item()
        assert cls(fp_weight=0.5)(logits, target).item() == pytest.approx(plain + 0.5 * penalty)


def test_masked_loss_mse_by_hand() -> None:
    logits = torch.tensor([[[0.5, 2.0, -3.0]]])
    target = torch.tensor([[[1.0, 0.0, NAN]]])
    assert MaskedLoss(nn.MSELoss)(logits, target).item() == pytest.approx((0.25 + 4.0) / 2)


def test_masked_loss_accepts_an_instance_without_changing_it() -> None:
    original = nn.MSELoss()
    logits, target = random_batch((1, 2, 3, 3))
    loss = MaskedLoss(original)(logits, target)
    assert original.reduction == "mean"
    torch.testing.assert_close(loss, MaskedLoss(nn.MSELoss)(logits, target))


def test_masked_loss_rejects_a_loss_that_is_not_elementwise() -> None:
    logits, target = random_batch((1, 2, 3, 4))
    with pytest.raises(ValueError, match="not elementwise"):
        MaskedLoss(nn.CrossEntropyLoss)(logits, target.nan_to_num(0))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 2, 4, 5)], ids=["2d", "3d"])
def test_build_loss_torch_bce_with_kwargs_and_pos_weight(shape: tuple[int, ...]) -> None:
    logits, target = random_batch(shape)
    pos_weight, class_weight = torch.tensor([3.0, 0.5, 2.0]), torch.tensor([1.0, 2.0, 1.0])
    loss_fn = build_loss(
        nn.BCEWithLogitsLoss, criterion_kwargs={"weight": class_weight}, pos_weight=pos_weight
    )
    assert isinstance(loss_fn, MaskedLoss)
    per_class = (3, *[1] * (len(shape) - 2))  # (C, 1, 1[, 1]) broadcasts over (B, C, *spatial)
    values = class_weight.reshape(per_class) * F.binary_cross_entropy_with_logits(
        logits, target.nan_to_num(0), reduction="none", pos_weight=pos_weight.reshape(per_class)
    )
    expected = values[~target.isnan()].mean()
    torch.testing.assert_close(loss_fn(logits, target), expected)


def test_build_loss_by_name_is_case_insensitive_and_passes_pos_weight() -> None:
    weight = torch.tensor([2.0, 3.0])
    loss_fn = build_loss("BCE", pos_weight=weight)
    assert isinstance(loss_fn, BCELoss)
    torch.testing.assert_close(loss_fn.pos_weight, weight)
    dice_bce = build_loss("dice_bce", criterion_kwargs={"dice_weight": 1.0}, pos_weight=weight)
    assert isinstance(dice_bce, DiceBCELoss) and dice_bce.dice_weight == 1.0
    torch.testing.assert_close(dice_bce.bce.pos_weight, weight)


def test_build_loss_leaves_pos_weight_out_of_losses_without_it() -> None:
    loss_fn = build_loss("focal", criterion_kwargs={"gamma": 1.0}, pos_weight=torch.ones(2))
    assert isinstance(loss_fn, FocalLoss) and loss_fn.gamma == 1.0
    assert isinstance(build_loss(DiceLoss, pos_weight=torch.ones(2)), DiceLoss)


def test_build_loss_from_a_csc_class_and_instance() -> None:
    loss_fn = build_loss(DiceLoss, criterion_kwargs={"smooth": 0.5})
    assert isinstance(loss_fn, DiceLoss) and loss_fn.smooth == 0.5
    instance = FocalLoss(gamma=3.0)
    assert build_loss(instance, pos_weight=torch.ones(2)) is instance


def test_build_loss_wraps_torch_mse() -> None:
    logits, target = random_batch((2, 2, 3, 3))
    loss_fn = build_loss(nn.MSELoss, pos_weight=torch.ones(2))  # MSELoss takes no pos_weight
    mask = ~target.isnan()
    expected = ((logits - target.nan_to_num(0)) ** 2)[mask].mean()
    torch.testing.assert_close(loss_fn(logits, target), expected)
    assert isinstance(build_loss(nn.MSELoss()), MaskedLoss)


def test_build_loss_unknown_name_lists_the_registry() -> None:
    with pytest.raises(
        ValueError, match=r"unknown loss 'dcie'; available: bce, dice, dice_bce, focal"
    ):
        build_loss("dcie")


@pytest.mark.parametrize(
    ("criterion", "kwargs", "message"),
    [
        (42, None, "criterion must be a loss name"),
        (str, None, "criterion must be a loss name"),
        (nn.MSELoss(), {"reduction": "sum"}, "need a loss name or class"),
    ],
)
def test_build_loss_rejects_bad_criteria(
    criterion: object, kwargs: dict | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss(criterion, criterion_kwargs=kwargs)  # type: ignore[arg-type]


def test_pos_weight_of_the_wrong_length_says_what_to_do() -> None:
    logits, target = random_batch((1, 3, 2, 2))
    with pytest.raises(ValueError, match="one weight per class"):
        BCELoss(torch.ones(2))(logits, target)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="must have the same shape"):
        DiceLoss()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))


def test_pos_weight_from_counts() -> None:
    weight = pos_weight_from_counts([10, 50, 99, 0, 0, 1], [100, 100, 100, 100, 0, 1000])
    assert weight.dtype == torch.float32 and weight.shape == (6,)
    expected = [9.0, 1.0, 1 / 99, 100.0, 1.0, 100.0]  # clipped to [1/100, 100]
    torch.testing.assert_close(weight, torch.tensor(expected))
    assert torch.isfinite(pos_weight_from_counts([0.0], [0.0], max_weight=5.0)).all()
    assert pos_weight_from_counts([0], [10], max_weight=5.0).item() == 5.0


@pytest.mark.parametrize(
    ("foreground", "total", "max_weight", "message"),
    [
        ([1, 2], [10], 100.0, "same length"),
        ([11], [10], 100.0, "foreground <= total"),
        ([-1], [10], 100.0, "foreground <= total"),
        ([1], [10], 0.5, "max_weight must be >= 1"),
    ],
)
def test_pos_weight_from_counts_rejects_bad_counts(
    foreground: list[float], total: list[float], max_weight: float, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        pos_weight_from_counts(foreground, total, max_weight=max_weight)


@pytest.mark.parametrize("name", LOSS_FACTORIES)
def test_half_precision_logits_give_a_float32_loss(name: str) -> None:
    logits, target = random_batch((2, 3, 4, 4))
    half = logits.bfloat16().requires_grad_(True)
    loss = LOSS_FACTORIES[name]()(half, target)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    expected = LOSS_FACTORIES[name]()(half.detach().float(), target)
    torch.testing.assert_close(loss.detach(), expected)
