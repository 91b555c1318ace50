"""``/metrics``: the node's counters plus what the database holds, read at scrape time.

The counters and histograms live in the node's own registry (``dicomnode/metrics.py``),
updated where things happen. This collector adds gauges read from the index when
Prometheus scrapes: queue depth per priority, deliveries and notifications per state
(notification failures among them: the notifier keeps its outbox in the database),
open associations, and GPU memory when torch sees a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from dicomnode.store.db import Database
from dicomnode.store.models import Delivery, DeliveryState, Notification
from dicomnode.store.status import node_status
from dicomnode.workflow.jobs import priority_name

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from dicomnode.node import Node


class DatabaseCollector(Collector):
    """Gauges read from the index (and the running node) at each scrape.

    Parameters
    ----------
    db : Database
    node : Node, optional
        For open associations; without it that gauge is left out.
    """

    def __init__(self, db: Database, node: Node | None = None) -> None:
        self.db = db
        self.node = node

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not query the database."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Queue, deliveries, notifications, associations and GPU memory, now."""
        queue = GaugeMetricFamily("dicomnode_queue_depth", "Jobs queued or running, by "
                                  "priority.", labels=["priority", "state"])
        for row in node_status(self.db, limit=0)["queue"]:
            name = priority_name(row["priority"])
            queue.add_metric([name, "queued"], row["queued"])
            queue.add_metric([name, "running"], row["running"])
        yield queue
        with self.db.session() as session:
            deliveries = dict(session.execute(
                select(Delivery.state, func.count(Delivery.id)).group_by(Delivery.state)).all())
            notes = dict(session.execute(
                select(Notification.state, func.count(Notification.id))
                .group_by(Notification.state)).all())
            retried = session.execute(select(func.coalesce(func.sum(case(
                (Notification.attempts > 1, Notification.attempts - 1), else_=0)), 0))
            ).scalar_one()
        gauge = GaugeMetricFamily("dicomnode_deliveries", "Outbox entries, by state.",
                                  labels=["state"])
        for state in DeliveryState:
            gauge.add_metric([state.value], deliveries.get(state.value, 0))
        yield gauge
        gauge = GaugeMetricFamily("dicomnode_notifications", "Notifications (webhook calls), "
                                  "by state.", labels=["state"])
        for state in DeliveryState:
            gauge.add_metric([state.value], notes.get(state.value, 0))
        yield gauge
        failures = CounterMetricFamily(
            "dicomnode_notification_failures", "Notification attempts that failed: given up, "
            "and retried attempts.", labels=["kind"])
        failures.add_metric(["given_up"], notes.get(DeliveryState.FAILED.value, 0))
        failures.add_metric(["retried"], int(retried or 0))
        yield failures
        if self.node is not None:
            yield GaugeMetricFamily("dicomnode_associations_open", "DICOM associations open "
                                    "now.", value=self.node.scp.open_associations)
        yield from _gpu_memory()


def _gpu_memory() -> Iterator[Metric]:
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    gauge = GaugeMetricFamily("dicomnode_gpu_memory_bytes", "GPU memory by device and kind "
                              "(allocated and reserved by this process, total).",
                              labels=["device", "name", "kind"])
    for index in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(index)
        gauge.add_metric([str(index), name, "allocated"], torch.cuda.memory_allocated(index))
        gauge.add_metric([str(index), name, "reserved"], torch.cuda.memory_reserved(index))
        gauge.add_metric([str(index), name, "total"],
                         torch.cuda.get_device_properties(index).total_memory)
    yield gauge
