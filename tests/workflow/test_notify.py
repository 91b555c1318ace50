"""Urgent notifications against a real HTTP receiver (http.server on 127.0.0.1).

The node-level tests share one run: a real node with the shipped brain_ich weights
receives a positive and a negative phantom head (dcmtk storescu, results to a dcmtk
storescp as the PACS) with five webhooks: one for every urgent positive, one
for brain_ich with the patient included, one for another pipeline, one that answers 500
and one where nothing listens.
The outbox tests drive the notifier on its own against receivers that are down, slow,
or answer 500 before they accept.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from dicomnode.config import Peer, Settings, Webhook, load_settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.db import Database
from dicomnode.store.models import AuditEvent, DeliveryState, Notification
from dicomnode.store.status import node_status
from dicomnode.workflow.notify import Notifier, notifications_for, wanted_by
from tests.conftest import free_port
from tests.peers import storescp
from tests.postgres import PostgresServer
from tests.webhook import WebhookReceiver, webhook_receiver

#: Held-out seeds of the shipped weights (models/brain_ich.md), as in the pipeline tests:
#: a subdural haematoma, and a head without a bleed.
POSITIVE_SEED, NEGATIVE_SEED = 3003, 3002
#: Patient values written into the phantoms, to look for in what webhooks receive.
PATIENT = {"PatientName": "DOE^JANE", "PatientID": "MRN-4711", "PatientBirthDate": "19610203"}
ACCESSION = "ACC20261206"


def _head(out_dir: Path, seed: int) -> list[Path]:
    """A 5 mm routine head CT of 40 slices with a patient, as a scanner sends it."""
    phantom = make_phantom("head", seed, matrix=128, slices=40, spacing=5.0)
    files = sorted(p for p in write_phantom(phantom, out_dir) if p.suffix == ".dcm")
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
        ds.AccessionNumber = ACCESSION
        ds.save_as(path)
    return files


def _uid(files: list[Path], keyword: str = "StudyInstanceUID") -> str:
    return str(getattr(pydicom.dcmread(files[0], stop_before_pixels=True), keyword))


def _wait(check: Any, timeout: float = 240, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# --- one node run with the real model ------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Send a positive and a negative head to a node with four webhooks; what happened."""
    work = tmp_path_factory.mktemp("notify-node")
    positive = _head(work / "positive", POSITIVE_SEED)
    negative = _head(work / "negative", NEGATIVE_SEED)
    down = f"http://127.0.0.1:{free_port()}/nobody-listens"
    receivers = {name: WebhookReceiver(status=500 if name == "failing" else 200).start()
                 for name in ("all", "patient", "liver", "failing")}
    try:
        with storescp(work / "pacs", aet="PACS") as (port, received):
            settings = load_settings(
                None, port=free_port(), bind_address="127.0.0.1", data_dir=work / "var",
                disk_reserve_mb=0, warm_up=False, seg_writer_process=False,
                peers={"PACS": Peer(host="127.0.0.1", port=port)},
                completion={"quiet_period_s": 30, "poll_interval_s": 0.2},
                export={"backoff_initial_s": 0.2, "backoff_max_s": 1.0,
                        "poll_interval_s": 0.1},
                notify={"dashboard_url": "https://node.example:8443/",
                        "backoff_initial_s": 0.2, "backoff_max_s": 0.5, "max_attempts": 2,
                        "poll_interval_s": 0.1, "webhooks": [
                            {"url": receivers["all"].url},
                            {"url": receivers["patient"].url + "?token=s3cret",
                             "pipelines": ["brain_ich"], "include_patient": True,
                             "headers": {"Authorization": "Bearer s3cret"}},
                            {"url": receivers["liver"].url, "pipelines": ["liver_tumor"]},
                            {"url": receivers["failing"].url},
                            {"url": down},
                        ]})
            node = Node(settings)
            node.start()
            try:
                for files in (positive, negative):
                    sent = subprocess.run(
                        ["storescu", "-aet", "PACS", "-aec", settings.ae_title, "127.0.0.1",
                         str(node.scp.port), *map(str, files)],
                        capture_output=True, text=True, timeout=120)
                    assert sent.returncode == 0, sent.stderr

                def settled() -> dict[str, Any] | None:
                    status = node_status(node.db)
                    jobs = [j for j in status["jobs"] if j["pipeline"] == "brain_ich"]
                    finished = {"done", "failed"}
                    if (len(jobs) == 2 and all(j["state"] != "queued" and j["state"] != "running"
                                               for j in jobs)
                            and len(status["deliveries"]) == 2
                            and all(d["state"] in finished for d in status["deliveries"])
                            and all(n["state"] in finished for n in status["notifications"])):
                        return status
                    return None

                status = _wait(settled, what="both studies and their notifications")
                with node.db.session() as session:
                    audit = [(a.event, a.detail) for a in session.execute(
                        select(AuditEvent).where(AuditEvent.event.like("notification.%"))
                        .order_by(AuditEvent.id)).scalars()]
            finally:
                node.stop()
            results = {}
            for path in received.iterdir():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                results.setdefault(str(ds.StudyInstanceUID), []).append(ds)
        yield {"status": status, "audit": audit, "results": results, "down": down,
               "receivers": receivers, "positive": positive, "negative": negative,
               "settings": settings}
    finally:
        for receiver in receivers.values():
            receiver.stop()


