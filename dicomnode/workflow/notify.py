"""Urgent notifications: a positive urgent result POSTed as JSON to configured webhooks.

When a pipeline job ends with a positive result (``PipelineResult.urgent``, e.g. a
suspected haemorrhage), :func:`notifications_for` makes one ``Notification`` row per
webhook that wants it; the job runner adds them in the transaction that records the
job's result, so an acknowledged study's alarm survives a crash as its results do.
The :class:`Notifier` thread claims due rows and POSTs them (stdlib ``urllib``, a short
timeout, several requests in flight so one slow endpoint holds up no other), retrying a
failed attempt after ``backoff_initial_s * 2**(attempts-1)`` seconds (capped at
``backoff_max_s``) until ``max_attempts`` (:mod:`dicomnode.workflow.retry`); ``sending``
rows go back to ``pending`` at start-up (:meth:`Notifier.recover`). It shares the retry
logic with the export outbox but neither its thread nor its rows: a webhook that is
down, slow or failing never delays the results going back to the PACS.

The payload names the study by UIDs and accession number; the patient's name, ID and
birth date only where the webhook says ``include_patient: true``.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from dicomnode.config import Settings, Webhook
from dicomnode.logs import fields
from dicomnode.store.db import Database
from dicomnode.store.models import AuditEvent, DeliveryState, Notification, utcnow
from dicomnode.workflow.retry import RetryingSender, RetryPolicy

log = logging.getLogger(__name__)

#: What a payload's ``event`` says.
EVENT = "dicomnode.urgent_result"

#: Result objects named in the payload, by SOP Class UID.
RESULT_OBJECTS = {
    "1.2.840.10008.5.1.4.1.1.88.22": "sr",      # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",      # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": "sr",      # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.59": "kos",     # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.66.4": "seg",      # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3": "rtstruct",
}

#: Sends one request: (url, body, headers, timeout_s) -> HTTP status; raises on failure.
Poster = Callable[[str, bytes, Mapping[str, str], float], int]


class NotifyError(RuntimeError):
    """One attempt failed; the message says how (HTTP status, timeout, refused)."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would repeat a POST as a GET without its body and
    call the alarm sent."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    """POST ``body`` to ``url`` and return the HTTP status (2xx).

    Parameters
    ----------
    url : str
        The webhook.
    body : bytes
        The JSON document.
    headers : mapping
        Request headers (Content-Type included).
    timeout_s : float
        For the connection and for each read of the answer.

    Returns
    -------
    int
        The status of an accepted request.

    Raises
    ------
    NotifyError
        An HTTP error status (a redirect included), a timeout or a connection that
        failed.
    """
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            response.read(65536)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        raise NotifyError(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise NotifyError(f"timed out after {timeout_s:g} s") from exc
        raise NotifyError(f"not reached: {exc.reason}") from exc
    except TimeoutError as exc:
        raise NotifyError(f"timed out after {timeout_s:g} s") from exc
    except OSError as exc:  # reset, refused while reading the answer
        raise NotifyError(f"{type(exc).__name__}: {exc}") from exc


def shown_target(url: str) -> str:
    """The webhook as logs and ``dicomnode status`` show it: no credentials, no query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def wanted_by(webhook: Webhook, pipeline: str | None, urgent: bool) -> bool:
    """Whether ``webhook`` is told of a positive result of ``pipeline``.

    A webhook with ``pipelines`` hears of those pipelines' positive results whatever
    their priority; one without hears of every positive result of an urgent rule.
    """
    if webhook.pipelines is None:
        return urgent
    return pipeline is not None and pipeline in webhook.pipelines


def _read_objects(files: Sequence[Path]) -> tuple[list[dict[str, str]], dict[str, str]]:
    """The result objects' UIDs, and the patient module of the first of them."""
    import pydicom

    objects: list[dict[str, str]] = []
    patient: dict[str, str] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "PatientName",
                "PatientID", "PatientBirthDate"])
        except (OSError, ValueError) as exc:  # named in the payload as missing
            log.warning("notify.result_unreadable", extra=fields(file=path.name,
                                                                 error=type(exc).__name__))
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        objects.append({"object": RESULT_OBJECTS.get(sop_class, "other"),
                        "sop_class_uid": sop_class,
                        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                        "series_instance_uid": str(ds.get("SeriesInstanceUID", ""))})
        if not patient:
            patient = {"name": str(ds.get("PatientName", "") or ""),
                       "id": str(ds.get("PatientID", "") or ""),
                       "birth_date": str(ds.get("PatientBirthDate", "") or "")}
    return objects, patient


