"""What the REST API answers: pydantic models, also the pages' view models.

No field holds a patient-identifying value except :class:`PatientOut`, which the study
views carry only for a signed-in user.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class RoutingOut(BaseModel):
    """A study's routing decision, in short."""

    routed: bool | None = Field(default=None, description="None while not yet routed.")
    reason: str | None = None
    region: str | None = Field(default=None, description="The body region routing used.")
    region_source: str | None = None
    rule: str | None = None
    reasons: list[str] = Field(default_factory=list)
    series_instance_uid: str | None = None
    series_why: str | None = None
    pipelines: list[str] = Field(default_factory=list)


class ResultFileOut(BaseModel):
    """One result object a job wrote."""

    name: str
    kind: str = Field(description="seg, rtstruct, sr, kos, or another file name stem.")
    size: int | None = Field(default=None, description="Bytes; None when the file is gone.")
    url: str


class JobOut(BaseModel):
    """One job: routing (pipeline None) or one pipeline on one study version."""

    id: int
    study_uid: str
    version: int
    pipeline: str | None
    state: str
    priority: int
    priority_name: str
    attempts: int
    reason: str | None
    worker: str | None
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: float | None = Field(default=None, description=(
        "Running jobs: elapsed time over the median run time of this pipeline's finished "
        "jobs (capped at 0.99); None when there is nothing to compare with."))
    files: list[ResultFileOut] = Field(default_factory=list)


class DeliveryOut(BaseModel):
    """One outbox entry."""

    id: int
    job: int | None
    study_uid: str
    destination: str
    files: int
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    sent_at: datetime | None


class NotificationOut(BaseModel):
    """One notification (a webhook call): where it goes is shown as scheme and host only."""

    id: int
    job: int | None
    study_uid: str
    channel: str
    target: str
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


class PatientOut(BaseModel):
    """Patient values of a study, read from one of its files; for signed-in users only."""

    name: str
    id: str


class SeriesOut(BaseModel):
    """One series of a study."""

    series_uid: str
    modality: str
    series_number: int | None
    description: str
    instances: int


class StudyOut(BaseModel):
    """A study with where it stands: the row of the studies list."""

    study_uid: str
    accession_number: str
    study_date: str
    calling_aet: str
    state: str
    status: str = Field(description=(
        "One word for the list: receiving, routing, queued, running, done, no_result, "
        "failed, not_routed or cancelled."))
    version: int
    completion_trigger: str | None
    instances: int
    series_count: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    pipelines: list[str] = Field(default_factory=list)
    routing: RoutingOut
    jobs: list[JobOut] = Field(default_factory=list)
    deliveries: list[DeliveryOut] = Field(default_factory=list)
    notifications: list[NotificationOut] = Field(default_factory=list)


class MeasurementOut(BaseModel):
    """One row of a result's measurement table."""

    name: str
    value: str
    unit: str = ""


class ResultOut(BaseModel):
    """One pipeline job's results, for the study page."""

    job: int
    pipeline: str
    state: str
    reason: str | None
    preview_url: str | None
    measurements: list[MeasurementOut] = Field(default_factory=list)
    files: list[ResultFileOut] = Field(default_factory=list)


class AuditOut(BaseModel):
    """One audit event: who, when, what."""

    ts: datetime
    event: str
    user: str | None
    detail: dict[str, Any] | None


class StudyDetailOut(StudyOut):
    """Everything the study page shows."""

    series: list[SeriesOut] = Field(default_factory=list)
    routing_decision: dict[str, Any] | None = Field(default=None, description=(
        "The routing job's full decision (rules matched and not, regions, series)."))
    results: list[ResultOut] = Field(default_factory=list)
    audit: list[AuditOut] = Field(default_factory=list)
    patient: PatientOut | None = None


class StudyPage(BaseModel):
    """One page of the studies list."""

    total: int
    offset: int
    limit: int
    studies: list[StudyOut]


class PipelineOut(BaseModel):
    """One installed pipeline and whether it can run."""

    name: str
    available: bool | None = Field(description="None until the node has checked.")
    reason: str | None


class QueueOut(BaseModel):
    """Jobs waiting and running at one priority."""

    priority: int
    name: str
    queued: int
    running: int


class GpuOut(BaseModel):
    """One CUDA device."""

    index: int
    name: str
    memory_total_bytes: int
    memory_allocated_bytes: int
    memory_reserved_bytes: int


class HealthOut(BaseModel):
    """What the health page shows."""

    ae_title: str
    listener_up: bool
    port: int | None
    tls_port: int | None
    associations_open: int | None = Field(description="None when no node runs here.")
    queue: list[QueueOut]
    disk_free_bytes: int
    disk_reserve_bytes: int
    disk_ok: bool
    pipelines: list[PipelineOut]
    pipelines_checked_at: datetime | None
    gpus: list[GpuOut]
    totals: dict[str, int]


class ActionOut(BaseModel):
    """What an action did."""

    action: str
    study_uid: str | None = None
    jobs: list[int] = Field(default_factory=list, description="Jobs queued or cancelled.")
    deliveries: list[int] = Field(default_factory=list, description="Deliveries queued.")
    detail: str = ""


class RerunIn(BaseModel):
    """Re-run a study's pipelines (all of its latest version's, or one)."""

    pipeline: str | None = Field(default=None, max_length=64, description=(
        "Only this pipeline; default every pipeline that ran on the latest version, or "
        "routing when none did."))


class RerouteIn(BaseModel):
    """Run another pipeline on the series routing chose."""

    pipeline: str = Field(min_length=1, max_length=64)


class ResendIn(BaseModel):
    """Send a job's results again, to a configured peer or destination."""

    peer: str = Field(min_length=1, max_length=64, description=(
        "A key of `peers` or of `destinations` in the config."))
    job: int | None = Field(default=None, ge=1, le=2**31 - 1, description=(
        "The job whose results go; default the study's latest job with results."))
