"""One CT series to a 3D volume in Hounsfield units, with the checks that say whether to trust it.

Slices are ordered by their position along the slice normal (the cross product of the
two Image Orientation (Patient) cosines), never by Instance Number, so reversed or
shuffled sending order gives the same volume. The checks that run on headers alone
(:func:`check_series`) are cheap enough to run on every series of a study before any
pixel data is read; :func:`load_series` then decodes only the chosen series through
pydicom's pixel backends (native RLE, pylibjpeg or GDCM for JPEG, JPEG-LS, JPEG 2000).

Conventions
-----------
- ``Volume.hu`` is indexed ``[z, y, x]``: slice, row, column.
- ``Volume.spacing`` is ``(dz, dy, dx)`` in mm: slice spacing along the normal, the
  spacing between rows, the spacing between columns (DICOM Pixel Spacing order).
- ``Volume.origin`` is the Image Position (Patient) of slice 0, ``(x, y, z)`` in the
  DICOM patient coordinate system (LPS).
- ``Volume.direction`` is a 3x3 matrix whose rows are the row cosine (the direction in
  which the column index grows), the column cosine and the slice normal. Slice 0 is the
  one with the smallest position along the normal (the most inferior one for a standard
  axial series).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.logs import fields

log = logging.getLogger(__name__)

#: Relative deviation from the median slice step that counts as non-uniform spacing.
NON_UNIFORM_TOLERANCE = 0.1
#: A step larger than this multiple of the median step means missing slices.
GAP_FACTOR = 1.5
#: Angle (degrees) between the slice normal and the slice stacking direction that counts
#: as gantry tilt.
TILT_TOLERANCE_DEG = 0.5
#: Two orientation cosines that differ by less than this count as the same orientation.
ORIENTATION_TOLERANCE = 1e-3
#: Positions closer than this (mm) along the normal count as duplicates.
DUPLICATE_TOLERANCE_MM = 0.01

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


class IssueCode(StrEnum):
    """What a series check can find."""

    LOCALIZER = "localizer"
    MIXED_ORIENTATION = "mixed_orientation"
    NON_UNIFORM_SPACING = "non_uniform_spacing"
    GAP = "gap"
    DUPLICATE_POSITIONS = "duplicate_positions"
    GANTRY_TILT = "gantry_tilt"
    TOO_FEW_SLICES = "too_few_slices"
    MISSING_GEOMETRY = "missing_geometry"
    MIXED_MATRIX = "mixed_matrix"
    MIXED_SERIES = "mixed_series"
    NOT_CT = "not_ct"
    MULTIFRAME = "multiframe"


class Severity(StrEnum):
    """``error``: no trustworthy volume can be built; ``warning``: it can, with care."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class SeriesIssue:
    """One finding of a series check, with a reason a person can read."""

    code: IssueCode
    severity: Severity
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "code": self.code.value,
            "severity": self.severity.value,
            "message": self.message,
            "details": self.details,
        }


