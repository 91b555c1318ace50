"""RT Structure Set from masks: closed planar contours per slice, in patient coordinates.

Each structure becomes one ROI (TG-263 name, colour, SNOMED CT identification code,
interpreted type) with one or more CLOSED_PLANAR contours per slice: outer boundaries
and holes as separate contours, which planning systems combine by the even-odd rule.
Every contour references its CT slice, the Referenced Frame of Reference Sequence lists
all slices of the series, and every DS value fits in 16 characters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID

from dicomnode.logs import fields
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import Structure
from dicomnode.results.contours import simplify_tolerance_mm, volume_to_polygons
from dicomnode.results.source import (
    MANUFACTURER,
    MODEL_NAME,
    SliceGeometry,
    check_source_images,
    copy_patient_study,
    ds_string,
    new_uid,
    now,
    structure_crops,
)

log = logging.getLogger(__name__)

RT_STRUCTURE_SET_STORAGE = UID("1.2.840.10008.5.1.4.1.1.481.3")
#: Retired Detached Study Management SOP Class, still what RTSTRUCT study references use.
_STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"
_CONTOUR_DATA = Tag(0x3006, 0x0050)
_RT_ROI_TYPES = ("EXTERNAL", "PTV", "CTV", "GTV", "ORGAN", "AVOIDANCE", "CAVITY", "CONTROL")


def _code_item(code: object) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value  # type: ignore[attr-defined]
    item.CodingSchemeDesignator = code.scheme_designator  # type: ignore[attr-defined]
    item.CodeMeaning = code.meaning  # type: ignore[attr-defined]
    return item


def _image_ref(image: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return ref


def _contour_data(points: np.ndarray) -> RawDataElement:
    """Contour Data pre-encoded as DS text (each value at most 16 characters).

    Building it as bytes skips pydicom's per-value DSfloat conversion, which dominated
    the time for large structures; it reads back as an ordinary DS element.
    """
    text = "\\".join(ds_string(v) for v in points.ravel().tolist()).encode("ascii")
    if len(text) % 2:
        text += b" "
    return RawDataElement(_CONTOUR_DATA, "DS", len(text), text, 0, False, True)


def structure_contours(mask: np.ndarray, geometry: SliceGeometry,
                       offset: tuple[int, int, int] = (0, 0, 0)
                       ) -> list[tuple[int, np.ndarray]]:
    """Closed planar contours of one structure, in patient coordinates.

    Parameters
    ----------
    mask
        Boolean mask ``[z, y, x]`` in the source geometry, or a crop of it.
    geometry
        Source geometry (see :func:`~dicomnode.results.source.check_source_images`).
    offset
        Index of the crop's first voxel in the full grid.

    Returns
    -------
    list of (int, numpy.ndarray)
        ``(slice index, (n, 3) points in mm)`` per contour; outer boundaries and holes.
    """
    z0, r0, c0 = offset
    return [(z0 + z, geometry.to_patient(z0 + z, poly[:, 0] + r0, poly[:, 1] + c0))
            for z, poly in volume_to_polygons(mask, geometry.spacing,
                                              simplify_tolerance_mm(geometry.spacing))]


def build_rtstruct(
    source_images: Sequence[Dataset],
    masks: np.ndarray | Mapping[str, np.ndarray],
    structures: Sequence[Structure],
    algorithm: AlgorithmInfo,
    *,
    series_description: str = "AI contours",
    series_number: int = 901,
    structure_set_label: str = "AI_CONTOURS",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Build an RT Structure Set from masks aligned to a CT series.

    Parameters
    ----------
    source_images
        CT slices sorted in the order of the masks' axis 0.
    masks
        Label map ``[z, y, x]`` (values are ``Structure.label``) or mapping from
        structure name to boolean mask ``[z, y, x]``.
    structures
        Structure table (names, codes, colours, RT ROI types).
    algorithm
        The model that produced the masks (ROI generation description and derivation
        algorithm identification).
    series_description
        Series Description shown in the viewer, e.g. ``"AI OAR contours"``.
    series_number
        Series Number of the new series.
    structure_set_label
        Structure Set Label (at most 16 characters).
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones by default.

    Returns
    -------
    pydicom.dataset.Dataset
        The RTSTRUCT, ready for :func:`~dicomnode.results.source.write`.
    """
    geometry = check_source_images(source_images)
    if not structure_set_label or len(structure_set_label) > 16:
        raise ValueError(f"Invalid 'structure_set_label' value '{structure_set_label}' - "
                         "must be 1 to 16 characters")
    if series_number < 0:
        raise ValueError(f"Invalid 'series_number' value '{series_number}' - must be >= 0")
    for s in structures:
        if s.rt_roi_type not in _RT_ROI_TYPES:
            raise ValueError(f"Invalid 'rt_roi_type' value '{s.rt_roi_type}' for '{s.name}'")
    crops = structure_crops(masks, structures, geometry)
    first = source_images[0]
    date, time = now()

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    copy_patient_study(first, ds)
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_instance_uid or new_uid()
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid or new_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.SoftwareVersions = list(algorithm.software_versions)
    ds.InstanceNumber = 1
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetName = series_description[:64]
    ds.StructureSetDescription = f"Generated by {algorithm.describe()}"[:1024]
    ds.StructureSetDate = date
    ds.StructureSetTime = time
    ds.ApprovalStatus = "UNAPPROVED"

    frame_uid = first.FrameOfReferenceUID
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([_image_ref(im) for im in source_images])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT_CLASS
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    roi_items, contour_items, observation_items = [], [], []
    total_contours = 0
    for number, (structure, box, mask) in enumerate(crops, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = structure.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = algorithm.describe()[:64]
        derivation = Dataset()
        derivation.AlgorithmFamilyCodeSequence = DicomSequence(
            [_code_item(algorithm.identification()[0].AlgorithmFamilyCodeSequence[0])])
        derivation.AlgorithmName = algorithm.name
        derivation.AlgorithmVersion = algorithm.version
        derivation.AlgorithmParameters = ",".join(
            f"{k}={v}" for k, v in algorithm.parameters.items())
        roi.ROIDerivationAlgorithmIdentificationSequence = DicomSequence([derivation])
        roi_items.append(roi)

        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(structure.color)
        roi_contour.ReferencedROINumber = number
        contours = []
        offset = (box[0].start, box[1].start, box[2].start)
        for index, (z, points) in enumerate(structure_contours(mask, geometry, offset), 1):
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([_image_ref(source_images[z])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = index
            contour[_CONTOUR_DATA] = _contour_data(points)
            contours.append(contour)
        if contours:
            roi_contour.ContourSequence = DicomSequence(contours)
        total_contours += len(contours)
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = structure.name[:16]
        observation.RTROIIdentificationCodeSequence = DicomSequence(
            [_code_item(structure.type)])
        observation.RTROIInterpretedType = structure.rt_roi_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)

    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    log.info("rtstruct.built", extra=fields(sop=str(ds.SOPInstanceUID), rois=len(crops),
                                            contours=total_contours))
    return ds
