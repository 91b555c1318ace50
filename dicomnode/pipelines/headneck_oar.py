"""The ``headneck_oar`` pipeline: the nine organs at risk of a head-and-neck planning CT.

The recipe on :class:`~dicomnode.pipelines.base.ModelPipeline`: two stages of
AnatomyNet (:mod:`dicomnode.nn.anatomynet`, trained by :mod:`dicomnode.nn.headneck_oar`)
find the organs' box on a coarse grid and segment the organs in it; the result is the
label map on the volume's grid (TG-263 names) with each organ's volume, for an RTSTRUCT
the planning system reads, a SEG and an SR.

What is reported, and what is not:

- an organ smaller than its plausible minimum (``MIN_ML``: a resected gland, an optic
  nerve outside the field), or read with less confidence than ``MIN_CONFIDENCE``, is
  left out; the others are still returned, and the SR says which organ was not found;
- a series with neither mandible nor parotid glands (a head-only scan, a chest or an
  abdomen routed here), too few slices, or a mandible cut by the field of view gives
  "no result" with the reason, never an empty or made-up structure.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import numpy as np

from dicomnode.logs import fields
from dicomnode.nn.anatomynet import ORGANS, canonical_flips
from dicomnode.nn.headneck_oar import HeadNeckRecipe
from dicomnode.pipelines.base import (
    ModelPipeline,
    PipelineResult,
    ResultObject,
    register,
)
from dicomnode.results.measure import VoxelGrid, structure_volumes

log = logging.getLogger(__name__)

#: Smallest plausible volume of each organ (ml); below it the organ counts as not found.
MIN_ML: dict[str, float] = {
    "BrainStem": 5.0, "OpticChiasm": 0.03, "Bone_Mandible": 15.0,
    "OpticNrv_L": 0.05, "OpticNrv_R": 0.05, "Parotid_L": 3.0, "Parotid_R": 3.0,
    "Glnd_Submand_L": 1.0, "Glnd_Submand_R": 1.0,
}

#: Lowest mean probability over its voxels (``measurements["confidence"]``) at which an
#: organ counts as found; below it the organ is left out and named absent. Meant for the
#: glands that surgery removes, whose bed the shipped weights may read as gland with
#: less confidence than a gland. Empty for 0.4.2: it leaves a resected gland's bed under
#: ``MIN_ML`` by itself, and what little bed it draws (confidence 0.67-0.72 on phantoms)
#: is no surer than the least sure real parotid's 0.79 by a margin a threshold could rely
#: on (see the model card).
MIN_CONFIDENCE: dict[str, float] = {}


class HeadNeckOarPipeline(ModelPipeline):
    """Organs at risk of head-and-neck radiotherapy (SEG, RTSTRUCT, SR of volumes).

    Parameters
    ----------
    context : PipelineContext, optional
        Models folder and device.
    """

    name: ClassVar[str] = "headneck_oar"
    region: ClassVar[str] = "headneck"
    emits: ClassVar[tuple[ResultObject, ...]] = (ResultObject.SEG, ResultObject.RTSTRUCT,
                                                  ResultObject.SR)
    recipe = HeadNeckRecipe
    #: The nine organs span about 13 cm from the chiasm to the submandibular glands.
    min_slices = 20
    min_extent_z_mm = 80.0
    min_field_mm = 100.0
    warm_up_region = "headneck"

    def segment(self, segmenter: Any, volume: Any) -> Any:
        """The organs, with the series' orientation (left and right come from it)."""
        return segmenter.segment(np.asarray(volume.hu), tuple(float(s) for s in volume.spacing),
                                 getattr(volume, "direction", None))

    def unsuitable(self, volume: Any) -> str | None:
        """An axial series is needed (any flips of its axes): the sides come from it."""
        try:
            canonical_flips(getattr(volume, "direction", None))
        except ValueError:
            return ("not an axial series: rows must run left-right and columns front-back "
                    "of the patient (reformat it axially)")
        return None

    def report(self, segmentation: Any, volume: Any, timings: dict[str, float],
               algorithm: dict[str, str]) -> PipelineResult:
        """Organs found, their volumes and those not found; or why there is no result."""
        t = time.perf_counter()
        labels = segmentation.labels
        grid = VoxelGrid(tuple(float(s) for s in volume.spacing))  # type: ignore[arg-type]
        volumes = structure_volumes(labels, ORGANS, grid)
        confidence = {name: segmentation.confidence[value]
                      for value, name in ORGANS.items() if value in segmentation.confidence}
        absent = [name for name, ml in volumes.items()
                  if ml < MIN_ML[name] or confidence.get(name, 1.0) < MIN_CONFIDENCE.get(name, 0)]
        for value, name in ORGANS.items():
            if name in absent:
                labels[labels == value] = 0
        timings["measure"] = time.perf_counter() - t
        if not {"Bone_Mandible", "Parotid_L", "Parotid_R"} - set(absent):
            # the spinal cord of a chest or abdomen can pass for a brainstem: the face's
            # bone and glands are what mark a head-and-neck series
            return self.no_result(
                "no head-and-neck anatomy found: neither mandible nor parotid glands (a "
                "head-only, chest or abdomen series?)", timings, algorithm)
        if "Bone_Mandible" not in absent:
            slices = np.flatnonzero((labels == 3).any(axis=(1, 2)))
            if slices[0] == 0 or slices[-1] == labels.shape[0] - 1:
                end = "first" if slices[0] == 0 else "last"
                return self.no_result(
                    f"field of view cuts the mandible: it reaches the series' {end} slice, "
                    "so the organs below or above it may be cut too", timings, algorithm)
        present = {v: n for v, n in ORGANS.items() if n not in absent}
        measurements: dict[str, Any] = {
            "volumes_ml": {n: volumes[n] for n in present.values()},
            "absent": absent,
            "confidence": {n: confidence[n] for n in present.values() if n in confidence},
        }
        log.info("pipeline.done", extra=fields(pipeline=self.name, organs=len(present),
                                               absent=len(absent)))
        return PipelineResult(
            self.name, ok=True,
            reason=("" if not absent else "not found: " + ", ".join(absent)),
            label_map=labels, structures=present, measurements=measurements,
            algorithm=algorithm)


register("headneck_oar", HeadNeckOarPipeline)
