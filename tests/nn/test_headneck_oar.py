"""Tests of dicomnode.nn.headneck_oar: the head-and-neck model's data, samplers and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.nn.anatomynet import NUM_CLASSES, ORGANS
from dicomnode.nn.datasets import Case
from dicomnode.nn.headneck_oar import (
    HeadNeckRecipe,
    hausdorff95,
    score_case,
    summarise,
)
from dicomnode.nn.recipe import make_options


def _toy_case(name: str = "toy", present: tuple[int, ...] | None = None) -> Case:
    """Two boxes of 'organ' in water: a mandible-like one and a small chiasm-like one."""
    hu = np.full((30, 60, 60), -1000, dtype=np.int16)
    hu[:, 10:50, 10:50] = 30
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[5:20, 20:40, 15:45] = 3
    hu[labels == 3] = 800
    labels[22:24, 28:31, 28:32] = 2
    return Case(name, hu, labels, (2.5, 1.0, 1.0), present=present)


def test_phantom_and_pddca_names_map_onto_the_tg263_labels() -> None:
    recipe = HeadNeckRecipe()
    raw = np.arange(10, dtype=np.uint8).reshape(1, 1, 10)
    table = {1: "BrainStem", 2: "Chiasm", 3: "Mandible", 4: "OpticNrv_L", 5: "OpticNrv_R",
             6: "Parotid_L", 7: "Parotid_R", 8: "Glnd_Submand_L", 9: "Glnd_Submand_R"}
    assert recipe.relabel(raw, table).ravel().tolist() == list(range(10))
    assert recipe.relabel(raw, {4: "Submandibular_R", 5: "Spleen"}).ravel().tolist() == [
        0, 0, 0, 0, 9, 0, 0, 0, 0, 0]
    assert list(recipe.labels.values()) == [
        "BrainStem", "OpticChiasm", "Bone_Mandible", "OpticNrv_L", "OpticNrv_R",
        "Parotid_L", "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R"]


def test_a_pddca_case_records_which_organs_were_contoured(tmp_path: Path) -> None:
    import SimpleITK as sitk  # noqa: N813

    case = _toy_case()
    folder = tmp_path / "0522c0001"
    (folder / "structures").mkdir(parents=True)
    image = sitk.GetImageFromArray(case.hu)
    image.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(image, str(folder / "img.nrrd"))
    for name, value in (("Mandible", 3), ("Chiasm", 2)):
        mask = sitk.GetImageFromArray((case.labels == value).astype(np.uint8))
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(folder / "structures" / f"{name}.nrrd"))
    recipe = HeadNeckRecipe()
    found = recipe.discover(tmp_path)
    assert found == [(folder,)]
    loaded = recipe.load(found[0])
    assert loaded.present == (2, 3)
    assert np.array_equal(loaded.labels, case.labels) and loaded.spacing == (2.5, 1.0, 1.0)
    prepared = recipe.prepare(loaded, make_options(recipe))
    assert prepared is not None
    assert prepared.present.tolist() == [True, False, True, True] + [False] * 6


def test_patches_centre_on_organs_and_carry_the_annotated_classes() -> None:
    recipe = HeadNeckRecipe()
    options = make_options(recipe, {"fine_slices": 8, "fine_patch": 16, "coarse_slices": 8,
                                    "coarse_patch": 16, "organ_fraction": 1.0})
    prepared = recipe.prepare(_toy_case(present=(2, 3)), options)
    assert prepared is not None
    fine = next(s for s in recipe.stages if s.name == "fine")
    sampler = recipe.sampler(fine, [prepared], options, 6)
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(5):
        image, (labels, present) = sampler(rng)
        assert image.shape == (6, 2, 8, 16, 16) and labels.shape == (6, 8, 16, 16)
        # the side channel: positive towards the patient's left, 1 per 100 mm
        assert (image[:, 1, :, :, 1:] - image[:, 1, :, :, :-1]).allclose(torch.tensor(0.01))
        assert present.shape == (6, NUM_CLASSES) and present[:, [0, 2, 3]].all()
        hits += int((labels > 0).flatten(1).any(1).sum())
    assert hits == 30            # every patch holds some organ
    loss = recipe.loss(fine, options)
    assert float(loss(torch.zeros((6, NUM_CLASSES, 8, 16, 16)), (labels, present))) > 0


def test_the_gland_weight_centres_more_patches_on_the_submandibular_glands() -> None:
    recipe = HeadNeckRecipe()
    case = _toy_case(present=(3, 8))            # no empty bed of the other gland to draw
    case.labels[22:28, 40:46, 15:21] = 8        # a small gland beside the 'mandible'
    case.labels[case.labels == 2] = 0
    fine = next(s for s in recipe.stages if s.name == "fine")

    def gland_patches(weight: float) -> int:
        options = make_options(recipe, {"fine_slices": 4, "fine_patch": 16, "coarse_slices": 8,
                                        "coarse_patch": 16, "organ_fraction": 1.0,
                                        "gland_weight": weight})
        prepared = recipe.prepare(case, options)
        assert prepared is not None
        sampler = recipe.sampler(fine, [prepared], options, 50)
        _, (labels, _) = sampler(np.random.default_rng(0))
        return int((labels == 8).flatten(1).any(1).sum())

    plain, weighted = gland_patches(1.0), gland_patches(9.0)
    assert weighted > plain and weighted >= 40     # 9 of 10 draws centre on the gland


def test_a_resected_glands_empty_bed_is_sampled_where_its_partner_lies_mirrored() -> None:
    recipe = HeadNeckRecipe()
    case = _toy_case()
    case.labels[case.labels == 2] = 0
    case.labels[8:16, 25:35, 14:20] = 7       # a right parotid; the left one resected
    options = make_options(recipe, {"fine_slices": 4, "fine_patch": 16, "coarse_slices": 8,
                                    "coarse_patch": 16})
    prepared = recipe.prepare(case, options)
    assert prepared is not None
    fine_labels = prepared.fine_labels.numpy()
    centre = float(np.nonzero(fine_labels == 3)[2].mean())       # the mandible: midline
    right = np.argwhere(fine_labels == 7)[:, 2].mean()
    bed = prepared.empty_beds[5]                                  # label 6, Parotid_L
    assert len(bed) and abs((bed[:, 2].mean() - centre) + (right - centre)) < 1.0
    assert not (fine_labels[tuple(bed.T)] == 6).any()
    assert all(not len(b) for i, b in enumerate(prepared.empty_beds) if i != 5)
    # a gland the case does not contour is unknown, not absent: no bed
    unknown = recipe.prepare(_toy_case(present=(3, 7)), options)
    assert unknown is not None and not any(len(b) for b in unknown.empty_beds)


def test_with_absent_scope_case_the_sampler_names_the_organs_a_case_lacks() -> None:
    recipe = HeadNeckRecipe()
    case = _toy_case(present=(2, 3, 6, 7))
    case.labels[8:16, 25:35, 14:20] = 7       # a right parotid; the left one resected
    fine = next(s for s in recipe.stages if s.name == "fine")
    sizes = {"fine_slices": 4, "fine_patch": 16, "coarse_slices": 8, "coarse_patch": 16}
    options = make_options(recipe, {**sizes, "absent_scope": "case"})
    prepared = recipe.prepare(case, options)
    assert prepared is not None
    _, (_, present, gone) = recipe.sampler(fine, [prepared], options, 4)(
        np.random.default_rng(0))
    assert gone.shape == present.shape == (4, NUM_CLASSES)
    assert gone[:, 6].all() and not gone[:, [0, 2, 3, 7]].any()    # held: not gone
    assert not gone[:, [1, 4, 5, 8, 9]].any()          # not contoured: unknown, not gone
    _, target = recipe.sampler(fine, [prepared], make_options(recipe, sizes), 4)(
        np.random.default_rng(0))
    assert len(target) == 2
    with pytest.raises(ValueError, match="'absent_scope'"):
        make_options(recipe, {"absent_scope": "batch"})


def test_scores_are_perfect_for_the_truth_and_distances_in_millimetres() -> None:
    case = _toy_case()
    row = score_case(case.labels.copy(), case)
    assert row["dice"]["Bone_Mandible"] == 1.0 and row["dice"]["OpticChiasm"] == 1.0
    assert row["dice"]["BrainStem"] == 1.0       # absent in both: nothing to miss
    assert row["hd95_mm"]["Bone_Mandible"] == 0.0 and row["hd95_mm"]["BrainStem"] is None
    shifted = np.roll(case.labels, 2, axis=0)    # two slices of 2.5 mm
    assert score_case(shifted, case)["hd95_mm"]["Bone_Mandible"] == pytest.approx(5.0)
    a = np.zeros((5, 5, 5), bool)
    assert hausdorff95(a, a, (1, 1, 1)) is None
    # a case without a chiasm contour is not scored on it
    partial = score_case(case.labels, _toy_case(present=(3,)))
    assert set(partial["dice"]) == {"Bone_Mandible"}
    summary = summarise([{**row, "seconds": 1.0}, {**partial, "seconds": 1.0}])
    assert summary["organs"]["Bone_Mandible"]["cases"] == 2
    assert summary["organs"]["OpticChiasm"]["cases"] == 1
    assert summary["dice_mean"] == 1.0 and set(summary["organs"]) == set(ORGANS.values())


def test_options_refuse_bad_values_by_name() -> None:
    recipe = HeadNeckRecipe()
    with pytest.raises(ValueError, match="'fine_patch'"):
        make_options(recipe, {"fine_patch": 15})
    with pytest.raises(ValueError, match="'gland_weight'"):
        make_options(recipe, {"gland_weight": 0})
    with pytest.raises(ValueError, match="'hu_shift'"):
        make_options(recipe, {"hu_shift": 500})
    with pytest.raises(ValueError, match="option 'tumour_class_weight'"):
        make_options(recipe, {"tumour_class_weight": 3})


def test_a_small_organ_gets_a_lower_threshold_when_validation_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.nn.anatomynet import AnatomyNet, HeadNeckSegmenter, OrganProbabilities
    from dicomnode.nn.headneck_oar import choose_thresholds

    case = _toy_case()
    shape = case.labels.shape
    probs = torch.zeros((NUM_CLASSES, *shape))
    probs[0] = 0.75
    probs[3][torch.from_numpy(case.labels == 3)] = 0.9      # the mandible: clear
    probs[0][torch.from_numpy(case.labels == 3)] = 0.1
    chiasm = torch.from_numpy(case.labels == 2)
    probs[2][chiasm] = 0.25                                   # the chiasm: never the max
    probs[2][~chiasm] = 0.04
    box = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    seg = HeadNeckSegmenter(AnatomyNet(2, 4), AnatomyNet(10, 4), torch.device("cpu"))
    monkeypatch.setattr(seg, "probabilities", lambda *a, **k: OrganProbabilities(
        probs, box, (), shape))
    assert not (seg.segment(case.hu, case.spacing).labels == 2).any()
    chosen = choose_thresholds(seg, [case, case])
    assert chosen["thresholds"] == {"2": 0.2} and chosen["cases"] == 2
    assert chosen["candidates"]["OpticChiasm"]["argmax"] == 0.0
    assert chosen["candidates"]["OpticChiasm"]["0.2"] == 1.0
    # an organ with no truth in these cases keeps the most probable class
    assert "4" not in chosen["thresholds"]
    seg.thresholds = {2: 0.2}
    assert np.array_equal(seg.segment(case.hu, case.spacing).labels == 2, case.labels == 2)
    with pytest.raises(ValueError, match="'thresholds'"):
        HeadNeckSegmenter(AnatomyNet(2, 4), AnatomyNet(10, 4), torch.device("cpu"),
                          thresholds={2: 1.5})
