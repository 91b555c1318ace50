"""Small CT series written with pydicom, for the node-core tests (no anatomy needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(study_uid: str, series_uid: str, z: float, index: int, *, rows: int = 32,
             cols: int = 32, images_in_acquisition: int | None = None,
             frame_uid: str | None = None) -> Dataset:
    """One CT Image Storage dataset (file meta included) at position z."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.PatientName = "Secret^Patient"
    ds.PatientID = "SECRET-ID-42"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20261125"
    ds.Modality = "CT"
    ds.SeriesNumber = 2
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 2.0
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 2000, (rows, cols), dtype=np.int16).tobytes()
    return ds


def write_series(out: Path, n: int = 10, *, spacing: float = 2.0, rows: int = 32,
                 cols: int = 32, study_uid: str | None = None, series_uid: str | None = None,
                 skip: tuple[int, ...] = (), images_in_acquisition: int | None = None,
                 ) -> list[Path]:
    """Write ``n`` slices (minus ``skip``) of one series to ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    for i in range(n):
        if i in skip:
            continue
        ds = ct_slice(study_uid, series_uid, i * spacing, i, rows=rows, cols=cols,
                      images_in_acquisition=images_in_acquisition)
        path = out / f"slice{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
