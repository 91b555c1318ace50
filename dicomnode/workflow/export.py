"""The export outbox: results queued per destination, sent with retries and back-off.

Every delivery is a row; the exporter thread claims due rows, sends their files over
C-STORE and records the outcome. A failed attempt is retried after
``backoff_initial_s * 2**(attempts-1)`` seconds (capped at ``backoff_max_s``) until
``max_attempts``; rows survive restarts (``sending`` goes back to ``pending``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomnode.config import PeerTls, Settings
from dicomnode.logs import fields
from dicomnode.metrics import NodeMetrics
from dicomnode.net.scu import SendError, SendResult, send_files
from dicomnode.store.db import Database
from dicomnode.store.models import AuditEvent, Delivery, DeliveryState, utcnow

log = logging.getLogger(__name__)

Sender = Callable[..., SendResult]


@dataclass(frozen=True)
class Target:
    """Where one set of results goes."""

    ae_title: str
    host: str
    port: int
    why: str


def resolve_targets(settings: Settings, calling_aet: str, pipeline: str | None,
                    names: Sequence[str] | None = None) -> list[Target]:
    """The destinations for results of ``pipeline`` on a study sent by ``calling_aet``.

    Parameters
    ----------
    settings : Settings
        Peer table and destinations.
    calling_aet : str
        The AE that sent the study.
    pipeline : str, optional
        The pipeline that produced the results.
    names : sequence of str, optional
        Destinations named by the routing rule: ``sender`` or keys of
        ``settings.destinations``. None means ``["sender"]``.

    Returns
    -------
    list of Target
        Back to the sender when named, in the peer table and ``return_to_sender`` is
        on; each named destination; every configured destination whose pipeline
        filter admits ``pipeline``. Each destination at most once.
    """
    wanted = list(names) if names is not None else ["sender"]
    targets: list[Target] = []
    for name in wanted:
        if name != "sender" and name not in settings.destinations:
            log.warning("export.unknown_destination", extra=fields(destination=name))
    if "sender" in wanted and settings.export.return_to_sender and calling_aet:
        peer = settings.peers.get(calling_aet)
        if peer is not None:
            targets.append(Target(peer.ae_title or calling_aet, peer.host, peer.port,
                                  f"sender {calling_aet}"))
        else:
            log.warning("export.unknown_sender", extra=fields(calling_aet=calling_aet))
    for name, dest in settings.destinations.items():
        if name in wanted or dest.pipelines is None or (
                pipeline is not None and pipeline in dest.pipelines):
            targets.append(Target(dest.ae_title, dest.host, dest.port, f"destination {name}"))
    return targets


def tls_for(settings: Settings, ae_title: str, host: str, port: int) -> PeerTls | None:
    """The TLS settings of the configured peer or destination at this address, if any.

    A delivery row keeps the called AE title, host and port, not how they were
    configured; the configuration in force when it is sent decides whether TLS is used.

    Parameters
    ----------
    settings : Settings
    ae_title, host, port : str, str, int
        The delivery's destination.

    Returns
    -------
    PeerTls or None
        None for plain DICOM.
    """
    for key, peer in settings.peers.items():
        if (peer.ae_title or key, peer.host, peer.port) == (ae_title, host, port) and peer.tls:
            return peer.tls
    for dest in settings.destinations.values():
        if (dest.ae_title, dest.host, dest.port) == (ae_title, host, port) and dest.tls:
            return dest.tls
    return None


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next attempt after ``attempts`` failed ones."""
    return float(min(maximum, initial * 2 ** max(0, attempts - 1)))


