"""Read and check the header of a received instance without decoding its pixels.

The whole encoded dataset is walked (large values are skipped, not read) so that a
dataset whose element lengths run past its end is caught here, before it reaches
the spool. Only the attributes the index needs are kept.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

_UID = re.compile(r"^[0-9A-Za-z.\-_]{1,64}$")
PIXEL_DATA = 0x7FE00010


class InstanceRejectedError(ValueError):
    """A received dataset that must not be stored.

    Parameters
    ----------
    reason : str
        Human-readable reason naming the attribute at fault.
    code : str
        One of ``undecodable``, ``truncated``, ``missing_uid``, ``sop_mismatch``.
    """

    def __init__(self, reason: str, code: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that the index keeps."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax_uid: str
    patient_id: str = ""
    issuer: str = ""
    accession_number: str = ""
    study_date: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    instance_number: int | None = None
    image_type: str = ""
    orientation: str = ""
    slice_position: float | None = None
    images_in_acquisition: int | None = None


# The header is read on every C-STORE: values are taken from pydicom's raw elements
# (bytes as received) without pydicom's per-element conversion, which costs more than
# reading the whole header. Only text VRs are read this way; binary ones via pydicom.
_TAGS = {kw: Tag(kw) for kw in (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
    "IssuerOfPatientID", "AccessionNumber", "StudyDate", "Modality", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "InstanceNumber", "ImageType",
    "ImageOrientationPatient", "ImagePositionPatient", "ImagesInAcquisition",
    "NumberOfFrames",
)}


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    elem = ds._dict.get(_TAGS[keyword])
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        text = value.decode("latin-1")
    elif value is None:
        return ""
    elif isinstance(value, pydicom.multival.MultiValue):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    return text.strip("\x00 ")[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        text = _text(ds, keyword)
        return int(text) if text else None
    except ValueError:
        return None


def _numbers(ds: Dataset, keyword: str) -> list[float]:
    return [float(v) for v in _text(ds, keyword, 1024).split("\\") if v.strip()]


def _slice_position(ds: Dataset) -> tuple[str, float | None]:
    try:
        iop = _numbers(ds, "ImageOrientationPatient")
        ipp = _numbers(ds, "ImagePositionPatient")
    except ValueError:
        return "", None
    if len(iop) != 6 or len(ipp) != 3:
        return "", None
    row, col = iop[:3], iop[3:]
    normal = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    orientation = "\\".join(f"{v:.4f}" for v in iop)
    return orientation, sum(n * p for n, p in zip(normal, ipp, strict=True))


def _required_uid(ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if not value:
        raise InstanceRejectedError(f"Missing '{keyword}' - required to store an instance",
                                    "missing_uid")
    if not _UID.match(value):
        raise InstanceRejectedError(f"Invalid '{keyword}' value - not a UID", "missing_uid")
    return value


def parse_header(
    encoded: bytes | memoryview | Path,
    *,
    expected_sop_uid: str | None = None,
    expected_sop_class_uid: str | None = None,
) -> InstanceHeader:
    """Parse and check a DICOM file's header from its encoded bytes.

    Parameters
    ----------
    encoded : bytes or Path
        The file (preamble + file meta + dataset), as from
        ``pynetdicom.events.Event.encoded_dataset()``, or its path (then only the
        header is read; large values are skipped on disk).
    expected_sop_uid, expected_sop_class_uid : str, optional
        The Affected SOP Instance/Class UID of the C-STORE request; a dataset that
        disagrees is rejected.

    Returns
    -------
    InstanceHeader

    Raises
    ------
    InstanceRejectedError
        The dataset cannot be decoded, is truncated, lacks a required UID or does
        not match the request.
    """
    if isinstance(encoded, Path):
        # In memory: pydicom asks for the position at every element, a system call on a
        # file object but free on BytesIO; reading 0.5 MB from the page cache costs less.
        encoded = encoded.read_bytes()
    return _parse(io.BytesIO(encoded), len(encoded), expected_sop_uid, expected_sop_class_uid)


def _parse(fp: BinaryIO, size: int, expected_sop_uid: str | None,
           expected_sop_class_uid: str | None) -> InstanceHeader:
    try:
        # Large values are skipped, not read; a malformed value of an attribute the node
        # does not use is kept as received (refusing it would lose the study).
        ds = pydicom.dcmread(fp, defer_size=1024)
    except Exception as exc:
        raise InstanceRejectedError(f"Dataset cannot be decoded: {type(exc).__name__}",
                                    "undecodable") from exc
    if fp.tell() > size:
        raise InstanceRejectedError(
            f"Dataset is truncated: elements run to byte {fp.tell()} of {size}", "truncated"
        )
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    sop_uid = _required_uid(ds, "SOPInstanceUID")
    sop_class = _required_uid(ds, "SOPClassUID")
    study_uid = _required_uid(ds, "StudyInstanceUID")
    series_uid = _required_uid(ds, "SeriesInstanceUID")
    if expected_sop_uid and sop_uid != expected_sop_uid.strip():
        raise InstanceRejectedError(
            "Invalid 'SOPInstanceUID' - differs from the request's Affected SOP Instance UID",
            "sop_mismatch",
        )
    if expected_sop_class_uid and sop_class != expected_sop_class_uid.strip():
        raise InstanceRejectedError(
            f"Invalid 'SOPClassUID' value '{sop_class}' - differs from the request's "
            f"Affected SOP Class UID '{expected_sop_class_uid}'",
            "sop_mismatch",
        )
    _check_pixel_length(ds, ts)
    orientation, position = _slice_position(ds)
    return InstanceHeader(
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax_uid=ts,
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        modality=_text(ds, "Modality", 16),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part=_text(ds, "BodyPartExamined", 16),
        instance_number=_int(ds, "InstanceNumber"),
        image_type=_text(ds, "ImageType", 128),
        orientation=orientation,
        slice_position=position,
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
    )


def _check_pixel_length(ds: Dataset, ts: str) -> None:
    raw = ds._dict.get(Tag(PIXEL_DATA))  # the raw element: its length without reading the value
    if raw is None or not ts:
        return
    try:
        if UID(ts).is_compressed:
            return
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = _int(ds, "NumberOfFrames") or 1
    except (AttributeError, TypeError, ValueError):
        return
    expected = (rows * cols * frames * samples * bits + 7) // 8
    length = getattr(raw, "length", None)
    if length is not None and length != 0xFFFFFFFF and length < expected:
        raise InstanceRejectedError(
            f"Invalid 'PixelData' - {length} bytes where Rows x Columns x frames needs "
            f"{expected}",
            "truncated",
        )
