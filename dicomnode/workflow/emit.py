"""Turn a pipeline's result into the DICOM result objects it emits (files on disk).

The glue between ``pipelines`` (arrays and numbers) and ``results`` (DICOM writers):
SEG, RTSTRUCT and a TID 1500 SR for label maps; a TID 1500 SR and a Key Object
Selection for classification findings. Series descriptions say what the object is and
which study version it was computed from, so a re-opened study never mixes silently.
"""

from __future__ import annotations

import logging
import tempfile
import time
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
                      tuple(result.measurements.get("slices", {}).get(key, ())))
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


def warm_up_encoders(scratch_dir: Path) -> float:
    """Encode and write a SEG, an RTSTRUCT and an SR of a small phantom once.

    highdicom reads its tables of the standard (JSON) on first use and pydicom builds
    its lookups; done at start-up, off the receiving path, the first study does not pay
    for it (~0.4 s of its encoding on the 2-core build machine). Everything written goes
    to a temporary folder under ``scratch_dir`` that is removed again.

    Parameters
    ----------
    scratch_dir : Path
        A folder of the node's own (the results folder).

    Returns
    -------
    float
        Seconds taken.
    """
    from dicomnode.imaging.series import load_series
    from dicomnode.phantoms import make_phantom, write_phantom
    started = time.perf_counter()
    scratch_dir.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom("abdomen", seed=0, matrix=64, slices=40)
    with tempfile.TemporaryDirectory(prefix="warm-up-", dir=scratch_dir) as tmp:
        files = [f for f in write_phantom(phantom, Path(tmp) / "ct") if f.suffix == ".dcm"]
        volume = load_series(files)
        labels = np.zeros(volume.shape, dtype=np.uint8)
        z, y, x = (n // 2 for n in volume.shape)
        labels[z - 6:z + 6, y - 12:y + 12, x - 12:x + 12] = 1
        labels[z - 2:z + 2, y - 4:y + 4, x - 4:x + 4] = 2
        result = PipelineResult("warm-up", ok=True, label_map=labels,
                                structures={1: "Liver", 2: "Lesion_Liver"},
                                algorithm={"name": "warm-up", "version": "0",
                                           "sha256": "0" * 64})
        write_result_objects(result, volume, Path(tmp) / "out",
                             (ResultObject.SEG, ResultObject.RTSTRUCT, ResultObject.SR))
    return time.perf_counter() - started
