"""Turn a pipeline's result into the DICOM result objects it emits (files on disk).

The glue between ``pipelines`` (arrays and numbers) and ``results`` (DICOM writers):
SEG, RTSTRUCT and a TID 1500 SR for label maps; a TID 1500 SR and a Key Object
Selection for classification findings. Series descriptions say what the object is and
which study version it was computed from, so a re-opened study never mixes silently.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicomnode.imaging.morphology import bounding_box
from dicomnode.logs import configure_logging, fields, logging_config, quiet_info
from dicomnode.pipelines.base import PipelineResult, ResultObject
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.burned_in import NOT_FOR_DIAGNOSIS, build_burned_in_series
from dicomnode.results.codes import CATALOGUE, table_from_labels
from dicomnode.results.kos import build_kos
from dicomnode.results.radiomics import RadiomicsReport
from dicomnode.results.rtstruct import build_rtstruct
from dicomnode.results.seg import build_seg, seg_reference
from dicomnode.results.source import new_uid, write
from dicomnode.results.sr import (
    IchResult,
    build_ich_sr,
    build_no_result_sr,
    build_segmentation_sr,
)

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
                         emits: tuple[ResultObject, ...], *, version: int = 1,
                         seg_writer: SegWriter | None = None,
                         burned_in_series: bool = False) -> list[Path]:
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
    seg_writer : SegWriter, optional
        A started helper process: the SEG is written there while this thread writes the
        RTSTRUCT and the SR (the same objects; without it, or when it fails, all three
        are written here).
    burned_in_series : bool
        Also write, for a label map, the Secondary Capture series with the contours
        burned in (``results.burned_in_series``), after the other objects.

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
        seg_uids = (new_uid(), new_uid())  # series, instance: the SR refers to them
        seg_description = _describe(name, "segmentation", version)
        seg_file = out_dir / "seg.dcm"

        def seg_here() -> Dataset:
            return build_seg(images, labels, table, algorithm,
                             series_description=seg_description,
                             series_instance_uid=seg_uids[0], sop_instance_uid=seg_uids[1])

        pending = None
        if ResultObject.SEG in emits and seg_writer is not None:
            pending = seg_writer.submit(images, labels, result.structures, result.algorithm,
                                        seg_description, seg_uids, seg_file)
        seg: Dataset
        if pending is not None:
            seg = seg_reference(images, table, series_instance_uid=seg_uids[0],
                                sop_instance_uid=seg_uids[1])
            files.append(seg_file)
        else:
            seg = seg_here()
            if ResultObject.SEG in emits:
                files.append(write(seg, seg_file))
        if ResultObject.RTSTRUCT in emits:
            rt = build_rtstruct(images, labels, table, algorithm,
                                series_description=_describe(name, "contours", version))
            files.append(write(rt, out_dir / "rtstruct.dcm"))
        if ResultObject.SR in emits and not result.probabilities:
            absent = [CATALOGUE[n] for n in result.measurements.get("absent", ())
                      if n in CATALOGUE]
            features = result.measurements.get("radiomics")
            sr = build_segmentation_sr(images, seg, labels, table, algorithm,
                                       series_description=_describe(name, "measurements",
                                                                    version),
                                       absent=absent,
                                       radiomics=(RadiomicsReport.from_dict(features)
                                                  if features else None))
            files.append(write(sr, out_dir / "sr.dcm"))
        if pending is not None:
            try:
                pending.result()
            except BrokenProcessPool:
                # the helper died (killed, out of memory): this study's SEG is written
                # here with the UIDs the SR refers to; the next study gets a new helper
                log.warning("seg_writer.lost", extra=fields(study=volume.study_instance_uid))
                assert seg_writer is not None
                seg_writer.restart()
                write(seg_here(), seg_file)
        if burned_in_series and labels.any():
            series = build_burned_in_series(
                images, labels, table, algorithm,
                series_description=_describe(name, f"overlay, {NOT_FOR_DIAGNOSIS}", version),
                hu=volume.hu)
            files += [write(sc, out_dir / f"burned-in-{k:04d}.dcm")
                      for k, sc in enumerate(series, start=1)]
    if result.probabilities:
        per_slice = result.measurements.get("slice_probabilities", {})
        findings = []
        for key, p in result.probabilities.items():
            flagged = tuple(result.measurements.get("slices", {}).get(key, ()))
            values = per_slice.get(key)
            findings.append(IchResult(
                key, float(p), bool(result.decisions.get(key, False)), flagged,
                peak_slice=int(np.argmax(values)) if values else None,
                slice_probabilities=tuple(float(values[i]) for i in flagged) if values else ()))
        if ResultObject.SR in emits:
            # the conclusion in the series list: a negative study shows it was analysed
            conclusion = ("haemorrhage suspected" if result.decisions.get("any")
                          else "no haemorrhage detected")
            features = result.measurements.get("radiomics")
            sr = build_ich_sr(images, findings, algorithm,
                              series_description=_describe(name, f"report: {conclusion}",
                                                           version),
                              radiomics=RadiomicsReport.from_dict(features) if features else None)
            files.append(write(sr, out_dir / "sr.dcm"))
        if ResultObject.KOS in emits and result.flagged_slices:
            kos = build_kos(images, result.flagged_slices, algorithm,
                            series_description=_describe(name, "key images", version))
            files.append(write(kos, out_dir / "kos.dcm"))
    log.info("results.written", extra=fields(pipeline=name, objects=len(files),
                                             study=volume.study_instance_uid))
    return files


def write_no_result_report(result: PipelineResult, volume: Any, out_dir: Path, *,
                           version: int = 1) -> Path:
    """Write the SR that says a pipeline produced no result for a series, and why.

    Parameters
    ----------
    result : PipelineResult
        A result with ``ok=False``, its ``reason`` and the ``algorithm`` that ran.
    volume : imaging.series.Volume
        The volume the pipeline was given.
    out_dir : Path
        Where ``no-result.dcm`` is written.
    version : int
        The study version the result belongs to.

    Returns
    -------
    Path
        The file written.
    """
    if result.ok or not result.reason:
        raise ValueError(f"Invalid 'result' - '{result.pipeline}' has a result, or no "
                         "reason for having none")
    if not result.algorithm:
        raise ValueError(f"Invalid 'result' - '{result.pipeline}' names no algorithm")
    out_dir.mkdir(parents=True, exist_ok=True)
    title = TITLES.get(result.pipeline, f"AI {result.pipeline}")
    sr = build_no_result_sr(volume.datasets, title, result.reason,
                            AlgorithmInfo.from_mapping(result.algorithm),
                            series_description=_describe(result.pipeline, "no result",
                                                         version))
    path = write(sr, out_dir / "no-result.dcm")
    log.info("results.written", extra=fields(pipeline=result.pipeline, objects=1,
                                             study=volume.study_instance_uid))
    return path


#: Every object a result can be encoded as at start-up.
WARM_UP_OBJECTS = (ResultObject.SEG, ResultObject.RTSTRUCT, ResultObject.SR)


def warm_up_encoders(scratch_dir: Path,
                     objects: Sequence[ResultObject] = WARM_UP_OBJECTS) -> float:
    """Encode and write result objects of the small example series once.

    highdicom reads its tables of the standard (JSON) on first use and pydicom builds
    its lookups; done at start-up, off the receiving path, the first study does not pay
    for it (~0.4 s of its encoding on the 2-core build machine). Everything written goes
    to a temporary folder under ``scratch_dir`` that is removed again, and the log lines
    of this made-up study are left out of the node's log.

    Parameters
    ----------
    scratch_dir : Path
        A folder of the node's own (the results folder).
    objects : sequence of ResultObject
        What to encode (the SEG helper process only ever writes SEGs).

    Returns
    -------
    float
        Seconds taken.
    """
    from dicomnode.examples import example_series
    from dicomnode.imaging.series import load_series
    started = time.perf_counter()
    scratch_dir.mkdir(parents=True, exist_ok=True)
    with quiet_info(), tempfile.TemporaryDirectory(prefix="warm-up-", dir=scratch_dir) as tmp:
        volume = load_series(example_series("abdomen"))
        labels = np.zeros(volume.shape, dtype=np.uint8)
        z, y, x = (n // 2 for n in volume.shape)
        labels[z - 6:z + 6, y - 12:y + 12, x - 12:x + 12] = 1
        labels[z - 2:z + 2, y - 4:y + 4, x - 4:x + 4] = 2
        result = PipelineResult("warm-up", ok=True, label_map=labels,
                                structures={1: "Liver", 2: "Lesion_Liver"},
                                algorithm={"name": "warm-up", "version": "0",
                                           "sha256": "0" * 64})
        write_result_objects(result, volume, Path(tmp) / "out", tuple(objects))
    return time.perf_counter() - started


def _start_helper(config: tuple[str, str] | None, parent: int) -> None:
    """Initialiser of the SEG helper process: log as the node does, end with the node.

    Ctrl-C in a terminal and a service manager's SIGTERM reach every process of the
    group; the node alone decides when its helper stops (after the SEG it is writing),
    so the helper ignores both instead of dying mid-file with a traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if config is not None:
        configure_logging(*config)
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch",
                     daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End the helper once the node that started it is gone.

    A node killed outright (SIGKILL, the kernel's out-of-memory killer) never shuts its
    pool down, and the helper's queues never report the end: each pipe's two ends are
    held in the helper itself. Without this, every such restart would leave a ~150 MB
    process behind for good.
    """
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _write_seg(images: list[Dataset], crop: np.ndarray | None,
               box: tuple[slice, ...] | None, shape: tuple[int, ...],
               structures: Mapping[int, str], algorithm: Mapping[str, Any], description: str,
               uids: tuple[str, str], path: Path) -> str:
    """Build and write one SEG (in the helper process); returns the file written."""
    labels = np.zeros(shape, dtype=np.uint8 if crop is None else crop.dtype)
    if crop is not None and box is not None:
        labels[box] = crop
    seg = build_seg(images, labels, table_from_labels(structures),
                    AlgorithmInfo.from_mapping(algorithm), series_description=description,
                    series_instance_uid=uids[0], sop_instance_uid=uids[1])
    return str(write(seg, path))


class SegWriter:
    """A helper process that builds and writes the DICOM-SEG of each result.

    The SEG is the longest of a result's objects to encode: hundreds of per-frame items
    built and written in pure Python (0.7 of the 1.35 s the three objects of a
    512x512x300 liver result take on the 2-core build machine). In its own process it
    is written while the job's thread writes the RTSTRUCT and the SR, which refers to
    the SEG by UIDs chosen beforehand. The helper is spawned (no fork of a threaded
    process), warmed up once, and replaced after it dies; that study's SEG is then
    written in the job's thread.
    """

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        #: SEG files the helper has written.
        self.written = 0

    @property
    def running(self) -> bool:
        """Whether a helper process has been started (and not stopped)."""
        return self._pool is not None

    def start(self) -> Future[float]:
        """Start the helper and warm its encoders; the future gives the warm-up seconds."""
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_helper, initargs=(logging_config(), os.getpid()))
            pool = self._pool
        return pool.submit(_warm_up_helper)

    def restart(self) -> None:
        """Replace a helper that died (its pool is broken) with a new one."""
        with self._lock:
            old, self._pool = self._pool, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        self.start()

    def stop(self, wait: bool = True) -> None:
        """Stop the helper; with ``wait``, a SEG being written is finished first (not
        from a callback of one of its futures: that thread cannot wait for itself)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    def submit(self, images: Sequence[Dataset], labels: np.ndarray,
               structures: Mapping[int, str], algorithm: Mapping[str, Any], description: str,
               uids: tuple[str, str], path: Path) -> Future[str] | None:
        """Queue one SEG; None when no helper runs (the caller writes it itself).

        Only the labels' bounding box travels to the helper, with the source headers.
        """
        with self._lock:
            pool = self._pool
        if pool is None:
            return None
        box = bounding_box(labels != 0)
        crop = None if box is None else np.ascontiguousarray(labels[box])
        try:
            future = pool.submit(_write_seg, list(images), crop, box, tuple(labels.shape),
                                 dict(structures), dict(algorithm), description, uids, path)
        except BrokenProcessPool:  # died: a new one for the next study
            self.restart()
            return None
        except RuntimeError:  # stopped meanwhile: nothing to restart
            return None
        future.add_done_callback(self._count)
        return future

    def _count(self, future: Future[str]) -> None:
        if not future.cancelled() and future.exception() is None:
            with self._lock:
                self.written += 1


def _warm_up_helper() -> float:
    """The SEG helper's warm-up: encoder tables loaded before the first study."""
    return warm_up_encoders(Path(tempfile.gettempdir()),  # cleans up after itself
                            (ResultObject.SEG,))
