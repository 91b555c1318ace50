"""The job runner: warm-up on the threads that run studies; reporting that there is no result;
urgent studies ahead of queued ones and beside running ones (the urgent lane)."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.config import Peer, Settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.pipelines import base, liver_tumor
from dicomnode.pipelines.base import PipelineResult, ResultObject
from dicomnode.store.models import Job
from dicomnode.store.status import node_status
from dicomnode.workflow import jobs
from dicomnode.workflow.routing import DEFAULT_RULES
from tests.imaging.conftest import anatomy, write_series
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
    settings.urgent_workers = 1
    node = Node(settings)
    node.start()
    try:
        assert node.runner.warmed.wait(60)
        workers = {t.name for t in node.runner._threads if t.name.startswith("worker-")}
        assert len(workers) == 3 and len([w for w in workers if "-urgent-" in w]) == 1
        # once per worker, the urgent lane's included (it runs studies), not "broken"
        assert sorted(pipeline.threads) == sorted(workers)
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


def test_results_are_queued_only_in_the_transaction_that_ends_their_job(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by the fault campaign: deliveries were committed before the job's own state,
    # so a node killed between the two ran the job again after its restart and sent a
    # second set of results for the same study version. Here the job's commit fails
    # after its deliveries were queued: nothing may be left queued.
    monkeypatch.setattr(liver_tumor, "MIN_LIVER_ML", 1e9)   # quick: "no result" + its SR
    phantom = make_phantom("abdomen", seed=7, matrix=128, spacing=(2.5, 3.2, 3.2))
    files = [f for f in write_phantom(phantom, tmp_path / "ct") if f.suffix == ".dcm"]
    settings.peers = {"PACS": Peer(host="127.0.0.1", port=9)}
    settings.no_result_report = True
    settings.workers = 0        # the test runs the jobs itself
    real_audit = jobs.AuditEvent

    def audit(**values: Any) -> Any:
        if values.get("event") == "job.no_result":
            raise RuntimeError("the node died before the job's commit")
        return real_audit(**values)

    monkeypatch.setattr(jobs, "AuditEvent", audit)
    node = Node(settings)
    node.start()
    try:
        sent = subprocess.run(["storescu", "-aet", "PACS", "-aec", settings.ae_title,
                               "127.0.0.1", str(node.scp.port), *map(str, files)],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 120
        with pytest.raises(RuntimeError, match="died before"):
            while time.monotonic() < deadline:
                if not node.runner.run_one():
                    time.sleep(0.2)
        status = node_status(node.db)
    finally:
        node.stop()
    assert status["deliveries"] == []
    (liver,) = [j for j in status["jobs"] if j["pipeline"] == "liver_tumor"]
    assert liver["state"] == "running"       # run again after a restart, as if killed


# --- urgent work: ahead of the queue, and beside running jobs ---------------------------

#: A test-only pipeline that stands in for a long normal job (a liver study on a busy
#: CPU takes minutes): it holds its worker until the test releases it.
LONG_JOB = "long_job_stand_in"


class _LongJobStandIn:
    """Stand-in for a long job: blocks until ``release`` is set (at most 120 s)."""

    name = LONG_JOB
    region = "abdomen"
    emits = (ResultObject.SR,)

    def __init__(self) -> None:
        self.release = threading.Event()

    def check(self) -> None:
        pass

    def warm_up(self) -> None:
        pass

    def run(self, volume: Any) -> PipelineResult:
        self.release.wait(120)
        return PipelineResult(LONG_JOB, ok=False, reason="stand-in for a long job")


def _route_to(settings: Settings, path: Path, replace: dict[str, str]) -> None:
    """The embedded routing rules with some actions' pipelines replaced (same priority)."""
    rules = copy.deepcopy(DEFAULT_RULES)
    for rule in rules["rules"]:
        for action in rule["actions"]:
            action["pipeline"] = replace.get(action["pipeline"], action["pipeline"])
    path.write_text(yaml.safe_dump(rules, allow_unicode=True), encoding="utf-8")
    settings.routing_rules = path


