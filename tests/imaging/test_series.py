"""Tests for dicomnode.imaging.series: ordering, geometry, checks, compressed pixels."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import UID, JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from dicomnode.imaging.series import (
    IssueCode,
    SeriesError,
    check_series,
    load_series,
    orientation_label,
    read_header,
)
from tests.imaging.conftest import anatomy, phantom_case, write_phantom_case, write_series


@pytest.fixture(scope="module")
def hu() -> np.ndarray:
    return anatomy("headneck", slices=24, matrix=64, seed=3)


def _expected(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.round(hu + 1024), 0, 4095).astype(np.int16) - 1024


def test_volume_geometry_and_values(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path, hu, spacing=(2.5, 0.8, 0.7), origin_xy=(-30.0, -40.0))
    vol = load_series(paths)
    assert vol.hu.dtype == np.int16
    np.testing.assert_array_equal(vol.hu, _expected(hu))
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.origin == pytest.approx((-30.0, -40.0, 0.0))
    np.testing.assert_allclose(vol.direction, np.eye(3))
    assert vol.extent_mm == pytest.approx(2.5 * 23)
    assert len(vol.sop_instance_uids) == 24
    assert [ds.SOPInstanceUID for ds in vol.datasets] == vol.sop_instance_uids
    assert all("PixelData" not in ds for ds in vol.datasets)
    assert vol.check.ok and not vol.check.issues
    # affine maps the last voxel's index to its IPP
    last = vol.affine() @ np.array([0, 0, 23, 1.0])
    assert last[:3] == pytest.approx([float(v) for v in vol.datasets[-1].ImagePositionPatient])


def test_reversed_and_shuffled_order_give_identical_volume(tmp_path: Path, hu: np.ndarray) -> None:
    ref = load_series(write_series(tmp_path / "a", hu))
    rev_paths = write_series(tmp_path / "b", hu, instance_order="descending")
    rev = load_series(rev_paths)
    shuffled = list(rev_paths)
    random.Random(7).shuffle(shuffled)
    shuf = load_series(shuffled)
    for vol in (rev, shuf):
        np.testing.assert_array_equal(vol.hu, ref.hu)
        assert vol.spacing == ref.spacing and vol.origin == ref.origin
    # Instance Number runs the other way, slices still sort by position
    assert int(rev.datasets[0].InstanceNumber) == 24
    assert rev.sop_instance_uids == shuf.sop_instance_uids


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_transfer_syntax_gives_identical_volume(
    tmp_path: Path, hu: np.ndarray, syntax: UID
) -> None:
    encoder = get_encoder(syntax)
    if not encoder.is_available:
        pytest.skip(f"no encoder for {syntax.name} installed (decoding is tested with dcmtk)")
    ref = load_series(write_series(tmp_path / "raw", hu[:6]))
    paths = write_series(tmp_path / "c", hu[:6], transfer_syntax=syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    vol = load_series(paths)
    np.testing.assert_array_equal(vol.hu, ref.hu)


def test_dcmtk_jpeg_ls_file_decodes(tmp_path: Path, hu: np.ndarray) -> None:
    """A JPEG-LS file made by another encoder (dcmtk) decodes to the same HU."""
    raw = write_series(tmp_path / "raw", hu[:4])
    out = tmp_path / "jls"
    out.mkdir()
    converted = []
    for p in raw:
        q = out / p.name
        subprocess.run(["dcmcjpls", "+el", str(p), str(q)], check=True, capture_output=True)
        converted.append(q)
    np.testing.assert_array_equal(load_series(converted).hu, load_series(raw).hu)


def test_headers_only_then_pixels(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path, hu[:8])
    headers = [read_header(p) for p in paths]
    assert all("PixelData" not in h for h in headers)
    np.testing.assert_array_equal(load_series(headers).hu, load_series(paths).hu)


def test_gap_detected(tmp_path: Path, hu: np.ndarray) -> None:
    positions = [k * 3.0 for k in range(24)]
    keep = [k for k in range(24) if k not in (10, 11, 12)]
    paths = write_series(tmp_path, hu[keep], positions=[positions[k] for k in keep])
    check = check_series(paths)
    assert check.ok and check.has(IssueCode.GAP)
    gap = next(i for i in check.issues if i.code is IssueCode.GAP)
    assert gap.details["missing_slices"] == 3
    assert "3 slice(s) missing" in gap.message
    vol = load_series(paths)
    assert vol.spacing[0] == pytest.approx(3.0)
    assert vol.positions[10] - vol.positions[9] == pytest.approx(12.0)


def test_non_uniform_spacing_detected(tmp_path: Path, hu: np.ndarray) -> None:
    positions = np.cumsum([0] + [3.0 if k % 2 else 3.8 for k in range(11)])
    check = check_series(write_series(tmp_path, hu[:12], positions=list(positions)))
    assert check.has(IssueCode.NON_UNIFORM_SPACING) and not check.has(IssueCode.GAP)


def test_duplicate_positions_two_phases(tmp_path: Path, hu: np.ndarray) -> None:
    sub = hu[:10]
    both = np.concatenate([sub, sub + 100])
    positions = [k * 3.0 for k in range(10)] * 2
    per_slice = [{"AcquisitionNumber": 1}] * 10 + [{"AcquisitionNumber": 2}] * 10
    paths = write_series(tmp_path, both, positions=positions, per_slice=per_slice)
    assert check_series(paths).has(IssueCode.DUPLICATE_POSITIONS)
    vol = load_series(paths)
    assert vol.shape[0] == 10
    np.testing.assert_array_equal(vol.hu, _expected(sub))
    msgs = " ".join(vol.check.reasons())
    assert "AcquisitionNumber" in msgs


def test_duplicate_positions_without_phase_tag(tmp_path: Path, hu: np.ndarray) -> None:
    sub = hu[:5]
    paths = write_series(tmp_path, np.concatenate([sub, sub]), positions=[0, 3, 6, 9, 12] * 2)
    vol = load_series(paths)
    assert vol.shape[0] == 5
    assert vol.check.has(IssueCode.DUPLICATE_POSITIONS)


def test_gantry_tilt_detected(tmp_path: Path, hu: np.ndarray) -> None:
    # 3 mm steps along z with a 0.5 mm shift along y per slice: about 9.5 degrees
    check = check_series(write_series(tmp_path, hu[:10], tilt_shift_mm=0.5))
    tilt = next(i for i in check.issues if i.code is IssueCode.GANTRY_TILT)
    assert tilt.details["geometric_tilt_deg"] == pytest.approx(9.46, abs=0.1)


def test_localizer_is_an_error(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path, hu[:1], image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with pytest.raises(SeriesError) as exc:
        load_series(paths)
    assert exc.value.check is not None and exc.value.check.has(IssueCode.LOCALIZER)
    assert "localizer" in str(exc.value)


def test_localizer_inside_series_left_out(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path, hu[:8])
    scout = write_series(tmp_path / "s", hu[:1], series_uid=str(read_header(paths[0])
                         .SeriesInstanceUID), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                         iop=(0, 1, 0, 0, 0, -1))
    vol = load_series(paths + scout)
    assert vol.shape[0] == 8 and vol.check.has(IssueCode.LOCALIZER) and vol.check.ok


def test_mixed_orientation_is_an_error(tmp_path: Path, hu: np.ndarray) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    a = write_series(tmp_path / "a", hu[:5], series_uid=uid)
    b = write_series(tmp_path / "b", hu[:5, :, :], series_uid=uid, iop=(1, 0, 0, 0, 0, -1))
    check = check_series(a + b)
    assert not check.ok and check.has(IssueCode.MIXED_ORIENTATION)
    assert "axial" in check.reasons()[0] and "coronal" in check.reasons()[0]
    with pytest.raises(SeriesError):
        load_series(a + b)


def test_too_few_slices(tmp_path: Path, hu: np.ndarray) -> None:
    with pytest.raises(SeriesError, match="at least 3"):
        load_series(write_series(tmp_path, hu[:2]))


def test_fractional_rescale_gives_float(tmp_path: Path, hu: np.ndarray) -> None:
    paths = write_series(tmp_path, hu[:4], extra={"RescaleSlope": 0.5,
                                                 "RescaleIntercept": -1024.25})
    vol = load_series(paths)
    assert vol.hu.dtype == np.float32
    stored = np.clip(np.round(hu[:4] + 1024), 0, 4095)
    np.testing.assert_allclose(vol.hu, stored * 0.5 - 1024.25)


def test_sagittal_series_geometry(tmp_path: Path, hu: np.ndarray) -> None:
    iop = (0, 1, 0, 0, 0, -1)
    vol = load_series(write_series(tmp_path, hu[:6], iop=iop))
    np.testing.assert_allclose(vol.normal, [-1, 0, 0], atol=1e-9)
    assert orientation_label(iop) == "sagittal"
    assert orientation_label((1, 0, 0, 0, 0, -1)) == "coronal"
    assert orientation_label((1, 0, 0, 0, 0.6, 0.8)) == "oblique"


def test_bad_inputs_raise_value_error(tmp_path: Path) -> None:
    junk = tmp_path / "x.txt"
    junk.write_text("not dicom")
    with pytest.raises(ValueError, match="'path'"):
        read_header(junk)
    with pytest.raises(ValueError, match="'sources'"):
        load_series([42])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'min_slices'"):
        check_series([], min_slices=0)


# --- on the phantoms of dicomnode.phantoms -------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [{"slice_order": "descending"}, {"slice_order": "shuffled"}, {"transfer_syntax": "rle"},
     {"transfer_syntax": "jpegls", "slice_order": "shuffled"}],
)
def test_phantom_orders_and_syntaxes_give_identical_volume(tmp_path: Path,
                                                           variant: dict[str, str]) -> None:
    phantom = phantom_case("head")
    ref = load_series(write_phantom_case(tmp_path / "ref", "head"))
    np.testing.assert_array_equal(ref.hu, phantom.hu)
    assert ref.spacing == pytest.approx(tuple(phantom.spacing), abs=1e-4)
    assert ref.origin == pytest.approx(tuple(phantom.origin), abs=1e-3)
    paths = write_phantom_case(tmp_path / "v", "head", **variant)
    shuffled = list(paths)
    random.Random(3).shuffle(shuffled)
    vol = load_series(shuffled)
    np.testing.assert_array_equal(vol.hu, ref.hu)
    assert vol.spacing == ref.spacing and vol.origin == ref.origin
    assert not vol.check.issues


def test_phantom_gap_detected(tmp_path: Path) -> None:
    paths = write_phantom_case(tmp_path, "head")
    by_z = sorted(paths, key=lambda p: float(read_header(p).ImagePositionPatient[2]))
    for p in by_z[12:14]:
        p.unlink()
    kept = [p for p in paths if p.exists()]
    check = check_series(kept)
    gap = next(i for i in check.issues if i.code is IssueCode.GAP)
    assert gap.details["missing_slices"] == 2
    vol = load_series(kept)
    assert vol.shape[0] == len(by_z) - 2


def test_phantom_duplicate_positions_detected(tmp_path: Path) -> None:
    paths = write_phantom_case(tmp_path / "a", "head")
    phase2 = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.AcquisitionNumber = 2
        ds.InstanceNumber = int(ds.InstanceNumber) + len(paths)
        q = tmp_path / "b" / p.name
        q.parent.mkdir(exist_ok=True)
        ds.save_as(q)
        phase2.append(q)
    check = check_series(paths + phase2)
    dup = next(i for i in check.issues if i.code is IssueCode.DUPLICATE_POSITIONS)
    assert dup.details["duplicates"] == len(paths)
    vol = load_series(paths + phase2)
    np.testing.assert_array_equal(vol.hu, phantom_case("head").hu)
    assert set(vol.sop_instance_uids) == {str(read_header(p).SOPInstanceUID) for p in paths}
