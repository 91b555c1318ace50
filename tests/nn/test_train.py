"""Tests of dicomnode.nn.train (the one training loop), through the liver recipe and
``dicomnode train`` on a tiny LiTS-layout folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.nn import weights
from dicomnode.nn.liver_tumor import LiverTumorRecipe
from dicomnode.nn.recipe import make_options
from dicomnode.nn.train import TrainConfig, train
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
        train(LiverTumorRecipe(), tmp_path, seeds=[1, 2], heldout_seeds=[2])
    with pytest.raises(ValueError, match="'epochs'"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="'max_minutes_per_stage'"):
        TrainConfig(max_minutes_per_stage=0)
    with pytest.raises(ValueError, match="'width_liver'"):
        TrainConfig(widths={"liver": 2})
    # a model's own options belong to that model's command only
    other = CliRunner().invoke(app, ["train", "headneck_oar", "--phantom-seeds", "1",
                                     "--tumour-class-weight", "4"])
    assert other.exit_code == 2 and "--tumour-class-weight" in other.output


def _one_case_and_a_first_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A one-case LiTS folder and the models folder of a one-step training on it."""
    data = tmp_path / "lits"
    data.mkdir()
    write_lits(tiny_case(0), data, 0)
    first = tmp_path / "first"
    train(LiverTumorRecipe(), first, data_dir=data,
          config=TrainConfig(epochs=1, steps_per_epoch=1), version="0.0.1")
    return data, first


def test_train_one_stage_from_a_checkpoint_keeps_the_other(tmp_path: Path) -> None:
    import torch

    data, first = _one_case_and_a_first_checkpoint(tmp_path)
    start = torch.load(first / "liver_tumor-0.0.1.pt", weights_only=True)
    second = tmp_path / "second"
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, stages=("tumour",),
                      init_from=first / "liver_tumor-0.0.1.pt")
    train(LiverTumorRecipe(), second, data_dir=data, config=cfg, version="0.0.2")
    after = torch.load(second / "liver_tumor-0.0.2.pt", weights_only=True)
    for key, value in start["liver"].items():
        assert torch.equal(value, after["liver"][key]), key
    changed = [k for k, v in start["tumour"].items()
               if v.is_floating_point() and not torch.equal(v, after["tumour"][k])]
    assert changed
    metrics = json.loads((second / "liver_tumor-0.0.2.metrics.json").read_text())
    assert metrics["training"]["stages_trained"] == ["tumour"]
    assert metrics["training"]["initialised_from"]["version"] == "0.0.1"
    assert metrics["training"]["loss_per_epoch"]["liver"] == []
    assert metrics["training"]["sampling"]["tumour"]["tumours"] >= 0
    # nothing retrained and nothing chosen on validation: the labelling rule is kept
    edited = {**after, "config": {**after["config"], "tumour_threshold": 0.4,
                                  "min_tumour_ml": 0.05}}
    torch.save(edited, second / "edited.pt")
    third = tmp_path / "third"
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, stages=(), init_from=second / "edited.pt")
    entry = train(LiverTumorRecipe(), third, data_dir=data, config=cfg, version="0.0.3")
    kept = torch.load(third / "liver_tumor-0.0.3.pt", weights_only=True)["config"]
    assert (kept["tumour_threshold"], kept["min_tumour_ml"]) == (0.4, 0.05)
    assert entry["input"]["min_tumour_ml"] == 0.05


def test_prepared_cases_are_the_same_from_worker_processes(tmp_path: Path) -> None:
    import torch

    from dicomnode.nn.train import prepared_cases

    data = tmp_path / "lits"
    data.mkdir()
    for number in (0, 1):
        write_lits(tiny_case(number), data, number)
    recipe = LiverTumorRecipe()
    options = make_options(recipe)
    alone = list(prepared_cases(recipe, options, data, [], matrix=64, cache_dir=None,
                                workers=1))
    pooled = list(prepared_cases(recipe, options, data, [], matrix=64, cache_dir=None,
                                 workers=2))
    assert [name for name, _ in pooled] == [name for name, _ in alone] == ["lits-0", "lits-1"]
    for (_, a), (_, b) in zip(alone, pooled, strict=True):
        assert a is not None and b is not None
        for key in ("coarse", "coarse_liver", "fine", "fine_labels"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert all(np.array_equal(x, y) for x, y in zip(a.lesion_voxels, b.lesion_voxels,
                                                         strict=True))
        assert np.array_equal(a.liver_voxels, b.liver_voxels)


def test_train_a_wider_stage_from_a_narrower_checkpoint(tmp_path: Path) -> None:
    import torch

    data, first = _one_case_and_a_first_checkpoint(tmp_path)
    out = tmp_path / "models"
    result = CliRunner().invoke(app, [
        "train", "liver_tumor", "--data", str(data), "--epochs", "1", "--steps-per-epoch", "1",
        "--stages", "tumour", "--init", str(first / "liver_tumor-0.0.1.pt"),
        "--width-tumour", "16", "--batch-size", "2", "--device", "cpu",
        "--tumour-class-weight", "4",
        "--out", str(out), "--version", "0.0.2"])
    assert result.exit_code == 0, result.output
    start = torch.load(first / "liver_tumor-0.0.1.pt", weights_only=True)
    after = torch.load(out / "liver_tumor-0.0.2.pt", weights_only=True)
    assert after["config"]["width_tumour"] == 16 and after["config"]["width_liver"] == 8
    for key, value in start["liver"].items():
        assert torch.equal(value, after["liver"][key]), key
    metrics = json.loads((out / "liver_tumor-0.0.2.metrics.json").read_text())
    assert metrics["training"]["initialised_from"]["stages_from_scratch"] == ["tumour"]
    assert metrics["training"]["config"]["batch_size"] == 2
    assert metrics["training"]["options"]["tumour_class_weight"] == 4.0
    assert metrics["training"]["device"] == "cpu"
    # the wider checkpoint loads and segments through the shipped loader
    entry = weights.verify("liver_tumor", out)
    assert entry.version == "0.0.2"


def test_train_refuses_bad_stage_and_init_requests(tmp_path: Path) -> None:
    recipe = LiverTumorRecipe()
    with pytest.raises(ValueError, match="'stages'"):
        TrainConfig(stages=("spleen",)).check(recipe)
    with pytest.raises(ValueError, match="'stages'"):
        TrainConfig(stages=("tumour",)).check(recipe)   # the liver weights from nowhere
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    data = tmp_path / "lits"
    data.mkdir()
    write_lits(tiny_case(0), data, 0)
    with pytest.raises(ValueError, match="'init_from'"):
        train(recipe, tmp_path / "m", data_dir=data,
              config=TrainConfig(epochs=1, steps_per_epoch=1,
                                 init_from=tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=r"'init_from'.*not a liver_tumor checkpoint"):
        train(recipe, tmp_path / "m", data_dir=data,
              config=TrainConfig(epochs=1, steps_per_epoch=1, init_from=bogus))


