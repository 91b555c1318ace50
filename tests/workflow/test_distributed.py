"""Jobs on Celery workers: the index decides who runs a job, the broker only carries it;
a task delivered twice runs once, a task the broker lost is published again."""

from __future__ import annotations

from pathlib import Path

import pytest
from kombu import Connection
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.config import Peer, Settings
from dicomnode.store.db import Database
from dicomnode.store.models import Delivery, Job, JobState, Patient, Study
from dicomnode.workflow import distributed
from dicomnode.workflow.distributed import Dispatcher, message_priority
from dicomnode.workflow.export import Outbox
from dicomnode.workflow.jobs import PRIORITY, JobRunner, StudyRun
from tests.rabbitmq import RabbitMQ


def _index(settings: Settings, priorities: list[int], pipeline: str | None = "liver_tumor",
           ) -> tuple[Database, list[int]]:
    db = Database(settings.db_url)
    db.upgrade()
    with db.transaction() as session:
        study = Study(study_uid=generate_uid(), patient=Patient(patient_id="", issuer=""),
                      version=1, calling_aet="PACS")
        jobs = [Job(study=study, study_version=1, pipeline=pipeline, priority=p,
                    routing={"action": {}}) for p in priorities]
        session.add_all(jobs)
        session.flush()
        ids = [job.id for job in jobs]
    return db, ids


def _results(tmp_path: Path, name: str) -> list[Path]:
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(b"result")
    return [path]


def test_a_job_taken_over_from_a_dead_worker_sends_one_result_and_not_two(
        settings: Settings, tmp_path: Path) -> None:
    settings.peers = {"PACS": Peer(host="127.0.0.1", port=104)}
    db, (job_id,) = _index(settings, [PRIORITY["normal"]])
    runner = JobRunner(db, settings, Outbox(db, settings))
    first = runner.claim_job(job_id, "gpu-a")
    assert first is not None
    # the first delivery is not redelivered: it is no longer queued, nothing happens
    assert runner.claim_job(job_id, "gpu-b") is None
    # its worker was thought dead: the broker delivered the task again, flagged
    second = runner.claim_job(job_id, "gpu-b", takeover=True)
    assert second is not None and second["attempt"] == 2
    runner._finish(second, StudyRun(JobState.DONE, pipeline="liver_tumor",
                                    result_files=_results(tmp_path, "b")))
    # the first worker was alive after all and finishes too: its result is dropped
    runner._finish(first, StudyRun(JobState.DONE, pipeline="liver_tumor",
                                   result_files=_results(tmp_path, "a")))
    with db.session() as session:
        deliveries = session.execute(select(Delivery)).scalars().all()
        job = session.get(Job, job_id)
    assert [d.files for d in deliveries] == [[str(tmp_path / "b.dcm")]]
    assert job is not None and (job.state, job.worker, job.attempts) == ("done", "gpu-b", 2)
    # a task delivered once more after the job finished does nothing
    assert runner.run_job(job_id, "gpu-c", takeover=True) is False
    db.dispose()


def test_a_job_whose_worker_died_at_every_attempt_is_recorded_as_failed(
        settings: Settings) -> None:
    settings.celery.max_attempts = 2
    db, (job_id,) = _index(settings, [PRIORITY["normal"]])
    runner = JobRunner(db, settings, Outbox(db, settings))
    assert runner.claim_job(job_id, "gpu-a") is not None
    assert runner.claim_job(job_id, "gpu-b", takeover=True) is not None
    assert runner.claim_job(job_id, "gpu-c", takeover=True) is None
    with db.session() as session:
        job = session.get(Job, job_id)
    assert job is not None and job.state == "failed" and "2 attempts" in (job.reason or "")
    db.dispose()


def _depth(url: str, queue: str) -> int:
    with Connection(url) as conn:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)


def test_queued_jobs_are_published_by_priority_and_again_when_the_broker_lost_them(
        settings: Settings, rabbitmq: RabbitMQ, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.executor, settings.broker_url = "celery", rabbitmq.url
    settings.celery.queue, settings.celery.urgent_queue = (f"jobs-{generate_uid()[-8:]}",
                                                           f"urgent-{generate_uid()[-8:]}")
    db, ids = _index(settings, [PRIORITY["normal"], PRIORITY["urgent"], PRIORITY["low"]])
    app = distributed.make_app(settings)
    with app.connection_for_write() as conn:  # declare both queues as a worker would
        for queue in app.conf.task_queues:
            queue.bind(conn.default_channel).declare()
    dispatcher = Dispatcher(db, settings, app)
    assert dispatcher.publish_due() == 3
    assert dispatcher.publish_due() == 0  # published: not again before requeue_after_s
    assert _depth(rabbitmq.url, settings.celery.urgent_queue) == 1
    assert _depth(rabbitmq.url, settings.celery.queue) == 2
    # the broker loses every message; the job rows are still queued
    with Connection(rabbitmq.url) as conn:
        for queue in (settings.celery.queue, settings.celery.urgent_queue):
            conn.default_channel.queue_purge(queue)
    with db.transaction() as session:  # one of them was claimed meanwhile
        job = session.get(Job, ids[2])
        assert job is not None
        job.state = JobState.RUNNING.value
    settings.celery.requeue_after_s = 0.01
    assert dispatcher.publish_due() == 2  # the sweep: the queued ones only
    assert _depth(rabbitmq.url, settings.celery.queue) == 1
    assert _depth(rabbitmq.url, settings.celery.urgent_queue) == 1
    db.dispose()


def test_message_priorities_keep_the_order_of_job_priorities() -> None:
    order = [message_priority(PRIORITY[name])
             for name in ("urgent", "routing", "high", "normal", "low")]
    assert order == sorted(order, reverse=True) and order[0] == distributed.MAX_PRIORITY
    assert len(set(order)) == len(order)


def test_routing_taken_over_from_a_dead_worker_queues_the_pipeline_jobs_once(
        settings: Settings) -> None:
    db, (routing_id,) = _index(settings, [PRIORITY["routing"]], pipeline=None)
    runner = JobRunner(db, settings, Outbox(db, settings))
    first = runner.claim_job(routing_id, "gpu-a")
    second = runner.claim_job(routing_id, "gpu-b", takeover=True)
    assert first is not None and second is not None
    with db.transaction() as session:
        study = session.execute(select(Study)).scalar_one()
        # the first worker, taken over, may not queue anything
        assert runner._routed_before(session, first, study.id)
        # the second may, as long as nobody did
        assert not runner._routed_before(session, second, study.id)
    with db.transaction() as session:  # the dead worker had queued them before it died
        session.add(Job(study_pk=study.id, study_version=1, pipeline="liver_tumor",
                        priority=PRIORITY["normal"]))
    with db.transaction() as session:
        assert runner._routed_before(session, second, study.id)
    db.dispose()
