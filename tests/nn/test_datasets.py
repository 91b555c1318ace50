"""Tests of dicomnode.nn.datasets: seed lists, discovery, phantom cache, NRRD reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomnode.nn import datasets
from dicomnode.nn.headneck_oar import HeadNeckRecipe
from dicomnode.nn.liver_tumor import LiverTumorRecipe


def test_seed_lists_parse_and_format_both_ways() -> None:
    assert datasets.parse_seeds("0,3,5-7") == [0, 3, 5, 6, 7]
    assert datasets.parse_seeds("1000-1002") == [1000, 1001, 1002]
    assert datasets.format_seeds([0, 3, 5, 6, 7]) == "0,3,5-7"
    for bad in ("a", "5-3", ""):
        with pytest.raises(ValueError, match="'seeds'"):
            datasets.parse_seeds(bad)


@pytest.mark.parametrize("recipe", [LiverTumorRecipe(), HeadNeckRecipe()])
def test_discover_says_what_it_looked_for_in_an_empty_folder(recipe: object,
                                                              tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no phantom folders") as error:
        recipe.discover(tmp_path)  # type: ignore[attr-defined]
    assert recipe.data_layout.split(" ")[0] in str(error.value)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not a directory"):
        recipe.discover(tmp_path / "missing")  # type: ignore[attr-defined]


def test_a_cached_phantom_is_the_generated_one_relabelled_for_each_model(tmp_path: Path
                                                                          ) -> None:
    relabel = datasets.relabel_by_name({"BrainStem": 1})
    made = datasets.phantom_case("headneck", 3, relabel, matrix=32, cache_dir=tmp_path)
    again = datasets.phantom_case("headneck", 3, relabel, matrix=32, cache_dir=tmp_path)
    assert list(tmp_path.glob("*.npz")) == [tmp_path / "phantom-headneck-3-m32.npz"]
    assert np.array_equal(made.hu, again.hu) and np.array_equal(made.labels, again.labels)
    assert set(np.unique(made.labels)) <= {0, 1}
    # the cache keeps the phantom's own labels: another model maps them its own way
    organs = HeadNeckRecipe().phantom_case(3, matrix=32, cache_dir=tmp_path)
    assert np.array_equal(organs.hu, made.hu)
    assert np.array_equal(organs.labels == 1, made.labels == 1)
    assert organs.labels.max() > 1


def test_nrrd_images_are_read_in_the_dicom_array_order(tmp_path: Path) -> None:
    import SimpleITK as sitk  # noqa: N813

    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)   # [z, y, x]
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.5, 0.75, 2.5))
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    read, spacing = datasets.nifti_zyx(tmp_path / "img.nrrd")
    assert np.array_equal(read, data) and spacing == (2.5, 0.75, 0.5)
    # an image stored right to left comes back left to right
    image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "flipped.nrrd"))
    flipped, _ = datasets.nifti_zyx(tmp_path / "flipped.nrrd")
    assert np.array_equal(flipped, data[:, :, ::-1])
