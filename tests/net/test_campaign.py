"""The fuzz and fault campaign (benchmarks/campaign.py), a bounded run kept in CI.

The full campaign (2,000 cases, 20 kills during ingest, processing and export) is a
benchmark; this runs its code on a few hundred cases and kills during ingest, so that
the campaign keeps working and a regression in the listener's defences shows here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import campaign


@pytest.mark.slow
def test_a_short_fuzz_and_kill_campaign_finds_the_node_up_and_nothing_lost(
        tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    status = campaign.main(["--fuzz-cases", "150", "--batch", "50", "--kills", "2",
                            "--no-processing", "--seed", "7", "--json", str(summary)])
    result = json.loads(summary.read_text())
    assert status == 0, result["failures"]
    assert result["cases"] == 150
    assert result["node_up_after_batch"] == result["batches"] == 3
    assert result["lost"] == 0
    assert result["leftover_temp_files"] == 0
    assert result["kills"] == {"ingest": 2}
