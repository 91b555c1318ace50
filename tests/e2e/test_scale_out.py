"""Scaled out with real peers: a node and two ``dicomnode worker`` processes sharing a
PostgreSQL index and a RabbitMQ broker (both Debian's, started for the test), Orthanc as
the PACS. Ten abdomen studies are all processed, by both workers; then, with a worker
SIGKILLed in the middle of a job, every study still gets exactly one set of results."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.config import Peer, Settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.models import Job
from tests.peers import orthanc, orthanc_get
from tests.postgres import PostgresServer
from tests.rabbitmq import RabbitMQ

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RESULT_MODALITIES = {"SEG", "RTSTRUCT", "SR"}


def _copies(template: list[Path], out: Path, n: int) -> list[list[Path]]:
    """``n`` studies with the template's pixels under new study, series and SOP UIDs."""
    datasets = [pydicom.dcmread(p) for p in template]
    studies = []
    for i in range(n):
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = out / f"study{i:02d}"
        folder.mkdir(parents=True)
        paths = []
        for j, ds in enumerate(datasets):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AccessionNumber = f"A{i:04d}"
            path = folder / f"{j:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        studies.append(paths)
    return studies


def _send(node: Node, files: list[Path]) -> None:
    sent = subprocess.run(
        ["storescu", "-aet", "ORTHANC", "-aec", node.settings.ae_title, "127.0.0.1",
         str(node.scp.port), *map(str, files)], capture_output=True, text=True, timeout=600)
    assert sent.returncode == 0, sent.stderr


def _results_per_study(url: str) -> dict[str, Counter[str]]:
    """Study Instance UID -> how many result series of each modality Orthanc holds."""
    studies = {s["ID"]: s["MainDicomTags"]["StudyInstanceUID"]
               for s in orthanc_get(f"{url}/studies?expand")}  # type: ignore[union-attr]
    found: dict[str, Counter[str]] = {}
    for series in orthanc_get(f"{url}/series?expand"):  # type: ignore[union-attr]
        modality = series["MainDicomTags"].get("Modality", "")
        found.setdefault(studies[series["ParentStudy"]], Counter())[modality] += 1
    return found


def _wait_for_results(node: Node, url: str, study_uids: set[str], timeout_s: float,
                      ) -> dict[str, Counter[str]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with node.db.session() as session:
            ended = session.execute(select(Job.state, Job.reason).where(
                Job.state.in_(["no_result", "failed"]))).all()
        assert not ended, f"jobs ended without results: {ended}"
        found = _results_per_study(url)
        if all(set(found.get(uid, {})) >= RESULT_MODALITIES for uid in study_uids):
            return found
        time.sleep(2)
    raise AssertionError(f"results missing after {timeout_s:.0f} s: {_results_per_study(url)}")


def _worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p))
    return subprocess.Popen(
        [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(config)],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(2400)  # ~3 min on 2 idle cores; much longer on a loaded machine
def test_two_workers_process_every_study_once_even_when_one_is_killed_mid_job(
        settings: Settings, tmp_path: Path, postgres: PostgresServer,
        rabbitmq: RabbitMQ) -> None:
    phantom = make_phantom("abdomen", seed=7, matrix=256, spacing=(2.5, 1.6, 1.6))
    template = sorted(p for p in write_phantom(phantom, tmp_path / "phantom")
                      if p.suffix == ".dcm")
    first = _copies(template, tmp_path / "studies", 10)
    url_db = postgres.create_database()
    queue = f"jobs-{generate_uid()[-10:]}"
    scale = {"executor": "celery", "broker_url": rabbitmq.url, "database_url": url_db,
             "celery": {"queue": queue, "urgent_queue": f"urgent-{queue}"}}
    config = tmp_path / "worker.yaml"
    with orthanc(tmp_path / "orthanc") as pacs:
        url = str(pacs["url"])
        # the workers share the node's config: the same index, folder, broker and peers
        config.write_text(yaml.safe_dump({
            "data_dir": str(settings.data_dir), "warm_up": False, "seg_writer_process": False,
            "disk_reserve_mb": 0, "log_level": "INFO", **scale,
            "peers": {"ORTHANC": {"host": "127.0.0.1", "port": int(pacs["dicom_port"])}}}))
        settings = settings.model_copy(update={
            "executor": "celery", "broker_url": rabbitmq.url, "database_url": url_db,
            "celery": settings.celery.model_copy(update=scale["celery"]),  # type: ignore[arg-type]
            "peers": {"ORTHANC": Peer(host="127.0.0.1", port=int(pacs["dicom_port"]))}})
        settings.completion.quiet_period_s = 5
        node = Node(settings)
        node.start()
        workers = [_worker(config, tmp_path / f"worker{n}.log") for n in range(2)]
        names = {f"{socket.gethostname()}-{w.pid}" for w in workers}
        try:
            # 1. ten studies, all processed, by both workers
            _send(node, [f for study in first for f in study])
            uids = {str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID)
                    for s in first}
            found = _wait_for_results(node, url, uids, 900)
            assert all(found[uid] == Counter(dict.fromkeys(RESULT_MODALITIES, 1))
                       for uid in uids), found
            with node.db.session() as session:
                ran = session.execute(select(Job.worker, Job.attempts).where(
                    Job.pipeline == "liver_tumor")).all()
            assert {worker for worker, _ in ran} == names
            # no worker died: no job was delivered twice (a worker whose connection is
            # blocked by a long job would lose it to the other one)
            assert {attempts for _, attempts in ran} == {1}

            # 2. again, and one worker is killed while it runs a pipeline job
            second = _copies(template, tmp_path / "again", 3)
            _send(node, [f for study in second for f in study])
            victim, killed_job = workers[0], None
            victim_name = f"{socket.gethostname()}-{victim.pid}"
            deadline = time.monotonic() + 600
            while killed_job is None and time.monotonic() < deadline:
                with node.db.session() as session:
                    killed_job = session.execute(select(Job.id).where(
                        Job.state == "running", Job.pipeline == "liver_tumor",
                        Job.worker == victim_name)).scalar()
                time.sleep(0.2)
            assert killed_job is not None, "the worker never ran a second-round job"
            time.sleep(1.0)  # well inside the job (~8 s of inference)
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
            uids_again = {str(pydicom.dcmread(s[0], stop_before_pixels=True)
                              .StudyInstanceUID) for s in second}
            found = _wait_for_results(node, url, uids | uids_again, 900)
            # exactly one set of results per study version, the killed job's included
            assert all(found[uid] == Counter(dict.fromkeys(RESULT_MODALITIES, 1))
                       for uid in uids | uids_again), found
            with node.db.session() as session:
                job = session.get(Job, killed_job)
                assert job is not None
                assert (job.state, job.attempts) == ("done", 2)
                assert job.worker != victim_name
        finally:
            for proc in workers:
                _stop(proc)
            node.stop()
