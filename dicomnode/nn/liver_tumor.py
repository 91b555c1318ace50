"""The ``liver_tumor`` model's recipe: its data, stages, samplers, losses and metrics.

Two stages of :class:`dicomnode.nn.liver25d.Liver25DNet`. Stage 1 learns the liver on
the coarse grid from slabs of whole slices; stage 2 learns liver and tumours at the
fine grid from patches inside the (ground-truth) liver box, most of them centred on a
tumour, drawn by how much of it the network still misses (:class:`TumourSampler`). Both
use weighted cross-entropy + soft Dice. On validation cases the tumour threshold and
the smallest kept tumour island are chosen (:func:`choose_tumour_rule`).

Data: abdomen phantoms, phantom folders, and the LiTS layout (``volume-N.nii[.gz]``
with ``segmentation-N.nii[.gz]``: 0 background, 1 liver, 2 tumour). Labels are 0
background, 1 liver, 2 tumour.

Scores (:meth:`LiverTumorRecipe.score_case`): liver Dice (liver including tumours, the
LiTS convention); tumour Dice restricted to tumours whose longest axial diameter,
measured on the truth mask, is at least ``min_diameter_mm``; lesion detection (a true
tumour >= ``min_diameter_mm`` counts as detected when a predicted tumour voxel overlaps
it); false-positive components. Over cases, tumour Dice is reported the two ways of the
LiTS benchmark (Bilic et al., Medical Image Analysis 2023): *Dice per case*, the mean
of the per-case scores (``tumour_dice_mean``), and *Dice global*, one Dice over the
voxels of those cases pooled (``tumour_dice_global``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from dicomnode.nn import datasets, patches, runtime
from dicomnode.nn.liver25d import (
    BOX_MARGIN_MM,
    HU_WINDOW,
    LIVER_SPACING,
    TUMOUR,
    TUMOUR_SPACING,
    Liver25DNet,
    LiverTumorSegmenter,
    normalise_hu,
)
from dicomnode.nn.losses import CrossEntropyDiceLoss
from dicomnode.nn.recipe import ModelRecipe, Options, Sampler, Source, Stage, positive_ints

log = logging.getLogger(__name__)

#: Names of the liver and tumour labels in phantom label tables.
LIVER_NAMES = ("Liver",)
TUMOUR_NAMES = ("Lesion_Liver", "GTV_Liver", "Liver_Tumor", "Tumor")
#: At most this many voxels of one tumour are kept for centring patches on it.
_VOXELS_PER_LESION = 400
_CONNECT = np.ones((3, 3, 3), dtype=bool)
#: Tumour-probability thresholds tried on validation cases (None: the most probable class).
TUMOUR_THRESHOLDS: tuple[float | None, ...] = (None, 0.5, 0.4, 0.3, 0.2)
#: Smallest kept tumour islands (ml) tried on validation cases.
MIN_TUMOUR_ML: tuple[float, ...] = (0.2, 0.1, 0.05)
#: Default smallest kept tumour island when none was chosen on validation (ml).
DEFAULT_MIN_TUMOUR_ML = 0.2


@dataclass
class LiverTumorOptions(Options):
    """Hyper-parameters of the liver/tumour model (recorded in the metrics file)."""

    slab: int = field(default=8, metadata={"help": "Slices per training slab (>= the "
                                                   "network's 7-slice context)."})
    liver_patch: int = field(default=128, metadata={"help": "Stage-1 patch size in-plane."})
    tumour_patch: int = field(default=96, metadata={"help": "Stage-2 patch size in-plane."})
    tumour_class_weight: float = field(default=3.0, metadata={
        "help": "Cross-entropy weight of the tumour class in stage 2 (higher trades false "
                "positives for recall)."})
    hu_shift: float = field(default=18.0, metadata={
        "help": "Largest shift of a training patch's HU, augmentation (wider makes the "
                "network rely less on absolute HU)."})
    tumour_fraction: float = field(default=0.7, metadata={
        "help": "Fraction of stage-2 patches centred on a tumour."})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field whose value is wrong."""
        positive_ints(self, "slab", "liver_patch", "tumour_patch")
        if self.slab < Liver25DNet.context_slices:
            raise ValueError(f"Invalid 'slab' value '{self.slab}' - must be >= "
                             f"{Liver25DNet.context_slices} (the network's context)")
        for key in ("liver_patch", "tumour_patch"):
            value = getattr(self, key)
            if value < 32 or value % 8:
                raise ValueError(f"Invalid '{key}' value '{value}' - must be a multiple of 8, "
                                 ">= 32")
        if not 0 <= self.hu_shift <= 200:
            raise ValueError(f"Invalid 'hu_shift' value '{self.hu_shift}' - must be 0-200 HU")
        if not self.tumour_class_weight > 0:
            raise ValueError(f"Invalid 'tumour_class_weight' value '{self.tumour_class_weight}'"
                             " - must be positive")
        if not 0 <= self.tumour_fraction <= 1:
            raise ValueError(f"Invalid 'tumour_fraction' value '{self.tumour_fraction}' - "
                             "must be 0-1")


