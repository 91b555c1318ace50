"""Read and check the header of a received instance without decoding its pixels.

The whole encoded dataset is walked (large values are skipped, not read) so that a
dataset whose element lengths run past its end is caught here, before it reaches
the spool. Only the attributes the index needs are kept.

Two readers give the same :class:`InstanceHeader`. The C-STORE handler runs on every
received instance, so the common encodings (explicit and implicit VR little endian,
encapsulated pixel data) are walked by :func:`_walk`: element headers only, the
~20 values the index needs copied out, sequences and pixel data hopped over, about
a tenth of what ``pydicom.dcmread`` costs. Anything it does not expect (big endian,
deflate, undefined-length UN, a length past the end, a missing UID, a pixel-data
length that does not match the image) goes to ``pydicom``, which reads it or names
what is wrong: the fast reader refuses nothing itself, except a file that ends inside an
element header (pydicom drops such a tail silently; a tail of zero bytes, padding, is
taken).

Beyond what pydicom refuses, a data set is refused when it has no data element at all
(empty, or zeros), when it carries File Meta elements (group 0002: they would be read as
the file's own, its transfer syntax included), and when its image attributes describe no
possible image (Rows or Columns 0, a frame larger than ``MAX_FRAME_BYTES``).
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import VR

_UID = re.compile(r"^[0-9A-Za-z.\-_]{1,64}$")
PIXEL_DATA = 0x7FE00010
#: Largest decoded frame the node takes (256 MiB: 8192 x 8192 at 32 bits); a CT slice is
#: 0.5 MiB. Rows and Columns go to 65535, so a header alone could ask a reader for 16 GiB.
MAX_FRAME_BYTES = 2**28


class InstanceRejectedError(ValueError):
    """A received dataset that must not be stored.

    Parameters
    ----------
    reason : str
        Human-readable reason naming the attribute at fault (UIDs, never patient values).
    code : str
        One of ``undecodable``, ``truncated``, ``invalid_image``, ``missing_uid``,
        ``sop_mismatch`` (the header), ``series_in_other_study``,
        ``study_of_other_patient``, ``sop_conflict`` (the index: a UID already stored
        under another study or patient, or with other content).
    comment : str, optional
        What the sender is told (a DIMSE ErrorComment holds 64 characters); ``reason``
        when it fits.
    """

    def __init__(self, reason: str, code: str, comment: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.comment = comment if comment is not None else reason


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


#: Reads one attribute's value as text ("" when absent), by keyword.
_Getter = Callable[[str], str]


def _dataset_text(ds: Dataset) -> _Getter:
    """A text getter over pydicom's (mostly raw) elements."""
    def get(keyword: str) -> str:
        elem = ds._dict.get(_TAGS[keyword])
        if elem is None:
            return ""
        value = elem.value
        if isinstance(value, bytes):
            return value.decode("latin-1")
        if value is None:
            return ""
        if isinstance(value, pydicom.multival.MultiValue):
            return "\\".join(str(v) for v in value)
        return str(value)
    return get


def _text(get: _Getter, keyword: str, limit: int = 64) -> str:
    return get(keyword).strip("\x00 ")[:limit]


def _int(get: _Getter, keyword: str) -> int | None:
    try:
        text = _text(get, keyword)
        return int(text) if text else None
    except ValueError:
        return None


def _numbers(get: _Getter, keyword: str) -> list[float]:
    return [float(v) for v in _text(get, keyword, 1024).split("\\") if v.strip()]


def _slice_position(get: _Getter) -> tuple[str, float | None]:
    try:
        iop = _numbers(get, "ImageOrientationPatient")
        ipp = _numbers(get, "ImagePositionPatient")
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


