"""Tests of dicomnode.nn.anatomynet: the network, orientation, sides, two-stage inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicomnode.nn import anatomynet
from dicomnode.nn.anatomynet import (
    PAIRS,
    AnatomyNet,
    HeadNeckSegmenter,
    assign_sides,
    canonical_flips,
    keep_largest,
    midline,
    mirrored,
    postprocess,
)


def test_the_network_keeps_the_input_shape_and_stays_small() -> None:
    net = AnatomyNet(10, 16).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 1, 6, 32, 40))
    assert out.shape == (2, 10, 6, 32, 40)
    megabytes = sum(p.numel() for p in net.parameters()) * 4 / 2**20
    assert megabytes < 2
    # the paper's width: 28 channels first, then 30, 32, 34 in the encoder
    paper = AnatomyNet(10, 28)
    assert [b[0].body[0].out_channels for b in (paper.enc1, paper.enc2, paper.enc3)] == [
        30, 32, 34]


def test_the_network_refuses_what_it_cannot_take() -> None:
    with pytest.raises(ValueError, match="'num_classes'"):
        AnatomyNet(1)
    with pytest.raises(ValueError, match="'width'"):
        AnatomyNet(10, 2)
    with pytest.raises(ValueError, match="even"):
        AnatomyNet(10, 4)(torch.zeros(1, 1, 4, 9, 8))


def test_standard_and_flipped_axial_series_map_to_the_canonical_orientation() -> None:
    assert canonical_flips(None) == ()
    assert canonical_flips(np.eye(3)) == ()
    # rows run right-to-left (x decreasing), slices head-to-foot
    flipped = np.array([[-1, 0, 0], [0, 1, 0], [0, 0, -1]], dtype=float)
    assert canonical_flips(flipped) == (0, 2)
    with pytest.raises(ValueError, match="not an axial series"):
        canonical_flips(np.array([[0, 1, 0], [0, 0, -1], [-1, 0, 0]], dtype=float))


def test_sides_follow_the_patient_whatever_the_network_called_them() -> None:
    labels = np.zeros((4, 10, 20), dtype=np.uint8)
    labels[:, 4:6, 9:11] = 1          # brainstem on the midline, x = 9.5
    labels[:, 2:4, 15:18] = 7         # "right parotid" on the patient's left (x > 9.5)
    labels[:, 2:4, 2:5] = 7           # and one on the right
    labels[:, 7:9, 14:16] = 5         # a "right optic nerve" on the left
    mid = midline(labels)
    assert mid == pytest.approx(9.5)
    out = assign_sides(labels, mid)
    assert (out[:, 2:4, 15:18] == 6).all() and (out[:, 2:4, 2:5] == 7).all()
    assert (out[:, 7:9, 14:16] == 4).all()
    assert (out[:, 4:6, 9:11] == 1).all()


def test_each_organ_keeps_its_largest_component_and_no_voxel_has_two_organs() -> None:
    labels = np.zeros((6, 20, 20), dtype=np.uint8)
    labels[1:5, 2:8, 2:8] = 3
    labels[0, 15, 15] = 3             # a stray mandible voxel
    labels[2, 12:14, 12:14] = 2
    out = keep_largest(labels)
    assert out[0, 15, 15] == 0 and (out[1:5, 2:8, 2:8] == 3).all()
    assert (out[2, 12:14, 12:14] == 2).all()
    assert postprocess(np.zeros((2, 4, 4), dtype=np.uint8)).max() == 0


def _toy_segmenter(side_channel: bool = False) -> HeadNeckSegmenter:
    torch.manual_seed(0)
    return HeadNeckSegmenter(AnatomyNet(10, 4), AnatomyNet(10, 4, side_channel=side_channel),
                             torch.device("cpu"),
                             roi_coarse=(8, 16, 16), roi_fine=(8, 32, 32))


def test_segmenter_returns_labels_on_the_input_grid_in_its_orientation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seg = _toy_segmenter()
    hu = np.full((24, 64, 64), -1000, dtype=np.int16)
    hu[:, 16:48, 16:48] = 40
    # the coarse stage finds one organ in the patient's left half: box and sides follow it
    def coarse(net: AnatomyNet, image: torch.Tensor, roi: tuple[int, int, int]
               ) -> torch.Tensor:
        probs = torch.zeros((10, *image.shape[-3:]))
        probs[0] = 1
        if net is seg.coarse_net:
            z, y, x = image.shape[-3:]
            probs[0, z // 3:2 * z // 3, y // 3:2 * y // 3, x // 2:] = 0
            probs[6, z // 3:2 * z // 3, y // 3:2 * y // 3, x // 2:] = 1
        else:
            probs[0] = 0
            probs[7] = 1                    # everything in the box: "right parotid"
        return probs

    monkeypatch.setattr(seg, "_predict", coarse)
    seg.mirror = False   # the fake fine stage answers "right" whichever way it reads
    out = seg.segment(hu, (5.0, 4.0, 4.0))
    assert out.labels.shape == hu.shape and out.box is not None
    # no midline organ: the network's side is kept
    assert set(np.unique(out.labels)) == {0, 7}
    flipped = seg.segment(hu[:, :, ::-1].copy(), (5.0, 4.0, 4.0),
                          np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=float))
    assert np.array_equal(flipped.labels, out.labels[:, :, ::-1])
    assert "stage2_fine" in out.timings


def test_a_mirrored_reading_swaps_each_pair_and_undoes_itself() -> None:
    volume = torch.rand(10, 3, 4, 6)
    out = mirrored(volume, PAIRS)
    for left, right in PAIRS:
        assert torch.equal(out[left], torch.flip(volume[right], dims=[-1]))
        assert torch.equal(out[right], torch.flip(volume[left], dims=[-1]))
    assert torch.equal(out[1], torch.flip(volume[1], dims=[-1]))
    assert torch.equal(mirrored(out, PAIRS), volume)
    side = anatomynet.side_map((2, 3, 6), 1.0, 2.5)
    # flipped, the side channel would say left is right: stage 2 keeps it as it is
    assert torch.equal(mirrored(side[None], ())[0], -side)


def test_stage_two_averages_its_reading_with_the_mirrored_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seg = _toy_segmenter(side_channel=True)
    hu = np.full((24, 64, 64), -1000, dtype=np.int16)
    hu[:, 16:48, 16:48] = 40
    fine_inputs: list[torch.Tensor] = []

    def fake(net: AnatomyNet, image: torch.Tensor, roi: tuple[int, int, int]
             ) -> torch.Tensor:
        probs = torch.zeros((10, *image.shape[-3:]))
        if net is seg.coarse_net:
            probs[1] = 1                    # an organ everywhere: the box is the volume
            return probs
        fine_inputs.append(image.clone())
        probs[0] = 0.2
        probs[4] = 0.8 if len(fine_inputs) == 1 else 0.0   # "left" only when read as given
        probs[5] = 0.0 if len(fine_inputs) == 1 else 0.8
        return probs

    monkeypatch.setattr(seg, "_predict", fake)
    found = seg.probabilities(hu, (5.0, 4.0, 4.0))
    assert len(fine_inputs) == 2
    # the image mirrored, the side channel not: a mirrored patient
    assert torch.equal(fine_inputs[1][0], torch.flip(fine_inputs[0][0], dims=[-1]))
    assert len(fine_inputs[0]) == 2 and torch.equal(fine_inputs[1][1], fine_inputs[0][1])
    assert found.probs is not None
    # the mirrored reading's "right" is the given reading's "left": they agree
    assert torch.allclose(found.probs[4], torch.full_like(found.probs[4], 0.8))
    assert torch.allclose(found.probs[5], torch.zeros_like(found.probs[5]))


def test_nothing_found_gives_an_empty_map() -> None:
    seg = _toy_segmenter()
    seg.coarse_net.classify.bias.data[:] = torch.tensor([50.0] + [0.0] * 9)
    out = seg.segment(np.zeros((16, 32, 32), dtype=np.int16), (5.0, 4.0, 4.0))
    assert out.labels.max() == 0 and out.box is None
    assert anatomynet.normalise_hu(np.array([-1000, 100, 2000])).tolist() == [-1, 0, 1]


def test_the_organs_box_keeps_every_sizeable_group_and_drops_strays() -> None:
    """The brainstem and optic pathway can form a group apart from the mandible and
    glands on the coarse grid; the box must hold both, but not a stray voxel."""
    coarse = np.zeros((40, 60, 60), dtype=np.uint8)
    coarse[5:15, 10:30, 15:45] = 3           # mandible and glands: 6000 voxels, 480 ml
    coarse[25:35, 35:42, 27:33] = 1          # brainstem, 8 slices above: 420 voxels, 34 ml
    coarse[2, 55, 2] = 6                     # one stray voxel (0.08 ml)
    box = anatomynet.organ_box(coarse, coarse.shape, anatomynet.COARSE_SPACING)
    assert box is not None
    margin = [int(np.ceil(anatomynet.BOX_MARGIN_MM / s)) for s in anatomynet.COARSE_SPACING]
    assert box[0] == slice(5 - margin[0], 35 + margin[0])
    assert box[1] == slice(10 - margin[1], 42 + margin[1])
    assert box[2] == slice(15 - margin[2], 45 + margin[2])


def test_each_organs_confidence_is_its_mean_probability_over_its_voxels() -> None:
    from dicomnode.nn.anatomynet import organ_confidence

    probs = torch.zeros(10, 2, 4, 4)
    probs[0] = 1.0
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    labels[0, :2, :2] = 6
    probs[6, 0, :2, :2] = torch.tensor([[0.9, 0.7], [0.5, 0.9]])
    labels[1, 3, 3] = 3
    probs[3, 1, 3, 3] = 0.95
    assert organ_confidence(probs, labels) == pytest.approx({6: 0.75, 3: 0.95})
    assert organ_confidence(probs, np.zeros_like(labels)) == {}
