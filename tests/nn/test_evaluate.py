"""Tests of dicomnode.nn.evaluate through ``dicomnode evaluate``: reports, refusals, seen seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.nn import weights
from dicomnode.nn.evaluate import seen_seeds
from tests.nn.synthetic import tiny_case, write_lits


def test_evaluate_command_scores_a_lits_folder_with_the_shipped_weights(tmp_path: Path) -> None:
    data = tmp_path / "lits"
    data.mkdir()
    for number in (0, 1):
        write_lits(tiny_case(number), data, number)
    result = CliRunner().invoke(app, ["evaluate", "liver_tumor", "--data", str(data),
                                      "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    entry = weights.verify("liver_tumor")
    assert report["model"] == {"name": "liver_tumor", "version": entry.version,
                               "sha256": entry.sha256}
    assert [row["case"] for row in report["cases"]] == ["lits-0", "lits-1"]
    assert report["summary"]["cases"] == 2
    for key in ("liver_dice_mean", "tumour_dice_mean", "tumour_dice_global",
                "detection_recall"):
        assert key in report["summary"]
    table = CliRunner().invoke(app, ["evaluate", "liver_tumor", "--data", str(data),
                                     "--device", "cpu"])
    assert table.exit_code == 0, table.output
    assert "lits-1" in table.output and "tumour Dice per case" in table.output


def test_evaluate_command_refuses_bad_requests(tmp_path: Path) -> None:
    runner = CliRunner()
    nothing = runner.invoke(app, ["evaluate", "liver_tumor"])
    assert nothing.exit_code == 2 and "Nothing to evaluate" in nothing.output
    unknown = runner.invoke(app, ["evaluate", "brain_xyz", "--phantom-seeds", "0"])
    assert unknown.exit_code == 2 and "'model'" in unknown.output
    empty = runner.invoke(app, ["evaluate", "liver_tumor", "--data", str(tmp_path)])
    assert empty.exit_code == 2 and "no phantom folders" in empty.output
    missing = runner.invoke(app, ["evaluate", "liver_tumor", "--phantom-seeds", "0",
                                  "--models", str(tmp_path / "none")])
    assert missing.exit_code == 2 and "liver_tumor" in missing.output


def test_seeds_the_shipped_weights_have_seen_are_named() -> None:
    entry = weights.verify("liver_tumor")
    # 0-19 held out, 1000-1383 training, 2000-2019 validation (model card)
    assert seen_seeds(entry, [5, 1000, 1383, 2000, 2019, 3000]) == {
        "training": [1000, 1383], "validation": [2000, 2019]}
    assert seen_seeds(entry, range(20)) == {"training": [], "validation": []}


def test_evaluate_command_warns_about_seen_seeds(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    data = tmp_path / "lits"
    data.mkdir()
    write_lits(tiny_case(0), data, 0)
    import dicomnode.nn.evaluate as evaluation

    # the shipped weights' validation seeds are checked, but phantom 2000 itself would
    # take a minute to make: only the LiTS case is evaluated here
    real_seen = evaluation.seen_seeds
    monkeypatch.setattr(evaluation, "seen_seeds",
                        lambda entry, seeds: real_seen(entry, [2000]))
    result = CliRunner().invoke(app, ["evaluate", "liver_tumor", "--data", str(data),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "phantom seed 2000 was used in validation of liver_tumor" in result.output


def test_perturbations_change_the_image_as_named_and_never_the_truth() -> None:
    from dicomnode.nn.evaluate import PERTURBATIONS, perturb

    case = tiny_case()
    water = case.hu < 80
    for kind in PERTURBATIONS:
        out = perturb(case, kind)
        assert out.name == f"tiny-0:{kind}" and out.labels is case.labels
        assert out.hu.dtype == np.int16 and out.hu.shape == case.hu.shape
    shift = perturb(case, "hu+30").hu.astype(int) - case.hu.astype(int)
    assert (shift[case.hu > -1000] == 30).all()
    noisy = perturb(case, "noise2x", noise_hu=5.0).hu.astype(float) - case.hu
    assert np.std(noisy[water]) == pytest.approx(5.0 * np.sqrt(3), rel=0.1)
    # a softer kernel lowers the noise, a sharper one raises it
    soft, sharp = perturb(case, "soft").hu, perturb(case, "sharp").hu
    from scipy import ndimage

    inside = ndimage.binary_erosion(case.labels == 1, iterations=3)   # away from edges
    assert np.std(soft[inside]) < np.std(case.hu[inside]) < np.std(sharp[inside])
    with pytest.raises(ValueError, match="'perturbation'"):
        perturb(case, "blur")
    refused = CliRunner().invoke(app, ["evaluate", "liver_tumor", "--phantom-seeds", "0",
                                       "--perturb", "blur"])
    assert refused.exit_code == 2 and "perturbation" in refused.output
