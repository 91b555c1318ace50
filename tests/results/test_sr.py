"""Tests for dicomnode.results.sr: TID 1500 reports a viewer can draw, checked with dcmtk."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicomnode.imaging.series import load_series
from dicomnode.nn.runtime import Segmentation
from dicomnode.pipelines.liver_tumor import LiverTumorPipeline
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import ABDOMEN, HEADNECK, ICH_FINDINGS
from dicomnode.results.contours import fill_polygons
from dicomnode.results.measure import LiverMeasurements, measure_liver
from dicomnode.results.seg import build_seg
from dicomnode.results.source import check_source_images, write
from dicomnode.results.sr import (
    IchResult,
    build_ich_sr,
    build_no_result_sr,
    build_segmentation_sr,
    tracked_name,
)
from tests.results.conftest import CtSeries, assert_awkward_values_kept, dciodvfy_errors

DSR2HTML = shutil.which("dsr2html")


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


def _groups(sr: Dataset) -> list[Dataset]:
    """The measurement groups of a TID 1500 report, as written (pydicom items)."""
    (container,) = [item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return [g for g in container.ContentSequence
            if g.ConceptNameCodeSequence[0].CodeValue == "125007"]


def _drawn(group: Dataset) -> tuple[Dataset, str]:
    """The group's one SCOORD (at the group's top level, as OHIF reads it) and its image."""
    (scoord,) = [item for item in group.ContentSequence if item.ValueType == "SCOORD"]
    (image,) = scoord.ContentSequence
    assert image.ValueType == "IMAGE" and image.RelationshipType == "SELECTED FROM"
    return scoord, str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _tracking(group: Dataset) -> tuple[str, str]:
    text = next(i.TextValue for i in group.ContentSequence
                if i.ConceptNameCodeSequence[0].CodeValue == "112039")
    uid = next(i.UID for i in group.ContentSequence
               if i.ConceptNameCodeSequence[0].CodeValue == "112040")
    return tracked_name(str(text)), str(uid)


def _rows_cols(scoord: Dataset) -> np.ndarray:
    """SCOORD (column, row) image coordinates back to (row, column) pixel indices."""
    return np.asarray(scoord.GraphicData, float).reshape(-1, 2)[:, ::-1] - 0.5


def assert_every_group_is_drawn_on_the_source_series(sr: Dataset,
                                                     images: list[Dataset]) -> None:
    """What OHIF needs of every group, and of the image library it loads them from."""
    uids = {str(im.SOPInstanceUID) for im in images}
    drawn = set()
    for group in _groups(sr):
        scoord, uid = _drawn(group)
        assert scoord.GraphicType in ("POLYLINE", "POINT")
        assert uid in uids
        drawn.add(uid)
    (library,) = [item for item in sr.ContentSequence
                  if item.ConceptNameCodeSequence[0].CodeValue == "111028"]
    (library_group,) = library.ContentSequence
    listed = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
              for i in library_group.ContentSequence}
    assert listed == drawn


def dsr2html_text(path: Path) -> str:
    """dcmtk's dsr2html rendering of an SR, as plain text (exit status 0 asserted)."""
    assert DSR2HTML, "dsr2html (dcmtk) is required for these tests"
    proc = subprocess.run([DSR2HTML, str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return re.sub(r"<[^>]+>", " ", proc.stdout)


def test_headneck_volumes_are_drawn_on_their_largest_section(
        any_series: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
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
    assert_every_group_is_drawn_on_the_source_series(back, any_series.images)
    present = [s for s in HEADNECK if (any_series.labels == s.label).any()]
    groups = _report(back).get_planar_roi_measurement_groups()
    assert [tracked_name(g.tracking_identifier) for g in groups] == [s.name for s in present]
    geometry = check_source_images(any_series.images)
    index = {str(im.SOPInstanceUID): k for k, im in enumerate(any_series.images)}
    for structure, group, raw in zip(present, groups, _groups(back), strict=True):
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        expected = (any_series.labels == structure.label).sum() * geometry.voxel_volume_mm3
        assert volume.value == pytest.approx(expected / 1000, abs=1e-3)
        # the volume names the SEG segment it was computed from
        (source,) = [i for i in volume[0].ContentSequence if i.ValueType == "IMAGE"]
        ref = source.ReferencedSOPSequence[0]
        assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSegmentNumber) == (
            seg.SOPInstanceUID, structure.label)
        # the outline lies inside the organ on the slice of its largest section (its
        # outer boundary: a hole, such as the mandible's, is inside the outline)
        scoord, uid = _drawn(raw)
        assert scoord.GraphicType == "POLYLINE"
        points = _rows_cols(scoord)
        assert np.allclose(points[0], points[-1])  # closed
        mask = any_series.labels == structure.label
        z = index[uid]
        assert mask[z].sum() == mask.sum(axis=(1, 2)).max()
        inside = fill_polygons([points[:-1]], mask[z].shape)
        assert inside.any() and not (inside & ~ndimage.binary_fill_holes(mask[z])).any()
        assert (inside & mask[z]).sum() >= 0.5 * mask[z].sum()


def test_organs_looked_for_and_not_found_are_listed_absent_outside_the_groups(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    """An absent organ has nothing to draw: a group without a region breaks OHIF."""
    found = [s for s in HEADNECK if s.name != "Parotid_L"]
    labels = np.where(axial.labels == 6, 0, axial.labels)
    seg = build_seg(axial.images, labels, found, algorithm)
    sr = build_segmentation_sr(axial.images, seg, labels, found, algorithm,
                               absent=[s for s in HEADNECK if s.name == "Parotid_L"])
    path = write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    back = hd.sr.srread(path)
    assert_every_group_is_drawn_on_the_source_series(back, axial.images)
    names = [_tracking(g)[0] for g in _groups(back)]
    assert names == [s.name for s in found if (labels == s.label).any()]
    (evaluations,) = [item for item in back.ContentSequence
                      if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    listed = {(item.ConceptNameCodeSequence[0].CodeMeaning,
               item.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning
               if "ContentSequence" in item else None,
               item.ConceptCodeSequence[0].CodeValue)
              for item in evaluations.ContentSequence}
    absent = {s for s in HEADNECK if not (labels == s.label).any()}
    assert ("Parotid gland", "Left", codes.SCT.Absent.value) in listed
    assert len(listed) == len(absent)
    text = dsr2html_text(path)
    assert "Qualitative Evaluations" in text and "Absent" in text


def _lesions(series: CtSeries, labels: np.ndarray) -> LiverMeasurements:
    geometry = check_source_images(series.images)
    return measure_liver(labels == 1, labels == 2, geometry)


def test_liver_report_lesions_burden_ratio(axial: CtSeries, algorithm: AlgorithmInfo,
                                           tmp_path: Path) -> None:
    labels = _abdomen_labels(axial)
    seg = build_seg(axial.images, labels, ABDOMEN, algorithm)
    sr = build_segmentation_sr(axial.images, seg, labels, ABDOMEN, algorithm)
    path = write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    back = hd.sr.srread(path)
    assert_every_group_is_drawn_on_the_source_series(back, axial.images)
    groups = _report(back).get_planar_roi_measurement_groups()
    by_id = {tracked_name(g.tracking_identifier): g for g in groups}
    assert list(by_id) == ["Liver", "Lesion_Liver", "Lesion 1", "Lesion 2", "Lesion 3"]
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
    text = dsr2html_text(path)
    for name in ("Volume", "Long axis", "Number of lesions", "Total tumor volume",
                 "Tumor to liver volume ratio", "Lesion 1", "Liver"):
        assert f"{name}" in text, name


def test_each_lesion_diameter_is_drawn_as_the_line_that_was_measured(
        any_series: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    labels = _abdomen_labels(any_series)
    seg = build_seg(any_series.images, labels, ABDOMEN, algorithm)
    path = write(build_segmentation_sr(any_series.images, seg, labels, ABDOMEN, algorithm),
                 tmp_path / "sr.dcm")
    back = pydicom.dcmread(path)
    images = {str(im.SOPInstanceUID): (k, im) for k, im in enumerate(any_series.images)}
    stats = _lesions(any_series, labels)
    lesion_groups = [g for g in _groups(back) if _tracking(g)[0].startswith("Lesion ")]
    assert len(lesion_groups) == len(stats.lesions) == 3
    for lesion, group in zip(stats.lesions, lesion_groups, strict=True):
        assert _tracking(group)[0] == f"Lesion {lesion.number}"
        scoord, uid = _drawn(group)
        assert scoord.GraphicType == "POLYLINE" and len(scoord.GraphicData) == 4
        z, image = images[uid]
        assert lesion.diameter is not None and z == lesion.diameter.slice_index
        (x0, y0), (x1, y1) = np.asarray(scoord.GraphicData, float).reshape(2, 2)
        row_mm, col_mm = (float(v) for v in image.PixelSpacing)
        length = float(np.hypot((x1 - x0) * col_mm, (y1 - y0) * row_mm))
        assert length == pytest.approx(lesion.longest_axial_diameter_mm, abs=1e-3)
        (reported,) = [item for item in group.ContentSequence if item.ValueType == "NUM"
                       and item.ConceptNameCodeSequence[0].CodeValue
                       == codes.SCT.LongAxis.value]
        value = float(reported.MeasuredValueSequence[0].NumericValue)
        assert value == lesion.diameter_mm == round(length, 1)
        # both ends lie on the lesion's outline on that slice: within half a pixel of it
        mask = labels[z] == 2
        for r, c in _rows_cols(scoord):
            near = mask[max(int(np.floor(r)), 0):int(np.ceil(r)) + 1,
                        max(int(np.floor(c)), 0):int(np.ceil(c)) + 1]
            assert near.any()


def test_sr_and_pipeline_json_give_the_same_lesion_figures(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    """The figures of ``dicomnode process``'s JSON and of the SR are the same numbers."""
    volume = load_series(sorted(axial.directory.glob("*.dcm")))
    labels = _abdomen_labels(axial)  # axial: sending order is slice order
    assert [str(u) for u in volume.sop_instance_uids] == [
        str(im.SOPInstanceUID) for im in axial.images]
    box = (slice(2, 22), slice(5, 90), slice(4, 92))
    result = LiverTumorPipeline().report(Segmentation(labels, box=box), volume, {},
                                         {"name": "t"})
    assert result.ok, result.reason
    report = result.measurements
    seg = build_seg(volume.datasets, labels, ABDOMEN, algorithm)
    sr = write(build_segmentation_sr(volume.datasets, seg, labels, ABDOMEN, algorithm),
               tmp_path / "sr.dcm")
    groups = {tracked_name(g.tracking_identifier): g
              for g in _report(hd.sr.srread(sr)).get_planar_roi_measurement_groups()}
    assert len(report["lesions"]) == 3
    for lesion in report["lesions"]:
        group = groups[f"Lesion {lesion['id']}"]
        assert group.get_measurements(name=codes.SCT.LongAxis)[0].value == \
            lesion["longest_axial_diameter_mm"]
        assert group.get_measurements(name=codes.SCT.Volume)[0].value == lesion["volume_ml"]
    values = {m.name.meaning: m.value for m in groups["Lesion_Liver"].get_measurements()}
    assert values["Total tumor volume"] == report["total_tumour_volume_ml"]
    assert values[codes.SCT.NumberOfLesions.meaning] == report["lesion_count"]


def test_ich_report_shows_every_finding_on_a_whole_slice(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    results = [IchResult("any", 0.91, True, (10, 11, 12)),
               IchResult("epidural", 0.02, False),
               IchResult("intraparenchymal", 0.07, False, peak_slice=3),
               IchResult("intraventricular", 0.04, False),
               IchResult("subarachnoid", 0.12, False),
               IchResult("subdural", 0.88, True, (11, 12), peak_slice=12,
                         slice_probabilities=(0.81, 0.88))]
    sr = build_ich_sr(axial.images, results, algorithm)
    path = write(sr, tmp_path / "ich.dcm")
    assert dciodvfy_errors(path) == []
    back = hd.sr.srread(path)
    assert_every_group_is_drawn_on_the_source_series(back, axial.images)
    index = {str(im.SOPInstanceUID): k for k, im in enumerate(axial.images)}
    shown: dict[str, list[int]] = {}
    for group in _groups(back):
        key, _ = _tracking(group)
        scoord, image = _drawn(group)
        shown.setdefault(key, []).append(index[image])
        # the region is the whole slice: a slice classifier does not localise
        assert np.asarray(scoord.GraphicData, float).reshape(-1, 2).tolist() == [
            [0, 0], [96, 0], [96, 96], [0, 96], [0, 0]]
    middle = len(axial.images) // 2
    # one group (one measurement in a viewer) per finding, on its peak flagged slice
    assert shown == {"any": [11], "epidural": [middle], "intraparenchymal": [3],
                     "intraventricular": [middle], "subarachnoid": [middle],
                     "subdural": [12]}
    findings = {f.key: f.code for f in ICH_FINDINGS}
    groups = _report(back).get_planar_roi_measurement_groups()
    for result in results:
        [mine] = [g for g in groups if tracked_name(g.tracking_identifier) == result.key]
        assert mine.finding_type == findings[result.key]
        first, *others = mine.get_measurements(name=codes.DCM.Probability)
        assert first.value == pytest.approx(result.probability) and not first.referenced_images
        assert all(m.referenced_images for m in others)   # the flagged slices' own
        decision = mine.get_qualitative_evaluations()[0].value
        assert decision == (codes.SCT.Present if result.present else codes.SCT.Absent)
    text = dsr2html_text(path)
    assert "Probability" in text and "Subdural hemorrhage" in text
    assert "Subdural hemorrhage: present (probability 0.88)" in text   # the viewer's label
    # each flagged slice's own probability, in the finding's group, referencing the slice
    [subdural] = [g for g in groups if tracked_name(g.tracking_identifier) == "subdural"]
    per_slice = {m.referenced_images[0].referenced_sop_instance_uid: m.value
                 for m in subdural.get_measurements(name=codes.DCM.Probability)
                 if m.referenced_images}
    assert per_slice == pytest.approx({axial.images[11].SOPInstanceUID: 0.81,
                                       axial.images[12].SOPInstanceUID: 0.88})


def test_ich_results_are_validated(axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="'key'"):
        IchResult("stroke", 0.5, True)
    with pytest.raises(ValueError, match="'probability'"):
        IchResult("any", 1.5, True)
    with pytest.raises(ValueError, match="'slice_probabilities'"):
        IchResult("any", 0.9, True, (1, 2), slice_probabilities=(0.9,))
    with pytest.raises(ValueError, match="'slice_indices'"):
        build_ich_sr(axial.images, [IchResult("any", 0.9, True, (999,))], algorithm)
    with pytest.raises(ValueError, match="'slice_indices'"):
        build_ich_sr(axial.images, [IchResult("any", 0.9, True, peak_slice=-1)], algorithm)
    with pytest.raises(ValueError, match="repeated"):
        build_ich_sr(axial.images, [IchResult("any", 0.9, True), IchResult("any", 0.9, True)],
                     algorithm)


def test_a_report_with_nothing_to_draw_is_refused(axial: CtSeries,
                                                 algorithm: AlgorithmInfo) -> None:
    """Every structure empty: no group could be drawn, so there is no measurement report."""
    empty = np.zeros_like(axial.labels)
    seg = build_seg(axial.images, axial.labels, HEADNECK, algorithm)
    with pytest.raises(ValueError, match="'masks'"):
        build_segmentation_sr(axial.images, seg, empty, HEADNECK, algorithm)


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


def test_every_group_carries_what_ohif_needs_to_list_and_draw_it(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    """OHIF's SR loader: a cornerstone tracking identifier naming the tool (outline or
    line) and the structure, the group's SCOORD also under its first NUM, whose value
    is the drawing's own figure (area of the outline, length of the line), and the
    structure's name as the group's Comment (the panel's label)."""
    labels = _abdomen_labels(axial)
    seg = build_seg(axial.images, labels, ABDOMEN, algorithm)
    path = write(build_segmentation_sr(axial.images, seg, labels, ABDOMEN, algorithm),
                 tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    spacing = [float(v) for v in axial.images[0].PixelSpacing]
    for group in _groups(pydicom.dcmread(path)):
        text = next(str(i.TextValue) for i in group.ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeValue == "112039")
        name = tracked_name(text)
        scoord = next(i for i in group.ContentSequence if i.ValueType == "SCOORD")
        first = next(i for i in group.ContentSequence if i.ValueType == "NUM")
        (inferred,) = [i for i in first.ContentSequence if i.ValueType == "SCOORD"]
        assert inferred.RelationshipType == "INFERRED FROM"
        assert list(inferred.GraphicData) == list(scoord.GraphicData)
        comment = [str(i.TextValue) for i in group.ContentSequence
                   if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121106"]
        assert comment == [name]
        xy = np.asarray(scoord.GraphicData, float).reshape(-1, 2) * [spacing[1], spacing[0]]
        value = float(first.MeasuredValueSequence[0].NumericValue)
        if len(xy) == 2:
            assert text == f"Cornerstone3DTools@^0.1.0:Length:{name}"
            assert value == pytest.approx(float(np.linalg.norm(xy[1] - xy[0])), abs=0.05)
        else:
            assert text == f"Cornerstone3DTools@^0.1.0:PlanarFreehandROI:{name}"
            x, y = xy[:, 0], xy[:, 1]
            area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))
            assert first.ConceptNameCodeSequence[0].CodeMeaning == "Area"
            assert value == pytest.approx(area, abs=0.05)
