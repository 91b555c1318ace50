"""Tests for dicomnode.results.source: series checks, copied modules, DS strings."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dicomnode.results.codes import HEADNECK
from dicomnode.results.source import (
    check_source_images,
    constructor_source,
    copy_patient_study,
    ds_string,
    label_boxes,
    structure_masks,
    write,
)
from tests.results.conftest import CtSeries


def test_geometry_of_reversed_series_steps_backwards(axial: CtSeries,
                                                    reversed_axial: CtSeries) -> None:
    up = check_source_images(axial.images)
    down = check_source_images(reversed_axial.images)
    assert up.slice_spacing == pytest.approx(3.0)
    assert down.slice_spacing == pytest.approx(3.0)
    assert np.allclose(up.origins[::-1], down.origins)


def test_unsorted_or_mixed_series_is_refused(axial: CtSeries) -> None:
    shuffled = [axial.images[1], axial.images[0], *axial.images[2:]]
    with pytest.raises(ValueError, match="not sorted"):
        check_source_images(shuffled)
    other = copy.deepcopy(axial.images[3])
    other.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="'SeriesInstanceUID'"):
        check_source_images([*axial.images[:3], other])
    with pytest.raises(ValueError, match="'source_images'"):
        check_source_images([])


def test_patient_and_study_are_copied(axial: CtSeries) -> None:
    target = Dataset()
    copy_patient_study(axial.images[0], target)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                    "StudyInstanceUID", "StudyDate", "StudyID", "AccessionNumber",
                    "StudyDescription", "ReferringPhysicianName"):
        assert target[keyword].value == axial.images[0][keyword].value


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-9, 123.456789123, -123456.78912345,
                                   1.23456789e15, -9.87654321e-12, 4.0])
def test_ds_strings_fit_sixteen_characters(value: float) -> None:
    text = ds_string(value)
    assert len(text) <= 16
    assert float(text) == pytest.approx(value, abs=1e-4, rel=1e-9)


def test_structure_masks_validate_names_shapes_and_labels(axial: CtSeries) -> None:
    geometry = check_source_images(axial.images)
    with pytest.raises(ValueError, match="'masks' key 'Heart'"):
        structure_masks({"Heart": axial.labels > 0}, HEADNECK, geometry)
    with pytest.raises(ValueError, match="shape"):
        structure_masks(axial.labels[1:], HEADNECK, geometry)
    bad = axial.labels.copy()
    bad[0, 0, 0] = 42
    with pytest.raises(ValueError, match="label value '42'"):
        structure_masks(bad, HEADNECK, geometry)
    with pytest.raises(ValueError, match="dtype"):
        structure_masks(axial.labels.astype(float), HEADNECK, geometry)
    pairs = structure_masks({"BrainStem": axial.labels == 1}, HEADNECK, geometry)
    assert [s.name for s, _ in pairs] == ["BrainStem"]


def test_label_boxes_are_find_objects_boxes() -> None:
    rng = np.random.default_rng(5)
    for trial in range(300):
        shape = tuple(int(n) for n in rng.integers(1, 9, rng.integers(1, 4)))
        labels = np.zeros(shape, np.uint8)
        count = int(rng.integers(0, labels.size + 1))
        labels.flat[rng.integers(0, labels.size, count)] = rng.integers(0, 5, count)
        for dtype in (np.uint8, np.int32):
            assert label_boxes(labels.astype(dtype)) == ndimage.find_objects(
                labels.astype(dtype)), trial
    assert label_boxes(np.zeros((0, 4), np.uint8)) == []


def test_write_gives_the_bytes_pydicom_writes(tmp_path: Path) -> None:
    """The up-front preparation (one VR correction, encoding marks) changes no byte."""
    source = Dataset()
    source.OtherPatientIDsSequence = [Dataset()]
    source.OtherPatientIDsSequence[0].PatientID = "X-1"
    source.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    source.file_meta = FileMetaDataset()
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    source.save_as(tmp_path / "source.dcm", implicit_vr=True, little_endian=True)
    read = pydicom.dcmread(tmp_path / "source.dcm", force=True)  # raw, VR not stored

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jürgen"
    ds.OtherPatientIDsSequence = read.OtherPatientIDsSequence
    ds.PixelRepresentation = 1
    ds.SmallestImagePixelValue = -5  # VR 'US or SS': resolved by PixelRepresentation
    contour = Dataset()
    contour.ContourGeometricType = "CLOSED_PLANAR"
    text = b"1.5\\-2\\3.25 "
    contour[Tag(0x3006, 0x0050)] = RawDataElement(Tag(0x3006, 0x0050), "DS", len(text), text,
                                                  0, False, True)
    roi = Dataset()
    roi.ContourSequence = [contour]
    roi.ROIDisplayColor = [255, 0, 0]
    ds.ROIContourSequence = [roi]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    plain = copy.deepcopy(ds)
    plain.file_meta.MediaStorageSOPClassUID = plain.SOPClassUID
    plain.file_meta.MediaStorageSOPInstanceUID = plain.SOPInstanceUID
    plain.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    write(ds, tmp_path / "fast.dcm")
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "plain.dcm").read_bytes()
    back = pydicom.dcmread(tmp_path / "fast.dcm")
    assert back.ROIContourSequence[0].ContourSequence[0].ContourData == [1.5, -2, 3.25]
    assert back.SmallestImagePixelValue == -5 and str(back.PatientName) == "Müller^Jürgen"
    assert back.OtherPatientIDsSequence[0].PatientID == "X-1"


def _raw_element(keyword: str, vr: str, value: bytes) -> RawDataElement:
    return RawDataElement(Tag(keyword), vr, len(value), value, 0, False, True)


def test_constructor_source_hides_patient_values_and_leaves_the_source_alone(
        axial: CtSeries) -> None:
    source = copy.deepcopy(axial.images[0])
    source.PatientName = "Doe^John\\Roe^Jane"
    del source.PatientSex
    before = copy.deepcopy(source)
    stand_in = constructor_source(source)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                    "ReferringPhysicianName"):
        assert stand_in[keyword].value in ("", None), keyword
    assert "PatientAge" not in stand_in and "StudyDescription" not in stand_in
    assert stand_in.StudyInstanceUID == source.StudyInstanceUID
    assert stand_in.ImagePositionPatient == source.ImagePositionPatient
    assert stand_in.PixelData is source.PixelData  # shared, not copied
    assert source == before


def test_values_pydicom_can_write_are_copied_as_they_came(axial: CtSeries) -> None:
    source = copy.deepcopy(axial.images[0])
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    source.AccessionNumber = "ACC-2025-0001234567"  # longer than SH allows: as sent
    source.PatientSex = "U"                          # not M/F/O: as sent
    source.StudyID = ""
    target = Dataset()
    target.PatientName = "Placeholder^"
    copy_patient_study(source, target)
    assert target.PatientName == source.PatientName
    assert target.PatientName.ideographic == "山田^太郎"
    assert (target.AccessionNumber, target.PatientSex, target.StudyID) == (
        "ACC-2025-0001234567", "U", "")
    assert target.SpecificCharacterSet == "ISO_IR 192"


def test_values_that_cannot_be_read_or_written_are_dropped_with_the_keyword_logged(
        axial: CtSeries, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dicomnode")
    undecodable = copy.deepcopy(axial.images[0])  # bytes that are not UTF-8
    undecodable.SpecificCharacterSet = "ISO_IR 192"
    undecodable[Tag("PatientName")] = _raw_element("PatientName", "PN", b"M\xfcller^J\xfcrgen")
    unencodable = copy.deepcopy(axial.images[0])  # not in Latin-1: pydicom would write "?"
    unencodable.SpecificCharacterSet = "ISO_IR 100"
    unencodable.PatientName = "Yamada^Tarou"
    unencodable.StudyDescription = "肝臓 CT"
    for source, keyword in ((undecodable, "PatientName"), (unencodable, "StudyDescription")):
        caplog.clear()
        target = Dataset()
        target[keyword] = source[keyword]  # as if highdicom had copied it already
        copy_patient_study(source, target)
        if keyword == "PatientName":
            assert "PatientName" in target and target.PatientName == ""  # type 2: empty
        else:
            assert keyword not in target                                # type 3: left out
        assert target.PatientID == source.PatientID
        assert [r.dn_fields for r in caplog.records  # type: ignore[attr-defined]
                if r.getMessage() == "result.source_value_dropped"] == [{"keyword": keyword}]
        assert "ller" not in caplog.text and "肝臓" not in caplog.text
