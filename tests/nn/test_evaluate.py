"""Tests of dicomnode.nn.evaluate: per-case scores and their summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.nn import weights
from dicomnode.nn.evaluate import dice, score_case, seen_seeds, summarise
from tests.nn.synthetic import tiny_case, write_lits


def test_perfect_prediction_scores_one() -> None:
    case = tiny_case()
    row = score_case(case.labels.copy(), case)
    assert row["liver_dice"] == 1.0
    assert row["tumour_dice_ge_min"] == 1.0
    assert row["detected_ge_min"] == row["true_lesions_ge_min"] == 1
    row["seconds"] = 0.0
    summary = summarise([row])
    assert summary["detection_recall"] == 1.0 and summary["false_positive_lesions_per_case"] == 0


def test_missed_tumour_and_false_positive() -> None:
    case = tiny_case()
    pred = np.where(case.labels == 2, 1, case.labels).astype(np.uint8)
    pred[2, 10, 10] = 2  # a false positive far from the true tumour
    row = score_case(pred, case)
    assert row["detected_ge_min"] == 0
    assert row["tumour_dice_ge_min"] == 0.0
    assert row["false_positive_lesions"] == 1


def test_dice_per_case_and_global_weigh_cases_differently() -> None:
    # a perfect case and a case whose tumour is wholly missed: Dice per case is the mean
    # of 1 and 0, Dice global pools the voxels of both
    case = tiny_case()
    perfect = score_case(case.labels.copy(), case)
    missed = score_case(np.where(case.labels == 2, 1, case.labels).astype(np.uint8), case)
    rows = [{**perfect, "seconds": 0.0}, {**missed, "seconds": 0.0}]
    summary = summarise(rows)
    assert summary["tumour_dice_mean"] == 0.5
    # overlap t, predicted t, true 2t: 2t / 3t
    assert summary["tumour_dice_global"] == round(2 / 3, 4)
    assert summary["tumour_dice_min"] == 0.0 and summary["tumour_cases_dice_ge_0_75"] == 0.5


def test_dice_of_empty_masks() -> None:
    empty = np.zeros((2, 2), dtype=bool)
    assert dice(empty, empty) == 1.0


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
