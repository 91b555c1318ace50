"""Smooth random shapes described by an approximate signed depth.

Every shape answers two questions in anatomical coordinates (mm):

* ``bounds()``: a box ``(lo, hi)`` that holds the shape, so only that block of the
  volume is evaluated;
* ``depth(x, y, z)``: roughly how many millimetres a point lies *inside* the surface
  (negative outside). Layers such as skin, fat and muscle are thresholds on one depth
  map, and shapes combine with :class:`Union`, :class:`Intersection` and
  :class:`Difference` (max / min of depths).

The random shapes are star-shaped ellipsoids whose radius is modulated by a few
smooth harmonics of the direction (:class:`Blob`), tubes along smooth curves with a
varying radius (:class:`Tube`) and axial outlines whose size and harmonics vary along
``z`` (:class:`Outline`). :class:`WaveNoise` gives a smooth random field that can be
evaluated anywhere (gyri, mottled stool, lobulated margins).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from dicomnode.phantoms.geometry import rotation_matrix

log = logging.getLogger(__name__)

_INF = np.float32(1e9)
Array = np.ndarray


class Shape(Protocol):
    """What :class:`~dicomnode.phantoms.canvas.Canvas` needs from a shape."""

    def bounds(self) -> tuple[Array, Array]:
        """Anatomical box ``(lo, hi)`` that holds the shape."""
        ...

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Approximate depth inside the surface in mm (negative outside)."""
        ...


def random_harmonics(rng: np.random.Generator, n: int = 4, amplitude: float = 0.08,
                     max_frequency: float = 2.5) -> list[tuple[Array, float, float]]:
    """Draw ``n`` smooth surface harmonics ``(direction * frequency, amplitude, phase)``."""
    out = []
    for _ in range(n):
        v = rng.normal(size=3)
        v *= rng.uniform(1.0, max_frequency) / np.linalg.norm(v)
        out.append((v, float(rng.uniform(0.3, 1.0) * amplitude), float(rng.uniform(0, 2 * np.pi))))
    return out


@dataclass
class Blob:
    """A star-shaped ellipsoid with a smoothly perturbed radius.

    Parameters
    ----------
    center, radii
        Centre and semi-axes in mm.
    angles
        Yaw, pitch, roll (degrees) of the blob's own axes.
    harmonics
        ``(omega, amplitude, phase)`` terms: the radius along unit direction ``d`` is
        scaled by ``1 + sum(amplitude * sin(omega . d + phase))``.
    axes
        Optional 3x3 matrix whose columns are the blob's own axes (overrides ``angles``).
    """

    center: npt.ArrayLike
    radii: npt.ArrayLike
    angles: npt.ArrayLike = (0.0, 0.0, 0.0)
    harmonics: list[tuple[Array, float, float]] = field(default_factory=list)
    axes: Array | None = None

    def __post_init__(self) -> None:
        self._c = np.asarray(self.center, dtype=np.float32)
        self._r = np.asarray(self.radii, dtype=np.float32)
        if np.any(self._r <= 0):
            raise ValueError(f"Invalid 'radii' value '{self.radii!r}' - must be positive")
        if self.axes is None:
            rot = rotation_matrix(*np.asarray(self.angles, dtype=float))
        else:
            rot = np.asarray(self.axes)
        self._rot = rot.astype(np.float32)

    def bounds(self) -> tuple[Array, Array]:
        """Box holding the blob (largest radius times the largest perturbation)."""
        grow = 1.0 + sum(abs(a) for _, a, _ in self.harmonics)
        reach = float(self._r.max()) * grow
        return self._c - reach, self._c + reach

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Depth along the ray from the centre, in mm."""
        px, py, pz = x - self._c[0], y - self._c[1], z - self._c[2]
        rt = self._rot.T
        lx = rt[0, 0] * px + rt[0, 1] * py + rt[0, 2] * pz
        ly = rt[1, 0] * px + rt[1, 1] * py + rt[1, 2] * pz
        lz = rt[2, 0] * px + rt[2, 1] * py + rt[2, 2] * pz
        rho = np.sqrt(lx * lx + ly * ly + lz * lz) + np.float32(1e-3)
        ux, uy, uz = lx / self._r[0], ly / self._r[1], lz / self._r[2]
        r = np.sqrt(ux * ux + uy * uy + uz * uz) + np.float32(1e-6)
        scale = np.ones_like(r)
        if self.harmonics:
            dx, dy, dz = ux / r, uy / r, uz / r
            for omega, amp, phase in self.harmonics:
                w = omega.astype(np.float32)
                scale += np.float32(amp) * np.sin(w[0] * dx + w[1] * dy + w[2] * dz
                                                  + np.float32(phase))
        return rho * (scale / r - np.float32(1.0))


def smooth_curve(points: npt.ArrayLike, samples: int = 8) -> Array:
    """Catmull-Rom spline through control points, ``samples`` points per segment."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 3:
        return p
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    t = np.linspace(0, 1, samples, endpoint=False)[:, None]
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    out.append(p[-1:])
    return np.vstack(out)


