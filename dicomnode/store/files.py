"""Where jobs read spooled instances and write result files: one small interface.

The node and every worker see the same data folder: the embedded node its own disk, a
scaled-out site a shared mount (NFS or the like) under the same path on every machine.
Jobs ask this interface for local paths instead of joining ``data_dir`` themselves, so
an object store (fetch an instance to a local cache, upload a job's results when
written) can be added as another implementation without touching the pipelines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from dicomnode.config import Settings


class JobFiles(Protocol):
    """File access of a job: spooled instances in, result files out."""

    def instance_path(self, relative: str) -> Path:
        """A local path to read the spooled instance at ``relative`` (the index's path)."""

    def results_dir(self, job_id: int) -> Path:
        """A local folder for job ``job_id``'s result files (created when needed)."""

    def publish_results(self, files: list[Path]) -> list[Path]:
        """Make written result files readable by the exporter; returns where it reads them."""


class SharedFolder:
    """The data folder itself, local or mounted at the same path on every machine.

    Parameters
    ----------
    spool_dir, results_dir : Path
        ``Settings.spool_dir`` and ``Settings.results_dir``.
    """

    def __init__(self, spool_dir: Path, results_dir: Path) -> None:
        self.spool_dir = spool_dir
        self.results = results_dir

    def instance_path(self, relative: str) -> Path:
        """The spool file itself."""
        return self.spool_dir / relative

    def results_dir(self, job_id: int) -> Path:
        """``results/job-<id>`` (the writers create it)."""
        return self.results / f"job-{job_id}"

    def publish_results(self, files: list[Path]) -> list[Path]:
        """Nothing to do: the exporter reads the same folder."""
        return files


def job_files(settings: Settings) -> JobFiles:
    """The file access the settings give jobs (today always the shared data folder)."""
    return SharedFolder(settings.spool_dir, settings.results_dir)