@pytest.fixture
def long_jobs(settings: Settings, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Any:
    """Abdomen studies routed (normal priority) to the long-job stand-in; head studies
    keep the embedded rules (``brain_ich``, urgent)."""
    stand_in = _LongJobStandIn()
    monkeypatch.setitem(base._REGISTRY, LONG_JOB, lambda context: stand_in)
    _route_to(settings, tmp_path / "routing.yaml", {"liver_tumor": LONG_JOB})
    yield stand_in
    stand_in.release.set()


def _study(out_dir: Path, region: str, seed: int) -> list[Path]:
    hu = anatomy(region, slices=40, matrix=96, seed=seed)
    return write_series(out_dir, hu, spacing=(3.0, 400 / 96, 400 / 96),
                        study_uid=generate_uid())


def _send(node: Node, files: list[Path]) -> None:
    sent = subprocess.run(["storescu", "-aec", node.settings.ae_title, "127.0.0.1",
                           str(node.scp.port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr


def _jobs(node: Node) -> list[dict[str, Any]]:
    with node.db.session() as session:
        return [{"id": j.id, "pipeline": j.pipeline, "priority": j.priority, "state": j.state,
                 "reason": j.reason, "worker": j.worker or "", "started_at": j.started_at,
                 "finished_at": j.finished_at}
                for j in session.execute(select(Job).order_by(Job.id)).scalars()]


def _wait_for(node: Node, done: Callable[[list[dict[str, Any]]], bool],
              timeout: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows = _jobs(node)
    while not done(rows):
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)
        rows = _jobs(node)
    return rows


def _in_state(rows: list[dict[str, Any]], pipeline: str, state: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["pipeline"] == pipeline and r["state"] == state]


def test_an_urgent_study_starts_at_once_while_every_normal_worker_runs_a_long_job(
        settings: Settings, tmp_path: Path, long_jobs: _LongJobStandIn) -> None:
    settings.workers, settings.urgent_workers = 2, 1
    abdomen = [f for n in range(3) for f in _study(tmp_path / f"abdomen{n}", "abdomen", n)]
    head = _study(tmp_path / "head", "head", 11)
    node = Node(settings)
    node.start()
    try:
        # three long normal jobs: two running (every normal worker busy), one queued
        _send(node, abdomen)
        _wait_for(node, lambda rows: len(_in_state(rows, LONG_JOB, "running")) == 2
                  and len(_in_state(rows, LONG_JOB, "queued")) == 1)
        # dicomnode status shows the queue depth per priority
        assert {"priority": jobs.PRIORITY["normal"], "queued": 1,
                "running": 2} in node_status(node.db)["queue"]
        _send(node, head)
        rows = _wait_for(node, lambda rows: any(
            r["priority"] == jobs.PRIORITY["urgent"] and r["started_at"] for r in rows))
        (urgent,) = [r for r in rows if r["priority"] == jobs.PRIORITY["urgent"]]
        assert urgent["pipeline"] == "brain_ich"
        assert "-urgent-" in urgent["worker"]
        # started without waiting for a running job to finish, and before the queued one
        assert len(_in_state(rows, LONG_JOB, "running")) == 2
        assert len(_in_state(rows, LONG_JOB, "queued")) == 1
        # its routing job ran in the lane too: every normal worker was busy
        head_routing = [r for r in rows if r["pipeline"] is None][-1]
        assert "-urgent-" in head_routing["worker"]

        # the lane takes no normal job, even when it has nothing else to do
        _wait_for(node, lambda rows: any(r["id"] == urgent["id"] and r["finished_at"]
                                         for r in rows))
        time.sleep(1.5)  # longer than a worker's idle poll
        assert len(_in_state(_jobs(node), LONG_JOB, "queued")) == 1

        long_jobs.release.set()
        rows = _wait_for(node, lambda rows: len(_in_state(rows, LONG_JOB, "no_result")) == 3)
    finally:
        node.stop()
    normal = [r for r in rows if r["pipeline"] == LONG_JOB]
    assert not [r for r in normal if "-urgent-" in r["worker"]]
    assert max(r["started_at"] for r in normal) > urgent["started_at"]
    # the urgent study finished before either job that was running when it arrived
    urgent_done = next(r for r in rows if r["id"] == urgent["id"])["finished_at"]
    running_then = [r for r in normal if r["started_at"] < urgent["started_at"]]
    assert len(running_then) == 2
    assert all(r["finished_at"] > urgent_done for r in running_then)


def test_an_urgent_study_takes_the_next_free_worker_ahead_of_five_queued_studies(
        settings: Settings, tmp_path: Path, long_jobs: _LongJobStandIn) -> None:
    # no lane: the urgent study waits for the running job, then goes first
    settings.workers, settings.urgent_workers = 1, 0
    abdomen = [f for n in range(6) for f in _study(tmp_path / f"abdomen{n}", "abdomen", n)]
    head = _study(tmp_path / "head", "head", 11)
    node = Node(settings)
    node.start()
    try:
        _send(node, abdomen)
        _wait_for(node, lambda rows: len(_in_state(rows, LONG_JOB, "running")) == 1
                  and len(_in_state(rows, LONG_JOB, "queued")) == 5)
        _send(node, head)
        time.sleep(1.0)
        rows = _jobs(node)
        assert [r["state"] for r in rows if r["pipeline"] is None][-1] == "queued"
        long_jobs.release.set()
        rows = _wait_for(node, lambda rows: len(_in_state(rows, LONG_JOB, "no_result")) == 6
                         and all(r["finished_at"] for r in rows))
    finally:
        node.stop()
    order = [r["pipeline"] or "routing"
             for r in sorted(rows, key=lambda r: r["started_at"])][-7:]
    assert order == ["routing", "brain_ich"] + [LONG_JOB] * 5


class _ShortOfMemoryBesideAnotherJob:
    """Test-only urgent pipeline: its first run ends as a pipeline does when the device
    had no memory left for it (``ModelPipeline.run``), its later runs end normally."""

    name = "short_of_memory_stand_in"
    region = "head"
    emits = (ResultObject.SR,)

    def __init__(self) -> None:
        self.runs: list[float] = []

    def check(self) -> None:
        pass

    def warm_up(self) -> None:
        pass

    def run(self, volume: Any) -> PipelineResult:
        self.runs.append(time.monotonic())
        if len(self.runs) == 1:
            return PipelineResult(self.name, ok=False, reason="out of memory while "
                                  "segmenting: CUDA out of memory (stand-in)")
        return PipelineResult(self.name, ok=False, reason="ran alone")


def test_an_urgent_job_short_of_memory_beside_a_running_job_runs_again_once_alone(
        settings: Settings, tmp_path: Path, long_jobs: _LongJobStandIn,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # both lanes share the device: running out of memory there must cost the urgent
    # study time, not its result
    urgent = _ShortOfMemoryBesideAnotherJob()
    monkeypatch.setitem(base._REGISTRY, urgent.name, lambda context: urgent)
    _route_to(settings, tmp_path / "routing.yaml",
              {"liver_tumor": LONG_JOB, "brain_ich": urgent.name})
    settings.workers, settings.urgent_workers = 1, 1
    abdomen = _study(tmp_path / "abdomen", "abdomen", 0)
    head = _study(tmp_path / "head", "head", 11)
    node = Node(settings)
    node.start()
    try:
        _send(node, abdomen)
        _wait_for(node, lambda rows: len(_in_state(rows, LONG_JOB, "running")) == 1)
        _send(node, head)
        _wait_for(node, lambda rows: len(urgent.runs) == 1)
        time.sleep(1.0)
        assert len(urgent.runs) == 1  # waiting for the long job, not ending "no result"
        assert len(_in_state(_jobs(node), urgent.name, "running")) == 1
        released = time.monotonic()
        long_jobs.release.set()
        rows = _wait_for(node, lambda rows: bool(_in_state(rows, urgent.name, "no_result")))
    finally:
        node.stop()
    assert len(urgent.runs) == 2 and urgent.runs[1] >= released
    assert [r["reason"] for r in rows if r["pipeline"] == urgent.name] == ["ran alone"]


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_job_workers_run_nicer_than_the_listener(settings: Settings,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Receiving must keep priority over the models on a busy CPU.
    levels: list[int] = []

    class _Pipeline(_RecordingPipeline):
        def warm_up(self) -> None:
            levels.append(_nice(threading.get_native_id()))

    monkeypatch.setattr(jobs, "availability", lambda context=None: {"recording": "ok"})
    monkeypatch.setattr(jobs, "get_pipeline", lambda name, context=None: _Pipeline())
    settings.warm_up, settings.job_nice = True, 7
    node = Node(settings)
    node.start()
    try:
        assert node.runner.warmed.wait(60)
    finally:
        node.stop()
    here = _nice(threading.get_native_id())
    assert levels and set(levels) == {min(19, here + 7)}


def test_the_threads_torch_starts_for_a_nicer_worker_are_as_nice() -> None:
    import torch

    if (os.cpu_count() or 1) < 2:
        pytest.skip("torch starts no pool on one core")
    seen: dict[str, Any] = {}

    def work() -> None:
        before = set(os.listdir("/proc/self/task"))
        seen["level"] = jobs.lower_thread_priority(5)
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            a = torch.rand(512, 512)
            for _ in range(5):
                a = a @ a / 512
            seen["levels"] = {_nice(int(t)) for t in set(os.listdir("/proc/self/task")) - before}
        finally:
            torch.set_num_threads(previous)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert seen["level"] is not None
    assert seen["levels"], "torch started no thread"
    assert seen["levels"] == {seen["level"]}
