"""Header checks on received bytes: values read from raw elements, refusals named."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from dicomnode.store.header import InstanceRejectedError, parse_header
from tests.factories import ct_slice


def _encode(ds: object, implicit: bool = False) -> bytes:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # type: ignore[attr-defined]
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


@pytest.mark.parametrize("implicit", [False, True])
def test_values_match_pydicom(implicit: bool, tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 12.5, 3, images_in_acquisition=40)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal: normal along -x
    ds.ImagePositionPatient = [-7.25, -100.0, 50.0]
    ds.SeriesDescription = "Abdomen portal venous "
    ds.BodyPartExamined = "ABDOMEN"
    data = _encode(ds, implicit)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    for source in (data, path):
        h = parse_header(source, expected_sop_uid=ds.SOPInstanceUID)
        assert (h.sop_uid, h.study_uid, h.series_uid) == (
            ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert h.image_type == "ORIGINAL\\PRIMARY\\AXIAL"
        assert h.instance_number == 4 and h.images_in_acquisition == 40
        assert h.slice_position == pytest.approx(7.25)
        assert h.series_description == "Abdomen portal venous"
        assert h.body_part == "ABDOMEN" and h.modality == "CT"
        assert h.patient_id == "SECRET-ID-42"


def test_refusals_name_the_attribute() -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    with pytest.raises(InstanceRejectedError, match="SOPInstanceUID"):
        parse_header(_encode(ds), expected_sop_uid="1.2.3")
    del ds.SeriesInstanceUID
    with pytest.raises(InstanceRejectedError, match="SeriesInstanceUID") as err:
        parse_header(_encode(ds))
    assert err.value.code == "missing_uid"
    ok = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    with pytest.raises(InstanceRejectedError) as err:
        parse_header(_encode(ok)[:-50])
    assert err.value.code == "truncated"


# --- the fast reader: same header as pydicom, pydicom for what it does not take -------

def _pydicom_header(data: bytes) -> object:
    from dicomnode.store.header import _parse

    return _parse(BytesIO(data), len(data), None, None)


def _variants() -> dict[str, bytes]:
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGLSLossless

    out = {}
    base = ct_slice(generate_uid(), generate_uid(), -3.5, 7)
    out["explicit"] = _encode(base)
    out["implicit"] = _encode(ct_slice(generate_uid(), generate_uid(), 1.0, 1), implicit=True)
    seq = ct_slice(generate_uid(), generate_uid(), 2.0, 2)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "T-62000", "SRT"
    inner = Dataset()
    inner.CodeMeaning = "nested"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    seq.AnatomicRegionSequence = Sequence([item, Dataset()])
    seq.add_new(0x00091010, "OB", b"\x01" * 70_000)   # a private value past the first 64 KiB
    out["sequences_and_long_private"] = _encode(seq)
    enc = ct_slice(generate_uid(), generate_uid(), 3.0, 3)
    enc.file_meta.TransferSyntaxUID = JPEGLSLossless
    enc.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9"])
    enc["PixelData"].VR = "OB"
    out["encapsulated"] = _encode(enc)
    return out


def _undefined_length_sequences(data: bytes) -> bytes:
    """Re-encode with undefined-length sequences and items (as many scanners send)."""
    from pydicom import dcmread

    ds = dcmread(BytesIO(data))
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["explicit", "implicit", "sequences_and_long_private",
                                  "encapsulated", "undefined_lengths"])
def test_fast_reader_gives_pydicoms_header(name: str, tmp_path: Path) -> None:
    from dicomnode.store.header import _read_fast, _walk_file

    variants = _variants()
    variants["undefined_lengths"] = _undefined_length_sequences(
        variants["sequences_and_long_private"])
    data = variants[name]
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    _walk_file(data, len(data))          # taken by the fast reader, no fallback
    _read_fast(path)
    expected = _pydicom_header(data)
    assert parse_header(data) == expected
    assert parse_header(path) == expected


def test_fast_reader_leaves_other_encodings_and_bad_lengths_to_pydicom(tmp_path: Path) -> None:
    from dicomnode.store.header import _FallbackError, _walk_file

    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"   # deflated
    data = _encode(ds)
    with pytest.raises(_FallbackError):
        _walk_file(data, len(data))
    assert parse_header(data) == _pydicom_header(data)
    ok = _encode(ct_slice(generate_uid(), generate_uid(), 0.0, 0))
    for bad in (ok[:-50], ok[:100], b"\x00" * 132 + b"garbage"):
        with pytest.raises(_FallbackError):
            _walk_file(bad, len(bad))
        with pytest.raises(InstanceRejectedError):
            parse_header(bad)
    short = tmp_path / "short.dcm"
    short.write_bytes(ok[:-50])
    with pytest.raises(InstanceRejectedError) as err:
        parse_header(short)
    assert err.value.code == "truncated"


def test_fast_reader_edge_cases_agree_with_pydicom(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from dicomnode.store.header import _FallbackError, _walk_file

    # a UID longer than 64 characters is refused, not cut to 64 (it could merge studies)
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.StudyInstanceUID = "1.2." + "3" * 100
    with pytest.raises(InstanceRejectedError) as err:
        parse_header(_encode(ds))
    assert err.value.code == "missing_uid"
    # NumberOfFrames 0 counts as one frame, as pydicom's path does: short pixels refused
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.NumberOfFrames = 0
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(InstanceRejectedError) as err:
        parse_header(_encode(ds))
    assert err.value.code == "truncated"
    # a value longer than pydicom's defer size goes to pydicom (one behaviour for both)
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.SeriesDescription = "x" * 1030
    data = _encode(ds)
    with pytest.raises(_FallbackError):
        _walk_file(data, len(data))
    assert parse_header(data) == _pydicom_header(data)
    # deeply nested undefined-length sequences: pydicom decides, never a RecursionError
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    inner = Dataset()
    inner.CodeMeaning = "deep"
    for _ in range(40):
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        inner = outer
    ds.ContentSequence = Sequence([inner])
    data = _undefined_length_sequences(_encode(ds))
    with pytest.raises(_FallbackError):
        _walk_file(data, len(data))
    assert parse_header(data) == _pydicom_header(data)


def test_fast_reader_falls_back_on_bytes_that_are_not_a_vr() -> None:
    from dicomnode.store.header import _FallbackError, _walk_file

    data = bytearray(_encode(ct_slice(generate_uid(), generate_uid(), 0.0, 0)))
    at = data.index(b"\x08\x00\x60\x00CS")       # Modality's explicit VR
    data[at + 4:at + 6] = b"\x00\x01"
    with pytest.raises(_FallbackError):
        _walk_file(bytes(data), len(data))


# --- what cannot be a stored instance: refused as undecodable (0xC210) ----------------

def _meta_then(body: bytes) -> bytes:
    """A Part 10 file whose File Meta Information (explicit VR LE) is followed by ``body``."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    buf.write(body)
    return buf.getvalue()


