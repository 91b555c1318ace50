"""Measurements of segmented structures: volumes, lesions, longest axial diameters.

The one measurement path of the node: the pipelines report these figures in their
JSON summary and the SR encodes the same functions' results, so the two never differ.
Computed on the source grid (voxel volume from the pixel spacing and the slice spacing
along the normal), so they agree with what a viewer measures on the SEG. "Axial"
diameters are measured in the plane of the source slices, edge to edge through the
outline that the RTSTRUCT contours follow; the two end points are kept, so that the SR
draws the very line that was measured. Every figure that is reported is rounded here
(:attr:`Lesion.diameter_mm`, :data:`VOLUME_DECIMALS`), once, for every report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from dicomnode.results.contours import mask_to_polygons

#: Decimals of a reported longest diameter in mm (the JSON summary and the SR alike).
DIAMETER_DECIMALS = 1
#: Decimals of a reported volume in cm3 (ml).
VOLUME_DECIMALS = 3


class Grid(Protocol):
    """What a measurement needs of the grid: in-plane spacing and voxel volume.

    :class:`dicomnode.results.source.SliceGeometry` is one; :class:`VoxelGrid` another.
    """

    @property
    def spacing(self) -> tuple[float, float]:
        """``(row spacing, column spacing)`` in mm."""
        ...

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3."""
        ...


@dataclass(frozen=True)
class VoxelGrid:
    """A grid given by its voxel size: ``(dz, dy, dx)`` mm of a ``[z, y, x]`` array."""

    size_mm: tuple[float, float, float]

    @property
    def spacing(self) -> tuple[float, float]:
        """``(dy, dx)``: row then column spacing, as DICOM's PixelSpacing."""
        return float(self.size_mm[1]), float(self.size_mm[2])

    @property
    def voxel_volume_mm3(self) -> float:
        """``dz * dy * dx``."""
        return float(np.prod(self.size_mm))


