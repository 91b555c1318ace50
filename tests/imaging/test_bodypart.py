"""Tests for dicomnode.imaging.bodypart on synthetic anatomy volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicomnode.imaging.bodypart import detect_region, measure_slice
from dicomnode.imaging.series import SeriesCheck, Volume, direction_from_iop, load_series
from tests.imaging.conftest import anatomy, anatomy_slice, write_series

PIX = 400 / 96


@pytest.mark.parametrize("region", ["head", "headneck", "chest", "abdomen"])
def test_each_region_detected(tmp_path: Path, region: str) -> None:
    hu = anatomy(region, slices=40, matrix=96, seed=5)
    vol = load_series(write_series(tmp_path, hu, spacing=(3.0, PIX, PIX)))
    est = detect_region(vol)
    assert est.region == region
    assert 0.5 <= est.confidence <= 1.0
    assert est.evidence["rule"] and est.evidence["profile"]
    assert sum(est.evidence["slice_labels"].values()) == 40


def test_pelvis_is_other(tmp_path: Path) -> None:
    vol = load_series(write_series(tmp_path, anatomy("pelvis", slices=20, matrix=96),
                                   spacing=(3.0, PIX, PIX)))
    assert detect_region(vol).region == "other"


def test_headneck_profile_runs_inferior_to_superior(tmp_path: Path) -> None:
    vol = load_series(write_series(tmp_path, anatomy("headneck", slices=40, matrix=96),
                                   spacing=(2.5, PIX, PIX)))
    est = detect_region(vol)
    assert est.evidence["profile"].startswith("neck")
    assert est.evidence["profile"].endswith(tuple(f"head x{n}" for n in range(1, 41)))
    assert est.evidence["extent_mm"]["neck"] > 45


def test_normal_pointing_down_and_coronal_volumes(tmp_path: Path) -> None:
    hu = anatomy("headneck", slices=40, matrix=96, seed=8)
    ref = detect_region(load_series(write_series(tmp_path / "a", hu, spacing=(2.5, PIX, PIX))))
    # column cosine flipped: the normal points to the feet, slice 0 is the most superior
    flipped = load_series(write_series(tmp_path / "b", hu[::-1], spacing=(2.5, PIX, PIX),
                                       iop=(1, 0, 0, 0, -1, 0),
                                       positions=[-2.5 * k for k in range(40)][::-1]))
    assert flipped.normal[2] < 0
    est = detect_region(flipped)
    assert est.region == ref.region == "headneck"
    assert est.evidence["profile"] == ref.evidence["profile"]
    # the same anatomy stored as coronal slices (rows run head to feet)
    cor = np.transpose(hu, (1, 0, 2))[:, ::-1, :]  # [y, z(superior first), x]
    vol = load_series(write_series(tmp_path / "c", cor, spacing=(PIX, 2.5, PIX),
                                   iop=(1, 0, 0, 0, 0, -1)))
    est_c = detect_region(vol)
    assert est_c.region == "headneck"


def test_empty_volume_is_other_with_zero_confidence(tmp_path: Path) -> None:
    air = np.full((6, 32, 32), -1000.0, dtype=np.float32)
    est = detect_region(load_series(write_series(tmp_path, air)))
    assert est.region == "other" and est.confidence == 0.0


def test_measure_slice_labels() -> None:
    rng = np.random.default_rng(0)
    for kind, label in [("head", "head"), ("neck", "neck"), ("chest", "chest"),
                        ("abdomen", "abdomen"), ("pelvis", "pelvis")]:
        img = anatomy_slice(kind, (128, 128), 400 / 128, rng)
        m = measure_slice(img, (400 / 128, 400 / 128))
        assert m.label == label, (kind, m)
    assert measure_slice(np.full((16, 16), -1000.0), (1.0, 1.0)).label == "empty"
    shoulders = np.full((128, 128), -1000.0)
    shoulders[44:84, 4:124] = 40.0  # 360 x 120 mm at 3 mm pixels
    assert measure_slice(shoulders, (3.0, 3.0)).label == "shoulder"


# --- on the phantoms of dicomnode.phantoms -------------------------------------------


def _volume(phantom: Any) -> Volume:
    nz = phantom.hu.shape[0]
    return Volume(
        hu=phantom.hu, spacing=tuple(phantom.spacing), origin=tuple(phantom.origin),
        direction=direction_from_iop(list(phantom.direction)),
        positions=np.arange(nz) * phantom.spacing[0], sop_instance_uids=[],
        series_instance_uid="", study_instance_uid="", frame_of_reference_uid="",
        datasets=[], check=SeriesCheck(""))


@pytest.mark.parametrize("region", ["head", "headneck", "abdomen"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_phantom_regions_detected(region: str, seed: int) -> None:
    from dicomnode.phantoms.phantom import make_phantom

    est = detect_region(_volume(make_phantom(region, seed, matrix=96)))
    assert est.region == region, est.evidence
    assert est.confidence >= 0.7
    if region == "head":
        assert est.evidence["neck_below_skull_mm"] <= 70
    if region == "headneck":
        assert est.evidence["neck_below_skull_mm"] > 70
