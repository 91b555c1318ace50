"""Tests for dicomnode.results.measure: lesion split, volumes and diameters."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.results.measure import (
    find_lesions,
    longest_axial_diameter,
    longest_axial_diameter_mm,
    measure_liver,
)
from dicomnode.results.source import SliceGeometry


def _geometry(shape: tuple[int, int, int], spacing: float = 0.8, step: float = 2.0
              ) -> SliceGeometry:
    origins = np.array([[0.0, 0.0, k * step] for k in range(shape[0])])
    return SliceGeometry(origins, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
                         (spacing, spacing), shape)


def test_two_lesions_with_volume_diameter_and_slices() -> None:
    shape = (20, 100, 100)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    big = ((z - 10) / 4.0) ** 2 + ((y - 30) / 20.0) ** 2 + ((x - 30) / 20.0) ** 2 < 1
    small = ((z - 5) / 1.5) ** 2 + ((y - 75) / 6.0) ** 2 + ((x - 75) / 6.0) ** 2 < 1
    tumour = big | small
    liver = np.zeros(shape, bool)
    liver[:, 10:95, 10:95] = True
    liver &= ~tumour
    geometry = _geometry(shape)
    stats = measure_liver(liver, tumour, geometry)
    assert [lesion.number for lesion in stats.lesions] == [1, 2]
    first, second = stats.lesions
    assert first.volume_cm3 == pytest.approx(big.sum() * 0.8 * 0.8 * 2.0 / 1000)
    assert second.slice_indices == tuple(np.nonzero(small.any(axis=(1, 2)))[0])
    # 40 pixels of 0.8 mm across: about 32 mm edge to edge.
    assert first.longest_axial_diameter_mm == pytest.approx(32.0, abs=1.6)
    assert stats.tumour_burden_cm3 == pytest.approx(first.volume_cm3 + second.volume_cm3)
    whole = (liver | tumour).sum() * 0.8 * 0.8 * 2.0 / 1000
    assert stats.tumour_to_liver_percent == pytest.approx(100 * stats.tumour_burden_cm3 / whole)


def test_no_tumour() -> None:
    shape = (4, 10, 10)
    empty = np.zeros(shape, bool)
    stats = measure_liver(empty, empty, _geometry(shape))
    assert stats.lesions == () and stats.tumour_to_liver_percent == 0.0
    assert find_lesions(empty, _geometry(shape)) == []
    assert longest_axial_diameter_mm(empty, _geometry(shape).spacing) == 0.0


def test_measurements_of_a_crop_with_its_offset_equal_the_full_grid() -> None:
    shape = (20, 60, 60)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    tumour = (((z - 12) / 3.0) ** 2 + ((y - 30) / 8.0) ** 2 + ((x - 25) / 8.0) ** 2 < 1) | \
        (((z - 6) / 1.5) ** 2 + ((y - 45) / 4.0) ** 2 + ((x - 40) / 4.0) ** 2 < 1)
    liver = np.zeros(shape, bool)
    liver[3:18, 15:55, 12:50] = True
    geometry = _geometry(shape)
    box = (slice(3, 18), slice(15, 55), slice(12, 50))
    assert measure_liver(liver[box], tumour[box], geometry, z_offset=3, yx_offset=(15, 12)) == \
        measure_liver(liver, tumour, geometry)


def test_the_diameter_keeps_its_slice_and_end_points_on_the_full_grid() -> None:
    mask = np.zeros((6, 40, 50), bool)
    mask[2, 10:13, 5:25] = True      # 20 columns wide on slice 2
    mask[4, 10:25, 30:33] = True     # 15 rows tall on slice 4
    spacing = (0.5, 0.8)
    found = longest_axial_diameter(mask[1:, 8:, 3:], spacing, offset=(1, 8, 3))
    assert found is not None and found.slice_index == 2
    (r0, c0), (r1, c1) = found.ends
    length = float(np.hypot((r1 - r0) * spacing[0], (c1 - c0) * spacing[1]))
    assert length == pytest.approx(found.length_mm, abs=1e-9)
    assert found.length_mm == longest_axial_diameter_mm(mask, spacing)
    # the end points lie on the outline of the measured section: column edges 4.5 and 24.5
    assert sorted((c0, c1)) == pytest.approx([4.5, 24.5], abs=0.5)
    assert all(9.5 <= r <= 12.5 for r in (r0, r1))
    assert longest_axial_diameter(np.zeros((2, 4, 4), bool), spacing) is None


def test_a_lesion_reports_its_diameter_rounded_once() -> None:
    shape = (8, 40, 40)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    tumour = ((z - 4) / 2.5) ** 2 + ((y - 20) / 7.3) ** 2 + ((x - 18) / 5.1) ** 2 < 1
    stats = measure_liver(np.ones(shape, bool), tumour, _geometry(shape))
    (lesion,) = stats.lesions
    assert lesion.diameter_mm == round(lesion.longest_axial_diameter_mm, 1)
    assert stats.to_dict()["lesions"][0]["longest_axial_diameter_mm"] == lesion.diameter_mm
    assert stats.to_dict()["lesions"][0]["diameter_slice_index"] == lesion.diameter.slice_index
