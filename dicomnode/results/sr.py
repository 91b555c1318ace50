"""TID 1500 Measurement Reports (Comprehensive 3D SR) via highdicom.sr.

Three reports: ``build_segmentation_sr`` gives one group per structure (its volume, drawn
as the outline of its largest axial section; for the liver pipeline also one group per
lesion with its longest axial diameter drawn as the measured two-point line, and the
lesion count, total tumour burden and tumour-to-liver ratio); ``build_ich_sr`` gives
one group per haemorrhage finding and flagged slice with its probability and a
present/absent evaluation. Both carry the algorithm identification and a device
observer context naming the model; ``build_no_result_sr`` is the text report for "no
result".

What a viewer needs (OHIF's ``cornerstone-dicom-sr`` extension, read for issue #18):

- It reads only the "Imaging Measurements" container of a TID 1500 report, merges its
  measurement groups by Tracking Unique Identifier, and makes one measurement of each.
  A group with a SCOORD at its top level is drawn (POINT, MULTIPOINT, POLYLINE,
  CIRCLE, ELLIPSE; a two-point POLYLINE as a line) on the image its single
  ``SELECTED FROM`` IMAGE item names; the NUMs of the group become its labels. A group
  without one becomes a measurement without coordinates that never loads: the viewport
  then dereferences its missing ``ReferencedSOPSequence`` and goes black. Some
  versions look only for SCOORD (not SCOORD3D) at the top level, so every group here
  has a 2D SCOORD on a source CT image.
- It reads the "Image Library" to find the referenced images; some versions fail
  without one, so the images drawn on are listed there.
- Loading a report into its measurement panel ("rehydration", without which the
  panel stays empty and each group is logged as "not rehydratable") needs a tracking
  identifier in cornerstone's ``<toolkit>:<tool>`` form (``PlanarFreehandROI`` for an
  outline, ``Length`` for a two-point line; the structure's name follows, so the text
  still names it), and the group's SCOORD also under its first NUM (INFERRED FROM, as
  TID 300 allows), whose value the panel shows as the drawing's own figure: so an
  outline's group opens with the Area of the section drawn, a lesion's with its long
  axis. The panel's label is the group's Comment (the structure's name).

So nothing without a place goes into a measurement group: structures looked for and
not found are listed as Absent in TID 1500's report-level "Qualitative Evaluations"
container, which OHIF ignores and text renderers show. Containers are written with
separate items (not continuous), so that dcmtk's ``dsr2html`` names every measurement.
SCOORD image coordinates count from the top left corner of the first pixel
(PS3.3 C.18.6.1.2): the pixel-centre indices of :mod:`dicomnode.results.contours` plus
0.5.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode.logs import fields
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import (
    ICH_FINDINGS,
    LOCAL_SCHEME,
    TUMOR_BURDEN,
    TUMOR_TO_LIVER_RATIO,
    Structure,
)
from dicomnode.results.contours import mask_to_polygons, signed_area
from dicomnode.results.measure import (
    VOLUME_DECIMALS,
    LiverMeasurements,
    measure_liver,
    volume_cm3,
)
from dicomnode.results.radiomics import (
    IBSI_SCHEME,
    IBSI_SCHEME_NAME,
    IBSI_SCHEME_ORGANIZATION,
    RadiomicsReport,
)
from dicomnode.results.source import (
    MANUFACTURER,
    check_source_images,
    constructor_source,
    copy_patient_study,
    new_uid,
    object_identity,
    structure_crops,
)

log = logging.getLogger(__name__)

CUBIC_CM = CodedConcept("cm3", "UCUM", "cubic centimeter")
SQUARE_MM = CodedConcept("mm2", "UCUM", "square millimeter")
COMMENT = CodedConcept("121106", "DCM", "Comment")
#: Cornerstone's toolkit tag: the first part of a tracking identifier OHIF can load.
CORNERSTONE_TAG = "Cornerstone3DTools@^0.1.0"
#: The cornerstone tools that draw an outline and a two-point line.
OUTLINE_TOOL, LINE_TOOL = "PlanarFreehandROI", "Length"
MILLIMETER = CodedConcept("mm", "UCUM", "millimeter")
PERCENT = CodedConcept("%", "UCUM", "percent")
LESIONS = CodedConcept("{lesions}", "UCUM", "lesions")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
#: TID 1500 row 12: the report-level container for evaluations outside any group.
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


def tracking_identifier(tool: str, name: str) -> str:
    """A tracking identifier OHIF loads as a ``tool`` measurement and a reader can read.

    Cornerstone's adapters take ``<toolkit>:<tool>`` and anything after it; the
    structure's or lesion's name follows so that text renderings still name the group.
    """
    return f"{CORNERSTONE_TAG}:{tool}:{name}"


def tracked_name(identifier: str) -> str:
    """The structure or lesion name in a tracking identifier (its last part)."""
    return identifier.rsplit(":", 1)[-1]


def _for_viewers(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations, name: str
                 ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """Put the group's SCOORD also under its first NUM, and its name as a Comment.

    Cornerstone's SR adapters read a measurement's coordinates from its first NUM
    (TID 300 INFERRED FROM) and its label from a Comment; highdicom writes the region
    only at the group's top level (TID 1410), which OHIF still uses to draw it.
    """
    items = group[0].ContentSequence  # a template is a list: its one container
    scoord = next(item for item in items if item.ValueType == "SCOORD")
    first_num = next(item for item in items if item.ValueType == "NUM")
    inferred = copy.deepcopy(scoord)
    inferred.RelationshipType = "INFERRED FROM"
    if "ContentSequence" not in first_num:
        first_num.ContentSequence = DicomSequence()
    first_num.ContentSequence.append(inferred)
    items.append(hd.sr.TextContentItem(
        name=COMMENT, value=name, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _sr_algorithm(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version,
        parameters=[f"{k}={v}" for k, v in algorithm.parameters.items()])


def _observation_context(algorithm: AlgorithmInfo) -> hd.sr.ObservationContext:
    # A stable device UID per algorithm version, so reports from one model group together.
    device_uid = generate_uid(entropy_srcs=[algorithm.name, algorithm.version])
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid, name=algorithm.name, manufacturer_name=MANUFACTURER,
                model_name=algorithm.version)))


def _document(source_images: Sequence[Dataset], evidence: Sequence[Dataset],
              report: hd.sr.MeasurementReport | hd.sr.ContainerContentItem,
              algorithm: AlgorithmInfo,
              series_description: str, series_number: int,
              series_instance_uid: str | None, sop_instance_uid: str | None,
              local_codes: bool, ibsi_codes: bool = False) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.Comprehensive3DSR(
        # patient and study values go in by copy_patient_study, not via highdicom's checks
        evidence=[constructor_source(evidence[0]), *evidence[1:]],
        content=report,
        **object_identity(series_number, series_instance_uid, sop_instance_uid),
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = series_description
    _separate(sr)
    schemes = []
    if local_codes:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = LOCAL_SCHEME
        scheme.CodingSchemeName = "dicomnode local codes"
        scheme.CodingSchemeResponsibleOrganization = "dicomnode"
        schemes.append(scheme)
    if ibsi_codes:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = IBSI_SCHEME
        scheme.CodingSchemeName = IBSI_SCHEME_NAME
        scheme.CodingSchemeResponsibleOrganization = IBSI_SCHEME_ORGANIZATION
        schemes.append(scheme)
    if schemes:
        sr.CodingSchemeIdentificationSequence = DicomSequence(schemes)  # type: ignore[assignment]
    sr.SoftwareVersions = list(algorithm.software_versions)  # type: ignore[assignment]
    copy_patient_study(source_images[0], sr)
    return sr


def _separate(item: Dataset) -> None:
    """Mark every container's items as separate statements (ContinuityOfContent).

    highdicom writes CONTINUOUS, which text renderers (dcmtk's dsr2html) read as one
    running sentence and so drop the concept names: "38.2 cm3" instead of "Volume:
    38.2 cm3". A measurement group's items are separate statements.
    """
    if getattr(item, "ValueType", "CONTAINER") == "CONTAINER" and "ContinuityOfContent" in item:
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _separate(child)


def _segment_numbers(seg: Dataset) -> dict[str, int]:
    return {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}


def _common_box(*boxes: tuple[slice, slice, slice]) -> tuple[slice, slice, slice]:
    """The smallest box holding every non-empty box (empty if all are empty)."""
    kept = [box for box in boxes if all(part.stop > part.start for part in box)]
    if not kept:
        return (slice(0, 0), slice(0, 0), slice(0, 0))
    return tuple(slice(min(box[axis].start for box in kept),  # type: ignore[return-value]
                       max(box[axis].stop for box in kept)) for axis in range(3))


def _uncrop(crop: np.ndarray, box: tuple[slice, slice, slice],
            frame: tuple[slice, slice, slice]) -> np.ndarray:
    """Place a structure's crop (at ``box`` of the full grid) into the larger ``frame``."""
    out = np.zeros(tuple(part.stop - part.start for part in frame), bool)
    if crop.size:
        out[tuple(slice(b.start - f.start, b.stop - f.start)
                  for b, f in zip(box, frame, strict=True))] = crop
    return out


def _finding_sites(structure: Structure) -> list[hd.sr.FindingSite]:
    if structure.is_lesion:
        return []
    return [hd.sr.FindingSite(anatomic_location=structure.type,
                              laterality=structure.laterality)]


def scoord_points(points: np.ndarray) -> np.ndarray:
    """``(row, column)`` pixel indices to SCOORD image coordinates ``(column, row)``.

    The contours and diameters count from the centre of the first pixel; DICOM image
    coordinates (PS3.3 C.18.6.1.2) from its top left corner, so the centre is
    ``(0.5, 0.5)``.
    """
    return np.asarray(points, float)[:, ::-1] + 0.5


def _source_segment(seg: Dataset, number: int) -> hd.sr.SourceImageForMeasurement:
    """The SEG segment a measurement was computed from (INFERRED FROM its IMAGE)."""
    item = hd.sr.SourceImageForMeasurement(str(seg.SOPClassUID), str(seg.SOPInstanceUID))
    item.ReferencedSOPSequence[0].ReferencedSegmentNumber = number
    return item


def _region(image: Dataset, points_rc: np.ndarray) -> hd.sr.ImageRegion:
    """A POLYLINE on one source image from ``(row, column)`` pixel indices."""
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=scoord_points(points_rc),
        source_image=hd.sr.SourceImageForRegion(str(image.SOPClassUID),
                                                str(image.SOPInstanceUID)))


