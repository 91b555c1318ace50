"""Binary morphology helpers shared by the image-based stages.

:func:`fill_holes` gives exactly ``scipy.ndimage.binary_fill_holes`` by one labelling of
the background instead of scipy's dilations repeated until nothing changes (their number
grows with the distance from the border, so a 512x512 slice costs hundreds of passes).
:data:`IN_PLANE` makes a 3D call act on every axial slice on its own. Work is done in the
mask's bounding box (:func:`bounding_box`): what lies outside it is background connected to
the border, so the result is the same.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: 4-connectivity within each slice of a ``[z, y, x]`` stack and none across slices: a 3D
#: operation with it equals the 2D operation (scipy's default structure) slice by slice.
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def bounding_box(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask``, grown by ``pad`` voxels.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean mask of any dimension.
    pad : int
        Voxels added on every side, clipped at the array's edges.

    Returns
    -------
    tuple of slice or None
        One slice per axis; None when the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others) if others else mask)
        if hits.size == 0:
            return None
        box.append(slice(max(0, int(hits[0]) - pad),
                         min(mask.shape[axis], int(hits[-1]) + 1 + pad)))
    return tuple(box)


def fill_holes(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """Fill the holes of a boolean mask: background not connected to the array border.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean mask of any dimension.
    structure : numpy.ndarray, optional
        Connectivity of the background, as for ``scipy.ndimage.binary_fill_holes``
        (default: the cross, faces only). Border faces count only along the axes the
        structure reaches across.

    Returns
    -------
    numpy.ndarray
        The filled boolean mask, identical to ``scipy.ndimage.binary_fill_holes``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return mask.copy()
    if structure is None:
        structure = ndimage.generate_binary_structure(mask.ndim, 1)
    structure = np.asarray(structure, dtype=bool)
    # an axis lets the outside in only when the structure has neighbours along it
    centre = tuple(n // 2 for n in structure.shape)
    reaching = []
    for axis in range(mask.ndim):
        along = [slice(c, c + 1) for c in centre]
        along[axis] = slice(None)
        if structure[tuple(along)].sum() > 1:
            reaching.append(axis)
    box = bounding_box(mask)
    if box is not None and reaching and box != tuple(slice(0, n) for n in mask.shape):
        # every line along a reaching axis through a voxel outside the box is background
        # up to the border: one voxel of that background around the box stands for all
        filled = np.zeros(mask.shape, dtype=bool)
        inner = _fill(np.pad(mask[box], 1), structure, reaching)
        filled[box] = inner[(slice(1, -1),) * mask.ndim]
        return filled
    return _fill(mask, structure, reaching)


def _fill(mask: np.ndarray, structure: np.ndarray, reaching: list[int]) -> np.ndarray:
    """:func:`fill_holes` of a whole array (``reaching``: the axes the structure spans)."""
    labels, count = ndimage.label(~mask, structure=structure)
    outside = np.zeros(count + 1, dtype=bool)
    for axis in reaching:
        for index in (0, -1):
            face = [slice(None)] * mask.ndim
            face[axis] = slice(index, index + 1) if index == 0 else slice(index, None)
            outside[np.unique(labels[tuple(face)])] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]