@dataclass
class SeriesCheck:
    """The findings of :func:`check_series` for one series."""

    series_instance_uid: str
    issues: list[SeriesIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no finding prevents building a volume."""
        return not any(i.severity is Severity.ERROR for i in self.issues)

    @property
    def errors(self) -> list[SeriesIssue]:
        """The findings that prevent building a volume."""
        return [i for i in self.issues if i.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[SeriesIssue]:
        """The findings that allow a volume but deserve attention."""
        return [i for i in self.issues if i.severity is Severity.WARNING]

    def has(self, code: IssueCode | str) -> bool:
        """Return whether a finding with this code was made."""
        code = IssueCode(code)
        return any(i.code is code for i in self.issues)

    def reasons(self) -> list[str]:
        """Return the human-readable messages, errors first."""
        return [i.message for i in self.errors] + [i.message for i in self.warnings]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "ok": self.ok,
            "issues": [i.to_dict() for i in self.issues],
        }


class SeriesError(ValueError):
    """A series from which no trustworthy volume can be built.

    ``check`` holds every finding, so a caller can record the reasons.
    """

    def __init__(self, message: str, check: SeriesCheck | None = None) -> None:
        super().__init__(message)
        self.check = check


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its geometry and its source headers.

    Attributes
    ----------
    hu : numpy.ndarray
        ``[z, y, x]`` int16 (integer rescale) or float32 (fractional rescale).
    spacing : tuple of float
        ``(dz, dy, dx)`` in mm; ``dz`` is the median step along the normal.
    origin : tuple of float
        Image Position (Patient) of slice 0, ``(x, y, z)``.
    direction : numpy.ndarray
        3x3; rows are the row cosine, the column cosine and the slice normal.
    positions : numpy.ndarray
        Position of each slice along the normal (mm), ascending; differs from
        ``origin + k*dz`` only where a gap or non-uniform spacing was reported.
    sop_instance_uids : list of str
        In slice order.
    datasets : list of pydicom.dataset.Dataset
        The source headers in slice order; pixel data removed from the files this module
        read (datasets passed in with their pixels are returned unchanged).
    check : SeriesCheck
        What was found while building the volume.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    positions: np.ndarray
    sop_instance_uids: list[str]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    datasets: list[Dataset]
    check: SeriesCheck

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(z, y, x)``."""
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def image_orientation(self) -> list[float]:
        """Image Orientation (Patient): the row cosine then the column cosine."""
        return [float(v) for v in np.concatenate([self.direction[0], self.direction[1]])]

    @property
    def normal(self) -> np.ndarray:
        """The slice normal (unit vector)."""
        return np.asarray(self.direction[2])

    def affine(self) -> np.ndarray:
        """Return the 4x4 matrix from voxel index ``(x, y, z, 1)`` to LPS mm.

        Returns
        -------
        numpy.ndarray
            Column ``k`` is the step in patient space for one voxel along index ``k``
            (column, row, slice); column 3 holds the origin.
        """
        dz, dy, dx = self.spacing
        out = np.eye(4)
        out[:3, 0] = self.direction[0] * dx
        out[:3, 1] = self.direction[1] * dy
        out[:3, 2] = self.direction[2] * dz
        out[:3, 3] = self.origin
        return out

    @property
    def extent_mm(self) -> float:
        """Coverage along the normal, from the first to the last slice centre."""
        return float(self.positions[-1] - self.positions[0]) if len(self.positions) else 0.0


# ---------------------------------------------------------------------------------------
# Reading


def read_header(path: Path | str) -> Dataset:
    """Read one file's header without its pixel data.

    Parameters
    ----------
    path : Path or str
        A DICOM Part 10 file (or a bare dataset, read with ``force``).

    Returns
    -------
    pydicom.dataset.Dataset
        With ``filename`` set, so pixels can be read later.

    Raises
    ------
    ValueError
        If the file is not DICOM.
    """
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise ValueError(f"Invalid 'path' value '{path}' - not a DICOM file: {exc}") from exc


def _as_datasets(sources: Iterable[Path | str | Dataset], pixels: bool) -> list[Dataset]:
    out: list[Dataset] = []
    for src in sources:
        if isinstance(src, Dataset):
            if pixels and "PixelData" not in src:
                filename = getattr(src, "filename", None)
                if not filename:
                    raise ValueError(
                        "Invalid 'sources' value - a dataset without pixel data and without "
                        "a filename to read them from"
                    )
                src = pydicom.dcmread(str(filename))
            out.append(src)
        elif isinstance(src, (str, Path)):
            if pixels:
                try:
                    out.append(pydicom.dcmread(str(src)))
                except InvalidDicomError as exc:
                    raise ValueError(
                        f"Invalid 'path' value '{src}' - not a DICOM file: {exc}"
                    ) from exc
            else:
                out.append(read_header(src))
        else:
            raise ValueError(
                f"Invalid 'sources' value '{src!r}' - expected a path or a pydicom Dataset"
            )
    return out


# ---------------------------------------------------------------------------------------
# Header checks


def is_localizer(ds: Dataset) -> bool:
    """Return whether an instance is a localizer (scout, topogram, surview).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset

    Returns
    -------
    bool
    """
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return True
    text = " ".join(
        str(ds.get(k, "") or "") for k in ("SeriesDescription", "ImageComments")
    ).upper()
    return any(w in text for w in ("SCOUT", "TOPOGRAM", "SURVIEW", "LOCALIZER", "SCANOGRAM"))


def _orientation(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    v = np.asarray([float(x) for x in iop], dtype=float)
    row, col = v[:3], v[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        return None
    return v


def _position(ds: Dataset) -> np.ndarray | None:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        return None
    return np.asarray([float(x) for x in ipp], dtype=float)


def direction_from_iop(iop: Sequence[float]) -> np.ndarray:
    """Return the 3x3 direction matrix (row cosine, column cosine, normal) for an IOP.

    Parameters
    ----------
    iop : sequence of 6 float
        Image Orientation (Patient).

    Returns
    -------
    numpy.ndarray
    """
    if len(iop) != 6:
        raise ValueError(f"Invalid 'iop' value '{list(iop)}' - must have 6 values")
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    row = row / np.linalg.norm(row)
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return np.stack([row, col, normal / np.linalg.norm(normal)])


def orientation_label(iop: Sequence[float] | None) -> str:
    """Name the plane of an Image Orientation (Patient).

    Parameters
    ----------
    iop : sequence of 6 float, or None

    Returns
    -------
    str
        ``axial``, ``coronal``, ``sagittal``, ``oblique`` (normal more than 30 degrees off
        every axis) or ``unknown``.
    """
    if iop is None or len(iop) != 6:
        return "unknown"
    normal = direction_from_iop(iop)[2]
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < np.cos(np.deg2rad(30.0)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass
class _Ordered:
    datasets: list[Dataset]
    positions: np.ndarray
    direction: np.ndarray


def _order(datasets: list[Dataset], direction: np.ndarray) -> _Ordered:
    pos = np.array([_position(ds) for ds in datasets], dtype=float)
    dist = pos @ direction[2]
    # Ties (duplicate positions) keep a stable order by Instance Number.
    inst = np.array([int(ds.get("InstanceNumber") or 0) for ds in datasets])
    order = np.lexsort((inst, dist))
    return _Ordered([datasets[i] for i in order], dist[order], direction)


def check_series(
    sources: Iterable[Path | str | Dataset], *, min_slices: int = 3
) -> SeriesCheck:
    """Check one series from its headers alone.

    Parameters
    ----------
    sources : iterable of path or Dataset
        The instances of one series (headers are enough).
    min_slices : int
        Fewer (non-localizer) slices than this is an error.

    Returns
    -------
    SeriesCheck
    """
    datasets = _as_datasets(sources, pixels=False)
    check, _ = _check(datasets, min_slices=min_slices)
    return check


def _check(datasets: list[Dataset], *, min_slices: int) -> tuple[SeriesCheck, _Ordered | None]:
    if min_slices < 1:
        raise ValueError(f"Invalid 'min_slices' value '{min_slices}' - must be at least 1")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    check = SeriesCheck(series_instance_uid=sorted(uids)[0] if uids else "")
    add = check.issues.append
    if not datasets:
        add(SeriesIssue(IssueCode.TOO_FEW_SLICES, Severity.ERROR, "The series has no images"))
        return check, None
    if len(uids) > 1:
        add(SeriesIssue(
            IssueCode.MIXED_SERIES, Severity.ERROR,
            f"Instances of {len(uids)} different series were given as one series",
            {"series_instance_uids": sorted(uids)},
        ))
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if modalities != {"CT"}:
        add(SeriesIssue(
            IssueCode.NOT_CT, Severity.ERROR,
            f"Modality is {', '.join(sorted(m or '(empty)' for m in modalities))}, not CT",
        ))
    frames = max(int(ds.get("NumberOfFrames") or 1) for ds in datasets)
    if frames > 1:
        add(SeriesIssue(
            IssueCode.MULTIFRAME, Severity.ERROR,
            f"Multi-frame images ({frames} frames) are not supported; send single-frame CT",
        ))

    localizers = [ds for ds in datasets if is_localizer(ds)]
    slices = [ds for ds in datasets if not is_localizer(ds)]
    if localizers:
        sev = Severity.ERROR if not slices else Severity.WARNING
        msg = (
            "The series is a localizer (scout)"
            if not slices
            else f"{len(localizers)} localizer image(s) inside the series were left out"
        )
        add(SeriesIssue(IssueCode.LOCALIZER, sev, msg, {"count": len(localizers)}))
    if not slices:
        return check, None

    if len(slices) < min_slices:
        add(SeriesIssue(
            IssueCode.TOO_FEW_SLICES, Severity.ERROR,
            f"Only {len(slices)} slice(s); at least {min_slices} are needed for a volume",
            {"count": len(slices), "min_slices": min_slices},
        ))

    missing = [ds for ds in slices if _orientation(ds) is None or _position(ds) is None]
    if missing or any("PixelSpacing" not in ds for ds in slices):
        add(SeriesIssue(
            IssueCode.MISSING_GEOMETRY, Severity.ERROR,
            "Image Orientation/Position (Patient) or Pixel Spacing is missing on "
            f"{max(len(missing), 1)} image(s)",
        ))
        return check, None

    iops = np.array([_orientation(ds) for ds in slices])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOLERANCE:
        labels = sorted({orientation_label(list(v)) for v in iops})
        add(SeriesIssue(
            IssueCode.MIXED_ORIENTATION, Severity.ERROR,
            f"Images have different orientations ({', '.join(labels)})",
            {"orientations": labels},
        ))
        return check, None

    matrices = {
        (int(ds.Rows), int(ds.Columns), tuple(round(float(v), 4) for v in ds.PixelSpacing))
        for ds in slices
    }
    if len(matrices) > 1:
        add(SeriesIssue(
            IssueCode.MIXED_MATRIX, Severity.ERROR,
            f"Images differ in size or pixel spacing ({len(matrices)} variants)",
        ))

    direction = direction_from_iop(list(iops[0]))
    ordered = _order(slices, direction)
    steps = np.diff(ordered.positions)
    if len(steps) == 0:
        return check, ordered

    dup = steps < DUPLICATE_TOLERANCE_MM
    if dup.any():
        distinct = int((~dup).sum()) + 1
        add(SeriesIssue(
            IssueCode.DUPLICATE_POSITIONS, Severity.WARNING,
            f"{int(dup.sum())} slice(s) share a position with another slice "
            f"({distinct} distinct positions): several phases or acquisitions in one series",
            {"duplicates": int(dup.sum()), "distinct_positions": distinct},
        ))
    real = steps[~dup]
    if len(real):
        median = float(np.median(real))
        gaps = real > GAP_FACTOR * median
        if gaps.any():
            missing_n = int(sum(round(s / median) - 1 for s in real[gaps]))
            where = [float(round(ordered.positions[1:][~dup][i] - s, 2))
                     for i, s in zip(np.nonzero(gaps)[0], real[gaps], strict=True)]
            add(SeriesIssue(
                IssueCode.GAP, Severity.WARNING,
                f"{int(gaps.sum())} gap(s) larger than {GAP_FACTOR}x the median step of "
                f"{median:.2f} mm: about {missing_n} slice(s) missing",
                {"gaps": int(gaps.sum()), "missing_slices": missing_n,
                 "median_step_mm": round(median, 4), "after_position_mm": where,
                 "largest_step_mm": round(float(real.max()), 3)},
            ))
        off = np.abs(real[~gaps] - median) > max(NON_UNIFORM_TOLERANCE * median, 0.01)
        if off.any():
            add(SeriesIssue(
                IssueCode.NON_UNIFORM_SPACING, Severity.WARNING,
                f"Slice steps vary from {real.min():.2f} to {real.max():.2f} mm around a "
                f"median of {median:.2f} mm",
                {"min_step_mm": round(float(real.min()), 4),
                 "max_step_mm": round(float(real.max()), 4),
                 "median_step_mm": round(median, 4)},
            ))

    tilt_tag = max(abs(float(ds.get("GantryDetectorTilt") or 0.0)) for ds in slices)
    stack = _position(ordered.datasets[-1]) - _position(ordered.datasets[0])  # type: ignore[operator]
    tilt = 0.0
    if np.linalg.norm(stack) > 1e-6:
        cosang = abs(float(stack @ direction[2])) / float(np.linalg.norm(stack))
        tilt = float(np.degrees(np.arccos(min(1.0, cosang))))
    if tilt > TILT_TOLERANCE_DEG or tilt_tag > TILT_TOLERANCE_DEG:
        add(SeriesIssue(
            IssueCode.GANTRY_TILT, Severity.WARNING,
            f"Gantry tilt: slices are stacked {tilt:.1f} degrees off their normal "
            f"(Gantry/Detector Tilt {tilt_tag:.1f}); the volume is sheared",
            {"geometric_tilt_deg": round(tilt, 2), "tag_tilt_deg": round(tilt_tag, 2)},
        ))
    return check, ordered


# ---------------------------------------------------------------------------------------
# Duplicate positions (several phases in one series)

_PHASE_KEYS = ("TemporalPositionIdentifier", "TemporalPositionIndex", "AcquisitionNumber",
               "AcquisitionTime", "ContentTime")


def _one_phase(ordered: _Ordered, check: SeriesCheck) -> _Ordered:
    """Keep one instance per position: the first phase when a tag separates the phases."""
    for key in _PHASE_KEYS:
        values = [ordered.datasets[i].get(key) for i in range(len(ordered.datasets))]
        if any(v is None or str(v) == "" for v in values):
            continue
        groups: dict[str, list[int]] = {}
        for i, v in enumerate(values):
            groups.setdefault(str(v), []).append(i)
        if len(groups) < 2:
            continue
        clean = all(
            np.all(np.diff(ordered.positions[idx]) >= DUPLICATE_TOLERANCE_MM)
            for idx in groups.values()
        )
        if not clean:
            continue
        first = sorted(groups, key=_phase_sort_key)[0]
        keep = groups[first]
        check.issues.append(SeriesIssue(
            IssueCode.DUPLICATE_POSITIONS, Severity.WARNING,
            f"{len(groups)} phases told apart by {key}; phase {key}={first} "
            f"({len(keep)} slices) was used",
            {"phase_key": key, "phases": len(groups), "used": first},
        ))
        return _Ordered([ordered.datasets[i] for i in keep], ordered.positions[keep],
                        ordered.direction)
    keep = [0] + [i + 1 for i, s in enumerate(np.diff(ordered.positions))
                  if s >= DUPLICATE_TOLERANCE_MM]
    check.issues.append(SeriesIssue(
        IssueCode.DUPLICATE_POSITIONS, Severity.WARNING,
        "No tag tells the phases apart; the lowest Instance Number at each position was used",
        {"phase_key": None, "kept": len(keep)},
    ))
    return _Ordered([ordered.datasets[i] for i in keep], ordered.positions[keep],
                    ordered.direction)


def _phase_sort_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


# ---------------------------------------------------------------------------------------
# Pixels


def _stored(ds: Dataset) -> np.ndarray:
    """Decode one frame of stored values (no rescale)."""
    try:
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else ""
        raise SeriesError(
            f"Cannot decode pixel data (transfer syntax {ts}): {exc}. Compressed transfer "
            "syntaxes need the decoders of the 'codecs' extra: pip install 'dicomnode[codecs]'"
        ) from exc
    if arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise SeriesError(
            f"Pixel data of shape {arr.shape} does not match Rows x Columns "
            f"{int(ds.Rows)} x {int(ds.Columns)}"
        )
    return arr


def _rescale(ds: Dataset) -> tuple[float, float]:
    return (float(ds.get("RescaleSlope", 1.0) or 1.0),
            float(ds.get("RescaleIntercept", 0.0) or 0.0))


def _int16_fits(datasets: Sequence[Dataset]) -> bool:
    """Whether every possible stored value rescales to an integer within int16."""
    for ds in datasets:
        slope, intercept = _rescale(ds)
        if not (slope.is_integer() and intercept.is_integer()):
            return False
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        if int(ds.get("PixelRepresentation") or 0):
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
        ends = (lo * slope + intercept, hi * slope + intercept)
        if min(ends) < -32768 or max(ends) > 32767:
            return False
    return True


def load_series(
    sources: Iterable[Path | str | Dataset],
    *,
    min_slices: int = 3,
    keep_pixel_data: bool = False,
) -> Volume:
    """Build a HU volume from the instances of one CT series.

    Parameters
    ----------
    sources : iterable of path or Dataset
        The instances, in any order. Header-only datasets (``stop_before_pixels``) are
        fine when they carry the ``filename`` they were read from.
    min_slices : int
        Fewer slices is an error.
    keep_pixel_data : bool
        Keep Pixel Data in ``Volume.datasets`` (off by default to save memory).

    Returns
    -------
    Volume
        Slices sorted along the normal; ``check`` lists what was found (localizers left
        out, duplicate positions resolved to one phase, gaps, tilt...).

    Raises
    ------
    SeriesError
        When no trustworthy volume can be built (localizer only, mixed orientation or
        matrix, missing geometry, not CT, too few slices, undecodable pixels); its
        ``check`` holds every finding.
    """
    datasets = _as_datasets(sources, pixels=False)
    check, ordered = _check(datasets, min_slices=min_slices)
    if not check.ok or ordered is None:
        raise SeriesError("; ".join(i.message for i in check.errors), check)
    if check.has(IssueCode.DUPLICATE_POSITIONS):
        ordered = _one_phase(ordered, check)
        if len(ordered.datasets) < min_slices:
            check.issues.append(SeriesIssue(
                IssueCode.TOO_FEW_SLICES, Severity.ERROR,
                f"Only {len(ordered.datasets)} distinct position(s) after removing duplicates",
            ))
            raise SeriesError(check.errors[-1].message, check)

    # One slice at a time into a preallocated array: peak memory is the volume plus one
    # decoded slice, and each header drops its pixel data as soon as it has been used.
    first_header = ordered.datasets[0]
    shape = (len(ordered.datasets), int(first_header.Rows), int(first_header.Columns))
    hu: np.ndarray = np.empty(shape, dtype=np.int16 if _int16_fits(ordered.datasets)
                              else np.float32)
    headers: list[Dataset] = []
    for k, header in enumerate(ordered.datasets):
        (ds,) = _as_datasets([header], pixels=True)
        arr = _stored(ds)
        slope, intercept = _rescale(ds)
        if hu.dtype == np.int16:
            plane = arr.astype(np.int32)
            if slope != 1.0:
                plane *= int(slope)
            plane += int(intercept)
            if plane.min() < -32768 or plane.max() > 32767:
                # stored values beyond Bits Stored: fall back to float
                hu = hu.astype(np.float32)
            hu[k] = plane
        else:
            hu[k] = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        # Datasets the caller passed in with their pixels are never modified.
        if not keep_pixel_data and ds is not header and "PixelData" in ds:
            del ds.PixelData
        headers.append(ds)
    full = headers

    steps = np.diff(ordered.positions)
    dz = float(np.median(steps)) if len(steps) else float(
        full[0].get("SliceThickness") or full[0].get("SpacingBetweenSlices") or 1.0
    )
    dy, dx = (float(v) for v in full[0].PixelSpacing)
    first = full[0]
    origin = _position(first)
    assert origin is not None
    volume = Volume(
        hu=hu,
        spacing=(dz, dy, dx),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=ordered.direction,
        positions=ordered.positions.copy(),
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in full],
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        datasets=headers,
        check=check,
    )
    log.info(
        "series.loaded",
        extra=fields(series=volume.series_instance_uid, slices=volume.shape[0],
                     rows=volume.shape[1], cols=volume.shape[2],
                     spacing=[round(s, 3) for s in volume.spacing],
                     issues=[i.code.value for i in check.issues]),
    )
    return volume
