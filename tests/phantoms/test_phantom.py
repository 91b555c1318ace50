"""Tests for dicomnode.phantoms.phantom (make_phantom and the anatomy it paints)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.phantoms import REGIONS, Phantom, make_phantom
from dicomnode.phantoms.anatomy_headneck import LABELS as HN_LABELS


def test_regions_contract() -> None:
    assert REGIONS == ("headneck", "abdomen", "head")


def test_phantom_arrays_and_geometry(small_phantoms: dict[str, Phantom]) -> None:
    for region, p in small_phantoms.items():
        assert p.region == region
        assert p.hu.dtype == np.int16 and p.labels.dtype == np.uint8
        assert p.hu.shape == p.labels.shape
        assert p.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        assert all(s > 0 for s in p.spacing)
        assert set(np.unique(p.labels)) - {0} <= set(p.label_names)
        assert p.hu.min() >= -1024 and p.hu.max() <= 3071


def test_headneck_has_all_nine_organs_at_risk() -> None:
    p = make_phantom("headneck", 0, matrix=192)
    assert list(p.label_names.values()) == [
        "BrainStem", "Chiasm", "Mandible", "OpticNrv_L", "OpticNrv_R", "Parotid_L",
        "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R"]
    vox = float(np.prod(p.spacing)) / 1000.0  # ml per voxel
    volume = {name: float((p.labels == v).sum()) * vox for v, name in HN_LABELS.items()}
    assert all(v > 0 for v in volume.values()), volume
    assert volume["Chiasm"] < 1.5 and volume["OpticNrv_L"] < 2.0  # small and thin
    assert 10 < volume["BrainStem"] < 45
    assert 10 < volume["Parotid_L"] < 60 and 3 < volume["Glnd_Submand_R"] < 20
    # OpticNrv_L is on the patient's left (+x), Parotid_R on the right (-x)
    x = p.origin[0] + p.spacing[2] * np.arange(p.hu.shape[2])
    for name, sign in (("OpticNrv_L", 1), ("OpticNrv_R", -1), ("Parotid_L", 1)):
        value = next(k for k, n in p.label_names.items() if n == name)
        cols = np.nonzero(p.labels == value)[2]
        assert np.sign(x[cols].mean() - np.mean(x)) == sign
    # mandible below the chiasm, brainstem spanning both
    zs = {n: np.nonzero(p.labels == v)[0].mean() for v, n in HN_LABELS.items()}
    assert zs["Mandible"] < zs["Chiasm"]


def test_a_resected_gland_is_gone_and_nothing_else_changes() -> None:
    whole = make_phantom("headneck", 4, matrix=96, slices=48)
    operated = make_phantom("headneck", 4, matrix=96, slices=48, resected=("Parotid_L",))
    assert (whole.labels == 6).any() and not (operated.labels == 6).any()
    bed = whole.labels == 6
    assert np.array_equal(whole.labels[~bed], operated.labels[~bed])
    near = ndimage.binary_dilation(bed, iterations=4)     # the kernel blurs its edge
    assert np.array_equal(whole.hu[~near], operated.hu[~near])
    # its bed fills with fat, well below the gland's HU
    # (median: at this small matrix the kernel blurs much of the bed with its neighbours)
    assert np.median(operated.hu[bed]) < min(-45.0, np.median(whole.hu[bed]) - 25)


def test_abdomen_tumours_lie_inside_the_liver_with_instances() -> None:
    p = make_phantom("abdomen", 0, matrix=96, slices=50)
    assert p.label_names[1] == "Liver" and p.label_names[2] == "Lesion_Liver"
    assert p.lesions, "seed 0 has tumours"
    assert p.instances is not None
    np.testing.assert_array_equal(p.instances > 0, p.labels == 2)
    for lesion in p.lesions:
        assert 5 <= lesion["diameter_mm"] <= 60
        assert (p.instances == lesion["id"]).sum() == lesion["voxels"]
    liver_hu = np.median(p.hu[p.labels == 1])
    assert 80 < liver_hu < 150  # portal venous liver
    aorta = ndimage.binary_erosion(p.labels == 6, np.ones((1, 3, 3), bool))
    assert np.median(p.hu[aorta]) > liver_hu  # the aorta enhances more (away from its edge)


def test_head_bleeds_and_truth() -> None:
    bleeding = 0
    for seed in range(12):
        p = make_phantom("head", seed, matrix=48, slices=12)
        assert p.truth is not None
        kinds = {b["subtype"] for b in p.info["bleeds"]}
        assert len(kinds) <= 2
        assert p.truth["study"]["any"] == int(bool(kinds))
        for s in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid",
                  "subdural"):
            if p.truth["study"][s]:
                assert s in kinds
        assert len(p.truth["slices"]) == p.hu.shape[0]
        bleeding += bool(kinds)
    assert 2 <= bleeding <= 10  # about half the cases


def _bleeding_seeds(count: int) -> list[int]:
    """Seeds of head cases with a bleed (bleeds do not depend on the matrix size)."""
    seeds = [s for s in range(40) if make_phantom("head", s, matrix=24, slices=12).info["bleeds"]]
    return seeds[:count]


def test_head_bleed_density_and_position() -> None:
    seen: set[str] = set()
    for seed in _bleeding_seeds(4):
        p = make_phantom("head", seed, matrix=128)
        assert p.truth is not None and p.truth["study"]["any"] == 1
        for value in range(4, 9):
            mask = p.labels == value
            if mask.any():
                seen.add(p.label_names[value])
                # acute blood, away from the partial volume with the skull at its edge
                core = ndimage.binary_erosion(mask, np.ones((1, 3, 3), bool))
                if core.sum() > 20:
                    assert 40 < np.median(p.hu[core]) < 100
        if any(b["subtype"] == "epidural" for b in p.info["bleeds"]):
            # a lens against the inner table: its voxels touch the skull label
            edh = p.labels == 4
            near = np.zeros_like(edh)
            near[:, 1:, :] |= edh[:, :-1, :]
            near[:, :-1, :] |= edh[:, 1:, :]
            near[:, :, 1:] |= edh[:, :, :-1]
            near[:, :, :-1] |= edh[:, :, 1:]
            assert (p.labels[near] == 3).any()
    assert seen

    p = make_phantom("head", 0, matrix=96)
    brain = p.labels == 1
    assert 20 < p.hu[brain].mean() < 45
    assert p.hu[p.labels == 3].mean() > 600  # skull


def test_same_seed_same_case_and_seed_varies_the_case() -> None:
    a = make_phantom("abdomen", 5, matrix=48, slices=16)
    b = make_phantom("abdomen", 5, matrix=48, slices=16)
    c = make_phantom("abdomen", 6, matrix=48, slices=16)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_grid_options() -> None:
    p = make_phantom("head", 1, matrix=64, spacing=(2.0, 0.5))
    assert p.spacing == (2.0, 0.5, 0.5)
    assert p.hu.shape[1:] == (64, 64) and 70 < p.hu.shape[0] < 100  # follows head size
    q = make_phantom("head", 1, matrix=64, slices=10, spacing=3.0)
    assert q.hu.shape[0] == 10 and q.spacing[0] == 3.0


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"region": "knee"}, "region"),
    ({"seed": -1}, "seed"),
    ({"matrix": 8}, "matrix"),
    ({"slices": 0}, "slices"),
    ({"spacing": (0, 1)}, "spacing"),
    ({"spacing": 30.0}, "spacing"),
    ({"noise": -2.0}, "noise"),
    ({"resected": ("Parotid_L",)}, "resected"),
    ({"region": "headneck", "resected": ("BrainStem",)}, "resected"),
])
def test_invalid_arguments_name_the_keyword(kwargs: dict, word: str) -> None:
    args = {"region": "head", "matrix": 32, "slices": 4, **kwargs}
    region = args.pop("region")
    with pytest.raises(ValueError, match=word):
        make_phantom(region, **args)
