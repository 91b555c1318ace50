"""AnatomyNet for head-and-neck organs at risk: network, two-stage inference, post-processing.

Network (:class:`AnatomyNet`), after Zhu et al., "AnatomyNet: Deep learning for fast
and fully automated whole-volume segmentation of head and neck anatomy" (Medical
Physics 2019): a 3D U-Net with a single down-sampling (a stride-2 first convolution),
residual blocks with 3D squeeze-and-excitation (SE) in the encoder with no further
down-sampling, concatenation skips into SE residual blocks in the decoder, a stride-2
transposed convolution back to full resolution joined with the input, and a softmax
over background and the nine organs. Two departures, both for planning CTs whose
slices are thicker than their pixels and for small batches: the down-sampling is
in-plane only (a 2.5 mm slice is already coarser than a down-sampled 1 mm pixel), and
instance normalisation replaces batch normalisation. Channel counts follow the public
code (28, then 30, 32, 34) scaled by ``width / 28``.

Two stages (:class:`HeadNeckSegmenter`):

1. the whole volume on a coarse grid (``COARSE_SPACING``) finds where the organs are
   (one "organ" class: the box is all this stage is for);
2. the box, dilated by ``BOX_MARGIN_MM``, on the fine grid (``FINE_SPACING``) gives
   the organs, whose probabilities are resampled to the input grid.

The volume is first put in a canonical orientation (array axes along patient
left, posterior and superior) so that the networks always see a patient the same way;
left and right organs are then assigned by the side of the patient's midline they lie
on (:func:`assign_sides`), whatever the slice order or orientation of the series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from dicomnode.imaging import morphology
from dicomnode.nn import runtime
from dicomnode.nn.runtime import Segmentation

log = logging.getLogger(__name__)

#: Label value -> TG-263 name of the organs (the MICCAI 2015 set), in label order (the
#: same as :data:`dicomnode.results.codes.HEADNECK`).
ORGANS: dict[int, str] = {
    1: "BrainStem", 2: "OpticChiasm", 3: "Bone_Mandible", 4: "OpticNrv_L", 5: "OpticNrv_R",
    6: "Parotid_L", 7: "Parotid_R", 8: "Glnd_Submand_L", 9: "Glnd_Submand_R",
}
NUM_CLASSES = len(ORGANS) + 1
#: Whether stage 2 also reads the organs' box mirrored left to right (see
#: :class:`HeadNeckSegmenter`): the default, and what weights without the setting get.
MIRROR = True
#: Left/right pairs (left label, right label).
PAIRS: tuple[tuple[int, int], ...] = ((4, 5), (6, 7), (8, 9))
#: CT window the networks see (HU): soft tissue to trabecular bone.
HU_WINDOW: tuple[float, float] = (-300.0, 500.0)
#: Grid of stage 1 (whole volume), ``(dz, dy, dx)`` mm.
COARSE_SPACING: tuple[float, float, float] = (5.0, 4.0, 4.0)
#: Grid of stage 2 (the organs' box), ``(dz, dy, dx)`` mm.
FINE_SPACING: tuple[float, float, float] = (2.5, 1.0, 1.0)
#: Margin added around the stage-1 organs' box before stage 2 (mm).
BOX_MARGIN_MM: float = 12.0
#: Smallest group of organ voxels on the coarse grid (ml) that the organs' box keeps.
MIN_GROUP_ML = 2.0


def normalise_hu(hu: torch.Tensor | np.ndarray,
                 window: tuple[float, float] = HU_WINDOW) -> torch.Tensor:
    """:func:`~dicomnode.nn.runtime.normalise_hu` with this model's window."""
    return runtime.normalise_hu(hu, window)


class SqueezeExcitation3d(nn.Module):
    """Channel attention: global average pooling, a bottleneck, sigmoid gates per channel."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(2, channels // reduction)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(channels, hidden, 1),
                                  nn.ReLU(inplace=True), nn.Conv3d(hidden, channels, 1),
                                  nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` scaled per channel."""
        return x * self.gate(x)


class SEResBlock3d(nn.Module):
    """Residual block of two 3x3x3 convolutions with squeeze-and-excitation."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True), nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True),
            SqueezeExcitation3d(cout))
        self.skip: nn.Module = (nn.Identity() if cin == cout else nn.Sequential(
            nn.Conv3d(cin, cout, 1, bias=False), nn.InstanceNorm3d(cout, affine=True)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, cin, D, H, W]`` -> ``[B, cout, D, H, W]``."""
        return self.act(self.body(x) + self.skip(x))