@dataclass(frozen=True)
class Diameter:
    """The longest in-plane distance across a mask, with where it was measured.

    Attributes
    ----------
    length_mm
        The distance in mm (unrounded).
    slice_index
        Index (axis 0) of the slice it lies on.
    ends
        Its two end points as ``(row, column)`` pixel indices of that slice, where
        ``(0, 0)`` is the centre of the first pixel (as :mod:`dicomnode.results.contours`).
    """

    length_mm: float
    slice_index: int
    ends: tuple[tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class Lesion:
    """One connected tumour component.

    Attributes
    ----------
    number
        1-based lesion number, largest lesion first.
    volume_cm3
        Volume in cm3.
    longest_axial_diameter_mm
        Longest in-plane diameter over all slices, in mm (unrounded; reports use
        :attr:`diameter_mm`).
    slice_indices
        Indices (axis 0) of the slices the lesion appears on.
    diameter
        Where the longest diameter lies (slice and end points on the full grid).
    """

    number: int
    volume_cm3: float
    longest_axial_diameter_mm: float
    slice_indices: tuple[int, ...]
    diameter: Diameter | None = None

    @property
    def diameter_mm(self) -> float:
        """The longest axial diameter as every report gives it (mm, rounded once)."""
        return round(self.longest_axial_diameter_mm, DIAMETER_DECIMALS)

    @property
    def reported_volume_cm3(self) -> float:
        """The volume as every report gives it (cm3 = ml, rounded once)."""
        return round(self.volume_cm3, VOLUME_DECIMALS)


@dataclass(frozen=True)
class LiverMeasurements:
    """Liver and tumour measurements for the abdomen pipeline.

    Attributes
    ----------
    liver_volume_cm3
        Whole-liver volume: parenchyma plus tumour, in cm3.
    lesions
        Connected tumour components, largest first.
    tumour_burden_cm3
        Total tumour volume, in cm3.
    tumour_to_liver_percent
        Tumour burden over whole-liver volume, in percent (0 without liver).
    """

    liver_volume_cm3: float
    lesions: tuple[Lesion, ...]
    tumour_burden_cm3: float
    tumour_to_liver_percent: float

    def to_dict(self) -> dict[str, Any]:
        """The figures as a pipeline reports them (JSON; ml = cm3)."""
        return {
            "liver_volume_ml": round(self.liver_volume_cm3, 1),
            "lesion_count": len(self.lesions),
            "lesions": [{"id": lesion.number, "volume_ml": lesion.reported_volume_cm3,
                         "longest_axial_diameter_mm": lesion.diameter_mm,
                         "diameter_slice_index": (lesion.diameter.slice_index
                                                  if lesion.diameter else None),
                         "slice_index": lesion.slice_indices[len(lesion.slice_indices) // 2],
                         "slices": [lesion.slice_indices[0], lesion.slice_indices[-1]]}
                        for lesion in self.lesions],
            "total_tumour_volume_ml": round(self.tumour_burden_cm3, VOLUME_DECIMALS),
            "tumour_to_liver_ratio": round(self.tumour_to_liver_percent / 100.0, 5),
        }


def volume_cm3(mask: np.ndarray, geometry: Grid) -> float:
    """Volume of a boolean mask in cm3."""
    return float(np.count_nonzero(mask)) * geometry.voxel_volume_mm3 / 1000.0


def longest_axial_diameter(mask: np.ndarray, spacing: Sequence[float],
                           offset: Sequence[int] = (0, 0, 0)) -> Diameter | None:
    """Longest in-plane distance across a 3D mask, over all its slices, and where it lies.

    The distance is taken between points of the boundary polygon (through pixel-edge
    midpoints), i.e. edge to edge as a reader measures with calipers. Of equal lengths
    the first found (lowest slice) is kept.

    Parameters
    ----------
    mask
        Boolean ``[z, y, x]`` mask (may be a crop of the full grid).
    spacing
        ``(row spacing, column spacing)`` in mm.
    offset
        ``(z, y, x)`` index in the full grid of the mask's first voxel; the returned
        slice and end points refer to the full grid.

    Returns
    -------
    Diameter or None
        None for an empty mask.
    """
    best: Diameter | None = None
    in_plane = (float(spacing[0]), float(spacing[1]))
    scale = np.asarray(in_plane, float)
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        polygons = mask_to_polygons(mask[z], in_plane)
        if not polygons:
            continue
        points = np.concatenate(polygons)
        pts = points * scale
        diff = pts[:, None, :] - pts[None, :, :]
        squared = (diff ** 2).sum(-1)
        i, j = np.unravel_index(int(np.argmax(squared)), squared.shape)
        length = float(np.sqrt(squared[i, j]))
        if best is None or length > best.length_mm:
            shift = np.asarray(offset[1:], float)
            a, b = points[i] + shift, points[j] + shift
            best = Diameter(length, int(z) + int(offset[0]),
                            ((float(a[0]), float(a[1])), (float(b[0]), float(b[1]))))
    return best


def longest_axial_diameter_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Length in mm of :func:`longest_axial_diameter` (0.0 for an empty mask).

    ``spacing`` is ``(row spacing, column spacing)`` in mm.
    """
    found = longest_axial_diameter(mask, spacing)
    return 0.0 if found is None else found.length_mm


def label_lesions(tumour: np.ndarray) -> list[tuple[tuple[slice, ...], np.ndarray]]:
    """The 3D connected lesions (26-connectivity) of a tumour mask, largest first.

    The one numbering of lesions: :func:`find_lesions` (the reports' ``Lesion N``) and
    the radiomics of each lesion both use it. Of equal sizes, the first in scan order
    comes first.

    Returns
    -------
    list of (tuple of slice, numpy.ndarray)
        Each lesion's bounding box in ``tumour`` and its boolean mask within that box.
    """
    labelled, _ = ndimage.label(tumour, structure=np.ones((3, 3, 3), bool))
    found = []
    for index, box in enumerate(ndimage.find_objects(labelled), start=1):
        if box is None:
            continue
        component = labelled[box] == index
        found.append((int(np.count_nonzero(component)), box, component))
    found.sort(key=lambda item: -item[0])
    return [(box, component) for _, box, component in found]


def find_lesions(tumour: np.ndarray, geometry: Grid,
                 z_offset: int = 0, *, yx_offset: tuple[int, int] = (0, 0)) -> list[Lesion]:
    """Split a tumour mask into 3D connected lesions (26-connectivity), largest first.

    ``tumour`` may be a crop of the full grid; ``z_offset`` is the index of its first
    slice and ``yx_offset`` of its first row and column, so that ``Lesion.slice_indices``
    and ``Lesion.diameter`` refer to the full series.
    """
    found = []
    for box, component in label_lesions(tumour):
        z0 = box[0].start + z_offset
        slices = tuple(int(z0 + z) for z in np.nonzero(component.any(axis=(1, 2)))[0])
        diameter = longest_axial_diameter(
            component, geometry.spacing,
            (z0, box[1].start + yx_offset[0], box[2].start + yx_offset[1]))
        found.append((volume_cm3(component, geometry), diameter, slices))
    return [Lesion(i, v, d.length_mm if d else 0.0, s, d)
            for i, (v, d, s) in enumerate(found, start=1)]


def measure_liver(liver: np.ndarray, tumour: np.ndarray,
                  geometry: Grid, *, z_offset: int = 0,
                  yx_offset: tuple[int, int] = (0, 0)) -> LiverMeasurements:
    """Liver volume, lesions, tumour burden and tumour-to-liver ratio.

    Parameters
    ----------
    liver
        Liver parenchyma mask ``[z, y, x]`` (tumour voxels may or may not be included).
    tumour
        Tumour mask ``[z, y, x]``, the same shape as ``liver``.
    geometry
        Source geometry.
    z_offset, yx_offset
        Index in the full series of the masks' first slice, and of their first row and
        column, when both are a crop of the series grid (``Lesion.slice_indices`` and
        ``Lesion.diameter`` refer to the full series).
    """
    whole = volume_cm3(liver | tumour, geometry)
    z_any = np.nonzero(tumour.any(axis=(1, 2)))[0]
    if z_any.size:
        rows = np.nonzero(tumour.any(axis=(0, 2)))[0]
        cols = np.nonzero(tumour.any(axis=(0, 1)))[0]
        crop = tumour[z_any[0]:z_any[-1] + 1, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        lesions = tuple(find_lesions(
            crop, geometry, int(z_any[0]) + z_offset,
            yx_offset=(int(rows[0]) + yx_offset[0], int(cols[0]) + yx_offset[1])))
    else:
        lesions = ()
    burden = volume_cm3(tumour, geometry)
    ratio = 100.0 * burden / whole if whole > 0 else 0.0
    return LiverMeasurements(whole, lesions, burden, ratio)


def structure_volumes(label_map: np.ndarray, structures: Mapping[int, str],
                      geometry: Grid) -> dict[str, float]:
    """Volume in cm3 of each labelled structure (label value -> name) of a label map."""
    counts = np.bincount(label_map.ravel(), minlength=max(structures, default=0) + 1)
    return {name: round(float(counts[value]) * geometry.voxel_volume_mm3 / 1000.0, 3)
            for value, name in structures.items()}
