"""The durable spool: atomic writes, safe names, duplicates, reserve."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.store.spool import Spool, SpoolFullError, uid_to_name


def test_uid_names_cannot_escape(tmp_path: Path) -> None:
    assert uid_to_name("1.2.840.10008") == "1.2.840.10008"
    for evil in ("../../etc/passwd", "1..2", "", "1.2/3", "abc"):
        name = uid_to_name(evil)
        assert "/" not in name and ".." not in name and name.startswith("x")


def test_write_is_atomic_and_keeps_first_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.write("1.2", "1.2.3", "1.2.3.4", [b"abc", b"def"])
    assert first.created and first.path.read_bytes() == b"abcdef" and first.size == 6
    again = spool.write("1.2", "1.2.3", "1.2.3.4", [b"other"])
    assert not again.created and again.path.read_bytes() == b"abcdef"
    assert not list(spool.tmp_dir.iterdir())


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    def chunks():
        yield b"partial"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        spool.write("1.2", "1.2.3", "1.2.3.5", chunks())
    assert not list(spool.tmp_dir.iterdir())
    assert not list(spool.instances_dir.rglob("*.dcm"))


def test_reserve(tmp_path: Path) -> None:
    Spool(tmp_path, reserve_bytes=0).check_reserve(10)
    with pytest.raises(SpoolFullError, match="below the reserve"):
        Spool(tmp_path, reserve_bytes=2**60).check_reserve(10)
