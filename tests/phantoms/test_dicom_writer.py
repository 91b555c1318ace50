"""Tests for dicomnode.phantoms.dicom_writer: validity (dciodvfy), pixels, geometry, options."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from dicomnode.phantoms import Phantom, write_phantom
from dicomnode.phantoms.dicom_writer import resolve_transfer_syntax

DCIODVFY = shutil.which("dciodvfy")


def _dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY is not None
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if "Error" in line]


def _read_series(out: Path) -> list:
    return [dcmread(p) for p in sorted(out.glob("*.dcm"))]


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools dciodvfy is not installed")
@pytest.mark.parametrize("region", ["headneck", "abdomen", "head"])
@pytest.mark.parametrize("syntax", [None, "jpegls", "rle"])
def test_dciodvfy_reports_no_errors(small_phantoms: dict[str, Phantom], tmp_path: Path,
                                    region: str, syntax: str | None) -> None:
    paths = write_phantom(small_phantoms[region], tmp_path, transfer_syntax=syntax)
    dcm = [p for p in paths if p.suffix == ".dcm"]
    for path in (dcm[0], dcm[len(dcm) // 2], dcm[-1]):
        assert _dciodvfy_errors(path) == [], path


@pytest.mark.parametrize("syntax", [None, "jpegls", "rle"])
def test_pixels_round_trip_to_hounsfield_units(small_phantoms: dict[str, Phantom],
                                               tmp_path: Path, syntax: str | None) -> None:
    p = small_phantoms["abdomen"]
    write_phantom(p, tmp_path, transfer_syntax=syntax)
    series = _read_series(tmp_path)
    assert series[0].file_meta.TransferSyntaxUID == resolve_transfer_syntax(syntax)
    for ds in series:
        k = int(ds.InstanceNumber) - 1
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, p.hu[k])


def test_geometry_and_identity_attributes(small_phantoms: dict[str, Phantom],
                                          tmp_path: Path) -> None:
    p = small_phantoms["head"]
    write_phantom(p, tmp_path)
    series = _read_series(tmp_path)
    assert len(series) == p.hu.shape[0]
    assert len({ds.StudyInstanceUID for ds in series}) == 1
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1
    assert len({ds.SOPInstanceUID for ds in series}) == len(series)
    first = series[0]
    assert first.SOPClassUID == CTImageStorage and first.Modality == "CT"
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([p.spacing[1], p.spacing[2]])
    assert float(first.SliceThickness) == pytest.approx(p.spacing[0])
    assert first.BodyPartExamined == "HEAD"
    assert first.StudyDescription and first.SeriesDescription
    assert first.WindowCenter is not None and first.WindowWidth is not None
    for ds in series:
        k = int(ds.InstanceNumber) - 1
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   p.slice_positions()[k], atol=1e-4)
    z = [float(ds.ImagePositionPatient[2]) for ds in series]
    assert np.all(np.diff(z) > 0)  # ascending: instance 1 is the most inferior


def test_slice_orders(small_phantoms: dict[str, Phantom], tmp_path: Path) -> None:
    p = small_phantoms["head"]
    write_phantom(p, tmp_path / "desc", slice_order="descending")
    desc = _read_series(tmp_path / "desc")
    assert float(desc[0].ImagePositionPatient[2]) > float(desc[-1].ImagePositionPatient[2])
    write_phantom(p, tmp_path / "shuf", slice_order="shuffled")
    shuf = _read_series(tmp_path / "shuf")
    z = [float(ds.ImagePositionPatient[2]) for ds in shuf]
    assert sorted(int(ds.InstanceNumber) for ds in shuf) == list(range(1, len(shuf) + 1))
    assert not (np.all(np.diff(z) > 0) or np.all(np.diff(z) < 0))
    with pytest.raises(ValueError, match="slice_order"):
        write_phantom(p, tmp_path / "bad", slice_order="random")


def test_routing_tags_can_be_left_out_or_set(small_phantoms: dict[str, Phantom],
                                              tmp_path: Path) -> None:
    p = small_phantoms["abdomen"]
    write_phantom(p, tmp_path / "bare", body_part=None, descriptions=False)
    ds = _read_series(tmp_path / "bare")[0]
    assert "BodyPartExamined" not in ds
    assert "StudyDescription" not in ds and "SeriesDescription" not in ds
    if DCIODVFY is not None:
        assert _dciodvfy_errors(next((tmp_path / "bare").glob("*.dcm"))) == []
    write_phantom(p, tmp_path / "set", body_part="chest", descriptions="SCAN",
                  study_uid="1.2.3.4", series_uid="1.2.3.4.5")
    ds = _read_series(tmp_path / "set")[0]
    assert ds.BodyPartExamined == "CHEST" and ds.SeriesDescription == "SCAN"
    assert ds.StudyInstanceUID == "1.2.3.4" and ds.SeriesInstanceUID == "1.2.3.4.5"


def test_transfer_syntax_names() -> None:
    assert resolve_transfer_syntax(None) == ExplicitVRLittleEndian
    assert resolve_transfer_syntax("JPEGLS") == JPEGLSLossless
    assert resolve_transfer_syntax(RLELossless) == RLELossless
    with pytest.raises(ValueError, match="transfer_syntax"):
        resolve_transfer_syntax("jpeg2000")
