"""The result encoders' warm-up: real objects of a small phantom, nothing left behind."""

from __future__ import annotations

from pathlib import Path

from dicomnode.workflow.emit import warm_up_encoders


def test_warm_up_encodes_a_small_phantom_and_cleans_up(tmp_path: Path) -> None:
    scratch = tmp_path / "results"
    seconds = warm_up_encoders(scratch)
    assert seconds > 0
    assert scratch.is_dir() and list(scratch.iterdir()) == []
