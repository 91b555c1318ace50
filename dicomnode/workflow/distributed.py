"""Jobs on Celery workers with a RabbitMQ broker (``executor: celery``).

The index stays the truth; the broker only says "job N is waiting":

- the node publishes every queued job row (routing and pipeline jobs) as a task
  ``dicomnode.run_job(N)``: urgent jobs to ``celery.urgent_queue``, the others to
  ``celery.queue``, with the job's priority as the message priority (both are RabbitMQ
  priority queues); a :class:`Dispatcher` thread publishes new rows at once and, as a
  periodic sweep, publishes again a row still queued ``celery.requeue_after_s`` after it
  was published (a broker that lost it), since a second message for one job is harmless;
- a worker (``dicomnode worker``, one process per GPU) takes one task at a time
  (prefetch 1), acknowledges it only when the job is finished (late ack), and claims
  the row atomically (``JobRunner.claim_job``): a task whose job is no longer queued
  does nothing, so a redelivered task that already finished sends no second result;
- a worker that dies holding a task (``task_reject_on_worker_lost``, or its connection
  dropped) has the task delivered again by RabbitMQ, flagged *redelivered*: the next
  worker takes the running job over, and the dead worker's attempt can no longer record
  a result (``JobRunner._finish`` checks the attempt it claimed).

RabbitMQ and not Redis: with Redis as the broker, a task not acknowledged within the
visibility timeout is delivered again to another worker while the first still runs it
(Celery's documented caveat), which long GPU jobs with late acknowledgement hit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.logs import fields
from dicomnode.store.db import Database
from dicomnode.store.models import Job, JobState

log = logging.getLogger(__name__)

#: The task every job runs as.
TASK = "dicomnode.run_job"
#: Highest message priority (RabbitMQ's x-max-priority of both queues).
MAX_PRIORITY = 9


def _celery() -> Any:
    try:
        import celery
    except ImportError as exc:  # pragma: no cover - the scale extra is missing
        raise RuntimeError("executor celery needs the 'scale' extra "
                           "(pip install 'dicomnode[scale]')") from exc
    return celery


def make_app(settings: Settings) -> Any:
    """The Celery application of a node and its workers (no result backend: the index is).

    Parameters
    ----------
    settings : Settings
        ``broker_url`` and the ``celery`` block.

    Returns
    -------
    celery.Celery
    """
    celery = _celery()
    from kombu import Queue

    if not settings.broker_url:
        raise ValueError("Invalid 'broker_url' value 'None' - executor celery needs a "
                         "broker (amqp://USER:PASS@HOST:5672/VHOST)")
    app = celery.Celery("dicomnode", broker=settings.broker_url, set_as_current=False)
    queues = [Queue(name, routing_key=name, queue_arguments={"x-max-priority": MAX_PRIORITY})
              for name in (settings.celery.urgent_queue, settings.celery.queue)]
    app.conf.update(
        task_queues=queues,
        task_default_queue=settings.celery.queue,
        task_acks_late=True,                 # acknowledged when the job is finished
        task_reject_on_worker_lost=True,     # a worker that dies: the task goes back
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,        # one job at a time per worker process
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,       # the node's own log set-up stays in charge
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        task_default_priority=5,
        broker_transport_options={"confirm_publish": True},
    )
    return app


def message_priority(job_priority: int) -> int:
    """A job priority (0-100, ``jobs.PRIORITY``) as an AMQP message priority (0-9)."""
    return max(0, min(MAX_PRIORITY, job_priority // 10 - 1 if job_priority < 100
                      else MAX_PRIORITY))


class Dispatcher:
    """The node's side: publishes queued job rows to the broker, and again when lost.

    Parameters
    ----------
    db : Database
        The index.
    settings : Settings
        ``broker_url`` and the ``celery`` block.
    app : celery.Celery, optional
        Default ``make_app(settings)``.
    """

    def __init__(self, db: Database, settings: Settings, app: Any = None) -> None:
        self.db = db
        self.settings = settings
        self.app = app if app is not None else make_app(settings)
        self._published: dict[int, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, job_id: int, priority: int) -> None:
        """Send one job's task: urgent ones to the urgent queue, each at its priority."""
        from dicomnode.workflow.jobs import PRIORITY

        queue = (self.settings.celery.urgent_queue if priority >= PRIORITY["urgent"]
                 else self.settings.celery.queue)
        self.app.send_task(TASK, args=[job_id], queue=queue, routing_key=queue,
                           priority=message_priority(priority))
        self._published[job_id] = time.monotonic()
        log.info("job.published", extra=fields(job=job_id, queue=queue, priority=priority))

    def publish_due(self) -> int:
        """Publish every queued job not published yet, or published longer ago than
        ``celery.requeue_after_s`` (the sweep); returns how many were sent."""
        with self.db.session() as session:
            rows = session.execute(
                select(Job.id, Job.priority).where(Job.state == JobState.QUEUED.value)
                .order_by(Job.priority.desc(), Job.id)).all()
        now, sent = time.monotonic(), 0
        queued = {job_id for job_id, _ in rows}
        for job_id in [j for j in self._published if j not in queued]:
            del self._published[job_id]  # claimed (or superseded) since
        for job_id, priority in rows:
            last = self._published.get(job_id)
            if last is not None and now - last < self.settings.celery.requeue_after_s:
                continue
            if last is not None:
                log.warning("job.republished", extra=fields(
                    job=job_id, queued_s=round(now - last, 1)))
            self.publish(job_id, priority)
            sent += 1
        return sent

    def wake(self) -> None:
        """Publish now (a study completed)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.publish_due()
            except Exception:  # the broker is away: the next round tries again
                log.exception("jobs.publish_failed")
                self._wake.wait(5.0)
            self._wake.wait(1.0)

    def start(self) -> None:
        """Start the publishing thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="job-dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the publishing thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


