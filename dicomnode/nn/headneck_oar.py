"""The ``headneck_oar`` model's recipe: data, stages, samplers, loss and scores.

Two stages of :class:`dicomnode.nn.anatomynet.AnatomyNet`: ``coarse`` learns where the
organs are (one class, their union) on the whole volume at ``COARSE_SPACING`` (it finds
the box stage 2 works in), ``fine`` learns the nine organs at ``FINE_SPACING`` inside
the organs' box from patches centred on an organ drawn by weight (the small ones,
chiasm and optic nerves, twice as often: a 0.3 ml chiasm gets more patches than a
90 ml mandible), with the side channel (distance from the box's centre along the
patient's left-right axis) that tells its classifier left from right. Loss: soft
Dice + 0.5 focal (gamma 2), AnatomyNet's, with the organs missing from a case's
annotation merged into background (:class:`dicomnode.nn.losses.DiceFocalLoss`).
Augmentation: contrast and HU shift, extra noise, a softer or sharper reconstruction
kernel; never a left-right flip (the sides are the labels).

Data: head-and-neck phantoms, phantom folders, and the PDDCA / MICCAI 2015 layout
(``<case>/img.nrrd`` with ``<case>/structures/<Name>.nrrd``, one binary mask per organ,
any of the organs missing). Scores per organ: Dice and the 95th-percentile Hausdorff
distance (mm) on the case's own grid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the name every torch reader knows
from scipy import ndimage
from torch import nn

from dicomnode.imaging import morphology
from dicomnode.nn import datasets, patches, runtime
from dicomnode.nn.anatomynet import (
    BOX_MARGIN_MM,
    COARSE_SPACING,
    FINE_SPACING,
    HU_WINDOW,
    MIRROR,
    NUM_CLASSES,
    ORGANS,
    PAIRS,
    AnatomyNet,
    HeadNeckSegmenter,
    midline,
    normalise_hu,
    side_map,
)
from dicomnode.nn.losses import DiceFocalLoss
from dicomnode.nn.recipe import ModelRecipe, Options, Sampler, Source, Stage, positive_ints

log = logging.getLogger(__name__)

#: Names each organ goes by: TG-263 (the model's), the MICCAI 2015 phantom names, PDDCA's.
SYNONYMS: dict[int, tuple[str, ...]] = {
    1: ("BrainStem", "Brainstem"),
    2: ("OpticChiasm", "Chiasm"),
    3: ("Bone_Mandible", "Mandible"),
    4: ("OpticNrv_L", "OpticNerve_L"),
    5: ("OpticNrv_R", "OpticNerve_R"),
    6: ("Parotid_L",),
    7: ("Parotid_R",),
    8: ("Glnd_Submand_L", "Submandibular_L"),
    9: ("Glnd_Submand_R", "Submandibular_R"),
}
#: The small organs the model card reports on their own (target Dice >= 0.70).
SMALL_ORGANS = (2, 4, 5)
#: The submandibular glands, drawn more often with ``gland_weight``.
GLANDS = (8, 9)
#: At most this many voxels of one organ are kept for centring patches on it.
_VOXELS_PER_ORGAN = 2000


@dataclass
class HeadNeckOptions(Options):
    """Hyper-parameters of the head-and-neck model (recorded in the metrics file)."""

    coarse_slices: int = field(default=32, metadata={"help": "Stage-1 patch slices (5 mm)."})
    coarse_patch: int = field(default=80, metadata={"help": "Stage-1 patch size in-plane "
                                                            "(4 mm pixels)."})
    fine_slices: int = field(default=24, metadata={"help": "Stage-2 patch slices (2.5 mm)."})
    fine_patch: int = field(default=96, metadata={"help": "Stage-2 patch size in-plane "
                                                           "(1 mm pixels)."})
    organ_fraction: float = field(default=0.85, metadata={
        "help": "Fraction of stage-2 patches centred on an organ."})
    small_organ_weight: float = field(default=2.0, metadata={
        "help": "How much more often the chiasm and optic nerves are drawn than the other "
                "organs."})
    gland_weight: float = field(default=1.0, metadata={
        "help": "How much more often the submandibular glands are drawn than the other "
                "organs."})
    hu_shift: float = field(default=40.0, metadata={
        "help": "Largest shift of a training patch's HU (augmentation)."})
    focal_weight: float = field(default=0.5, metadata={
        "help": "Weight of the focal term beside soft Dice (AnatomyNet: 0.5)."})
    focal_gamma: float = field(default=2.0, metadata={"help": "Focal exponent (AnatomyNet: 2)."})
    absent_voxels: float = field(default=0.0, metadata={
        "help": "Stage 2: an organ annotated in a case but absent from a patch costs "
                "P / (P + this), P its probability mass in voxels (0: off)."})
    absent_scope: str = field(default="patch", metadata={
        "help": "Which organs --absent-voxels charges: 'patch' (any annotated organ "
                "missing from the patch) or 'case' (only one missing from the whole "
                "case, a resected gland)."})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field whose value is wrong."""
        positive_ints(self, "coarse_slices", "coarse_patch", "fine_slices", "fine_patch")
        for key in ("coarse_patch", "fine_patch"):
            value = getattr(self, key)
            if value < 16 or value % 2:
                raise ValueError(f"Invalid '{key}' value '{value}' - must be even, >= 16")
        if not 0 <= self.organ_fraction <= 1:
            raise ValueError(f"Invalid 'organ_fraction' value '{self.organ_fraction}' - must "
                             "be 0-1")
        if not 0 <= self.hu_shift <= 200:
            raise ValueError(f"Invalid 'hu_shift' value '{self.hu_shift}' - must be 0-200 HU")
        for key in ("small_organ_weight", "gland_weight"):
            if not getattr(self, key) > 0:
                raise ValueError(f"Invalid '{key}' value '{getattr(self, key)}' - must be "
                                 "positive")
        if self.focal_weight < 0 or self.focal_gamma < 0:
            raise ValueError(f"Invalid 'focal_weight' value '{self.focal_weight}' - focal "
                             "weight and gamma must be >= 0")
        if self.absent_voxels < 0:
            raise ValueError(f"Invalid 'absent_voxels' value '{self.absent_voxels}' - must "
                             "be >= 0")
        if self.absent_scope not in ("patch", "case"):
            raise ValueError(f"Invalid 'absent_scope' value '{self.absent_scope}' - must be "
                             "'patch' or 'case'")


