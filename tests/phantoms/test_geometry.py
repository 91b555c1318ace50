"""Tests for dicomnode.phantoms.geometry."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.phantoms.geometry import Grid, Pose, rotation_matrix


def test_grid_axes_and_index_range() -> None:
    grid = Grid((4, 3, 2), (2.5, 1.0, 0.5), (-1.0, -2.0, 10.0))
    np.testing.assert_allclose(grid.axis("x"), [-1.0, -0.5])
    np.testing.assert_allclose(grid.axis("y"), [-2.0, -1.0, 0.0])
    np.testing.assert_allclose(grid.axis("z"), [10.0, 12.5, 15.0, 17.5])
    assert grid.index_range("z", 12.0, 16.0) == slice(1, 3)
    with pytest.raises(ValueError, match="name"):
        grid.axis("w")


def test_rotation_is_orthonormal() -> None:
    r = rotation_matrix(3.0, -2.0, 4.0)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_pose_maps_anatomical_coordinates_back_and_forth() -> None:
    pose = Pose.random(np.random.default_rng(3))
    x = np.array([-10.0, 0.0, 25.0])
    y = np.array([5.0, 7.0])
    z = np.array([100.0, 102.5])
    ax, ay, az = pose.anatomical_coords(x, y, z)
    world = pose.to_world(np.stack([ax, ay, az], axis=-1).astype(np.float64))
    np.testing.assert_allclose(world[1, 0, 2], [x[2], y[0], z[1]], atol=1e-3)
    lo, hi = pose.world_bounds(np.array([-1.0, -1, -1]), np.array([1.0, 1, 1]))
    assert np.all(lo < pose.shift) and np.all(hi > pose.shift)
