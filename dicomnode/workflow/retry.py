"""What the export outbox and the notifier share: rows claimed when due, sent, retried.

A row (a ``Delivery`` or a ``Notification``) waits as ``pending`` until its
``next_attempt_at``. A claim marks one due row ``sending`` and counts the attempt, with
``FOR UPDATE SKIP LOCKED`` so that two nodes on one PostgreSQL index never send the same
row. The attempt's outcome makes it ``done``; ``failed`` (its last attempt, or an error
no retry can fix); or ``pending`` again after ``backoff_initial_s * 2**(attempts-1)``
seconds, capped at ``backoff_max_s``. Up to ``senders`` attempts run at once on a thread
pool, so one slow peer holds up no other. Each outcome is audited and logged.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import select, update

from dicomnode.logs import fields
from dicomnode.store.db import Database, rowcount
from dicomnode.store.models import AuditEvent, DeliveryState, utcnow

log = logging.getLogger(__name__)

Row = TypeVar("Row", bound=Any)


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next attempt after ``attempts`` failed ones."""
    return float(min(maximum, initial * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class RetryPolicy:
    """How often, how soon again, and how many at once."""

    max_attempts: int
    backoff_initial_s: float
    backoff_max_s: float
    poll_interval_s: float
    senders: int = 1
    stop_timeout_s: float = 60.0


class RetryingSender(Generic[Row]):
    """Claim due rows of :attr:`model`, attempt each on a thread pool, record the outcome.

    A subclass says what its rows are (:attr:`model`, :attr:`name` for its thread and
    log lines, :attr:`event` for its audit events), how to send one (:meth:`send`), its
    :attr:`policy`, and what its audit event holds (:meth:`audit`).

    Parameters
    ----------
    db : Database
        Where the rows are kept.
    """

    model: ClassVar[Any]
    name: ClassVar[str]
    event: ClassVar[str]

    def __init__(self, db: Database) -> None:
        self.db = db
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what a subclass says ----------------------------------------------------------

    @property
    def policy(self) -> RetryPolicy:
        """Attempts, back-off, polling and concurrency (read at each use)."""
        raise NotImplementedError

    def send(self, row: Row) -> tuple[str | None, bool]:
        """Attempt ``row`` once: ``(None, _)`` when done, else ``(error, final)``.

        ``final`` says no retry can help. An exception is recorded as the error.
        """
        raise NotImplementedError

    def audit(self, row: Row, error: str | None) -> dict[str, Any]:
        """The audit event's fields for this outcome (``detail`` and any others)."""
        raise NotImplementedError

    def log_fields(self, row: Row) -> dict[str, Any]:
        """What names the row in a log line (no patient data)."""
        return {self.event: row.id, "study": row.study_uid}

    def settled(self, outcome: str, error: str | None) -> None:
        """Called after each outcome (``done``, ``retry``, ``failed``): metrics."""

    # --- the queue -------------------------------------------------------------------

    def wake(self) -> None:
        """Look for due rows now (called after rows were queued)."""
        self._wake.set()

    def recover(self) -> int:
        """Put rows that were being sent when the node stopped back in the queue (at
        start, before the loop runs); returns how many."""
        with self.db.transaction() as session:
            result = session.execute(
                update(self.model).where(self.model.state == DeliveryState.SENDING.value)
                .values(state=DeliveryState.PENDING.value))
            count = rowcount(result)
        if count:
            log.info(f"{self.name}.recovered", extra=fields(requeued=count))
        return count

    def _claim(self) -> Row | None:
        model = self.model
        with self.db.transaction() as session:
            row = session.execute(
                select(model)
                .where(model.state == DeliveryState.PENDING.value,
                       model.next_attempt_at <= utcnow())
                .order_by(model.next_attempt_at, model.id)
                .limit(1)
                .with_for_update(skip_locked=True)  # PostgreSQL: another node's is skipped
            ).scalar_one_or_none()
            if row is not None:
                row.state = DeliveryState.SENDING.value
                row.attempts += 1
            return row

    def process_due(self) -> int:
        """Attempt every row due now, one after the other; returns how many."""
        count = 0
        while not self._stop.is_set():
            row = self._claim()
            if row is None:
                break
            count += 1
            self._attempt(row)
        return count

    def _attempt(self, row: Row) -> None:
        try:
            error, final = self.send(row)
        except Exception as exc:  # never let one row stop the others
            log.exception(f"{self.name}.unexpected_error")
            error, final = f"{type(exc).__name__}: {exc}", False
        policy = self.policy
        with self.db.transaction() as session:
            current = session.get(self.model, row.id)
            assert current is not None
            outcome = self._settle(current, error, final, policy)
            session.add(AuditEvent(event=f"{self.event}.{outcome}",
                                   study_uid=current.study_uid, **self.audit(current, error)))
            attempts = current.attempts
        self.settled(outcome, error)
        level = logging.INFO if error is None else logging.WARNING
        log.log(level, f"{self.event}.{outcome}", extra=fields(
            **self.log_fields(row), attempts=attempts, error=error or ""))

    @staticmethod
    def _settle(row: Any, error: str | None, final: bool, policy: RetryPolicy) -> str:
        if error is None:
            row.state = DeliveryState.DONE.value
            row.sent_at = utcnow()
            row.last_error = None
            return "done"
        row.last_error = error
        if final or row.attempts >= policy.max_attempts:
            row.state = DeliveryState.FAILED.value
            return "failed"
        row.state = DeliveryState.PENDING.value
        delay = backoff_seconds(row.attempts, policy.backoff_initial_s, policy.backoff_max_s)
        row.next_attempt_at = utcnow() + timedelta(seconds=delay)
        return "retry"

    def start(self) -> None:
        """Start the thread that claims due rows."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; attempts in flight finish within the policy's stop timeout."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=self.policy.stop_timeout_s)
            self._thread = None

    def _done(self, slots: threading.Semaphore, future: Future[None]) -> None:
        slots.release()
        self._wake.set()
        if future.exception() is not None:
            log.error(f"{self.name}.attempt_failed", exc_info=future.exception())

    def _run(self) -> None:
        policy = self.policy
        slots = threading.Semaphore(policy.senders)
        with ThreadPoolExecutor(max_workers=policy.senders,
                                thread_name_prefix=f"{self.name}-send") as pool:
            while not self._stop.is_set():
                try:
                    while not self._stop.is_set() and slots.acquire(blocking=False):
                        row = self._claim()
                        if row is None:
                            slots.release()
                            break
                        pool.submit(self._attempt, row).add_done_callback(
                            lambda future: self._done(slots, future))
                except Exception:
                    log.exception(f"{self.name}.poll_failed")
                self._wake.wait(self.policy.poll_interval_s)
                self._wake.clear()
