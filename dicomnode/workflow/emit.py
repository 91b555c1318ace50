"""Turn a pipeline's result into the DICOM result objects it emits (files on disk).

The glue between ``pipelines`` (arrays and numbers) and ``results`` (DICOM writers):
SEG, RTSTRUCT and a TID 1500 SR for label maps; a TID 1500 SR and a Key Object
Selection for classification findings. Series descriptions say what the object is and
which study version it was computed from, so a re-opened study never mixes silently.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.logs import fields
from dicomnode.pipelines.base import PipelineResult, ResultObject
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import table_from_labels
from dicomnode.results.kos import build_kos
from dicomnode.results.rtstruct import build_rtstruct
from dicomnode.results.seg import build_seg
from dicomnode.results.source import write
from dicomnode.results.sr import IchResult, build_ich_sr, build_segmentation_sr

log = logging.getLogger(__name__)

#: What each pipeline's objects are called in the viewer's series list.
TITLES = {
    "liver_tumor": "AI liver",
    "headneck_oar": "AI OAR",
    "brain_ich": "AI haemorrhage",
}


def _describe(pipeline: str, what: str, version: int) -> str:
    title = TITLES.get(pipeline, f"AI {pipeline}")
    text = f"{title} {what}" + (f" (study v{version})" if version > 1 else "")
    return text[:64]


def write_result_objects(result: PipelineResult, volume: Any, out_dir: Path,
                         emits: tuple[ResultObject, ...], *, version: int = 1) -> list[Path]:
    """Write the result objects of one pipeline run.

    Parameters
    ----------
    result : PipelineResult
        A result with ``ok=True``.
    volume : imaging.series.Volume
        The volume the pipeline ran on (its ``datasets`` are the source slices in the
        order of ``result.label_map``'s first axis).
    out_dir : Path
        Where the ``.dcm`` files are written.
    emits : tuple of ResultObject
        Which objects the pipeline emits.
    version : int
        The study version the result belongs to.

    Returns
    -------
    list of Path
        The files written, in sending order (SEG before the SR that references it).
    """
    if not result.ok:
        raise ValueError(f"Invalid 'result' - '{result.pipeline}' has no result: "
                         f"{result.reason}")
    algorithm = AlgorithmInfo.from_mapping(result.algorithm)
    images = volume.datasets
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    name = result.pipeline
    if result.label_map is not None:
        labels = np.asarray(result.label_map)
        if labels.shape != tuple(volume.shape):
            raise ValueError(f"Invalid 'label_map' shape {labels.shape} - the volume is "
                             f"{tuple(volume.shape)}")
        table = table_from_labels(result.structures)
        seg = build_seg(images, labels, table, algorithm,
                        series_description=_describe(name, "segmentation", version))
        if ResultObject.SEG in emits:
            files.append(write(seg, out_dir / "seg.dcm"))
        if ResultObject.RTSTRUCT in emits:
            rt = build_rtstruct(images, labels, table, algorithm,
                                series_description=_describe(name, "contours", version))
            files.append(write(rt, out_dir / "rtstruct.dcm"))
        if ResultObject.SR in emits:
            sr = build_segmentation_sr(images, seg, labels, table, algorithm,
                                       series_description=_describe(name, "measurements",
                                                                    version))
            files.append(write(sr, out_dir / "sr.dcm"))
    if result.probabilities:
        findings = [
            IchResult(key, float(p), bool(result.decisions.get(key, False)),
                      list(result.measurements.get("slices", {}).get(key, [])))
            for key, p in result.probabilities.items()
        ]
        if ResultObject.SR in emits:
            sr = build_ich_sr(images, findings, algorithm,
                              series_description=_describe(name, "report", version))
            files.append(write(sr, out_dir / "sr.dcm"))
        if ResultObject.KOS in emits and result.flagged_slices:
            kos = build_kos(images, result.flagged_slices, algorithm,
                            series_description=_describe(name, "key images", version))
            files.append(write(kos, out_dir / "kos.dcm"))
    log.info("results.written", extra=fields(pipeline=name, objects=len(files),
                                             study=volume.study_instance_uid))
    return files
