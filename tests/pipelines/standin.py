"""A stand-in for ``imaging.series.Volume`` holding only what the pipelines read."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


@dataclass
class StandInVolume:
    """What a pipeline reads of ``imaging.series.Volume``: voxels, spacing, orientation
    and, for pipelines that read headers, the slices' data sets."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    datasets: list[Dataset] = field(default_factory=list)
