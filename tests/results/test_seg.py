"""Tests for dicomnode.results.seg: dciodvfy, highdicom read-back, frame order."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import ABDOMEN, HEADNECK
from dicomnode.results.seg import build_seg
from dicomnode.results.source import write
from tests.results.conftest import CtSeries, dciodvfy_errors, make_ct_series


def _roundtrip(series: CtSeries, algorithm: AlgorithmInfo, path: Path) -> hd.seg.Segmentation:
    seg = build_seg(series.images, series.labels, HEADNECK, algorithm,
                    series_description="AI OAR segmentation")
    write(seg, path)
    return hd.seg.segread(path)


def test_dciodvfy_and_identical_mask_read_back(any_series: CtSeries,
                                               algorithm: AlgorithmInfo,
                                               tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    seg = _roundtrip(any_series, algorithm, path)
    assert dciodvfy_errors(path) == []
    uids = [im.SOPInstanceUID for im in any_series.images]
    labels = seg.get_pixels_by_source_instance(
        uids, segment_numbers=list(range(1, 10)), combine_segments=True, relabel=False)
    assert np.array_equal(labels, any_series.labels)


def test_all_frames_present_in_source_order(any_series: CtSeries, algorithm: AlgorithmInfo,
                                            tmp_path: Path) -> None:
    seg = _roundtrip(any_series, algorithm, tmp_path / "seg.dcm")
    n = len(any_series.images)
    assert seg.NumberOfFrames == n * len(HEADNECK)  # empty frames are kept
    uids = [im.SOPInstanceUID for im in any_series.images]
    for k, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        assert item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == k // n + 1
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == uids[k % n]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        expected = [float(v) for v in any_series.images[k % n].ImagePositionPatient]
        assert np.allclose(position, expected, atol=1e-3)


def test_frames_not_byte_aligned(tmp_path: Path, algorithm: AlgorithmInfo) -> None:
    series = make_ct_series(tmp_path / "ct90", slices=12, matrix=90, spacing=1.7)
    seg = _roundtrip(series, algorithm, tmp_path / "seg.dcm")
    labels = seg.get_pixels_by_source_instance(
        [im.SOPInstanceUID for im in series.images], segment_numbers=list(range(1, 10)),
        combine_segments=True, relabel=False)
    assert np.array_equal(labels, series.labels)


def test_segments_carry_codes_algorithm_and_source_modules(axial: CtSeries,
                                                           algorithm: AlgorithmInfo,
                                                           tmp_path: Path) -> None:
    seg = _roundtrip(axial, algorithm, tmp_path / "seg.dcm")
    assert seg.SeriesDescription == "AI OAR segmentation"
    assert seg.Manufacturer == "dicomnode"
    assert algorithm.name in " ".join(seg.SoftwareVersions)
    assert seg.FrameOfReferenceUID == axial.images[0].FrameOfReferenceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID",
                    "AccessionNumber", "StudyDescription"):
        assert seg[keyword].value == axial.images[0][keyword].value
    item = seg.SegmentSequence[3]
    assert item.SegmentLabel == "OpticNrv_L"
    type_item = item.SegmentedPropertyTypeCodeSequence[0]
    assert type_item.CodeValue == "18234004"
    assert type_item.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    algo = item.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == algorithm.name
    assert algorithm.weights_sha256 in algo.AlgorithmParameters


def test_overlapping_masks_by_name(axial: CtSeries, algorithm: AlgorithmInfo,
                                   tmp_path: Path) -> None:
    liver = axial.labels > 0
    tumour = axial.labels == 1  # inside the liver: overlapping segments
    seg = build_seg(axial.images, {"Liver": liver, "Lesion_Liver": tumour}, ABDOMEN, algorithm)
    write(seg, tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    assert dciodvfy_errors(tmp_path / "seg.dcm") == []
    planes = back.get_pixels_by_source_instance(
        [im.SOPInstanceUID for im in axial.images], segment_numbers=[1, 2])
    assert np.array_equal(planes[..., 0].astype(bool), liver)
    assert np.array_equal(planes[..., 1].astype(bool), tumour)


def test_invalid_content_label(axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="'content_label'"):
        build_seg(axial.images, axial.labels, HEADNECK, algorithm, content_label="lower")


def test_single_structure_seg_keeps_source_order(reversed_axial: CtSeries,
                                                 algorithm: AlgorithmInfo,
                                                 tmp_path: Path) -> None:
    """One segment: highdicom shares its identification across frames; order still holds."""
    liver_only = tuple(s for s in ABDOMEN if s.name == "Liver")
    labels = (reversed_axial.labels > 0).astype(np.uint8)
    seg = build_seg(reversed_axial.images, labels, liver_only, algorithm)
    path = write(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    read = hd.seg.segread(path)
    uids = [im.SOPInstanceUID for im in reversed_axial.images]
    refs = [item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            for item in read.PerFrameFunctionalGroupsSequence]
    assert refs == uids
    mask = read.get_pixels_by_source_instance(uids, segment_numbers=[1],
                                              combine_segments=True, relabel=False)
    assert np.array_equal(mask, labels)


def test_label_map_fast_path_encodes_the_same_frames(axial: CtSeries,
                                                     algorithm: AlgorithmInfo) -> None:
    """uint8 labels equal to the segment numbers skip the lookup; the frames are the same."""
    direct = build_seg(axial.images, axial.labels, HEADNECK, algorithm)
    mapped = build_seg(axial.images, axial.labels.astype(np.int32), HEADNECK, algorithm)
    assert direct.PixelData == mapped.PixelData
    assert direct.NumberOfFrames == mapped.NumberOfFrames
