"""A Secondary Capture series with the contours and names burned into the pixels.

For PACS viewers that show neither DICOM-SEG nor RTSTRUCT: every slice with a
structure, windowed CT in grey with each structure's outline in its colour and its name
beside it, and a banner saying what the picture is. It is an ordinary image series that
any viewer opens, and marked so that nobody mistakes it for the CT: Image Type
``DERIVED\\SECONDARY``, Burned In Annotation ``YES``, a series description ending in
"not for diagnosis", the source slice in Source Image Sequence. It keeps the source's
patient and study modules and, for viewers that link series, its Frame of Reference and
slice position.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnode.logs import fields
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import Structure
from dicomnode.results.preview import SOFT_TISSUE, hounsfield, overlay_slice
from dicomnode.results.source import (
    MANUFACTURER,
    SliceGeometry,
    check_source_images,
    constructor_source,
    copy_patient_study,
    ds_string,
    new_uid,
    structure_masks,
)

log = logging.getLogger(__name__)

#: Written on every image and at the end of the default series description.
NOT_FOR_DIAGNOSIS = "not for diagnosis"
BANNER = f"AI contours - {NOT_FOR_DIAGNOSIS}"


def _orientation_letter(vector: np.ndarray) -> str:
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    axis = int(np.argmax(np.abs(vector)))
    return letters[axis][int(vector[axis] > 0)]


def _patient_orientation(geometry: SliceGeometry) -> tuple[str, str]:
    return (_orientation_letter(geometry.row_direction),
            _orientation_letter(geometry.column_direction))


def _font(rows: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font (no system font needed), about 1/40 of the image high."""
    return ImageFont.load_default(size=max(10, rows // 40))


def _label(rgb: np.ndarray, masks: Sequence[tuple[Structure, np.ndarray]]) -> np.ndarray:
    """Write the banner and each structure's name (above its top edge, in its colour)."""
    picture = Image.fromarray(rgb)
    draw = ImageDraw.Draw(picture)
    font = _font(rgb.shape[0])
    draw.text((4, 4), BANNER, fill=(255, 255, 255), font=font, stroke_width=1,
              stroke_fill=(0, 0, 0))
    for structure, mask in masks:
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        top = int(rows.min())
        x = int(np.median(cols[rows == top]))
        draw.text((x, max(top - 2, 0)), structure.name, fill=tuple(structure.color),
                  font=font, anchor="mb", stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(picture)


def build_burned_in_series(
    source_images: Sequence[Dataset],
    masks: np.ndarray | Mapping[str, np.ndarray],
    structures: Sequence[Structure],
    algorithm: AlgorithmInfo,
    *,
    series_description: str = f"AI contours, {NOT_FOR_DIAGNOSIS}",
    series_number: int = 905,
    window: tuple[float, float] = SOFT_TISSUE,
    series_instance_uid: str | None = None,
    hu: np.ndarray | None = None,
) -> list[Dataset]:
    """Build the burned-in Secondary Capture series: one RGB image per slice with a structure.

    Parameters
    ----------
    source_images
        CT slices sorted in the order of the masks' axis 0.
    masks
        Label map ``[z, y, x]`` or mapping from structure name to boolean mask.
    structures
        Structure table (names and colours).
    algorithm
        The model that produced the masks (Software Versions, Derivation Description).
    series_description, series_number
        Of the new series; the description should say it is not for diagnosis.
    window
        CT window ``(centre, width)`` in HU.
    series_instance_uid
        UID to use; a new one by default.
    hu
        The slices' pixels in HU ``[z, y, x]`` when ``source_images`` are headers only
        (a loaded :class:`~dicomnode.imaging.series.Volume`); read from them by default.

    Returns
    -------
    list of pydicom.dataset.Dataset
        Secondary Capture images in source order, Instance Number counting from 1.

    Raises
    ------
    ValueError
        If no slice has a structure (there is nothing to show).
    """
    geometry = check_source_images(source_images)
    if hu is not None and tuple(hu.shape) != geometry.shape:
        raise ValueError(f"Invalid 'hu' shape {hu.shape} - the slices are {geometry.shape}")
    pairs = structure_masks(masks, structures, geometry)
    slices = [z for z in range(len(source_images)) if any(m[z].any() for _, m in pairs)]
    if not slices:
        raise ValueError("Invalid 'masks' value - no slice has a structure; there is "
                         "nothing to burn in")
    series_uid = series_instance_uid or new_uid()
    orientation = _patient_orientation(geometry)
    images: list[Dataset] = []
    for number, z in enumerate(slices, start=1):
        source = source_images[z]
        on_slice = [(s, m[z]) for s, m in pairs]
        pixels = hounsfield(source) if hu is None else np.asarray(hu[z], np.float32)
        rgb = _label(overlay_slice(pixels, on_slice, window, fill_alpha=0.0), on_slice)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=constructor_source(source),  # patient values: copy_patient_study
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=new_uid(),
            instance_number=number,
            manufacturer=MANUFACTURER,
            pixel_spacing=geometry.spacing,  # type: ignore[arg-type]
            patient_orientation=orientation,
        )
        sc.SeriesDescription = series_description[:64]
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = "YES"
        sc.Laterality = ""  # type 2C: unpaired or unknown; dciodvfy asks for it
        sc.DerivationDescription = (f"CT with contours by {algorithm.describe()}; "
                                    f"{NOT_FOR_DIAGNOSIS}")[:1024]
        sc.SoftwareVersions = list(algorithm.software_versions)  # type: ignore[assignment]
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        sc.SourceImageSequence = DicomSequence([reference])
        # where the slice lies, so viewers can link it with the CT (same frame of reference)
        if "FrameOfReferenceUID" in source:
            sc.FrameOfReferenceUID = source.FrameOfReferenceUID
        sc.ImagePositionPatient = [ds_string(v) for v in geometry.origins[z]]
        sc.ImageOrientationPatient = [ds_string(v) for v in (*geometry.row_direction,
                                                              *geometry.column_direction)]
        if "SliceThickness" in source:
            sc.SliceThickness = source.SliceThickness
        copy_patient_study(source, sc)
        images.append(sc)
    log.info("burned_in.built", extra=fields(series=series_uid, images=len(images)))
    return images