def largest_section_outline(mask: np.ndarray, box: tuple[slice, slice, slice],
                            spacing: tuple[float, float]) -> tuple[int, np.ndarray]:
    """The outer boundary of a structure on the slice where its section is largest.

    Parameters
    ----------
    mask
        The structure's crop ``[z, y, x]`` (non-empty).
    box
        Where the crop lies in the full grid.
    spacing
        ``(row spacing, column spacing)`` in mm.

    Returns
    -------
    (int, numpy.ndarray)
        The slice index in the full grid and a closed polygon (first vertex repeated at
        the end) of ``(row, column)`` pixel indices: the largest outer boundary on that
        slice, traced as the RTSTRUCT contours are (holes and smaller islands left out).
    """
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    polygons = mask_to_polygons(mask[z], spacing)
    outer = [p for p in polygons if signed_area(p) < 0] or polygons
    biggest = max(outer, key=lambda p: abs(signed_area(p)))
    points = biggest + np.array([box[1].start, box[2].start], float)
    return box[0].start + z, np.vstack([points, points[:1]])


def _qualitative_evaluations(absent: Sequence[Structure]) -> hd.sr.ContainerContentItem:
    """TID 1500's report-level "Qualitative Evaluations": each structure Absent."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = []
    for structure in absent:
        item = hd.sr.CodeContentItem(
            name=structure.type, value=codes.SCT.Absent,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        if structure.laterality is not None:
            item.ContentSequence = hd.sr.ContentSequence([hd.sr.CodeContentItem(
                name=codes.SCT.Laterality, value=structure.laterality,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)])
        items.append(item)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_segmentation_sr(
    source_images: Sequence[Dataset],
    seg: Dataset,
    masks: np.ndarray | Mapping[str, np.ndarray],
    structures: Sequence[Structure],
    algorithm: AlgorithmInfo,
    *,
    series_description: str = "AI measurements",
    series_number: int = 902,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    absent: Sequence[Structure] = (),
    radiomics: RadiomicsReport | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 report of per-structure volumes, each drawn on one slice.

    Every measurement group is a planar ROI group (TID 1410) whose region a viewer draws:
    a structure's volume comes with the outline of its largest axial section, on that
    slice, and that section's area. When the table has a ``Liver`` and a lesion
    structure, the report adds one group per lesion (longest axial diameter drawn as
    its two-point line on the slice where it was measured, and the lesion's volume),
    and the tumour structure's group
    carries the lesion count, total tumour burden and tumour-to-liver ratio. Structures
    of ``absent`` (looked for, not found: a resected gland, an organ outside the field)
    and structures of the table with no voxel have nothing to draw: they are listed as
    Absent in the report's Qualitative Evaluations, outside the measurement groups.

    Parameters
    ----------
    source_images
        CT slices sorted in the order of the masks' axis 0.
    seg
        The DICOM-SEG built from the same masks (segments matched by label): each
        volume and diameter refers to the segment it was computed from.
    masks
        Label map ``[z, y, x]`` or mapping from structure name to boolean mask.
    structures
        Structure table.
    algorithm
        The model that produced the masks.
    series_description, series_number
        Of the new SR series.
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones by default.
    absent
        Structures the algorithm looked for and did not find.
    radiomics
        IBSI features per group (by tracking identifier: structure name or
        ``Lesion N``): each becomes a further measurement of that group, coded by its
        IBSI identifier (scheme ``99IBSI``, named in the Coding Scheme Identification
        Sequence) with its UCUM unit, and identified as computed by MIRP with the
        settings (resampling, bin width, aggregation) as algorithm parameters.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    geometry = check_source_images(source_images)
    crops = structure_crops(masks, structures, geometry)
    numbers = _segment_numbers(seg)
    missing = [s.name for s, _, m in crops if m.any() and s.name not in numbers]
    if missing:
        raise ValueError(f"Invalid 'seg' value - no segment labelled '{missing[0]}'")
    found = [(s, box, m) for s, box, m in crops if m.any()]
    if not found:
        raise ValueError("Invalid 'masks' value - no structure has a voxel; a report "
                         "without a region cannot be shown (send the no-result report)")
    not_found = [*absent, *(s for s, _, m in crops if not m.any())]
    algorithm_id = _sr_algorithm(algorithm)
    boxes = {s.name: box for s, box, _ in found}
    by_name = {s.name: m for s, _, m in found}
    liver = next((s for s, _, _ in found if s.name == "Liver"), None)
    tumour = next((s for s, _, _ in found if s.is_lesion), None)
    liver_stats: LiverMeasurements | None = None
    if liver is not None and tumour is not None:
        # Measured on the box around both (counts and lesions do not depend on the
        # empty voxels outside it), not on two full-size copies of the grid.
        frame = _common_box(boxes[liver.name], boxes[tumour.name])
        liver_stats = measure_liver(
            _uncrop(by_name[liver.name], boxes[liver.name], frame),
            _uncrop(by_name[tumour.name], boxes[tumour.name], frame), geometry,
            z_offset=frame[0].start, yx_offset=(frame[1].start, frame[2].start))

    drawn: set[int] = set()

    def region(z: int, points: np.ndarray) -> hd.sr.ImageRegion:
        drawn.add(z)
        return _region(source_images[z], points)

    groups: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for structure, box, mask in found:
        z, outline = largest_section_outline(mask, box, geometry.spacing)
        section_mm2 = abs(signed_area(outline[:-1])) * geometry.spacing[0] * geometry.spacing[1]
        measurements = [hd.sr.Measurement(
            name=codes.SCT.Area, value=round(section_mm2, 1), unit=SQUARE_MM,
            algorithm_id=algorithm_id), hd.sr.Measurement(
            name=codes.SCT.Volume, value=round(volume_cm3(mask, geometry), VOLUME_DECIMALS),
            unit=CUBIC_CM, algorithm_id=algorithm_id,
            referenced_images=[_source_segment(seg, numbers[structure.name])])]
        if liver_stats is not None and structure is tumour:
            measurements += [
                hd.sr.Measurement(name=codes.SCT.NumberOfLesions,
                                  value=len(liver_stats.lesions), unit=LESIONS,
                                  algorithm_id=algorithm_id),
                hd.sr.Measurement(name=TUMOR_BURDEN,
                                  value=round(liver_stats.tumour_burden_cm3, VOLUME_DECIMALS),
                                  unit=CUBIC_CM, algorithm_id=algorithm_id),
                hd.sr.Measurement(name=TUMOR_TO_LIVER_RATIO,
                                  value=round(liver_stats.tumour_to_liver_percent, 3),
                                  unit=PERCENT, algorithm_id=algorithm_id),
            ]
        groups.append(_for_viewers(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=new_uid(), identifier=tracking_identifier(OUTLINE_TOOL, structure.name)),
            referenced_region=region(z, outline),
            finding_type=structure.type,
            finding_category=structure.category,
            finding_sites=_finding_sites(structure) or None,
            algorithm_id=algorithm_id,
            measurements=measurements,
        ), structure.name))
    if liver_stats is not None and tumour is not None:
        tumour_segment = _source_segment(seg, numbers[tumour.name])
        for lesion in liver_stats.lesions:
            assert lesion.diameter is not None  # a lesion has at least one voxel
            name = f"Lesion {lesion.number}"
            groups.append(_for_viewers(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=new_uid(), identifier=tracking_identifier(LINE_TOOL, name)),
                referenced_region=region(lesion.diameter.slice_index,
                                         np.array(lesion.diameter.ends)),
                finding_type=tumour.type,
                finding_category=tumour.category,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Liver)],
                algorithm_id=algorithm_id,
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.LongAxis, value=lesion.diameter_mm,
                                      unit=MILLIMETER, algorithm_id=algorithm_id,
                                      referenced_images=[tumour_segment]),
                    hd.sr.Measurement(name=codes.SCT.Volume,
                                      value=lesion.reported_volume_cm3, unit=CUBIC_CM,
                                      algorithm_id=algorithm_id,
                                      referenced_images=[tumour_segment]),
                ],
            ), name))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=[source_images[z] for z in sorted(drawn)],
    )
    if not_found:
        report[0].ContentSequence.append(_qualitative_evaluations(not_found))
    sr = _document(source_images, [*source_images, seg], report, algorithm,
                   series_description, series_number, series_instance_uid, sop_instance_uid,
                   local_codes=liver_stats is not None,
                   ibsi_codes=bool(radiomics and any(radiomics.structures.values())))
    if radiomics is not None:
        _add_radiomics(sr, radiomics)
    log.info("sr.built", extra=fields(sop=str(sr.SOPInstanceUID), groups=len(groups),
                                      absent=len(not_found)))
    return sr


#: UCUM code -> code meaning, for the units of the radiomics features.
_UCUM_MEANINGS = {"1": "no units", "mm": "millimeter", "mm2": "square millimeter",
                  "mm3": "cubic millimeter", "/mm": "per millimeter",
                  "[hnsf'U]": "Hounsfield unit", "[hnsf'U]2": "Hounsfield unit squared",
                  "[hnsf'U].mm3": "Hounsfield unit cubic millimeter"}


def _add_radiomics(sr: Dataset, radiomics: RadiomicsReport) -> None:
    """Append each group's features to its measurement group of a built report.

    Added after highdicom has built the document: its constructor searches the whole
    content tree once per referenced item, which for ~130 features a structure took
    longer than the features themselves (15 s for 500). The items are highdicom's own
    measurements (TID 300), so the report reads back the same.
    """
    (container,) = [item for item in sr.ContentSequence
                    if item.ConceptNameCodeSequence[0].CodeValue == "126010"]
    for group in container.ContentSequence:
        names = [str(item.TextValue) for item in group.get("ContentSequence", [])
                 if item.ValueType == "TEXT"
                 and item.ConceptNameCodeSequence[0].CodeValue == "112039"]
        if names:
            for measurement in _radiomics_measurements(radiomics, tracked_name(names[0])):
                group.ContentSequence.extend(measurement)


def _radiomics_measurements(radiomics: RadiomicsReport | None,
                            group: str) -> list[hd.sr.Measurement]:
    """The IBSI features of one group as TID 300 measurements (none when absent)."""
    if radiomics is None or not radiomics.structures.get(group):
        return []
    mirp = hd.sr.AlgorithmIdentification(
        name="MIRP", version=radiomics.library.split()[-1],
        parameters=radiomics.parameters.describe())
    return [hd.sr.Measurement(
        name=CodedConcept(f.ibsi_id, IBSI_SCHEME, f.meaning), value=f.value,
        unit=CodedConcept(f.unit, "UCUM", _UCUM_MEANINGS.get(f.unit, f.unit)),
        algorithm_id=mirp) for f in radiomics.structures[group]]


@dataclass(frozen=True)
class IchResult:
    """The ICH pipeline's output for one finding.

    Attributes
    ----------
    key
        One of ``any, epidural, intraparenchymal, intraventricular, subarachnoid,
        subdural``.
    probability
        Study-level probability in [0, 1].
    present
        The decision (probability at or above the pipeline's threshold).
    slice_indices
        Indices of the source slices flagged for this finding.
    peak_slice
        Index of the slice the model rated most likely for this finding, if the
        pipeline gives it: the slice the report shows the finding on when no slice is
        flagged (else the middle slice of the series), and first among flagged ones.
    slice_probabilities
        The finding's probability on each of those slices (same order), or empty.
    """

    key: str
    probability: float
    present: bool
    slice_indices: tuple[int, ...] = field(default_factory=tuple)
    peak_slice: int | None = None
    slice_probabilities: tuple[float, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        keys = [f.key for f in ICH_FINDINGS]
        if self.key not in keys:
            raise ValueError(f"Invalid 'key' value '{self.key}' - must be one of {keys}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(
                f"Invalid 'probability' value '{self.probability}' - must be in [0, 1]")
        if self.slice_probabilities and (
                len(self.slice_probabilities) != len(self.slice_indices)
                or not all(0.0 <= p <= 1.0 for p in self.slice_probabilities)):
            raise ValueError(f"Invalid 'slice_probabilities' value for '{self.key}' - one "
                             "probability in [0, 1] per flagged slice")


def build_ich_sr(
    source_images: Sequence[Dataset],
    results: Sequence[IchResult],
    algorithm: AlgorithmInfo,
    *,
    series_description: str = "AI haemorrhage report",
    series_number: int = 903,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    radiomics: RadiomicsReport | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 report of the six ICH findings.

    Each finding is one planar ROI group (TID 1410) with its probability (DCM 122157)
    and a qualitative evaluation Present/Absent, whose region is the whole of one slice
    (a slice classifier does not localise): the peak flagged slice, else the peak slice,
    else the middle slice of the series. Where given, each flagged slice's own
    probability follows as a further Probability measurement referencing that slice.
    One group per finding is one measurement in a viewer's panel (OHIF lists each
    group), drawn on its slice and labelled with the finding, the decision and the
    probability (:func:`_for_viewers`); the flagged slices are also the KOS's.

    Parameters
    ----------
    source_images
        The head CT slices, in the order the slice indices refer to.
    results
        One :class:`IchResult` per finding (any subset of the six, each at most once).
    algorithm
        The model that produced the findings.
    series_description, series_number
        Of the new SR series.
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones by default.
    radiomics
        IBSI features of the segmented haemorrhage (group
        ``Hemorrhage_Intracranial``), as further measurements of the first group of the
        ``any`` finding (coded as in :func:`build_segmentation_sr`).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    check_source_images(source_images)
    if not results:
        raise ValueError("Invalid 'results' value '[]' - at least one finding is required")
    keys = [r.key for r in results]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Invalid 'results' value '{keys}' - a finding is repeated")
    findings = {f.key: f for f in ICH_FINDINGS}
    algorithm_id = _sr_algorithm(algorithm)
    groups = []
    shown: set[int] = set()
    for result in results:
        wanted = [*result.slice_indices,
                  *(() if result.peak_slice is None else (result.peak_slice,))]
        bad = [i for i in wanted if not 0 <= i < len(source_images)]
        if bad:
            raise ValueError(f"Invalid 'slice_indices' value '{bad[0]}' for '{result.key}' - "
                             f"the series has {len(source_images)} slices")
        slices = _ich_slices(result, len(source_images))
        shown.add(slices[0])  # the Image Library lists the slices drawn on
        code = findings[result.key].code
        per_slice = dict(zip(result.slice_indices if result.slice_probabilities else (),
                             (float(p) for p in result.slice_probabilities), strict=True))
        label = (f"{code.meaning}: {'present' if result.present else 'absent'} "
                 f"(probability {result.probability:.2f})")
        groups.append(_for_viewers(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=new_uid(), identifier=tracking_identifier(OUTLINE_TOOL, result.key)),
            referenced_region=_whole_slice(source_images[slices[0]]),
            finding_type=code,
            algorithm_id=algorithm_id,
            measurements=[
                hd.sr.Measurement(name=codes.DCM.Probability, value=round(result.probability, 4),
                                  unit=NO_UNITS, algorithm_id=algorithm_id),
                *(hd.sr.Measurement(
                    name=codes.DCM.Probability, value=round(per_slice[z], 4), unit=NO_UNITS,
                    referenced_images=[hd.sr.SourceImageForMeasurement(
                        source_images[z].SOPClassUID, source_images[z].SOPInstanceUID)])
                  for z in slices if z in per_slice),
                *(_radiomics_measurements(radiomics, "Hemorrhage_Intracranial")
                  if result.key == "any" else [])],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=code, value=codes.SCT.Present if result.present else codes.SCT.Absent)],
        ), label))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=[source_images[z] for z in sorted(shown)],
    )
    sr = _document(source_images, source_images, report, algorithm, series_description,
                   series_number, series_instance_uid, sop_instance_uid, local_codes=True,
                   ibsi_codes=bool(radiomics and radiomics.structures.get(
                       "Hemorrhage_Intracranial")) and "any" in keys)
    log.info("sr.built", extra=fields(sop=str(sr.SOPInstanceUID), groups=len(groups)))
    return sr


def _ich_slices(result: IchResult, n_slices: int) -> list[int]:
    """The slices a finding is shown on, the one to open first at the head.

    The flagged slices, led by the peak slice (or the middle flagged one); with none
    flagged, the peak slice, else the middle slice of the series: a slice classifier
    finds slices, not places, and a viewer needs one image to show each finding on.
    """
    flagged = sorted(set(result.slice_indices))
    if not flagged:
        return [n_slices // 2 if result.peak_slice is None else result.peak_slice]
    first = (result.peak_slice if result.peak_slice in flagged
             else flagged[len(flagged) // 2])
    return [first, *(z for z in flagged if z != first)]


def _whole_slice(image: Dataset) -> hd.sr.ImageRegion:
    """A closed POLYLINE along the edges of the image: the whole slice is the region."""
    rows, cols = int(image.Rows), int(image.Columns)
    corners = np.array([[0, 0], [0, cols], [rows, cols], [rows, 0], [0, 0]], float) - 0.5
    return _region(image, corners)


def build_no_result_sr(
    source_images: Sequence[Dataset],
    title: str,
    reason: str,
    algorithm: AlgorithmInfo,
    *,
    series_description: str = "AI no result",
    series_number: int = 904,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a text report saying that an AI pipeline produced no result, and why.

    A Diagnostic Imaging Report (TID 2000 layout: the algorithm as the observing device,
    one Findings section with one text Finding), which any viewer that shows SR text
    shows as it is. Sent where the site wants a reader to see that the series was
    analysed and nothing is reported for it (no liver found, a volume too small or too
    large), rather than nothing at all.

    Parameters
    ----------
    source_images
        The series the pipeline was given (all listed as evidence).
    title
        What the result would have been, e.g. ``"AI liver"``.
    reason
        Why there is no result, in words a reader understands (no patient data).
    algorithm
        The model that ran.
    series_description, series_number, series_instance_uid, sop_instance_uid
        Of the new SR series, as for :func:`build_segmentation_sr`.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    check_source_images(source_images)
    if not reason.strip():
        raise ValueError("Invalid 'reason' value '' - say why there is no result")
    text = (f"{title}: no result. {reason[0].upper()}{reason[1:].rstrip('.')}. "
            f"The series ({len(source_images)} images) was analysed by "
            f"{algorithm.describe()}; no segmentation or measurement was produced for it.")
    finding = hd.sr.TextContentItem(name=codes.DCM.Finding, value=text,
                                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    findings = hd.sr.ContainerContentItem(
        name=codes.DCM.Findings, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    findings.ContentSequence = hd.sr.ContentSequence([finding])
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport,
                                      template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence([*_observation_context(algorithm), findings])
    sr = _document(source_images, source_images, root, algorithm, series_description,
                   series_number, series_instance_uid, sop_instance_uid, local_codes=False)
    log.info("sr.built", extra=fields(sop=str(sr.SOPInstanceUID), groups=0))
    return sr
