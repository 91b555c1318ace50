"""Tests for dicomnode.phantoms.shapes."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.phantoms.shapes import (
    Blob,
    Box,
    Difference,
    HalfSpace,
    Intersection,
    Outline,
    Tube,
    Union,
    WaveNoise,
    random_harmonics,
    smooth_curve,
)


def _pts(*rows: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.array(rows, dtype=np.float32)
    return a[:, 0], a[:, 1], a[:, 2]


def test_blob_depth_is_distance_inside_a_sphere() -> None:
    blob = Blob((10, 0, 0), (20, 20, 20))
    d = blob.depth(*_pts((10, 0, 0.5), (25, 0, 0), (10, 0, 30)))
    assert d[0] == pytest.approx(19.5, abs=0.1)
    assert d[1] == pytest.approx(5.0, abs=0.1)
    assert d[2] == pytest.approx(-10.0, abs=0.1)


def test_blob_with_harmonics_stays_within_bounds() -> None:
    rng = np.random.default_rng(0)
    blob = Blob((0, 0, 0), (30, 20, 10), (20, 10, 5), random_harmonics(rng, 4, 0.1))
    lo, hi = blob.bounds()
    g = np.mgrid[-60:60:2.0, -60:60:2.0, -60:60:2.0].astype(np.float32)
    inside = blob.depth(g[0], g[1], g[2]) > 0
    assert inside.any()
    for axis in range(3):
        coords = g[axis][inside]
        assert coords.min() >= lo[axis] - 2 and coords.max() <= hi[axis] + 2


def test_blob_rejects_non_positive_radii() -> None:
    with pytest.raises(ValueError, match="radii"):
        Blob((0, 0, 0), (1, 0, 1))


def test_tube_depth_is_radius_minus_distance() -> None:
    tube = Tube(np.array([(0, 0, 0), (0, 0, 100)]), (5, 15))
    d = tube.depth(*_pts((3, 0, 0), (0, 0, 50), (30, 0, 50), (0, 0, 110)))
    assert d[0] == pytest.approx(2.0, abs=1e-4)
    assert d[1] == pytest.approx(10.0, abs=1e-4)
    assert d[2] == pytest.approx(-20.0, abs=1e-4)
    assert d[3] == pytest.approx(5.0, abs=1e-4)  # rounded end cap of radius 15


def test_tube_on_a_grid_matches_pointwise_evaluation() -> None:
    curve = smooth_curve([(0, 0, 0), (20, 10, 30), (0, 30, 60), (-20, 10, 90)], 6)
    tube = Tube(curve, (4, 8, 6, 3), (1, 1, 2))
    g = np.mgrid[-40:40:1.5, -20:50:1.5, -10:100:2.0].astype(np.float32)
    grid = tube.depth(g[0], g[1], g[2])
    flat = tube.depth(g[0].ravel(), g[1].ravel(), g[2].ravel()).reshape(grid.shape)
    inside = flat > 0
    assert inside.any()
    np.testing.assert_array_equal(grid > 0, inside)


def test_outline_follows_its_keyframes() -> None:
    outline = Outline([(0, 0, 0, 100, 50), (100, 0, 0, 50, 50)])
    d = outline.depth(*_pts((90, 0, 0), (0, 45, 0), (0, 0, 50), (80, 0, 50), (0, 0, 150)))
    assert d[0] == pytest.approx(10.0, abs=0.1)
    assert d[1] == pytest.approx(5.0, abs=0.1)
    assert d[2] > 70
    assert d[3] < 0
    assert d[4] < -1e6  # outside the keyframe range


def test_outline_harmonics_change_the_radius_by_angle() -> None:
    outline = Outline([(0, 0, 0, 100, 100, 0, 0.2), (10, 0, 0, 100, 100, 0, 0.2)])
    d = outline.depth(*_pts((0, 115, 5), (0, -85, 5)))
    assert d[0] == pytest.approx(5.0, abs=0.2)  # +y radius 120
    assert d[1] == pytest.approx(-5.0, abs=0.2)  # -y radius 80


def test_boolean_combinations() -> None:
    a = Blob((0, 0, 0), (10, 10, 10))
    b = Blob((10, 0, 0), (10, 10, 10))
    x, y, z = _pts((-5, 0, 0), (5, 0, 0), (15, 0, 0))
    assert list(Union([a, b]).depth(x, y, z) > 0) == [True, True, True]
    assert list(Intersection([a, b]).depth(x, y, z) > 0) == [False, True, False]
    assert list(Difference(a, b).depth(x, y, z) > 0) == [True, False, False]
    half = Intersection([a, HalfSpace((1, 0, 0), 0.0)])
    assert list(half.depth(x, y, z) > 0) == [True, False, False]
    assert list(Box((-6, -1, -1), (6, 1, 1)).depth(x, y, z) > 0) == [True, True, False]


def test_wave_noise_is_smooth_and_unit_variance() -> None:
    noise = WaveNoise(np.random.default_rng(1), 20.0, 16)
    g = np.mgrid[0:400:2.0, 0:400:2.0, 0:2:2.0].astype(np.float32)
    field = noise(g[0], g[1], g[2])
    assert abs(float(field.mean())) < 0.15
    assert 0.7 < float(field.std()) < 1.3
    assert float(np.abs(np.diff(field, axis=0)).mean()) < 0.5  # neighbours 2 mm apart agree


def test_wave_noise_rejects_bad_wavelength() -> None:
    with pytest.raises(ValueError, match="wavelength"):
        WaveNoise(np.random.default_rng(0), 0.0)
