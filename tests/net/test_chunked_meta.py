"""File Meta Information of chunked receives: the same bytes as pydicom's, installed only
while a node listens."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import dimse_messages
from pynetdicom.dsutils import create_file_meta

from dicomnode.config import Settings
from dicomnode.net import direct_encoding
from dicomnode.node import Node
from tests.factories import write_series


def _pydicom_bytes(**values: str) -> bytes:
    out = DicomBytesIO()
    write_file_meta_info(out, create_file_meta(**values))
    return out.getvalue()


@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2",
                                       "1.2.840.10008.5.1.4.1.1.7",
                                       "1.2.840.10008.5.1.4.1.1.88.67"])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", generate_uid(), "9" * 64])
@pytest.mark.parametrize("transfer_syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                             "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"])
def test_bytes_equal_pydicoms(sop_class: str, sop_instance: str, transfer_syntax: str) -> None:
    values = {"sop_class_uid": sop_class, "sop_instance_uid": sop_instance,
              "transfer_syntax": transfer_syntax}
    assert direct_encoding.encode_file_meta(**values) == _pydicom_bytes(**values)


@pytest.mark.parametrize("version", ["ODD", "EVEN", "SIXTEEN_LETTERS_"])
def test_implementation_values_are_padded_like_pydicom(version: str) -> None:
    values = {"sop_class_uid": "1.2.3", "sop_instance_uid": "1.2.3.4",
              "transfer_syntax": "1.2.840.10008.1.2.1", "implementation_uid": "1.2.34",
              "implementation_version": version}
    assert direct_encoding.encode_file_meta(**values) == _pydicom_bytes(**values)


def test_values_it_cannot_encode_go_back_to_pydicom() -> None:
    original = dimse_messages.create_file_meta
    assert direct_encoding.install_file_meta()
    try:
        assert not direct_encoding.install_file_meta()  # once only
        meta = dimse_messages.create_file_meta(sop_class_uid="1.2.3", sop_instance_uid="1.2.é",
                                               transfer_syntax="1.2.840.10008.1.2.1")
        assert isinstance(meta, pydicom.dataset.FileMetaDataset)
        out = DicomBytesIO()
        dimse_messages.write_file_meta_info(out, meta)
        assert out.getvalue().startswith(b"\x02\x00\x00\x00UL")
        missing = dimse_messages.create_file_meta(sop_class_uid="1.2.3", sop_instance_uid=None,
                                                  transfer_syntax="1.2.840.10008.1.2.1")
        assert isinstance(missing, pydicom.dataset.FileMetaDataset)
    finally:
        direct_encoding.uninstall_file_meta()
    assert dimse_messages.create_file_meta is original


@pytest.mark.parametrize("direct", [True, False])
def test_node_installs_it_while_listening_and_files_read_back(settings: Settings,
                                                              tmp_path: Path,
                                                              direct: bool) -> None:
    original = dimse_messages.write_file_meta_info
    node = Node(settings.model_copy(update={"direct_encoding": direct}))
    node.start()
    try:
        assert (dimse_messages.write_file_meta_info is not original) == direct
        paths = write_series(tmp_path / "in", 4)
        out = subprocess.run(["storescu", "-aec", settings.ae_title, "127.0.0.1",
                              str(node.scp.port), *map(str, paths)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        stored = sorted((node.spool.root / "instances").rglob("*.dcm"))
    finally:
        node.stop()
    assert dimse_messages.write_file_meta_info is original
    assert len(stored) == 4
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    for path in stored:
        ds = pydicom.dcmread(path)
        meta = ds.file_meta
        original_ds = sent[ds.SOPInstanceUID]
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == original_ds.SOPClassUID
        assert meta.TransferSyntaxUID == original_ds.file_meta.TransferSyntaxUID
        assert ds.PixelData == original_ds.PixelData
        # the group as pydicom would write it
        raw = path.read_bytes()
        expected = _pydicom_bytes(sop_class_uid=meta.MediaStorageSOPClassUID,
                                  sop_instance_uid=meta.MediaStorageSOPInstanceUID,
                                  transfer_syntax=meta.TransferSyntaxUID)
        assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"
        assert raw[132:132 + len(expected)] == expected
