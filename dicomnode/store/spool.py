"""The durable spool: one file per received instance, written atomically.

Each instance is written to ``tmp/<random>.part``, fsynced, renamed to
``instances/<study>/<series>/<sop>.dcm`` and the directory fsynced; only then is it
indexed and acknowledged. A crash leaves either no file or a whole file, never a
partial one under ``instances/``; ``recover`` removes left-over ``.part`` files.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dicomnode.logs import fields

log = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"^[0-9][0-9.]{0,63}$")


class SpoolFullError(OSError):
    """The spool's file system has less free space than the configured reserve."""


def uid_to_name(uid: str) -> str:
    """A file-system-safe name for a UID.

    Conformant UIDs (digits and dots) are used as they are; anything else (found in
    the wild from old modalities) is replaced by a stable hash so that no sender can
    write outside the spool.

    Parameters
    ----------
    uid : str
        A DICOM UID as received.

    Returns
    -------
    str
    """
    if _SAFE_UID.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SpooledFile:
    """Where an instance lies and whether this call created it."""

    path: Path
    relative: str
    size: int
    created: bool


class Spool:
    """Atomic, durable storage of received instances.

    Parameters
    ----------
    root : Path
        The spool directory (created if missing).
    reserve_bytes : int
        Writes are refused with ``SpoolFullError`` below this much free space.
    """

    def __init__(self, root: Path, reserve_bytes: int = 0) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.instances_dir = self.root / "instances"
        self.reserve_bytes = reserve_bytes
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.instances_dir.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """The path of an instance relative to the spool root."""
        return "/".join(
            ("instances", uid_to_name(study_uid), uid_to_name(series_uid),
             uid_to_name(sop_uid) + ".dcm")
        )

    def free_bytes(self) -> int:
        """Free bytes on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def check_reserve(self, incoming: int = 0) -> None:
        """Raise ``SpoolFullError`` if storing ``incoming`` bytes would cross the reserve."""
        free = self.free_bytes()
        if free - incoming < self.reserve_bytes:
            raise SpoolFullError(
                errno.ENOSPC,
                f"free space {free // 2**20} MiB is below the reserve "
                f"{self.reserve_bytes // 2**20} MiB",
            )

    def write(
        self, study_uid: str, series_uid: str, sop_uid: str, chunks: Iterable[bytes | memoryview]
    ) -> SpooledFile:
        """Durably store one instance; an existing instance is kept, not rewritten.

        Parameters
        ----------
        study_uid, series_uid, sop_uid : str
            The instance's UIDs (decide the path).
        chunks : iterable of bytes
            The encoded file (preamble, file meta, dataset).

        Returns
        -------
        SpooledFile
        """
        return self.place(self.write_temp(chunks), study_uid, series_uid, sop_uid)

    def write_temp(self, chunks: Iterable[bytes | memoryview]) -> Path:
        """Write ``chunks`` to a new temporary file and flush it to disk.

        The first half of ``write``, split out so that the caller can check the
        dataset while the disk works; ``place`` or ``discard`` must follow.

        Returns
        -------
        Path
            The temporary file.
        """
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                os.fdatasync(fd)  # data and size; the rename is made durable in ``place``
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def place(self, tmp: Path, study_uid: str, series_uid: str, sop_uid: str,
              *, sync: bool = True) -> SpooledFile:
        """Rename a flushed temporary file into place and make the rename durable.

        An instance already in place is kept and ``tmp`` is removed.

        Parameters
        ----------
        tmp : Path
            From ``write_temp``.
        study_uid, series_uid, sop_uid : str
            Decide the final path.
        sync : bool
            Fsync the directory here. With False the caller must call
            ``sync_parent`` before it relies on the rename (e.g. before committing
            the index row), which lets it overlap that wait with other work.

        Returns
        -------
        SpooledFile
        """
        relative = self.relative_path(study_uid, series_uid, sop_uid)
        final = self.root / relative
        try:
            if final.exists():
                tmp.unlink(missing_ok=True)
                return SpooledFile(final, relative, final.stat().st_size, created=False)
            size = tmp.stat().st_size
            parent = final.parent
            if not parent.is_dir():
                parent.mkdir(parents=True, exist_ok=True)
                _fsync_dir(parent.parent)
                _fsync_dir(parent.parent.parent)
            os.replace(tmp, final)
            if sync:
                _fsync_dir(parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return SpooledFile(final, relative, size, created=True)

    @staticmethod
    def sync_parent(spooled: SpooledFile) -> None:
        """Make the rename of a placed instance durable (fsync its directory)."""
        if spooled.created:
            _fsync_dir(spooled.path.parent)

    @staticmethod
    def discard(tmp: Path) -> None:
        """Remove a temporary file that will not be placed."""
        tmp.unlink(missing_ok=True)

    def remove(self, relative: str) -> None:
        """Delete one stored instance (used to undo a write whose indexing failed)."""
        (self.root / relative).unlink(missing_ok=True)

    def recover(self) -> int:
        """Remove half-written temporary files left by a crash.

        Returns
        -------
        int
            How many were removed.
        """
        removed = 0
        for path in self.tmp_dir.glob("*.part"):
            path.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning("spool.recovered", extra=fields(partial_files_removed=removed))
        return removed

    def iter_instances(self) -> Iterator[str]:
        """Every stored instance, as a path relative to the spool root."""
        for path in self.instances_dir.rglob("*.dcm"):
            yield path.relative_to(self.root).as_posix()
