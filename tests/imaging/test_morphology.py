"""fill_holes must equal scipy's binary_fill_holes, in 2D, 3D and slice by slice."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.imaging.morphology import IN_PLANE, bounding_box, fill_holes


def _assert_fills_like_scipy(mask: np.ndarray) -> None:
    ndim = mask.ndim
    for structure in (None, ndimage.generate_binary_structure(ndim, ndim)):
        assert np.array_equal(fill_holes(mask, structure),
                              ndimage.binary_fill_holes(mask, structure))
    if ndim == 3:
        per_slice = np.stack([ndimage.binary_fill_holes(s) for s in mask])
        assert np.array_equal(fill_holes(mask, IN_PLANE), per_slice)
        # a structure spanning one axis only: lines along it
        line = np.zeros((3, 3, 3), dtype=bool)
        line[1, 1, :] = True
        assert np.array_equal(fill_holes(mask, line), ndimage.binary_fill_holes(mask, line))


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_equals_scipy_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(60):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(1, 14, size=ndim))
        _assert_fills_like_scipy(rng.random(shape) < rng.uniform(0.2, 0.8))


@pytest.mark.parametrize("seed", range(3))
def test_fill_holes_in_the_bounding_box_equals_scipy(seed: int) -> None:
    # a random mask in part of a larger empty array (touching its border or not): the
    # work is done in the box, the result must not change
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        ndim = int(rng.integers(2, 4))
        shape = tuple(int(n) for n in rng.integers(4, 16, size=ndim))
        mask = np.zeros(shape, dtype=bool)
        lo = [int(rng.integers(0, n - 2)) for n in shape]
        hi = [int(rng.integers(a + 2, n + 1)) for a, n in zip(lo, shape, strict=True)]
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        mask[box] = rng.random([b - a for a, b in zip(lo, hi, strict=True)]) < 0.6
        _assert_fills_like_scipy(mask)


def test_bounding_box() -> None:
    mask = np.zeros((5, 6, 7), dtype=bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = mask[3, 4, 3] = True
    assert bounding_box(mask) == (slice(1, 4), slice(2, 5), slice(3, 4))
    assert bounding_box(mask, pad=2) == (slice(0, 5), slice(0, 6), slice(1, 6))


def test_fill_holes_of_a_ring_and_an_open_cup() -> None:
    ring = np.zeros((7, 7), dtype=bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert fill_holes(ring)[3, 3]
    cup = ring.copy()
    cup[1, 3] = False                      # opened to the outside: nothing to fill
    assert not fill_holes(cup)[3, 3]
    assert fill_holes(np.zeros((0, 3), dtype=bool)).shape == (0, 3)
