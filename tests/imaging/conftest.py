"""Small synthetic CT series written with pydicom, for series, selection and routing tests.

``anatomy(region, ...)`` draws a crude but physically scaled body cross-section per
slice (skull and brain, neck with airway and vertebra, chest with lungs and ribs,
abdomen with liver and spine); ``write_series`` writes any HU volume as single-frame
CT Image Storage files with full geometry.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

STUDY_UID = generate_uid()


def _ellipse(shape: tuple[int, int], spacing: float, cy: float, cx: float, ry: float,
             rx: float) -> np.ndarray:
    """Mask of an ellipse; centre and radii in mm relative to the image centre."""
    ny, nx = shape
    y = (np.arange(ny) - ny / 2) * spacing
    x = (np.arange(nx) - nx / 2) * spacing
    yy, xx = np.meshgrid(y, x, indexing="ij")
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def anatomy_slice(kind: str, shape: tuple[int, int], spacing: float,
                  rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """One axial slice of a crude body region in HU (air -1000 outside)."""
    img = np.full(shape, -1000.0)
    e = lambda cy, cx, ry, rx: _ellipse(shape, spacing, cy, cx, ry * scale, rx * scale)  # noqa: E731
    if kind == "head":
        img[e(0, 0, 95, 78)] = 30  # scalp
        img[e(0, 0, 90, 73)] = 1200  # skull
        img[e(0, 0, 83, 66)] = 35  # brain
        img[e(0, 0, 10, 8)] = 5  # ventricle
    elif kind == "neck":
        img[e(0, 0, 60, 65)] = 40
        img[e(25, 0, 15, 15)] = 700  # vertebra
        img[e(-20, 0, 9, 11)] = -1000  # airway
        img[e(-5, -35, 12, 10)] = 50  # muscles / glands
    elif kind == "jaw":
        img[e(0, 0, 70, 70)] = 40
        img[e(25, 0, 15, 15)] = 700
        m = e(-30, 0, 38, 50) & ~e(-25, 0, 30, 42)
        img[m] = 1300  # mandible arch
        img[e(-15, 0, 6, 8)] = -1000  # pharynx
    elif kind == "chest":
        img[e(0, 0, 120, 165)] = 30
        img[e(5, -70, 75, 55)] = -850  # lungs
        img[e(5, 70, 75, 55)] = -850
        img[e(85, 0, 18, 18)] = 700  # spine
        ring = e(0, 0, 112, 157) & ~e(0, 0, 106, 151)
        img[ring & (rng.random(shape) < 0.3)] = 600  # ribs
        img[e(-10, 10, 45, 40)] = 45  # heart
    elif kind == "abdomen":
        img[e(0, 0, 115, 160)] = -90  # fat
        img[e(0, 0, 105, 150)] = 35  # muscle / bowel
        img[e(-5, -60, 70, 70)] = 60  # liver
        img[e(80, 0, 20, 20)] = 700  # spine
        img[e(20, 60, 25, 30)] = -600  # bowel gas
        img[e(-30, 40, 12, 15)] = 200  # aorta/contrast
    elif kind == "pelvis":
        img[e(0, 0, 110, 170)] = 30
        img[e(20, -90, 35, 30)] = 700
        img[e(20, 90, 35, 30)] = 700
    else:
        raise ValueError(kind)
    img += rng.normal(0, 5, shape)
    img[img < -1000] = -1000
    return img


REGION_LAYOUT: dict[str, list[tuple[str, float]]] = {
    # (slice kind, fraction of slices), listed inferior to superior.
    "head": [("head", 1.0)],
    "headneck": [("neck", 0.6), ("jaw", 0.15), ("head", 0.25)],
    "chest": [("chest", 1.0)],
    "abdomen": [("abdomen", 1.0)],
    "pelvis": [("pelvis", 1.0)],
}


def anatomy(region: str, slices: int = 40, matrix: int = 96, seed: int = 0,
            fov_mm: float = 400.0) -> np.ndarray:
    """A synthetic HU volume ``[z, y, x]`` (slice 0 inferior) of one body region."""
    rng = np.random.default_rng(seed)
    spacing = fov_mm / matrix
    kinds: list[str] = []
    for kind, frac in REGION_LAYOUT[region]:
        kinds += [kind] * round(frac * slices)
    kinds = (kinds + [kinds[-1]] * slices)[:slices]
    if region == "head":
        # the skull narrows towards the vertex
        return np.stack([
            anatomy_slice(k, (matrix, matrix), spacing, rng,
                          scale=float(np.sqrt(max(0.25, 1 - (i / slices) ** 2 * 0.7))))
            for i, k in enumerate(kinds)
        ]).astype(np.float32)
    return np.stack(
        [anatomy_slice(k, (matrix, matrix), spacing, rng) for k in kinds]
    ).astype(np.float32)


def write_series(
    out_dir: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0),
    positions: Sequence[float] | None = None,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin_xy: tuple[float, float] = (-100.0, -100.0),
    series_uid: str | None = None,
    study_uid: str = STUDY_UID,
    series_number: int = 2,
    description: str = "",
    kernel: str | None = "B30f",
    thickness: float | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    body_part: str | None = None,
    study_description: str | None = None,
    protocol: str | None = None,
    contrast: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_order: str = "ascending",
    extra: dict[str, Any] | None = None,
    tilt_shift_mm: float = 0.0,
    per_slice: Sequence[dict[str, Any]] | None = None,
) -> list[Path]:
    """Write ``hu`` as CT slices; slice k is at ``positions[k]`` along the normal."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid(entropy_srcs=[study_uid, "frame"])
    nz, ny, nx = hu.shape
    dz, dy, dx = spacing
    if positions is None:
        positions = [k * dz for k in range(nz)]
    row = np.asarray(iop[:3], float)
    col = np.asarray(iop[3:], float)
    normal = np.cross(row, col)
    base = row * origin_xy[0] + col * origin_xy[1]
    stored = np.round(hu + 1024).astype(np.int32)
    stored = np.clip(stored, 0, 4095).astype(np.uint16)
    order = list(range(nz))
    if instance_order == "descending":
        order = order[::-1]
    paths: list[Path] = []
    for number, k in enumerate(order, start=1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid(entropy_srcs=[series_uid, str(k), str(number)])
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "SYN0001"
        ds.StudyDate = "20260101"
        ds.SeriesNumber = series_number
        ds.InstanceNumber = number
        ds.ImageType = list(image_type)
        if description:
            ds.SeriesDescription = description
        if study_description:
            ds.StudyDescription = study_description
        if protocol:
            ds.ProtocolName = protocol
        if body_part:
            ds.BodyPartExamined = body_part
        if contrast:
            ds.ContrastBolusAgent = contrast
        if kernel is not None:
            ds.ConvolutionKernel = kernel
        ds.SliceThickness = thickness if thickness is not None else dz
        pos = base + normal * positions[k] + col * (tilt_shift_mm * k)
        ds.ImagePositionPatient = [float(round(v, 4)) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [dy, dx]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.KVP = 120
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        if per_slice is not None:
            for key, value in per_slice[k].items():
                setattr(ds, key, value)
        ds.PixelData = stored[k].tobytes()
        if transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = out_dir / f"{series_uid[-12:]}_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def series_writer() -> Any:
    """The :func:`write_series` helper, as a fixture."""
    return write_series


@functools.lru_cache(maxsize=8)
def phantom_case(region: str, seed: int = 0, matrix: int = 128) -> Any:
    """A phantom from ``dicomnode.phantoms`` (cached: generating one takes a second or two)."""
    from dicomnode.phantoms.phantom import make_phantom

    return make_phantom(region, seed, matrix=matrix)


def write_phantom_case(out_dir: Path, region: str, seed: int = 0, matrix: int = 128,
                       **kw: Any) -> list[Path]:
    """Write a cached phantom as CT slice files; keyword arguments go to write_phantom."""
    from dicomnode.phantoms.phantom import write_phantom

    paths = write_phantom(phantom_case(region, seed, matrix), out_dir, **kw)
    return [p for p in paths if p.suffix == ".dcm"]
