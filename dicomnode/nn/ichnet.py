"""IchNet: intracranial haemorrhage per slice and per study, the RSNA 2019 winners' design.

A small 2D residual CNN reads each slab (slices combined to :data:`SLAB_MM`, so a
0.625 mm and a 5 mm series look alike) in three CT windows (brain 40/80, subdural
80/200, bone 600/2800) together with the slabs above and below it: nine channels.
Its per-slab features run through a two-layer bidirectional GRU over the slabs ordered
along the slice normal, which gives six logits per slab (any, epidural,
intraparenchymal, intraventricular, subarachnoid, subdural); a study's logit of a
finding is its highest slab logit. At test time the slabs are read in order and
reversed, each as given and mirrored left to right, and the probabilities averaged.
An optional segmentation head on the CNN's features draws the blood (one class) on the
slab grid.

Preprocessing (:func:`prepare_volume`): slabs by averaging consecutive slices, the head
cropped in-plane by its largest connected body outline (the couch left out) to a square
of :data:`INPUT_PX` pixels.

The loss (:class:`RsnaLoss`) is the RSNA 2019 weighted multi-label log loss (``any``
weighted 2, each subtype 1) on slabs and on the study, plus soft Dice and binary
cross-entropy of the blood mask where a case has voxel labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the name every torch reader knows
from scipy import ndimage
from torch import nn

log = logging.getLogger(__name__)

#: Output names, in the RSNA 2019 order.
FINDINGS: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular",
                             "subarachnoid", "subdural")
#: Weights of the RSNA 2019 log loss, in the order of :data:`FINDINGS`.
RSNA_WEIGHTS: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
#: CT windows (centre, width): brain, subdural, bone.
WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))
#: Slabs are made this thick (mm) from thinner slices.
SLAB_MM = 5.0
#: In-plane size of the network's input (pixels of the cropped head).
INPUT_PX = 128
#: A body outline: pixels above this HU on the slabs' maximum projection.
BODY_HU = -300.0
#: Margin around the head's outline (fraction of its larger side).
CROP_MARGIN = 0.08


# ---------------------------------------------------------------------------------------
# Preprocessing


def slab_groups(n_slices: int, dz: float, slab_mm: float = SLAB_MM) -> list[range]:
    """Consecutive slices combined into one slab each (a last short group joins the one
    before it); slices of ``slab_mm`` or thicker are slabs on their own.

    Raises
    ------
    ValueError
        For no slice or a spacing that is not positive.
    """
    if n_slices < 1 or not dz > 0:
        raise ValueError(f"Invalid 'n_slices' value '{n_slices}' or spacing '{dz}' - "
                         "needs a slice and a positive spacing")
    size = max(1, round(slab_mm / dz))
    starts = list(range(0, n_slices, size))
    if len(starts) > 1 and n_slices - starts[-1] < (size + 1) // 2:
        starts.pop()
    return [range(s, starts[i + 1] if i + 1 < len(starts) else n_slices)
            for i, s in enumerate(starts)]


def head_box(slabs: np.ndarray) -> tuple[slice, slice]:
    """A square in-plane box around the head: the largest body outline of the slabs'
    maximum projection (a couch or a head holder apart from it is left out)."""
    mask = slabs.max(axis=0) > BODY_HU
    mask = ndimage.binary_opening(mask, iterations=2)
    labels, n = ndimage.label(mask)
    ny, nx = mask.shape
    if n == 0:
        return slice(0, ny), slice(0, nx)
    sizes = ndimage.sum_labels(mask, labels, range(1, n + 1))
    ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    side = round(float(side) * (1 + 2 * CROP_MARGIN))
    y0, x0 = round(float(cy) - side / 2), round(float(cx) - side / 2)
    return slice(y0, y0 + side), slice(x0, x0 + side)


def _crop_pad(image: np.ndarray, box: tuple[slice, slice], fill: float) -> np.ndarray:
    """``image[..., box]`` with what lies outside the image filled with ``fill``."""
    ys, xs = box
    ny, nx = image.shape[-2:]
    out = np.full((*image.shape[:-2], ys.stop - ys.start, xs.stop - xs.start), fill,
                  dtype=image.dtype)
    sy0, sy1 = max(ys.start, 0), min(ys.stop, ny)
    sx0, sx1 = max(xs.start, 0), min(xs.stop, nx)
    if sy1 > sy0 and sx1 > sx0:
        out[..., sy0 - ys.start:sy1 - ys.start, sx0 - xs.start:sx1 - xs.start] = \
            image[..., sy0:sy1, sx0:sx1]
    return out


@dataclass
class PreparedVolume:
    """A volume on the network's grid.

    Attributes
    ----------
    slabs : numpy.ndarray
        ``[S, INPUT_PX, INPUT_PX]`` int16 HU of the cropped head, one slab each.
    groups : list of range
        The volume's slices in each slab.
    box : tuple of slice
        The in-plane crop on the volume's grid.
    """

    slabs: np.ndarray
    groups: list[range]
    box: tuple[slice, slice]


def prepare_volume(hu: np.ndarray, spacing: Sequence[float], size: int = INPUT_PX
                   ) -> PreparedVolume:
    """Slabs of :data:`SLAB_MM`, the head cropped and resized to ``size`` pixels."""
    groups = slab_groups(hu.shape[0], float(spacing[0]))
    volume = torch.from_numpy(np.ascontiguousarray(hu)).float()
    slabs = torch.stack([volume[g.start:g.stop].mean(dim=0) for g in groups])
    box = head_box(slabs.numpy())
    cropped = torch.from_numpy(_crop_pad(slabs.numpy(), box, -1024.0))
    resized = F.interpolate(cropped[:, None], size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)[:, 0]
    return PreparedVolume(torch.round(resized).clamp(-1024, 3071).short().numpy(),
                          groups, box)


def slab_mask(mask: np.ndarray, prepared: PreparedVolume) -> np.ndarray:
    """A ``[z, y, x]`` boolean mask on the slab grid: ``[S, INPUT_PX, INPUT_PX]`` bool
    (a slab pixel is set where any of its slices' area under it is)."""
    size = prepared.slabs.shape[-1]
    merged = np.stack([mask[g.start:g.stop].any(axis=0) for g in prepared.groups])
    cropped = torch.from_numpy(_crop_pad(merged.astype(np.float32), prepared.box, 0.0))
    resized = F.interpolate(cropped[:, None], size=(size, size), mode="area")[:, 0]
    return (resized > 0.25).numpy()


def to_volume_grid(mask: np.ndarray, prepared: PreparedVolume,
                   shape: Sequence[int]) -> np.ndarray:
    """A slab-grid mask ``[S, px, px]`` back on the volume's ``[z, y, x]`` grid."""
    ys, xs = prepared.box
    side = ys.stop - ys.start
    up = F.interpolate(torch.from_numpy(mask.astype(np.float32))[:, None],
                       size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    up_np = (up > 0.5).numpy()
    out = np.zeros(tuple(shape), dtype=bool)
    ny, nx = shape[1], shape[2]
    sy0, sy1 = max(ys.start, 0), min(ys.stop, ny)
    sx0, sx1 = max(xs.start, 0), min(xs.stop, nx)
    for s, g in enumerate(prepared.groups):
        out[g.start:g.stop, sy0:sy1, sx0:sx1] = up_np[s, sy0 - ys.start:sy1 - ys.start,
                                                      sx0 - xs.start:sx1 - xs.start]
    return out


def windows(hu: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` HU -> ``[..., 3, H, W]``: the three windows, each in [0, 1]."""
    planes = [((hu - (c - w / 2)) / w).clamp(0, 1) for c, w in WINDOWS]
    return torch.stack(planes, dim=-3)


# ---------------------------------------------------------------------------------------
# The network


class _Residual(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x), inplace=True)


def neighbours(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, C, H, W]`` -> ``[B, S, 3C, H, W]``: each slab with the one below and the one
    above it (the end slabs repeated)."""
    below = torch.cat([x[:, :1], x[:, :-1]], dim=1)
    above = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
    return torch.cat([below, x, above], dim=2)


@dataclass
class IchOutput:
    """What :class:`IchNet` returns: ``slices`` ``[B, S, 6]`` logits, ``seg``
    ``[B, S, H, W]`` blood logits (None without the head)."""

    slices: torch.Tensor
    seg: torch.Tensor | None = None

    def float(self) -> IchOutput:
        """Both in float32 (the loss is computed there)."""
        return IchOutput(self.slices.float(), None if self.seg is None else self.seg.float())

    def detach(self) -> IchOutput:
        """Both detached."""
        return IchOutput(self.slices.detach(),
                         None if self.seg is None else self.seg.detach())


class IchNet(nn.Module):
    """2D residual CNN per slab, bidirectional GRU over the slabs, six outputs.

    Parameters
    ----------
    width : int
        Channels of the first block (doubled at each of the three down-samplings).
    hidden : int
        GRU hidden size (each direction).
    segmentation : bool
        With the blood segmentation head.

    Input ``[B, S, 3, H, W]`` (the windows of each slab, :func:`windows`); output an
    :class:`IchOutput`.
    """

    def __init__(self, width: int = 16, hidden: int = 64, segmentation: bool = True) -> None:
        super().__init__()
        self.width = width
        self.hidden = hidden
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3 * len(WINDOWS), w, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layer1 = _Residual(w, w)
        self.layer2 = _Residual(w, 2 * w, 2)
        self.layer3 = _Residual(2 * w, 4 * w, 2)
        self.layer4 = _Residual(4 * w, 8 * w, 2)
        self.embed = nn.Sequential(nn.Linear(16 * w, 2 * hidden), nn.ReLU(inplace=True))
        self.gru = nn.GRU(2 * hidden, hidden, num_layers=2, batch_first=True,
                          bidirectional=True)
        self.head = nn.Linear(2 * hidden + 2 * hidden, len(FINDINGS))
        self.seg: nn.Module | None = None
        if segmentation:
            self.seg_lateral = nn.Conv2d(2 * w, w, 1)
            self.seg = nn.Sequential(nn.Conv2d(w, w, 3, 1, 1), nn.ReLU(inplace=True),
                                     nn.Conv2d(w, 1, 1))

    def forward(self, x: torch.Tensor) -> IchOutput:
        b, s = x.shape[:2]
        flat = neighbours(x).flatten(0, 1)
        f1 = self.layer1(self.stem(flat))
        f2 = self.layer2(f1)
        f4 = self.layer4(self.layer3(f2))
        pooled = torch.cat([f4.mean(dim=(2, 3)), f4.amax(dim=(2, 3))], dim=1)
        features = self.embed(pooled).view(b, s, -1)
        sequence, _ = self.gru(features)
        logits = self.head(torch.cat([sequence, features], dim=2))
        seg = None
        if self.seg is not None:
            fused = f1 + F.interpolate(self.seg_lateral(f2), size=f1.shape[-2:],
                                       mode="bilinear", align_corners=False)
            seg = F.interpolate(self.seg(fused), size=x.shape[-2:], mode="bilinear",
                                align_corners=False).view(b, s, *x.shape[-2:])
        return IchOutput(logits, seg)


def study_logits(slices: torch.Tensor) -> torch.Tensor:
    """``[B, S, 6]`` slab logits -> ``[B, 6]``: a study shows a finding where one of its
    slabs does."""
    return slices.amax(dim=1)


def predict(net: IchNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slab probabilities ``[B, S, 6]`` and blood probabilities ``[B, S, H, W]``: the mean
    of four readings (test-time augmentation), the slabs in order and reversed, each as
    given and mirrored left to right. The network is trained with both flips, so none of
    the four readings is new to it; their mean is steadier than any one (the model card
    has the validation figures that chose it).
    """
    slices = torch.zeros((), device=x.device)
    seg: torch.Tensor | None = None
    for dims in ([], [1], [-1], [1, -1]):
        out = net(torch.flip(x, dims=dims) if dims else x)
        p = torch.sigmoid(out.slices.float())
        slices = slices + (torch.flip(p, dims=[1]) if 1 in dims else p)
        if out.seg is not None:
            q = torch.sigmoid(out.seg.float())
            q = torch.flip(q, dims=dims) if dims else q
            seg = q if seg is None else seg + q
    return slices / 4, None if seg is None else seg / 4


# ---------------------------------------------------------------------------------------
# The loss


def weighted_log_loss(logits: torch.Tensor, target: torch.Tensor,
                      weights: Sequence[float] = RSNA_WEIGHTS) -> torch.Tensor:
    """The RSNA 2019 metric: per sample, the weighted mean over the six outputs of their
    binary log loss, then the mean over samples (``logits``, ``target``: ``[..., 6]``)."""
    w = torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    per = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype),
                                             reduction="none")
    return ((per * w).sum(dim=-1) / w.sum()).mean()


def weighted_log_loss_np(probabilities: np.ndarray, target: np.ndarray,
                         weights: Sequence[float] = RSNA_WEIGHTS, eps: float = 1e-7) -> float:
    """:func:`weighted_log_loss` of probabilities (``[N, 6]``), clipped as the
    leaderboard clipped them."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(target, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(((per * w).sum(axis=-1) / w.sum()).mean())


@dataclass
class IchTarget:
    """A batch's truth: slab labels ``[B, S, 6]``, the blood mask ``[B, S, H, W]`` and
    which samples have voxel labels ``[B]``."""

    slices: torch.Tensor
    seg: torch.Tensor
    has_seg: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> IchTarget:
        """On ``device``."""
        return IchTarget(*(t.to(device, non_blocking=non_blocking)
                           for t in (self.slices, self.seg, self.has_seg)))


class RsnaLoss(nn.Module):
    """RSNA weighted log loss on slabs and on the study, plus the blood mask's loss.

    Parameters
    ----------
    study_weight : float
        Weight of the study-level term beside the slab-level one.
    seg_weight : float
        Weight of the segmentation term (soft Dice + binary cross-entropy), counted only
        on samples with voxel labels.
    """

    def __init__(self, study_weight: float = 0.5, seg_weight: float = 0.5) -> None:
        super().__init__()
        self.study_weight = study_weight
        self.seg_weight = seg_weight

    def forward(self, output: IchOutput, target: IchTarget) -> torch.Tensor:
        loss = weighted_log_loss(output.slices, target.slices)
        loss = loss + self.study_weight * weighted_log_loss(study_logits(output.slices),
                                                            target.slices.amax(dim=1))
        if output.seg is not None and self.seg_weight > 0 and bool(target.has_seg.any()):
            logits = output.seg[target.has_seg]
            truth = target.seg[target.has_seg].to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, truth)
            prob = torch.sigmoid(logits)
            inter = (prob * truth).sum()
            dice = 1 - (2 * inter + 1) / (prob.sum() + truth.sum() + 1)
            loss = loss + self.seg_weight * (bce * 10 + dice)
        return loss


# ---------------------------------------------------------------------------------------
# Inference


@dataclass
class IchPrediction:
    """One study's findings.

    Attributes
    ----------
    labels : numpy.ndarray
        ``[z, y, x]`` uint8, 1 where the segmentation head sees blood (zeros without it).
    study : dict
        Finding -> study probability.
    slices : numpy.ndarray
        ``[z, 6]`` probability of each finding on each of the volume's slices (its
        slab's).
    slabs : list of range
        The volume's slices in each slab.
    decisions : dict
        Finding -> study probability at or above its threshold (a subtype only where
        ``any`` is too).
    thresholds : dict
        Finding -> the threshold applied.
    timings : dict
        Seconds per step.
    """

    labels: np.ndarray
    study: dict[str, float]
    slices: np.ndarray
    slabs: list[range]
    decisions: dict[str, bool] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class IchClassifier:
    """An :class:`IchNet` ready for inference on one device.

    Parameters
    ----------
    net : IchNet
        Trained network.
    device : torch.device
        Where it runs.
    thresholds : dict, optional
        Finding -> study probability from which it is decided present (0.5 for those
        left out).
    seg_threshold : float
        Blood probability from which a pixel is labelled.
    segmentation : bool
        Whether the blood labels earned their place in results (validation Dice); they
        are computed either way, for scoring.
    """

    def __init__(self, net: IchNet, device: torch.device,
                 thresholds: dict[str, float] | None = None,
                 seg_threshold: float = 0.5, segmentation: bool = False) -> None:
        self.net = net.to(device).eval()
        self.device = device
        self.segmentation = segmentation
        self.thresholds = {k: float((thresholds or {}).get(k, 0.5)) for k in FINDINGS}
        self.seg_threshold = seg_threshold

    def warm_up(self) -> None:
        """Run the network once on a small input."""
        with torch.inference_mode():
            self.net(torch.zeros(1, 3, 3, INPUT_PX, INPUT_PX, device=self.device))

    def segment(self, hu: np.ndarray, spacing: Sequence[float]) -> IchPrediction:
        """Findings of one ``[z, y, x]`` HU volume (slice 0 the most inferior)."""
        timings: dict[str, float] = {}
        t = time.perf_counter()
        prepared = prepare_volume(hu, spacing)
        x = windows(torch.from_numpy(prepared.slabs).float())[None].to(self.device)
        timings["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            slabs, seg = predict(self.net, x)
        slab_p = slabs[0].float().cpu().numpy()
        timings["network"] = time.perf_counter() - t
        t = time.perf_counter()
        per_slice = np.zeros((hu.shape[0], len(FINDINGS)), dtype=np.float32)
        for s, g in enumerate(prepared.groups):
            per_slice[g.start:g.stop] = slab_p[s]
        study = {name: float(slab_p[:, k].max()) for k, name in enumerate(FINDINGS)}
        labels = np.zeros(hu.shape, dtype=np.uint8)
        if seg is not None:
            mask = seg[0].float().cpu().numpy() >= self.seg_threshold
            if mask.any():
                labels = to_volume_grid(mask, prepared, hu.shape).astype(np.uint8)
        timings["postprocess"] = time.perf_counter() - t
        # "any" is the triage decision (validated for its sensitivity); a subtype is
        # reported only within a positive study, so the report never contradicts itself
        positive = study["any"] >= self.thresholds["any"]
        decisions = {k: positive and study[k] >= self.thresholds[k] for k in FINDINGS}
        return IchPrediction(labels, study, per_slice, prepared.groups, decisions,
                             dict(self.thresholds), timings)
