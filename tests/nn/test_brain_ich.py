"""Tests of the brain_ich recipe: phantom truth, the RSNA 2019 layout, scores, training."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.nn import datasets
from dicomnode.nn.brain_ich import (
    THIN_MM,
    BrainIchRecipe,
    auc,
    case_truth,
    read_rsna_labels,
    summarise,
    threshold_for_sensitivity,
    threshold_in_gap,
    threshold_youden,
)
from dicomnode.nn.ichnet import FINDINGS, IchTarget
from dicomnode.nn.recipe import get_recipe, make_options
from dicomnode.nn.train import TrainConfig, train
from dicomnode.phantoms import make_phantom, write_phantom


def test_the_recipe_is_found_by_name() -> None:
    recipe = get_recipe("brain_ich")
    assert isinstance(recipe, BrainIchRecipe)
    assert [s.name for s in recipe.stages] == ["ichnet"]


def test_a_phantom_case_has_the_phantoms_own_slice_truth() -> None:
    recipe = BrainIchRecipe()
    case = recipe.phantom_case(0, matrix=128)
    phantom = make_phantom("head", 0, matrix=128)
    assert phantom.truth is not None
    expected = np.array([[row[k] for k in FINDINGS] for row in phantom.truth["slices"]])
    np.testing.assert_array_equal(case_truth(case), expected)
    assert set(np.unique(case.labels)) <= {0, 1, 2, 3, 4, 5}


def test_one_seed_in_three_is_a_thin_series() -> None:
    recipe = BrainIchRecipe()
    assert recipe.phantom_case(2, matrix=64).spacing[0] == THIN_MM
    assert recipe.phantom_case(3, matrix=64).spacing[0] == 5.0


def _write_rsna(folder: Path, seeds: list[int]) -> dict[str, list[int]]:
    """Phantoms written as the RSNA 2019 layout: one flat folder of slices with
    made-up names, and stage_2_train.csv. Returns SOP UID -> labels."""
    images = folder / "stage_2_train"
    images.mkdir(parents=True)
    labels: dict[str, list[int]] = {}
    for seed in seeds:
        work = folder / f"tmp-{seed}"
        write_phantom(make_phantom("head", seed, matrix=64), work)
        truth = json.loads((work / "truth.json").read_text())
        for row in truth["slices"]:
            labels[row["sop_instance_uid"]] = [row[k] for k in FINDINGS]
        for k, path in enumerate(sorted(work.glob("*.dcm"))):
            shutil.move(path, images / f"ID_{seed}{k:04d}.dcm")
        shutil.rmtree(work)
    with (folder / "stage_2_train.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Label"])
        for sop, values in labels.items():
            for key, value in zip(FINDINGS, values, strict=True):
                writer.writerow([f"ID_{sop}_{key}", value])
    return labels


def test_the_rsna_layout_is_rebuilt_into_series_with_each_slices_labels(tmp_path: Path
                                                                          ) -> None:
    labels = _write_rsna(tmp_path / "rsna", [0, 1])
    recipe = BrainIchRecipe()
    sources = recipe.discover(tmp_path / "rsna")
    assert len(sources) == 2                       # two series, told apart by their headers
    for source in sources:
        case = recipe.load(source)
        assert case.name.startswith("rsna-")
        assert case.present == () and not case.labels.any()
        import pydicom

        uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in source[1:]}  # type: ignore[index]
        assert set(uids) <= set(labels)
        truth = case_truth(case)
        assert truth.shape == (case.hu.shape[0], 6)
        assert truth.sum() == sum(sum(labels[u]) for u in uids)
        prepared = recipe.prepare(case, make_options(recipe))
        assert not prepared.has_seg and not prepared.blood.any()
        assert prepared.slab_labels.shape == (prepared.slabs.shape[0], 6)


def test_a_malformed_labels_row_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\nID_abc_any,1\nID_abc_bleed,1\n")
    with pytest.raises(ValueError, match="line 3"):
        read_rsna_labels(path)
    path.write_text("ID_abc_any,1\nID_abc_epidural,0\n")
    assert read_rsna_labels(path)["ID_abc"].tolist() == [1, 0, 0, 0, 0, 0]


def test_auc_counts_ties_half_and_needs_both_classes() -> None:
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert auc([0.1, 0.2], [1, 1]) is None


def test_the_threshold_is_the_highest_that_keeps_the_sensitivity() -> None:
    scores = [0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.3]
    truth = [1, 1, 1, 1, 0, 0, 0]
    assert threshold_for_sensitivity(scores, truth, 0.95) == pytest.approx(0.2)
    assert threshold_for_sensitivity(scores, truth, 0.75) == pytest.approx(0.7)
    assert threshold_for_sensitivity(scores, [0] * 7, 0.95) == 0.5


def _row(name: str, truth_any: int, p_any: float, decided: bool, thin: bool) -> dict:
    truth = {k: 0 for k in FINDINGS}
    truth["any"] = truth_any
    truth["subdural"] = truth_any
    prob = {k: 0.1 for k in FINDINGS}
    prob["any"] = p_any
    prob["subdural"] = p_any
    return {"case": name, "thin": thin, "truth": truth, "probability": prob,
            "decision": {"any": decided, "subdural": decided}, "slices": 10,
            "slice_log_loss": 0.1, "seconds": 1.0}


def test_the_summary_gives_auc_log_loss_sensitivity_and_specificity() -> None:
    rows = [_row("a", 1, 0.9, True, False), _row("b", 1, 0.4, False, True),
            _row("c", 0, 0.5, True, False), _row("d", 0, 0.1, False, True)]
    summary = summarise(rows)
    assert summary["auc_any"] == pytest.approx(0.75)
    assert summary["sensitivity_any"] == pytest.approx(0.5)
    assert summary["specificity_any"] == pytest.approx(0.5)
    assert summary["findings"]["epidural"]["auc"] is None       # no positive case
    assert summary["auc_subtype_min"] == pytest.approx(0.75)
    assert summary["weighted_log_loss_slice"] == pytest.approx(0.1)
    assert summary["by_thickness"]["thin"]["cases"] == 2
    assert summary["weighted_log_loss_study"] > 0


def test_a_batch_is_a_window_of_slabs_with_slab_labels_and_blood(tmp_path: Path) -> None:
    recipe = BrainIchRecipe()
    options = make_options(recipe, {"slab_window": 8})
    cases = [recipe.prepare(recipe.phantom_case(s, matrix=96), options) for s in (0, 3)]
    sampler = recipe.sampler(recipe.stages[0], cases, options, 3)
    image, target = sampler(np.random.default_rng(0))
    assert image.shape == (3, 8, 3, 128, 128)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert isinstance(target, IchTarget)
    assert target.slices.shape == (3, 8, 6) and target.seg.shape == (3, 8, 128, 128)
    assert bool(target.has_seg.all())


def test_training_writes_weights_with_an_operating_point_chosen_on_validation(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    recipe = BrainIchRecipe()
    recipe.evaluation_matrix = 96
    entry = train(recipe, tmp_path / "models", seeds=[0, 1], val_seeds=[3, 4],
                  heldout_seeds=[5], matrix=96, version="0.0.1",
                  config=TrainConfig(epochs=1, steps_per_epoch=1, batch_size=1, threads=1,
                                     widths={"ichnet": 8}),
                  options=make_options(recipe, {"slab_window": 6}))
    assert entry["name"] == "brain_ich" and len(entry["sha256"]) == 64
    assert set(entry["input"]["thresholds"]) == set(FINDINGS)
    assert entry["input"]["target_sensitivity"] == 0.95
    assert entry["metrics"]["cases"] == 1
    assert "weighted_log_loss_slice" in entry["metrics"]
    metrics = json.loads((tmp_path / "models" / "brain_ich-0.0.1.metrics.json").read_text())
    assert metrics["validation"]["phantom_seeds"] == "3-4"
    segmenter, loaded = recipe.load_segmenter(tmp_path / "models", torch.device("cpu"))
    assert loaded.sha256 == entry["sha256"]
    assert segmenter.thresholds == pytest.approx(entry["input"]["thresholds"])  # type: ignore[attr-defined]
    assert datasets.format_seeds([0, 1]) in entry["training_data"]


def test_a_subtypes_threshold_balances_sensitivity_and_specificity() -> None:
    scores = [0.9, 0.8, 0.05, 0.6, 0.3, 0.1, 0.2]
    truth = [1, 1, 1, 0, 0, 0, 0]
    # the sensitivity rule would go down to 0.05 (every negative positive); Youden's J
    # stops at 0.8 (sensitivity 2/3, specificity 1)
    assert threshold_youden(scores, truth) == pytest.approx(0.8)
    assert threshold_youden(scores, [0] * 7) == 0.5


def test_a_threshold_moves_into_the_gap_below_the_validation_case_it_sits_on() -> None:
    scores = [0.99997, 0.9999, 0.2, 0.1, 0.05]
    moved = threshold_in_gap(scores, 0.99997)
    # the same decisions on these scores: 0.99997 in, 0.9999 out ...
    assert 0.9999 < moved < 0.99997
    # ... halfway on the logit scale, and the gap can be wide
    wide = threshold_in_gap(scores, 0.9999)
    assert 0.2 < wide < 0.99
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731 - a one-line formula
    assert logit(wide) == pytest.approx((logit(0.9999) + logit(0.2)) / 2, abs=1e-3)
    # nothing lower: unchanged
    assert threshold_in_gap(scores, 0.05) == 0.05
