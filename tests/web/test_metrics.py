"""``/metrics`` (dicomnode/metrics.py, web/metrics.py): parsed as Prometheus parses it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import MRImageStorage

from dicomnode.net.scu import send_files
from dicomnode.node import Node
from dicomnode.store.models import Notification
from dicomnode.workflow.export import Target
from tests.factories import write_series
from tests.web.conftest import wait_complete, web_settings


def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the node's /metrics, by name and labels."""
    assert node.web is not None and node.web.url
    text = httpx.get(f"{node.web.url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_counters_move_when_a_study_is_stored_refused_completed_routed_and_delivered(
        tmp_path: Path) -> None:
    node = Node(web_settings(tmp_path))
    node.start()
    try:
        before = scrape(node)
        files = write_series(tmp_path / "series", 4)
        mr = dcmread(files[-1])
        mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        mr.save_as(files[-1])
        result = send_files(files, host="127.0.0.1", port=node.scp.port,
                            called_aet="DICOMNODE", calling_aet="CTSCANNER")
        assert len(result.failed) == 1
        uid = str(dcmread(files[0]).StudyInstanceUID)
        wait_complete(node, uid)
        after = scrape(node)
        assert after[("dicomnode_instances_received_total", (("duplicate", "false"),))] == 3
        assert after[("dicomnode_instances_refused_total", (("reason", "sop_class"),))] == 1
        assert after[("dicomnode_studies_completed_total",
                      (("trigger", "association_release"),))] == 1
        assert after[("dicomnode_queue_depth", (("priority", "routing"), ("state", "queued")))
                     ] == 1
        assert ("dicomnode_instances_received_total", (("duplicate", "false"),)) not in before

        # routing runs (no workers here: inline), a delivery fails, a webhook gave up
        assert node.runner.run_one()
        node.outbox.enqueue(files[:1], Target("NOBODY", "127.0.0.1", 1, "test"),
                            study_uid=uid)
        with node.db.transaction() as session:
            session.add(Notification(study_uid=uid, target="https://hooks.example/x",
                                     payload={}, state="failed", attempts=3))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = scrape(node)
            if now.get(("dicomnode_delivery_failures_total", ()), 0) >= 1:
                break
            time.sleep(0.2)
        assert now[("dicomnode_delivery_failures_total", ())] >= 1
        assert now[("dicomnode_job_stage_seconds_count",
                    (("pipeline", "routing"), ("stage", "route")))] == 1
        assert sum(v for (name, labels), v in now.items()
                   if name == "dicomnode_jobs_finished_total"
                   and ("pipeline", "routing") in labels) == 1
        assert now[("dicomnode_notification_failures_total", (("kind", "given_up"),))] == 1
        assert now[("dicomnode_notification_failures_total", (("kind", "retried"),))] == 2
        assert now[("dicomnode_associations_open", ())] == 0
    finally:
        node.stop()


def test_two_nodes_in_one_process_count_apart(tmp_path: Path) -> None:
    first, second = Node(web_settings(tmp_path / "a")), Node(web_settings(tmp_path / "b"))
    first.start()
    second.start()
    try:
        files = write_series(tmp_path / "series", 3)
        assert send_files(files, host="127.0.0.1", port=first.scp.port,
                          called_aet="DICOMNODE", calling_aet="CT").ok
        key = ("dicomnode_instances_received_total", (("duplicate", "false"),))
        assert scrape(first)[key] == 3
        assert key not in scrape(second)
    finally:
        first.stop()
        second.stop()
