"""The export outbox: results queued per destination, sent with retries and back-off.

Every delivery is a row; the exporter thread claims due rows, sends their files over
C-STORE and records the outcome, retrying with back-off as
:mod:`dicomnode.workflow.retry` does for every such queue; rows survive restarts
(``sending`` goes back to ``pending``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from dicomnode.config import PeerTls, Settings
from dicomnode.logs import fields
from dicomnode.metrics import NodeMetrics
from dicomnode.net.scu import SendError, SendResult, send_files
from dicomnode.store.db import Database
from dicomnode.store.models import Delivery, DeliveryState, utcnow
from dicomnode.workflow.retry import RetryingSender, RetryPolicy

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


class Outbox(RetryingSender[Delivery]):
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

    model = Delivery
    name = "export"
    event = "delivery"

    def __init__(self, db: Database, settings: Settings, sender: Sender | None = None,
                 metrics: NodeMetrics | None = None) -> None:
        super().__init__(db)
        self.settings = settings
        self.sender = sender or send_files
        self.metrics = metrics or NodeMetrics()

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

    @property
    def policy(self) -> RetryPolicy:
        """Attempts and back-off from ``export``; one delivery at a time."""
        exp = self.settings.export
        return RetryPolicy(exp.max_attempts, exp.backoff_initial_s, exp.backoff_max_s,
                           exp.poll_interval_s)

    def send(self, row: Delivery) -> tuple[str | None, bool]:
        """C-STORE the delivery's files to its destination (TLS where its peer has it)."""
        files = [Path(f) for f in row.files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            return f"{len(missing)} result file(s) missing", True
        tls = tls_for(self.settings, row.destination_ae, row.host, row.port)
        try:
            result = self.sender(
                files, host=row.host, port=row.port,
                called_aet=row.destination_ae, calling_aet=self.settings.ae_title,
                timeout_s=self.settings.export.connect_timeout_s,
                **({"tls": tls} if tls is not None else {}),
            )
        except (SendError, OSError, ValueError) as exc:   # ValueError: a TLS file
            return str(exc), False
        if not result.ok:
            return f"{len(result.failed)} of {len(files)} refused: " + "; ".join(
                sorted(set(result.failed.values()))[:3]), False
        return None, False

    def audit(self, row: Delivery, error: str | None) -> dict[str, Any]:
        """The destination's AE title, the attempts and the error."""
        return {"calling_aet": row.destination_ae,
                "detail": {"delivery": row.id, "attempts": row.attempts, "error": error}}

    def log_fields(self, row: Delivery) -> dict[str, Any]:
        """The delivery id and the destination's AE title."""
        return {"delivery": row.id, "peer": row.destination_ae}

    def settled(self, outcome: str, error: str | None) -> None:
        """Count the attempt (and the failure) in the node's metrics."""
        self.metrics.delivery_attempts.labels(outcome).inc()
        if error is not None:
            self.metrics.delivery_failures.inc()
