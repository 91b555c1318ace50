"""Binary morphology helpers shared by the image-based stages.

:func:`fill_holes` gives exactly ``scipy.ndimage.binary_fill_holes`` by one labelling of
the background instead of scipy's dilations repeated until nothing changes (their number
grows with the distance from the border, so a 512x512 slice costs hundreds of passes).
:data:`IN_PLANE` makes a 3D call act on every axial slice on its own.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: 4-connectivity within each slice of a ``[z, y, x]`` stack and none across slices: a 3D
#: operation with it equals the 2D operation (scipy's default structure) slice by slice.
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


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
    labels, count = ndimage.label(~mask, structure=structure)
    outside = np.zeros(count + 1, dtype=bool)
    centre = tuple(n // 2 for n in structure.shape)
    for axis in range(mask.ndim):
        # an axis lets the outside in only when the structure has neighbours along it
        along = [slice(c, c + 1) for c in centre]
        along[axis] = slice(None)
        if structure[tuple(along)].sum() <= 1:
            continue
        for index in (0, -1):
            face = [slice(None)] * mask.ndim
            face[axis] = slice(index, index + 1) if index == 0 else slice(index, None)
            outside[np.unique(labels[tuple(face)])] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]
