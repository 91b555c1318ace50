"""The 2.5D context network for liver and tumours, two-stage inference, post-processing.

Network (:class:`Liver25DNet`), after the 2.5D liver/tumour context networks of the
LiTS era: a slab of adjacent slices goes in; the encoder's first convolutions are 3D
(kernel 3 along z) so that each output slice sees ``context_slices`` neighbours; deeper
encoder levels, the atrous spatial pyramid pooling (ASPP) block and the light decoder
of depthwise-separable convolutions work per slice (2D). The output has the slab's
shape, so the same network runs under the generic
:func:`dicomnode.nn.runtime.sliding_window_inference`.

Two stages (:class:`LiverTumorSegmenter`):

1. liver on a coarse grid (``LIVER_SPACING``) over the whole volume;
2. liver and tumours at finer resolution (``TUMOUR_SPACING``) inside the liver's bounding
   box dilated by ``BOX_MARGIN_MM``.

Intensities: HU clipped to ``HU_WINDOW`` [-200, 250] and scaled to [-1, 1].
Post-processing (:func:`postprocess`): the largest liver component, holes filled,
tumours only inside the liver, islands smaller than ``min_tumour_ml`` removed. The
training recipe (data, samplers, scores) is :mod:`dicomnode.nn.liver_tumor`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from dicomnode.imaging import morphology
from dicomnode.nn import runtime
from dicomnode.nn.runtime import Segmentation

log = logging.getLogger(__name__)

#: CT window the network sees (HU).
HU_WINDOW: tuple[float, float] = (-200.0, 250.0)
#: Grid of stage 1 (liver), ``(dz, dy, dx)`` mm.
LIVER_SPACING: tuple[float, float, float] = (4.0, 3.125, 3.125)
#: Grid of stage 2 (liver + tumours inside the liver box), ``(dz, dy, dx)`` mm.
TUMOUR_SPACING: tuple[float, float, float] = (2.0, 1.5625, 1.5625)
#: Margin added around the stage-1 liver box before stage 2 (mm).
BOX_MARGIN_MM: float = 15.0
#: Output labels.
BACKGROUND, LIVER, TUMOUR = 0, 1, 2


def normalise_hu(hu: torch.Tensor | np.ndarray,
                 window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """:func:`~dicomnode.nn.runtime.normalise_hu` with this model's window."""
    return runtime.normalise_hu(hu, window)


