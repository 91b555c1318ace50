"""The Pipeline protocol, what every model pipeline shares, and the registry routing uses.

A pipeline takes one CT volume (``imaging.series.Volume``) and returns a
``PipelineResult``: label masks and/or probabilities with the measurements the
result objects report, or an explicit "no result" with its reason. It never writes
DICOM and never touches the network: ``workflow/jobs.py`` turns the result into
SEG/RTSTRUCT/SR/KOS with ``results/`` and queues them for export.

:class:`ModelPipeline` holds what every pipeline of a trained model shares: the
volume checks (size, spacing, memory), the weights (checked, loaded once, reloaded
when their sha256 changes), the device (from the node's settings through a
:class:`PipelineContext`), the warm-up, the algorithm record and "no result". A
pipeline module (``pipelines/liver_tumor.py``) adds only its recipe: which model,
how the network is called and what is reported.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from dicomnode.logs import fields

if TYPE_CHECKING:  # torch is imported when a model pipeline is built, not before
    from dicomnode.nn.recipe import ModelRecipe, Segmenter
    from dicomnode.nn.weights import ManifestEntry

log = logging.getLogger(__name__)


class ResultObject(enum.StrEnum):
    """DICOM objects a pipeline's result can be encoded as."""

    SEG = "seg"
    RTSTRUCT = "rtstruct"
    SR = "sr"
    KOS = "kos"
    PREVIEW = "preview"