class AnatomyNet(nn.Module):
    """AnatomyNet: one in-plane down-sampling, SE residual encoder and decoder.

    Parameters
    ----------
    num_classes : int
        Output channels (background + organs).
    width : int
        Channels of the first convolution (the paper: 28); the encoder adds 2, 4, 6
        channels times ``width / 28``.
    in_channels : int
        Image channels (1: normalised HU).
    side_channel : bool
        The input carries one more channel, the distance from the midline along the
        patient's left-right axis, which only the final 1x1 classifier sees. Left and
        right organs look alike; a network that sees a window of the head cannot tell
        them apart, and instance normalisation would remove any absolute position fed
        to its first layers. Given to the classifier, it is a learned shift of the left
        and right logits by side.

    Notes
    -----
    Input ``[B, in_channels (+1), D, H, W]`` with even ``H`` and ``W``; output
    ``[B, num_classes, D, H, W]``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 28,
                 in_channels: int = 1, side_channel: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Invalid 'num_classes' value '{num_classes}' - must be >= 2")
        if width < 4:
            raise ValueError(f"Invalid 'width' value '{width}' - must be >= 4")
        self.num_classes = num_classes
        self.width = width
        self.in_channels = in_channels
        self.side_channel = side_channel
        step = max(1, round(2 * width / 28))
        c0, c1, c2, c3 = width, width + step, width + 2 * step, width + 3 * step
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, c0, 3, stride=(1, 2, 2), padding=1, bias=False),
            nn.InstanceNorm3d(c0, affine=True), nn.ReLU(inplace=True))
        self.enc1 = nn.Sequential(SEResBlock3d(c0, c1), SEResBlock3d(c1, c1))
        self.enc2 = nn.Sequential(SEResBlock3d(c1, c2), SEResBlock3d(c2, c2))
        self.enc3 = nn.Sequential(SEResBlock3d(c2, c3), SEResBlock3d(c3, c3))
        self.dec2 = SEResBlock3d(c3 + c2, c2)
        self.dec1 = SEResBlock3d(c2 + c1, c1)
        self.dec0 = SEResBlock3d(c1 + c0, c0)
        up = max(4, c0 // 2)
        self.up = nn.Sequential(
            nn.ConvTranspose3d(c0, up, (1, 2, 2), stride=(1, 2, 2), bias=False),
            nn.InstanceNorm3d(up, affine=True), nn.ReLU(inplace=True))
        self.head = nn.Sequential(
            nn.Conv3d(up + in_channels, up, 3, padding=1, bias=False),
            nn.InstanceNorm3d(up, affine=True), nn.ReLU(inplace=True))
        self.classify = nn.Conv3d(up + int(side_channel), num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes, D, H, W]`` for ``[B, C, D, H, W]``."""
        expected = self.in_channels + int(self.side_channel)
        if x.ndim != 5 or x.shape[1] != expected:
            raise ValueError(f"Invalid input of shape {tuple(x.shape)} - must be "
                             f"[B, {expected}, D, H, W]")
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"Invalid input of shape {tuple(x.shape)} - H and W must be even")
        image = x[:, :self.in_channels]
        s0 = self.stem(image)
        e1 = self.enc1(s0)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d = self.dec2(torch.cat([e3, e2], dim=1))
        d = self.dec1(torch.cat([d, e1], dim=1))
        d = self.dec0(torch.cat([d, s0], dim=1))
        h = self.head(torch.cat([self.up(d), image], dim=1))
        if self.side_channel:
            h = torch.cat([h, x[:, self.in_channels:]], dim=1)
        return self.classify(h)


