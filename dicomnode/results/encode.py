"""Encode a label map made by any tool as SEG + RTSTRUCT + SR for its CT series.

``dicomnode encode SERIES_DIR LABELS.nii.gz --structures headneck --out OUT_DIR`` lets a
site send nnU-Net, TotalSegmentator or hand segmentations to its PACS with the same
writers the pipelines use. The label map is resampled (nearest neighbour, in physical
space) onto the series grid, after checking that it covers the series.

The series reader here is deliberately small and private; ``dicomnode.imaging.series``
is the full one and can replace it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813 - the usual alias
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.logs import fields
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import structure_table
from dicomnode.results.rtstruct import build_rtstruct
from dicomnode.results.seg import build_seg
from dicomnode.results.source import SliceGeometry, check_source_images, write
from dicomnode.results.sr import build_segmentation_sr

log = logging.getLogger(__name__)

#: How far (mm) the label map may fall short of the series extent.
GEOMETRY_TOLERANCE_MM = 1.0

_DESCRIPTIONS = {
    "headneck": ("AI OAR segmentation", "AI OAR contours", "AI OAR volumes"),
    "abdomen": ("AI liver segmentation", "AI liver contours", "AI liver measurements"),
}


@dataclass(frozen=True)
class EncodedResult:
    """Files written by :func:`encode_label_map`.

    Attributes
    ----------
    seg, rtstruct, sr
        Paths of the three result objects.
    structures
        Name and voxel count of every structure of the table.
    ignored_labels
        Label values in the file that the table does not name (left out, with a warning).
    """

    seg: Path
    rtstruct: Path
    sr: Path
    structures: dict[str, int]
    ignored_labels: list[int]


def _read_series(series_dir: Path) -> list[Dataset]:
    """Read one CT series from a folder, sorted along the slice normal (not by number)."""
    if not series_dir.is_dir():
        raise ValueError(f"Invalid 'series_dir' value '{series_dir}' - not a directory")
    images: list[Dataset] = []
    for path in sorted(p for p in series_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            images.append(ds)
    if not images:
        raise ValueError(f"Invalid 'series_dir' value '{series_dir}' - no image slices found")
    series = {str(ds.SeriesInstanceUID) for ds in images}
    if len(series) != 1:
        raise ValueError(f"Invalid 'series_dir' value '{series_dir}' - holds {len(series)} "
                         "series; give a folder with one series")
    iop = np.array([float(v) for v in images[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    images.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in
                                                      ds.ImagePositionPatient])))
    return images


def series_reference_image(geometry: SliceGeometry) -> sitk.Image:
    """An empty SimpleITK image on the series grid (axis 0 = slices in source order)."""
    slices, rows, cols = geometry.shape
    image = sitk.Image(cols, rows, slices, sitk.sitkUInt8)
    image.SetOrigin(tuple(float(v) for v in geometry.origins[0]))
    if slices > 1:
        step = (geometry.origins[-1] - geometry.origins[0]) / (slices - 1)
        step_mm = float(np.linalg.norm(step))
        slice_dir = step / step_mm
    else:
        step_mm, slice_dir = 1.0, geometry.normal
    image.SetSpacing((geometry.spacing[1], geometry.spacing[0], step_mm))
    direction = np.stack([geometry.row_direction, geometry.column_direction, slice_dir], axis=1)
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def _check_coverage(labels: sitk.Image, geometry: SliceGeometry) -> None:
    slices, rows, cols = geometry.shape
    size = np.array(labels.GetSize(), float)
    spacing = np.array(labels.GetSpacing(), float)
    for z in (0, slices - 1):
        for r in (0, rows - 1):
            for c in (0, cols - 1):
                point = geometry.to_patient(z, np.array([r]), np.array([c]))[0]
                index = np.array(labels.TransformPhysicalPointToContinuousIndex(
                    tuple(float(v) for v in point)))
                slack = 0.5 + GEOMETRY_TOLERANCE_MM / spacing
                if (index < -slack).any() or (index > size - 1 + slack).any():
                    raise ValueError(
                        "Invalid 'labels' geometry - the label map does not cover the series "
                        f"(series corner {np.round(point, 1).tolist()} mm falls at label "
                        f"index {np.round(index, 1).tolist()} of size {size.astype(int).tolist()})")


def labels_on_series(labels_path: str | os.PathLike[str],
                     source_images: list[Dataset]) -> np.ndarray:
    """Resample a label map file onto the grid of a sorted series (nearest neighbour).

    Parameters
    ----------
    labels_path
        NIfTI (or any SimpleITK-readable) integer label map.
    source_images
        The series, sorted along the slice normal.

    Returns
    -------
    numpy.ndarray
        ``uint8`` labels ``[z, y, x]`` aligned with ``source_images``.

    Raises
    ------
    ValueError
        If the file is not an integer label map or does not cover the series.
    """
    geometry = check_source_images(source_images)
    path = Path(labels_path)
    if not path.is_file():
        raise ValueError(f"Invalid 'labels' value '{path}' - no such file")
    labels = sitk.ReadImage(str(path))
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"Invalid 'labels' value '{path}' - must be a 3D scalar label map")
    array = sitk.GetArrayViewFromImage(labels)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"Invalid 'labels' value '{path}' - values must be integers")
        labels = sitk.Cast(labels, sitk.sitkUInt16)
    _check_coverage(labels, geometry)
    resampled = sitk.Resample(labels, series_reference_image(geometry), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    out = sitk.GetArrayFromImage(resampled)
    if out.max(initial=0) > 255 or out.min(initial=0) < 0:
        raise ValueError(f"Invalid 'labels' value '{path}' - label values must be 0 to 255")
    return out.astype(np.uint8)


def encode_label_map(
    series_dir: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    structures: str,
    out_dir: str | os.PathLike[str],
    *,
    algorithm: AlgorithmInfo | None = None,
) -> EncodedResult:
    """Write SEG, RTSTRUCT and SR for a label map made by any tool.

    Parameters
    ----------
    series_dir
        Folder with the CT series the labels were drawn on.
    labels_path
        Label map (NIfTI), values are the labels of the structure table.
    structures
        ``"headneck"`` or ``"abdomen"``.
    out_dir
        Folder for ``seg.dcm``, ``rtstruct.dcm`` and ``sr.dcm``.
    algorithm
        Identification to record; by default "external-label-map" with the SHA-256 of
        the label file in place of a weight checksum.

    Returns
    -------
    EncodedResult

    Notes
    -----
    Label values the table does not name are left out with a warning (listed in
    ``EncodedResult.ignored_labels``), so a multi-organ label map can be encoded for
    the structures this node reports.
    """
    table = structure_table(structures)
    labels_file = Path(labels_path)
    images = _read_series(Path(series_dir))
    labels = labels_on_series(labels_file, images)
    if algorithm is None:
        with labels_file.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        algorithm = AlgorithmInfo("external-label-map", "unknown", digest,
                                  "External segmentation (checksum of the label file)")
    # Tools such as TotalSegmentator label far more than the table: keep the table's.
    present = np.nonzero(np.bincount(labels.ravel(), minlength=256))[0]
    ignored = sorted(int(v) for v in present if v != 0 and v not in {s.label for s in table})
    if ignored:
        log.warning("encode.labels_ignored", extra=fields(labels=ignored, table=structures))
        labels[~np.isin(labels, [s.label for s in table])] = 0
    seg_desc, rt_desc, sr_desc = _DESCRIPTIONS[structures]
    seg = build_seg(images, labels, table, algorithm, series_description=seg_desc)
    rtstruct = build_rtstruct(images, labels, table, algorithm, series_description=rt_desc)
    sr = build_segmentation_sr(images, seg, labels, table, algorithm,
                               series_description=sr_desc)
    out = Path(out_dir)
    result = EncodedResult(
        seg=write(seg, out / "seg.dcm"),
        rtstruct=write(rtstruct, out / "rtstruct.dcm"),
        sr=write(sr, out / "sr.dcm"),
        structures={s.name: int(np.count_nonzero(labels == s.label)) for s in table},
        ignored_labels=ignored,
    )
    log.info("encode.done", extra=fields(series=str(images[0].SeriesInstanceUID),
                                         slices=len(images), structures=structures))
    return result
