"""Voxel grids in patient coordinates and the per-case pose of the anatomy.

Conventions (DICOM patient coordinates, LPS):

* ``x`` grows towards the patient's left, ``y`` towards the posterior, ``z`` towards
  the head.
* Volumes are indexed ``[z, y, x]``: slice ``k`` lies at ``z0 + k*dz`` (so index 0 is
  the most inferior slice), row ``j`` at ``y0 + j*dy`` (rows run anterior to
  posterior), column ``i`` at ``x0 + i*dx`` (columns run from the patient's right to
  left). The matching Image Orientation (Patient) is ``[1, 0, 0, 0, 1, 0]``.

Anatomy is described in an *anatomical* frame (millimetres, same axes, centred on the
region) and placed in the scanner by a :class:`Pose`: a small rotation, a shift and an
isotropic scale drawn per case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

#: Image Orientation (Patient) of every phantom: rows along +x, columns along +y.
ORIENTATION: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Grid:
    """A regular axial voxel grid.

    Parameters
    ----------
    shape
        ``(slices, rows, columns)``.
    spacing
        ``(dz, dy, dx)`` in millimetres.
    origin
        ``(x, y, z)`` of the centre of voxel ``[0, 0, 0]`` in patient coordinates.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, name: str) -> np.ndarray:
        """Return the 1-D world coordinates (mm, float64) along ``"x"``, ``"y"`` or ``"z"``."""
        nz, ny, nx = self.shape
        dz, dy, dx = self.spacing
        x0, y0, z0 = self.origin
        if name == "x":
            return x0 + dx * np.arange(nx)
        if name == "y":
            return y0 + dy * np.arange(ny)
        if name == "z":
            return z0 + dz * np.arange(nz)
        raise ValueError(f"Invalid 'name' value '{name}' - must be 'x', 'y' or 'z'")

    def index_range(self, name: str, lo: float, hi: float) -> slice:
        """Return the slice of indices along an axis whose coordinates lie in ``[lo, hi]``."""
        coords = self.axis(name)
        start = int(np.searchsorted(coords, lo, side="left"))
        stop = int(np.searchsorted(coords, hi, side="right"))
        return slice(max(start, 0), min(stop, coords.size))


def rotation_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Rotation about z (yaw), then x (pitch), then y (roll), angles in degrees."""
    a, b, c = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return rz @ rx @ ry


@dataclass(frozen=True)
class Pose:
    """Where the anatomy sits in the scanner: ``world = shift + scale * R @ anatomical``."""

    rotation: np.ndarray
    shift: np.ndarray
    scale: float

    @classmethod
    def identity(cls) -> Pose:
        """The pose that leaves anatomical coordinates unchanged."""
        return cls(np.eye(3), np.zeros(3), 1.0)

    @classmethod
    def random(cls, rng: np.random.Generator, *, max_angle: float = 4.0,
               max_shift: float = 10.0, scale_range: tuple[float, float] = (0.92, 1.08)) -> Pose:
        """Draw a small random rotation, in-plane shift and size for one case."""
        angles = rng.uniform(-max_angle, max_angle, size=3)
        shift = np.array([rng.uniform(-max_shift, max_shift),
                          rng.uniform(-max_shift, max_shift), 0.0])
        return cls(rotation_matrix(*angles), shift, float(rng.uniform(*scale_range)))

    def to_world(self, points: np.ndarray) -> np.ndarray:
        """Map anatomical points ``(..., 3)`` to world coordinates."""
        return self.shift + self.scale * np.asarray(points) @ self.rotation.T

    def world_bounds(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box that holds the anatomical box ``[lo, hi]``."""
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                            for c in (lo[2], hi[2])])
        world = self.to_world(corners)
        return world.min(axis=0), world.max(axis=0)

    def anatomical_coords(self, x: np.ndarray, y: np.ndarray, z: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Anatomical coordinates of the grid block spanned by 1-D world axes.

        Returns three float32 arrays of shape ``(len(z), len(y), len(x))``.
        """
        inv = self.rotation.T / self.scale
        xs = (x - self.shift[0]).astype(np.float32)
        ys = (y - self.shift[1]).astype(np.float32)
        zs = (z - self.shift[2]).astype(np.float32)
        out = []
        for row in inv.astype(np.float32):
            out.append(row[2] * zs[:, None, None] + (row[1] * ys[None, :, None]
                                                     + row[0] * xs[None, None, :]))
        return out[0], out[1], out[2]
