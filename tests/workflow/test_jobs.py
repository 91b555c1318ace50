"""The job runner: warm-up on the threads that run studies; reporting that there is no result."""

from __future__ import annotations

import gc
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicomnode.config import Peer, Settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.pipelines import liver_tumor
from dicomnode.store.status import node_status
from dicomnode.workflow import jobs
from tests.peers import storescp


class _RecordingPipeline:
    def __init__(self) -> None:
        self.threads: list[str] = []
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        with self.lock:
            self.threads.append(threading.current_thread().name)


def test_each_worker_thread_warms_the_pipelines_before_warmed_is_set(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # GPU libraries keep per-thread state (cuDNN execution plans): a warm-up on another
    # thread left each study's first run 0.4-0.6 s slower per network on an H100
    pipeline = _RecordingPipeline()
    monkeypatch.setattr(jobs, "availability",
                        lambda context=None: {"recording": "ok", "broken": "no"})
    monkeypatch.setattr(jobs, "get_pipeline", lambda name, context=None: pipeline)
    settings.warm_up = True
    settings.workers = 2
    node = Node(settings)
    node.start()
    try:
        assert node.runner.warmed.wait(60)
        workers = {t.name for t in node.runner._threads if t.name.startswith("worker-")}
        assert len(workers) == 2
        assert sorted(pipeline.threads) == sorted(workers)  # once per worker, not "broken"
        # what start-up loaded is left out of full garbage collections while it runs
        assert gc.get_freeze_count() > 0
    finally:
        node.stop()
    assert gc.get_freeze_count() == 0


def test_no_warm_up_when_it_is_off(settings: Settings,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = _RecordingPipeline()
    monkeypatch.setattr(jobs, "availability", lambda context=None: {"recording": "ok"})
    monkeypatch.setattr(jobs, "get_pipeline", lambda name, context=None: pipeline)
    node = Node(settings)  # the fixture's settings: warm_up off
    node.start()
    try:
        assert node.runner.warmed.wait(60)
        assert pipeline.threads == []
        assert gc.get_freeze_count() == 0
    finally:
        node.stop()


def test_no_result_is_reported_to_the_sender_when_the_site_wants_it(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the real liver pipeline on a real abdomen phantom, made to want more liver than any
    # body holds: it ends "no result" with its reason, and the SR saying so reaches the
    # PACS that sent the study
    monkeypatch.setattr(liver_tumor, "MIN_LIVER_ML", 1e9)
    phantom = make_phantom("abdomen", seed=7, matrix=128, spacing=(2.5, 3.2, 3.2))
    files = [f for f in write_phantom(phantom, tmp_path / "ct") if f.suffix == ".dcm"]
    with storescp(tmp_path / "pacs", aet="PACS") as (port, received):
        settings.peers = {"PACS": Peer(host="127.0.0.1", port=port)}
        settings.no_result_report = True
        node = Node(settings)
        node.start()
        try:
            sent = subprocess.run(["storescu", "-aet", "PACS", "-aec", settings.ae_title,
                                   "127.0.0.1", str(node.scp.port), *map(str, files)],
                                  capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                status = node_status(node.db)
                if any(d["state"] in ("done", "failed") for d in status["deliveries"]) or any(
                        j["state"] == "failed" or (j["pipeline"] is None
                                                   and j["state"] == "no_result")
                        for j in status["jobs"]):
                    break
                time.sleep(0.2)
            jobs_by_pipeline = {j["pipeline"]: j for j in status["jobs"]}
            assert [d["state"] for d in status["deliveries"]] == ["done"], status
        finally:
            node.stop()
        job = jobs_by_pipeline["liver_tumor"]
        assert job["state"] == "no_result" and job["reason"].startswith("no liver found")
        (report,) = [pydicom.dcmread(p) for p in received.iterdir()]
    assert report.Modality == "SR" and report.SeriesDescription == "AI liver no result"
    assert report.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID
    text = report.ContentSequence[-1].ContentSequence[0].TextValue
    assert text.startswith("AI liver: no result. No liver found")
