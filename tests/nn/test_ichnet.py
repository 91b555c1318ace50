"""Tests of IchNet: slabs, windows, shapes, order reversal, the RSNA loss, the blood grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dicomnode.nn.ichnet import (
    FINDINGS,
    INPUT_PX,
    IchClassifier,
    IchNet,
    IchOutput,
    IchTarget,
    RsnaLoss,
    neighbours,
    predict,
    prepare_volume,
    slab_groups,
    slab_mask,
    study_logits,
    to_volume_grid,
    weighted_log_loss,
    weighted_log_loss_np,
    windows,
)
from dicomnode.phantoms import make_phantom


def test_thin_slices_are_combined_into_5_mm_slabs_and_5_mm_slices_stay_alone() -> None:
    thin = slab_groups(132, 1.25)
    assert len(thin) == 33 and all(len(g) == 4 for g in thin)
    assert [len(g) for g in slab_groups(33, 5.0)] == [1] * 33
    # a tail under half a slab joins the slab before it; a longer one is a slab of its own
    assert [len(g) for g in slab_groups(9, 1.25)] == [4, 5]
    assert [len(g) for g in slab_groups(10, 1.25)] == [4, 4, 2]
    assert [len(g) for g in slab_groups(9, 2.5)] == [2, 2, 2, 2, 1]
    with pytest.raises(ValueError, match="n_slices"):
        slab_groups(0, 5.0)


def test_the_three_windows_map_hu_to_brain_subdural_and_bone() -> None:
    out = windows(torch.tensor([[0.0, 40.0, 80.0, 1000.0]]))[:, 0]
    assert out.shape == (3, 4)
    assert torch.allclose(out[0], torch.tensor([0.0, 0.5, 1.0, 1.0]))       # 40/80
    assert torch.allclose(out[1], torch.tensor([0.1, 0.3, 0.5, 1.0]))       # 80/200
    assert torch.allclose(out[2, 2], torch.tensor((80 - 600 + 1400) / 2800))  # 600/2800


def test_each_slab_is_stacked_with_the_one_below_and_above() -> None:
    x = torch.arange(4.0).view(1, 4, 1, 1, 1)
    out = neighbours(x)[0, :, :, 0, 0]
    assert out.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


def test_the_network_gives_six_logits_per_slab_and_a_blood_map_per_slab() -> None:
    torch.manual_seed(0)
    net = IchNet(8, hidden=16)
    out = net(torch.rand(2, 5, 3, 64, 64))
    assert out.slices.shape == (2, 5, len(FINDINGS))
    assert out.seg is not None and out.seg.shape == (2, 5, 64, 64)
    assert study_logits(out.slices).shape == (2, 6)
    assert IchNet(8, hidden=16, segmentation=False)(torch.rand(1, 3, 3, 64, 64)).seg is None


@pytest.mark.parametrize("dims", [[1], [-1]], ids=["slabs reversed", "head mirrored"])
def test_a_reversed_or_mirrored_study_gives_the_same_findings_on_the_same_slabs(
        dims: list[int]) -> None:
    torch.manual_seed(0)
    net = IchNet(8, hidden=16).eval()
    x = torch.rand(1, 6, 3, 64, 64)
    with torch.inference_mode():
        slices, seg = predict(net, x)
        other, seg_other = predict(net, torch.flip(x, dims=dims))
        plain = torch.sigmoid(net(x).slices)
        reversed_only = 0.5 * (plain + torch.flip(
            torch.sigmoid(net(torch.flip(x, dims=[1])).slices), dims=[1]))
    assert torch.allclose(slices, torch.flip(other, dims=[1]) if 1 in dims else other,
                          atol=1e-6)
    assert seg is not None and seg_other is not None
    assert torch.allclose(seg, torch.flip(seg_other, dims=dims), atol=1e-6)
    # the four readings differ, and their mean is none of them nor the unmirrored mean
    assert not torch.allclose(slices, plain, atol=1e-6)
    assert not torch.allclose(slices, reversed_only, atol=1e-6)


def test_the_weighted_log_loss_is_the_rsna_metric_computed_by_hand() -> None:
    p = np.array([[0.9, 0.1, 0.2, 0.1, 0.6, 0.3],
                  [0.2, 0.1, 0.1, 0.1, 0.1, 0.1]])
    y = np.array([[1, 0, 0, 0, 1, 0],
                  [0, 0, 0, 0, 0, 0]])
    by_hand = 0.0
    for i in range(2):
        terms = [-(math.log(p[i, k]) if y[i, k] else math.log(1 - p[i, k])) for k in range(6)]
        by_hand += (2 * terms[0] + sum(terms[1:])) / 7
    by_hand /= 2
    assert weighted_log_loss_np(p, y) == pytest.approx(by_hand, rel=1e-9)
    logits = torch.logit(torch.tensor(p, dtype=torch.float64))
    assert float(weighted_log_loss(logits, torch.tensor(y))) == pytest.approx(by_hand,
                                                                               rel=1e-9)


def test_the_loss_counts_the_blood_mask_only_of_cases_with_voxel_labels() -> None:
    slices = torch.zeros(2, 3, 6)
    seg = torch.randn(2, 3, 8, 8)
    target = IchTarget(torch.zeros(2, 3, 6), torch.ones(2, 3, 8, 8, dtype=torch.bool),
                       torch.tensor([False, False]))
    loss = RsnaLoss(study_weight=0.5, seg_weight=1.0)
    without = float(loss(IchOutput(slices, seg), target))
    # zero logits: log 2 for every slab output and for the study, weighted 1 + 0.5
    assert without == pytest.approx(1.5 * math.log(2), rel=1e-6)
    target.has_seg = torch.tensor([True, False])
    assert float(loss(IchOutput(slices, seg), target)) > without


def test_a_blood_mask_goes_to_the_slab_grid_and_back_onto_the_volume() -> None:
    phantom = make_phantom("head", 0, matrix=128, spacing=1.25)
    prepared = prepare_volume(phantom.hu, phantom.spacing)
    assert prepared.slabs.shape[1:] == (INPUT_PX, INPUT_PX)
    assert len(prepared.groups) == prepared.slabs.shape[0]
    blood = phantom.labels >= 4
    on_slabs = slab_mask(blood, prepared)
    back = to_volume_grid(on_slabs, prepared, phantom.hu.shape)
    slab_truth = np.zeros_like(blood)
    for g in prepared.groups:
        slab_truth[g.start:g.stop] = blood[g.start:g.stop].any(axis=0)
    dice = 2 * (back & slab_truth).sum() / (back.sum() + slab_truth.sum())
    assert dice > 0.8


def test_the_classifier_gives_study_and_slice_probabilities_on_the_volume_grid() -> None:
    torch.manual_seed(0)
    phantom = make_phantom("head", 1, matrix=96)
    classifier = IchClassifier(IchNet(8, hidden=16), torch.device("cpu"),
                               thresholds={"any": 0.0})
    result = classifier.segment(phantom.hu, phantom.spacing)
    assert result.slices.shape == (phantom.hu.shape[0], 6)
    assert result.labels.shape == phantom.hu.shape
    assert set(result.study) == set(FINDINGS)
    assert result.study["any"] == pytest.approx(float(result.slices[:, 0].max()))
    assert result.decisions["any"] is True                # threshold 0: always positive
    assert result.thresholds["epidural"] == 0.5            # not given: 0.5
    gated = IchClassifier(classifier.net, torch.device("cpu"),
                          thresholds={"any": 1.1, **{k: 0.0 for k in FINDINGS[1:]}})
    # a subtype above its threshold is not reported in a study that "any" calls negative
    assert not any(gated.segment(phantom.hu, phantom.spacing).decisions.values())
