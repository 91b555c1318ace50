"""Tests for dicomnode.results.preview: the PNG montage and the slice drawing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.results.codes import HEADNECK
from dicomnode.results.preview import choose_slices, render_montage
from dicomnode.results.source import check_source_images, structure_masks
from tests.results.conftest import CtSeries


def test_montage_is_a_png_with_structure_colours(axial: CtSeries, tmp_path: Path) -> None:
    data = render_montage(axial.images, axial.labels, HEADNECK, tiles=8, columns=4,
                          tile_size=128, path=tmp_path / "montage.png")
    assert (tmp_path / "montage.png").read_bytes() == data
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.size == (4 * 128, 2 * 128)
    pixels = np.asarray(image).reshape(-1, 3)
    brainstem = np.array(HEADNECK[0].color)
    assert (np.abs(pixels.astype(int) - brainstem).sum(axis=1) < 30).any()


def test_chosen_slices_have_tissue(axial: CtSeries) -> None:
    pairs = structure_masks(axial.labels, HEADNECK, check_source_images(axial.images))
    chosen = choose_slices(pairs, 5)
    assert 1 <= len(chosen) <= 5
    assert all(axial.labels[z].any() for z in chosen)
    with pytest.raises(ValueError, match="'count'"):
        choose_slices(pairs, 0)