@dataclass
class PipelineResult:
    """What one pipeline found in one volume.

    Attributes
    ----------
    pipeline : str
        The pipeline's registry name.
    ok : bool
        False means "no result" (``reason`` says why); nothing is sent as a finding.
    reason : str
        Why there is no result, or notes on the result.
    label_map : numpy.ndarray or None
        ``[z, y, x]`` uint8 labels on the volume's grid (slice order as the volume).
    structures : dict
        Label value -> structure name (TG-263) for ``label_map``.
    probabilities : dict
        Finding name -> probability (classification pipelines).
    decisions : dict
        Finding name -> bool decision at the operating threshold.
    flagged_slices : list of int
        Volume slice indices that support a positive finding.
    measurements : dict
        Anything the SR reports (volumes, lesion list, burden), JSON-serialisable.
    algorithm : dict
        ``name``, ``version``, ``sha256`` (of the weights), ``family``.
    timings : dict
        Seconds per stage inside the pipeline.
    urgent : bool
        Whether the finding calls for an urgent notification.
    """

    pipeline: str
    ok: bool
    reason: str = ""
    label_map: np.ndarray | None = None
    structures: dict[int, str] = field(default_factory=dict)
    probabilities: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, bool] = field(default_factory=dict)
    flagged_slices: list[int] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    algorithm: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    urgent: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable summary for the job record and ``dicomnode process``."""
        return {
            "pipeline": self.pipeline, "ok": self.ok, "reason": self.reason,
            "structures": sorted(self.structures.values()),
            "probabilities": self.probabilities, "decisions": self.decisions,
            "flagged_slices": self.flagged_slices, "measurements": self.measurements,
            "algorithm": self.algorithm, "timings": self.timings, "urgent": self.urgent,
        }


class PipelineUnavailableError(RuntimeError):
    """The pipeline cannot run here (weights missing, checksum mismatch...)."""


@runtime_checkable
class Pipeline(Protocol):
    """What every pipeline provides.

    Attributes
    ----------
    name : str
        Registry name used by routing rules (``liver_tumor``).
    region : str
        The body region it expects (``abdomen``, ``headneck``, ``head``).
    emits : tuple of ResultObject
        Which result objects its results are encoded as.
    """

    name: ClassVar[str]
    region: ClassVar[str]
    emits: ClassVar[tuple[ResultObject, ...]]

    def check(self) -> None:
        """Raise ``PipelineUnavailableError`` with the reason if it cannot run."""
        ...

    def run(self, volume: Any) -> PipelineResult:
        """Process one volume (``imaging.series.Volume``)."""
        ...

    def warm_up(self) -> None:
        """Load weights and ready the device now, so the first study pays no start-up.

        Call it on each thread that will run studies: GPU libraries keep state per
        thread (PyTorch's cuDNN execution plans), and a thread's first run of a network
        on an H100 took 0.4-0.6 s longer per network than its later runs.
        """
        ...


@dataclass(frozen=True)
class PipelineContext:
    """What the node tells its pipelines: where the weights are and where to run.

    Attributes
    ----------
    models : pathlib.Path or None
        Models folder (``manifest.json`` and weight files); None: ``DICOMNODE_MODELS_DIR``
        or the shipped ``models/``.
    device : str
        ``"auto"`` (the first CUDA GPU when present, else the CPU), ``"cpu"`` or
        ``"cuda:N"``.
    """

    models: Path | None = None
    device: str = "auto"

    @classmethod
    def from_settings(cls, settings: Any) -> PipelineContext:
        """The context of a node's ``Settings`` (``models_dir``, ``device``)."""
        return cls(settings.models_dir, settings.device)

    @classmethod
    def from_environment(cls) -> PipelineContext:
        """``DICOMNODE_MODELS_DIR`` and ``DICOMNODE_DEVICE`` (the offline commands)."""
        models = os.environ.get("DICOMNODE_MODELS_DIR")
        return cls(Path(models) if models else None,
                   os.environ.get("DICOMNODE_DEVICE") or "auto")


Factory = Callable[[PipelineContext], Pipeline]
_REGISTRY: dict[str, Factory] = {}
#: One instance per registered factory, context and process: weights stay loaded.
_INSTANCES: dict[tuple[str, Factory, PipelineContext], Pipeline] = {}
_INSTANCES_LOCK = threading.Lock()


def register(name: str, factory: Factory) -> None:
    """Make a pipeline available to routing under ``name``.

    Parameters
    ----------
    name : str
        Registry name.
    factory : callable
        Returns a ready pipeline for a :class:`PipelineContext` (loads weights lazily).
    """
    if name in _REGISTRY:
        raise ValueError(f"Invalid 'name' value '{name}' - a pipeline is already registered")
    _REGISTRY[name] = factory


def registered() -> list[str]:
    """Names of every registered pipeline."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_pipeline(name: str, context: PipelineContext | None = None) -> Pipeline:
    """The pipeline registered as ``name``, checked (weights present and intact).

    The instance is built once per process and context and kept, so that its weights
    and device stay loaded between studies; every call checks it again.

    Parameters
    ----------
    name : str
        Registry name.
    context : PipelineContext, optional
        The node's settings for its pipelines (default: from the environment).

    Raises
    ------
    PipelineUnavailableError
        Unknown name, or the pipeline cannot run here (with the reason).
    """
    _load_builtin()
    factory = _REGISTRY.get(name)
    if factory is None:
        installed = ", ".join(sorted(_REGISTRY)) or "none"
        raise PipelineUnavailableError(
            f"pipeline '{name}' is not installed (installed: {installed})")
    context = context or PipelineContext.from_environment()
    with _INSTANCES_LOCK:
        pipeline = _INSTANCES.get((name, factory, context))
        if pipeline is None:
            pipeline = _INSTANCES[(name, factory, context)] = factory(context)
    pipeline.check()
    return pipeline


def availability(context: PipelineContext | None = None) -> dict[str, str]:
    """Each registered pipeline's state: ``"ok"`` or the reason it cannot run."""
    states = {}
    for name in registered():
        try:
            get_pipeline(name, context)
            states[name] = "ok"
        except PipelineUnavailableError as exc:
            states[name] = str(exc)
    return states


_BUILTIN = ("liver_tumor", "headneck_oar", "brain_ich")
_loaded = False
_loading = threading.Lock()


def _load_builtin() -> None:
    """Import the built-in pipeline modules that exist (each registers itself).

    Several threads ask at once (the start-up check, the workers): the first imports,
    the others wait for the registry to be whole.
    """
    global _loaded
    if _loaded:
        return
    import importlib

    with _loading:
        if _loaded:
            return
        for module in _BUILTIN:
            try:
                importlib.import_module(f"dicomnode.pipelines.{module}")
            except ModuleNotFoundError as exc:
                if exc.name != f"dicomnode.pipelines.{module}":
                    raise
        _loaded = True


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


class ModelPipeline:
    """What every pipeline of a trained model shares; a subclass adds its recipe.

    A subclass sets the class attributes, :attr:`recipe` (its model's
    :class:`~dicomnode.nn.recipe.ModelRecipe`), and implements :meth:`segment` (call the
    model on the volume) and :meth:`report` (turn the segmentation into a
    ``PipelineResult``, or say why there is none).

    Parameters
    ----------
    context : PipelineContext, optional
        Models folder and device (default: from the environment).
    **overrides
        Settings of the model's segmenter that replace those its weights carry.
    """

    name: ClassVar[str]
    region: ClassVar[str]
    emits: ClassVar[tuple[ResultObject, ...]]
    #: The model's recipe class.
    recipe: ClassVar[type[ModelRecipe]]
    #: Below these the volume cannot hold what the model looks for.
    min_slices: ClassVar[int] = 8
    min_extent_z_mm: ClassVar[float] = 40.0
    min_field_mm: ClassVar[float] = 120.0
    #: Working memory per input voxel (float copies, stage grids, probabilities, labels).
    bytes_per_voxel: ClassVar[int] = 24
    #: Hard limit on input voxels whatever the memory (1024 x 1024 x 2000).
    max_voxels: ClassVar[int] = 1024 * 1024 * 2000
    #: The example series (``dicomnode.examples``) segmented once at warm-up on a GPU.
    warm_up_region: ClassVar[str | None] = None

    def __init__(self, context: PipelineContext | None = None, **overrides: Any) -> None:
        self.context = context or PipelineContext.from_environment()
        self.models = self.context.models
        self.device_name = self.context.device
        self.overrides = overrides
        self._recipe = self.recipe()
        self._segmenter: Segmenter | None = None
        self._entry: ManifestEntry | None = None
        self._checked: ManifestEntry | None = None
        self._lock = threading.Lock()

    # --- weights and device -----------------------------------------------------------

    def check(self) -> None:
        """Raise ``PipelineUnavailableError`` when the weights are missing or corrupt."""
        from dicomnode.nn import runtime, weights

        try:
            self._checked = weights.verify(self.name, self.models)
            runtime.select_device(self.device_name)
        except (weights.WeightsError, ValueError) as exc:
            raise PipelineUnavailableError(f"{self.name} unavailable: {exc}") from None

    def load(self) -> tuple[Segmenter, ManifestEntry]:
        """The segmenter and its weights' entry: loaded once, again when the weights change."""
        from dicomnode.nn import runtime, weights

        with self._lock:
            stale = (self._checked is not None and self._entry is not None
                     and self._checked.sha256 != self._entry.sha256)
            if self._segmenter is None or self._entry is None or stale:
                device = runtime.select_device(self.device_name)
                if device.type == "cpu":
                    runtime.configure_cpu_threads()
                try:
                    self._segmenter, self._entry = self._recipe.load_segmenter(
                        self.models, device, **self.overrides)
                except weights.WeightsError as exc:
                    raise PipelineUnavailableError(f"{self.name} unavailable: {exc}") from None
            return self._segmenter, self._entry

    def warm_up(self) -> None:
        """Load the weights and run each network once; on a GPU, segment an example once.

        On a GPU every step of a study then has run once (resampling in and out, the
        networks, the labelling): the CUDA context, the kernels and the allocator's first
        blocks are set up before the first study, not during it. On a CPU there is
        nothing to set up that would be worth the seconds a whole volume takes there.
        The example is a small series shipped with the package (``dicomnode.examples``).
        """
        segmenter, _ = self.load()
        segmenter.warm_up()
        if segmenter.device.type == "cuda" and self.warm_up_region is not None:
            from dicomnode.examples import example_series
            from dicomnode.imaging.series import load_series
            from dicomnode.logs import quiet_info

            with quiet_info():  # a made-up study: not the site's
                volume = load_series(example_series(self.warm_up_region))
                self.segment(segmenter, volume)

    def algorithm(self, entry: ManifestEntry) -> dict[str, str]:
        """Name, version, sha256 and family of the weights, for every result object."""
        return {"name": self.name, "version": entry.version, "sha256": entry.sha256,
                "family": str(entry.data.get("family", self._recipe.family))}

    # --- the run ----------------------------------------------------------------------

    def no_result(self, reason: str, timings: dict[str, float],
                  algorithm: dict[str, str] | None = None) -> PipelineResult:
        """A ``PipelineResult`` that says there is no result, and why (logged)."""
        log.info("pipeline.no_result", extra=fields(pipeline=self.name, reason=reason))
        return PipelineResult(self.name, ok=False, reason=reason, timings=timings,
                              algorithm=algorithm or {})

    def unusable(self, hu: np.ndarray, spacing: tuple[float, ...]) -> str | None:
        """Why the volume cannot be processed (too small, too large for memory), or None."""
        if hu.ndim != 3:
            return f"volume has {hu.ndim} dimensions, expected 3 (z, y, x)"
        if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
            return f"volume spacing {spacing} is not positive"
        nz, ny, nx = hu.shape
        if nz < self.min_slices or nz * spacing[0] < self.min_extent_z_mm:
            return (f"volume too small: {nz} slices covering {nz * spacing[0]:.0f} mm "
                    f"(needs >= {self.min_slices} slices and {self.min_extent_z_mm:.0f} mm)")
        if min(ny * spacing[1], nx * spacing[2]) < self.min_field_mm:
            return (f"volume too small: field of view {nx * spacing[2]:.0f} x "
                    f"{ny * spacing[1]:.0f} mm (needs >= {self.min_field_mm:.0f} mm)")
        voxels = int(hu.size)
        need = voxels * self.bytes_per_voxel
        free = available_memory()
        if voxels > self.max_voxels or need > free:
            return (f"volume too large: {nz}x{ny}x{nx} voxels need about {need / 2**30:.1f} "
                    f"GiB, {free / 2**30:.1f} GiB available (limit {self.max_voxels} voxels)")
        return None

    def unsuitable(self, volume: Any) -> str | None:
        """Why this model cannot read ``volume`` (the recipe's own checks), or None."""
        return None

    def segment(self, segmenter: Any, volume: Any) -> Any:
        """Run the model on ``volume`` (``segmenter.segment(hu, spacing)`` by default)."""
        return segmenter.segment(np.asarray(volume.hu),
                                 tuple(float(s) for s in volume.spacing))

    def report(self, segmentation: Any, volume: Any, timings: dict[str, float],
               algorithm: dict[str, str]) -> PipelineResult:
        """The result of one segmentation: structures, measurements (or "no result")."""
        raise NotImplementedError

    def run(self, volume: Any) -> PipelineResult:
        """Check, segment and report one ``imaging.series.Volume``.

        Parameters
        ----------
        volume : Volume
            Needs ``hu`` ``[z, y, x]`` and ``spacing`` ``(dz, dy, dx)`` mm (and
            ``direction`` where the recipe reads the orientation).

        Returns
        -------
        PipelineResult
            What :meth:`report` makes of the segmentation; or ``ok=False`` with the
            reason (too small, too large, out of memory, or the recipe's own).
        """
        import torch

        timings: dict[str, float] = {}
        started = time.perf_counter()
        hu = np.asarray(volume.hu)
        spacing = tuple(float(s) for s in volume.spacing)
        problem = self.unusable(hu, spacing) or self.unsuitable(volume)
        if problem:
            # the weights that would have run (checked, not loaded), for a report of it
            return self.no_result(problem, timings, self.algorithm(self._checked)
                                  if self._checked is not None else None)
        t = time.perf_counter()
        segmenter, entry = self.load()
        timings["load_weights"] = time.perf_counter() - t
        algorithm = self.algorithm(entry)
        try:
            segmentation = self.segment(segmenter, volume)
        except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
            return self.no_result(f"out of memory while segmenting: {exc}".strip(), timings,
                                  algorithm)
        timings.update(segmentation.timings)
        result = self.report(segmentation, volume, timings, algorithm)
        timings["total"] = time.perf_counter() - started
        result.timings = {k: round(v, 3) for k, v in timings.items()}
        return result
