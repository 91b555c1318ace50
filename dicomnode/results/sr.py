"""TID 1500 Measurement Reports (Comprehensive 3D SR) via highdicom.sr.

Two reports: ``build_segmentation_sr`` gives one volumetric measurement group per
structure, referencing its SEG segment (and for the liver pipeline: lesions with
volume and longest axial diameter, lesion count, total tumour burden and tumour-to-liver
ratio); ``build_ich_sr`` gives one group per haemorrhage finding with its probability,
a present/absent evaluation and the flagged slices as source images. Both carry the
algorithm identification and a device observer context naming the model.
"""

from __future__ import annotations

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
from dicomnode.results.measure import LiverMeasurements, measure_liver, volume_cm3
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
MILLIMETER = CodedConcept("mm", "UCUM", "millimeter")
PERCENT = CodedConcept("%", "UCUM", "percent")
LESIONS = CodedConcept("{lesions}", "UCUM", "lesions")
NO_UNITS = CodedConcept("1", "UCUM", "no units")


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
              local_codes: bool) -> hd.sr.Comprehensive3DSR:
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
    if local_codes:
        scheme = Dataset()
        scheme.CodingSchemeDesignator = LOCAL_SCHEME
        scheme.CodingSchemeName = "dicomnode local codes"
        scheme.CodingSchemeResponsibleOrganization = "dicomnode"
        sr.CodingSchemeIdentificationSequence = DicomSequence([scheme])  # type: ignore[assignment]
    sr.SoftwareVersions = list(algorithm.software_versions)  # type: ignore[assignment]
    copy_patient_study(source_images[0], sr)
    return sr


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
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 report of per-structure volumes referencing the SEG segments.

    When the table has a ``Liver`` and a lesion structure, the report adds one group
    per lesion (volume, longest axial diameter), the lesion count, the total tumour
    burden and the tumour-to-liver ratio. Each structure of ``absent`` (looked for, not
    found: a resected gland, an organ outside the field) gets a group of its own that
    says so (qualitative evaluation Absent), so a reader knows it was not forgotten.

    Parameters
    ----------
    source_images
        CT slices sorted in the order of the masks' axis 0.
    seg
        The DICOM-SEG built from the same masks (segments matched by label).
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

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    geometry = check_source_images(source_images)
    crops = structure_crops(masks, structures, geometry)
    pairs = [(s, m) for s, _, m in crops]
    boxes = {s.name: box for s, box, _ in crops}
    numbers = _segment_numbers(seg)
    missing = [s.name for s, _ in pairs if s.name not in numbers]
    if missing:
        raise ValueError(f"Invalid 'seg' value - no segment labelled '{missing[0]}'")
    source_series = hd.sr.SourceSeriesForSegmentation(source_images[0].SeriesInstanceUID)
    algorithm_id = _sr_algorithm(algorithm)

    def referenced(structure: Structure) -> hd.sr.ReferencedSegment:
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
            segment_number=numbers[structure.name], source_series=source_series)

    by_name = {s.name: m for s, m in pairs}
    liver = next((s for s, _ in pairs if s.name == "Liver"), None)
    tumour = next((s for s, _ in pairs if s.is_lesion), None)
    liver_stats: LiverMeasurements | None = None
    if liver is not None and tumour is not None:
        # Measured on the box around both (counts and lesions do not depend on the
        # empty voxels outside it), not on two full-size copies of the grid.
        frame = _common_box(boxes[liver.name], boxes[tumour.name])
        liver_stats = measure_liver(
            _uncrop(by_name[liver.name], boxes[liver.name], frame),
            _uncrop(by_name[tumour.name], boxes[tumour.name], frame), geometry,
            z_offset=frame[0].start)

    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for structure, mask in pairs:
        measurements = [hd.sr.Measurement(
            name=codes.SCT.Volume, value=round(volume_cm3(mask, geometry), 3),
            unit=CUBIC_CM, algorithm_id=algorithm_id)]
        if liver_stats is not None and structure is tumour:
            measurements += [
                hd.sr.Measurement(name=codes.SCT.NumberOfLesions,
                                  value=len(liver_stats.lesions), unit=LESIONS,
                                  algorithm_id=algorithm_id),
                hd.sr.Measurement(name=TUMOR_BURDEN,
                                  value=round(liver_stats.tumour_burden_cm3, 3),
                                  unit=CUBIC_CM, algorithm_id=algorithm_id),
                hd.sr.Measurement(name=TUMOR_TO_LIVER_RATIO,
                                  value=round(liver_stats.tumour_to_liver_percent, 3),
                                  unit=PERCENT, algorithm_id=algorithm_id),
            ]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(),
                                                         identifier=structure.name),
            referenced_segment=referenced(structure),
            finding_type=structure.type,
            finding_category=structure.category,
            finding_sites=_finding_sites(structure) or None,
            algorithm_id=algorithm_id,
            measurements=measurements,
        ))
    if liver_stats is not None and tumour is not None:
        for lesion in liver_stats.lesions:
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=new_uid(), identifier=f"Lesion {lesion.number}"),
                referenced_segment=referenced(tumour),
                finding_type=tumour.type,
                finding_category=tumour.category,
                finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Liver)],
                algorithm_id=algorithm_id,
                measurements=[
                    hd.sr.Measurement(name=codes.SCT.Volume,
                                      value=round(lesion.volume_cm3, 3), unit=CUBIC_CM,
                                      algorithm_id=algorithm_id),
                    hd.sr.Measurement(name=codes.SCT.LongAxis,
                                      value=round(lesion.longest_axial_diameter_mm, 2),
                                      unit=MILLIMETER, algorithm_id=algorithm_id),
                ],
            ))
    for structure in absent:
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(  # type: ignore[arg-type]
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=new_uid(), identifier=f"{structure.name} not found"),
            finding_type=structure.type,
            finding_category=structure.category,
            finding_sites=_finding_sites(structure) or None,
            algorithm_id=algorithm_id,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=structure.type, value=codes.SCT.Absent)],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = _document(source_images, [*source_images, seg], report, algorithm,
                   series_description, series_number, series_instance_uid, sop_instance_uid,
                   local_codes=liver_stats is not None)
    log.info("sr.built", extra=fields(sop=str(sr.SOPInstanceUID), groups=len(groups)))
    return sr


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
    slice_probabilities
        The finding's probability on each of those slices (same order), or empty.
    """

    key: str
    probability: float
    present: bool
    slice_indices: tuple[int, ...] = field(default_factory=tuple)
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
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 report of the six ICH findings.

    Each finding is a measurement group with its probability (DCM 122157), a
    qualitative evaluation Present/Absent, and the flagged slices as source images;
    where given, each flagged slice's own probability follows the study's as a further
    Probability measurement referencing that slice.

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
    for result in results:
        bad = [i for i in result.slice_indices if not 0 <= i < len(source_images)]
        if bad:
            raise ValueError(f"Invalid 'slice_indices' value '{bad[0]}' for '{result.key}' - "
                             f"the series has {len(source_images)} slices")
        flagged = [source_images[i] for i in sorted(set(result.slice_indices))]
        code = findings[result.key].code
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(),
                                                         identifier=result.key),
            finding_type=code,
            algorithm_id=algorithm_id,
            measurements=[hd.sr.Measurement(
                name=codes.DCM.Probability, value=round(result.probability, 4),
                unit=NO_UNITS, algorithm_id=algorithm_id), *(
                hd.sr.Measurement(
                    name=codes.DCM.Probability, value=round(float(p), 4), unit=NO_UNITS,
                    algorithm_id=algorithm_id,
                    referenced_images=[hd.sr.SourceImageForMeasurement(
                        source_images[i].SOPClassUID, source_images[i].SOPInstanceUID)])
                for i, p in zip(result.slice_indices if result.slice_probabilities else (),
                                result.slice_probabilities, strict=True))],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(
                name=code,
                value=codes.SCT.Present if result.present else codes.SCT.Absent)],
            source_images=[hd.sr.SourceImageForMeasurementGroup(
                im.SOPClassUID, im.SOPInstanceUID) for im in flagged] or None,
        ))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = _document(source_images, source_images, report, algorithm, series_description,
                   series_number, series_instance_uid, sop_instance_uid, local_codes=True)
    log.info("sr.built", extra=fields(sop=str(sr.SOPInstanceUID), groups=len(groups)))
    return sr


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
