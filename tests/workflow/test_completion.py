"""Study completeness: the three triggers, and re-opening by a late instance."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.node import Node
from dicomnode.store.models import Job, Study
from dicomnode.workflow.completion import SeriesGeometry, contiguity_problem
from tests.factories import write_series


def _send(node: Node, paths: list[Path], aet: str = "CTSCANNER") -> None:
    out = subprocess.run(["storescu", "-aet", aet, "-aec", node.settings.ae_title, "127.0.0.1",
                          str(node.scp.port), *map(str, paths)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _study(node: Node) -> Study:
    with node.db.session() as s:
        return s.execute(select(Study)).scalar_one()


def _wait_state(node: Node, state: str, timeout: float = 15.0) -> Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = _study(node)
        if study.state == state:
            return study
        time.sleep(0.05)
    raise AssertionError(f"study still {_study(node).state}")


def test_contiguity_rules() -> None:
    ok = SeriesGeometry("1", frozenset({"o"}), (0.0, 2.0, 4.0, 6.0))
    assert contiguity_problem(ok) is None
    assert "gap" in contiguity_problem(SeriesGeometry("1", frozenset({"o"}), (0, 2, 6, 8)))
    assert "duplicate" in contiguity_problem(SeriesGeometry("1", frozenset({"o"}), (0, 2, 2, 4)))
    assert "mixed" in contiguity_problem(SeriesGeometry("1", frozenset({"a", "b"}), (0, 2, 4)))
    assert "fewer" in contiguity_problem(SeriesGeometry("1", frozenset({"o"}), (0, 2)))
    assert "non-uniform" in contiguity_problem(
        SeriesGeometry("1", frozenset({"o"}), (0, 2, 4.5, 6.5, 8.5)))


def test_release_of_contiguous_series_completes_at_once(node: Node, tmp_path: Path) -> None:
    _send(node, write_series(tmp_path / "s", 20))
    study = _wait_state(node, "complete", timeout=5)
    assert study.completion_trigger == "association_release"
    assert study.instance_count == 20
    with node.db.session() as s:
        jobs = s.execute(select(Job)).scalars().all()
    assert [(j.study_version) for j in jobs] == [1]


def test_gap_waits_for_quiet_period(settings: Settings, tmp_path: Path) -> None:
    settings.completion.quiet_period_s = 1.5
    node = Node(settings)
    node.start()
    try:
        _send(node, write_series(tmp_path / "s", 20, skip=(10, 11)))
        time.sleep(0.5)
        assert _study(node).state == "receiving"
        study = _wait_state(node, "complete", timeout=10)
        assert study.completion_trigger == "quiet_period"
    finally:
        node.stop()


def test_expected_count_trigger(settings: Settings, tmp_path: Path) -> None:
    settings.completion.on_association_release = False
    node = Node(settings)
    node.start()
    try:
        paths = write_series(tmp_path / "s", 8, images_in_acquisition=8)
        _send(node, paths[:5])
        time.sleep(0.3)
        assert _study(node).state == "receiving"
        _send(node, paths[5:])
        study = _wait_state(node, "complete", timeout=5)
        assert study.completion_trigger == "expected_count"
    finally:
        node.stop()


def test_late_instance_reopens_and_versions(settings: Settings, tmp_path: Path) -> None:
    settings.workers = 0  # keep jobs queued so that supersession is visible
    node = Node(settings)
    node.start()
    try:
        study_uid, series_uid = generate_uid(), generate_uid()
        paths = write_series(tmp_path / "s", 12, study_uid=study_uid, series_uid=series_uid)
        _send(node, paths[:10])
        assert _wait_state(node, "complete").version == 1
        _send(node, paths[10:])
        study = _wait_state(node, "complete")
        assert study.version == 2
        assert study.instance_count == 12
        with node.db.session() as s:
            jobs = s.execute(select(Job).order_by(Job.id)).scalars().all()
        assert [(j.study_version, j.state) for j in jobs] == [(1, "superseded"), (2, "queued")]
    finally:
        node.stop()


def test_job_for_complete_study_runs_and_records_reason(node: Node, tmp_path: Path) -> None:
    _send(node, write_series(tmp_path / "s", 10))
    _wait_state(node, "complete")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with node.db.session() as s:
            job = s.execute(select(Job)).scalar_one()
        if job.state != "queued" and job.state != "running":
            break
        time.sleep(0.1)
    assert job.state in {"no_result", "done"}
    assert job.timings is not None