def _required_uid(get: _Getter, keyword: str) -> str:
    value = _text(get, keyword, 1024)  # not cut to 64 first: a longer UID is refused
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
    try:
        if isinstance(encoded, Path):
            get, ts = _read_fast(encoded)
        else:
            get, ts = _walk_file(encoded, len(encoded))
        return _header(get, ts, expected_sop_uid, expected_sop_class_uid)
    except _TruncatedError as exc:
        raise InstanceRejectedError(
            f"Dataset is truncated: an element header is cut at byte {exc.position} of "
            f"{exc.size}", "truncated") from None
    except (_FallbackError, _NeedMoreError, InstanceRejectedError, RecursionError):
        pass  # pydicom reads it again and accepts it or says what is wrong
    if isinstance(encoded, Path):
        # In memory: pydicom asks for the position at every element, a system call on a
        # file object but free on BytesIO; reading 0.5 MB from the page cache costs less.
        encoded = encoded.read_bytes()
    if _meta_in_dataset(encoded):
        raise InstanceRejectedError(
            "Invalid data set - File Meta Information elements (group 0002) follow the "
            "File Meta group; they would be read as the file's own (its transfer syntax)",
            "undecodable", "Data set holds File Meta (0002) elements")
    return _parse(io.BytesIO(encoded), len(encoded), expected_sop_uid, expected_sop_class_uid)


def _meta_in_dataset(data: bytes | memoryview) -> bool:
    """Whether a group 0002 element follows the File Meta group its group length bounds."""
    if len(data) < 146 or bytes(data[132:138]) != b"\x02\x00\x00\x00UL":
        return False
    end = 144 + _UNPACK_U32(data, 140)[0]
    return bytes(data[end:end + 2]) == b"\x02\x00"


