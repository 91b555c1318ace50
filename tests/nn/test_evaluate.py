"""Tests of dicomnode.nn.evaluate: per-case scores and their summary."""

from __future__ import annotations

import numpy as np

from dicomnode.nn.evaluate import dice, score_case, summarise
from tests.nn.synthetic import tiny_case


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
