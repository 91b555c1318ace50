"""End to end with real peers for intracranial haemorrhage: Orthanc, storescu, a webhook.

Two 5 mm routine head CTs of 40 slices (phantoms of held-out seeds of the shipped
weights: 3003 has a subdural haematoma, 3002 no bleed) are sent with dcmtk storescu
under Orthanc's calling AE. The node routes both to ``brain_ich`` at urgent priority and
sends its results back to Orthanc: for each study an SR (the negative one says "no
haemorrhage detected"), for the positive one the Key Object Selection of its flagged
slices (and the SEG of the blood). The positive study alone fires the webhook, to an
HTTP receiver the test runs on loopback. Every result object is dciodvfy-clean.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomnode.config import Peer, Settings, Webhook
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.status import node_status
from tests.e2e.test_orthanc_liver import SR, _dciodvfy_errors, _fail_on_no_result
from tests.peers import orthanc, orthanc_get, orthanc_text
from tests.webhook import webhook_receiver

pytestmark = pytest.mark.e2e

KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
POSITIVE_SEED, NEGATIVE_SEED = 3003, 3002


def _head(out_dir: Path, seed: int) -> list[Path]:
    phantom = make_phantom("head", seed, matrix=256, slices=40, spacing=5.0)
    return sorted(p for p in write_phantom(phantom, out_dir) if p.suffix == ".dcm")


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _objects(url: str, study_uid: str) -> dict[str, list[str]]:
    """SOP class -> Orthanc instance ids of the study (the CT's included)."""
    studies = [s for s in orthanc_get(f"{url}/studies?expand")  # type: ignore[union-attr]
               if s["MainDicomTags"]["StudyInstanceUID"] == study_uid]
    if not studies:
        return {}
    classes: dict[str, list[str]] = {}
    for inst in orthanc_get(f"{url}/studies/{studies[0]['ID']}/instances"):  # type: ignore[union-attr]
        sop_class = orthanc_text(f"{url}/instances/{inst['ID']}/metadata/SopClassUid")
        classes.setdefault(sop_class, []).append(inst["ID"])
    return classes


def test_a_positive_head_fires_the_webhook_and_orthanc_holds_sr_and_kos(
        settings: Settings, tmp_path: Path) -> None:
    positive = _head(tmp_path / "positive", POSITIVE_SEED)
    negative = _head(tmp_path / "negative", NEGATIVE_SEED)
    with orthanc(tmp_path / "orthanc") as pacs, webhook_receiver() as receiver:
        url = str(pacs["url"])
        settings.peers = {"ORTHANC": Peer(host="127.0.0.1", port=int(pacs["dicom_port"]))}
        settings.completion.quiet_period_s = 5
        settings.warm_up = True
        settings.notify.webhooks = [Webhook(url=receiver.url)]
        node = Node(settings)
        node.start()
        try:
            assert node.runner.warmed.wait(120)
            for files in (positive, negative):
                sent = subprocess.run(
                    ["storescu", "-aet", "ORTHANC", "-aec", settings.ae_title, "127.0.0.1",
                     str(node.scp.port), *map(str, files)],
                    capture_output=True, text=True, timeout=300)
                assert sent.returncode == 0, sent.stderr
            (request,) = receiver.wait_for(1, timeout=300)
            wanted = {_study_uid(positive): {SR, KOS}, _study_uid(negative): {SR}}
            deadline = time.monotonic() + 300
            held: dict[str, dict[str, list[str]]] = {}
            while time.monotonic() < deadline:
                _fail_on_no_result(node)
                held = {uid: _objects(url, uid) for uid in wanted}
                if all(classes <= set(held[uid]) for uid, classes in wanted.items()) and all(
                        d["state"] == "done" for d in node_status(node.db)["deliveries"]):
                    break
                time.sleep(1)
            status = node_status(node.db)
        finally:
            node.stop()
        for uid, classes in wanted.items():
            assert classes <= set(held[uid]), (uid, held[uid].keys())
        # the negative study has its SR and nothing else: no key images, no SEG
        assert set(held[_study_uid(negative)]) == {SR}
        assert len(held[_study_uid(negative)][SR]) == 1
        checked: dict[str, Any] = {}
        for uid in wanted:
            for sop_class in (SR, KOS, SEG):
                for oid in held[uid].get(sop_class, []):
                    path = tmp_path / f"{oid}.dcm"
                    with urllib.request.urlopen(f"{url}/instances/{oid}/file",
                                                timeout=30) as r:
                        path.write_bytes(r.read())
                    assert _dciodvfy_errors(path) == [], (uid, sop_class)
                    checked[oid] = pydicom.dcmread(path, stop_before_pixels=True)
    time.sleep(0.5)
    assert len(receiver.requests) == 1  # the negative study fired nothing
    payload: dict[str, Any] = request.body
    assert payload["study_instance_uid"] == _study_uid(positive)
    assert payload["calling_aet"] == "ORTHANC" and payload["pipeline"] == "brain_ich"
    sr_uids = {str(ds.SOPInstanceUID) for ds in checked.values() if ds.Modality == "SR"}
    kos_uids = {str(ds.SOPInstanceUID) for ds in checked.values() if ds.Modality == "KO"}
    assert payload["sr_sop_instance_uid"] in sr_uids
    assert payload["kos_sop_instance_uid"] in kos_uids
    assert [n["state"] for n in status["notifications"]] == ["done"]
    reports = {str(ds.StudyInstanceUID): ds.SeriesDescription
               for ds in checked.values() if ds.Modality == "SR"}
    assert "haemorrhage suspected" in reports[_study_uid(positive)]
    assert "no haemorrhage detected" in reports[_study_uid(negative)]
