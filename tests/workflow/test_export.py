"""The export outbox against a real dcmtk storescp: delivery, retry with back-off, restart."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
from sqlalchemy import select

from dicomnode.config import Destination, Peer, Settings
from dicomnode.store.db import Database
from dicomnode.store.models import Delivery
from dicomnode.workflow.export import Outbox, Target, resolve_targets
from dicomnode.workflow.retry import backoff_seconds
from tests.conftest import free_port
from tests.factories import write_series
from tests.peers import storescp


def _outbox(settings: Settings) -> Outbox:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    db.upgrade()
    return Outbox(db, settings)


def _delivery(outbox: Outbox, delivery_id: int) -> Delivery:
    with outbox.db.session() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        return row


def _wait(outbox: Outbox, delivery_id: int, state: str, timeout: float = 20) -> Delivery:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _delivery(outbox, delivery_id)
        if row.state == state:
            return row
        time.sleep(0.05)
    raise AssertionError(f"delivery {delivery_id} is {_delivery(outbox, delivery_id).state}")


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_seconds(n, 2, 20) for n in (1, 2, 3, 4, 5)] == [2, 4, 8, 16, 20]


def test_targets_sender_and_pipeline_destinations(settings: Settings) -> None:
    settings.peers = {"PACS": Peer(host="10.0.0.1", port=104)}
    settings.destinations = {
        "tps": Destination(ae_title="TPS", host="tps", port=104, pipelines=["headneck_oar"]),
        "archive": Destination(ae_title="ARCH", host="arch", port=11112),
    }
    names = [t.ae_title for t in resolve_targets(settings, "PACS", "headneck_oar")]
    assert names == ["PACS", "TPS", "ARCH"]
    assert [t.ae_title for t in resolve_targets(settings, "PACS", "liver_tumor")] == [
        "PACS", "ARCH"]
    assert [t.ae_title for t in resolve_targets(settings, "UNKNOWN", "brain_ich")] == ["ARCH"]


def test_delivery_to_dcmtk_storescp(settings: Settings, tmp_path: Path) -> None:
    files = write_series(tmp_path / "results", 5)
    outbox = _outbox(settings)
    with storescp(tmp_path / "peer") as (port, received):
        did = outbox.enqueue(files, Target("STORESCP", "127.0.0.1", port, "test"))
        assert outbox.process_due() == 1
        row = _delivery(outbox, did)
        assert row.state == "done" and row.attempts == 1
    got = {pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()}
    assert got == {pydicom.dcmread(p).SOPInstanceUID for p in files}


def test_retry_until_peer_comes_up_late(settings: Settings, tmp_path: Path) -> None:
    files = write_series(tmp_path / "results", 3)
    outbox = _outbox(settings)
    port = free_port()
    did = outbox.enqueue(files, Target("STORESCP", "127.0.0.1", port, "test"))
    outbox.start()
    try:
        deadline = time.monotonic() + 10
        while _delivery(outbox, did).attempts < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        row = _delivery(outbox, did)
        assert row.state in ("pending", "sending") and row.attempts >= 2
        assert row.last_error
        with storescp(tmp_path / "peer", port=port) as (_port, received):
            row = _wait(outbox, did, "done")
            assert len(list(received.iterdir())) == 3
    finally:
        outbox.stop()
    assert row.attempts >= 3


def test_outbox_survives_restart(settings: Settings, tmp_path: Path) -> None:
    files = write_series(tmp_path / "results", 2)
    port = free_port()
    first = _outbox(settings)
    did = first.enqueue(files, Target("STORESCP", "127.0.0.1", port, "test"))
    first.process_due()  # fails: nobody listens
    # Simulate a crash in the middle of a send: the row is left 'sending'.
    with first.db.transaction() as s:
        s.get(Delivery, did).state = "sending"
    first.db.dispose()
    from dicomnode.store.instances import InstanceStore
    from dicomnode.store.spool import Spool

    second = _outbox(settings)
    report = InstanceStore(second.db, Spool(settings.spool_dir)).recover()
    assert report.deliveries_requeued == 1
    with second.db.transaction() as s:
        s.get(Delivery, did).next_attempt_at = s.get(Delivery, did).created_at
    with storescp(tmp_path / "peer", port=port):
        second.process_due()
    with second.db.session() as s:
        assert s.execute(select(Delivery.state)).scalar_one() == "done"


def test_missing_result_file_fails_without_retry(settings: Settings, tmp_path: Path) -> None:
    outbox = _outbox(settings)
    did = outbox.enqueue([tmp_path / "gone.dcm"], Target("X", "127.0.0.1", free_port(), "t"))
    outbox.process_due()
    row = _delivery(outbox, did)
    assert row.state == "failed" and "missing" in (row.last_error or "")