def test_a_positive_urgent_study_posts_its_findings_key_images_and_results(
        run: dict[str, Any]) -> None:
    (request,) = run["receivers"]["all"].requests
    payload = request.body
    study_uid = _uid(run["positive"])
    assert request.path == "/hooks/urgent"
    assert request.headers["Content-Type"] == "application/json"
    assert payload["event"] == "dicomnode.urgent_result"
    assert payload["pipeline"] == "brain_ich" and payload["priority"] == "urgent"
    assert payload["study_instance_uid"] == study_uid
    assert payload["series_instance_uid"] == _uid(run["positive"], "SeriesInstanceUID")
    assert payload["accession_number"] == ACCESSION
    assert payload["calling_aet"] == "PACS"
    assert payload["conclusion"].startswith("haemorrhage suspected")
    findings = {f["finding"]: f for f in payload["findings"]}
    assert set(findings) == {"any", "epidural", "intraparenchymal", "intraventricular",
                             "subarachnoid", "subdural"}
    assert findings["any"]["positive"] and findings["any"]["probability"] >= 0.9
    assert findings["any"]["probability"] >= findings["any"]["threshold"]
    assert findings["subdural"]["positive"]  # the phantom's bleed
    sources = {_uid([f], "SOPInstanceUID") for f in run["positive"]}
    flagged = payload["flagged_sop_instance_uids"]
    assert flagged and set(flagged) <= sources
    assert set(findings["subdural"]["flagged_sop_instance_uids"]) <= set(flagged)
    # the SR and the KOS it names are the ones the PACS received
    sent = {str(ds.SOPInstanceUID): ds for ds in run["results"][study_uid]}
    assert sent[payload["sr_sop_instance_uid"]].Modality == "SR"
    kos = sent[payload["kos_sop_instance_uid"]]
    assert kos.Modality == "KO"
    assert {o["sop_instance_uid"] for o in payload["results"]} == set(sent)
    assert payload["link"] == f"https://node.example:8443/studies/{study_uid}"
    assert payload["algorithm"]["name"]


def test_no_patient_name_id_or_birth_date_is_sent_unless_the_webhook_asks(
        run: dict[str, Any]) -> None:
    (plain,) = run["receivers"]["all"].requests
    assert "patient" not in plain.body
    for value in PATIENT.values():
        assert value.encode() not in plain.raw
        assert value.split("^")[0].encode() not in plain.raw
    (with_patient,) = run["receivers"]["patient"].requests
    assert with_patient.body["patient"] == {"name": "DOE^JANE", "id": "MRN-4711",
                                            "birth_date": "19610203"}
    assert with_patient.headers["Authorization"] == "Bearer s3cret"
    assert with_patient.path == "/hooks/urgent?token=s3cret"
    # the token in the URL stays out of what status shows
    assert not [n for n in run["status"]["notifications"] if "s3cret" in n["target"]]


def test_a_webhook_for_another_pipeline_hears_nothing(run: dict[str, Any]) -> None:
    assert run["receivers"]["liver"].requests == []


def test_a_negative_study_sends_nothing_and_still_gets_its_sr(run: dict[str, Any]) -> None:
    negative = _uid(run["negative"])
    assert not [n for n in run["status"]["notifications"] if n["study_uid"] == negative]
    for receiver in run["receivers"].values():
        assert all(r.body["study_instance_uid"] != negative for r in receiver.requests)
    (sr,) = run["results"][negative]
    assert sr.Modality == "SR" and "no haemorrhage detected" in sr.SeriesDescription