def build_payload(settings: Settings, *, study_uid: str, study_version: int,
                  accession_number: str, calling_aet: str, pipeline: str, priority: str,
                  job_id: int | None, result: Mapping[str, Any],
                  flagged_sop_instance_uids: Sequence[str],
                  result_files: Sequence[Path],
                  series_instance_uid: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """The JSON document a webhook receives, and the patient module kept apart.

    Parameters
    ----------
    settings : Settings
        ``notify.dashboard_url`` for the link.
    study_uid, study_version, accession_number, calling_aet : str, int, str, str
        The study as the node holds it.
    pipeline, priority : str
        What ran, at which routing priority (``"urgent"``).
    job_id : int, optional
        The pipeline job.
    result : mapping
        ``PipelineResult.summary()``: probabilities, decisions, measurements, algorithm.
    flagged_sop_instance_uids : sequence of str
        The source images of ``result["flagged_slices"]``, in that order.
    result_files : sequence of Path
        The result objects written (their UIDs are read from them).
    series_instance_uid : str
        The series the pipeline read.

    Returns
    -------
    payload : dict
        No patient name, ID or birth date.
    patient : dict
        ``name``, ``id``, ``birth_date`` from the result objects, for a webhook with
        ``include_patient``.
    """
    indices = [int(i) for i in result.get("flagged_slices") or []]
    uid_of = dict(zip(indices, flagged_sop_instance_uids, strict=False))
    measurements = result.get("measurements") or {}
    thresholds = measurements.get("thresholds") or {}
    per_finding = measurements.get("slices") or {}
    decisions = result.get("decisions") or {}
    findings = [{
        "finding": name,
        "probability": probability,
        "positive": bool(decisions.get(name, False)),
        "threshold": thresholds.get(name),
        "flagged_sop_instance_uids": [uid_of[i] for i in per_finding.get(name, ())
                                      if i in uid_of],
    } for name, probability in (result.get("probabilities") or {}).items()]
    objects, patient = _read_objects(result_files)
    by_kind = {o["object"]: o["sop_instance_uid"] for o in reversed(objects)}
    algorithm = result.get("algorithm") or {}
    base = settings.notify.dashboard_url.rstrip("/")
    payload: dict[str, Any] = {
        "event": EVENT,
        "pipeline": pipeline,
        "priority": priority,
        "conclusion": measurements.get("conclusion") or result.get("reason", ""),
        "study_instance_uid": study_uid,
        "study_version": study_version,
        "series_instance_uid": series_instance_uid,
        "accession_number": accession_number,
        "calling_aet": calling_aet,
        "findings": findings,
        "flagged_sop_instance_uids": list(flagged_sop_instance_uids),
        "sr_sop_instance_uid": by_kind.get("sr"),
        "kos_sop_instance_uid": by_kind.get("kos"),
        "results": objects,
        "algorithm": {k: algorithm[k] for k in ("name", "version") if k in algorithm},
        "job": job_id,
        "link": f"{base}/studies/{quote(study_uid, safe='')}",
        "detected_at": utcnow().isoformat(),
    }
    return payload, patient


def notifications_for(settings: Settings, *, study_uid: str, study_version: int,
                      accession_number: str, calling_aet: str, pipeline: str | None,
                      priority: str, urgent: bool, job_id: int | None,
                      summary: Mapping[str, Any], result_files: Sequence[Path],
                      series_instance_uid: str = "") -> list[Notification]:
    """The notification rows one finished pipeline job calls for (none when negative).

    Parameters
    ----------
    settings : Settings
        The webhooks and the dashboard URL.
    study_uid, study_version, accession_number, calling_aet : str, int, str, str
        The study.
    pipeline : str or None
        The pipeline that ran (None: a routing job, never notified).
    priority : str
        The routing rule's priority, by name.
    urgent : bool
        The job ran at urgent priority.
    job_id : int, optional
        The job.
    summary : mapping
        The run's summary: ``result`` (``PipelineResult.summary()``) and
        ``flagged_sop_instance_uids``.
    result_files : sequence of Path
        The result objects written.
    series_instance_uid : str
        The series the pipeline read.

    Returns
    -------
    list of Notification
        Pending rows, to be added in the transaction that records the job's result.
    """
    result = summary.get("result") or {}
    if pipeline is None or not result.get("ok") or not result.get("urgent"):
        return []
    webhooks = [w for w in settings.notify.webhooks if wanted_by(w, pipeline, urgent)]
    if not webhooks:
        return []
    payload, patient = build_payload(
        settings, study_uid=study_uid, study_version=study_version,
        accession_number=accession_number, calling_aet=calling_aet, pipeline=pipeline,
        priority=priority, job_id=job_id, result=result,
        flagged_sop_instance_uids=summary.get("flagged_sop_instance_uids") or [],
        result_files=result_files, series_instance_uid=series_instance_uid)
    rows = []
    for webhook in webhooks:
        body = {**payload, "patient": patient} if webhook.include_patient else payload
        rows.append(Notification(
            job_pk=job_id, study_uid=study_uid, channel="webhook", target=webhook.url,
            payload=body, state=DeliveryState.PENDING.value, attempts=0,
            next_attempt_at=utcnow()))
    return rows


class Notifier(RetryingSender[Notification]):
    """Send pending notifications, with retries and back-off, on threads of its own.

    Parameters
    ----------
    db : Database
        Where notifications are kept.
    settings : Settings
        ``notify`` (webhooks, retries, timeout, senders).
    poster : callable, optional
        Replaces :func:`post_json` (same arguments).
    """

    model = Notification
    name = "notify"
    event = "notification"

    def __init__(self, db: Database, settings: Settings, poster: Poster | None = None) -> None:
        super().__init__(db)
        self.settings = settings
        self.poster = poster or post_json

    def enqueue(self, webhook: Webhook, payload: Mapping[str, Any], *, study_uid: str = "",
                job_pk: int | None = None) -> int:
        """Queue ``payload`` for ``webhook`` in a transaction of its own; returns its id.

        The job runner adds rows from :func:`notifications_for` in its own transaction
        instead; this is for callers that have none.
        """
        with self.db.transaction() as session:
            row = Notification(job_pk=job_pk, study_uid=study_uid, channel="webhook",
                               target=webhook.url, payload=dict(payload),
                               state=DeliveryState.PENDING.value, attempts=0,
                               next_attempt_at=utcnow())
            session.add(row)
            session.flush()
            record_queued(session, [row])
            row_id = row.id
        self.wake()
        return row_id

    @property
    def policy(self) -> RetryPolicy:
        """Attempts, back-off and requests in flight from ``notify``."""
        cfg = self.settings.notify
        return RetryPolicy(cfg.max_attempts, cfg.backoff_initial_s, cfg.backoff_max_s,
                           cfg.poll_interval_s, senders=cfg.senders,
                           stop_timeout_s=cfg.timeout_s + 30)

    def send(self, row: Notification) -> tuple[str | None, bool]:
        """POST the payload to its webhook (headers from the configuration)."""
        webhook = next((w for w in self.settings.notify.webhooks if w.url == row.target), None)
        if webhook is None:
            # its headers (a token) come from the configuration, which no longer has it
            return "webhook no longer configured", True
        from dicomnode import __version__

        headers = {"Content-Type": "application/json",
                   "User-Agent": f"dicomnode/{__version__}",
                   "X-Dicomnode-Notification": str(row.id),  # the same on a retry
                   **webhook.headers}
        body = json.dumps(row.payload).encode("utf-8")
        try:
            self.poster(row.target, body, headers, self.settings.notify.timeout_s)
        except NotifyError as exc:
            return str(exc), False
        return None, False

    def audit(self, row: Notification, error: str | None) -> dict[str, Any]:
        """The notification, its target (without credentials), attempts and error."""
        return {"detail": {"notification": row.id, "target": shown_target(row.target),
                           "attempts": row.attempts, "error": error}}

    def log_fields(self, row: Notification) -> dict[str, Any]:
        """The notification id, the study UID and the target (without credentials)."""
        return {"notification": row.id, "study": row.study_uid,
                "target": shown_target(row.target)}


def record_queued(session: Any, rows: Sequence[Notification]) -> None:
    """Add the audit events and log lines of newly queued notifications (ids assigned)."""
    for row in rows:
        session.add(AuditEvent(event="notification.queued", study_uid=row.study_uid, detail={
            "notification": row.id, "target": shown_target(row.target),
            "job": row.job_pk}))
        log.info("notify.queued", extra=fields(notification=row.id, study=row.study_uid,
                                               target=shown_target(row.target)))
