"""Tests for dicomnode.results.encode and the ``dicomnode encode`` command."""

from __future__ import annotations

import json
import logging
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
from dicomnode.results.codes import STRUCTURE_TABLES
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
    from dicomnode.phantoms import phantom as phantoms

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
        label = next(s.label for s in STRUCTURE_TABLES[region] if s.name == name)
        image = sitk.ReadImage(str(masks_dir / f"{name}.nrrd"))
        back_mask = sitk.GetArrayFromImage(sitk.Resample(
            image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)).astype(bool)
        assert dice(back_mask, expected == label) >= 0.95, name


# Values real scanners send in the patient and study modules, several of them not valid
# for their VR: each result object must still be written, carrying them as they came.
_AWKWARD_COMMON: dict[str, object] = {"StudyID": "", "AccessionNumber": "ACC-2025-0001234567"}
_AWKWARD: dict[str, dict[str, object]] = {
    "multi_valued_name": {"PatientName": "Doe^John\\Roe^Jane", "PatientSex": "U",
                          "ReferringPhysicianName": "Ref^One\\Ref^Two"},
    "ideographic_name": {"SpecificCharacterSet": "ISO_IR 192",
                         "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
    "non_ascii_name": {"SpecificCharacterSet": "ISO_IR 192",
                       "PatientName": "Müller-Lüdenscheidt^Jürgen",
                       "StudyDescription": "Leber – Übersicht", "PatientSex": None,
                       "StudyTime": None, "PatientBirthDate": "19000000"},
}
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID",
           "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "StudyTime",
           "SpecificCharacterSet")


def _liver_labels(series: CtSeries) -> CtSeries:
    labels = np.zeros_like(series.labels)
    labels[series.labels == 3] = 1  # the shell as the liver
    labels[series.labels == 1] = 2  # a lesion
    return CtSeries(series.images, labels, series.directory)


def _raw(ds: pydicom.Dataset, keyword: str) -> bytes | None:
    """An attribute's value bytes as stored (padding stripped), None when absent."""
    if keyword not in ds:
        return None
    value = ds.get_item(keyword).value
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value.rstrip(b" \x00")
    return str(value).encode()  # decoded on reading (Specific Character Set)


@pytest.mark.parametrize("case", sorted(_AWKWARD))
def test_awkward_patient_and_study_values_go_through_every_result_object(
        case: str, tmp_path: Path) -> None:
    series = make_ct_series(tmp_path / "ct", slices=10, matrix=48,
                            attributes={**_AWKWARD_COMMON, **_AWKWARD[case]})
    labels = _write_nifti(_liver_labels(series), tmp_path / "liver.nii.gz")
    result = encode_label_map(series.directory, labels, "abdomen", tmp_path / "out")
    source_path = sorted(series.directory.glob("*.dcm"))[0]
    source = pydicom.dcmread(source_path)
    source_errors = set(dciodvfy_errors(source_path))
    # byte for byte; a type 2 attribute the source lacks is present and empty
    expected = {keyword: _raw(source, keyword) for keyword in _COPIED}
    expected.update({k: b"" for k in ("PatientSex", "StudyTime") if expected[k] is None})
    for path in (result.seg, result.rtstruct, result.sr):
        back = pydicom.dcmread(path)
        assert {keyword: _raw(back, keyword) for keyword in _COPIED} == expected, path.name
        assert str(back.PatientName) == str(source.PatientName)
        # the result adds no dciodvfy error of its own: only those the source CT has
        assert set(dciodvfy_errors(path)) <= source_errors, path.name
    if case == "multi_valued_name":
        assert [str(v) for v in pydicom.dcmread(result.sr).PatientName] == [
            "Doe^John", "Roe^Jane"]
    if case == "ideographic_name":
        assert pydicom.dcmread(result.seg).PatientName.ideographic == "山田^太郎"


def test_a_name_that_is_not_text_in_its_character_set_is_dropped_not_fatal(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dicomnode")
    series = make_ct_series(tmp_path / "ct", slices=10, matrix=48, attributes={
        "SpecificCharacterSet": "ISO_IR 192", "PatientName": b"M\xfcller^J\xfcrgen"})
    labels = _write_nifti(_liver_labels(series), tmp_path / "liver.nii.gz")
    result = encode_label_map(series.directory, labels, "abdomen", tmp_path / "out")
    for path in (result.seg, result.rtstruct, result.sr):
        back = pydicom.dcmread(path)
        assert "PatientName" in back and back.PatientName == ""  # type 2: present, empty
        assert back.PatientID == "RES-001"
    dropped = [r for r in caplog.records if r.getMessage() == "result.source_value_dropped"]
    assert dropped and all(r.dn_fields == {"keyword": "PatientName"}  # type: ignore[attr-defined]
                           for r in dropped)
    assert "ller^J" not in caplog.text
