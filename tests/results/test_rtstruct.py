"""Tests for dicomnode.results.rtstruct: dciodvfy, plastimatch round trip, references."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 - the usual alias

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import HEADNECK
from dicomnode.results.encode import series_reference_image
from dicomnode.results.rtstruct import build_rtstruct
from dicomnode.results.source import check_source_images, write
from tests.results.conftest import PLASTIMATCH, CtSeries, dciodvfy_errors, dice


def _write_rtstruct(series: CtSeries, algorithm: AlgorithmInfo, path: Path) -> Path:
    ds = build_rtstruct(series.images, series.labels, HEADNECK, algorithm,
                        series_description="AI OAR contours")
    return write(ds, path)


def test_dciodvfy_reports_no_errors(any_series: CtSeries, algorithm: AlgorithmInfo,
                                    tmp_path: Path) -> None:
    path = _write_rtstruct(any_series, algorithm, tmp_path / "rtss.dcm")
    assert dciodvfy_errors(path) == []


def test_plastimatch_rasterises_back_to_the_masks(any_series: CtSeries,
                                                  algorithm: AlgorithmInfo,
                                                  tmp_path: Path) -> None:
    """Round trip through plastimatch; --xor-contours applies DICOM's hole semantics
    (an inner contour of the same ROI is a hole), which plastimatch does not by default."""
    assert PLASTIMATCH, "plastimatch is required for this test"
    rtss = _write_rtstruct(any_series, algorithm, tmp_path / "rtss.dcm")
    out = tmp_path / "pm"
    subprocess.run([PLASTIMATCH, "convert", "--input", str(rtss), "--referenced-ct",
                    str(any_series.directory), "--output-prefix", str(out),
                    "--prefix-format", "nrrd", "--xor-contours"],
                   check=True, capture_output=True)
    geometry = check_source_images(any_series.images)
    reference = series_reference_image(geometry)
    checked = []
    for structure in HEADNECK:
        truth = any_series.labels == structure.label
        volume_cm3 = truth.sum() * geometry.voxel_volume_mm3 / 1000
        if volume_cm3 <= 1.0:
            continue
        image = sitk.ReadImage(str(out / f"{structure.name}.nrrd"))
        back = sitk.GetArrayFromImage(sitk.Resample(
            image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)).astype(bool)
        score = dice(back, truth)
        assert score >= 0.95, (structure.name, score)
        checked.append(structure.name)
    assert "Bone_Mandible" in checked  # the structure with a hole on every slice


def test_contours_reference_slices_and_frame(axial: CtSeries, algorithm: AlgorithmInfo,
                                            tmp_path: Path) -> None:
    ds = pydicom.dcmread(_write_rtstruct(axial, algorithm, tmp_path / "rtss.dcm"))
    source = {im.SOPInstanceUID: im for im in axial.images}
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == axial.images[0].FrameOfReferenceUID
    series_ref = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == axial.images[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series_ref.ContourImageSequence} == set(source)
    assert ds.PatientID == axial.images[0].PatientID
    assert ds.StudyInstanceUID == axial.images[0].StudyInstanceUID
    assert ds.SeriesInstanceUID != axial.images[0].SeriesInstanceUID
    assert ds.SeriesDescription == "AI OAR contours"
    assert [r.ROIName for r in ds.StructureSetROISequence] == [s.name for s in HEADNECK]
    counts = {}
    for roi, item in zip(ds.StructureSetROISequence, ds.ROIContourSequence, strict=True):
        counts[roi.ROIName] = 0
        for contour in item.get("ContourSequence", []):
            counts[roi.ROIName] += 1
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert contour.NumberOfContourPoints >= 3
            points = np.array(contour.ContourData, float).reshape(-1, 3)
            assert len(points) == contour.NumberOfContourPoints
            image = source[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            # Every point lies in the plane of the slice it references.
            assert np.allclose(points[:, 2], float(image.ImagePositionPatient[2]))
    assert counts["OpticNrv_L"] == 0 and counts["Bone_Mandible"] > 0


def test_ds_values_fit_sixteen_characters(oblique: CtSeries, algorithm: AlgorithmInfo,
                                          tmp_path: Path) -> None:
    path = _write_rtstruct(oblique, algorithm, tmp_path / "rtss.dcm")
    raw = pydicom.dcmread(path)
    for item in raw.ROIContourSequence:
        for contour in item.get("ContourSequence", []):
            element = contour["ContourData"]
            assert all(len(str(v)) <= 16 for v in element.value)


def test_invalid_label(axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="'structure_set_label'"):
        build_rtstruct(axial.images, axial.labels, HEADNECK, algorithm,
                       structure_set_label="X" * 17)
