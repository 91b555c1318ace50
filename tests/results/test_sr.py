"""Tests for dicomnode.results.sr: TID 1500 reports, dciodvfy, measurements read back."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import ABDOMEN, HEADNECK, ICH_FINDINGS
from dicomnode.results.seg import build_seg
from dicomnode.results.source import check_source_images, write
from dicomnode.results.sr import (
    IchResult,
    build_ich_sr,
    build_no_result_sr,
    build_segmentation_sr,
)
from tests.results.conftest import CtSeries, assert_awkward_values_kept, dciodvfy_errors


def _report(sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR
            ) -> hd.sr.MeasurementReport:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _abdomen_labels(series: CtSeries) -> np.ndarray:
    """Liver = the shell; three tumours = the brainstem and parotid ellipsoids."""
    labels = np.zeros_like(series.labels)
    labels[series.labels == 3] = 1
    labels[np.isin(series.labels, [1, 6, 7])] = 2
    return labels


def test_headneck_volumes_reference_segments(any_series: CtSeries, algorithm: AlgorithmInfo,
                                             tmp_path: Path) -> None:
    seg = build_seg(any_series.images, any_series.labels, HEADNECK, algorithm)
    sr = build_segmentation_sr(any_series.images, seg, any_series.labels, HEADNECK, algorithm,
                               series_description="AI OAR volumes")
    path = write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    back = hd.sr.srread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.SeriesDescription == "AI OAR volumes"
    assert back.Manufacturer == "dicomnode"
    assert algorithm.name in " ".join(back.SoftwareVersions)
    assert back.StudyInstanceUID == any_series.images[0].StudyInstanceUID
    assert back.SeriesInstanceUID not in (any_series.images[0].SeriesInstanceUID,
                                          seg.SeriesInstanceUID)
    assert back.PatientID == any_series.images[0].PatientID
    groups = _report(back).get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [s.name for s in HEADNECK]
    voxel = check_source_images(any_series.images).voxel_volume_mm3
    for structure, group in zip(HEADNECK, groups, strict=True):
        assert group.referenced_segment is not None
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSegmentNumber == structure.label
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        expected = (any_series.labels == structure.label).sum() * voxel / 1000
        assert volume.value == pytest.approx(expected, abs=1e-3)


def test_liver_report_lesions_burden_ratio(axial: CtSeries, algorithm: AlgorithmInfo,
                                           tmp_path: Path) -> None:
    labels = _abdomen_labels(axial)
    seg = build_seg(axial.images, labels, ABDOMEN, algorithm)
    sr = build_segmentation_sr(axial.images, seg, labels, ABDOMEN, algorithm)
    path = write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    groups = _report(hd.sr.srread(path)).get_volumetric_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    assert set(by_id) == {"Liver", "Lesion_Liver", "Lesion 1", "Lesion 2", "Lesion 3"}
    tumour = by_id["Lesion_Liver"]
    assert tumour.get_measurements(name=codes.SCT.NumberOfLesions)[0].value == 3
    voxel = check_source_images(axial.images).voxel_volume_mm3
    burden = (labels == 2).sum() * voxel / 1000
    whole = (labels > 0).sum() * voxel / 1000
    values = {m.name.meaning: m.value for m in tumour.get_measurements()}
    assert values["Total tumor volume"] == pytest.approx(burden, abs=1e-3)
    assert values["Tumor to liver volume ratio"] == pytest.approx(100 * burden / whole, abs=1e-3)
    # Lesion 1 is the brainstem ellipsoid: radii 14 x 11 mm in plane, so 28 mm across.
    diameter = by_id["Lesion 1"].get_measurements(name=codes.SCT.LongAxis)[0].value
    assert diameter == pytest.approx(28.0, abs=2.0)
    lesion_volumes = [by_id[f"Lesion {i}"].get_measurements(name=codes.SCT.Volume)[0].value
                      for i in (1, 2, 3)]
    assert sum(lesion_volumes) == pytest.approx(burden, abs=1e-2)


def test_ich_report(axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    results = [IchResult("any", 0.91, True, (10, 11, 12)),
               IchResult("epidural", 0.02, False),
               IchResult("intraparenchymal", 0.07, False),
               IchResult("intraventricular", 0.04, False),
               IchResult("subarachnoid", 0.12, False),
               IchResult("subdural", 0.88, True, (11, 12), (0.81, 0.88))]
    sr = build_ich_sr(axial.images, results, algorithm)
    path = write(sr, tmp_path / "ich.dcm")
    assert dciodvfy_errors(path) == []
    findings = {f.key: f.code for f in ICH_FINDINGS}
    groups = _report(hd.sr.srread(path)).get_image_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    assert list(by_id) == [r.key for r in results]
    for result in results:
        group = by_id[result.key]
        assert group.finding_type == findings[result.key]
        probability = group.get_measurements(name=codes.DCM.Probability)[0]
        assert probability.value == pytest.approx(result.probability)
        decision = group.get_qualitative_evaluations()[0].value
        assert decision == (codes.SCT.Present if result.present else codes.SCT.Absent)
    subdural = by_id["subdural"]
    refs = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in subdural[0].ContentSequence if item.ValueType == "IMAGE"]
    assert refs == [axial.images[i].SOPInstanceUID for i in (11, 12)]
    # each flagged slice's own probability, referencing that slice
    per_slice = subdural.get_measurements(name=codes.DCM.Probability)[1:]
    assert [m.value for m in per_slice] == pytest.approx([0.81, 0.88])
    assert [m.referenced_images[0].referenced_sop_instance_uid for m in per_slice] == [
        axial.images[i].SOPInstanceUID for i in (11, 12)]


def test_ich_results_are_validated(axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="'key'"):
        IchResult("stroke", 0.5, True)
    with pytest.raises(ValueError, match="'probability'"):
        IchResult("any", 1.5, True)
    with pytest.raises(ValueError, match="'slice_probabilities'"):
        IchResult("any", 0.9, True, (1, 2), (0.9,))
    with pytest.raises(ValueError, match="'slice_indices'"):
        build_ich_sr(axial.images, [IchResult("any", 0.9, True, (999,))], algorithm)
    with pytest.raises(ValueError, match="repeated"):
        build_ich_sr(axial.images, [IchResult("any", 0.9, True), IchResult("any", 0.9, True)],
                     algorithm)


def test_no_result_report_is_readable_text_with_its_evidence(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    sr = build_no_result_sr(axial.images, "AI liver", "no liver found: segmented liver 3 ml",
                            algorithm, series_description="AI liver no result")
    path = write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    back = hd.sr.srread(path)
    assert back.SeriesDescription == "AI liver no result"
    assert back.ConceptNameCodeSequence[0].CodeValue == "18748-4"  # diagnostic imaging report
    findings = [item for item in back.ContentSequence if item.ValueType == "CONTAINER"]
    assert [f.ConceptNameCodeSequence[0].CodeValue for f in findings] == ["121070"]
    (text,) = [item.TextValue for item in findings[0].ContentSequence]
    assert text.startswith("AI liver: no result. No liver found: segmented liver 3 ml.")
    assert algorithm.describe() in text and f"({len(axial.images)} images)" in text
    evidence = {ref.ReferencedSOPInstanceUID
                for study in back.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert evidence == {im.SOPInstanceUID for im in axial.images}
    assert back.PatientName == axial.images[0].PatientName
    with pytest.raises(ValueError, match="'reason'"):
        build_no_result_sr(axial.images, "AI liver", " ", algorithm)


def test_ich_and_no_result_reports_carry_a_multi_valued_patient_name_as_sent(
        awkward: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    ich = build_ich_sr(awkward.images, [IchResult("any", 0.9, True, (3,))], algorithm)
    none = build_no_result_sr(awkward.images, "AI liver", "No liver was found.", algorithm)
    for name, sr in (("ich", ich), ("none", none)):
        assert_awkward_values_kept(pydicom.dcmread(write(sr, tmp_path / f"{name}.dcm")))


def test_organs_looked_for_and_not_found_are_reported_absent(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    found = [s for s in HEADNECK if s.name != "Parotid_L"]
    labels = np.where(axial.labels == 6, 0, axial.labels)
    seg = build_seg(axial.images, labels, found, algorithm)
    sr = build_segmentation_sr(axial.images, seg, labels, found, algorithm,
                               absent=[s for s in HEADNECK if s.name == "Parotid_L"])
    path = write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    report = _report(hd.sr.srread(path))
    assert [g.tracking_identifier for g in report.get_volumetric_roi_measurement_groups()
            ] == [s.name for s in found]
    absent = report.get_planar_roi_measurement_groups() + list(
        report.get_image_measurement_groups())
    assert [g.tracking_identifier for g in absent] == ["Parotid_L not found"]
    evaluation = next(e for e in absent[0].get_qualitative_evaluations()
                      if e.name.value == codes.SCT.ParotidGland.value)
    assert (evaluation.value.value, evaluation.value.meaning) == (codes.SCT.Absent.value,
                                                                  "Absent")