def _refusal(data: bytes, tmp_path: Path) -> list[InstanceRejectedError]:
    """The refusal of ``data`` read from bytes and from a file (the two readers)."""
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    errors = []
    for source in (data, path):
        with pytest.raises(InstanceRejectedError) as err:
            parse_header(source)
        errors.append(err.value)
    return errors


@pytest.mark.parametrize("body", [b"", b"\0" * 1000, b"\x08\x00\x18\x00UI"],
                         ids=["empty", "all_zero", "cut_inside_the_first_header"])
def test_empty_all_zero_or_cut_data_sets_cannot_be_decoded(body: bytes, tmp_path: Path) -> None:
    for error in _refusal(_meta_then(body), tmp_path):
        assert error.code in ("undecodable", "truncated"), error.reason


@pytest.mark.parametrize("tail", [b"\x10\x00\x10", b"\x10\x00\x10\x00PN\x04"])
def test_a_data_set_that_ends_inside_an_element_header_is_truncated(tail: bytes,
                                                                    tmp_path: Path) -> None:
    whole = _encode(ct_slice(generate_uid(), generate_uid(), 0.0, 0))
    for error in _refusal(whole + tail, tmp_path):
        assert error.code == "truncated"
    assert parse_header(whole + b"\0" * len(tail)) == parse_header(whole)  # zero padding


@pytest.mark.parametrize("pixels", [b"", b"\0" * 2048])
def test_an_image_without_rows_or_columns_is_refused(pixels: bytes, tmp_path: Path) -> None:
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.Rows, ds.Columns, ds.PixelData = 0, 0, pixels
    for error in _refusal(_encode(ds), tmp_path):
        assert error.code == "invalid_image"
        assert "Rows" in error.reason and "Columns" in error.reason


def test_an_image_too_large_to_decode_is_refused_whatever_its_encoding(tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.Rows = ds.Columns = 65535
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])    # a 4-byte fragment for 8 GiB
    ds["PixelData"].VR = "OB"
    for error in _refusal(_encode(ds), tmp_path):
        assert error.code == "invalid_image"
    native = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    native.Rows = native.Columns = 65535
    for error in _refusal(_encode(native), tmp_path):
        assert error.code == "invalid_image"


def test_file_meta_elements_inside_the_data_set_are_refused(tmp_path: Path) -> None:
    data = _encode(ct_slice(generate_uid(), generate_uid(), 0.0, 0))
    end = 144 + int.from_bytes(data[140:144], "little")       # after the group length's group
    claim = b"\x02\x00\x10\x00UI\x12\x00" + b"1.2.840.10008.1.2\x00"   # "implicit VR"
    for error in _refusal(data[:end] + claim + data[end:], tmp_path):
        assert error.code == "undecodable"
        assert "0002" in error.reason


def test_images_at_the_limits_are_still_taken_by_the_fast_reader() -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    from dicomnode.store.header import _walk_file

    one = ct_slice(generate_uid(), generate_uid(), 0.0, 0, rows=1, cols=1)
    enc = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    enc.file_meta.TransferSyntaxUID = JPEGLSLossless
    enc.Rows = enc.Columns = 8192                          # 128 MiB a frame: allowed
    enc.PixelData = encapsulate([b"\xff\xd8" + b"\x00" * 100 + b"\xff\xd9"])
    enc["PixelData"].VR = "OB"
    for ds in (one, enc):
        data = _encode(ds)
        _walk_file(data, len(data))
        assert parse_header(data).sop_uid == ds.SOPInstanceUID


def test_a_header_attribute_with_an_unknown_vr_is_refused_not_stored(tmp_path: Path) -> None:
    # Found by the fuzz campaign: SOP Instance UID with the VR "KI" passed the fast reader,
    # was stored and acknowledged, and no reader could open the file afterwards.
    data = bytearray(_encode(ct_slice(generate_uid(), generate_uid(), 0.0, 0)))
    at = data.index(b"\x08\x00\x18\x00UI")
    data[at + 4:at + 6] = b"KI"
    for error in _refusal(bytes(data), tmp_path):
        assert error.code == "undecodable", error.reason
