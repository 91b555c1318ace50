"""Which series of a study a pipeline should read.

A received study holds localizers, several reconstructions (thin and thick, soft-tissue
and bone kernels, coronal and sagittal reformats), dose reports and sometimes
secondary captures. :func:`describe_study` reads every file's header once
(``stop_before_pixels``), groups them by Series Instance UID and describes each series;
:func:`select_series` picks one for a pipeline under :class:`SelectionPreferences` and
says why, and why every other series lost.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.imaging.series import (
    CT_IMAGE_STORAGE,
    IssueCode,
    SeriesCheck,
    SeriesIssue,
    Severity,
    _check,
    is_localizer,
    orientation_label,
)
from dicomnode.logs import fields

log = logging.getLogger(__name__)

KERNEL_CLASSES = ("soft", "bone", "lung", "unknown")

# Reconstruction kernels by vendor, lower case, matched as whole tokens or prefixes.
# Siemens: B/Br/I/Hr + number (low = soft, 60+ = sharp); GE: STANDARD/SOFT/BONE/LUNG/
# DETAIL; Philips: A/B/C (soft), D/E/YA (sharp), L (lung); Canon/Toshiba: FC01-FC26 soft
# tissue, FC30+ bone/lung.
_SOFT = re.compile(
    r"^(standard|soft|smooth|stnd|std|body|brain|(b|br|hr|i|j|h|qr|bv|bf)[0-4]\d[a-z]?|"
    r"[abc]|ub|fc[0-2]\d|fl0\d)$"
)
_LUNG = re.compile(r"^(lung|l|yc|(b|br|i|bl)5\d[a-z]?|fc5\d|fc8\d)$")
_BONE = re.compile(r"^(bone|boneplus|detail|edge|sharp|(b|br|hr|h|i|j|qr)[6-9]\d[a-z]?|d|e|ya|yb|"
                   r"fc[3-9]\d)$")


def kernel_class(kernel: str | Sequence[str] | None) -> str:
    """Classify a Convolution Kernel value as ``soft``, ``bone``, ``lung`` or ``unknown``.

    Parameters
    ----------
    kernel : str or sequence of str or None
        The Convolution Kernel value(s), any vendor.

    Returns
    -------
    str
    """
    if kernel is None:
        return "unknown"
    values = [kernel] if isinstance(kernel, str) else list(kernel)
    for value in values:
        for token in re.split(r"[\s\\/_,;-]+", str(value).strip().lower()):
            if not token:
                continue
            if _SOFT.match(token):
                return "soft"
            if _LUNG.match(token):
                return "lung"
            if _BONE.match(token):
                return "bone"
    return "unknown"


@dataclass
class SeriesInfo:
    """What the headers say about one series of a study."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    sop_class_uid: str
    series_number: int | None
    series_description: str
    image_type: list[str]
    orientation: str
    slice_thickness: float | None
    slice_step: float | None
    kernel: str
    kernel_class: str
    count: int
    coverage_mm: float
    is_localizer: bool
    contrast: bool
    rows: int | None
    columns: int | None
    check: SeriesCheck | None
    paths: list[Path] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list, repr=False)

    @property
    def usable_as_ct_volume(self) -> bool:
        """Single-frame CT images whose headers allow building a volume."""
        return (
            self.modality == "CT"
            and self.sop_class_uid == CT_IMAGE_STORAGE
            and not self.is_localizer
            and self.check is not None
            and self.check.ok
        )

    @property
    def first_header(self) -> Dataset:
        """A representative header (series and study level tags)."""
        return self.headers[0]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary (no patient-identifying values)."""
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_number": self.series_number,
            "series_description": self.series_description,
            "modality": self.modality,
            "sop_class_uid": self.sop_class_uid,
            "image_type": self.image_type,
            "orientation": self.orientation,
            "slice_thickness": self.slice_thickness,
            "slice_step": self.slice_step,
            "kernel": self.kernel,
            "kernel_class": self.kernel_class,
            "count": self.count,
            "coverage_mm": round(self.coverage_mm, 1),
            "localizer": self.is_localizer,
            "contrast": self.contrast,
            "issues": [i.to_dict() for i in self.check.issues] if self.check else [],
        }


def read_study_headers(paths: Iterable[Path | str]) -> list[tuple[Path, Dataset]]:
    """Read the header of every DICOM file under the given paths.

    Parameters
    ----------
    paths : iterable of path
        Files or directories (searched recursively). Files that are not DICOM are
        skipped and counted in the log.

    Returns
    -------
    list of (Path, Dataset)
    """
    out: list[tuple[Path, Dataset]] = []
    skipped = 0
    for p in _expand(paths):
        try:
            out.append((p, pydicom.dcmread(str(p), stop_before_pixels=True)))
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError):
            # Not a DICOM file (label maps, JSON, truncated files): not part of the study.
            skipped += 1
    if skipped:
        log.info("study.files_skipped", extra=fields(skipped=skipped, read=len(out)))
    return out


def _expand(paths: Iterable[Path | str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"Invalid 'paths' value '{p}' - no such file or directory")
    return files


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _orientation(iop: Any) -> str:
    try:
        return orientation_label([float(v) for v in iop]) if iop else "unknown"
    except (TypeError, ValueError, IndexError):
        return "unknown"


def describe_series(headers: Sequence[Dataset], paths: Sequence[Path] = ()) -> SeriesInfo:
    """Describe one series from its headers.

    Parameters
    ----------
    headers : sequence of Dataset
        All instances of the series (header only is enough).
    paths : sequence of Path
        The files the headers came from, in the same order.

    Returns
    -------
    SeriesInfo
    """
    if not headers:
        raise ValueError("Invalid 'headers' value '[]' - a series needs at least one instance")
    first = headers[0]
    modality = str(first.get("Modality", ""))
    sop_class = str(first.get("SOPClassUID", ""))
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    localizer = all(is_localizer(ds) for ds in headers)
    is_image = "PixelData" in first or "Rows" in first
    check: SeriesCheck | None = None
    coverage = 0.0
    step: float | None = None
    if modality == "CT" and is_image:
        try:
            check, ordered = _check(list(headers), min_slices=1)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            # Malformed geometry values (non-numeric positions, odd VM): unusable, not fatal.
            check, ordered = SeriesCheck(str(first.get("SeriesInstanceUID", ""))), None
            check.issues.append(SeriesIssue(
                IssueCode.MISSING_GEOMETRY, Severity.ERROR,
                f"Image geometry could not be read: {type(exc).__name__}: {exc}"))
        if ordered is not None and len(ordered.positions) > 1:
            coverage = float(ordered.positions[-1] - ordered.positions[0])
            steps = np.diff(ordered.positions)
            steps = steps[steps > 0.01]
            step = float(np.median(steps)) if len(steps) else None
    kernel_value = first.get("ConvolutionKernel")
    if kernel_value is None:
        kernel = ""
    elif isinstance(kernel_value, str):
        kernel = kernel_value
    else:
        kernel = "\\".join(str(v) for v in kernel_value)
    iop = first.get("ImageOrientationPatient")
    number = first.get("SeriesNumber")
    return SeriesInfo(
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        modality=modality,
        sop_class_uid=sop_class,
        series_number=_int(number),
        series_description=str(first.get("SeriesDescription", "") or ""),
        image_type=image_type,
        orientation=_orientation(iop),
        slice_thickness=_float(first.get("SliceThickness")),
        slice_step=step,
        kernel=kernel,
        kernel_class=kernel_class(kernel_value),
        count=len(headers),
        coverage_mm=coverage,
        is_localizer=localizer,
        contrast=bool(str(first.get("ContrastBolusAgent", "") or "").strip()),
        rows=_int(first.get("Rows")),
        columns=_int(first.get("Columns")),
        check=check,
        paths=list(paths),
        headers=list(headers),
    )


def describe_study(paths: Iterable[Path | str]) -> list[SeriesInfo]:
    """Group a study's files by series and describe each series.

    Parameters
    ----------
    paths : iterable of path
        Files or directories.

    Returns
    -------
    list of SeriesInfo
        Ordered by Series Number, then Series Instance UID.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in read_study_headers(paths):
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    infos = [
        describe_series([ds for _, ds in items], [p for p, _ in items])
        for items in groups.values()
    ]
    infos.sort(key=lambda i: (i.series_number if i.series_number is not None else 1 << 30,
                              i.series_instance_uid))
    return infos


