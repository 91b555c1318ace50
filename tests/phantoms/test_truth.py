"""Tests for dicomnode.phantoms.truth: labels.nii.gz on the DICOM grid, truth.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows
from pydicom import dcmread

from dicomnode.phantoms import Phantom, write_phantom
from dicomnode.phantoms.truth import HEAD_OUTPUTS


def _dicom_image(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return reader.Execute()


@pytest.mark.parametrize("region", ["headneck", "abdomen", "head"])
@pytest.mark.parametrize("order", ["ascending", "shuffled"])
def test_labels_resampled_onto_the_dicom_grid_match_exactly(
        small_phantoms: dict[str, Phantom], tmp_path: Path, region: str, order: str) -> None:
    p = small_phantoms[region]
    write_phantom(p, tmp_path, slice_order=order, transfer_syntax="rle")
    image = _dicom_image(tmp_path)
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    on_grid = sitk.Resample(labels, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            sitk.sitkUInt8)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(on_grid), p.labels)
    # and the DICOM pixels read through the same geometry are the phantom's HU
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), p.hu)
    assert on_grid.GetSpacing() == pytest.approx(p.spacing[::-1])
    assert on_grid.GetOrigin() == pytest.approx(p.origin, abs=1e-4)


def test_label_table_names_the_values(small_phantoms: dict[str, Phantom],
                                      tmp_path: Path) -> None:
    p = small_phantoms["abdomen"]
    paths = write_phantom(p, tmp_path)
    table = json.loads((tmp_path / "labels.json").read_text())
    assert table["labels"] == {str(k): v for k, v in p.label_names.items()}
    if p.lesions:
        assert tmp_path / "lesions.nii.gz" in paths
        assert len(table["lesions"]) == len(p.lesions)


def test_head_truth_json_references_the_written_slices(tmp_path: Path) -> None:
    from dicomnode.phantoms import make_phantom

    seed = next(s for s in range(40)
                if make_phantom("head", s, matrix=24, slices=12).info["bleeds"])
    p = make_phantom("head", seed, matrix=64, slices=20)
    write_phantom(p, tmp_path, slice_order="descending")
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert set(truth["study"]) == set(HEAD_OUTPUTS)
    assert truth["study"]["any"] == 1
    by_uid = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f
              for f in tmp_path.glob("*.dcm")}
    assert len(truth["slices"]) == len(by_uid)
    positives = 0
    for row in truth["slices"]:
        ds = dcmread(by_uid[row["sop_instance_uid"]], stop_before_pixels=True)
        assert int(ds.InstanceNumber) == row["instance_number"]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(row["z"], abs=1e-3)
        assert row["any"] == int(any(row[s] for s in HEAD_OUTPUTS[1:]))
        positives += row["any"]
    assert positives > 0
