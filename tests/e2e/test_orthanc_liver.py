"""End to end with real peers: Orthanc as the PACS, dcmtk storescu as the sender.

An abdomen phantom is sent to the node with the calling AE of Orthanc; the node
completes the study, routes it to ``liver_tumor``, runs the shipped weights and sends
SEG + RTSTRUCT + SR back to Orthanc, where they are checked through its REST API and
with dciodvfy.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicomnode.config import Peer, Settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.models import Job
from tests.peers import orthanc, orthanc_get, orthanc_text

pytestmark = pytest.mark.e2e

SEG, RTSTRUCT, SR = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.3",
                     "1.2.840.10008.5.1.4.1.1.88.34")


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_abdomen_study_comes_back_to_orthanc_as_seg_rtstruct_sr(
        settings: Settings, tmp_path: Path) -> None:
    study_dir = tmp_path / "study"
    phantom = make_phantom("abdomen", seed=7, matrix=256, spacing=(2.5, 1.6, 1.6))
    files = sorted(p for p in write_phantom(phantom, study_dir) if p.suffix == ".dcm")
    with orthanc(tmp_path / "orthanc") as pacs:
        settings.peers = {"ORTHANC": Peer(host="127.0.0.1", port=int(pacs["dicom_port"]))}
        settings.completion.quiet_period_s = 5
        settings.warm_up = True             # as a node runs: pipelines and encoders warmed
        settings.seg_writer_process = True  # and the SEG written in its helper process
        node = Node(settings)
        node.start()
        try:
            url = str(pacs["url"])
            classes = send_and_collect(node, files, url, {SEG, RTSTRUCT, SR})
            # the pipeline job used the volume routing had built, not a second read
            with node.db.session() as session:
                volumes = [job.result["volume"] for job in session.execute(
                    select(Job).where(Job.pipeline == "liver_tumor")).scalars()]
            assert volumes == ["kept from routing"]
            assert node.runner.seg_writer.written == 1
            assert len(orthanc_get(f"{url}/studies")) == 1  # type: ignore[arg-type]
            parents = {orthanc_get(f"{url}/instances/{i}/study")["MainDicomTags"][
                "StudyInstanceUID"] for i in classes.values()}  # type: ignore[index]
            assert parents == {phantom_study_uid(files[0])}
            for sop_class, oid in classes.items():
                path = tmp_path / f"{sop_class}.dcm"
                with urllib.request.urlopen(f"{url}/instances/{oid}/file", timeout=30) as r:
                    path.write_bytes(r.read())
                assert _dciodvfy_errors(path) == [], sop_class
            # the SR, written beside the SEG, refers to the SEG that arrived
            seg = pydicom.dcmread(tmp_path / f"{SEG}.dcm", stop_before_pixels=True)
            report = pydicom.dcmread(tmp_path / f"{SR}.dcm")
            referenced = {ref.ReferencedSOPInstanceUID
                          for study in report.CurrentRequestedProcedureEvidenceSequence
                          for series in study.ReferencedSeriesSequence
                          for ref in series.ReferencedSOPSequence}
            assert str(seg.SOPInstanceUID) in referenced
        finally:
            node.stop()


def send_and_collect(node: Node, files: list[Path], url: str, wanted: set[str],
                     timeout_s: float = 600) -> dict[str, str]:
    """Send ``files`` with storescu as Orthanc, once the node is warm, and wait until
    Orthanc holds an instance of each SOP class of ``wanted``: SOP class -> Orthanc id.
    A job ending without a result or a failed delivery fails the test at once."""
    assert node.runner.warmed.wait(120)
    sent = subprocess.run(
        ["storescu", "-aet", "ORTHANC", "-aec", node.settings.ae_title, "127.0.0.1",
         str(node.scp.port), *map(str, files)],
        capture_output=True, text=True, timeout=300)
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + timeout_s
    classes: dict[str, str] = {}
    while time.monotonic() < deadline and len(classes) < len(wanted):
        time.sleep(1)
        _fail_on_no_result(node)
        for inst in orthanc_get(f"{url}/instances?expand"):  # type: ignore[union-attr]
            sop_class = orthanc_text(f"{url}/instances/{inst['ID']}/metadata/SopClassUid")
            if sop_class in wanted:
                classes[str(sop_class)] = inst["ID"]
    assert set(classes) == wanted, node_summary(node)
    return classes


def _fail_on_no_result(node: Node) -> None:
    from dicomnode.store.status import node_status

    for job in node_status(node.db)["jobs"]:
        if job["state"] in ("no_result", "failed"):
            pytest.fail(f"job {job['pipeline'] or 'routing'} ended {job['state']}: "
                        f"{job['reason']}")
    for delivery in node_status(node.db)["deliveries"]:
        if delivery["state"] == "failed":
            pytest.fail(f"delivery failed: {delivery['last_error']}")


def phantom_study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def node_summary(node: Node) -> str:
    from dicomnode.store.status import node_status

    status = node_status(node.db)
    return str([(j["pipeline"], j["state"], j["reason"]) for j in status["jobs"]]) + str(
        [(d["state"], d["last_error"]) for d in status["deliveries"]])
