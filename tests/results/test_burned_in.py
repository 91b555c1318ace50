"""Tests for dicomnode.results.burned_in: the burned-in Secondary Capture series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.burned_in import build_burned_in_series
from dicomnode.results.codes import HEADNECK
from dicomnode.results.source import write
from tests.results.conftest import CtSeries, assert_awkward_values_kept, dciodvfy_errors


def test_every_slice_with_a_structure_becomes_a_derived_image_marked_not_for_diagnosis(
        oblique: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    images = build_burned_in_series(oblique.images, oblique.labels, HEADNECK, algorithm,
                                    series_description="AI OAR overlay, not for diagnosis")
    with_structure = [z for z in range(len(oblique.images)) if oblique.labels[z].any()]
    assert len(images) == len(with_structure) > 0
    assert len({im.SeriesInstanceUID for im in images}) == 1
    assert [int(im.InstanceNumber) for im in images] == list(range(1, len(images) + 1))
    for z, sc in zip(with_structure, images, strict=True):
        source = oblique.images[z]
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert [float(v) for v in sc.ImagePositionPatient] == pytest.approx(
            [float(v) for v in source.ImagePositionPatient], abs=1e-3)
    middle = images[len(images) // 2]
    path = write(middle, tmp_path / "sc.dcm")
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image
    assert list(back.ImageType) == ["DERIVED", "SECONDARY"]
    assert back.BurnedInAnnotation == "YES"
    assert back.SeriesDescription == "AI OAR overlay, not for diagnosis"
    assert "not for diagnosis" in back.DerivationDescription
    assert back.PatientID == oblique.images[0].PatientID
    assert back.StudyInstanceUID == oblique.images[0].StudyInstanceUID
    assert back.FrameOfReferenceUID == oblique.images[0].FrameOfReferenceUID
    assert back.pixel_array.shape == (96, 96, 3)


def test_outlines_are_in_each_structures_colour_on_its_boundary(
        axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    images = build_burned_in_series(axial.images, axial.labels, HEADNECK, algorithm)
    with_structure = [z for z in range(len(axial.images)) if axial.labels[z].any()]
    for z, sc in zip(with_structure, images, strict=True):
        rgb = sc.pixel_array
        for structure in HEADNECK:
            mask = axial.labels[z] == structure.label
            if not mask.any():
                continue
            coloured = (rgb == np.array(structure.color, np.uint8)).all(axis=-1)
            assert (coloured & mask).any(), structure.name
        grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
        assert grey.mean() > 0.5  # the CT itself stays grey


def test_a_label_map_without_any_structure_is_refused(
        axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="nothing to burn in"):
        build_burned_in_series(axial.images, np.zeros_like(axial.labels), HEADNECK, algorithm)


def test_a_multi_valued_patient_name_is_carried_as_sent(
        awkward: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    labels = awkward.labels[:2].copy()
    labels[:, 10:20, 10:20] = HEADNECK[0].label
    images = build_burned_in_series(awkward.images[:2], labels, HEADNECK, algorithm)
    for i, sc in enumerate(images):
        assert_awkward_values_kept(pydicom.dcmread(write(sc, tmp_path / f"sc{i}.dcm")))


def test_pixels_given_in_hu_must_match_the_slices(
        axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="'hu' shape"):
        build_burned_in_series(axial.images, axial.labels, HEADNECK, algorithm,
                               hu=np.zeros((1, 2, 3), np.float32))
