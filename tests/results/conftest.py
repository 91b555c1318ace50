"""A small synthetic CT series with known structures, for the result-object tests.

Ellipsoids are defined in patient coordinates, so the same anatomy appears whatever the
slice order or orientation of the series: axial ascending, axial with the slices in
reversed order, and an oblique (tilted) series. The Mandible label is a hollow shell:
every slice through it has a hole.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.results.algorithm import AlgorithmInfo

# (label, centre mm, radii mm) in patient coordinates relative to the volume centre.
_ELLIPSOIDS = {
    1: ((0.0, 12.0, 0.0), (14.0, 11.0, 30.0)),     # BrainStem
    2: ((0.0, -22.0, 3.0), (6.0, 3.0, 4.0)),       # Chiasm (< 1 cm3)
    6: ((42.0, 0.0, -4.0), (10.0, 14.0, 16.0)),    # Parotid_L (patient left = +x)
    7: ((-42.0, 0.0, -4.0), (10.0, 14.0, 16.0)),   # Parotid_R
}
_SHELL = (3, (0.0, -10.0, 0.0), (58.0, 44.0, 26.0), (40.0, 28.0, 60.0))  # Mandible


@dataclass
class CtSeries:
    """A written CT series: datasets in mask order, the label map, and its folder."""

    images: list[Dataset]
    labels: np.ndarray
    directory: Path


def _rotation(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    # Tilt about the patient x axis, then a small turn about z: a truly oblique plane.
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    b = np.deg2rad(degrees / 2)
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def make_ct_series(directory: Path, *, slices: int = 24, matrix: int = 96,
                   spacing: float = 1.5, thickness: float = 3.0, reverse: bool = False,
                   tilt: float = 0.0, patient_name: str = "Phantom^Results",
                   attributes: dict[str, object] | None = None) -> CtSeries:
    """Write a CT series with ellipsoid structures; return datasets and labels in order.

    ``attributes`` override the defaults on every slice (keyword -> value; None removes
    the attribute, bytes are written as they are).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rot = _rotation(tilt)
    row_dir, col_dir, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    centre = np.array([10.0, -20.0, 100.0])
    half = (matrix - 1) / 2 * spacing
    first = centre - half * row_dir - half * col_dir - (slices - 1) / 2 * thickness * normal
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    r, c = np.mgrid[:matrix, :matrix].astype(float)
    images, label_slices = [], []
    for k in range(slices):
        origin = first + k * thickness * normal
        pts = (origin[None, None, :] + c[..., None] * spacing * row_dir
               + r[..., None] * spacing * col_dir) - centre
        labels = np.zeros((matrix, matrix), np.uint8)
        label, mid, outer, inner = _SHELL
        d_out = (((pts - mid) / outer) ** 2).sum(-1)
        d_in = (((pts - mid) / inner) ** 2).sum(-1)
        labels[(d_out < 1) & (d_in >= 1)] = label
        for lab, (mid_e, radii) in _ELLIPSOIDS.items():
            labels[(((pts - np.array(mid_e)) / np.array(radii)) ** 2).sum(-1) < 1] = lab
        hu = np.where(labels > 0, 40 + 10 * labels.astype(np.int16), -100).astype(np.int16)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = patient_name
        ds.PatientID = "RES-001"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.PatientAge = "064Y"
        ds.StudyInstanceUID = study
        ds.StudyDate = "20250102"
        ds.StudyTime = "101500"
        ds.StudyID = "S1"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.StudyDescription = "CT HEAD NECK"
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 2
        ds.SeriesDescription = "CT 3mm"
        ds.Modality = "CT"
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Synthetic"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.PatientPosition = "HFS"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = matrix
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = hu.tobytes()
        for keyword, value in (attributes or {}).items():
            if value is None:
                delattr(ds, keyword)
            elif isinstance(value, bytes):
                ds.add(DataElement(Tag(keyword), dictionary_VR(keyword), value))
            else:
                setattr(ds, keyword, value)
        ds.save_as(directory / f"ct_{k:03d}.dcm", enforce_file_format=True)
        images.append(ds)
        label_slices.append(labels)
    labels3 = np.stack(label_slices)
    if reverse:
        images = images[::-1]
        labels3 = labels3[::-1].copy()
    return CtSeries(images, labels3, directory)


@pytest.fixture(scope="session")
def series_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ct")


@pytest.fixture(scope="session")
def axial(series_root: Path) -> CtSeries:
    return make_ct_series(series_root / "axial")


@pytest.fixture(scope="session")
def reversed_axial(series_root: Path) -> CtSeries:
    return make_ct_series(series_root / "reversed", reverse=True)


@pytest.fixture(scope="session")
def oblique(series_root: Path) -> CtSeries:
    return make_ct_series(series_root / "oblique", tilt=20.0)


#: Patient and study values real scanners send that highdicom's constructors refuse: a
#: multi-valued PatientName, type 2 attributes missing, an over-long AccessionNumber.
AWKWARD_VALUES: dict[str, object] = {
    "PatientName": "Doe^John\\Roe^Jane", "PatientSex": None, "StudyTime": None,
    "AccessionNumber": "ACC-2025-0001234567", "StudyID": "",
}


@pytest.fixture(scope="session")
def awkward(series_root: Path) -> CtSeries:
    return make_ct_series(series_root / "awkward", slices=16, matrix=64,
                          attributes=AWKWARD_VALUES)


def assert_awkward_values_kept(result: Dataset) -> None:
    """``result`` (as read back) carries the awkward source's values as they were sent."""
    assert [str(v) for v in result.PatientName] == ["Doe^John", "Roe^Jane"]
    assert result.AccessionNumber == "ACC-2025-0001234567"
    assert result.StudyID == "" and result.PatientSex == "" and result.StudyTime == ""
    assert result.PatientID == "RES-001"


@pytest.fixture(params=["axial", "reversed_axial", "oblique"])
def any_series(request: pytest.FixtureRequest) -> CtSeries:
    series: CtSeries = request.getfixturevalue(request.param)
    return series


@pytest.fixture(scope="session")
def algorithm() -> AlgorithmInfo:
    return AlgorithmInfo("dicomnode-test-oar", "0.1.0", "ab" * 32, "AnatomyNet 3D U-Net")


DCIODVFY = shutil.which("dciodvfy")
PLASTIMATCH = shutil.which("plastimatch")


def dciodvfy_errors(path: Path) -> list[str]:
    """Run dicom3tools' dciodvfy on a file and return its "Error" lines."""
    import subprocess

    assert DCIODVFY, "dciodvfy (dicom3tools) is required for these tests"
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
