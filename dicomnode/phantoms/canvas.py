"""The canvas anatomy is painted on: a tissue map, a label map and a tissue table.

Anatomy modules paint shapes in order (later shapes cover earlier ones). Each voxel
holds a *tissue* (which sets its mean Hounsfield value and texture, see
:mod:`dicomnode.phantoms.scanner`) and a *label* (the ground truth). Only the block of
the volume inside a shape's bounds is evaluated, so small organs cost little even in
a 512x512x300 volume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dicomnode.phantoms.geometry import Grid, Pose
from dicomnode.phantoms.shapes import Shape

log = logging.getLogger(__name__)

Where = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

#: Voxels per slab when a shape is evaluated slab by slab.
_SLAB_VOXELS = 1_500_000
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """A small shared thread pool (numpy releases the GIL in the heavy loops)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                   thread_name_prefix="phantom")
    return _POOL


@dataclass(frozen=True)
class Tissue:
    """Mean Hounsfield value and texture amplitude (HU standard deviation) of a tissue."""

    name: str
    hu: float
    texture: float


class Canvas:
    """Tissue and label volumes on a grid, with the case pose.

    Parameters
    ----------
    grid
        The voxel grid (``[z, y, x]`` arrays).
    pose
        Maps the anatomical frame of the shapes into the scanner.
    """

    def __init__(self, grid: Grid, pose: Pose) -> None:
        self.grid = grid
        self.pose = pose
        self.tissue_map = np.zeros(grid.shape, dtype=np.uint8)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)
        self.tissues: list[Tissue] = [Tissue("air", -1000.0, 0.0)]
        #: Optional per-instance map (e.g. one value per liver tumour), ``[z, y, x]``.
        self.instances: np.ndarray | None = None
        #: Organs the region leaves out (a resected gland), by label name.
        self.resected: frozenset[str] = frozenset()
        self._ids: dict[str, int] = {"air": 0}
        self._x = grid.axis("x")
        self._y = grid.axis("y")
        self._z = grid.axis("z")

    def tissue(self, name: str, hu: float, texture: float = 0.0) -> int:
        """Register (or look up) a tissue and return its id."""
        if name in self._ids:
            return self._ids[name]
        if len(self.tissues) >= 255:
            raise ValueError(f"Invalid 'name' value '{name}' - more than 255 tissues")
        self._ids[name] = len(self.tissues)
        self.tissues.append(Tissue(name, float(hu), float(texture)))
        return self._ids[name]

    def tissue_id(self, name: str) -> int:
        """Id of a registered tissue."""
        return self._ids[name]

    def block_slices(self, lo: np.ndarray, hi: np.ndarray
                     ) -> tuple[slice, slice, slice] | None:
        """Index block holding the anatomical box ``[lo, hi]`` (``None`` if outside)."""
        wlo, whi = self.pose.world_bounds(np.asarray(lo, float), np.asarray(hi, float))
        sz = self.grid.index_range("z", wlo[2], whi[2])
        sy = self.grid.index_range("y", wlo[1], whi[1])
        sx = self.grid.index_range("x", wlo[0], whi[0])
        if sz.start >= sz.stop or sy.start >= sy.stop or sx.start >= sx.stop:
            return None
        return sz, sy, sx

    def coords(self, sl: tuple[slice, slice, slice]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Anatomical coordinates of an index block."""
        sz, sy, sx = sl
        return self.pose.anatomical_coords(self._x[sx], self._y[sy], self._z[sz])

    def block(self, lo: np.ndarray, hi: np.ndarray
              ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Index block holding the anatomical box ``[lo, hi]`` and its anatomical coords.

        Returns ``None`` when the box lies outside the volume.
        """
        sl = self.block_slices(lo, hi)
        if sl is None:
            return None
        return (sl, *self.coords(sl))

    def evaluate(self, shape: Shape) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Depth map of a shape over its block (``None`` when it misses the volume)."""
        found = self.block(*shape.bounds())
        if found is None:
            return None
        sl, ax, ay, az = found
        return sl, shape.depth(ax, ay, az)

    def _slabwise(self, sl: tuple[slice, slice, slice],
                  func: Callable[[tuple[slice, slice, slice], slice, np.ndarray, np.ndarray,
                                  np.ndarray], None]) -> None:
        """Call ``func(slab_block, local_z, x, y, z)`` over z-slabs of a block, in threads.

        Slabs keep temporaries small and let shapes skip parts that cannot reach a slab
        (see :class:`~dicomnode.phantoms.shapes.Tube`); numpy releases the GIL, so two
        threads use two cores.
        """
        sz, sy, sx = sl
        n = sz.stop - sz.start
        per = max(1, int(_SLAB_VOXELS // max((sy.stop - sy.start) * (sx.stop - sx.start), 1)))
        jobs = []
        for a in range(0, n, per):
            b = min(n, a + per)
            jobs.append(((slice(sz.start + a, sz.start + b), sy, sx), slice(a, b)))

        def run(job: tuple[tuple[slice, slice, slice], slice]) -> None:
            sub, local = job
            func(sub, local, *self.coords(sub))

        if len(jobs) == 1:
            run(jobs[0])
        else:
            list(_pool().map(run, jobs))

    def paint(self, shape: Shape, tissue: int, label: int | None = None, *,
              within: Collection[int] | None = None, where: Where | None = None,
              min_depth: float = 0.0
              ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Paint the inside of a shape.

        Parameters
        ----------
        shape
            What to paint.
        tissue
            Tissue id for the painted voxels.
        label
            Label value to write there (``None`` keeps the labels as they are).
        within
            Only repaint voxels whose current tissue is one of these ids.
        where
            Extra condition ``f(x, y, z) -> bool`` in anatomical coordinates.
        min_depth
            Paint only voxels at least this deep inside the surface (mm).

        Returns
        -------
        tuple or None
            ``(block, mask)``: the index block and the boolean mask of painted voxels
            inside it, or ``None`` when the shape misses the volume.
        """
        sl = self.block_slices(*shape.bounds())
        if sl is None:
            return None
        full = np.zeros(tuple(s.stop - s.start for s in sl), dtype=bool)
        keep = None if within is None else np.fromiter(within, dtype=np.uint8)

        def run(sub: tuple[slice, slice, slice], local: slice, ax: np.ndarray, ay: np.ndarray,
                az: np.ndarray) -> None:
            mask = shape.depth(ax, ay, az) > min_depth
            if where is not None:
                mask &= where(ax, ay, az)
            if keep is not None:
                mask &= np.isin(self.tissue_map[sub], keep)
            self.tissue_map[sub][mask] = tissue
            if label is not None:
                self.labels[sub][mask] = label
            full[local] = mask

        self._slabwise(sl, run)
        return sl, full

    def paint_layers(self, shape: Shape, layers: Sequence[tuple[float, int, int | None]], *,
                     within: Collection[int] | None = None, where: Where | None = None) -> None:
        """Paint nested layers from one depth map.

        ``layers`` holds ``(min_depth_mm, tissue, label)`` from the surface inwards: a
        voxel gets the last layer whose ``min_depth`` it exceeds (skin, fat, muscle...).
        """
        sl = self.block_slices(*shape.bounds())
        if sl is None:
            return
        keep = None if within is None else np.fromiter(within, dtype=np.uint8)

        def run(sub: tuple[slice, slice, slice], local: slice, ax: np.ndarray, ay: np.ndarray,
                az: np.ndarray) -> None:
            depth = shape.depth(ax, ay, az)
            allowed = None
            if keep is not None:
                allowed = np.isin(self.tissue_map[sub], keep)
            if where is not None:
                cond = where(ax, ay, az)
                allowed = cond if allowed is None else allowed & cond
            tmap, lmap = self.tissue_map[sub], self.labels[sub]
            for min_depth, tissue, label in layers:
                mask = depth > min_depth
                if allowed is not None:
                    mask &= allowed
                tmap[mask] = tissue
                if label is not None:
                    lmap[mask] = label

        self._slabwise(sl, run)
