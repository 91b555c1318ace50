"""Tests for dicomnode.imaging.selection: grouping a study and picking the right series."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.imaging.selection import (
    SelectionPreferences,
    describe_study,
    kernel_class,
    select_series,
)
from tests.factories import ct_slice
from tests.imaging.conftest import STUDY_UID, anatomy, write_series


def _dose_report(path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 999
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def messy_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Localizer, thin bone, thick soft, thin soft, coronal reformat, dose report."""
    root = tmp_path_factory.mktemp("study")
    hu = anatomy("abdomen", slices=40, matrix=48, seed=1)
    uids = {}
    uids["scout"] = generate_uid()
    write_series(root / "scout", hu[:1], series_uid=uids["scout"], series_number=1,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), iop=(1, 0, 0, 0, 0, -1),
                 description="Topogram 0.6 T20f")
    uids["thin_bone"] = generate_uid()
    write_series(root / "thin_bone", hu, series_uid=uids["thin_bone"], series_number=3,
                 spacing=(1.0, 1, 1), kernel="B70f", description="Abdomen 1.0 B70f")
    uids["thick_soft"] = generate_uid()
    write_series(root / "thick_soft", hu[::5], series_uid=uids["thick_soft"], series_number=2,
                 spacing=(5.0, 1, 1), kernel="B30f", description="Abdomen 5.0 B30f")
    uids["thin_soft"] = generate_uid()
    write_series(root / "thin_soft", hu, series_uid=uids["thin_soft"], series_number=4,
                 spacing=(1.0, 1, 1), kernel="B30f", description="Abdomen 1.0 B30f")
    uids["coronal"] = generate_uid()
    write_series(root / "cor", hu[:20], series_uid=uids["coronal"], series_number=5,
                 iop=(1, 0, 0, 0, 0, -1), spacing=(2.0, 1, 1),
                 image_type=("DERIVED", "SECONDARY", "MPR"), description="Cor MPR")
    _dose_report(root / "dose.dcm")
    (root / "notes.txt").write_text("not dicom")
    uids["root"] = str(root)
    return uids


def test_describe_study_groups_and_describes(messy_study: dict[str, str]) -> None:
    infos = describe_study([Path(messy_study["root"])])
    by_uid = {i.series_instance_uid: i for i in infos}
    assert len(infos) == 6
    assert [i.series_number for i in infos] == [1, 2, 3, 4, 5, 999]
    scout = by_uid[messy_study["scout"]]
    assert scout.is_localizer and not scout.usable_as_ct_volume
    thin = by_uid[messy_study["thin_soft"]]
    assert thin.orientation == "axial" and thin.count == 40 and thin.kernel_class == "soft"
    assert thin.coverage_mm == pytest.approx(39.0) and thin.slice_step == pytest.approx(1.0)
    assert by_uid[messy_study["thin_bone"]].kernel_class == "bone"
    assert by_uid[messy_study["coronal"]].orientation == "coronal"
    dose = next(i for i in infos if i.modality == "SR")
    assert not dose.usable_as_ct_volume
    assert thin.to_dict()["series_description"] == "Abdomen 1.0 B30f"


def test_default_selection_picks_thin_soft_tissue(messy_study: dict[str, str]) -> None:
    choice = select_series(describe_study([Path(messy_study["root"])]))
    assert choice.series is not None
    assert choice.series.series_instance_uid == messy_study["thin_soft"]
    assert "B30f" in choice.reason and "1 mm" in choice.reason
    rej = choice.rejected
    assert rej[messy_study["scout"]] == "localizer"
    assert "coronal" in rej[messy_study["coronal"]]
    assert "kernel bone" in rej[messy_study["thin_bone"]]
    assert "8 slices, at least 10" in rej[messy_study["thick_soft"]]
    assert any("not CT" in v for v in rej.values())
    assert choice.to_dict()["series_instance_uid"] == messy_study["thin_soft"]


