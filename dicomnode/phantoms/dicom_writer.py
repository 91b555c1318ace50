"""Write a phantom as a CT Image Storage series, one file per slice.

Pixels are stored as unsigned 12-bit values with Rescale Intercept -1024 and Slope 1,
as most CT scanners do. Geometry follows the phantom grid exactly: Image Orientation
(Patient) ``[1, 0, 0, 0, 1, 0]``, Image Position (Patient) of each slice's first pixel,
Pixel Spacing ``[row spacing, column spacing]``, Slice Thickness and Spacing Between
Slices equal to ``dz``. Transfer syntax: Explicit VR Little Endian by default, or
JPEG-LS lossless (needs ``pyjpegls``, in the ``codecs`` extra) or RLE lossless
(pydicom's own encoder).
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from dicomnode import __version__

if TYPE_CHECKING:
    from dicomnode.phantoms.phantom import Phantom
from dicomnode.logs import fields

log = logging.getLogger(__name__)

#: Accepted ``transfer_syntax`` names.
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "jpegls": JPEGLSLossless,
    "jpeg-ls": JPEGLSLossless,
    "rle": RLELossless,
}
SLICE_ORDERS: tuple[str, ...] = ("ascending", "descending", "shuffled")
_INTERCEPT = -1024


def resolve_transfer_syntax(value: str | None) -> UID:
    """Map ``None``, a short name (``explicit``, ``jpegls``, ``rle``) or a UID to a UID."""
    if value is None:
        return ExplicitVRLittleEndian
    key = str(value).strip().lower()
    if key in TRANSFER_SYNTAXES:
        return TRANSFER_SYNTAXES[key]
    if value in (ExplicitVRLittleEndian, JPEGLSLossless, RLELossless):
        return UID(value)
    raise ValueError(f"Invalid 'transfer_syntax' value '{value}' - must be one of "
                     f"{sorted(set(TRANSFER_SYNTAXES))} or its UID")


def _fmt(value: float) -> str:
    """Decimal String text of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def write_series(phantom: Phantom, out_dir: Path, *, transfer_syntax: str | None = None,
                 slice_order: str = "ascending", body_part: str | None = "default",
                 descriptions: bool | str = True, study_uid: str | None = None,
                 series_uid: str | None = None, patient_name: str | None = None,
                 patient_id: str | None = None, series_number: int = 1,
                 accession_number: str = "") -> tuple[list[Path], list[str], list[int]]:
    """Write ``out_dir/NNNN.dcm`` for every slice.

    Parameters
    ----------
    phantom
        The case to write.
    out_dir
        Existing directory.
    transfer_syntax
        ``None``/``"explicit"``, ``"jpegls"`` or ``"rle"`` (or the UID).
    slice_order
        ``"ascending"`` (instance 1 is the most inferior slice), ``"descending"``
        (instance 1 is the most superior) or ``"shuffled"`` (instance numbers and file
        names in random order, to exercise sorting by position).
    body_part
        ``"default"`` writes the region's Body Part Examined (HEAD, HEADNECK,
        ABDOMEN), ``None`` leaves the attribute out, any other text is written as is.
    descriptions
        ``True`` writes the region's Study and Series Description, ``False`` leaves
        both out, a string is written as both.
    study_uid, series_uid
        Fixed UIDs (new ones by default).

    Returns
    -------
    tuple
        The written paths (in instance order), the SOP Instance UID and the Instance
        Number of each slice index.
    """
    tsuid = resolve_transfer_syntax(transfer_syntax)
    if slice_order not in SLICE_ORDERS:
        raise ValueError(f"Invalid 'slice_order' value '{slice_order}' - must be one of "
                         f"{SLICE_ORDERS}")
    if body_part is not None and (not isinstance(body_part, str) or len(body_part) > 16):
        raise ValueError(f"Invalid 'body_part' value '{body_part}' - must be text of at "
                         "most 16 characters, 'default' or None")
    if not isinstance(descriptions, (bool, str)):
        raise ValueError(f"Invalid 'descriptions' value '{descriptions}' - must be a bool "
                         "or text")
    spec = phantom.spec
    nz = phantom.hu.shape[0]
    if slice_order == "ascending":
        numbers = list(range(1, nz + 1))
    elif slice_order == "descending":
        numbers = list(range(nz, 0, -1))
    else:
        numbers = [int(v) + 1 for v in np.random.default_rng(phantom.seed).permutation(nz)]

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    now = dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    thk = _fmt(phantom.spacing[0])
    positions = phantom.slice_positions()
    _, dy, dx = phantom.spacing

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = CTImageStorage
    base.StudyDate = base.SeriesDate = base.AcquisitionDate = base.ContentDate = date
    base.StudyTime = base.SeriesTime = base.AcquisitionTime = base.ContentTime = time
    base.AccessionNumber = accession_number
    base.Modality = "CT"
    base.Manufacturer = "dicomnode"
    base.InstitutionName = "dicomnode phantom"
    base.ReferringPhysicianName = ""
    if descriptions is True:
        base.StudyDescription = spec.study_description
        base.SeriesDescription = spec.series_description.format(thk=thk)
    elif isinstance(descriptions, str):
        base.StudyDescription = descriptions
        base.SeriesDescription = descriptions
    base.ManufacturerModelName = "dicomnode phantom"
    base.SoftwareVersions = __version__
    base.PatientName = patient_name or f"PHANTOM^{phantom.region.upper()}"
    base.PatientID = patient_id or f"PHANTOM-{phantom.region.upper()}-{phantom.seed}"
    base.PatientBirthDate = ""
    base.PatientSex = "O"
    base.PatientIdentityRemoved = "YES"
    base.DeidentificationMethod = "Synthetic phantom, no patient data"
    if body_part == "default":
        base.BodyPartExamined = spec.body_part
    elif body_part is not None:
        base.BodyPartExamined = body_part.upper()
    if "BodyPartExamined" not in base:
        # Type 2C, required for paired body parts: without Body Part Examined nobody can
        # tell, so send it empty (unknown); with an unpaired body part it must be absent
        base.Laterality = ""
    base.SliceThickness = thk
    base.KVP = _fmt(spec.kvp)
    base.SpacingBetweenSlices = thk
    base.DataCollectionDiameter = _fmt(500.0)
    base.ReconstructionDiameter = _fmt(phantom.hu.shape[2] * dx)
    base.GantryDetectorTilt = "0"
    base.TableHeight = "150"
    base.RotationDirection = "CW"
    base.ExposureTime = "1000"
    base.XRayTubeCurrent = "200"
    base.ConvolutionKernel = "STANDARD"
    base.PatientPosition = "HFS"
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.StudyID = "1"
    base.SeriesNumber = int(series_number)
    base.AcquisitionNumber = 1
    base.ImageOrientationPatient = [_fmt(v) for v in phantom.direction]
    base.FrameOfReferenceUID = frame_uid
    base.PositionReferenceIndicator = ""
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = phantom.hu.shape[1], phantom.hu.shape[2]
    base.PixelSpacing = [_fmt(dy), _fmt(dx)]
    base.BitsAllocated = 16
    base.BitsStored = 12
    base.HighBit = 11
    base.PixelRepresentation = 0
    base.WindowCenter = _fmt(spec.window[0])
    base.WindowWidth = _fmt(spec.window[1])
    base.RescaleIntercept = str(_INTERCEPT)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.LossyImageCompression = "00"

    out_dir.mkdir(parents=True, exist_ok=True)
    sop_uids = [str(generate_uid()) for _ in range(nz)]
    paths: list[Path] = []
    for k in range(nz):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = sop_uids[k]
        ds.InstanceNumber = numbers[k]
        ds.ImagePositionPatient = [_fmt(v) for v in positions[k]]
        ds.SliceLocation = _fmt(positions[k][2])
        stored = (phantom.hu[k].astype(np.int32) - _INTERCEPT).clip(0, 4095).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationVersionName = f"DICOMNODE_{__version__}"[:16]
        ds.file_meta = meta
        if tsuid == ExplicitVRLittleEndian:
            ds.PixelData = stored.tobytes()
        else:
            ds.compress(tsuid, stored, generate_instance_uid=False)
        path = out_dir / f"{numbers[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    order = np.argsort(numbers)
    log.info("phantom.series.written", extra=fields(
        series=series_uid, instances=nz, transfer_syntax=str(tsuid)))
    return [paths[i] for i in order], sop_uids, numbers