@dataclass
class SelectionPreferences:
    """What a pipeline wants from a series (configurable per pipeline in routing.yaml).

    Attributes
    ----------
    orientation : str
        Required plane (``axial``, ``coronal``, ``sagittal``) or ``any``.
    min_slice_thickness_mm, max_slice_thickness_mm : float
        The adequate range; within it the thinnest series wins.
    kernels : list of str
        Kernel classes in order of preference (``soft``, ``bone``, ``lung``, ``unknown``).
    min_slices : int
        Fewer slices disqualifies a series.
    min_coverage_mm : float
        Less coverage along the normal disqualifies a series.
    prefer_original : bool
        Rank ORIGINAL images above DERIVED ones (reformats, MIPs).
    """

    orientation: str = "axial"
    min_slice_thickness_mm: float = 0.5
    max_slice_thickness_mm: float = 5.0
    kernels: list[str] = field(default_factory=lambda: ["soft", "unknown", "bone", "lung"])
    min_slices: int = 10
    min_coverage_mm: float = 30.0
    prefer_original: bool = True

    def __post_init__(self) -> None:
        if self.orientation not in ("axial", "coronal", "sagittal", "any"):
            raise ValueError(
                f"Invalid 'orientation' value '{self.orientation}' - must be axial, coronal, "
                "sagittal or any"
            )
        if self.min_slice_thickness_mm < 0:
            raise ValueError(
                f"Invalid 'min_slice_thickness_mm' value '{self.min_slice_thickness_mm}' - "
                "must not be negative"
            )
        if self.max_slice_thickness_mm <= self.min_slice_thickness_mm:
            raise ValueError(
                f"Invalid 'max_slice_thickness_mm' value '{self.max_slice_thickness_mm}' - "
                "must be larger than min_slice_thickness_mm"
            )
        for k in self.kernels:
            if k not in KERNEL_CLASSES:
                raise ValueError(
                    f"Invalid 'kernels' value '{k}' - must be one of {', '.join(KERNEL_CLASSES)}"
                )
        if self.min_slices < 1:
            raise ValueError(f"Invalid 'min_slices' value '{self.min_slices}' - must be >= 1")
        if self.min_coverage_mm < 0:
            raise ValueError(
                f"Invalid 'min_coverage_mm' value '{self.min_coverage_mm}' - must be >= 0"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SelectionPreferences:
        """Build from a mapping (e.g. a ``selection`` block of routing.yaml).

        Parameters
        ----------
        data : dict or None
            Keys are the attribute names; unknown keys are an error.

        Returns
        -------
        SelectionPreferences
        """
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise ValueError(
                    f"Invalid 'selection' key '{key}' - known keys: {', '.join(sorted(known))}"
                )
        return cls(**data)


@dataclass
class SeriesChoice:
    """The outcome of :func:`select_series`."""

    series: SeriesInfo | None
    reason: str
    rejected: dict[str, str] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {
            "series_instance_uid": self.series.series_instance_uid if self.series else None,
            "series_description": self.series.series_description if self.series else None,
            "reason": self.reason,
            "rejected": self.rejected,
            "ranked_candidates": self.candidates,
        }


def _disqualify(info: SeriesInfo, prefs: SelectionPreferences) -> str | None:
    if info.modality != "CT":
        return f"modality {info.modality or '(none)'}, not CT"
    if info.is_localizer:
        return "localizer"
    if info.sop_class_uid != CT_IMAGE_STORAGE:
        return f"SOP class {info.sop_class_uid} is not single-frame CT Image Storage"
    if info.check is None or not info.check.ok:
        reasons = info.check.reasons() if info.check else ["no image geometry"]
        return "; ".join(reasons[:2])
    if prefs.orientation != "any" and info.orientation != prefs.orientation:
        return f"{info.orientation} images, {prefs.orientation} wanted"
    if any(t in ("MIP", "MINIP", "VRT", "VR", "SSD") for t in info.image_type):
        return f"projection image ({'/'.join(info.image_type)})"
    thickness = _thickness(info)
    if thickness is not None and thickness > prefs.max_slice_thickness_mm + 1e-6:
        return f"slices of {thickness:g} mm are thicker than {prefs.max_slice_thickness_mm:g} mm"
    if thickness is not None and thickness < prefs.min_slice_thickness_mm - 1e-6:
        return f"slices of {thickness:g} mm are thinner than {prefs.min_slice_thickness_mm:g} mm"
    if info.count < prefs.min_slices:
        return f"{info.count} slices, at least {prefs.min_slices} wanted"
    if info.coverage_mm < prefs.min_coverage_mm:
        return f"coverage {info.coverage_mm:.0f} mm, at least {prefs.min_coverage_mm:g} mm wanted"
    return None


def _thickness(info: SeriesInfo) -> float | None:
    return info.slice_thickness if info.slice_thickness else info.slice_step


def _rank_key(info: SeriesInfo, prefs: SelectionPreferences) -> tuple[Any, ...]:
    kernel_rank = (prefs.kernels.index(info.kernel_class) if info.kernel_class in prefs.kernels
                   else len(prefs.kernels))
    clean = 0 if info.check is not None and not info.check.warnings else 1
    derived = 1 if prefs.prefer_original and "DERIVED" in info.image_type else 0
    thickness = _thickness(info) or 99.0
    return (derived, clean, kernel_rank, round(thickness, 2), -info.coverage_mm, -info.count,
            info.series_number if info.series_number is not None else 1 << 30)


def select_series(
    infos: Sequence[SeriesInfo], preferences: SelectionPreferences | None = None
) -> SeriesChoice:
    """Pick the series a pipeline should read.

    Disqualified: not CT, localizers, other SOP classes (dose reports, secondary
    captures, enhanced multi-frame), series whose headers do not allow a volume, the
    wrong plane, projections (MIP/VRT), slices outside the thickness range, too few
    slices or too little coverage. The rest are ranked: ORIGINAL before DERIVED,
    series without warnings (gaps, tilt, duplicates) first, then kernel preference,
    then the thinnest slices, then the largest coverage.

    Parameters
    ----------
    infos : sequence of SeriesInfo
        From :func:`describe_study`.
    preferences : SelectionPreferences, optional
        Defaults to :class:`SelectionPreferences` ().

    Returns
    -------
    SeriesChoice
        ``series`` is None when nothing qualifies; ``reason`` then says why.
    """
    prefs = preferences or SelectionPreferences()
    rejected: dict[str, str] = {}
    candidates: list[SeriesInfo] = []
    for info in infos:
        why = _disqualify(info, prefs)
        if why is None:
            candidates.append(info)
        else:
            rejected[info.series_instance_uid] = why
    if not candidates:
        reason = (
            "no series in the study" if not infos
            else f"no usable CT series among {len(infos)} series"
        )
        return SeriesChoice(None, reason, rejected)
    candidates.sort(key=lambda i: _rank_key(i, prefs))
    best = candidates[0]
    parts = [
        f"{best.orientation} CT",
        f"{best.count} slices",
        f"{_thickness(best) or 0:g} mm",
        f"kernel {best.kernel or '(none)'} ({best.kernel_class})",
        f"coverage {best.coverage_mm:.0f} mm",
    ]
    if best.check is not None and best.check.warnings:
        parts.append("warnings: " + "; ".join(i.message for i in best.check.warnings))
    for other in candidates[1:]:
        rejected[other.series_instance_uid] = "ranked lower: " + _why_lower(best, other, prefs)
    reason = ", ".join(parts) + (
        f"; best of {len(candidates)} candidate(s)" if len(candidates) > 1 else ""
    )
    return SeriesChoice(best, reason, rejected, [c.series_instance_uid for c in candidates])


def _why_lower(best: SeriesInfo, other: SeriesInfo, prefs: SelectionPreferences) -> str:
    a, b = _rank_key(best, prefs), _rank_key(other, prefs)
    names = ["DERIVED images", "series warnings", f"kernel {other.kernel_class or 'unknown'}",
             f"thicker slices ({_thickness(other) or 0:g} mm)", "less coverage", "fewer slices",
             "higher series number"]
    for name, x, y in zip(names, a, b, strict=True):
        if x != y:
            return name
    return "same rank, later in series order"
