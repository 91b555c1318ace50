"""Tests of dicomnode.nn.losses."""

from __future__ import annotations

import pytest
import torch

from dicomnode.nn.losses import CrossEntropyDiceLoss, soft_dice_loss


def _logits_for(target: torch.Tensor, classes: int, scale: float = 20.0) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(target, classes).movedim(-1, 1).float()
    return (onehot * 2 - 1) * scale


def test_dice_loss_perfect_and_wrong() -> None:
    target = torch.zeros(2, 4, 8, 8, dtype=torch.long)
    target[:, 1:3, 2:6, 2:6] = 1
    assert float(soft_dice_loss(_logits_for(target, 2), target)) == pytest.approx(0, abs=1e-3)
    assert float(soft_dice_loss(_logits_for(1 - target, 2), target)) > 0.95


def test_weighted_loss_weighs_the_rare_class() -> None:
    target = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    target[0, 0, 0, 0] = 2
    logits = _logits_for(target, 3)
    logits[0, :, 0, 0, 0] = 0.0  # unsure about the one tumour voxel
    plain = CrossEntropyDiceLoss((1.0, 1.0, 1.0), dice_weight=0)(logits, target)
    heavy = CrossEntropyDiceLoss((1.0, 1.0, 5.0), dice_weight=0)(logits, target)
    assert float(heavy) > float(plain)


def test_loss_validates_weights() -> None:
    with pytest.raises(ValueError, match="'ce_weight'"):
        CrossEntropyDiceLoss(ce_weight=0, dice_weight=0)


def test_an_unannotated_organ_is_neither_taught_nor_punished() -> None:
    from dicomnode.nn.losses import DiceFocalLoss, marginal_probabilities

    target = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    target[0, 1:3, 2:5, 2:5] = 1
    # the network sees class 2 where the case has no contour of class 2 (labelled 0)
    logits = _logits_for(target, 3)
    logits[0, 2, 1:3, 5:8, 5:8] = 40.0
    present_all = torch.tensor([[True, True, True]])
    present_12 = torch.tensor([[True, True, False]])
    loss = DiceFocalLoss()
    assert float(loss(logits, (target, present_12))) < float(loss(logits, (target, present_all)))
    assert float(loss(logits, (target, present_12))) == pytest.approx(0, abs=2e-3)
    probs = marginal_probabilities(logits, present_12)
    assert torch.allclose(probs.sum(1), torch.ones(1, 4, 8, 8))
    assert float(probs[:, 2].max()) == 0.0
    with pytest.raises(ValueError, match="'focal_weight'"):
        DiceFocalLoss(focal_weight=-1)


def test_an_annotated_organ_predicted_where_the_patch_has_none_costs_with_absent_voxels() -> None:
    """A resected gland's bed: the organ is annotated (as absent), the patch holds none of
    it, and a network that paints it there pays a Dice-sized price, not a per-voxel one."""
    from dicomnode.nn.losses import DiceFocalLoss

    target = torch.zeros(2, 4, 8, 8, dtype=torch.long)
    target[0, 1:3, 2:5, 2:5] = 1
    target[1, 1:3, 2:5, 2:5] = 1
    logits = _logits_for(target, 3)
    present = torch.tensor([[True, True, True], [True, True, True]])
    clean = DiceFocalLoss(absent_voxels=10.0)
    assert float(clean(logits, (target, present))) == pytest.approx(0, abs=2e-3)
    # class 2 painted over 18 voxels of sample 1, where it is annotated and absent
    painted = logits.clone()
    painted[1, 2, 1:3, 5:8, 5:8] = 40.0
    without = float(DiceFocalLoss()(painted, (target, present)))
    with_term = float(DiceFocalLoss(absent_voxels=10.0)(painted, (target, present)))
    # 18 voxels of mass against 10: 18 / 28 for sample 1, averaged over the two samples
    assert with_term - without == pytest.approx(18 / 28 / 2, abs=0.01)
    # where class 2 is not annotated, the same paint costs nothing more
    unannotated = torch.tensor([[True, True, True], [True, True, False]])
    assert float(DiceFocalLoss(absent_voxels=10.0)(painted, (target, unannotated))) == \
        pytest.approx(float(DiceFocalLoss()(painted, (target, unannotated))), abs=1e-6)
    with pytest.raises(ValueError, match="'absent_voxels'"):
        DiceFocalLoss(absent_voxels=-1)


def test_with_gone_given_only_an_organ_absent_from_the_whole_case_costs_with_absent_voxels(
        ) -> None:
    """A patch beside an intact organ is not a resected organ's bed: with ``gone`` the
    absent-organ cost falls on the organs the case lacks, not on every patch that misses
    an organ."""
    from dicomnode.nn.losses import DiceFocalLoss

    target = torch.zeros(2, 4, 8, 8, dtype=torch.long)
    target[:, 1:3, 2:5, 2:5] = 1
    logits = _logits_for(target, 3)
    logits[1, 2, 1:3, 5:8, 5:8] = 40.0          # class 2 painted where sample 1 has none
    present = torch.ones(2, 3, dtype=torch.bool)
    loss = DiceFocalLoss(absent_voxels=10.0)
    patch_scope = float(loss(logits, (target, present)))
    intact = torch.zeros(2, 3, dtype=torch.bool)                  # class 2 elsewhere
    resected = torch.tensor([[False, False, False], [False, False, True]])
    assert float(loss(logits, (target, present, intact))) == \
        pytest.approx(float(DiceFocalLoss()(logits, (target, present))), abs=1e-6)
    assert float(loss(logits, (target, present, resected))) == pytest.approx(patch_scope)
