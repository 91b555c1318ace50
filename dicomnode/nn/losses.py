"""Segmentation losses: weighted cross-entropy plus soft Dice."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 - the name every torch reader knows
from torch import nn

log = logging.getLogger(__name__)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, *,
                   classes: Sequence[int] | None = None, eps: float = 1.0) -> torch.Tensor:
    """Mean ``1 - Dice`` over foreground classes, computed over the whole batch.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, C, ...]`` raw network outputs.
    target : torch.Tensor
        ``[B, ...]`` integer labels in ``0 .. C-1``.
    classes : sequence of int, optional
        Classes to average over (default: every class but 0).
    eps : float
        Smoothing in voxels, so that a class absent from patch and prediction scores 1.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    num_classes = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), num_classes).movedim(-1, 1).float()
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    chosen = list(classes) if classes is not None else list(range(1, num_classes))
    return 1 - dice[chosen].mean()


class CrossEntropyDiceLoss(nn.Module):
    """``ce_weight * weighted cross-entropy + dice_weight * soft Dice``.

    Parameters
    ----------
    class_weights : sequence of float, optional
        Cross-entropy weight per class (rare classes such as tumours weigh more).
    ce_weight, dice_weight : float
        Mix of the two terms.
    """

    def __init__(self, class_weights: Sequence[float] | None = None, *, ce_weight: float = 1.0,
                 dice_weight: float = 1.0) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise ValueError(f"Invalid 'ce_weight'/'dice_weight' values '{ce_weight}', "
                             f"'{dice_weight}' - must be >= 0 and not both 0")
        weights = None if class_weights is None else torch.tensor(list(class_weights),
                                                                   dtype=torch.float32)
        self.register_buffer("class_weights", weights)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` ``[B, C, ...]`` against integer ``target`` ``[B, ...]``."""
        weight: torch.Tensor | None = self.class_weights  # type: ignore[assignment]
        ce = F.cross_entropy(logits.float(), target.long(), weight=weight)
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target)


def marginal_probabilities(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities with each sample's unannotated classes merged into background.

    A structure nobody contoured in a case (incomplete planning data) is labelled
    background there; teaching the network that its voxels are background would teach
    it to miss the organ. Merging its probability into background (the "marginal loss"
    of partially labelled data) scores only what the annotation can tell.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, C, ...]``.
    present : torch.Tensor
        ``[B, C]`` bool, True where the class is annotated in that sample (background
        always is).

    Returns
    -------
    torch.Tensor
        ``[B, C, ...]`` probabilities; absent classes are 0, background holds their mass.
    """
    probs = torch.softmax(logits.float(), dim=1)
    shape = (*present.shape, *([1] * (logits.ndim - 2)))
    keep = present.to(probs.dtype).reshape(shape)
    absent_mass = (probs * (1 - keep)).sum(1)
    out = probs * keep
    out[:, 0] = out[:, 0] + absent_mass
    return out


class DiceFocalLoss(nn.Module):
    """AnatomyNet's loss: soft Dice over the organs plus ``focal_weight`` times focal loss.

    Dice is computed per class over the whole batch and averaged over the organs that
    appear in the batch's annotation: an organ no patch holds has no overlap to score,
    and a constant 1 per absent organ would only hide how well the others are learned.
    With ``absent_voxels`` > 0, an organ annotated in a sample but absent from its patch
    (a resected gland's bed, say) adds ``P / (P + absent_voxels)``, ``P`` the organ's
    probability mass in the patch, summed over such organs and averaged over the
    samples: a false organ the size of a small one costs as much as a missed organ,
    where the focal term alone (averaged over every voxel) hardly weighs it. A target
    that also carries ``gone`` (organs annotated and absent from the whole case) limits
    that cost to those organs, so that a patch beside an intact organ is not charged
    for its rim at the per-voxel rate a bed is. The focal term
    ``-(1 - p_t)^gamma log p_t`` is averaged over voxels. Both use
    :func:`marginal_probabilities`, so an organ missing from a case's annotation is
    neither rewarded nor punished there.

    Parameters
    ----------
    focal_weight : float
        Weight of the focal term (the paper's lambda: 0.5).
    gamma : float
        Focal exponent (the paper: 2).
    eps : float
        Dice smoothing in voxels.
    absent_voxels : float
        Probability mass (in voxels) at which an annotated organ missing from a patch
        costs 0.5; 0 leaves such organs to the focal term.
    """

    def __init__(self, focal_weight: float = 0.5, gamma: float = 2.0, eps: float = 1.0,
                 absent_voxels: float = 0.0) -> None:
        super().__init__()
        if focal_weight < 0 or gamma < 0:
            raise ValueError(f"Invalid 'focal_weight'/'gamma' values '{focal_weight}', "
                             f"'{gamma}' - must be >= 0")
        if absent_voxels < 0:
            raise ValueError(f"Invalid 'absent_voxels' value '{absent_voxels}' - must be >= 0")
        self.focal_weight = focal_weight
        self.gamma = gamma
        self.eps = eps
        self.absent_voxels = absent_voxels

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Loss of ``logits`` ``[B, C, ...]`` against ``target`` ``[B, ...]``,
        ``(target, present)`` or ``(target, present, gone)``, ``present`` and ``gone``
        ``[B, C]`` (default: all annotated; ``gone``: see the class)."""
        gone = None
        if isinstance(target, tuple):
            labels, present, *rest = target
            gone = rest[0] if rest else None
        else:
            labels = target
            present = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        present = present.clone()
        present[:, 0] = True
        num_classes = logits.shape[1]
        probs = marginal_probabilities(logits, present)
        onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()
        voxels = tuple(range(2, logits.ndim))
        mass, truth_each = probs.sum(voxels), onehot.sum(voxels)     # [B, C] each
        inter = (probs * onehot).sum((0, *voxels))
        truth = truth_each.sum(0)
        dice = (2 * inter + self.eps) / (mass.sum(0) + truth + self.eps)  # [C]
        organs = (truth[1:] > 0).float()
        dice_loss = ((1 - dice[1:]) * organs).sum() / organs.sum().clamp_min(1)
        p_true = (probs * onehot).sum(1).clamp_min(1e-6)
        focal = (-(1 - p_true) ** self.gamma * torch.log(p_true)).mean()
        loss = dice_loss + self.focal_weight * focal
        if self.absent_voxels > 0:
            empty = present[:, 1:] & (truth_each[:, 1:] == 0)
            if gone is not None:
                empty = empty & gone[:, 1:]
            cost = mass[:, 1:] / (mass[:, 1:] + self.absent_voxels) * empty
            loss = loss + cost.sum() / logits.shape[0]
        return loss
