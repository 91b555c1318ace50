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