def test_webhooks_that_answer_500_or_are_down_are_retried_recorded_and_results_go_out(
        run: dict[str, Any]) -> None:
    status = run["status"]
    assert [d["state"] for d in status["deliveries"]] == ["done", "done"]
    assert len(run["results"]) == 2
    failing = run["receivers"]["failing"]
    assert len(failing.requests) == 2  # max_attempts
    # the same notification both times: the receiver can tell a retry from a new alarm
    assert len({r.headers["X-Dicomnode-Notification"] for r in failing.requests}) == 1
    by_target = {n["target"]: n for n in status["notifications"]}
    assert len(by_target) == 4
    failed = by_target[failing.url]
    assert failed["state"] == "failed" and failed["attempts"] == 2
    assert failed["last_error"].startswith("HTTP 500")
    assert by_target[run["receivers"]["all"].url]["state"] == "done"
    down = by_target[run["down"]]
    assert down["state"] == "failed" and down["attempts"] == 2
    assert down["last_error"].startswith("not reached:")
    events = [event for event, detail in run["audit"]
              if detail["notification"] == failed["id"]]
    assert events == ["notification.queued", "notification.retry", "notification.failed"]


# --- which webhooks hear of what -----------------------------------------------------


def _summary(urgent: bool) -> dict[str, Any]:
    return {"result": {"ok": True, "urgent": urgent, "probabilities": {"any": 0.9},
                       "decisions": {"any": urgent}, "flagged_slices": []}}


def test_a_webhook_without_pipelines_hears_of_urgent_positives_only(
        settings: Settings) -> None:
    every = Webhook(url="http://127.0.0.1:9/a")
    ich = Webhook(url="http://127.0.0.1:9/b", pipelines=["brain_ich"])
    assert wanted_by(every, "brain_ich", urgent=True)
    assert not wanted_by(every, "brain_ich", urgent=False)
    assert wanted_by(ich, "brain_ich", urgent=False)
    assert not wanted_by(ich, "liver_tumor", urgent=True)
    settings.notify.webhooks = [every, ich]

    def rows(pipeline: str, urgent: bool, positive: bool) -> list[str]:
        return [n.target for n in notifications_for(
            settings, study_uid="1.2.3", study_version=1, accession_number="",
            calling_aet="PACS", pipeline=pipeline, priority="urgent" if urgent else "normal",
            urgent=urgent, job_id=None, summary=_summary(positive), result_files=[])]

    assert rows("brain_ich", True, True) == [every.url, ich.url]
    assert rows("brain_ich", False, True) == [ich.url]
    assert rows("liver_tumor", True, True) == [every.url]
    assert rows("brain_ich", True, False) == []
    # no result (bad input: an MR, a scout...) is never an alarm, whatever it says
    no_result = {"result": {**_summary(True)["result"], "ok": False}}
    assert notifications_for(
        settings, study_uid="1.2.3", study_version=1, accession_number="",
        calling_aet="PACS", pipeline="brain_ich", priority="urgent", urgent=True, job_id=None,
        summary=no_result, result_files=[]) == []


def test_a_webhook_url_that_is_not_http_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match=re.escape("'notify.webhooks.url' value 'ftp://x/y'")):
        Webhook(url="ftp://x/y")


# --- the notifier on its own: down, slow, 500, restart ---------------------------------


def _notifier(settings: Settings, **notify: Any) -> Notifier:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.notify = settings.notify.model_copy(update={
        "backoff_initial_s": 0.1, "backoff_max_s": 0.3, "poll_interval_s": 0.05, **notify})
    db = Database(settings.db_url)
    db.upgrade()
    return Notifier(db, settings)


def _row(notifier: Notifier, row_id: int) -> Notification:
    with notifier.db.session() as session:
        row = session.get(Notification, row_id)
        assert row is not None
        return row


def _settled(notifier: Notifier, row_id: int, timeout: float = 30) -> Notification:
    return _wait(lambda: (row := _row(notifier, row_id)).state in ("done", "failed") and row,
                 timeout, f"notification {row_id}")


def test_a_webhook_that_answers_500_is_retried_with_back_off_until_it_accepts(
        settings: Settings) -> None:
    with webhook_receiver(answers=[500, 503]) as receiver:
        hook = Webhook(url=receiver.url)
        notifier = _notifier(settings, webhooks=[hook])
        row_id = notifier.enqueue(hook, {"study_instance_uid": "1.2.3"}, study_uid="1.2.3")
        notifier.start()
        try:
            row = _settled(notifier, row_id)
        finally:
            notifier.stop()
    assert row.state == "done" and row.attempts == 3 and row.last_error is None
    gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:],
                                        strict=False)]
    assert len(gaps) == 2 and all(g >= 0.1 for g in gaps)  # backed off before each retry
    assert [r.body for r in receiver.requests] == [{"study_instance_uid": "1.2.3"}] * 3