def test_configurable_preferences(messy_study: dict[str, str]) -> None:
    infos = describe_study([Path(messy_study["root"])])
    bone_first = SelectionPreferences(kernels=["bone", "soft"])
    assert select_series(infos, bone_first).series.series_instance_uid == messy_study[
        "thin_bone"]  # type: ignore[union-attr]
    thick_only = SelectionPreferences(min_slice_thickness_mm=3.0, min_slices=5)
    assert select_series(infos, thick_only).series.series_instance_uid == messy_study[
        "thick_soft"]  # type: ignore[union-attr]
    cor = SelectionPreferences(orientation="coronal", prefer_original=False)
    assert select_series(infos, cor).series.series_instance_uid == messy_study[
        "coronal"]  # type: ignore[union-attr]
    too_long = SelectionPreferences(min_coverage_mm=500)
    choice = select_series(infos, too_long)
    assert choice.series is None and "no usable CT series" in choice.reason
    assert "coverage" in choice.rejected[messy_study["thin_soft"]]


def test_series_with_gap_ranks_below_clean_one(tmp_path: Path) -> None:
    hu = anatomy("chest", slices=50, matrix=32)
    clean, gappy = generate_uid(), generate_uid()
    keep = [k for k in range(50) if not 10 <= k < 15]
    write_series(tmp_path / "g", hu[keep], series_uid=gappy, series_number=2,
                 spacing=(1.0, 1, 1), positions=[k * 1.0 for k in keep])
    write_series(tmp_path / "c", hu, series_uid=clean, series_number=3, spacing=(2.0, 1, 1))
    choice = select_series(describe_study([tmp_path]))
    assert choice.series is not None and choice.series.series_instance_uid == clean
    assert choice.rejected[gappy] == "ranked lower: series warnings"


def test_no_usable_series(tmp_path: Path) -> None:
    _dose_report(tmp_path / "dose.dcm")
    choice = select_series(describe_study([tmp_path]))
    assert choice.series is None and "no usable CT series" in choice.reason
    assert select_series([]).reason == "no series in the study"


def test_kernel_classes() -> None:
    assert kernel_class("B30f") == "soft"
    assert kernel_class(["Br40d", "3"]) == "soft"
    assert kernel_class("STANDARD") == "soft"
    assert kernel_class("BONE") == "bone"
    assert kernel_class("B70f") == "bone"
    assert kernel_class("LUNG") == "lung"
    assert kernel_class("FC08") == "soft"
    assert kernel_class("Hr38h") == "soft"
    assert kernel_class("Br64d") == "bone"
    assert kernel_class("FC52") == "lung"
    assert kernel_class(None) == "unknown"
    assert kernel_class("XYZ") == "unknown"


def test_preferences_validation() -> None:
    with pytest.raises(ValueError, match="'orientation'"):
        SelectionPreferences(orientation="diagonal")
    with pytest.raises(ValueError, match="'kernels'"):
        SelectionPreferences(kernels=["sharp"])
    with pytest.raises(ValueError, match="'max_slice_thickness_mm'"):
        SelectionPreferences(min_slice_thickness_mm=3, max_slice_thickness_mm=2)
    with pytest.raises(ValueError, match="'selection' key 'colour'"):
        SelectionPreferences.from_dict({"colour": "red"})
    assert SelectionPreferences.from_dict({"min_slices": 4}).min_slices == 4
    with pytest.raises(ValueError, match="'paths'"):
        describe_study([Path("/nonexistent/study")])



def test_a_series_number_that_is_not_a_number_does_not_stop_the_description(
        tmp_path: Path) -> None:
    # A mutated SeriesNumber ("\x19", seen in the fuzz campaign) crashed the routing job.
    ds = ct_slice(generate_uid(), generate_uid(), 0.0, 0)
    ds.SeriesNumber = 12
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    element = b"\x20\x00\x11\x00IS\x02\x0012"
    assert element in raw
    path.write_bytes(raw.replace(element, b"\x20\x00\x11\x00IS\x02\x00\x19 "))
    with pytest.warns(UserWarning):
        (info,) = describe_study([path])
    assert info.series_number is None
    assert info.series_instance_uid == ds.SeriesInstanceUID