def grid_extents(x: Array, y: Array, z: Array) -> list[tuple[Array, Array, int]]:
    """Per-index coordinate ranges of a grid block: ``(min, max, axis)`` for x, y, z.

    Exact for any small rotation of the grid: each range is taken over the other axes.
    """
    return [(x.min(axis=(0, 1)), x.max(axis=(0, 1)), 2),
            (y.min(axis=(0, 2)), y.max(axis=(0, 2)), 1),
            (z.min(axis=(1, 2)), z.max(axis=(1, 2)), 0)]


def sub_box(extents: list[tuple[Array, Array, int]], lo: Array, hi: Array
            ) -> tuple[slice, slice, slice] | None:
    """Index box of a grid block that can hold points inside ``[lo, hi]`` (``None``: none)."""
    sl = [slice(None)] * 3
    for d, (cmin, cmax, axis) in enumerate(extents):
        hit = np.nonzero((cmax >= lo[d]) & (cmin <= hi[d]))[0]
        if hit.size == 0:
            return None
        sl[axis] = slice(int(hit[0]), int(hit[-1]) + 1)
    return sl[0], sl[1], sl[2]


@dataclass
class Tube:
    """A tube along a polyline with a radius interpolated between its points.

    Parameters
    ----------
    points
        ``(M, 3)`` polyline in mm (use :func:`smooth_curve` for a smooth path).
    radii
        One radius for all points, one per point, or a few spread evenly along the
        path (linearly interpolated, e.g. the radii at the control points of a
        :func:`smooth_curve`).
    stretch
        Per-axis factors of the cross-section: ``(1, 1, 3)`` makes a tube three times
        taller than wide (a mandible body, a flattened vein).
    """

    points: npt.ArrayLike
    radii: npt.ArrayLike
    stretch: npt.ArrayLike = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        self._p = np.asarray(self.points, dtype=np.float32)
        rad = np.atleast_1d(np.asarray(self.radii, dtype=np.float32))
        if rad.size not in (1, len(self._p)):
            rad = np.interp(np.linspace(0, 1, len(self._p)), np.linspace(0, 1, rad.size),
                            rad).astype(np.float32)
        self._rad = np.broadcast_to(rad, (len(self._p),)).astype(np.float32)
        self._s = np.asarray(self.stretch, dtype=np.float32)
        if np.any(self._rad < 0) or np.any(self._s <= 0):
            raise ValueError(f"Invalid 'radii' value '{self.radii!r}' - must be positive")

    def bounds(self) -> tuple[Array, Array]:
        """Box holding the tube."""
        reach = float(self._rad.max()) * self._s
        return self._p.min(axis=0) - reach, self._p.max(axis=0) + reach

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Radius minus the (stretched) distance to the nearest point of the polyline.

        Segments whose reach cannot touch the box of the given points are skipped, so
        a long, winding tube costs little per slab.
        """
        shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
        best = np.full(shape, -_INF, dtype=np.float32)
        if best.size == 0:
            return best
        reach = float(self._rad.max()) * self._s + 1.0
        a_all, b_all = self._p[:-1], self._p[1:]
        seg_lo = np.minimum(a_all, b_all) - reach
        seg_hi = np.maximum(a_all, b_all) + reach
        gridded = x.ndim == 3 and x.shape == y.shape == z.shape
        extents = grid_extents(x, y, z) if gridded else []
        lo = np.array([x.min(), y.min(), z.min()], dtype=np.float32)
        hi = np.array([x.max(), y.max(), z.max()], dtype=np.float32)
        near = np.all((seg_lo <= hi) & (seg_hi >= lo), axis=1)
        inv = (1.0 / self._s).astype(np.float32)
        for i in np.nonzero(near)[0]:
            if gridded:
                box = sub_box(extents, seg_lo[i], seg_hi[i])
                if box is not None:
                    self._segment(int(i), x[box], y[box], z[box], inv, best[box])
            else:
                self._segment(int(i), x, y, z, inv, best)
        return best

    def _segment(self, i: int, x: Array, y: Array, z: Array, inv: Array, best: Array) -> None:
        """Fold the depth of segment ``i`` into ``best`` (in place)."""
        a, b = self._p[i], self._p[i + 1]
        ab = (b - a) * inv
        px, py, pz = (x - a[0]) * inv[0], (y - a[1]) * inv[1], (z - a[2]) * inv[2]
        denom = float(ab @ ab)
        if denom > 0:
            t = (px * ab[0] + py * ab[1] + pz * ab[2]) * np.float32(1.0 / denom)
            np.clip(t, 0, 1, out=t)
        else:
            t = np.zeros(np.broadcast_shapes(px.shape, py.shape, pz.shape), dtype=np.float32)
        qx, qy, qz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
        dist = np.sqrt(qx * qx + qy * qy + qz * qz)
        rad = self._rad[i] + t * (self._rad[i + 1] - self._rad[i])
        np.maximum(best, rad - dist, out=best)


@dataclass
class Outline:
    """An axial cross-section that changes smoothly along ``z`` (body, neck, head).

    Parameters
    ----------
    keyframes
        Rows ``(z, cx, cy, ax, ay, a1, b1, a2, b2, a3, b3, a4, b4)``: at height ``z`` the
        outline is the ellipse with centre ``(cx, cy)`` and semi-axes ``(ax, ay)`` whose
        radius along angle ``t`` is scaled by ``1 + sum(ak cos kt + bk sin kt)``. Rows may
        stop after ``ay`` (no harmonics). Parameters are linearly interpolated in ``z``;
        outside the keyframes the outline does not exist.
    """

    keyframes: Sequence[Sequence[float]]
    _table_step: float = 0.5

    def __post_init__(self) -> None:
        k = np.zeros((len(self.keyframes), 13), dtype=np.float64)
        for i, row in enumerate(self.keyframes):
            k[i, : len(row)] = row
        k = k[np.argsort(k[:, 0])]
        if np.any(k[:, 3:5] <= 0):
            raise ValueError("Invalid 'keyframes' value - semi-axes must be positive")
        self._k = k
        self._z0 = float(k[0, 0])
        n = max(int(np.ceil((k[-1, 0] - k[0, 0]) / self._table_step)) + 1, 2)
        zs = np.linspace(k[0, 0], k[-1, 0], n)
        self._step = float(zs[1] - zs[0]) if n > 1 else 1.0
        self._table = np.stack([np.interp(zs, k[:, 0], k[:, j]) for j in range(13)],
                               axis=1).astype(np.float32)

    def bounds(self) -> tuple[Array, Array]:
        """Box holding the outline over its z range."""
        k = self._k
        grow = 1.0 + np.abs(k[:, 5:]).sum(axis=1)
        rx = (k[:, 3] * grow)
        ry = (k[:, 4] * grow)
        lo = np.array([(k[:, 1] - rx).min(), (k[:, 2] - ry).min(), k[0, 0]], dtype=np.float32)
        hi = np.array([(k[:, 1] + rx).max(), (k[:, 2] + ry).max(), k[-1, 0]], dtype=np.float32)
        return lo, hi

    def params(self, z: Array) -> tuple[Array, Array]:
        """Table rows for heights ``z`` and a mask of heights inside the keyframe range."""
        pos = (z - np.float32(self._z0)) / np.float32(self._step)
        valid = (pos >= -0.5) & (pos <= len(self._table) - 0.5)
        idx = np.clip(np.rint(pos), 0, len(self._table) - 1).astype(np.intp)
        return self._table[idx], valid

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Depth inside the outline along the ray from its centre, in mm.

        On a grid block the parameters are looked up once per slice (at the slice's
        centre height): they change over centimetres, the pose tilts a few degrees.
        """
        if z.ndim == 3 and z.shape[1] > 0 and z.shape[2] > 0:
            zc = z[:, z.shape[1] // 2, z.shape[2] // 2]
            prm, valid = self.params(zc)
            prm = prm[:, None, None, :]
            valid = valid[:, None, None]
        else:
            prm, valid = self.params(z)
        px = x - prm[..., 1]
        py = y - prm[..., 2]
        rho = np.sqrt(px * px + py * py) + np.float32(1e-3)
        ux = px * (np.float32(1) / prm[..., 3])
        uy = py * (np.float32(1) / prm[..., 4])
        r = np.sqrt(ux * ux + uy * uy) + np.float32(1e-6)
        c, s = ux / r, uy / r
        scale = np.ones_like(r)
        used = np.abs(self._table[:, 5:]).max(axis=0) > 0
        if used.any():
            c2 = None
            for j in np.nonzero(used)[0]:
                coef = prm[..., 5 + j]
                k, is_sin = divmod(int(j), 2)
                if k == 0:
                    term = s if is_sin else c
                elif k == 1:
                    term = (np.float32(2) * c * s if is_sin
                            else np.float32(1) - np.float32(2) * s * s)
                elif k == 2:
                    term = (s * (np.float32(3) - np.float32(4) * s * s) if is_sin
                            else c * (np.float32(4) * c * c - np.float32(3)))
                else:
                    if c2 is None:
                        c2 = np.float32(1) - np.float32(2) * s * s
                    term = (np.float32(4) * c * s * c2 if is_sin
                            else np.float32(2) * c2 * c2 - np.float32(1))
                scale += coef * term
        d = rho * (scale / r - np.float32(1.0))
        return np.where(valid, d, -_INF)


@dataclass
class Box:
    """An axis-aligned box in anatomical coordinates (use with ``where`` conditions)."""

    lo: npt.ArrayLike
    hi: npt.ArrayLike

    def bounds(self) -> tuple[Array, Array]:
        """The box."""
        return np.asarray(self.lo, np.float32), np.asarray(self.hi, np.float32)

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Distance to the nearest face, positive inside."""
        lo, hi = self.bounds()
        d = np.minimum(x - lo[0], hi[0] - x)
        d = np.minimum(d, np.minimum(y - lo[1], hi[1] - y))
        return np.minimum(d, np.minimum(z - lo[2], hi[2] - z))


@dataclass
class HalfSpace:
    """Points with ``normal . p < offset`` (use inside an :class:`Intersection`)."""

    normal: Sequence[float]
    offset: float

    def bounds(self) -> tuple[Array, Array]:
        """Unbounded."""
        return np.full(3, -1e6, np.float32), np.full(3, 1e6, np.float32)

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Signed distance to the plane, positive on the inside."""
        n = np.asarray(self.normal, dtype=np.float32)
        n = n / np.linalg.norm(n)
        return np.float32(self.offset) - (n[0] * x + n[1] * y + n[2] * z)


@dataclass
class Union:
    """Points inside any of the parts."""

    parts: Sequence[Shape]

    def bounds(self) -> tuple[Array, Array]:
        """Hull of the parts' boxes."""
        los, his = zip(*(p.bounds() for p in self.parts), strict=True)
        return np.min(los, axis=0), np.max(his, axis=0)

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Largest depth of the parts (each evaluated only over its own box on a grid)."""
        if not (x.ndim == 3 and x.shape == y.shape == z.shape):
            out = self.parts[0].depth(x, y, z)
            for p in self.parts[1:]:
                out = np.maximum(out, p.depth(x, y, z))
            return out
        out = np.full(x.shape, -_INF, dtype=np.float32)
        extents = grid_extents(x, y, z)
        for p in self.parts:
            box = sub_box(extents, *p.bounds())
            if box is not None:
                np.maximum(out[box], p.depth(x[box], y[box], z[box]), out=out[box])
        return out


@dataclass
class Intersection:
    """Points inside all of the parts."""

    parts: Sequence[Shape]

    def bounds(self) -> tuple[Array, Array]:
        """Overlap of the parts' boxes."""
        los, his = zip(*(p.bounds() for p in self.parts), strict=True)
        return np.max(los, axis=0), np.min(his, axis=0)

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """Smallest depth of the parts."""
        out = self.parts[0].depth(x, y, z)
        for p in self.parts[1:]:
            out = np.minimum(out, p.depth(x, y, z))
        return out


@dataclass
class Difference:
    """Points inside ``keep`` and outside ``remove``."""

    keep: Shape
    remove: Shape

    def bounds(self) -> tuple[Array, Array]:
        """The kept shape's box."""
        return self.keep.bounds()

    def depth(self, x: Array, y: Array, z: Array) -> Array:
        """``min(depth_keep, -depth_remove)``."""
        return np.minimum(self.keep.depth(x, y, z), -self.remove.depth(x, y, z))


class WaveNoise:
    """A smooth random field: a sum of plane waves with random directions and phases.

    Parameters
    ----------
    rng
        Source of the random directions.
    wavelength
        Typical wavelength in mm.
    waves
        Number of plane waves (more gives a less regular pattern).

    The field has zero mean and unit variance and can be evaluated at any coordinates.
    """

    def __init__(self, rng: np.random.Generator, wavelength: float, waves: int = 10) -> None:
        if wavelength <= 0:
            raise ValueError(f"Invalid 'wavelength' value '{wavelength}' - must be positive")
        dirs = rng.normal(size=(waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        k = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.4, size=(waves, 1)))
        self._k = (dirs * k).astype(np.float32)
        self._phase = rng.uniform(0, 2 * np.pi, size=waves).astype(np.float32)
        self._norm = np.float32(np.sqrt(2.0 / waves))

    def __call__(self, x: Array, y: Array, z: Array) -> Array:
        """Evaluate the field (float32, same broadcast shape as the inputs)."""
        out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
        for k, ph in zip(self._k, self._phase, strict=True):
            out += np.sin(k[0] * x + k[1] * y + k[2] * z + ph)
        return out * self._norm
