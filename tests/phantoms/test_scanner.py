"""Tests for dicomnode.phantoms.scanner."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.phantoms import scanner
from dicomnode.phantoms.canvas import Canvas
from dicomnode.phantoms.geometry import Grid, Pose
from dicomnode.phantoms.shapes import Blob


def _uniform_canvas(hu: float = 40.0, texture: float = 0.0) -> Canvas:
    c = Canvas(Grid((12, 96, 96), (2.0, 0.8, 0.8), (-38.0, -38.0, 0.0)), Pose.identity())
    t = c.tissue("water", hu, texture)
    c.tissue_map[:] = t
    return c


@pytest.mark.parametrize("sd", [5.0, 20.0])
def test_noise_level_matches_the_request(sd: float) -> None:
    hu = scanner.render(_uniform_canvas(), sd, np.random.default_rng(0))
    inner = hu[2:-2, 8:-8, 8:-8].astype(float)
    assert abs(inner.mean() - 40.0) < 0.5
    assert inner.std() == pytest.approx(sd, rel=0.12)


def test_noise_is_correlated_between_neighbouring_pixels() -> None:
    hu = scanner.render(_uniform_canvas(), 20.0, np.random.default_rng(1)).astype(float)
    a = hu[:, :, :-1].ravel() - hu.mean()
    b = hu[:, :, 1:].ravel() - hu.mean()
    corr = float((a * b).mean() / hu.var())
    assert 0.1 < corr < 0.8


def test_partial_volume_blurs_an_edge_and_values_are_clipped() -> None:
    c = _uniform_canvas(-1100.0)
    bone = c.tissue("bone", 3500.0)
    c.paint(Blob((0, 0, 12), (20, 20, 30)), bone)
    hu = scanner.render(c, 0.0, np.random.default_rng(0))
    assert hu.dtype == np.int16
    assert hu.max() == scanner.HU_MAX and hu.min() == scanner.HU_MIN
    row = hu[6, 48, :]
    assert ((row > -1000) & (row < 3000)).any()  # intermediate values at the edge


def test_texture_depends_on_the_tissue() -> None:
    smooth = scanner.render(_uniform_canvas(texture=0.0), 0.0, np.random.default_rng(0))
    rough = scanner.render(_uniform_canvas(texture=15.0), 0.0, np.random.default_rng(0))
    assert smooth.std() < 0.6
    assert rough.std() > 5.0


def test_negative_noise_is_rejected() -> None:
    with pytest.raises(ValueError, match="noise"):
        scanner.render(_uniform_canvas(), -1.0, np.random.default_rng(0))