def _fold(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, C, D, H, W]`` -> ``[B*D, C, H, W]`` so 2D layers run per slice."""
    b, c, d, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w), d


def _unfold(x: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of :func:`_fold`."""
    bd, c, h, w = x.shape
    return x.reshape(bd // depth, depth, c, h, w).permute(0, 2, 1, 3, 4)


class _Conv3d(nn.Sequential):
    """3x3x3 convolution, batch norm, ReLU (optionally strided in-plane)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv3d(cin, cout, 3, stride=(1, stride, stride), padding=1,
                                   bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class _Conv2d(nn.Sequential):
    """3x3 convolution, batch norm, ReLU (optionally strided or dilated)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1,
                 kernel: int = 3) -> None:
        pad = dilation * (kernel // 2)
        super().__init__(nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad,
                                   dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1 convolution, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel dilated convolutions and a global context."""

    def __init__(self, cin: int, cout: int, dilations: Sequence[int] = (1, 2, 4, 6)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_Conv2d(cin, cout, kernel=1)]
            + [_Conv2d(cin, cout, dilation=d) for d in dilations[1:]])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1),
                                  nn.ReLU(inplace=True))
        self.project = _Conv2d(cout * (len(self.branches) + 1), cout, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, cin, H, W]`` -> ``[N, cout, H, W]``."""
        outs = [branch(x) for branch in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


class Liver25DNet(nn.Module):
    """2.5D context network: 3D encoder stem, 2D encoder, ASPP, separable-conv decoder.

    Parameters
    ----------
    num_classes : int
        Output channels (2: background/liver; 3: background/liver/tumour).
    width : int
        Channels of the first level (doubles twice).
    in_channels : int
        Input channels (1: normalised HU).

    Notes
    -----
    Input ``[B, in_channels, D, H, W]`` with ``H`` and ``W`` multiples of 8 for exact
    skips (others are cropped/padded internally); output ``[B, num_classes, D, H, W]``.
    Three 3D convolutions give every slice a context of ``context_slices`` = 7 slices.
    """

    context_slices = 7

    def __init__(self, num_classes: int = 2, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Invalid 'num_classes' value '{num_classes}' - must be >= 2")
        if width < 4:
            raise ValueError(f"Invalid 'width' value '{width}' - must be >= 4")
        w = width
        self.num_classes = num_classes
        self.width = width
        # the 3D part: one convolution at full resolution (cheap: one input channel),
        # two at half resolution, where 3D convolutions cost a quarter
        self.stem = _Conv3d(in_channels, w)                                       # 1/1
        self.down1 = nn.Sequential(_Conv3d(w, 2 * w, stride=2), _Conv3d(2 * w, 2 * w))  # 1/2
        self.down2 = nn.Sequential(_Conv2d(2 * w, 4 * w, stride=2), _Conv2d(4 * w, 4 * w))
        self.down3 = nn.Sequential(_Conv2d(4 * w, 4 * w, stride=2), _Conv2d(4 * w, 4 * w))
        self.aspp = ASPP(4 * w, 4 * w)
        self.up3 = SeparableConv2d(8 * w, 2 * w)
        self.up2 = SeparableConv2d(4 * w, w)
        self.up1 = SeparableConv2d(2 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, size=like.shape[-2:], mode="bilinear",
                                         align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes, D, H, W]`` for a slab ``[B, C, D, H, W]``."""
        if x.ndim != 5:
            raise ValueError(f"Invalid input of shape {tuple(x.shape)} - must be [B, C, D, H, W]")
        s0 = self.stem(x)
        s1 = self.down1(s0)
        f0, depth = _fold(s0)
        f1, _ = _fold(s1)
        f2 = self.down2(f1)
        f3 = self.aspp(self.down3(f2))
        y = self.up3(torch.cat([self._up(f3, f2), f2], dim=1))
        y = self.up2(torch.cat([self._up(y, f1), f1], dim=1))
        y = self.up1(torch.cat([self._up(y, f0), f0], dim=1))
        return _unfold(self.head(y), depth)


# ---------------------------------------------------------------------------------------
# Post-processing


def _components(mask: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...] | None,
                                            np.ndarray, np.ndarray]:
    """26-connected components of ``mask``, labelled in its bounding box only.

    Returns the boolean mask, the box (None when empty), the labels inside the box and
    each label's voxel count (index 0 unused). Raster order inside the box is the same as
    in the whole array, so the numbering, and any tie between equal sizes, is too.
    """
    mask = np.asarray(mask, dtype=bool)
    box = morphology.bounding_box(mask)
    if box is None:
        return mask, None, np.zeros((0,) * mask.ndim, dtype=np.int32), np.zeros(1, np.intp)
    inner = mask[box]
    labels, count = ndimage.label(inner, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(labels[inner], minlength=count + 1)
    sizes[0] = 0
    return mask, box, labels, sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (empty stays empty)."""
    mask, box, labels, sizes = _components(mask)
    if box is None or len(sizes) <= 2:
        return mask.copy()
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = labels == int(np.argmax(sizes))
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes in 3D and in every axial slice."""
    return morphology.fill_holes(morphology.fill_holes(mask), morphology.IN_PLANE)


def remove_small_islands(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop 26-connected components smaller than ``min_voxels``."""
    mask, box, labels, sizes = _components(mask)
    if box is None:
        return mask.copy()
    keep = sizes >= min_voxels
    keep[0] = False
    out = np.zeros(mask.shape, dtype=bool)
    out[box] = keep[labels]
    return out


def clean_organ(organ: np.ndarray) -> np.ndarray:
    """The organ (liver with its tumours): its largest component with holes filled."""
    return fill_holes(largest_component(organ))


def postprocess(labels: np.ndarray, spacing: Sequence[float], *,
                min_tumour_ml: float = 0.1, organ: np.ndarray | None = None) -> np.ndarray:
    """Clean a liver/tumour label map.

    Parameters
    ----------
    labels : numpy.ndarray
        ``[z, y, x]`` with 0 background, 1 liver, 2 tumour.
    spacing : sequence of float
        ``(dz, dy, dx)`` mm.
    min_tumour_ml : float
        Tumour islands below this volume are relabelled liver.
    organ : numpy.ndarray, optional
        ``clean_organ(labels > 0)`` when the caller has it already (several labellings
        of one organ).

    Returns
    -------
    numpy.ndarray
        uint8 labels: the liver (tumours included) is its largest component with holes
        filled; tumours lie only inside it.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if organ is None:
        organ = clean_organ(labels > 0)
    tumour = (labels == TUMOUR) & organ
    tumour = remove_small_islands(tumour, max(1, int(np.ceil(min_tumour_ml / voxel_ml))))
    # tumour lies inside the organ: liver everywhere in it, tumour on top
    out = organ.astype(np.uint8) * np.uint8(LIVER)
    out[tumour] = TUMOUR
    return out


# ---------------------------------------------------------------------------------------
# Two-stage inference


class LiverTumorSegmenter(runtime.SlidingWindowSegmenter):
    """Stage 1 (liver, coarse) then stage 2 (liver + tumours in the liver box, fine).

    Parameters
    ----------
    liver_net, tumour_net : Liver25DNet
        Stage-1 network (2 classes) and stage-2 network (3 classes), weights loaded.
    device : torch.device
        Where the networks run.
    roi_liver, roi_tumour : tuple of int
        Sliding-window sizes ``(rz, ry, rx)`` on each stage's grid.
    batch_size : int, optional
        Windows per forward pass (default 2 on a CPU, 8 on a GPU).
    min_tumour_ml : float
        Tumour islands below this volume are relabelled liver (checkpoints chosen on
        validation cases carry their own).
    tumour_threshold : float, optional
        A voxel of the organ is tumour when its tumour probability reaches this
        (chosen on validation cases by ``dicomnode train``); None: the most probable
        class.
    """

    def __init__(self, liver_net: Liver25DNet, tumour_net: Liver25DNet, device: torch.device,
                 *, roi_liver: tuple[int, int, int] = (24, 128, 128),
                 roi_tumour: tuple[int, int, int] = (24, 128, 128), batch_size: int | None = None,
                 min_tumour_ml: float = 0.2, tumour_threshold: float | None = None) -> None:
        if tumour_threshold is not None and not 0 < tumour_threshold < 1:
            raise ValueError(f"Invalid 'tumour_threshold' value '{tumour_threshold}' - must "
                             "be in (0, 1)")
        if min_tumour_ml < 0:
            raise ValueError(f"Invalid 'min_tumour_ml' value '{min_tumour_ml}' - must be >= 0")
        super().__init__(device, batch_size)
        self.tumour_threshold = tumour_threshold
        self.liver_net = liver_net.to(device).eval()
        self.tumour_net = tumour_net.to(device).eval()
        self.roi_liver = roi_liver
        self.roi_tumour = roi_tumour
        self.min_tumour_ml = min_tumour_ml

    def windows(self) -> list[tuple[nn.Module, tuple[int, int, int], int]]:
        """Both stages with their window sizes (one input channel each)."""
        return [(self.liver_net, self.roi_liver, 1), (self.tumour_net, self.roi_tumour, 1)]

    def segment(self, hu: np.ndarray, spacing: Sequence[float]) -> Segmentation:
        """Segment liver and tumours of one ``[z, y, x]`` HU volume.

        Returns
        -------
        Segmentation
            uint8 labels on the input grid (0 background, 1 liver, 2 tumour; empty when
            no liver was found) and seconds per stage.
        """
        return self.segment_rules(hu, spacing,
                                  [(self.tumour_threshold, self.min_tumour_ml)])[0]

    def segment_rules(self, hu: np.ndarray, spacing: Sequence[float],
                      rules: Sequence[tuple[float | None, float]]) -> list[Segmentation]:
        """Run the networks once and label the volume by each labelling rule.

        Parameters
        ----------
        hu : numpy.ndarray
            ``[z, y, x]`` Hounsfield units.
        spacing : sequence of float
            ``(dz, dy, dx)`` mm.
        rules : sequence of (float or None, float)
            ``(tumour threshold, smallest tumour island in ml)`` pairs; a threshold of
            None labels the most probable class.

        Returns
        -------
        list of Segmentation
            One per rule, in order; the timings are those of the whole run.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        spacing = tuple(float(s) for s in spacing)
        shape = hu.shape
        # on a GPU the whole volume goes there once: resampling and windows run there
        image = torch.from_numpy(np.ascontiguousarray(hu)).to(self.device)
        coarse, _ = runtime.resample_to_spacing(image, spacing, LIVER_SPACING)
        timings["resample_in"] = self._done() - t0

        t = time.perf_counter()
        probs = self._predict(self.liver_net, normalise_hu(coarse), self.roi_liver)
        liver_coarse = probs.argmax(0).cpu().numpy().astype(bool)
        timings["stage1_liver"] = time.perf_counter() - t
        if not liver_coarse.any():
            return [Segmentation(np.zeros(shape, dtype=np.uint8), timings) for _ in rules]
        liver_coarse = largest_component(liver_coarse)

        # the liver box on the input grid, dilated by the margin
        t = time.perf_counter()
        box = runtime.box_on_input(liver_coarse, shape, spacing, BOX_MARGIN_MM)
        region = image[box]
        fine, _ = runtime.resample_to_spacing(region, spacing, TUMOUR_SPACING)
        timings["crop_resample"] = self._done() - t

        t = time.perf_counter()
        probs = self._predict(self.tumour_net, normalise_hu(fine), self.roi_tumour)
        timings["stage2_tumour"] = self._done() - t

        t = time.perf_counter()
        probs = runtime.resample_to_shape(probs, region.shape, mode="trilinear")
        timings["resample_out"] = self._done() - t
        out = []
        # the organ depends only on whether a threshold is set: clean each one once
        organs: dict[bool, np.ndarray] = {}
        for threshold, min_tumour_ml in rules:
            t = time.perf_counter()
            labels = np.zeros(shape, dtype=np.uint8)
            in_box = label_probabilities(probs, threshold)
            if (threshold is None) not in organs:
                organs[threshold is None] = clean_organ(in_box > 0)
            # everything outside the box is background: clean only the box
            labels[box] = postprocess(in_box, spacing, min_tumour_ml=min_tumour_ml,
                                      organ=organs[threshold is None])
            out.append(Segmentation(labels, {**timings,
                                             "postprocess": time.perf_counter() - t}, box))
        return out


def label_probabilities(probs: torch.Tensor, tumour_threshold: float | None) -> np.ndarray:
    """Labels from stage-2 probabilities ``[3, z, y, x]`` (background, liver, tumour).

    With no threshold, the most probable class; with one, organ (liver or tumour) where
    that is more probable than background, and tumour within it where the tumour
    probability reaches the threshold.
    """
    if tumour_threshold is None:
        return probs.argmax(0).to(torch.uint8).cpu().numpy()
    organ = (probs[1] + probs[2]) > probs[0]
    tumour = organ & (probs[2] >= tumour_threshold)
    return (organ.to(torch.uint8) + tumour.to(torch.uint8)).cpu().numpy()
