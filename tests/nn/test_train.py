"""Tests of dicomnode.nn.train through ``dicomnode train`` on a tiny LiTS-layout folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.nn import weights
from dicomnode.nn.train import TrainConfig, train_liver_tumor
from tests.nn.synthetic import tiny_case, write_lits


def test_train_command_writes_weights_manifest_and_metrics(tmp_path: Path) -> None:
    data = tmp_path / "lits"
    data.mkdir()
    for number in (0, 1):
        write_lits(tiny_case(number), data, number)
    out = tmp_path / "models"
    result = CliRunner().invoke(app, ["train", "liver_tumor", "--data", str(data),
                                      "--epochs", "1", "--steps-per-epoch", "1",
                                      "--out", str(out), "--version", "0.0.1"])
    assert result.exit_code == 0, result.output
    entry = weights.verify("liver_tumor", out)
    assert entry.version == "0.0.1"
    assert entry.path.name == "liver_tumor-0.0.1.pt"
    assert entry.path.stat().st_size < 20 * 2**20
    assert entry.data["input"]["hu_window"] == [-200.0, 250.0]
    assert "2 cases" in entry.data["training_data"]
    metrics = json.loads((out / "liver_tumor-0.0.1.metrics.json").read_text())
    assert metrics["training"]["case_names"] == ["lits-0", "lits-1"]
    assert len(metrics["training"]["loss_per_epoch"]["liver"]) == 1


def test_train_rejects_bad_requests(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "brain_xyz", "--phantom-seeds", "1"])
    assert result.exit_code == 2 and "'model'" in result.output
    with pytest.raises(ValueError, match="'heldout_seeds'"):
        train_liver_tumor(tmp_path, seeds=[1, 2], heldout_seeds=[2])
    with pytest.raises(ValueError, match="'slab'"):
        TrainConfig(slab=3)
    with pytest.raises(ValueError, match="'epochs'"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="'max_minutes_per_stage'"):
        TrainConfig(max_minutes_per_stage=0)