def test_a_slow_webhook_times_out_is_retried_and_holds_up_no_other(
        settings: Settings) -> None:
    with webhook_receiver(delay_s=3.0) as slow, webhook_receiver() as fast:
        hooks = [Webhook(url=slow.url), Webhook(url=fast.url)]
        notifier = _notifier(settings, webhooks=hooks, timeout_s=0.5, max_attempts=2)
        slow_id = notifier.enqueue(hooks[0], {"n": 1}, study_uid="1.2.3")
        notifier.start()
        try:
            slow.wait_for(1)
            fast_id = notifier.enqueue(hooks[1], {"n": 2}, study_uid="1.2.3")
            # sent while the slow endpoint still holds its first request
            assert _settled(notifier, fast_id).state == "done"
            assert _row(notifier, slow_id).state in ("sending", "pending")
            row = _settled(notifier, slow_id)
        finally:
            notifier.stop()
    assert row.state == "failed" and row.attempts == 2
    assert row.last_error == "timed out after 0.5 s"
    assert len(slow.requests) == 2


def test_a_webhook_that_is_down_fails_after_max_attempts_and_status_says_why(
        settings: Settings, tmp_path: Path) -> None:
    hook = Webhook(url=f"http://127.0.0.1:{free_port()}/down?key=abc")
    notifier = _notifier(settings, webhooks=[hook], max_attempts=3)
    row_id = notifier.enqueue(hook, {"n": 1}, study_uid="1.2.3")
    notifier.start()
    try:
        row = _settled(notifier, row_id)
    finally:
        notifier.stop()
    assert row.state == "failed" and row.attempts == 3
    assert row.last_error is not None and row.last_error.startswith("not reached:")
    (shown,) = node_status(notifier.db)["notifications"]
    assert shown["state"] == "failed" and shown["attempts"] == 3
    assert shown["target"] == hook.url.split("?")[0] and "abc" not in json.dumps(shown)
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(settings.data_dir)}))
    from dicomnode.cli import app

    text = CliRunner().invoke(app, ["status", "--config", str(config)])
    assert text.exit_code == 0, text.output
    assert "1 notifications" in text.output
    assert f"notification    {row_id} failed   webhook {shown['target']}" in text.output
    as_json = CliRunner().invoke(app, ["status", "--json", "--config", str(config)])
    assert json.loads(as_json.output)["notifications"][0]["attempts"] == 3


def test_a_redirect_is_a_failed_attempt_not_a_sent_alarm(settings: Settings) -> None:
    # urllib would follow a 302 with a GET that drops the JSON and report success
    with webhook_receiver(status=302) as receiver:
        hook = Webhook(url=receiver.url)
        notifier = _notifier(settings, webhooks=[hook], max_attempts=1)
        row_id = notifier.enqueue(hook, {"n": 1}, study_uid="1.2.3")
        assert notifier.process_due() == 1
    row = _row(notifier, row_id)
    assert row.state == "failed" and row.last_error is not None
    assert row.last_error.startswith("HTTP 302")
    assert len(receiver.requests) == 1


def test_pending_notifications_survive_a_restart(settings: Settings) -> None:
    with webhook_receiver() as receiver:
        hook = Webhook(url=receiver.url)
        before = _notifier(settings, webhooks=[hook])
        waiting = before.enqueue(hook, {"n": 1}, study_uid="1.2.3")
        cut_off = before.enqueue(hook, {"n": 2}, study_uid="1.2.3")
        with before.db.transaction() as session:  # the node died while sending it
            row = session.get(Notification, cut_off)
            assert row is not None
            row.state, row.attempts = DeliveryState.SENDING.value, 1
        before.db.dispose()
        after = _notifier(settings, webhooks=[hook])
        assert after.recover() == 1
        after.start()
        try:
            rows = [_settled(after, waiting), _settled(after, cut_off)]
        finally:
            after.stop()
    assert [(r.state, r.attempts) for r in rows] == [("done", 1), ("done", 2)]
    assert sorted(r.body["n"] for r in receiver.requests) == [1, 2]


def test_a_notification_another_node_holds_is_not_claimed_again(
        postgres: PostgresServer, settings: Settings) -> None:
    # two nodes on one PostgreSQL index: a row one of them is claiming is skipped by the
    # other (SKIP LOCKED), not waited for and then sent a second time
    url = postgres.create_database()
    Database(url).upgrade()
    webhook = Webhook(url="http://127.0.0.1:9/hook")
    settings.notify = settings.notify.model_copy(update={"webhooks": [webhook]})
    first, second = Notifier(Database(url), settings), Notifier(Database(url), settings)
    row_id = first.enqueue(webhook, {"event": "test"}, study_uid="1.2.3")
    with first.db.transaction() as session:   # the first node, mid-claim
        session.execute(select(Notification).where(Notification.id == row_id)
                        .with_for_update())
        assert second._claim() is None
    claimed = second._claim()
    assert claimed is not None and claimed.id == row_id and claimed.attempts == 1
    assert second._claim() is None   # now it is sending: nobody claims it again
    for notifier in (first, second):
        notifier.db.dispose()
    postgres.drop_database(url.rsplit("/", 1)[1])
