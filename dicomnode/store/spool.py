"""The durable spool: one file per received instance, written atomically.

Each instance is written to ``tmp/<random>.part``, flushed to disk (``fdatasync``),
then renamed to ``instances/<study>/<series>/<sop>.dcm``; only then is it indexed and
acknowledged. A crash leaves either no file or a whole file under ``instances/``,
never a partial one.

The rename itself is not fsynced (that would cost a second journal commit for every
instance). If a power loss takes a rename back, the whole, already flushed file is
still in ``tmp/``: ``recover`` checks every left-over ``.part`` file, puts the complete
ones in place (they are indexed again by ``InstanceStore.recover``) and removes the
partial ones. So an acknowledged instance survives a power loss too.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
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


def _sync(path: Path, sync: Callable[[int], None] = os.fsync) -> None:
    """Open ``path`` (a file or a directory) read-only and ``sync`` it to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        sync(fd)
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

    def place(self, tmp: Path, study_uid: str, series_uid: str, sop_uid: str) -> SpooledFile:
        """Rename a flushed temporary file into place.

        An instance already in place is kept and ``tmp`` is removed. The rename is
        not fsynced: see the module docstring for why nothing is lost.

        Parameters
        ----------
        tmp : Path
            From ``write_temp``.
        study_uid, series_uid, sop_uid : str
            Decide the final path.

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
            try:
                os.replace(tmp, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Received on another file system: copy, flush, then rename as usual.
                with tmp.open("rb") as src:
                    copy = self.write_temp(iter(lambda: src.read(1 << 20), b""))
                tmp.unlink(missing_ok=True)
                os.replace(copy, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return SpooledFile(final, relative, size, created=True)

    @staticmethod
    def flush(path: Path) -> None:
        """Flush a file's data and size to disk (``fdatasync``)."""
        _sync(path, os.fdatasync)

    @staticmethod
    def discard(tmp: Path) -> None:
        """Remove a temporary file that will not be placed."""
        tmp.unlink(missing_ok=True)

    def remove(self, relative: str) -> None:
        """Delete one stored instance (used to undo a write whose indexing failed)."""
        (self.root / relative).unlink(missing_ok=True)

    def recover(self, identify: Callable[[bytes], tuple[str, str, str] | None]) -> tuple[int, int]:
        """Deal with temporary files left by a crash or a power loss.

        Parameters
        ----------
        identify : callable
            Returns ``(study_uid, series_uid, sop_uid)`` for the bytes of a complete,
            valid instance, or None for a partial or invalid one.

        Returns
        -------
        tuple of int
            ``(removed, placed)``: partial files removed, complete ones put in place.
        """
        removed = placed = 0
        # ``*.part``: our own temporary files; ``*.dcm``: pynetdicom's chunked receive.
        for path in [*self.tmp_dir.glob("*.part"), *self.tmp_dir.glob("*.dcm")]:
            try:
                uids = identify(path.read_bytes())
            except OSError:
                uids = None
            if uids is None:
                path.unlink(missing_ok=True)
                removed += 1
            else:
                self.place(path, *uids)
                placed += 1
        for directory in {self.tmp_dir, self.instances_dir}:
            _sync(directory)
        if removed or placed:
            log.warning("spool.recovered", extra=fields(partial_files_removed=removed,
                                                        whole_files_placed=placed))
        return removed, placed

    def iter_instances(self) -> Iterator[str]:
        """Every stored instance, as a path relative to the spool root."""
        for path in self.instances_dir.rglob("*.dcm"):
            yield path.relative_to(self.root).as_posix()