@dataclass
class PreparedLiverCase:
    """One case on both stage grids, normalised, ready for patch sampling."""

    coarse: torch.Tensor
    coarse_liver: torch.Tensor
    fine: torch.Tensor
    fine_labels: torch.Tensor
    lesion_voxels: list[np.ndarray] = field(default_factory=list)
    liver_voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))


def _labels_to_grid(labels: np.ndarray, spacing: Sequence[float],
                    target: Sequence[float]) -> torch.Tensor:
    """Resample a 0/1/2 label map by interpolating each nested mask and thresholding."""
    organ, _ = runtime.resample_to_spacing((labels > 0).astype(np.float32), spacing, target)
    tumour, _ = runtime.resample_to_spacing((labels == 2).astype(np.float32), spacing, target)
    out = (organ > 0.5).to(torch.uint8)
    out[tumour > 0.5] = 2
    return out


def centres(labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Patch centres: voxels of each tumour (one array per tumour) and of the liver.

    Sampling a tumour first and then one of its voxels gives a 10 mm tumour as many
    patches as a 60 mm one (uniform voxel sampling would favour the large one ~200-fold).
    """
    rng = np.random.default_rng(0)
    comps, _ = ndimage.label(labels == 2, structure=_CONNECT)
    lesions = []
    for index, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        voxels = np.argwhere(comps[box] == index) + [s.start for s in box]
        if len(voxels) > _VOXELS_PER_LESION:
            voxels = voxels[rng.choice(len(voxels), _VOXELS_PER_LESION, replace=False)]
        lesions.append(voxels)
    liver = np.argwhere(labels == 1)
    if len(liver) > 5000:
        liver = liver[rng.choice(len(liver), 5000, replace=False)]
    return lesions, liver


def augment(image: torch.Tensor, rng: np.random.Generator, hu_shift: float = 18.0
            ) -> torch.Tensor:
    """Contrast jitter, a shift of every HU by up to ``hu_shift`` and a little extra noise."""
    return patches.jitter_intensity(image, rng, hu_shift / ((HU_WINDOW[1] - HU_WINDOW[0]) / 2))


class LiverSampler:
    """Stage-1 slabs: most centred on a slice with liver, anywhere in-plane."""

    def __init__(self, cases: list[PreparedLiverCase], options: LiverTumorOptions,
                 batch_size: int) -> None:
        self.cases = cases
        self.options = options
        self.batch_size = batch_size

    def __call__(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``([B, 1, slab, P, P] image, [B, slab, P, P] labels)``."""
        opts = self.options
        images, labels = [], []
        size = (opts.slab, opts.liver_patch, opts.liver_patch)
        for _ in range(self.batch_size):
            case = self.cases[int(rng.integers(len(self.cases)))]
            z_n, y_n, x_n = case.coarse.shape
            liver_z = np.flatnonzero(case.coarse_liver.numpy().any(axis=(1, 2)))
            if len(liver_z) and rng.random() < 0.8:
                zc = int(rng.choice(liver_z))
            else:
                zc = int(rng.integers(z_n))
            start = [zc - opts.slab // 2,
                     int(rng.integers(min(0, y_n - size[1]), max(0, y_n - size[1]) + 1)),
                     int(rng.integers(min(0, x_n - size[2]), max(0, x_n - size[2]) + 1))]
            img, lab = patches.crop(case.coarse, case.coarse_liver, start, size)
            images.append(augment(img, rng, opts.hu_shift))
            labels.append(lab)
        return torch.stack(images)[:, None], torch.stack(labels)


class TumourSampler:
    """Stage-2 patches, tumours drawn by how much of them the network still misses.

    A fraction ``options.tumour_fraction`` of the patches is centred on a tumour; the
    rest is split between liver parenchyma (hard negatives: vessels, mottle) and
    anywhere in the liver box. A tumour is drawn with probability proportional to
    ``floor + difficulty``, where difficulty is a running mean of the fraction of the
    patch's tumour voxels the network labelled otherwise (1 for a tumour not yet seen).
    Uniform drawing spends most patches on tumours the network already finds (large,
    hypodense ones) and few on those it misses (cysts at the liver edge, hyperdense or
    thin-rimmed ones); the floor keeps every tumour in the rotation.

    Parameters
    ----------
    cases : list of PreparedLiverCase
        The training cases.
    options : LiverTumorOptions
        Patch size, tumour fraction, HU shift.
    batch_size : int
        Patches per batch.
    floor : float
        Weight of a tumour the network finds perfectly, against 1 + floor for one it
        misses entirely.
    memory : float
        Weight of the previous difficulty in the running mean.
    """

    def __init__(self, cases: list[PreparedLiverCase], options: LiverTumorOptions | None = None,
                 batch_size: int = 4, *, floor: float = 0.25, memory: float = 0.7) -> None:
        if not floor > 0:
            raise ValueError(f"Invalid 'floor' value '{floor}' - must be positive")
        if not 0 <= memory < 1:
            raise ValueError(f"Invalid 'memory' value '{memory}' - must be in [0, 1)")
        self.cases = cases
        self.options = options or LiverTumorOptions()
        self.batch_size = batch_size
        self.lesions = [(case, voxels) for case in cases for voxels in case.lesion_voxels]
        self.difficulty = np.ones(len(self.lesions))
        self.floor = floor
        self.memory = memory
        self._drawn: list[int] = []

    def __call__(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``([B, 1, slab, P, P] image, [B, slab, P, P] labels)``."""
        opts = self.options
        images, labels = [], []
        size = (opts.slab, opts.tumour_patch, opts.tumour_patch)
        weights = self.floor + self.difficulty
        weights = weights / weights.sum() if len(weights) else weights
        self._drawn = []
        for _ in range(self.batch_size):
            draw = rng.random()
            drawn = -1
            if self.lesions and draw < opts.tumour_fraction:
                drawn = int(rng.choice(len(self.lesions), p=weights))
                case, voxels = self.lesions[drawn]
                centre = voxels[int(rng.integers(len(voxels)))]
                jitter = rng.integers(-size[1] // 3, size[1] // 3 + 1, 2)
                centre = np.array([centre[0], centre[1] + jitter[0], centre[2] + jitter[1]])
            else:
                case = self.cases[int(rng.integers(len(self.cases)))]
                if len(case.liver_voxels) and draw < (1 + opts.tumour_fraction) / 2:
                    centre = case.liver_voxels[int(rng.integers(len(case.liver_voxels)))]
                else:
                    centre = np.array([int(rng.integers(n)) for n in case.fine.shape])
            start = [int(c) - s // 2 for c, s in zip(centre, size, strict=True)]
            img, lab = patches.crop(case.fine, case.fine_labels, start, size)
            images.append(augment(img, rng, opts.hu_shift))
            labels.append(lab)
            self._drawn.append(drawn)
        return torch.stack(images)[:, None], torch.stack(labels)

    def feedback(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Update the difficulty of the tumours of the last batch from its output."""
        with torch.no_grad():
            truth = target == TUMOUR
            found = (logits.argmax(1) == TUMOUR) & truth
            totals = truth.flatten(1).sum(1).tolist()
            hits = found.flatten(1).sum(1).tolist()
        for drawn, total, hit in zip(self._drawn, totals, hits, strict=True):
            if drawn >= 0 and total:
                self.difficulty[drawn] = (self.memory * self.difficulty[drawn]
                                          + (1 - self.memory) * (1.0 - hit / total))

    def summary(self) -> dict[str, Any]:
        """Tumour count and the distribution of their final difficulty."""
        if not len(self.difficulty):
            return {"tumours": 0}
        return {"tumours": len(self.difficulty),
                "difficulty_mean": round(float(self.difficulty.mean()), 3),
                "difficulty_quartiles": [round(float(q), 3) for q in
                                         np.quantile(self.difficulty, [0.25, 0.5, 0.75])],
                "mostly_missed": int((self.difficulty > 0.5).sum())}


# ---------------------------------------------------------------------------------------
# Scores


def true_lesions(case: datasets.Case) -> tuple[np.ndarray, dict[int, float]]:
    """Instance map of the true tumours and each one's longest axial diameter (mm).

    The diameter is measured on the painted truth mask, with the code that measures
    the pipeline's lesions (:func:`dicomnode.results.measure.longest_axial_diameter_mm`),
    not taken from the phantom's nominal size: a nominal 15 mm tumour clipped by
    vessels or the liver edge can be a few voxels in the label map.
    """
    from dicomnode.results.measure import longest_axial_diameter_mm

    tumour = case.labels == TUMOUR
    if case.instances is not None and case.instances.shape == tumour.shape:
        instances = np.where(tumour, case.instances, 0).astype(np.int32)
    else:
        instances, _ = ndimage.label(tumour, structure=_CONNECT)
    sizes = {}
    in_plane = (case.spacing[1], case.spacing[2])
    for index, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is not None:
            sizes[index] = longest_axial_diameter_mm(instances[box] == index, in_plane)
    return instances, sizes


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def score_case(pred: np.ndarray, case: datasets.Case, *,
               min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Scores of one predicted label map against its case's truth."""
    instances, diameters = true_lesions(case)
    big_ids = [i for i, d in diameters.items() if d >= min_diameter_mm]
    big = np.isin(instances, big_ids) if big_ids else np.zeros(pred.shape, dtype=bool)
    small = (instances > 0) & ~big
    pred_tumour = pred == TUMOUR
    comps, count = ndimage.label(pred_tumour, structure=_CONNECT)
    keep = np.zeros(pred.shape, dtype=bool)
    false_positives = 0
    for index, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        comp = comps[box] == index
        touches_big = bool((big[box] & comp).any())
        touches_small = bool((small[box] & comp).any())
        if not touches_big and not touches_small:
            false_positives += 1
        if touches_big or not touches_small:
            keep[box] |= comp
    detected = [i for i in big_ids if bool(pred_tumour[instances == i].any())]
    result: dict[str, Any] = {
        "case": case.name,
        "liver_dice": round(dice(pred > 0, case.labels > 0), 4),
        "true_lesions": len(diameters), "true_lesions_ge_min": len(big_ids),
        "detected_ge_min": len(detected), "predicted_lesions": int(count),
        "false_positive_lesions": false_positives,
    }
    result["tumour_dice_ge_min"] = round(dice(keep, big), 4) if big_ids else None
    # the voxel counts behind that Dice, pooled over cases for LiTS's Dice global
    result["tumour_voxels"] = [int((keep & big).sum()), int(keep.sum()), int(big.sum())]
    return result


def summarise(rows: Sequence[dict[str, Any]], min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Aggregate per-case scores: liver Dice, tumour Dice per case and global, detection."""
    if not rows:
        return {"cases": 0}
    liver = [r["liver_dice"] for r in rows]
    tumour = [r["tumour_dice_ge_min"] for r in rows if r["tumour_dice_ge_min"] is not None]
    # overlap, predicted and true voxels pooled over the cases that have a Dice
    counts = [r["tumour_voxels"] for r in rows if r["tumour_dice_ge_min"] is not None]
    pooled = [sum(column) for column in zip(*counts, strict=True)]
    truth = sum(r["true_lesions_ge_min"] for r in rows)
    found = sum(r["detected_ge_min"] for r in rows)
    return {
        "cases": len(rows),
        "min_tumour_diameter_mm": min_diameter_mm,
        "liver_dice_mean": round(float(np.mean(liver)), 4),
        "liver_dice_min": round(float(np.min(liver)), 4),
        "tumour_cases": len(tumour),
        "tumour_dice_mean": round(float(np.mean(tumour)), 4) if tumour else None,
        "tumour_dice_min": round(float(np.min(tumour)), 4) if tumour else None,
        "tumour_dice_global": (round(2.0 * pooled[0] / (pooled[1] + pooled[2]), 4)
                               if pooled and pooled[1] + pooled[2] else None),
        "tumour_cases_dice_ge_0_75": (round(float(np.mean([d >= 0.75 for d in tumour])), 3)
                                      if tumour else None),
        "lesions_ge_min": truth,
        "lesions_detected": found,
        "detection_recall": round(found / truth, 4) if truth else None,
        "false_positive_lesions_per_case": round(
            float(np.mean([r["false_positive_lesions"] for r in rows])), 3),
        "seconds_per_case": round(float(np.mean([r["seconds"] for r in rows])), 2),
    }


def _rule_name(threshold: float | None, min_tumour_ml: float) -> str:
    return f"{'argmax' if threshold is None else threshold} / {min_tumour_ml} ml"


def choose_tumour_rule(segmenter: LiverTumorSegmenter, cases: Iterable[datasets.Case],
                       candidates: Sequence[float | None] = TUMOUR_THRESHOLDS,
                       min_tumour_mls: Sequence[float] = MIN_TUMOUR_ML, *,
                       min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Pick the tumour threshold and smallest tumour island that score best on validation.

    The networks run once per case; each (threshold, island size) rule labels the same
    probabilities. The score is mean tumour Dice plus detection recall (tumours >=
    ``min_diameter_mm``); ties go to the higher threshold, then the larger island
    (fewer false positives). The cases must be neither training nor held-out test
    cases.

    Returns
    -------
    dict
        ``threshold`` and ``min_tumour_ml`` (the choice) and ``candidates``: the summary
        of every rule, keyed ``"THRESHOLD / ML ml"``.
    """
    rules = [(c, m) for c in candidates for m in min_tumour_mls]
    rows: dict[tuple[float | None, float], list[dict[str, Any]]] = {r: [] for r in rules}
    for case in cases:
        started = time.perf_counter()
        segs = segmenter.segment_rules(case.hu, case.spacing, rules)
        seconds = round(time.perf_counter() - started, 2)
        for rule, seg in zip(rules, segs, strict=True):
            row = score_case(seg.labels, case, min_diameter_mm=min_diameter_mm)
            rows[rule].append({**row, "seconds": seconds})
    summaries = {r: summarise(rows[r], min_diameter_mm) for r in rules}

    def score(rule: tuple[float | None, float]) -> tuple[float, float, float]:
        summary = summaries[rule]
        value = (summary.get("tumour_dice_mean") or 0.0) + (summary.get("detection_recall")
                                                            or 0.0)
        threshold, min_ml = rule
        return round(value, 4), 1.0 if threshold is None else threshold, min_ml

    best = max(rules, key=score)
    log.info("evaluate.threshold_chosen", extra={"dn_fields": {
        "threshold": best[0], "min_tumour_ml": best[1], "score": score(best)[0]}})
    return {"threshold": best[0], "min_tumour_ml": best[1],
            "candidates": {_rule_name(*r): summaries[r] for r in rules}}


# ---------------------------------------------------------------------------------------
# The recipe


class LiverTumorRecipe(ModelRecipe):
    """Liver and liver tumours: two stages of the 2.5D context network."""

    name = "liver_tumor"
    region = "abdomen"
    family = ("2.5D context network (3D-convolution encoder stem, ASPP, depthwise-separable "
              "2D decoder), two stages: liver, then tumours in the liver box")
    stages = (Stage("liver", 2, 8), Stage("tumour", 3, 12, step_factor=15))
    labels: ClassVar[dict[int, str]] = {1: "Liver", 2: "Lesion_Liver"}
    options = LiverTumorOptions
    phantom_matrix = 256
    phantom_noise_hu = 12.0
    data_layout = "LiTS pairs (volume-N.nii + segmentation-N.nii)"

    def __init__(self) -> None:
        self.min_diameter_mm = 10.0

    def relabel(self, labels: np.ndarray, table: Mapping[int, str]) -> np.ndarray:
        """Phantom labels reduced to 0 background, 1 liver, 2 tumour."""
        out = np.zeros(labels.shape, dtype=np.uint8)
        for value, name in table.items():
            if name in LIVER_NAMES:
                out[labels == value] = 1
        for value, name in table.items():
            if name in TUMOUR_NAMES:
                out[labels == value] = 2
        return out

    def discover_public(self, data_dir: Path) -> list[Source]:
        """LiTS ``volume-N.nii[.gz]`` files that have their ``segmentation-N`` beside them."""
        found: list[Source] = []
        for volume in sorted(data_dir.rglob("volume-*.nii*")):
            number = re.search(r"volume-(\d+)\.nii", volume.name)
            if not number:
                continue
            for ext in (".nii", ".nii.gz"):
                seg = volume.with_name(f"segmentation-{number.group(1)}{ext}")
                if seg.exists():
                    found.append((volume, seg))
                    break
        return found

    def load_public(self, source: tuple[Path, ...]) -> datasets.Case:
        """Read one LiTS case (``volume-N.nii``, ``segmentation-N.nii``)."""
        volume, segmentation = source
        hu, spacing = datasets.nifti_zyx(volume)
        seg, _ = datasets.nifti_zyx(segmentation)
        if seg.shape != hu.shape:
            raise ValueError(f"Invalid 'segmentation' value '{segmentation}' - shape "
                             f"{seg.shape} differs from the volume's {hu.shape}")
        labels = np.clip(seg.astype(np.int16), 0, 2).astype(np.uint8)
        return datasets.Case(volume.name.split(".")[0].replace("volume", "lits"),
                             hu.astype(np.int16), labels, spacing)

    def prepare(self, case: datasets.Case, options: Options) -> PreparedLiverCase | None:
        """Put one case on the coarse (stage 1) and the fine liver-box (stage 2) grids."""
        if not (case.labels > 0).any():
            log.warning("train.case_without_liver", extra={"dn_fields": {"case": case.name}})
            return None
        hu = torch.from_numpy(np.ascontiguousarray(case.hu))
        coarse, _ = runtime.resample_to_spacing(hu, case.spacing, LIVER_SPACING)
        coarse_labels = _labels_to_grid(case.labels, case.spacing, LIVER_SPACING)
        idx = np.nonzero(case.labels > 0)
        box = []
        for axis in range(3):
            margin = math.ceil(1.5 * BOX_MARGIN_MM / case.spacing[axis])
            box.append(slice(max(0, int(idx[axis].min()) - margin),
                             min(case.labels.shape[axis], int(idx[axis].max()) + 1 + margin)))
        region = tuple(box)
        fine, _ = runtime.resample_to_spacing(hu[region], case.spacing, TUMOUR_SPACING)
        fine_labels = _labels_to_grid(case.labels[region], case.spacing, TUMOUR_SPACING)
        return PreparedLiverCase(normalise_hu(coarse).half(),
                                 (coarse_labels > 0).to(torch.uint8),
                                 normalise_hu(fine).half(), fine_labels,
                                 *centres(fine_labels.numpy()))

    def network(self, stage: Stage, width: int) -> nn.Module:
        """A :class:`~dicomnode.nn.liver25d.Liver25DNet` of the stage's classes."""
        return Liver25DNet(stage.classes, width)

    def sampler(self, stage: Stage, cases: list[Any], options: Options,
                batch_size: int) -> Sampler:
        """Liver slabs (stage 1) or tumour-weighted patches (stage 2)."""
        assert isinstance(options, LiverTumorOptions)
        if stage.name == "liver":
            return LiverSampler(cases, options, batch_size)
        return TumourSampler(cases, options, batch_size)

    def loss(self, stage: Stage, options: Options) -> nn.Module:
        """Weighted cross-entropy + soft Dice (the tumour class weighted in stage 2)."""
        assert isinstance(options, LiverTumorOptions)
        if stage.name == "liver":
            return CrossEntropyDiceLoss((1.0, 1.0))
        return CrossEntropyDiceLoss((1.0, 1.0, options.tumour_class_weight))

    def segmenter(self, nets: Mapping[str, nn.Module], config: Mapping[str, Any],
                  device: torch.device, **overrides: Any) -> LiverTumorSegmenter:
        """Both stages, with the labelling rule of ``config`` unless ``overrides`` set one."""
        options = dict(overrides)
        if config.get("tumour_threshold") is not None:
            options.setdefault("tumour_threshold", float(config["tumour_threshold"]))
        if config.get("min_tumour_ml") is not None:
            options.setdefault("min_tumour_ml", float(config["min_tumour_ml"]))
        liver, tumour = nets["liver"], nets["tumour"]
        assert isinstance(liver, Liver25DNet) and isinstance(tumour, Liver25DNet)
        return LiverTumorSegmenter(liver, tumour, device, **options)

    def validate(self, segmenter: Any, cases: Any) -> dict[str, Any] | None:
        """The tumour threshold and smallest tumour island, chosen on validation cases."""
        with torch.inference_mode():
            chosen = choose_tumour_rule(segmenter, cases)
        return {**chosen, "choice": {"tumour_threshold": chosen["threshold"],
                                     "min_tumour_ml": chosen["min_tumour_ml"]}}

    def inherited(self, previous: Mapping[str, Any], trained: Sequence[str]
                  ) -> dict[str, Any]:
        """With the tumour stage not retrained, its labelling rule is kept."""
        if "tumour" in trained:
            return {}
        kept = {"tumour_threshold": previous.get("tumour_threshold")}
        if previous.get("min_tumour_ml") is not None:
            kept["min_tumour_ml"] = previous["min_tumour_ml"]
        return kept

    def operating_point(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The labelling rule the weights are shipped with."""
        return {"tumour_threshold": config.get("tumour_threshold"),
                "min_tumour_ml": config.get("min_tumour_ml", DEFAULT_MIN_TUMOUR_ML)}

    def input_spec(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Window, context, both stages' grids, the box margin and the labelling rule."""
        return {"modality": "CT", "region": "abdomen", "units": "HU",
                "hu_window": list(HU_WINDOW), "context_slices": Liver25DNet.context_slices,
                "stage1_spacing_mm": list(LIVER_SPACING),
                "stage2_spacing_mm": list(TUMOUR_SPACING),
                "liver_box_margin_mm": BOX_MARGIN_MM,
                **self.operating_point(config),
                "labels": {str(k): v for k, v in self.labels.items()}}

    def score_case(self, labels: np.ndarray, case: datasets.Case) -> dict[str, Any]:
        """Liver Dice, tumour Dice (tumours >= the minimum diameter), detection."""
        return score_case(labels, case, min_diameter_mm=self.min_diameter_mm)

    def summarise(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """See :func:`summarise`."""
        return summarise(rows, self.min_diameter_mm)

    def evaluation_options(self) -> dict[str, tuple[type, Any, str]]:
        """``--min-diameter``: the smallest tumour that tumour Dice and detection count."""
        return {"min_diameter": (float, 10.0, "Smallest tumour (mm, longest axial "
                                 "diameter) counted by tumour Dice and detection.")}

    def configure_evaluation(self, **values: Any) -> None:
        """Take ``min_diameter``."""
        if values.get("min_diameter") is not None:
            self.min_diameter_mm = float(values["min_diameter"])

    def report_lines(self, report: Mapping[str, Any]) -> list[str]:
        """Per case: liver Dice, tumour Dice, detected, false positives; then the summary."""
        info, summary = report["model"], report["summary"]
        lines = [f"{info['name']} {info['version']} (sha256 {info['sha256'][:12]}), "
                 f"{summary['cases']} cases, tumours >= {self.min_diameter_mm:g} mm"]
        for row in report["cases"]:
            tumour = ("-" if row["tumour_dice_ge_min"] is None
                      else f"{row['tumour_dice_ge_min']:.3f}")
            lines.append(f"  {row['case']:<20} liver Dice {row['liver_dice']:.3f}  tumour Dice "
                         f"{tumour:>5}  detected "
                         f"{row['detected_ge_min']}/{row['true_lesions_ge_min']}  false "
                         f"positives {row['false_positive_lesions']}")
        number = {key: "-" if summary.get(key) is None else f"{summary[key]:.3f}"
                  for key in ("liver_dice_mean", "liver_dice_min", "tumour_dice_mean",
                              "tumour_dice_min", "tumour_dice_global", "detection_recall",
                              "false_positive_lesions_per_case")}
        lines += [
            f"liver Dice mean {number['liver_dice_mean']} (min {number['liver_dice_min']})",
            f"tumour Dice per case {number['tumour_dice_mean']} (min "
            f"{number['tumour_dice_min']}, {summary.get('tumour_cases', 0)} cases), "
            f"Dice global {number['tumour_dice_global']}",
            f"detection recall {number['detection_recall']} "
            f"({summary.get('lesions_detected', 0)}/{summary.get('lesions_ge_min', 0)}), "
            f"false positives per case {number['false_positive_lesions_per_case']}"]
        return lines


RECIPE = LiverTumorRecipe