@dataclass
class PreparedHeadNeckCase:
    """One case on both stage grids (canonical orientation), ready for patch sampling."""

    coarse: torch.Tensor
    coarse_labels: torch.Tensor
    fine: torch.Tensor
    fine_labels: torch.Tensor
    present: np.ndarray
    #: Per organ (``ORGANS`` order), up to ``_VOXELS_PER_ORGAN`` of its voxels.
    organ_voxels: list[np.ndarray]
    #: Per organ, where it would lie when the case says it is absent (a resected gland:
    #: its partner's voxels mirrored about the midline), so that patches show the empty
    #: bed as background; an empty array otherwise.
    empty_beds: list[np.ndarray]


def _organ_voxels(labels: np.ndarray) -> list[np.ndarray]:
    """Up to ``_VOXELS_PER_ORGAN`` voxels of each organ (an empty array for a missing one)."""
    rng = np.random.default_rng(0)
    out = []
    for value in ORGANS:
        voxels = np.argwhere(labels == value)
        if len(voxels) > _VOXELS_PER_ORGAN:
            voxels = voxels[rng.choice(len(voxels), _VOXELS_PER_ORGAN, replace=False)]
        out.append(voxels)
    return out


def _empty_beds(organ_voxels: list[np.ndarray], present: np.ndarray,
                labels: np.ndarray) -> list[np.ndarray]:
    """Where each annotated-but-absent organ of a pair would lie: its partner's voxels
    mirrored about the midline (:func:`~dicomnode.nn.anatomynet.midline`)."""
    beds = [np.zeros((0, 3), dtype=np.int64) for _ in ORGANS]
    centre = midline(labels)
    if centre is None:
        return beds
    for left, right in PAIRS:
        for value, partner in ((left, right), (right, left)):
            # ORGANS are 1..9, so an organ's index is its value - 1
            own, other = organ_voxels[value - 1], organ_voxels[partner - 1]
            if present[value] and not len(own) and len(other):
                mirrored = other.copy()
                mirrored[:, 2] = np.clip(np.rint(2 * centre - other[:, 2]), 0,
                                         labels.shape[2] - 1)
                beds[value - 1] = mirrored
    return beds


