"""One running node: the listener, completion, workers and outbox wired together."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from dicomnode.config import Settings
from dicomnode.logs import fields
from dicomnode.metrics import NodeMetrics
from dicomnode.net.scp import StorageSCP
from dicomnode.store.db import Database
from dicomnode.store.instances import InstanceStore, RecoveryReport
from dicomnode.store.spool import Spool
from dicomnode.workflow.completion import CompletionMonitor
from dicomnode.workflow.export import Outbox
from dicomnode.workflow.jobs import JobRunner
from dicomnode.workflow.notify import Notifier

if TYPE_CHECKING:
    from dicomnode.web.server import WebServer

log = logging.getLogger(__name__)


class Node:
    """Everything ``dicomnode serve`` runs, in one process.

    Parameters
    ----------
    settings : Settings
        The node's configuration.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_url)
        self.metrics = NodeMetrics()
        self.spool = Spool(settings.spool_dir, reserve_bytes=settings.disk_reserve_mb * 2**20)
        self.store = InstanceStore(self.db, self.spool, io_threads=settings.max_associations)
        self.outbox = Outbox(self.db, settings, metrics=self.metrics)
        self.notifier = Notifier(self.db, settings)
        self.runner = JobRunner(self.db, settings, self.outbox, self.notifier,
                                metrics=self.metrics)
        #: With ``executor: celery`` jobs run on ``dicomnode worker`` processes: this
        #: publishes them to the broker instead of the runner's threads running them.
        self.dispatcher = None
        if settings.executor == "celery":
            from dicomnode.workflow.distributed import Dispatcher

            self.dispatcher = Dispatcher(self.db, settings)
        self.completion = CompletionMonitor(self.db, settings.completion,
                                            on_complete=lambda _uid: self._wake_jobs(),
                                            metrics=self.metrics)
        self.scp = StorageSCP(settings, self.store, on_released=self._released,
                              metrics=self.metrics)
        #: The dashboard's HTTP server (``settings.web``), once started.
        self.web: WebServer | None = None
        self.recovery: RecoveryReport | None = None
        self._stopped = threading.Event()

    def _wake_jobs(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()
        else:
            self.runner.wake()

    def _released(self, study_uids: set[str]) -> None:
        self.completion.on_association_released(study_uids)

    def start(self) -> None:
        """Migrate the schema, recover from any crash, start every thread, then listen."""
        self.db.upgrade()
        # jobs running on workers are theirs: the broker gives them to another worker if
        # theirs died (see workflow/distributed.py)
        self.recovery = self.store.recover(requeue_jobs=self.dispatcher is None)
        self.notifier.recover()
        self.completion.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        else:
            self.runner.start()
        self.outbox.start()
        self.notifier.start()
        self.scp.start()
        if self.settings.web is not None:
            self._start_web()
        log.info("node.started", extra=fields(ae_title=self.settings.ae_title,
                                              port=self.scp.port,
                                              tls_port=self.scp.tls_port,
                                              data_dir=str(self.settings.data_dir)))

    def _start_web(self) -> None:
        """Serve the dashboard; a missing extra or a taken port is logged, never fatal."""
        try:
            from dicomnode.web.server import WebServer  # fastapi: only when the web is on
        except ImportError as exc:
            log.error("web.unavailable", extra=fields(
                reason=f"{exc}; install the web extra: pip install 'dicomnode[web]'"))
            return
        try:
            web = WebServer(self)
            if web.start():  # a failure to bind is logged there
                self.web = web
        except Exception:  # the DICOM listener keeps serving without its dashboard
            log.exception("web.start_failed")

    def stop(self) -> None:
        """Stop listening first, then the workers, then close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.web is not None:
            self.web.stop()
        self.scp.stop()
        self.completion.stop()
        self.runner.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self.outbox.stop()
        self.notifier.stop()
        self.store.close()
        self.db.dispose()
        log.info("node.stopped")

    def wait(self) -> None:
        """Block until ``stop`` is called."""
        self._stopped.wait()
