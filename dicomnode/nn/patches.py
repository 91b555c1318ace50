"""Patch cropping, intensity augmentation and label resampling shared by every model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dicomnode.nn import runtime


def crop(image: torch.Tensor, labels: torch.Tensor, start: Sequence[int],
         size: Sequence[int], *, fill: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``size`` at ``start`` from a ``[z, y, x]`` image and its labels.

    Where the patch leaves the volume, the image is padded with ``fill`` (air, once
    normalised) and the labels with background.

    Returns
    -------
    tuple
        float32 image and int64 labels of shape ``size``.
    """
    out_img = torch.full(tuple(size), fill, dtype=torch.float32)
    out_lab = torch.zeros(tuple(size), dtype=torch.long)
    src = []
    dst = []
    for s, n, total in zip(start, size, image.shape, strict=True):
        lo, hi = max(0, s), min(total, s + n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out_img[tuple(dst)] = image[tuple(src)].float()
    out_lab[tuple(dst)] = labels[tuple(src)].long()
    return out_img, out_lab


def jitter_intensity(image: torch.Tensor, rng: np.random.Generator, shift: float, *,
                     scale: tuple[float, float] = (0.9, 1.1), noise: float = 0.04
                     ) -> torch.Tensor:
    """Contrast jitter, a shift of every value by up to ``shift`` and a little extra noise.

    Works on the normalised image (``shift`` and ``noise`` in its units): scanners,
    kernels and contrast phases move a tissue's HU, and a network that reads absolute
    HU loses structures then.
    """
    factor = float(rng.uniform(*scale))
    offset = float(rng.uniform(-shift, shift))
    sd = float(rng.uniform(0, noise))
    out = image * factor + offset
    if sd > 0:
        out = out + sd * torch.randn_like(out)
    return out


def labels_to_grid(labels: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                   classes: int) -> torch.Tensor:
    """Resample a label map to another grid: each class interpolated, the most likely kept.

    Parameters
    ----------
    labels : numpy.ndarray
        ``[z, y, x]`` values ``0 .. classes - 1``.
    spacing, target : sequence of float
        Current and wanted ``(dz, dy, dx)`` mm.
    classes : int
        Number of label values (background included).

    Returns
    -------
    torch.Tensor
        uint8 labels on the target grid.
    """
    shape = runtime.shape_for_spacing(labels.shape, spacing, target)
    best = torch.zeros(shape, dtype=torch.float32)
    out = torch.zeros(shape, dtype=torch.uint8)
    for value in range(classes):
        mask = labels == value
        if value and not mask.any():
            continue
        fraction = runtime.resample_to_shape(mask.astype(np.float32), shape)
        better = fraction > best
        best[better] = fraction[better]
        out[better] = value
    return out
