"""Tests of dicomnode.nn.train through ``dicomnode train`` on a tiny LiTS-layout folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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
    with pytest.raises(ValueError, match="'tumour_class_weight'"):
        TrainConfig(tumour_class_weight=0)


def _one_case_and_a_first_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A one-case LiTS folder and the models folder of a one-step training on it."""
    data = tmp_path / "lits"
    data.mkdir()
    write_lits(tiny_case(0), data, 0)
    first = tmp_path / "first"
    train_liver_tumor(first, data_dir=data, config=TrainConfig(epochs=1, steps_per_epoch=1),
                      version="0.0.1")
    return data, first


def test_train_one_stage_from_a_checkpoint_keeps_the_other(tmp_path: Path) -> None:
    import torch

    data, first = _one_case_and_a_first_checkpoint(tmp_path)
    start = torch.load(first / "liver_tumor-0.0.1.pt", weights_only=True)
    second = tmp_path / "second"
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, stages=("tumour",),
                      init_from=first / "liver_tumor-0.0.1.pt")
    train_liver_tumor(second, data_dir=data, config=cfg, version="0.0.2")
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
    assert metrics["training"]["tumour_sampling"]["tumours"] >= 0
    # nothing retrained and nothing chosen on validation: the labelling rule is kept
    edited = {**after, "config": {**after["config"], "tumour_threshold": 0.4,
                                  "min_tumour_ml": 0.05}}
    torch.save(edited, second / "edited.pt")
    third = tmp_path / "third"
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, stages=(), init_from=second / "edited.pt")
    entry = train_liver_tumor(third, data_dir=data, config=cfg, version="0.0.3")
    kept = torch.load(third / "liver_tumor-0.0.3.pt", weights_only=True)["config"]
    assert (kept["tumour_threshold"], kept["min_tumour_ml"]) == (0.4, 0.05)
    assert entry["input"]["min_tumour_ml"] == 0.05


def test_prepared_cases_are_the_same_from_worker_processes(tmp_path: Path) -> None:
    import torch

    from dicomnode.nn.train import _prepared_cases

    data = tmp_path / "lits"
    data.mkdir()
    for number in (0, 1):
        write_lits(tiny_case(number), data, number)
    alone = list(_prepared_cases(data, [], matrix=64, cache_dir=None, workers=1))
    pooled = list(_prepared_cases(data, [], matrix=64, cache_dir=None, workers=2))
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
    assert metrics["training"]["config"]["tumour_class_weight"] == 4.0
    assert metrics["training"]["device"] == "cpu"
    # the wider checkpoint loads and segments through the shipped loader
    entry = weights.verify("liver_tumor", out)
    assert entry.version == "0.0.2"


def test_train_refuses_bad_stage_and_init_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'stages'"):
        TrainConfig(stages=("spleen",))
    with pytest.raises(ValueError, match="'stages'"):
        TrainConfig(stages=("tumour",))   # the liver weights would come from nowhere
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    data = tmp_path / "lits"
    data.mkdir()
    write_lits(tiny_case(0), data, 0)
    with pytest.raises(ValueError, match="'init_from'"):
        train_liver_tumor(tmp_path / "m", data_dir=data,
                          config=TrainConfig(epochs=1, steps_per_epoch=1,
                                             init_from=tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match=r"'init_from'.*not a liver_tumor checkpoint"):
        train_liver_tumor(tmp_path / "m", data_dir=data,
                          config=TrainConfig(epochs=1, steps_per_epoch=1, init_from=bogus))


def test_tumour_centres_give_every_tumour_its_own_draw() -> None:
    import numpy as np

    from dicomnode.nn.train import _centres

    labels = np.ones((20, 60, 60), dtype=np.uint8)
    labels[2:18, 5:45, 5:45] = 2          # a large tumour
    labels[8:11, 50:53, 50:53] = 2        # a small one, 27 voxels
    lesions, liver = _centres(labels)
    assert len(lesions) == 2
    sizes = sorted(len(v) for v in lesions)
    assert sizes == [27, 400]
    assert all((labels[tuple(v.T)] == 2).all() for v in lesions)
    assert (labels[tuple(liver.T)] == 1).all()


def test_tumour_sampler_draws_missed_tumours_more_often() -> None:
    import numpy as np
    import torch

    from dicomnode.nn.train import TrainConfig, TumourSampler, _centres, _Prepared

    labels = np.ones((16, 64, 64), dtype=np.uint8)
    labels[6:10, 8:16, 8:16] = 2          # tumour A
    labels[6:10, 44:52, 44:52] = 2        # tumour B
    lesions, liver = _centres(labels)
    fine = torch.zeros(labels.shape, dtype=torch.float16)
    case = _Prepared(fine, torch.zeros((4, 16, 16), dtype=torch.uint8), fine,
                     torch.from_numpy(labels), lesions, liver)
    sampler = TumourSampler([case], floor=0.1)
    cfg = TrainConfig(batch_size=8, tumour_patch=32, tumour_fraction=1.0)
    rng = np.random.default_rng(0)
    assert sampler.summary()["difficulty_mean"] == 1.0
    for _ in range(20):
        image, target = sampler([case], cfg, rng)
        assert image.shape == (8, 1, 8, 32, 32) and target.shape == (8, 8, 32, 32)
        # a network that finds every tumour voxel in patches of A and none in B's
        logits = torch.zeros((8, 3, 8, 32, 32))
        for item, drawn in enumerate(sampler._drawn):
            if lesions[drawn][0][1] < 32:
                logits[item, 2][target[item] == 2] = 5.0
        sampler.feedback(logits, target)
    a, b = (0, 1) if lesions[0][0][1] < 32 else (1, 0)
    assert sampler.difficulty[a] < 0.05 and sampler.difficulty[b] == 1.0
    draws = []
    for _ in range(50):
        sampler([case], cfg, rng)
        draws += sampler._drawn
    assert draws.count(b) > 5 * draws.count(a)
    assert sampler.summary()["mostly_missed"] == 1


def test_tumour_sampler_rejects_bad_settings() -> None:
    from dicomnode.nn.train import TumourSampler

    with pytest.raises(ValueError, match="floor"):
        TumourSampler([], floor=0)
    with pytest.raises(ValueError, match="memory"):
        TumourSampler([], memory=1.0)
    assert TumourSampler([]).summary() == {"tumours": 0}


def test_hu_shift_augmentation_stays_within_its_range() -> None:
    import torch

    from dicomnode.nn.liver25d import normalise_hu
    from dicomnode.nn.train import _augment

    rng = np.random.default_rng(0)
    liver = normalise_hu(torch.full((8, 32, 32), 110.0))
    for hu_shift in (0.0, 18.0, 45.0):
        means = [float(_augment(liver, rng, hu_shift).mean()) for _ in range(200)]
        # back to HU; the contrast jitter (x0.9-1.1 of the normalised value) alone moves
        # 110 HU by up to 8.5 HU
        shifts = [m * 225.0 + 25.0 - 110.0 for m in means]
        assert max(abs(s) for s in shifts) <= hu_shift + 9
        if hu_shift:
            assert max(abs(s) for s in shifts) > 0.8 * hu_shift
    with pytest.raises(ValueError, match="hu_shift"):
        TrainConfig(hu_shift=-1)
    result = CliRunner().invoke(app, ["train", "liver_tumor", "--phantom-seeds", "1",
                                      "--hu-shift", "500"])
    assert result.exit_code == 2 and "hu_shift" in result.output
