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
