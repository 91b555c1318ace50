"""The ``brain_ich`` pipeline: intracranial haemorrhage in a non-contrast head CT.

The recipe on :class:`~dicomnode.pipelines.base.ModelPipeline`: IchNet
(:mod:`dicomnode.nn.ichnet`, trained by :mod:`dicomnode.nn.brain_ich`) gives each slab
and the study a probability of the six RSNA findings. ``any``, the triage decision, is
decided at the threshold its weights were validated at (sensitivity >= 0.95 on
validation phantoms); a subtype at its own threshold, and only in a positive study.
The result carries the study probabilities and decisions, every slice's probabilities,
and the flagged slices (the middle slice of each slab at or above a positive finding's
threshold), for a TID 1500 SR (always, a negative study included: the radiologist sees
it was analysed), a Key Object Selection of the flagged slices, and the blood as a SEG
where the weights' segmentation earned it on validation.

Input the model was not made for gives "no result" with the reason, before the network
runs, so that nothing is ever reported positive from it: not a CT (an MR), a contrast
CT, a localizer, fewer than 10 slices or under 60 mm, a series that is not axial, or a
field of view with no brain inside a skull.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np
from scipy import ndimage

from dicomnode.logs import fields
from dicomnode.nn.brain_ich import BrainIchRecipe
from dicomnode.nn.ichnet import FINDINGS
from dicomnode.pipelines.base import (
    ModelPipeline,
    PipelineResult,
    ResultObject,
    register,
)

log = logging.getLogger(__name__)

#: The SEG's structure name (``dicomnode.results.codes.CATALOGUE``).
BLOOD = "Hemorrhage_Intracranial"
#: Slices tilted more than this from axial (gantry tilt included) are refused.
MAX_TILT_DEG = 30.0
#: A slice shows brain where this much brain-density tissue lies inside a closed skull.
MIN_BRAIN_CM2 = 20.0
#: ... on at least this many millimetres of the series.
MIN_BRAIN_MM = 15.0


def brain_extent_mm(hu: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Millimetres of the series along z whose slices show brain inside a closed skull.

    A slice counts where the tissue of 0-80 HU enclosed by bone (> 250 HU, its holes
    filled) covers :data:`MIN_BRAIN_CM2`. Computed on pixels of about 2 mm.
    """
    step = max(1, int(2.0 / max(spacing[1], spacing[2])))
    area = spacing[1] * step * spacing[2] * step / 100.0  # cm^2 per pixel
    found = 0
    for plane in hu[:, ::step, ::step]:
        bone = plane > 250
        if not bone.any():
            continue
        inside = ndimage.binary_fill_holes(bone) & ~bone
        brain = inside & (plane > 0) & (plane < 80)
        if brain.sum() * area >= MIN_BRAIN_CM2:
            found += 1
    return found * spacing[0]


class BrainIchPipeline(ModelPipeline):
    """Intracranial haemorrhage triage: six findings, flagged slices (SR, KOS, SEG).

    Parameters
    ----------
    context : PipelineContext, optional
        Models folder and device.
    """

    name: ClassVar[str] = "brain_ich"
    region: ClassVar[str] = "head"
    emits: ClassVar[tuple[ResultObject, ...]] = (ResultObject.SEG, ResultObject.SR,
                                                  ResultObject.KOS)
    recipe = BrainIchRecipe
    min_slices = 10
    min_extent_z_mm = 60.0
    min_field_mm = 120.0

    def unsuitable(self, volume: Any) -> str | None:
        """Not a non-contrast axial head CT with brain in its field, in words."""
        from dicomnode.imaging.series import is_localizer

        datasets = list(getattr(volume, "datasets", None) or [])
        if datasets:
            first = datasets[0]
            modality = str(first.get("Modality", "") or "")
            if modality and modality != "CT":
                return (f"not a CT (modality {modality}): the model reads non-contrast "
                        "head CT")
            agent = str(first.get("ContrastBolusAgent", "") or "").strip()
            if agent:
                return ("a contrast-enhanced CT (Contrast/Bolus Agent given): the model "
                        "reads non-contrast head CT only")
            if any(is_localizer(ds) for ds in datasets):
                return "a localizer (scout), not an axial series"
        direction = getattr(volume, "direction", None)
        if direction is not None:
            normal = np.asarray(direction, dtype=float)[2]
            tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal)))))
            if tilt > MAX_TILT_DEG:
                return (f"not an axial series: its slices are {tilt:.0f} degrees from axial "
                        f"(at most {MAX_TILT_DEG:.0f})")
        spacing = tuple(float(s) for s in volume.spacing)
        extent = brain_extent_mm(np.asarray(volume.hu), spacing)
        if extent < MIN_BRAIN_MM:
            return (f"no brain in the field of view: brain inside the skull on "
                    f"{extent:.0f} mm of the series (needs >= {MIN_BRAIN_MM:.0f} mm)")
        return None

    def report(self, segmentation: Any, volume: Any, timings: dict[str, float],
               algorithm: dict[str, str]) -> PipelineResult:
        """Probabilities and decisions per finding, flagged slices, the blood if earned."""
        t = time.perf_counter()
        segmenter, _ = self.load()
        thresholds = segmentation.thresholds
        decisions = dict(segmentation.decisions)  # subtypes only within a positive "any"
        positive = [k for k in FINDINGS if decisions[k]]
        slices = segmentation.slices
        per_finding: dict[str, list[int]] = {}
        for k, key in enumerate(FINDINGS):
            if not decisions[key]:
                continue
            flagged = []
            for group in segmentation.slabs:
                if slices[group.start, k] >= thresholds[key]:
                    flagged.append(group.start + (len(group) - 1) // 2)
            per_finding[key] = flagged
        flagged_slices = sorted({i for v in per_finding.values() for i in v})
        conclusion = ("haemorrhage suspected: " + ", ".join(k for k in positive if k != "any")
                      if decisions["any"] else "no haemorrhage detected")
        measurements: dict[str, Any] = {
            "conclusion": conclusion,
            "slices": per_finding,
            "thresholds": {k: round(float(v), 5) for k, v in thresholds.items()},
            "slice_probabilities": {key: [round(float(p), 4) for p in slices[:, k]]
                                    for k, key in enumerate(FINDINGS)},
        }
        label_map = None
        structures: dict[int, str] = {}
        if (decisions["any"] and getattr(segmenter, "segmentation", False)
                and segmentation.labels.any()):
            label_map = segmentation.labels
            structures = {1: BLOOD}
        timings["decide"] = time.perf_counter() - t
        log.info("pipeline.done", extra=fields(
            pipeline=self.name, positive=bool(decisions["any"]),
            p_any=round(segmentation.study["any"], 4), flagged=len(flagged_slices)))
        return PipelineResult(
            self.name, ok=True, reason=conclusion, label_map=label_map,
            structures=structures,
            probabilities={k: round(float(segmentation.study[k]), 4) for k in FINDINGS},
            decisions={k: bool(v) for k, v in decisions.items()},
            flagged_slices=flagged_slices, measurements=measurements,
            algorithm=algorithm, urgent=bool(decisions["any"]))


register("brain_ich", BrainIchPipeline)
