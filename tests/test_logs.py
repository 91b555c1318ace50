"""Tests of dicomnode.logs: the node's log format and what it leaves out."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from dicomnode import logs
from dicomnode.logs import configure_logging, fields, quiet_info

# the handler writes to whatever sys.stderr is when a record comes: capsys sees it;
# the autouse fixture of tests/conftest.py removes the handler after each test


def _events(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_patient_fields_never_reach_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    logging.getLogger("dicomnode.test").info(
        "study.seen", extra=fields(study="1.2.3", PatientName="DOE^JANE", patient_id="42"))
    (event,) = _events(capsys)
    assert event["study"] == "1.2.3"
    assert "PatientName" not in event and "patient_id" not in event


def test_quiet_info_leaves_out_only_this_threads_routine_records(
        capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    log = logging.getLogger("dicomnode.test")

    def other_thread() -> None:
        log.info("instance.stored")

    with quiet_info():
        log.info("seg.built")
        log.warning("warm_up.slow")
        with quiet_info():
            log.info("nested")
        log.info("still.quiet")  # the inner block does not end the outer one
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    log.info("after")
    assert [e["event"] for e in _events(capsys)] == ["warm_up.slow", "instance.stored",
                                                    "after"]


def test_a_log_limit_admits_one_line_per_key_per_interval_and_counts_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    limit = logs.LogLimit(60.0, max_keys=2)
    assert limit.admit("10.0.0.1") == 0
    assert limit.admit("10.0.0.1") is None
    assert limit.admit("10.0.0.1") is None
    assert limit.admit("10.0.0.2") == 0          # another key has its own interval
    clock[0] += 61
    assert limit.admit("10.0.0.1") == 2          # the next line says how many were left out
    clock[0] += 61
    assert limit.admit("10.0.0.3") == 0          # past max_keys the quiet keys are forgotten
    assert len(limit._last) <= 2
