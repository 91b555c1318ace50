"""Tests for dicomnode.results.kos: dciodvfy and the referenced slices."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.kos import build_kos
from dicomnode.results.source import write
from tests.results.conftest import CtSeries, assert_awkward_values_kept, dciodvfy_errors


def test_kos_references_the_flagged_slices(axial: CtSeries, algorithm: AlgorithmInfo,
                                           tmp_path: Path) -> None:
    kos = build_kos(axial.images, [12, 10, 11, 12], algorithm)
    path = write(kos, tmp_path / "kos.dcm")
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.Modality == "KO"
    assert back.SeriesDescription == "AI key images"
    assert back.Manufacturer == "dicomnode"
    assert algorithm.name in " ".join(back.SoftwareVersions)
    assert back.SeriesInstanceUID != axial.images[0].SeriesInstanceUID
    assert back.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    assert back.PatientID == axial.images[0].PatientID
    assert back.StudyInstanceUID == axial.images[0].StudyInstanceUID
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    series = evidence.ReferencedSeriesSequence[0]
    referenced = [i.ReferencedSOPInstanceUID for i in series.ReferencedSOPSequence]
    assert sorted(referenced) == sorted(axial.images[i].SOPInstanceUID for i in (10, 11, 12))
    images = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for item in back.ContentSequence if item.ValueType == "IMAGE"]
    assert images == [axial.images[i].SOPInstanceUID for i in (10, 11, 12)]


def test_kos_needs_valid_slices(axial: CtSeries, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="'slice_indices' value '\\[\\]'"):
        build_kos(axial.images, [], algorithm)
    with pytest.raises(ValueError, match="'slice_indices' value '99'"):
        build_kos(axial.images, [1, 99], algorithm)


def test_kos_carries_a_multi_valued_patient_name_as_sent(
        awkward: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    path = write(build_kos(awkward.images, [3, 4], algorithm), tmp_path / "kos.dcm")
    assert_awkward_values_kept(pydicom.dcmread(path))
