"""Tests for dicomnode.results.contours: tracing, holes, simplification, even-odd fill."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.results.contours import (
    fill_polygons,
    mask_to_polygons,
    signed_area,
    simplify_loop,
    simplify_tolerance_mm,
    trace_loops,
)


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    r, c = np.mgrid[: shape[0], : shape[1]]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 < radius**2


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3), (0.5, 0.5)])
def test_random_masks_fill_back_exactly(spacing: tuple[float, float]) -> None:
    rng = np.random.default_rng(7)
    for trial in range(60):
        mask = rng.random((18, 23)) < 0.5
        if trial % 2:
            mask = ndimage.binary_opening(mask)
        polygons = mask_to_polygons(mask, spacing)
        assert np.array_equal(fill_polygons(polygons, mask.shape), mask)


def test_hole_is_a_separate_inner_contour() -> None:
    ring = _disc((80, 80), (40, 40), 30) & ~_disc((80, 80), (40, 40), 12)
    loops = trace_loops(ring)
    assert len(loops) == 2
    areas = sorted(signed_area(loop) for loop in loops)
    assert areas[0] < 0 < areas[1]  # outer boundary and hole run opposite ways
    polygons = mask_to_polygons(ring, (1.0, 1.0))
    assert len(polygons) == 2
    assert np.array_equal(fill_polygons(polygons, ring.shape), ring)


def test_diagonal_pixels_are_separate_loops() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = mask[2, 2] = True
    assert len(trace_loops(mask)) == 2
    assert np.array_equal(fill_polygons(mask_to_polygons(mask, (1.0, 1.0)), mask.shape), mask)


def test_simplification_drops_points_within_tolerance() -> None:
    disc = _disc((200, 200), (100, 100), 80)
    loop = trace_loops(disc)[0]
    polygons = mask_to_polygons(disc, (1.0, 1.0))
    assert len(polygons) == 1
    assert len(polygons[0]) < len(loop) / 2
    # Every traced edge midpoint stays within the tolerance of the simplified polygon.
    tol = simplify_tolerance_mm((1.0, 1.0))
    assert tol <= 0.5
    mids = (loop + np.roll(loop, -1, axis=0)) / 2
    poly = polygons[0]
    a, b = poly, np.roll(poly, -1, axis=0)
    ab = b - a
    t = np.clip(((mids[:, None, :] - a[None]) * ab[None]).sum(-1) / (ab**2).sum(-1)[None], 0, 1)
    nearest = a[None] + t[..., None] * ab[None]
    dist = np.sqrt(((mids[:, None, :] - nearest) ** 2).sum(-1)).min(axis=1)
    assert dist.max() <= tol + 1e-9


def test_tolerance_never_exceeds_half_mm() -> None:
    assert simplify_tolerance_mm((3.0, 3.0)) == 0.5
    assert simplify_tolerance_mm((0.4, 0.8)) == pytest.approx(0.12)


def test_single_pixel_is_kept_and_empty_mask_has_no_contours() -> None:
    mask = np.zeros((5, 5), bool)
    assert mask_to_polygons(mask, (1.0, 1.0)) == []
    mask[2, 2] = True
    polygons = mask_to_polygons(mask, (1.0, 1.0))
    assert len(polygons) == 1 and len(polygons[0]) >= 3


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="'mask'"):
        trace_loops(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="'tolerance_mm'"):
        simplify_loop(np.zeros((6, 2)), (1.0, 1.0), -1.0)


def _segments_cross(p: np.ndarray, q: np.ndarray, r: np.ndarray, s: np.ndarray) -> bool:
    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
        return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    d1, d2 = orient(p, q, r), orient(p, q, s)
    d3, d4 = orient(r, s, p), orient(r, s, q)
    return d1 * d2 < 0 and d3 * d4 < 0


def test_simplified_polygons_do_not_cross_themselves_or_each_other() -> None:
    """Planning systems reject self-intersecting contours."""
    rng = np.random.default_rng(11)
    for trial in range(25):
        mask = ndimage.binary_opening(rng.random((24, 24)) < 0.55) if trial % 2 else \
            rng.random((16, 16)) < 0.5
        polygons = mask_to_polygons(mask, (0.9, 0.9))
        edges = [(poly[i], poly[(i + 1) % len(poly)]) for poly in polygons
                 for i in range(len(poly))]
        for i, (a, b) in enumerate(edges):
            for c, d in edges[i + 1:]:
                assert not _segments_cross(a, b, c, d), trial
