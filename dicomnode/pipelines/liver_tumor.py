"""The ``liver_tumor`` pipeline: liver and liver tumours of an abdomen CT.

The recipe on :class:`~dicomnode.pipelines.base.ModelPipeline`: the two-stage 2.5D
context network (:mod:`dicomnode.nn.liver25d`, trained by
:mod:`dicomnode.nn.liver_tumor`) segments the liver, then the tumours inside it; the
result is the label map on the volume's grid with the measurements the SR reports
(:func:`dicomnode.results.measure.measure_liver`: liver volume, lesion count, per-lesion
volume and longest axial diameter, total tumour burden, tumour-to-liver ratio).

A volume that is too small, too large for this machine, or shows no liver gives
``PipelineResult(ok=False, reason=...)``; never an exception and never an empty mask
reported as a finding.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

from dicomnode.logs import fields
from dicomnode.nn.liver_tumor import LiverTumorRecipe
from dicomnode.pipelines.base import (
    ModelPipeline,
    PipelineContext,
    PipelineResult,
    ResultObject,
    register,
)
from dicomnode.results.codes import ABDOMEN
from dicomnode.results.measure import VoxelGrid, measure_liver

log = logging.getLogger(__name__)

#: Label value -> structure name, from the result encoders' table so the names always match.
STRUCTURES: dict[int, str] = {s.label: s.name for s in ABDOMEN}
#: A smaller segmented liver is reported as "no liver" (partial coverage aside, an adult
#: liver is 1000-2000 ml).
MIN_LIVER_ML = 100.0


class LiverTumorPipeline(ModelPipeline):
    """Liver and liver-tumour segmentation with measurements (SEG, RTSTRUCT, SR).

    Parameters
    ----------
    context : PipelineContext, optional
        Models folder and device.
    min_tumour_ml : float, optional
        Tumour islands below this volume are removed (default: the weights' own, chosen
        on validation cases, else 0.2 ml).
    """

    name: ClassVar[str] = "liver_tumor"
    region: ClassVar[str] = "abdomen"
    emits: ClassVar[tuple[ResultObject, ...]] = (ResultObject.SEG, ResultObject.RTSTRUCT,
                                                  ResultObject.SR)
    recipe = LiverTumorRecipe
    min_slices = 8
    min_extent_z_mm = 40.0
    min_field_mm = 120.0
    warm_up_region = "abdomen"

    def __init__(self, context: PipelineContext | None = None,
                 min_tumour_ml: float | None = None) -> None:
        if min_tumour_ml is not None and min_tumour_ml < 0:
            raise ValueError(f"Invalid 'min_tumour_ml' value '{min_tumour_ml}' - must be >= 0")
        super().__init__(context, **({} if min_tumour_ml is None
                                     else {"min_tumour_ml": min_tumour_ml}))

    def report(self, segmentation: Any, volume: Any, timings: dict[str, float],
               algorithm: dict[str, str]) -> PipelineResult:
        """Liver and tumour label map with the SR's measurements, or "no liver found"."""
        t = time.perf_counter()
        labels = segmentation.labels
        box = segmentation.box or tuple(slice(0, n) for n in labels.shape)
        crop = labels[box]
        measurements = measure_liver(crop == 1, crop == 2, VoxelGrid(
            tuple(float(s) for s in volume.spacing)),  # type: ignore[arg-type]
            z_offset=box[0].start, yx_offset=(box[1].start, box[2].start)).to_dict()
        timings["measure"] = time.perf_counter() - t
        if measurements["liver_volume_ml"] < MIN_LIVER_ML:
            return self.no_result(
                f"no liver found: segmented liver {measurements['liver_volume_ml']:.0f} ml "
                f"(< {MIN_LIVER_ML:.0f} ml)", timings, algorithm)
        present = {v: n for v, n in STRUCTURES.items() if (labels[box] == v).any()}
        log.info("pipeline.done", extra=fields(
            pipeline=self.name, liver_ml=measurements["liver_volume_ml"],
            lesions=measurements["lesion_count"]))
        return PipelineResult(
            self.name, ok=True,
            reason="" if measurements["lesion_count"] else "liver found, no tumour",
            label_map=labels, structures=present, measurements=measurements,
            algorithm=algorithm)


register("liver_tumor", LiverTumorPipeline)
