"""same_instance: a resend is the same instance, other content under the same UID is not."""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, RLELossless, generate_uid

from dicomnode.store.duplicate import same_instance
from tests.factories import ct_slice


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _slice() -> Dataset:
    return ct_slice(generate_uid(), generate_uid(), 0.0, 0)


def test_the_same_bytes_are_the_same_instance(tmp_path: Path) -> None:
    ds = _slice()
    assert same_instance(_write(ds, tmp_path / "a.dcm"), _write(ds, tmp_path / "b.dcm"))


def test_another_file_meta_is_the_same_instance(tmp_path: Path) -> None:
    ds = _slice()
    again = copy.deepcopy(ds)
    again.file_meta.ImplementationVersionName = "OTHER_SENDER"
    again.file_meta.SourceApplicationEntityTitle = "ARCHIVE"
    assert same_instance(_write(ds, tmp_path / "a.dcm"), _write(again, tmp_path / "b.dcm"))


def test_another_transfer_syntax_is_the_same_instance(tmp_path: Path) -> None:
    ds = _slice()
    implicit = copy.deepcopy(ds)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    rle = copy.deepcopy(ds)
    rle.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    a = _write(ds, tmp_path / "a.dcm")
    assert same_instance(a, _write(implicit, tmp_path / "implicit.dcm"))
    assert same_instance(a, _write(rle, tmp_path / "rle.dcm"))


def test_other_pixels_are_another_instance(tmp_path: Path) -> None:
    ds = _slice()
    changed = copy.deepcopy(ds)
    changed.PixelData = bytes(len(ds.PixelData))
    rle = copy.deepcopy(changed)
    rle.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    a = _write(ds, tmp_path / "a.dcm")
    assert not same_instance(a, _write(changed, tmp_path / "b.dcm"))
    assert not same_instance(a, _write(rle, tmp_path / "rle.dcm"))


def test_another_patient_value_or_an_extra_element_is_another_instance(
        tmp_path: Path) -> None:
    ds = _slice()
    renamed = copy.deepcopy(ds)
    renamed.PatientName = "Other^Person"
    extra = copy.deepcopy(ds)
    extra.StudyDescription = "CT abdomen"
    a = _write(ds, tmp_path / "a.dcm")
    assert not same_instance(a, _write(renamed, tmp_path / "b.dcm"))
    assert not same_instance(a, _write(extra, tmp_path / "c.dcm"))


def test_an_unreadable_file_is_not_the_same_instance(tmp_path: Path) -> None:
    a = _write(_slice(), tmp_path / "a.dcm")
    broken = tmp_path / "b.dcm"
    broken.write_bytes(a.read_bytes()[:300])
    assert not same_instance(a, broken)
    assert not same_instance(tmp_path / "gone.dcm", a)
