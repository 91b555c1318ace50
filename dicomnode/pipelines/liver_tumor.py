"""The ``liver_tumor`` pipeline: liver and liver tumours of an abdomen CT.

``run(volume)`` checks that the volume is usable (size, spacing, memory), segments the
liver then the tumours inside it with the 2.5D context network
(:mod:`dicomnode.nn.liver25d`), and returns the label map on the volume's grid with
the measurements the SR reports: liver volume, lesion count, per-lesion volume and
longest axial diameter, total tumour burden and tumour-to-liver ratio.

A volume that is too small, too large for this machine, or shows no liver gives
``PipelineResult(ok=False, reason=...)``; never an exception and never an empty mask
reported as a finding.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dicomnode.logs import quiet_info
from dicomnode.nn import liver25d, runtime, weights
from dicomnode.pipelines.base import (
    PipelineResult,
    PipelineUnavailableError,
    ResultObject,
    register,
)
from dicomnode.results.codes import ABDOMEN

log = logging.getLogger(__name__)

#: Label value -> structure name, from the result encoders' table so the names always match.
STRUCTURES: dict[int, str] = {s.label: s.name for s in ABDOMEN}
#: Below these the volume cannot hold a liver the network can find.
MIN_SLICES = 8
MIN_EXTENT_Z_MM = 40.0
MIN_FIELD_MM = 120.0
#: A smaller segmented liver is reported as "no liver" (partial coverage aside, an adult
#: liver is 1000-2000 ml).
MIN_LIVER_ML = 100.0
#: Working memory per input voxel (float copies, stage grids, probabilities, labels).
BYTES_PER_VOXEL = 24
#: Hard limit on input voxels whatever the memory (1024 x 1024 x 2000).
MAX_VOXELS = 1024 * 1024 * 2000


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


class LiverTumorPipeline:
    """Liver and liver-tumour segmentation with measurements (SEG, RTSTRUCT, SR).

    Parameters
    ----------
    models : pathlib.Path, optional
        Models folder holding ``manifest.json`` (default: ``DICOMNODE_MODELS_DIR`` or the
        repository's ``models/``).
    device : str, optional
        ``"auto"`` (default: CUDA when present), ``"cpu"`` or ``"cuda:N"``.
    min_tumour_ml : float, optional
        Tumour islands below this volume are removed (default: the weights' own, chosen
        on validation cases, else 0.2 ml).
    """

    name: ClassVar[str] = "liver_tumor"
    region: ClassVar[str] = "abdomen"
    emits: ClassVar[tuple[ResultObject, ...]] = (ResultObject.SEG, ResultObject.RTSTRUCT,
                                                  ResultObject.SR)

    def __init__(self, models: Path | None = None, device: str | None = None,
                 min_tumour_ml: float | None = None) -> None:
        if min_tumour_ml is not None and min_tumour_ml < 0:
            raise ValueError(f"Invalid 'min_tumour_ml' value '{min_tumour_ml}' - must be >= 0")
        self.models = models
        self.device_name = device or os.environ.get("DICOMNODE_DEVICE") or "auto"
        self.min_tumour_ml = min_tumour_ml
        self._segmenter: liver25d.LiverTumorSegmenter | None = None
        self._entry: weights.ManifestEntry | None = None
        self._checked: weights.ManifestEntry | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise ``PipelineUnavailableError`` when the weights are missing or corrupt."""
        try:
            self._checked = weights.verify(self.name, self.models)
            runtime.select_device(self.device_name)
        except (weights.WeightsError, ValueError) as exc:
            raise PipelineUnavailableError(f"{self.name} unavailable: {exc}") from None

    def _load(self) -> tuple[liver25d.LiverTumorSegmenter, weights.ManifestEntry]:
        with self._lock:
            # loaded once; again when the checked weights are no longer the loaded ones
            stale = (self._checked is not None and self._entry is not None
                     and self._checked.sha256 != self._entry.sha256)
            if self._segmenter is None or self._entry is None or stale:
                device = runtime.select_device(self.device_name)
                if device.type == "cpu":
                    runtime.configure_cpu_threads()
                try:
                    options = ({} if self.min_tumour_ml is None
                               else {"min_tumour_ml": self.min_tumour_ml})
                    self._segmenter, self._entry = liver25d.load_segmenter(
                        self.models, device, self.name, **options)
                except weights.WeightsError as exc:
                    raise PipelineUnavailableError(f"{self.name} unavailable: {exc}") from None
            return self._segmenter, self._entry

    def warm_up(self) -> None:
        """Load the weights and run each network once; on a GPU, segment a phantom once.

        On a GPU every step of a study then has run once (resampling in and out, both
        networks, the labelling): the CUDA context, the kernels and the allocator's first
        blocks are set up before the first study, not during it. On a CPU there is
        nothing to set up that would be worth the seconds a whole phantom takes there.
        """
        segmenter, _ = self._load()
        segmenter.warm_up()
        if segmenter.device.type == "cuda":
            from dicomnode.phantoms import make_phantom  # only needed here

            with quiet_info():  # a made-up study: not the site's
                phantom = make_phantom("abdomen", seed=0, matrix=96, slices=48)
            segmenter.segment(phantom.hu, phantom.spacing)

    def _algorithm(self, entry: weights.ManifestEntry) -> dict[str, str]:
        return {"name": self.name, "version": entry.version, "sha256": entry.sha256,
                "family": str(entry.data.get("family", "2.5D context network"))}

    def _no_result(self, reason: str, timings: dict[str, float],
                   algorithm: dict[str, str] | None = None) -> PipelineResult:
        log.info("pipeline.no_result", extra={"dn_fields": {"pipeline": self.name,
                                                            "reason": reason}})
        return PipelineResult(self.name, ok=False, reason=reason, timings=timings,
                              algorithm=algorithm or {})

    def _unusable(self, hu: np.ndarray, spacing: tuple[float, float, float]) -> str | None:
        """Why the volume cannot be processed, or ``None``."""
        if hu.ndim != 3:
            return f"volume has {hu.ndim} dimensions, expected 3 (z, y, x)"
        if any(not np.isfinite(s) or s <= 0 for s in spacing):
            return f"volume spacing {spacing} is not positive"
        nz, ny, nx = hu.shape
        if nz < MIN_SLICES or nz * spacing[0] < MIN_EXTENT_Z_MM:
            return (f"volume too small: {nz} slices covering {nz * spacing[0]:.0f} mm "
                    f"(needs >= {MIN_SLICES} slices and {MIN_EXTENT_Z_MM:.0f} mm)")
        if min(ny * spacing[1], nx * spacing[2]) < MIN_FIELD_MM:
            return (f"volume too small: field of view {nx * spacing[2]:.0f} x "
                    f"{ny * spacing[1]:.0f} mm (needs >= {MIN_FIELD_MM:.0f} mm)")
        voxels = int(hu.size)
        need = voxels * BYTES_PER_VOXEL
        free = available_memory()
        if voxels > MAX_VOXELS or need > free:
            return (f"volume too large: {nz}x{ny}x{nx} voxels need about {need / 2**30:.1f} "
                    f"GiB, {free / 2**30:.1f} GiB available (limit {MAX_VOXELS} voxels)")
        return None

    def run(self, volume: Any) -> PipelineResult:
        """Segment and measure liver and tumours of one ``imaging.series.Volume``.

        Parameters
        ----------
        volume : Volume
            Needs ``hu`` ``[z, y, x]`` and ``spacing`` ``(dz, dy, dx)`` mm.

        Returns
        -------
        PipelineResult
            ``label_map`` (1 liver, 2 tumour) on the volume's grid, ``structures``,
            ``measurements``, ``algorithm`` and ``timings``; or ``ok=False`` with the
            reason (too small, too large, no liver, out of memory).
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        hu = np.asarray(volume.hu)
        spacing = tuple(float(s) for s in volume.spacing)
        problem = self._unusable(hu, spacing)  # type: ignore[arg-type]
        if problem:
            # the weights that would have run (checked, not loaded), for a report of it
            return self._no_result(problem, timings, self._algorithm(self._checked)
                                   if self._checked is not None else None)
        t = time.perf_counter()
        segmenter, entry = self._load()
        timings["load_weights"] = time.perf_counter() - t
        algorithm = self._algorithm(entry)
        try:
            seg = segmenter.segment(hu, spacing)
        except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
            return self._no_result(f"out of memory while segmenting: {exc}".strip(), timings,
                                   algorithm)
        timings.update({k: v for k, v in seg.timings.items()})
        t = time.perf_counter()
        labels = seg.labels
        box = seg.liver_box or tuple(slice(0, n) for n in labels.shape)
        measurements = liver25d.measure(labels[box], spacing,
                                        offset=[b.start for b in box])
        timings["measure"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - started
        timings = {k: round(v, 3) for k, v in timings.items()}
        if measurements["liver_volume_ml"] < MIN_LIVER_ML:
            return self._no_result(
                f"no liver found: segmented liver {measurements['liver_volume_ml']:.0f} ml "
                f"(< {MIN_LIVER_ML:.0f} ml)", timings, algorithm)
        present = {v: n for v, n in STRUCTURES.items() if (labels == v).any()}
        log.info("pipeline.done", extra={"dn_fields": {
            "pipeline": self.name, "liver_ml": measurements["liver_volume_ml"],
            "lesions": measurements["lesion_count"], "seconds": timings["total"]}})
        return PipelineResult(
            self.name, ok=True,
            reason="" if measurements["lesion_count"] else "liver found, no tumour",
            label_map=labels, structures=present, measurements=measurements,
            algorithm=algorithm, timings=timings)


register("liver_tumor", LiverTumorPipeline)
