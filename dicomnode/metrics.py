"""Counters and histograms of one node, in its own Prometheus registry.

Each :class:`NodeMetrics` owns a ``CollectorRegistry``: several nodes in one process
(the tests run many) never register a metric twice, and ``/metrics`` shows one node's
figures. The stages of the flow count where things happen (``net/scp`` receipts and
refusals, ``workflow/completion`` completions, ``workflow/jobs`` latencies,
``workflow/export`` failures); what the database already holds (queue depth,
notification failures) is read at scrape time by ``dicomnode/web/metrics.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Job stage latency buckets in seconds: a routing pass (~1 s) to a long CPU inference.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)


class NodeMetrics:
    """The metrics one node's stages update.

    Attributes
    ----------
    registry : prometheus_client.CollectorRegistry
        This node's registry (what ``/metrics`` exposes).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances_received = Counter(
            "dicomnode_instances_received", "Instances stored and acknowledged (duplicates "
            "included).", ["duplicate"], registry=self.registry)
        self.instances_refused = Counter(
            "dicomnode_instances_refused", "C-STORE requests refused, by reason.", ["reason"],
            registry=self.registry)
        self.studies_completed = Counter(
            "dicomnode_studies_completed", "Study versions completed, by completion trigger.",
            ["trigger"], registry=self.registry)
        self.jobs_finished = Counter(
            "dicomnode_jobs_finished", "Jobs finished, by pipeline and state.",
            ["pipeline", "state"], registry=self.registry)
        self.job_stage_seconds = Histogram(
            "dicomnode_job_stage_seconds", "Seconds per job stage, by pipeline and stage.",
            ["pipeline", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram(
            "dicomnode_job_seconds", "Seconds from a job's start to its end, by pipeline.",
            ["pipeline"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.delivery_attempts = Counter(
            "dicomnode_delivery_attempts", "Delivery attempts, by outcome (done, retry, "
            "failed).", ["outcome"], registry=self.registry)
        self.delivery_failures = Counter(
            "dicomnode_delivery_failures", "Delivery attempts that failed (retried or given "
            "up).", registry=self.registry)
        self.tls_handshake_failures = Counter(
            "dicomnode_tls_handshake_failures", "Connections to the TLS port whose handshake "
            "failed (all of them; the log and audit trail are rate-limited per address).",
            registry=self.registry)
        self.tls_certificate_expiry = Gauge(
            "dicomnode_tls_certificate_expiry_timestamp_seconds", "When the listener's TLS "
            "certificate expires (Unix time): alert on it minus time().",
            registry=self.registry)

    def job_finished(self, pipeline: str | None, state: str, timings: Mapping[str, float],
                     seconds: float | None) -> None:
        """Record one finished job: its state, each stage's seconds and its total.

        Parameters
        ----------
        pipeline : str or None
            None for a routing job (recorded as ``routing``).
        state : str
            The job's final state.
        timings : mapping
            Seconds per stage (``Job.timings``); non-numbers are skipped.
        seconds : float or None
            Wall time of the whole job, when known.
        """
        name = pipeline or "routing"
        self.jobs_finished.labels(name, state).inc()
        for stage, value in timings.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.job_stage_seconds.labels(name, stage).observe(float(value))
        if seconds is not None:
            self.job_seconds.labels(name).observe(seconds)
