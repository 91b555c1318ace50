"""Fixtures of the dashboard's tests: a node with a stored study and a signed-in user."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.config import Settings, load_settings
from dicomnode.net.scu import send_files
from dicomnode.node import Node
from dicomnode.store.models import Delivery, Job, JobState, Notification, Study, utcnow
from dicomnode.web.app import create_app
from dicomnode.web.passwords import hash_password
from tests.factories import ct_slice

USER, PASSWORD = "alice", "correct horse battery"
#: Made once: scrypt is slow on purpose.
PASSWORD_HASH = hash_password(PASSWORD)


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    """The Authorization header of HTTP Basic."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def web_settings(tmp_path: Path, **overrides: object) -> Settings:
    """A node on free loopback ports, no workers, the dashboard on port 0 with one user."""
    web = {"port": 0, "users": {USER: PASSWORD_HASH}}
    web.update(overrides.pop("web", {}))  # type: ignore[call-overload]
    values: dict[str, object] = {
        "port": 0, "bind_address": "127.0.0.1", "data_dir": tmp_path / "var",
        "disk_reserve_mb": 0, "warm_up": False, "seg_writer_process": False, "workers": 0,
        "urgent_workers": 0, "web": web, "peers": {"PACS": {"host": "127.0.0.1", "port": 1}},
        "completion": {"quiet_period_s": 30, "poll_interval_s": 0.2}}
    return load_settings(None, **{**values, **overrides})


@contextmanager
def stored_study(tmp_path: Path) -> Iterator[tuple[Node, str]]:
    """A node holding one complete study sent over C-STORE, with a finished liver job
    (its timings, measurements and a result file), a delivery and a notification."""
    node = Node(web_settings(tmp_path))
    node.start()
    try:
        files = write_volume(tmp_path / "series", 5)
        result = send_files(files, host="127.0.0.1", port=node.scp.port,
                            called_aet="DICOMNODE", calling_aet="CTSCANNER")
        assert result.ok
        with node.db.transaction() as session:
            study = session.execute(select(Study)).scalar_one()
            study.accession_number = "ACC123"
        uid = study.study_uid
        wait_complete(node, uid)
        add_finished_job(node, uid)
        yield node, uid
    finally:
        node.stop()


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[tuple[Node, str]]:
    """``stored_study`` for one test."""
    with stored_study(tmp_path) as value:
        yield value


def write_volume(out: Path, n: int) -> list[Path]:
    """``n`` slices of one CT series in one frame of reference (results can be drawn on it)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        path = out / f"slice{i:04d}.dcm"
        ct_slice(study, series, 2.0 * i, i, frame_uid=frame).save_as(path,
                                                                     enforce_file_format=True)
        paths.append(path)
    return paths


def wait_complete(node: Node, study_uid: str, timeout_s: float = 30) -> None:
    """Wait until the study is complete (completion runs on the association's release)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with node.db.session() as session:
            study = session.execute(select(Study).where(Study.study_uid == study_uid)
                                    ).scalar_one_or_none()
            if study is not None and study.state == "complete":
                return
        time.sleep(0.1)
    raise AssertionError(f"study {study_uid} not complete within {timeout_s} s")


def add_finished_job(node: Node, study_uid: str) -> int:
    """A liver job as the runner records one (the series has no liver to find)."""
    out = node.settings.results_dir / "job-test"
    out.mkdir(parents=True, exist_ok=True)
    sr = out / "sr.dcm"
    sr.write_bytes(b"\0" * 128 + b"DICM")
    routing = {"routed": True, "reason": "rule abdomen", "matched_rule": "abdomen",
               "reasons": ["image region abdomen"],
               "series": {"series_instance_uid": "1.2.3", "why": "the only CT series"},
               "region": {"used": "abdomen", "source": "image"}, "actions": []}
    with node.db.transaction() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        for job in study.jobs:  # routing done
            job.state, job.routing = JobState.DONE.value, routing
            job.timings = {"route": 0.4}
            job.started_at = job.finished_at = utcnow()
        job = Job(study=study, study_version=study.version, pipeline="liver_tumor",
                  priority=50, attempts=1, state=JobState.DONE.value,
                  routing={**routing, "action": {"pipeline": "liver_tumor",
                                                 "series_instance_uid": "1.2.3"}},
                  timings={"load_series": 0.2, "inference": 3.5, "encode": 1.1},
                  result={"result": {"measurements": {
                      "liver_volume_ml": 1520.5, "lesion_count": 1,
                      "lesions": [{"id": 1, "volume_ml": 12.3,
                                   "longest_axial_diameter_mm": 31.0}],
                      "total_tumour_volume_ml": 12.3, "tumour_to_liver_ratio": 0.0081}},
                      "files": [str(sr)]},
                  started_at=utcnow(), finished_at=utcnow())
        session.add(job)
        session.flush()
        session.add(Delivery(job_pk=job.id, study_uid=study_uid, destination_ae="PACS",
                             host="127.0.0.1", port=1, files=[str(sr)], state="failed",
                             attempts=3, last_error="connection refused"))
        session.add(Notification(job_pk=job.id, study_uid=study_uid,
                                 target="https://hooks.example/secret-token?x=1",
                                 payload={"study": study_uid}, state="failed", attempts=4,
                                 last_error="HTTP 500"))
        return job.id


@pytest.fixture
def client(stored: tuple[Node, str]) -> TestClient:
    """The dashboard of ``stored`` (loopback), as a test client."""
    node, _ = stored
    return TestClient(create_app(node.settings, node.db))
