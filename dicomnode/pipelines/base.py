"""The Pipeline protocol, what a pipeline returns, and the registry the router uses.

A pipeline takes one CT volume (``imaging.series.Volume``) and returns a
``PipelineResult``: label masks and/or probabilities with the measurements the
result objects report, or an explicit "no result" with its reason. It never writes
DICOM and never touches the network: ``workflow/jobs.py`` turns the result into
SEG/RTSTRUCT/SR/KOS with ``results/`` and queues them for export.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

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


_REGISTRY: dict[str, Callable[[], Pipeline]] = {}
#: One instance per registered factory and process: weights stay loaded between studies.
_INSTANCES: dict[tuple[str, Callable[[], Pipeline]], Pipeline] = {}
_INSTANCES_LOCK = threading.Lock()


def register(name: str, factory: Callable[[], Pipeline]) -> None:
    """Make a pipeline available to routing under ``name``.

    Parameters
    ----------
    name : str
        Registry name.
    factory : callable
        Returns a ready pipeline (loads weights lazily or at once).
    """
    if name in _REGISTRY:
        raise ValueError(f"Invalid 'name' value '{name}' - a pipeline is already registered")
    _REGISTRY[name] = factory


def registered() -> list[str]:
    """Names of every registered pipeline."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_pipeline(name: str) -> Pipeline:
    """The pipeline registered as ``name``, checked (weights present and intact).

    The instance is built once per process and kept, so that its weights and device
    stay loaded between studies; every call checks it again.

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
    with _INSTANCES_LOCK:
        pipeline = _INSTANCES.get((name, factory))
        if pipeline is None:
            pipeline = _INSTANCES[(name, factory)] = factory()
    pipeline.check()
    return pipeline


def availability() -> dict[str, str]:
    """Each registered pipeline's state: ``"ok"`` or the reason it cannot run."""
    states = {}
    for name in registered():
        try:
            get_pipeline(name)
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
