"""Tests for dicomnode.phantoms.canvas."""

from __future__ import annotations

import numpy as np

from dicomnode.phantoms.canvas import Canvas
from dicomnode.phantoms.geometry import Grid, Pose
from dicomnode.phantoms.shapes import Blob


def _canvas() -> Canvas:
    return Canvas(Grid((40, 64, 64), (1.0, 1.0, 1.0), (-31.5, -31.5, -19.5)), Pose.identity())


def test_paint_fills_the_shape_and_sets_labels() -> None:
    c = _canvas()
    soft = c.tissue("soft", 40, 5)
    assert c.tissue("soft", 99) == soft  # registered once
    painted = c.paint(Blob((0, 0, 0), (10, 10, 10)), soft, 3)
    assert painted is not None
    n = int((c.tissue_map == soft).sum())
    assert abs(n - 4 / 3 * np.pi * 1000) / (4 / 3 * np.pi * 1000) < 0.05
    np.testing.assert_array_equal(c.labels == 3, c.tissue_map == soft)


def test_within_and_where_restrict_painting() -> None:
    c = _canvas()
    a = c.tissue("a", 0)
    b = c.tissue("b", 100)
    c.paint(Blob((0, 0, 0), (10, 10, 10)), a)
    c.paint(Blob((8, 0, 0), (10, 10, 10)), b, within=[a], where=lambda x, y, z: z > 0)
    assert (c.tissue_map == b).any()
    zs = np.nonzero(c.tissue_map == b)[0]
    assert (c.grid.axis("z")[zs] > 0).all()
    # b never leaks outside the first blob
    first = Blob((0, 0, 0), (10, 10, 10))
    g = np.meshgrid(c.grid.axis("z"), c.grid.axis("y"), c.grid.axis("x"), indexing="ij")
    inside = first.depth(g[2].astype(np.float32), g[1].astype(np.float32),
                         g[0].astype(np.float32)) > 0
    assert not ((c.tissue_map == b) & ~inside).any()


def test_paint_layers_makes_nested_shells() -> None:
    c = _canvas()
    outer, inner = c.tissue("outer", 1000), c.tissue("inner", 300)
    c.paint_layers(Blob((0, 0, 0), (15, 15, 15)), [(0, outer, 1), (3, inner, None)])
    centre = c.tissue_map[19, 31, 31]
    assert centre == inner
    assert c.labels[19, 31, 31] == 1
    assert c.tissue_map[19, 31, 31 + 14] == outer


def test_shape_outside_the_volume_is_ignored() -> None:
    c = _canvas()
    assert c.paint(Blob((500, 0, 0), (5, 5, 5)), c.tissue("x", 1)) is None
