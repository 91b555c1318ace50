"""Tests of dicomnode.nn.weights: the manifest and checksum-checked loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dicomnode.nn import weights


def _entry(tmp_path: Path, name: str = "demo") -> dict:
    path = tmp_path / f"{name}.pt"
    torch.save({"w": torch.arange(4)}, path)
    return {"name": name, "version": "0.1", "file": path.name,
            "sha256": weights.sha256_of(path), "input": {"spacing": [1, 1, 1]},
            "training_data": "unit test", "metrics": {}}


def test_write_and_load(tmp_path: Path) -> None:
    weights.write_entry(_entry(tmp_path), tmp_path)
    checkpoint, entry = weights.load_weights("demo", tmp_path)
    assert checkpoint["w"].tolist() == [0, 1, 2, 3]
    assert entry.version == "0.1"
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["name"] for e in doc["models"]] == ["demo"]


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    weights.write_entry(_entry(tmp_path), tmp_path)
    with (tmp_path / "demo.pt").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(weights.WeightsError, match=r"demo\.pt.*fails its checksum"):
        weights.load_weights("demo", tmp_path)


def test_missing_file_and_entry(tmp_path: Path) -> None:
    weights.write_entry(_entry(tmp_path), tmp_path)
    (tmp_path / "demo.pt").unlink()
    with pytest.raises(weights.WeightsError, match="missing"):
        weights.verify("demo", tmp_path)
    with pytest.raises(weights.WeightsError, match="no weights for 'other'"):
        weights.verify("other", tmp_path)


def test_entry_requires_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        weights.write_entry({"name": "x", "version": "1", "file": "x.pt", "input": {},
                             "training_data": "", "metrics": {}}, tmp_path)


def test_shipped_manifest_matches_its_files() -> None:
    entries = weights.read_manifest()
    assert entries, "models/manifest.json lists no model"
    for entry in entries:
        found = weights.verify(entry["name"])
        assert found.path.stat().st_size < 20 * 2**20
        assert entry["metrics"], f"{entry['name']} has no metrics"
