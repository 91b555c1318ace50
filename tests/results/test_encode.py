"""Tests for dicomnode.results.encode and the ``dicomnode encode`` command."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 - the usual alias
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.results.encode import encode_label_map, series_reference_image
from dicomnode.results.source import check_source_images
from tests.results.conftest import (
    PLASTIMATCH,
    CtSeries,
    dciodvfy_errors,
    dice,
    make_ct_series,
)


def _write_nifti(series: CtSeries, path: Path, flip_x: bool = False) -> Path:
    """Write the labels as NIfTI on the series grid; optionally stored mirrored in x."""
    geometry = check_source_images(series.images)
    image = sitk.GetImageFromArray(series.labels)
    image.CopyInformation(series_reference_image(geometry))
    if flip_x:
        image = sitk.Flip(image, [True, False, False])  # same anatomy, other storage order
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def shuffled_series(tmp_path_factory: pytest.TempPathFactory) -> CtSeries:
    """A series whose file names and Instance Numbers do not follow the slice positions."""
    series = make_ct_series(tmp_path_factory.mktemp("enc") / "ct", slices=20, matrix=80)
    order = np.random.default_rng(3).permutation(len(series.images))
    for path in series.directory.glob("*.dcm"):
        path.unlink()
    for new, old in enumerate(order):
        image = series.images[old]
        image.InstanceNumber = int(len(order) - new)
        image.save_as(series.directory / f"img_{new:03d}.dcm", enforce_file_format=True)
    return series


def test_cli_encode_writes_valid_objects(shuffled_series: CtSeries, tmp_path: Path) -> None:
    labels = _write_nifti(shuffled_series, tmp_path / "labels.nii.gz", flip_x=True)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["encode", str(shuffled_series.directory), str(labels),
                                      "--structures", "headneck", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["voxels"]["BrainStem"] == int((shuffled_series.labels == 1).sum())
    for name in ("seg", "rtstruct", "sr"):
        assert dciodvfy_errors(Path(summary[name])) == []
    seg = hd.seg.segread(out / "seg.dcm")
    back = seg.get_pixels_by_source_instance(
        [im.SOPInstanceUID for im in shuffled_series.images],
        segment_numbers=list(range(1, 10)), combine_segments=True, relabel=False)
    assert np.array_equal(back, shuffled_series.labels)
    assert seg.SeriesDescription == "AI OAR segmentation"


def test_abdomen_table(axial: CtSeries, tmp_path: Path) -> None:
    labels = np.zeros_like(axial.labels)
    labels[axial.labels == 3] = 1
    labels[axial.labels == 1] = 2
    labels[axial.labels == 6] = 3  # spleen: in the file, not in the abdomen table
    liver = CtSeries(axial.images, labels, axial.directory)
    path = _write_nifti(liver, tmp_path / "liver.nii.gz")
    result = encode_label_map(axial.directory, path, "abdomen", tmp_path / "out")
    assert result.structures == {"Liver": int((labels == 1).sum()),
                                 "Lesion_Liver": int((labels == 2).sum())}
    assert result.ignored_labels == [3]
    assert dciodvfy_errors(result.sr) == []


def test_label_map_that_misses_the_series_is_refused(axial: CtSeries, tmp_path: Path) -> None:
    geometry = check_source_images(axial.images)
    image = sitk.GetImageFromArray(axial.labels)
    image.CopyInformation(series_reference_image(geometry))
    image.SetOrigin(tuple(np.array(image.GetOrigin()) + np.array([0.0, 0.0, 40.0])))
    sitk.WriteImage(image, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(ValueError, match="does not cover the series"):
        encode_label_map(axial.directory, tmp_path / "shifted.nii.gz", "headneck",
                         tmp_path / "out")


def test_bad_arguments(axial: CtSeries, tmp_path: Path) -> None:
    path = _write_nifti(axial, tmp_path / "labels.nii.gz")
    with pytest.raises(ValueError, match="'structures' value 'thorax'"):
        encode_label_map(axial.directory, path, "thorax", tmp_path / "out")
    with pytest.raises(ValueError, match="'labels' value"):
        encode_label_map(axial.directory, tmp_path / "missing.nii.gz", "headneck", tmp_path)
    mixed = tmp_path / "mixed"
    shutil.copytree(axial.directory, mixed)
    extra = make_ct_series(tmp_path / "other", slices=2, matrix=16)
    shutil.copy(next(extra.directory.glob("*.dcm")), mixed / "zz_other.dcm")
    with pytest.raises(ValueError, match="holds 2 series"):
        encode_label_map(mixed, path, "headneck", tmp_path / "out")
    result = CliRunner().invoke(app, ["encode", str(axial.directory), str(path),
                                      "--structures", "thorax", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2


@pytest.mark.parametrize("region", ["headneck", "abdomen"])
def test_phantom_ground_truth_encodes(region: str, tmp_path: Path) -> None:
    """Each phantom region's own ground truth, written as a CT series + labels.nii.gz."""
    phantoms = pytest.importorskip("dicomnode.phantoms.phantom",
                                   reason="dicomnode.phantoms not merged yet")
    phantom = phantoms.make_phantom(region, seed=5, slices=36, matrix=128)
    series_dir = tmp_path / "ct"
    phantoms.write_phantom(phantom, series_dir, slice_order="shuffled")
    result = encode_label_map(series_dir, series_dir / "labels.nii.gz", region, tmp_path / "out")
    for path in (result.seg, result.rtstruct, result.sr):
        assert dciodvfy_errors(path) == []
    table = {1: "Liver", 2: "Lesion_Liver"} if region == "abdomen" else None
    expected = phantom.labels.copy()
    if table is not None:
        expected[~np.isin(expected, list(table))] = 0
    seg = hd.seg.segread(result.seg)
    uids = [str(item.ReferencedSOPInstanceUID)
            for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    positions = {}
    for path in series_dir.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        positions[str(ds.SOPInstanceUID)] = float(ds.ImagePositionPatient[2])
    ordered = sorted(uids, key=positions.__getitem__)  # phantom slice 0 is most inferior
    back = seg.get_pixels_by_source_instance(
        ordered, segment_numbers=[int(s.SegmentNumber) for s in seg.SegmentSequence],
        combine_segments=True, relabel=False)
    assert np.array_equal(back, expected)
    assert sum(result.structures.values()) == int((expected > 0).sum())
    # RTSTRUCT rasterised back by plastimatch (even-odd, i.e. holes kept).
    assert PLASTIMATCH, "plastimatch is required for this test"
    masks_dir = tmp_path / "pm"
    subprocess.run([PLASTIMATCH, "convert", "--input", str(result.rtstruct),
                    "--referenced-ct", str(series_dir), "--output-prefix", str(masks_dir),
                    "--prefix-format", "nrrd", "--xor-contours"], check=True,
                   capture_output=True)
    images = sorted((pydicom.dcmread(p, stop_before_pixels=True)
                     for p in series_dir.glob("*.dcm")),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    geometry = check_source_images(images)
    reference = series_reference_image(geometry)
    for name, voxels in result.structures.items():
        if voxels * geometry.voxel_volume_mm3 / 1000 <= 1.0:
            continue
        label = next(k for k, v in phantoms.SPECS[region].labels.items() if v == name)
        image = sitk.ReadImage(str(masks_dir / f"{name}.nrrd"))
        back_mask = sitk.GetArrayFromImage(sitk.Resample(
            image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)).astype(bool)
        assert dice(back_mask, expected == label) >= 0.95, name
