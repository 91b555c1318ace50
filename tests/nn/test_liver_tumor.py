"""Tests of dicomnode.nn.liver_tumor: the liver model's data, samplers, options and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.nn import liver25d
from dicomnode.nn.liver25d import Liver25DNet
from dicomnode.nn.liver_tumor import (
    LiverTumorOptions,
    LiverTumorRecipe,
    PreparedLiverCase,
    TumourSampler,
    augment,
    centres,
    choose_tumour_rule,
    dice,
    score_case,
    summarise,
)
from dicomnode.nn.recipe import make_options
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


def test_tumour_centres_give_every_tumour_its_own_draw() -> None:
    labels = np.ones((20, 60, 60), dtype=np.uint8)
    labels[2:18, 5:45, 5:45] = 2          # a large tumour
    labels[8:11, 50:53, 50:53] = 2        # a small one, 27 voxels
    lesions, liver = centres(labels)
    assert len(lesions) == 2
    sizes = sorted(len(v) for v in lesions)
    assert sizes == [27, 400]
    assert all((labels[tuple(v.T)] == 2).all() for v in lesions)
    assert (labels[tuple(liver.T)] == 1).all()


def test_tumour_sampler_draws_missed_tumours_more_often() -> None:
    labels = np.ones((16, 64, 64), dtype=np.uint8)
    labels[6:10, 8:16, 8:16] = 2          # tumour A
    labels[6:10, 44:52, 44:52] = 2        # tumour B
    lesions, liver = centres(labels)
    fine = torch.zeros(labels.shape, dtype=torch.float16)
    case = PreparedLiverCase(fine, torch.zeros((4, 16, 16), dtype=torch.uint8), fine,
                     torch.from_numpy(labels), lesions, liver)
    options = LiverTumorOptions(tumour_patch=32, tumour_fraction=1.0)
    sampler = TumourSampler([case], options, 8, floor=0.1)
    rng = np.random.default_rng(0)
    assert sampler.summary()["difficulty_mean"] == 1.0
    for _ in range(20):
        image, target = sampler(rng)
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
        sampler(rng)
        draws += sampler._drawn
    assert draws.count(b) > 5 * draws.count(a)
    assert sampler.summary()["mostly_missed"] == 1


def test_tumour_sampler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="floor"):
        TumourSampler([], floor=0)
    with pytest.raises(ValueError, match="memory"):
        TumourSampler([], memory=1.0)
    assert TumourSampler([]).summary() == {"tumours": 0}


def test_hu_shift_augmentation_stays_within_its_range() -> None:
    rng = np.random.default_rng(0)
    liver = liver25d.normalise_hu(torch.full((8, 32, 32), 110.0))
    for hu_shift in (0.0, 18.0, 45.0):
        means = [float(augment(liver, rng, hu_shift).mean()) for _ in range(200)]
        # back to HU; the contrast jitter (x0.9-1.1 of the normalised value) alone moves
        # 110 HU by up to 8.5 HU
        shifts = [m * 225.0 + 25.0 - 110.0 for m in means]
        assert max(abs(s) for s in shifts) <= hu_shift + 9
        if hu_shift:
            assert max(abs(s) for s in shifts) > 0.8 * hu_shift
    with pytest.raises(ValueError, match="hu_shift"):
        make_options(LiverTumorRecipe(), {"hu_shift": -1})
    result = CliRunner().invoke(app, ["train", "liver_tumor", "--phantom-seeds", "1",
                                      "--hu-shift", "500"])
    assert result.exit_code == 2 and "hu_shift" in result.output


def test_a_lits_case_reads_back_as_written(tmp_path: Path) -> None:
    case = tiny_case()
    write_lits(case, tmp_path, 7)
    recipe = LiverTumorRecipe()
    found = recipe.discover(tmp_path)
    assert found == [(tmp_path / "volume-7.nii", tmp_path / "segmentation-7.nii")]
    loaded = recipe.load(found[0])
    assert loaded.name == "lits-7"
    assert loaded.spacing == pytest.approx(case.spacing)
    assert np.array_equal(loaded.labels, case.labels)
    assert np.array_equal(loaded.hu, case.hu)


def test_threshold_choice_scores_every_candidate_once_per_case() -> None:
    torch.manual_seed(0)
    seg = liver25d.LiverTumorSegmenter(Liver25DNet(2, 4), Liver25DNet(3, 4),
                                       torch.device("cpu"), roi_liver=(8, 32, 32),
                                       roi_tumour=(8, 32, 32))
    calls = []
    run = seg.segment_rules

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return run(*args, **kwargs)

    seg.segment_rules = counted  # type: ignore[method-assign]
    with torch.inference_mode():
        choice = choose_tumour_rule(seg, [tiny_case(1), tiny_case(2)], (None, 0.5, 0.3),
                                         (0.2, 0.1))
    assert len(calls) == 2
    assert choice["threshold"] in (None, 0.5, 0.3)
    assert choice["min_tumour_ml"] in (0.2, 0.1)
    assert set(choice["candidates"]) == {f"{t} / {m} ml" for t in ("argmax", 0.5, 0.3)
                                         for m in (0.2, 0.1)}
    assert all(s["cases"] == 2 for s in choice["candidates"].values())


def test_options_refuse_bad_values_by_name() -> None:
    recipe = LiverTumorRecipe()
    with pytest.raises(ValueError, match="'slab'"):
        make_options(recipe, {"slab": 3})
    with pytest.raises(ValueError, match="'tumour_class_weight'"):
        make_options(recipe, {"tumour_class_weight": 0})
    with pytest.raises(ValueError, match="'tumour_patch'"):
        make_options(recipe, {"tumour_patch": 36})
    with pytest.raises(ValueError, match="option 'focal_gamma'"):
        make_options(recipe, {"focal_gamma": 2.0})   # the head-and-neck model's, not this one's
