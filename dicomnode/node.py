"""One running node: the listener, completion, workers and outbox wired together."""

from __future__ import annotations

import logging
import threading

from dicomnode.config import Settings
from dicomnode.logs import fields
from dicomnode.net.scp import StorageSCP
from dicomnode.store.db import Database
from dicomnode.store.instances import InstanceStore, RecoveryReport
from dicomnode.store.spool import Spool
from dicomnode.workflow.completion import CompletionMonitor
from dicomnode.workflow.export import Outbox
from dicomnode.workflow.jobs import JobRunner
from dicomnode.workflow.notify import Notifier

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
        self.spool = Spool(settings.spool_dir, reserve_bytes=settings.disk_reserve_mb * 2**20)
        self.store = InstanceStore(self.db, self.spool, io_threads=settings.max_associations)
        self.outbox = Outbox(self.db, settings)
        self.notifier = Notifier(self.db, settings)
        self.runner = JobRunner(self.db, settings, self.outbox, self.notifier)
        self.completion = CompletionMonitor(self.db, settings.completion,
                                            on_complete=lambda _uid: self.runner.wake())
        self.scp = StorageSCP(settings, self.store, on_released=self._released)
        self.recovery: RecoveryReport | None = None
        self._stopped = threading.Event()

    def _released(self, study_uids: set[str]) -> None:
        self.completion.on_association_released(study_uids)

    def start(self) -> None:
        """Migrate the schema, recover from any crash, start every thread, then listen."""
        self.db.upgrade()
        self.recovery = self.store.recover()
        self.notifier.recover()
        self.completion.start()
        self.runner.start()
        self.outbox.start()
        self.notifier.start()
        self.scp.start()
        log.info("node.started", extra=fields(ae_title=self.settings.ae_title,
                                              port=self.scp.port,
                                              tls_port=self.scp.tls_port,
                                              data_dir=str(self.settings.data_dir)))

    def stop(self) -> None:
        """Stop listening first, then the workers, then close the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.scp.stop()
        self.completion.stop()
        self.runner.stop()
        self.outbox.stop()
        self.notifier.stop()
        self.store.close()
        self.db.dispose()
        log.info("node.stopped")

    def wait(self) -> None:
        """Block until ``stop`` is called."""
        self._stopped.wait()