def _read_fast(path: Path) -> tuple[_Getter, str]:
    """Walk a file's header from its first 64 KiB (all of it when the header is longer).

    Raises
    ------
    _FallbackError, _NeedMoreError
        pydicom must read this file.
    """
    with path.open("rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(_HEAD_BYTES)
        try:
            return _walk_file(head, size)
        except _NeedMoreError:
            rest = fh.read()
    return _walk_file(head + rest, size)


def _parse(fp: BinaryIO, size: int, expected_sop_uid: str | None,
           expected_sop_class_uid: str | None) -> InstanceHeader:
    try:
        # Large values are skipped, not read; a malformed value of an attribute the node
        # does not use is kept as received (refusing it would lose the study).
        ds = pydicom.dcmread(fp, defer_size=_DEFER_SIZE)
    except Exception as exc:
        raise InstanceRejectedError(f"Dataset cannot be decoded: {type(exc).__name__}",
                                    "undecodable") from exc
    if fp.tell() > size:
        raise InstanceRejectedError(
            f"Dataset is truncated: elements run to byte {fp.tell()} of {size}", "truncated"
        )
    if not any(tag.group >= 0x0008 for tag in ds._dict):
        raise InstanceRejectedError("Dataset cannot be decoded: it holds no data element",
                                    "undecodable")
    for tag in _WANTED:
        # the node reads these raw, but every later reader (the pipelines' pydicom) fails
        # on a VR it does not know (a "KI", seen in the fuzz campaign): refuse, not store
        elem = ds._dict.get(Tag(tag))
        vr = getattr(elem, "VR", None)
        if elem is not None and vr is not None and vr.encode("latin-1") not in _KNOWN_VRS:
            raise InstanceRejectedError(
                f"Dataset cannot be decoded: {Tag(tag)} has the unknown VR '{vr}'",
                "undecodable")
    ts = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    try:
        header = _header(_dataset_text(ds), ts, expected_sop_uid, expected_sop_class_uid)
        _check_image(ds, ts)
    except InstanceRejectedError:
        raise
    except Exception as exc:
        # pydicom reads values when they are used: an attribute the node needs whose
        # value or VR cannot be read (a VR of "KI", seen in the fuzz campaign) would
        # fail every later reader too, so the instance is refused, not stored
        raise InstanceRejectedError(
            f"Dataset cannot be decoded: {type(exc).__name__} reading its header",
            "undecodable") from exc
    return header


def _header(get: _Getter, ts: str, expected_sop_uid: str | None,
            expected_sop_class_uid: str | None) -> InstanceHeader:
    """Check the UIDs and collect the index's attributes."""
    sop_uid = _required_uid(get, "SOPInstanceUID")
    sop_class = _required_uid(get, "SOPClassUID")
    study_uid = _required_uid(get, "StudyInstanceUID")
    series_uid = _required_uid(get, "SeriesInstanceUID")
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
    orientation, position = _slice_position(get)
    return InstanceHeader(
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax_uid=ts,
        patient_id=_text(get, "PatientID"),
        issuer=_text(get, "IssuerOfPatientID"),
        accession_number=_text(get, "AccessionNumber", 16),
        study_date=_text(get, "StudyDate", 8),
        modality=_text(get, "Modality", 16),
        series_number=_int(get, "SeriesNumber"),
        series_description=_text(get, "SeriesDescription"),
        body_part=_text(get, "BodyPartExamined", 16),
        instance_number=_int(get, "InstanceNumber"),
        image_type=_text(get, "ImageType", 128),
        orientation=orientation,
        slice_position=position,
        images_in_acquisition=_int(get, "ImagesInAcquisition"),
    )


def _check_image(ds: Dataset, ts: str) -> None:
    """Refuse pixel data whose image attributes describe no possible image, or that is
    shorter than they need."""
    raw = ds._dict.get(Tag(PIXEL_DATA))  # the raw element: its length without reading the value
    if raw is None:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return
    if rows <= 0 or cols <= 0:
        raise InstanceRejectedError(
            f"Invalid 'Rows' x 'Columns' value {rows} x {cols} - an image has at least one "
            "row and one column", "invalid_image")
    try:
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = _int(_dataset_text(ds), "NumberOfFrames") or 1
    except (AttributeError, TypeError, ValueError):
        return
    frame = (rows * cols * max(samples, 1) * bits + 7) // 8
    if frame > MAX_FRAME_BYTES:
        raise InstanceRejectedError(
            f"Invalid 'Rows' x 'Columns' value {rows} x {cols} - one frame of {frame} bytes "
            f"is more than the {MAX_FRAME_BYTES} bytes the node takes", "invalid_image")
    if not ts or UID(ts).is_compressed:
        return
    expected = (rows * cols * frames * samples * bits + 7) // 8
    length = getattr(raw, "length", None)
    if length is not None and length != 0xFFFFFFFF and length < expected:
        raise InstanceRejectedError(
            f"Invalid 'PixelData' - {length} bytes where Rows x Columns x frames needs "
            f"{expected}",
            "truncated",
        )


# ---------------------------------------------------------------------------------------
# The fast reader

_HEAD_BYTES = 64 * 1024
#: Values longer than this are not read by pydicom's path (``defer_size``).
_DEFER_SIZE = 1024
#: Nested undefined-length sequences deeper than this go to pydicom.
_MAX_DEPTH = 32
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})
#: The VRs of PS3.5 (pydicom's list): anything else goes to pydicom, which reads it raw.
_KNOWN_VRS = frozenset(vr.value.encode() for vr in VR)
_IMPLICIT_LE = "1.2.840.10008.1.2"
#: Transfer syntaxes whose dataset pydicom must read (byte order, compression of the
#: whole dataset).
_SLOW_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
#: Native (uncompressed) pixel data: its length must fit the image.
_NATIVE_SYNTAXES = frozenset({_IMPLICIT_LE, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                              "1.2.840.10008.1.2.1.99"})
_TRANSFER_SYNTAX = 0x00020010
_GROUP_LENGTH = 0x00020000
_ROWS, _COLUMNS, _SAMPLES, _BITS = 0x00280010, 0x00280011, 0x00280002, 0x00280100
_TAG_NUMBERS = {kw: int(tag) for kw, tag in _TAGS.items()}
_WANTED = frozenset(set(_TAG_NUMBERS.values()) | {_ROWS, _COLUMNS, _SAMPLES, _BITS})
_UNPACK_TAG = struct.Struct("<HH").unpack_from
_UNPACK_U16 = struct.Struct("<H").unpack_from
_UNPACK_U32 = struct.Struct("<I").unpack_from