def mirrored(volume: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[C, Z, Y, X]`` mirrored left to right, channels of each pair swapped.

    Used on the image channel of stage 2's input (a mirrored patient) and on its
    output, whose left organ is the original's right organ. Not on the side channel:
    a mirrored patient has the same one (:func:`side_map` says where the patient's left
    lies), while a flipped side channel would tell the network left is right.
    """
    out = torch.flip(volume, dims=[-1])
    if pairs:
        order = list(range(out.shape[0]))
        for left, right in pairs:
            order[left], order[right] = right, left
        out = out[order]
    return out


def side_map(shape: Sequence[int], spacing_x: float, centre_x: float,
             device: torch.device | None = None) -> torch.Tensor:
    """The side channel: signed distance from ``centre_x`` (an x index) in 100 mm units.

    Positive towards the patient's left (the canonical x axis); ``[Z, Y, X]`` float32.
    """
    x = (torch.arange(int(shape[2]), dtype=torch.float32, device=device) - centre_x)
    x = x * (spacing_x / 100.0)
    return x.expand(int(shape[0]), int(shape[1]), int(shape[2]))


# ---------------------------------------------------------------------------------------
# Orientation


def canonical_flips(direction: np.ndarray | None) -> tuple[int, ...]:
    """Array axes to flip so that ``[z, y, x]`` run superior, posterior and patient left.

    Parameters
    ----------
    direction : numpy.ndarray or None
        3x3, rows the row cosine, the column cosine and the slice normal (as
        ``imaging.series.Volume.direction``); None: already canonical.

    Returns
    -------
    tuple of int
        The axes (0 z, 1 y, 2 x) whose index runs against the patient axis.

    Raises
    ------
    ValueError
        If the series is not axial (rows along the patient's left-right axis, columns
        along its front-back axis) within 10 degrees.
    """
    if direction is None:
        return ()
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    # array axis 2 (columns of a row) follows the row cosine, axis 1 the column cosine,
    # axis 0 the slice normal; each must lie along patient x, y and z
    flips = []
    for axis, (vector, patient) in enumerate(((d[2], 2), (d[1], 1), (d[0], 0))):
        if abs(vector[patient]) < np.cos(np.radians(10)):
            raise ValueError(f"Invalid 'direction' value '{d.round(3).tolist()}' - not an "
                             "axial series (rows left-right, columns front-back, slices "
                             "foot-head)")
        if vector[patient] < 0:
            flips.append(axis)
    return tuple(flips)


def flip(array: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """``array`` flipped along ``axes`` (a view; its own inverse)."""
    return np.flip(array, axis=tuple(axes)) if axes else array


# ---------------------------------------------------------------------------------------
# Post-processing


def assign_sides(labels: np.ndarray, midline_x: float) -> np.ndarray:
    """Give each left/right organ the side of the patient's midline it lies on.

    ``labels`` is canonical (axis 2 runs towards the patient's left); a voxel of either
    organ of a pair at ``x > midline_x`` becomes the left organ, the others the right.
    The network's own left/right call is kept only as "one of the pair".
    """
    out = labels.copy()
    left = np.arange(labels.shape[2]) > midline_x
    for left_label, right_label in PAIRS:
        pair = (labels == left_label) | (labels == right_label)
        out[pair & left[None, None, :]] = left_label
        out[pair & ~left[None, None, :]] = right_label
    return out


def midline(labels: np.ndarray) -> float | None:
    """The patient's midline (canonical x index): the centre of the unpaired organs.

    Brainstem, chiasm and mandible straddle the midline; None when none was found.
    """
    centre = np.isin(labels, (1, 2, 3))
    if not centre.any():
        return None
    xs = np.nonzero(centre.any(axis=(0, 1)))[0]
    weights = centre.sum(axis=(0, 1))[xs]
    return float(np.average(xs, weights=weights))


def keep_largest(labels: np.ndarray) -> np.ndarray:
    """Each organ reduced to its largest 26-connected component (stray islands removed)."""
    out = np.zeros_like(labels)
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in ORGANS:
        mask = labels == value
        box = morphology.bounding_box(mask)
        if box is None:
            continue
        comps, count = ndimage.label(mask[box], structure=structure)
        if count > 1:
            sizes = np.bincount(comps.ravel())
            sizes[0] = 0
            keep = comps == int(np.argmax(sizes))
        else:
            keep = comps > 0
        out[box][keep] = value
    return out


def postprocess(labels: np.ndarray) -> np.ndarray:
    """Sides from the midline, then the largest component of each organ."""
    mid = midline(labels)
    if mid is not None:
        labels = assign_sides(labels, mid)
    return keep_largest(labels)


# ---------------------------------------------------------------------------------------
# Two-stage inference


def organ_box(coarse_labels: np.ndarray, shape: Sequence[int], spacing: Sequence[float]
              ) -> tuple[slice, slice, slice] | None:
    """The box of the organs found on the coarse grid, on the input grid, with margin.

    Organ voxels are grouped (dilated by two coarse voxels so that neighbouring
    organs join); every group of at least :data:`MIN_GROUP_ML` decides, so that stray
    voxels do not widen the box while the brainstem and optic pathway, which can
    form a group apart from the mandible and glands, stay inside it.

    Parameters
    ----------
    coarse_labels : numpy.ndarray
        Stage 1's labels on :data:`COARSE_SPACING` (0 background).
    shape, spacing : sequence
        The input volume's ``[z, y, x]`` shape and spacing in mm.

    Returns
    -------
    tuple of slice or None
        The box on the input grid, or None when stage 1 found no organ.
    """
    organs = coarse_labels > 0
    if not organs.any():
        return None
    joined, count = ndimage.label(ndimage.binary_dilation(organs, iterations=2),
                                  structure=np.ones((3, 3, 3), dtype=bool))
    if count > 1:
        sizes = np.bincount(joined[organs], minlength=count + 1)
        sizes[0] = 0
        coarse_ml = float(np.prod(COARSE_SPACING)) / 1000.0
        keep = np.flatnonzero(sizes * coarse_ml >= MIN_GROUP_ML)
        if not len(keep):
            keep = np.array([int(np.argmax(sizes))])
        organs &= np.isin(joined, keep)
    return runtime.box_on_input(organs, shape, spacing, BOX_MARGIN_MM)


class HeadNeckSegmenter(runtime.SlidingWindowSegmenter):
    """Stage 1 (whole volume, coarse) then stage 2 (the organs' box, fine).

    Parameters
    ----------
    coarse_net, fine_net : AnatomyNet
        The two stages, weights loaded.
    device : torch.device
        Where the networks run.
    roi_coarse, roi_fine : tuple of int
        Sliding-window sizes ``(rz, ry, rx)`` on each stage's grid (the training patch
        sizes: instance normalisation sees windows of the size it was trained on).
    batch_size : int, optional
        Windows per forward pass (default 2 on a CPU, 8 on a GPU).
    thresholds : mapping, optional
        Organ label -> probability at which a background voxel becomes that organ
        (chosen on validation cases for the small organs; none: the most probable
        class).
    mirror : bool
        Average stage 2 with its reading of the box mirrored left to right (pairs
        swapped back): left and right organs then get the same evidence, where a
        network trained without flips can learn one side better than the other.
    """

    def __init__(self, coarse_net: AnatomyNet, fine_net: AnatomyNet, device: torch.device,
                 *, roi_coarse: tuple[int, int, int] = (32, 80, 80),
                 roi_fine: tuple[int, int, int] = (24, 96, 96),
                 batch_size: int | None = None,
                 thresholds: Mapping[int, float] | None = None,
                 mirror: bool = MIRROR) -> None:
        super().__init__(device, batch_size)
        self.mirror = mirror
        self.coarse_net = coarse_net.to(device).eval()
        self.fine_net = fine_net.to(device).eval()
        self.roi_coarse = roi_coarse
        self.roi_fine = roi_fine
        for value, threshold in (thresholds or {}).items():
            if value not in ORGANS or not 0 < threshold < 1:
                raise ValueError(f"Invalid 'thresholds' value '{value}: {threshold}' - an "
                                 "organ label and a probability in (0, 1)")
        self.thresholds = dict(thresholds or {})

    def windows(self) -> list[tuple[nn.Module, tuple[int, int, int], int]]:
        """Both stages with their window sizes and input channels (the side channel)."""
        return [(net, roi, net.in_channels + int(net.side_channel))
                for net, roi in ((self.coarse_net, self.roi_coarse),
                                 (self.fine_net, self.roi_fine))]

    def probabilities(self, hu: np.ndarray, spacing: Sequence[float],
                      direction: np.ndarray | None = None) -> OrganProbabilities:
        """Both stages on one ``[z, y, x]`` HU volume: the organs' probabilities in their box.

        Parameters
        ----------
        hu : numpy.ndarray
            ``[z, y, x]`` Hounsfield units, slices in ascending order along the normal.
        spacing : sequence of float
            ``(dz, dy, dx)`` mm.
        direction : numpy.ndarray, optional
            3x3 row cosine, column cosine, normal (default: the standard axial one).

        Returns
        -------
        OrganProbabilities
            ``[classes, z, y, x]`` probabilities on the input grid inside the box, in the
            canonical orientation (None when stage 1 found no organ), with what
            :meth:`label` needs to put labels back on the input grid.
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        spacing = tuple(float(s) for s in spacing)
        flips = canonical_flips(direction)
        volume = np.ascontiguousarray(flip(hu, flips))
        shape = volume.shape
        image = torch.from_numpy(volume).to(self.device)
        coarse, _ = runtime.resample_to_spacing(image, spacing, COARSE_SPACING)
        timings["resample_in"] = self._done() - t0

        t = time.perf_counter()
        probs = self._predict(self.coarse_net, normalise_hu(coarse), self.roi_coarse)
        coarse_labels = probs.argmax(0).cpu().numpy()  # 0 background, >0 organs
        box = organ_box(coarse_labels, shape, spacing)
        timings["stage1_coarse"] = time.perf_counter() - t
        if box is None:
            return OrganProbabilities(None, None, flips, shape, timings)

        t = time.perf_counter()
        region = image[box]
        fine, _ = runtime.resample_to_spacing(region, spacing, FINE_SPACING)
        timings["crop_resample"] = self._done() - t
        t = time.perf_counter()
        image = normalise_hu(fine)[None]
        if self.fine_net.side_channel:
            # the box is centred on the organs, which straddle the midline
            side = side_map(fine.shape, FINE_SPACING[2], (fine.shape[2] - 1) / 2, fine.device)
            image = torch.cat([image, side[None]])
        probs = self._predict(self.fine_net, image, self.roi_fine)
        if self.mirror:
            # a mirrored patient: the image flipped, the side channel (if any) as it is
            patient = torch.cat([mirrored(image[:1], ()), image[1:]])
            probs = 0.5 * (probs + mirrored(self._predict(
                self.fine_net, patient, self.roi_fine), PAIRS))
        timings["stage2_fine"] = self._done() - t
        t = time.perf_counter()
        probs = runtime.resample_to_shape(probs, region.shape, mode="trilinear")
        timings["resample_out"] = self._done() - t
        return OrganProbabilities(probs, box, flips, shape, timings)

    def label(self, found: OrganProbabilities,
              thresholds: Mapping[int, float] | None = None) -> Segmentation:
        """Labels on the input grid from :meth:`probabilities`.

        Each voxel takes its most probable class; where that is background, an organ of
        ``thresholds`` (label -> probability; default :attr:`thresholds`) whose
        probability reaches its threshold takes it instead (the small organs, whose
        probability rarely beats background over their whole thin extent). Then
        :func:`postprocess`.
        """
        labels = np.zeros(found.shape, dtype=np.uint8)
        timings = dict(found.timings)
        if found.probs is None or found.box is None:
            return Segmentation(flip(labels, found.flips).copy(), timings)
        t = time.perf_counter()
        in_box = label_probabilities(found.probs, self.thresholds if thresholds is None
                                     else thresholds)
        kept = postprocess(in_box)
        labels[found.box] = kept
        confidence = organ_confidence(found.probs, kept)
        timings["postprocess"] = time.perf_counter() - t
        original_box = tuple(
            slice(n - s.stop, n - s.start) if axis in found.flips else s
            for axis, (s, n) in enumerate(zip(found.box, found.shape, strict=True)))
        return Segmentation(flip(labels, found.flips).copy(), timings,
                            original_box, confidence)  # type: ignore[arg-type]

    def segment(self, hu: np.ndarray, spacing: Sequence[float],
                direction: np.ndarray | None = None) -> Segmentation:
        """Segment the organs at risk of one ``[z, y, x]`` HU volume.

        :meth:`probabilities`, then :meth:`label` with the segmenter's thresholds.

        Returns
        -------
        Segmentation
            uint8 labels on the input grid (0 background, :data:`ORGANS`; empty when no
            organ was found), seconds per step and the organs' box.
        """
        return self.label(self.probabilities(hu, spacing, direction))


@dataclass
class OrganProbabilities:
    """Output of :meth:`HeadNeckSegmenter.probabilities` (canonical orientation)."""

    probs: torch.Tensor | None
    box: tuple[slice, slice, slice] | None
    flips: tuple[int, ...]
    shape: tuple[int, ...]
    timings: dict[str, float] = field(default_factory=dict)


def organ_confidence(probs: torch.Tensor, labels: np.ndarray) -> dict[int, float]:
    """Each organ's mean probability over the voxels it was given.

    An organ the network is sure of reads about 0.9 (its rim, where the probability
    falls to one half, pulls the mean down); tissue that looks like it only in places
    can read lower, and the pipeline leaves an organ under its ``MIN_CONFIDENCE`` out
    rather than draw it.

    Parameters
    ----------
    probs : torch.Tensor
        ``[classes, z, y, x]`` probabilities.
    labels : numpy.ndarray
        ``[z, y, x]`` labels on the same grid (0 background).

    Returns
    -------
    dict
        Organ label -> mean probability, for the organs present in ``labels``.
    """
    flat = torch.from_numpy(labels).to(probs.device)
    return {int(value): round(float(probs[int(value)][flat == int(value)].mean()), 4)
            for value in np.unique(labels) if value}


def label_probabilities(probs: torch.Tensor, thresholds: Mapping[int, float] | None
                        ) -> np.ndarray:
    """The most probable class, and background voxels given to an organ of ``thresholds``
    whose probability reaches its threshold (in label order)."""
    labels = probs.argmax(0).to(torch.uint8)
    for value, threshold in sorted((thresholds or {}).items()):
        take = (labels == 0) & (probs[value] >= threshold)
        labels[take] = value
    return labels.cpu().numpy()
