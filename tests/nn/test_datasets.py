"""Tests of dicomnode.nn.datasets: seed lists, LiTS layout, discovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.nn import datasets
from tests.nn.synthetic import tiny_case, write_lits


def test_parse_seeds() -> None:
    assert datasets.parse_seeds("0,3,5-7") == [0, 3, 5, 6, 7]
    assert datasets.parse_seeds("1000-1002") == [1000, 1001, 1002]
    for bad in ("a", "5-3", ""):
        with pytest.raises(ValueError, match="'seeds'"):
            datasets.parse_seeds(bad)


def test_lits_layout_round_trip(tmp_path: Path) -> None:
    case = tiny_case()
    write_lits(case, tmp_path, 7)
    found = datasets.discover(tmp_path)
    assert found == [(tmp_path / "volume-7.nii", tmp_path / "segmentation-7.nii")]
    loaded = datasets.load(found[0])
    assert loaded.name == "lits-7"
    assert loaded.spacing == pytest.approx(case.spacing)
    assert np.array_equal(loaded.labels, case.labels)
    assert np.array_equal(loaded.hu, case.hu)


def test_discover_reports_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no phantom folders"):
        datasets.discover(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        datasets.discover(tmp_path / "missing")
