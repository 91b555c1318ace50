"""Measurements reported in the SR: volumes, lesions, longest axial diameters.

Computed from the masks in the source geometry (voxel volume from the pixel spacing and
the slice spacing along the normal), so they agree with what a viewer measures on the
SEG. "Axial" diameters are measured in the plane of the source slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dicomnode.results.contours import mask_to_polygons
from dicomnode.results.source import SliceGeometry


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
        Longest in-plane diameter over all slices, in mm.
    slice_indices
        Indices (axis 0) of the slices the lesion appears on.
    """

    number: int
    volume_cm3: float
    longest_axial_diameter_mm: float
    slice_indices: tuple[int, ...]


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


def volume_cm3(mask: np.ndarray, geometry: SliceGeometry) -> float:
    """Volume of a boolean mask in cm3."""
    return float(np.count_nonzero(mask)) * geometry.voxel_volume_mm3 / 1000.0


def longest_axial_diameter_mm(mask: np.ndarray, geometry: SliceGeometry) -> float:
    """Longest in-plane distance across a 3D mask, over all its slices, in mm.

    The distance is taken between points of the boundary polygon (through pixel-edge
    midpoints), i.e. edge to edge as a reader measures with calipers.
    """
    best = 0.0
    scale = np.asarray(geometry.spacing, float)
    for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
        polygons = mask_to_polygons(mask[z], geometry.spacing)
        if not polygons:
            continue
        pts = np.concatenate(polygons) * scale
        diff = pts[:, None, :] - pts[None, :, :]
        best = max(best, float(np.sqrt((diff ** 2).sum(-1)).max()))
    return best


def find_lesions(tumour: np.ndarray, geometry: SliceGeometry,
                 z_offset: int = 0) -> list[Lesion]:
    """Split a tumour mask into 3D connected lesions (26-connectivity), largest first.

    ``tumour`` may be a crop of the full grid; ``z_offset`` is the index of its first
    slice, so that ``Lesion.slice_indices`` refer to the full series.
    """
    labelled, _ = ndimage.label(tumour, structure=np.ones((3, 3, 3), bool))
    boxes = ndimage.find_objects(labelled)
    found = []
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        component = labelled[box] == index
        z0 = box[0].start + z_offset
        slices = tuple(int(z0 + z) for z in np.nonzero(component.any(axis=(1, 2)))[0])
        found.append((volume_cm3(component, geometry),
                      longest_axial_diameter_mm(component, geometry), slices))
    found.sort(key=lambda item: -item[0])
    return [Lesion(i, v, d, s) for i, (v, d, s) in enumerate(found, start=1)]


def measure_liver(liver: np.ndarray, tumour: np.ndarray,
                  geometry: SliceGeometry, *, z_offset: int = 0) -> LiverMeasurements:
    """Liver volume, lesions, tumour burden and tumour-to-liver ratio.

    Parameters
    ----------
    liver
        Liver parenchyma mask ``[z, y, x]`` (tumour voxels may or may not be included).
    tumour
        Tumour mask ``[z, y, x]``, the same shape as ``liver``.
    geometry
        Source geometry.
    z_offset
        Index in the full series of the masks' first slice, when both are a crop of
        the series grid (``Lesion.slice_indices`` refer to the full series).
    """
    whole = volume_cm3(liver | tumour, geometry)
    z_any = np.nonzero(tumour.any(axis=(1, 2)))[0]
    if z_any.size:
        rows = np.nonzero(tumour.any(axis=(0, 2)))[0]
        cols = np.nonzero(tumour.any(axis=(0, 1)))[0]
        crop = tumour[z_any[0]:z_any[-1] + 1, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        lesions = tuple(find_lesions(crop, geometry, int(z_any[0]) + z_offset))
    else:
        lesions = ()
    burden = volume_cm3(tumour, geometry)
    ratio = 100.0 * burden / whole if whole > 0 else 0.0
    return LiverMeasurements(whole, lesions, burden, ratio)