def worker_name() -> str:
    """This worker process as recorded in job rows: ``host-pid``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def run_worker(settings: Settings, queues: list[str] | None = None, concurrency: int = 1,
               ) -> None:
    """Run a Celery worker that runs jobs of this node's index; returns when stopped.

    Parameters
    ----------
    settings : Settings
        The node's settings (same index, data folder, broker, models, device).
    queues : list of str, optional
        Queues to take, in order; default the urgent queue, then the job queue.
    concurrency : int
        Jobs at once in this process (threads sharing one copy of each model); one
        process per GPU with 1 is the design.
    """
    from celery.signals import setup_logging

    from dicomnode.workflow.export import Outbox
    from dicomnode.workflow.jobs import JobRunner

    # a receiver here tells Celery not to configure logging: configure_logging did
    setup_logging.connect(_keep_logging, weak=False)
    app = make_app(settings)
    db = Database(settings.db_url)
    db.upgrade()
    # the node's outbox sends the results, and its dispatcher publishes the pipeline jobs
    # that routing here queues (within a second): one publisher, no duplicate messages
    runner = JobRunner(db, settings, Outbox(db, settings))
    name = worker_name()

    @app.task(name=TASK, bind=True)  # type: ignore[untyped-decorator]
    def run_job(task: Any, job_id: int) -> None:
        redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
        runner.run_job(int(job_id), name, takeover=redelivered)

    if settings.warm_up:  # before taking the first task
        runner.warm_here()
    queues = queues or [settings.celery.urgent_queue, settings.celery.queue]
    log.info("worker.started", extra=fields(worker=name, queues=",".join(queues),
                                            concurrency=concurrency))
    try:
        app.worker_main(argv=[
            "worker", "--queues", ",".join(queues), "--concurrency", str(concurrency),
            # jobs on a pool thread, never on the consumer's: a solo pool blocks the
            # connection for the whole job, the broker's heartbeats go unanswered and
            # RabbitMQ hands a long job to another worker while it still runs
            "--pool", "threads",
            "--hostname", f"dicomnode-{name}@%h", "--loglevel",
            settings.log_level, "--without-gossip", "--without-mingle",
            "--without-heartbeat"])
    finally:
        db.dispose()


def _keep_logging(**_: Any) -> None:
    """Celery's ``setup_logging`` receiver: logging is configured already."""

