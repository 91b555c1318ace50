"""Tests of dicomnode.nn.liver25d: the network's 2.5D context, post-processing, measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicomnode.nn import liver25d
from dicomnode.nn.liver25d import Liver25DNet, normalise_hu, postprocess
from dicomnode.nn.liver_tumor import LiverTumorRecipe
from tests.nn.synthetic import tiny_case


def test_network_shape_and_size() -> None:
    net = Liver25DNet(3, 8).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 1, 9, 40, 56))
    assert out.shape == (2, 3, 9, 40, 56)
    megabytes = sum(p.numel() for p in net.parameters()) * 4 / 2**20
    assert megabytes < 20


def test_each_slice_sees_exactly_its_context() -> None:
    """Three 3D convolutions: slice z depends on z-3..z+3 and nothing further."""
    net = Liver25DNet(2, 4).eval()
    x = torch.randn(1, 1, 15, 32, 32)
    y = x.clone()
    y[0, 0, 11] += 5.0  # change slice 11
    with torch.inference_mode():
        a, b = net(x), net(y)
    changed = [(a[0, :, z] - b[0, :, z]).abs().max().item() > 1e-6 for z in range(15)]
    assert changed == [7 < z < 15 for z in range(15)]
    assert Liver25DNet.context_slices == 7


def test_network_validates() -> None:
    with pytest.raises(ValueError, match="'num_classes'"):
        Liver25DNet(1)
    with pytest.raises(ValueError, match="input"):
        Liver25DNet(2, 4)(torch.zeros(1, 1, 8, 8))


def test_normalise_hu_window() -> None:
    out = normalise_hu(np.array([-1000, -200, 25, 250, 3000]))
    assert out.tolist() == pytest.approx([-1, -1, 0, 1, 1])


def test_postprocess_cleans_liver_and_tumours() -> None:
    labels = np.zeros((20, 40, 40), dtype=np.uint8)
    labels[2:18, 5:35, 5:35] = 1          # liver
    labels[8:12, 18:22, 18:22] = 0        # a hole inside
    labels[5:9, 8:14, 8:14] = 2           # a real tumour (144 voxels)
    labels[15, 30, 30] = 2                # a one-voxel island
    labels[0, 38:40, 38:40] = 1           # a stray liver island
    labels[0, 0:3, 0:3] = 2               # tumour outside the liver
    out = postprocess(labels, (2.0, 1.0, 1.0), min_tumour_ml=0.1)
    assert out[0, 38, 38] == 0 and out[0, 0, 0] == 0
    assert out[10, 20, 20] == 1           # hole filled
    assert out[15, 30, 30] == 1           # island dropped back to liver
    assert int((out == 2).sum()) == 144


def _whole_array_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels, sizes


@pytest.mark.parametrize("seed", range(3))
def test_components_in_the_bounding_box_equal_the_whole_array(seed: int) -> None:
    # largest_component and remove_small_islands label only the mask's box: same result
    # as labelling the whole array, ties between equal sizes included
    rng = np.random.default_rng(seed)
    for _ in range(30):
        mask = np.zeros((12, 14, 16), dtype=bool)
        z, y, x = (int(rng.integers(0, n - 3)) for n in mask.shape)
        mask[z:z + 6, y:y + 7, x:x + 8] = rng.random((6, 7, 8))[:12 - z, :14 - y, :16 - x] < 0.3
        labels, sizes = _whole_array_components(mask)
        expected = labels == int(np.argmax(sizes)) if sizes.size > 2 else mask
        assert np.array_equal(liver25d.largest_component(mask), expected)
        for smallest in (1, 2, 5):
            keep = sizes >= smallest
            keep[0] = False
            assert np.array_equal(liver25d.remove_small_islands(mask, smallest), keep[labels])
    empty = np.zeros((4, 5, 6), dtype=bool)
    assert not liver25d.largest_component(empty).any()
    assert not liver25d.remove_small_islands(empty, 3).any()


def test_segmenter_runs_two_stages_on_tiny_case() -> None:
    case = tiny_case()
    torch.manual_seed(0)
    seg = liver25d.LiverTumorSegmenter(Liver25DNet(2, 4), Liver25DNet(3, 4),
                                       torch.device("cpu"), roi_liver=(8, 32, 32),
                                       roi_tumour=(8, 32, 32))
    out = seg.segment(case.hu, case.spacing)
    assert out.labels.shape == case.hu.shape and out.labels.dtype == np.uint8
    assert "stage1_liver" in out.timings


def test_label_probabilities_with_and_without_threshold() -> None:
    probs = torch.tensor([
        [0.6, 0.2, 0.2, 0.1],    # background
        [0.3, 0.5, 0.45, 0.3],   # liver
        [0.1, 0.3, 0.35, 0.6],   # tumour
    ]).reshape(3, 1, 1, 4)
    assert liver25d.label_probabilities(probs, None).ravel().tolist() == [0, 1, 1, 2]
    # organ where liver + tumour beat background; tumour where p(tumour) >= threshold
    assert liver25d.label_probabilities(probs, 0.3).ravel().tolist() == [0, 2, 2, 2]
    assert liver25d.label_probabilities(probs, 0.5).ravel().tolist() == [0, 1, 1, 2]


def test_threshold_comes_from_the_checkpoint_and_is_checked() -> None:
    nets = {"liver": Liver25DNet(2, 4).state_dict(), "tumour": Liver25DNet(3, 4).state_dict()}
    config = {"width_liver": 4, "width_tumour": 4, "tumour_threshold": 0.35,
              "min_tumour_ml": 0.05}
    seg = LiverTumorRecipe().build_segmenter({**nets, "config": config}, torch.device("cpu"))
    assert seg.tumour_threshold == 0.35 and seg.min_tumour_ml == 0.05
    seg = LiverTumorRecipe().build_segmenter({**nets, "config": config}, torch.device("cpu"),
                                   min_tumour_ml=0.3)
    assert seg.min_tumour_ml == 0.3
    seg = LiverTumorRecipe().build_segmenter(
        {**nets, "config": {"width_liver": 4, "width_tumour": 4}}, torch.device("cpu"))
    assert seg.tumour_threshold is None
    with pytest.raises(ValueError, match="'tumour_threshold'"):
        liver25d.LiverTumorSegmenter(Liver25DNet(2, 4), Liver25DNet(3, 4),
                                     torch.device("cpu"), tumour_threshold=1.5)
    with pytest.raises(ValueError, match="'min_tumour_ml'"):
        liver25d.LiverTumorSegmenter(Liver25DNet(2, 4), Liver25DNet(3, 4),
                                     torch.device("cpu"), min_tumour_ml=-1)
