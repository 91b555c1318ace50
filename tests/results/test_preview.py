"""Tests for dicomnode.results.preview: PNG montage and burned-in Secondary Capture."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import HEADNECK
from dicomnode.results.preview import build_secondary_capture, choose_slices, render_montage
from dicomnode.results.source import check_source_images, structure_masks, write
from tests.results.conftest import CtSeries, assert_awkward_values_kept, dciodvfy_errors


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


def test_secondary_capture_series(oblique: CtSeries, algorithm: AlgorithmInfo,
                                  tmp_path: Path) -> None:
    images = build_secondary_capture(oblique.images, oblique.labels, HEADNECK, algorithm)
    assert len(images) == len(oblique.images)
    assert len({im.SeriesInstanceUID for im in images}) == 1
    middle = images[len(images) // 2]
    path = write(middle, tmp_path / "sc.dcm")
    assert dciodvfy_errors(path) == []
    assert middle.BurnedInAnnotation == "YES"
    assert middle.PatientID == oblique.images[0].PatientID
    assert middle.StudyInstanceUID == oblique.images[0].StudyInstanceUID
    assert middle.pixel_array.shape == (96, 96, 3)


def test_secondary_capture_carries_a_multi_valued_patient_name_as_sent(
        awkward: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    images = build_secondary_capture(awkward.images[:2], awkward.labels[:2], HEADNECK,
                                     algorithm)
    for i, sc in enumerate(images):
        assert_awkward_values_kept(pydicom.dcmread(write(sc, tmp_path / f"sc{i}.dcm")))