class _FallbackError(Exception):
    """Internal: the fast reader leaves this dataset to pydicom."""


class _NeedMoreError(Exception):
    """Internal: the header runs past the bytes read so far."""


class _TruncatedError(Exception):
    """Internal: the file ends inside an element header (pydicom would drop the tail)."""

    def __init__(self, position: int, size: int) -> None:
        super().__init__(position, size)
        self.position = position
        self.size = size


def _walk_file(buf: bytes | memoryview, size: int) -> tuple[_Getter, str]:
    """Walk preamble, file meta and dataset of a Part 10 file held (at least) in ``buf``.

    ``size`` is the whole file's length; ``buf`` may be its first bytes only, as long as
    every element header lies inside it (values past its end are only hopped over).

    Returns
    -------
    tuple
        A text getter for the index's attributes and the transfer syntax UID.

    Raises
    ------
    _FallbackError
        pydicom must read this dataset (or refuse it).
    _NeedMoreError
        ``buf`` ends before the last element header.
    """
    if size < 132 or bytes(buf[128:132]) != b"DICM":
        raise _FallbackError
    meta: dict[int, bytes] = {}
    pos = 132
    while True:
        if pos + 8 > size:
            if pos < size:
                raise _TruncatedError(pos, size)
            raise _FallbackError          # no data set at all: pydicom's path refuses it
        if pos + 8 > len(buf):
            raise _NeedMoreError
        if _UNPACK_U16(buf, pos)[0] != 0x0002:
            break
        if len(meta.get(_GROUP_LENGTH, b"")) == 4 and pos >= 144 + _UNPACK_U32(
                meta[_GROUP_LENGTH])[0]:
            raise _FallbackError          # group 0002 inside the data set: refused there
        pos = _walk(buf, pos, size, True, None, meta, stop_group=0x0002)
    ts = bytes(meta.get(_TRANSFER_SYNTAX, b"")).decode("latin-1").strip("\x00 ")
    if not ts or ts in _SLOW_SYNTAXES:
        raise _FallbackError
    values: dict[int, bytes] = {}
    pixel_length = _walk_dataset(buf, pos, size, ts != _IMPLICIT_LE, values)
    if pixel_length is not None:  # -1: encapsulated
        if any(len(values.get(tag, b"")) != 2 for tag in (_ROWS, _COLUMNS, _BITS)) or (
                _SAMPLES in values and len(values[_SAMPLES]) != 2):
            raise _FallbackError
        rows = _UNPACK_U16(values[_ROWS])[0]
        cols = _UNPACK_U16(values[_COLUMNS])[0]
        bits = _UNPACK_U16(values[_BITS])[0]
        samples = max(_UNPACK_U16(values[_SAMPLES])[0] if _SAMPLES in values else 1, 1)
        if not rows or not cols or (rows * cols * samples * bits + 7) // 8 > MAX_FRAME_BYTES:
            raise _FallbackError          # no possible image: pydicom's path says why
        if ts in _NATIVE_SYNTAXES:
            frames_text = values.get(_TAG_NUMBERS["NumberOfFrames"], b"").strip(b"\x00 ")
            try:
                frames = (int(frames_text) if frames_text else 1) or 1  # as pydicom's path
            except ValueError:
                raise _FallbackError from None
            if pixel_length < (rows * cols * frames * samples * bits + 7) // 8:
                raise _FallbackError
    def get(keyword: str) -> str:
        value = values.get(_TAG_NUMBERS[keyword])
        return "" if value is None else value.decode("latin-1")

    return get, ts


def _walk_dataset(buf: bytes | memoryview, pos: int, size: int, explicit: bool,
                  values: dict[int, bytes]) -> int | None:
    """Walk the top-level dataset; returns the pixel data's length (-1: encapsulated; None:
    no pixel data)."""
    pixel: list[int] = []
    _walk(buf, pos, size, explicit, None, values, pixel=pixel)
    return pixel[0] if pixel else None