def _kernel(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A softer (blurred) or sharper (unsharp-masked) reconstruction kernel, in-plane.

    Half the patches keep theirs; scanners differ mostly in this and in noise.
    """
    draw = rng.random()
    if draw < 0.5:
        return image
    sigma = float(rng.uniform(0.5, 1.2))
    radius = 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    flat = image[None, None]
    blurred = F.conv3d(F.pad(flat, (radius, radius, 0, 0, 0, 0), mode="replicate"),
                       g.reshape(1, 1, 1, 1, -1))
    blurred = F.conv3d(F.pad(blurred, (0, 0, radius, radius, 0, 0), mode="replicate"),
                       g.reshape(1, 1, 1, -1, 1))[0, 0]
    if draw < 0.75:
        return blurred
    amount = float(rng.uniform(0.3, 1.0))
    return image + amount * (image - blurred)


def augment(image: torch.Tensor, rng: np.random.Generator, hu_shift: float) -> torch.Tensor:
    """Kernel, contrast, HU shift and noise (normalised units; 1 = half the window)."""
    half = (HU_WINDOW[1] - HU_WINDOW[0]) / 2
    return patches.jitter_intensity(_kernel(image, rng), rng, hu_shift / half, noise=0.05)


class _PatchSampler:
    """Patches of one stage's grid: most centred on an organ, the rest anywhere."""

    def __init__(self, cases: list[PreparedHeadNeckCase], stage: str,
                 options: HeadNeckOptions, batch_size: int) -> None:
        self.cases = cases
        self.stage = stage
        self.options = options
        self.batch_size = batch_size
        if stage == "coarse":
            self.size = (options.coarse_slices, options.coarse_patch, options.coarse_patch)
        else:
            self.size = (options.fine_slices, options.fine_patch, options.fine_patch)

    def _grids(self, case: PreparedHeadNeckCase) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stage == "coarse":
            return case.coarse, case.coarse_labels
        return case.fine, case.fine_labels

    def _weight(self, value: int) -> float:
        """How often patches are centred on organ ``value``, relative to the others."""
        if value in SMALL_ORGANS:
            return self.options.small_organ_weight
        return self.options.gland_weight if value in GLANDS else 1.0

    def __call__(self, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``([B, C, D, H, W] image, ([B, D, H, W] labels, [B, classes] present))``.

        Coarse: one channel, labels 0/1 (organ); fine: the image and the side channel,
        the nine organs' labels, and with ``absent_scope`` 'case' a third ``[B, classes]``
        tensor: the organs each case annotates and does not hold (its resected glands).
        """
        images, labels, present, gone = [], [], [], []
        for _ in range(self.batch_size):
            case = self.cases[int(rng.integers(len(self.cases)))]
            image, target = self._grids(case)
            # an empty bed is drawn as often as its organ would be
            organs = [(v if len(v) else bed, self._weight(value))
                      for value, v, bed in zip(ORGANS, case.organ_voxels, case.empty_beds,
                                               strict=True)
                      if len(v) or len(bed)]
            if self.stage == "fine" and organs and rng.random() < self.options.organ_fraction:
                weights = np.array([w for _, w in organs])
                voxels = organs[int(rng.choice(len(organs), p=weights / weights.sum()))][0]
                centre = voxels[int(rng.integers(len(voxels)))].astype(np.int64)
                jitter = rng.integers(-(np.array(self.size) // 3), np.array(self.size) // 3 + 1)
                centre = centre + jitter
            else:
                # anywhere whose patch stays mostly inside the grid
                centre = np.array([int(rng.integers(max(1, n))) for n in image.shape])
            start = [int(c) - s // 2 for c, s in zip(centre, self.size, strict=True)]
            img, lab = patches.crop(image, target, start, self.size)
            channels = [augment(img, rng, self.options.hu_shift)]
            if self.stage == "fine":
                side = side_map(self.size, FINE_SPACING[2], (image.shape[2] - 1) / 2 - start[2])
                channels.append(side)
                present.append(torch.from_numpy(case.present))
                if self.options.absent_scope == "case":
                    held = np.array([True] + [bool(len(v)) for v in case.organ_voxels])
                    gone.append(torch.from_numpy(case.present & ~held))
            else:
                present.append(torch.tensor([True, bool(case.present[1:].any())]))
            images.append(torch.stack(channels))
            labels.append(lab)
        if gone:
            return torch.stack(images), (torch.stack(labels), torch.stack(present),
                                         torch.stack(gone))
        return torch.stack(images), (torch.stack(labels), torch.stack(present))


# ---------------------------------------------------------------------------------------
# Scores


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def hausdorff95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float | None:
    """95th-percentile symmetric surface distance in mm (None when a mask is empty).

    Surface voxels are those with a 6-neighbour outside the mask; distances are
    Euclidean in mm from each surface voxel of one mask to the other's surface.
    """
    if not a.any() or not b.any():
        return None
    box = morphology.bounding_box(a | b)
    assert box is not None
    pad = [(1, 1)] * 3
    a, b = np.pad(a[box], pad), np.pad(b[box], pad)
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
    distances = np.concatenate([to_b[surface_a], to_a[surface_b]])
    return float(np.percentile(distances, 95))


def score_case(pred: np.ndarray, case: datasets.Case) -> dict[str, Any]:
    """Dice and HD95 of every organ annotated in the case."""
    present = case.present if case.present is not None else tuple(ORGANS)
    dices: dict[str, float] = {}
    hd95: dict[str, float | None] = {}
    for value, name in ORGANS.items():
        if value not in present:
            continue
        truth, found = case.labels == value, pred == value
        dices[name] = round(dice(found, truth), 4)
        distance = hausdorff95(found, truth, case.spacing)
        hd95[name] = None if distance is None else round(distance, 2)
    return {"case": case.name, "dice": dices, "hd95_mm": hd95,
            "dice_mean": round(float(np.mean(list(dices.values()))), 4) if dices else None}


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per organ: mean and lowest Dice, mean HD95; the mean over organs; the small ones."""
    if not rows:
        return {"cases": 0}
    per_organ: dict[str, dict[str, Any]] = {}
    for name in ORGANS.values():
        values = [r["dice"][name] for r in rows if name in r["dice"]]
        distances = [r["hd95_mm"][name] for r in rows
                     if r["hd95_mm"].get(name) is not None]
        if not values:
            continue
        per_organ[name] = {
            "cases": len(values),
            "dice_mean": round(float(np.mean(values)), 4),
            "dice_min": round(float(np.min(values)), 4),
            "hd95_mm_mean": round(float(np.mean(distances)), 2) if distances else None,
            "missed": sum(1 for r in rows if name in r["dice"]
                          and r["hd95_mm"].get(name) is None and r["dice"][name] < 1),
        }
    means = [v["dice_mean"] for v in per_organ.values()]
    small = [per_organ[ORGANS[v]]["dice_mean"] for v in SMALL_ORGANS if ORGANS[v] in per_organ]
    return {
        "cases": len(rows),
        "dice_mean": round(float(np.mean(means)), 4) if means else None,
        "dice_small_organs_min": round(float(np.min(small)), 4) if small else None,
        "organs": per_organ,
        "seconds_per_case": round(float(np.mean([r["seconds"] for r in rows])), 2),
    }


#: Thresholds tried for each small organ on validation cases (None: the most probable class).
THRESHOLDS: tuple[float | None, ...] = (None, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05)


def choose_thresholds(segmenter: HeadNeckSegmenter, cases: Any,
                      candidates: Sequence[float | None] = THRESHOLDS) -> dict[str, Any]:
    """Pick, for each small organ, the threshold with the best mean Dice on validation.

    The networks run once per case; every candidate labels the same probabilities. A
    small organ (chiasm, optic nerve) is a few voxels thick: its probability rarely
    beats background over its whole extent, and a lower threshold for it alone, where
    background would win, recovers it. Ties go to the higher threshold (fewer false
    voxels). The cases must be neither training nor held-out cases.

    Returns
    -------
    dict
        ``thresholds`` (organ label as text -> threshold; organs for which the most
        probable class is best are left out) and ``candidates``: each organ's mean Dice
        per candidate.
    """
    scores: dict[int, dict[float | None, list[float]]] = {
        v: {c: [] for c in candidates} for v in SMALL_ORGANS}
    count = 0
    for case in cases:
        found = segmenter.probabilities(case.hu, case.spacing)
        for value in SMALL_ORGANS:
            truth = case.labels == value
            for candidate in candidates:
                chosen = {} if candidate is None else {value: candidate}
                labels = segmenter.label(found, chosen).labels
                scores[value][candidate].append(dice(labels == value, truth))
        count += 1
    means = {v: {c: float(np.mean(d)) if d else 0.0 for c, d in per.items()}
             for v, per in scores.items()}
    thresholds = {}
    for value, per in means.items():
        best = max(candidates, key=lambda c: (round(per[c], 4), 1.0 if c is None else c))
        if best is not None:
            thresholds[str(value)] = best
    log.info("evaluate.thresholds_chosen", extra={"dn_fields": {
        "cases": count, **{ORGANS[int(k)]: v for k, v in thresholds.items()}}})
    return {"thresholds": thresholds, "cases": count,
            "candidates": {ORGANS[v]: {("argmax" if c is None else str(c)): round(m, 4)
                                       for c, m in per.items()}
                           for v, per in means.items()}}


# ---------------------------------------------------------------------------------------
# The recipe


class HeadNeckRecipe(ModelRecipe):
    """Nine organs at risk of a head-and-neck planning CT: two stages of AnatomyNet."""

    name = "headneck_oar"
    region = "headneck"
    family = ("AnatomyNet (3D U-Net, one in-plane down-sampling, squeeze-and-excitation "
              "residual blocks, Dice + focal loss), two stages: the organs' box on a coarse "
              "grid, then the organs in it")
    stages = (Stage("coarse", 2, 12), Stage("fine", NUM_CLASSES, 16, step_factor=10))
    labels: ClassVar[dict[int, str]] = dict(ORGANS)
    options = HeadNeckOptions
    phantom_matrix = 320
    evaluation_matrix = 512
    data_layout = ("PDDCA cases (<case>/img.nrrd with <case>/structures/<Name>.nrrd, "
                   "MICCAI 2015 names)")

    def relabel(self, labels: np.ndarray, table: Mapping[int, str]) -> np.ndarray:
        """Phantom labels mapped onto the model's (by any of each organ's names)."""
        out = np.zeros(labels.shape, dtype=np.uint8)
        for value, name in table.items():
            target = next((k for k, names in SYNONYMS.items() if name in names), None)
            if target is not None:
                out[labels == value] = target
        return out

    def discover_public(self, data_dir: Path) -> list[Source]:
        """PDDCA cases: folders with ``img.nrrd`` and a ``structures`` folder."""
        return [(image.parent,) for image in sorted(data_dir.rglob("img.nrrd"))
                if (image.parent / "structures").is_dir()]

    def load_public(self, source: tuple[Path, ...]) -> datasets.Case:
        """Read one PDDCA case; organs without a mask are recorded as not annotated."""
        folder = source[0]
        hu, spacing = datasets.nifti_zyx(folder / "img.nrrd")
        labels = np.zeros(hu.shape, dtype=np.uint8)
        present = []
        for value, names in SYNONYMS.items():
            path = next((folder / "structures" / f"{n}.nrrd" for n in names
                         if (folder / "structures" / f"{n}.nrrd").exists()), None)
            if path is None:
                continue
            mask, _ = datasets.nifti_zyx(path)
            if mask.shape != hu.shape:
                raise ValueError(f"Invalid 'data' value '{path}' - mask shape {mask.shape} "
                                 f"differs from the image's {hu.shape}")
            labels[(mask > 0) & (labels == 0)] = value
            present.append(value)
        return datasets.Case(folder.name, hu.astype(np.int16), labels, spacing,
                             present=tuple(present))

    def prepare(self, case: datasets.Case, options: Options) -> PreparedHeadNeckCase | None:
        """Put one case on the coarse grid (whole) and the fine grid (the organs' box)."""
        if not (case.labels > 0).any():
            log.warning("train.case_without_organs", extra={"dn_fields": {"case": case.name}})
            return None
        present = np.zeros(NUM_CLASSES, dtype=bool)
        present[0] = True
        for value in (case.present if case.present is not None else ORGANS):
            present[int(value)] = True
        hu = torch.from_numpy(np.ascontiguousarray(case.hu))
        coarse, _ = runtime.resample_to_spacing(hu, case.spacing, COARSE_SPACING)
        coarse_labels = patches.labels_to_grid((case.labels > 0).astype(np.uint8),
                                               case.spacing, COARSE_SPACING, 2)
        box = morphology.bounding_box(case.labels > 0)
        assert box is not None
        region = []
        for axis, s in enumerate(box):
            margin = math.ceil(2 * BOX_MARGIN_MM / case.spacing[axis])
            region.append(slice(max(0, s.start - margin),
                                min(case.labels.shape[axis], s.stop + margin)))
        crop = tuple(region)
        fine, _ = runtime.resample_to_spacing(hu[crop], case.spacing, FINE_SPACING)
        fine_labels = patches.labels_to_grid(case.labels[crop], case.spacing, FINE_SPACING,
                                             NUM_CLASSES)
        voxels = _organ_voxels(fine_labels.numpy())
        return PreparedHeadNeckCase(normalise_hu(coarse).half(), coarse_labels,
                                    normalise_hu(fine).half(), fine_labels, present, voxels,
                                    _empty_beds(voxels, present, fine_labels.numpy()))

    def network(self, stage: Stage, width: int) -> nn.Module:
        """An :class:`~dicomnode.nn.anatomynet.AnatomyNet` of ``width`` (the fine stage's
        with the side channel)."""
        return AnatomyNet(stage.classes, width, side_channel=stage.name == "fine")

    def sampler(self, stage: Stage, cases: list[Any], options: Options,
                batch_size: int) -> Sampler:
        """Random patches (coarse) or organ-centred ones (fine)."""
        assert isinstance(options, HeadNeckOptions)
        return _PatchSampler(cases, stage.name, options, batch_size)  # type: ignore[return-value]

    def loss(self, stage: Stage, options: Options) -> nn.Module:
        """Soft Dice + focal, unannotated organs merged into background."""
        assert isinstance(options, HeadNeckOptions)
        return DiceFocalLoss(options.focal_weight, options.focal_gamma,
                             absent_voxels=options.absent_voxels if stage.name == "fine" else 0)

    def segmenter(self, nets: Mapping[str, nn.Module], config: Mapping[str, Any],
                  device: torch.device, **overrides: Any) -> HeadNeckSegmenter:
        """Both stages with the window sizes they were trained on and the small organs'
        thresholds chosen on validation."""
        coarse, fine = nets["coarse"], nets["fine"]
        assert isinstance(coarse, AnatomyNet) and isinstance(fine, AnatomyNet)
        options = {"roi_coarse": tuple(config.get("roi_coarse", (32, 80, 80))),
                   "roi_fine": tuple(config.get("roi_fine", (24, 96, 96))),
                   "thresholds": {int(k): float(v)
                                  for k, v in (config.get("thresholds") or {}).items()},
                   "mirror": bool(config.get("mirror", MIRROR)),
                   **overrides}
        return HeadNeckSegmenter(coarse, fine, device, **options)

    def validate(self, segmenter: Any, cases: Any) -> dict[str, Any] | None:
        """The small organs' thresholds, chosen on validation cases (see
        :func:`choose_thresholds`)."""
        with torch.inference_mode():
            chosen = choose_thresholds(segmenter, cases)
        return {**chosen, "choice": {"thresholds": chosen["thresholds"]}}

    def inherited(self, previous: Mapping[str, Any], trained: Sequence[str]
                  ) -> dict[str, Any]:
        """With the fine stage not retrained, its thresholds are kept."""
        if "fine" in trained or not previous.get("thresholds"):
            return {}
        return {"thresholds": dict(previous["thresholds"])}

    def operating_point(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The sliding-window sizes (the training patch sizes), whether stage 2 also reads
        the box mirrored, and the small organs' thresholds the weights ship with."""
        return {"roi_coarse": list(config.get("roi_coarse", (32, 80, 80))),
                "mirror": bool(config.get("mirror", MIRROR)),
                "roi_fine": list(config.get("roi_fine", (24, 96, 96))),
                "thresholds": {str(k): float(v)
                               for k, v in (config.get("thresholds") or {}).items()}}

    def train_config(self, options: Options) -> dict[str, Any]:
        """The patch sizes, recorded so that inference uses windows of the same size, and
        the mirrored reading the thresholds are chosen with."""
        assert isinstance(options, HeadNeckOptions)
        return {"mirror": MIRROR, "roi_coarse": [options.coarse_slices, options.coarse_patch,
                               options.coarse_patch],
                "roi_fine": [options.fine_slices, options.fine_patch, options.fine_patch]}

    def input_spec(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Window, grids, the box margin, window sizes, thresholds and labels (TG-263)."""
        return {"modality": "CT", "region": "headneck", "units": "HU",
                "hu_window": list(HU_WINDOW), "orientation": "axial, any flips",
                "stage1_spacing_mm": list(COARSE_SPACING),
                "stage2_spacing_mm": list(FINE_SPACING),
                "organ_box_margin_mm": BOX_MARGIN_MM, **self.operating_point(config),
                "labels": {str(k): v for k, v in ORGANS.items()}}

    def score_case(self, labels: np.ndarray, case: datasets.Case) -> dict[str, Any]:
        """Dice and HD95 per organ."""
        return score_case(labels, case)

    def summarise(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """See :func:`summarise`."""
        return summarise(rows)

    def report_lines(self, report: Mapping[str, Any]) -> list[str]:
        """Per case the mean Dice; per organ mean and lowest Dice and mean HD95."""
        info, summary = report["model"], report["summary"]
        lines = [f"{info['name']} {info['version']} (sha256 {info['sha256'][:12]}), "
                 f"{summary['cases']} cases"]
        for row in report["cases"]:
            worst = min(row["dice"].items(), key=lambda item: item[1], default=("-", 0.0))
            lines.append(f"  {row['case']:<20} Dice mean {row['dice_mean']:.3f}  lowest "
                         f"{worst[0]} {worst[1]:.3f}")
        for name, organ in summary.get("organs", {}).items():
            hd = "-" if organ["hd95_mm_mean"] is None else f"{organ['hd95_mm_mean']:.1f}"
            lines.append(f"{name:<16} Dice mean {organ['dice_mean']:.3f} (min "
                         f"{organ['dice_min']:.3f})  HD95 {hd} mm")
        lines.append(f"Dice mean over organs {summary.get('dice_mean', 0):.3f}")
        return lines


RECIPE = HeadNeckRecipe