class Outbox:
    """Queue and send results.

    Parameters
    ----------
    db : Database
        Where deliveries are kept.
    settings : Settings
        Our AE title and the export settings.
    sender : callable, optional
        Replaces ``net.scu.send_files`` (keyword arguments as there; ``tls`` only for a
        TLS destination).
    metrics : NodeMetrics, optional
        Where attempts and failures are counted (default: a registry of its own).
    """

    def __init__(self, db: Database, settings: Settings, sender: Sender | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        self.db = db
        self.settings = settings
        self.sender = sender or send_files
        self.metrics = metrics or NodeMetrics()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def enqueue(self, files: Sequence[Path], target: Target, *, study_uid: str = "",
                job_pk: int | None = None, session: Session | None = None) -> int:
        """Queue ``files`` for ``target``; returns the delivery id.

        With ``session`` the row is added to the caller's transaction (the job that made
        the files commits it with its own state, so a crash cannot leave results queued
        for a job that will run again); the caller calls :meth:`wake` after its commit.
        """
        if not files:
            raise ValueError("Invalid 'files' value '[]' - nothing to deliver")
        delivery = Delivery(
            job_pk=job_pk, study_uid=study_uid, destination_ae=target.ae_title,
            host=target.host, port=target.port, files=[str(f) for f in files],
            state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=utcnow(),
        )
        if session is not None:
            session.add(delivery)
            session.flush()
        else:
            with self.db.transaction() as own:
                own.add(delivery)
                own.flush()
        log.info("export.queued", extra=fields(delivery=delivery.id, peer=target.ae_title,
                                               files=len(files), why=target.why))
        if session is None:
            self.wake()
        return delivery.id

    def wake(self) -> None:
        """Look for due deliveries now."""
        self._wake.set()

    def _claim(self) -> Delivery | None:
        with self.db.transaction() as session:
            delivery = session.execute(
                select(Delivery)
                .where(Delivery.state == DeliveryState.PENDING.value,
                       Delivery.next_attempt_at <= utcnow())
                .order_by(Delivery.next_attempt_at, Delivery.id)
                .limit(1)
                .with_for_update(skip_locked=True)  # PostgreSQL: another node's is skipped
            ).scalar_one_or_none()
            if delivery is not None:
                delivery.state = DeliveryState.SENDING.value
                delivery.attempts += 1
            return delivery

    def process_due(self) -> int:
        """Attempt every delivery that is due now; returns how many were attempted."""
        count = 0
        while not self._stop.is_set():
            delivery = self._claim()
            if delivery is None:
                break
            count += 1
            self._attempt(delivery)
        return count

    def _attempt(self, delivery: Delivery) -> None:
        files = [Path(f) for f in delivery.files]
        missing = [str(f) for f in files if not f.is_file()]
        error: str | None = None
        if missing:
            error = f"{len(missing)} result file(s) missing"
            final = True
        else:
            final = False
            tls = tls_for(self.settings, delivery.destination_ae, delivery.host, delivery.port)
            try:
                result = self.sender(
                    files, host=delivery.host, port=delivery.port,
                    called_aet=delivery.destination_ae, calling_aet=self.settings.ae_title,
                    timeout_s=self.settings.export.connect_timeout_s,
                    **({"tls": tls} if tls is not None else {}),
                )
                if not result.ok:
                    error = f"{len(result.failed)} of {len(files)} refused: " + "; ".join(
                        sorted(set(result.failed.values()))[:3])
            except (SendError, OSError, ValueError) as exc:   # ValueError: a TLS file
                error = str(exc)
            except Exception as exc:  # never let one delivery stop the outbox
                log.exception("export.unexpected_error")
                error = f"{type(exc).__name__}: {exc}"
        exp = self.settings.export
        with self.db.transaction() as session:
            row = session.get(Delivery, delivery.id)
            assert row is not None
            if error is None:
                row.state = DeliveryState.DONE.value
                row.sent_at = utcnow()
                row.last_error = None
                event = "delivery.done"
            elif final or row.attempts >= exp.max_attempts:
                row.state = DeliveryState.FAILED.value
                row.last_error = error
                event = "delivery.failed"
            else:
                row.state = DeliveryState.PENDING.value
                row.last_error = error
                delay = backoff_seconds(row.attempts, exp.backoff_initial_s, exp.backoff_max_s)
                row.next_attempt_at = utcnow() + timedelta(seconds=delay)
                event = "delivery.retry"
            session.add(AuditEvent(
                event=event, study_uid=row.study_uid, calling_aet=row.destination_ae,
                detail={"delivery": row.id, "attempts": row.attempts, "error": error},
            ))
            attempts = row.attempts
        self.metrics.delivery_attempts.labels(event.removeprefix("delivery.")).inc()
        if error is not None:
            self.metrics.delivery_failures.inc()
        level = logging.INFO if error is None else logging.WARNING
        log.log(level, event, extra=fields(delivery=delivery.id, peer=delivery.destination_ae,
                                           attempts=attempts, error=error or ""))

    def start(self) -> None:
        """Start the exporter thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="export", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the exporter thread (an attempt in progress finishes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.process_due()
            except Exception:
                log.exception("export.poll_failed")
            self._wake.wait(self.settings.export.poll_interval_s)
            self._wake.clear()