def _walk(buf: bytes | memoryview, pos: int, end: int, explicit: bool, stop: int | None,
          values: dict[int, bytes] | None, *, stop_group: int | None = None,
          pixel: list[int] | None = None, depth: int = 0) -> int:
    """Walk elements from ``pos`` to ``end`` (or to the ``stop`` delimiter).

    Values of wanted top-level tags go into ``values`` (None: inside a sequence, keep
    nothing). With ``stop_group``, returns after the first element of that group
    (the file meta group is walked one element at a time by its caller). ``depth``
    counts nested undefined-length items; past ``_MAX_DEPTH`` pydicom takes over.
    """
    if depth > _MAX_DEPTH:
        raise _FallbackError
    have = len(buf)
    while pos < end:
        if pos + 8 > end:
            if stop is not None:
                raise _FallbackError
            if end > have:
                raise _NeedMoreError
            if any(buf[pos:end]):
                raise _TruncatedError(pos, end)
            return end                    # zero padding (pydicom skips it too)
        if pos + 8 > have:
            raise _NeedMoreError
        group, element = _UNPACK_TAG(buf, pos)
        tag = group << 16 | element
        if tag == stop:
            return pos + 8
        if group == 0xFFFE:
            raise _FallbackError          # an item or delimiter where none belongs
        vr = b""
        if explicit:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr not in _KNOWN_VRS:
                raise _FallbackError      # not a VR: pydicom guesses the encoding
            if vr in _LONG_VRS:
                if pos + 12 > end and stop is None:
                    raise _TruncatedError(pos, end)
                if pos + 12 > have:
                    raise _NeedMoreError
                length = _UNPACK_U32(buf, pos + 8)[0]
                pos += 12
            else:
                length = _UNPACK_U16(buf, pos + 6)[0]
                pos += 8
        else:
            length = _UNPACK_U32(buf, pos + 4)[0]
            pos += 8
        if length == 0xFFFFFFFF:
            if tag == PIXEL_DATA:
                if values is not None and pixel is not None:
                    pixel.append(-1)
                pos = _hop_fragments(buf, pos, end)
            elif vr in (b"SQ", b""):
                pos = _hop_sequence(buf, pos, end, explicit, depth + 1)
            else:
                raise _FallbackError      # undefined-length UN: implicit VR inside
            continue
        if pos + length > end:
            raise _FallbackError          # truncated: pydicom says so
        if values is not None:
            if tag == PIXEL_DATA and pixel is not None:
                pixel.append(length)
            elif tag in _WANTED or group == stop_group:
                if length > _DEFER_SIZE and group != stop_group:
                    raise _FallbackError  # pydicom's path defers it: keep one behaviour
                if pos + length > have:
                    raise _NeedMoreError
                values[tag] = bytes(buf[pos:pos + length])
        pos += length
        if stop_group is not None:
            return pos
    if stop is not None:
        raise _FallbackError              # the delimiter never came
    return pos


def _item_header(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """Tag and length of the item or delimiter at ``pos``, and the position after them."""
    if pos + 8 > end:
        raise _FallbackError
    if pos + 8 > len(buf):
        raise _NeedMoreError
    group, element = _UNPACK_TAG(buf, pos)
    return group << 16 | element, _UNPACK_U32(buf, pos + 4)[0], pos + 8


def _hop_sequence(buf: bytes | memoryview, pos: int, end: int, explicit: bool,
                  depth: int) -> int:
    """Skip the items of an undefined-length sequence; returns the position after it."""
    while True:
        tag, length, pos = _item_header(buf, pos, end)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _FallbackError
        if length == 0xFFFFFFFF:
            pos = _walk(buf, pos, end, explicit, _ITEM_END, None, depth=depth)
        elif pos + length > end:
            raise _FallbackError
        else:
            pos += length


def _hop_fragments(buf: bytes | memoryview, pos: int, end: int) -> int:
    """Skip encapsulated pixel data (offset table and fragments) to its delimiter."""
    while True:
        tag, length, pos = _item_header(buf, pos, end)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM or length == 0xFFFFFFFF or pos + length > end:
            raise _FallbackError
        pos += length
