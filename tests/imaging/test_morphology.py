"""fill_holes must equal scipy's binary_fill_holes, in 2D, 3D and slice by slice."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.imaging.morphology import IN_PLANE, fill_holes


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_equals_scipy_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(1, 14, size=ndim))
        mask = rng.random(shape) < rng.uniform(0.2, 0.8)
        for structure in (None, ndimage.generate_binary_structure(ndim, ndim)):
            assert np.array_equal(fill_holes(mask, structure),
                                  ndimage.binary_fill_holes(mask, structure))
        if ndim == 3:
            per_slice = np.stack([ndimage.binary_fill_holes(s) for s in mask])
            assert np.array_equal(fill_holes(mask, IN_PLANE), per_slice)


def test_fill_holes_of_a_ring_and_an_open_cup() -> None:
    ring = np.zeros((7, 7), dtype=bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert fill_holes(ring)[3, 3]
    cup = ring.copy()
    cup[1, 3] = False                      # opened to the outside: nothing to fill
    assert not fill_holes(cup)[3, 3]
    assert fill_holes(np.zeros((0, 3), dtype=bool)).shape == (0, 3)
