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
    simplify_loops,
    simplify_tolerance_mm,
    trace_loops,
    volume_to_polygons,
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


def _recursive_douglas_peucker(loop: np.ndarray, spacing: tuple[float, float],
                               tolerance_mm: float) -> np.ndarray:
    """Reference: one chain at a time (the formulation simplify_loops batches)."""
    n = len(loop)
    if n <= 4:
        return loop
    mm = loop * np.asarray(spacing, float)[None, :]
    far = int(np.argmax(((mm - mm[0]) ** 2).sum(axis=1)))
    keep = np.zeros(n, bool)
    keep[0] = keep[far] = True
    closed = np.concatenate([mm, mm[:1]])
    stack = [(0, far), (far, n)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = closed[b] - closed[a]
        pts = closed[a + 1:b] - closed[a]
        length = float(np.hypot(seg[0], seg[1]))
        if length == 0.0:
            dist = np.hypot(pts[:, 0], pts[:, 1])
        else:
            dist = np.abs(pts[:, 0] * seg[1] - pts[:, 1] * seg[0]) / length
        k = int(np.argmax(dist))
        if dist[k] > tolerance_mm:
            stack += [(a, a + 1 + k), (a + 1 + k, b)]
            keep[a + 1 + k] = True
    return loop[keep]


def test_batched_simplification_keeps_the_recursive_vertices() -> None:
    rng = np.random.default_rng(13)
    for trial in range(200):
        mask = rng.random(tuple(rng.integers(3, 30, 2))) < rng.uniform(0.2, 0.8)
        if trial % 2:
            mask = ndimage.binary_opening(mask)
        loops = [(loop + np.roll(loop, -1, axis=0)) / 2 for loop in trace_loops(mask)]
        # Grid loops with ties, and loops of repeated points (zero-length chords).
        loops += [rng.integers(0, 4, (int(rng.integers(1, 25)), 2)) / 2.0 for _ in range(3)]
        for spacing, tol in (((1.0, 1.0), 0.3), ((0.7, 1.3), 0.21), ((0.9, 0.9), 0.0)):
            batched = simplify_loops(loops, spacing, tol)
            for loop, got in zip(loops, batched, strict=True):
                assert np.array_equal(got, _recursive_douglas_peucker(loop, spacing, tol))


def test_volume_polygons_are_the_slice_polygons() -> None:
    rng = np.random.default_rng(17)
    volume = ndimage.binary_opening(rng.random((6, 30, 30)) < 0.6)
    volume[2] = False
    expected = [(z, poly) for z in range(6) for poly in mask_to_polygons(volume[z], (0.8, 0.8))]
    got = volume_to_polygons(volume, (0.8, 0.8))
    assert [z for z, _ in got] == [z for z, _ in expected]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, expected, strict=True))
