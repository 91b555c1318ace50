"""DICOM Segmentation (BINARY) from masks, one segment per structure, via highdicom.

Known viewer failures this avoids: frames are never omitted (every source slice has a
frame for every segment, also when empty), frames follow the source slices in the
order given, and the geometry is taken from the source images themselves, so OHIF,
Weasis and Slicer show each segment on its own slice and unmirrored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from dicomnode.logs import fields
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import Structure
from dicomnode.results.source import (
    MODEL_NAME,
    check_label_map,
    check_source_images,
    constructor_source,
    copy_patient_study,
    new_uid,
    object_identity,
    structure_masks,
)

log = logging.getLogger(__name__)


def segment_description(number: int, structure: Structure,
                        algorithm: AlgorithmInfo) -> hd.seg.SegmentDescription:
    """Segment Description of one structure: TG-263 label, SNOMED CT codes, colour.

    Parameters
    ----------
    number
        Segment Number (1-based, consecutive).
    structure
        The structure (name, category/type codes, laterality, colour).
    algorithm
        The model that produced it.

    Returns
    -------
    highdicom.seg.SegmentDescription
    """
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.name,
        segmented_property_category=structure.category,
        segmented_property_type=structure.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.identification(),
        tracking_uid=new_uid(),
        tracking_id=structure.name,
        display_color=hd.color.CIELabColor.from_rgb(*structure.color),
    )
    if structure.laterality is not None:
        # The modifier belongs inside the Segmented Property Type Code Sequence item.
        lat = structure.laterality
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence \
            = DicomSequence([CodedConcept(lat.value, lat.scheme_designator, lat.meaning)])
    return description


def _frames_in_source_order(seg: hd.seg.Segmentation, source_uids: list[str]) -> None:
    """Reorder frames segment by segment in the order of the source slices.

    highdicom sorts planes along its own normal convention, which for an ascending
    series is the reverse of the source order; viewers that pair frames with source
    images by position in the list then show them on the wrong slice.
    """
    n_frames = int(seg.NumberOfFrames)
    position = {uid: i for i, uid in enumerate(source_uids)}
    shared = seg.SharedFunctionalGroupsSequence[0]

    def group(item: Dataset, keyword: str) -> Dataset:
        # A macro that is the same for every frame (the one segment of a one-structure
        # SEG) sits in the shared functional groups instead of each frame's.
        return (item if keyword in item else shared).get(keyword)[0]

    keys = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        segment = int(group(item, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        uid = str(group(item, "DerivationImageSequence").SourceImageSequence[0]
                  .ReferencedSOPInstanceUID)
        keys.append((segment, position[uid]))
    order = sorted(range(n_frames), key=keys.__getitem__)
    if order == list(range(n_frames)):
        return
    frame_bits = int(seg.Rows) * int(seg.Columns)
    data = np.frombuffer(seg.PixelData, np.uint8)
    if frame_bits % 8 == 0:
        frames = data[: n_frames * frame_bits // 8].reshape(n_frames, frame_bits // 8)
        packed = frames[order].tobytes()
    else:
        bits = np.unpackbits(data, bitorder="little")[: n_frames * frame_bits]
        packed = np.packbits(bits.reshape(n_frames, frame_bits)[order].ravel(),
                             bitorder="little").tobytes()
    if len(packed) % 2:
        packed += b"\x00"
    items = list(seg.PerFrameFunctionalGroupsSequence)
    seg.PerFrameFunctionalGroupsSequence = DicomSequence(  # type: ignore[assignment]
        [items[i] for i in order])
    seg.PixelData = packed


def build_seg(
    source_images: Sequence[Dataset],
    masks: np.ndarray | Mapping[str, np.ndarray],
    structures: Sequence[Structure],
    algorithm: AlgorithmInfo,
    *,
    series_description: str = "AI segmentation",
    series_number: int = 900,
    content_label: str = "AI_SEGMENTATION",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM-SEG with one segment per structure.

    Parameters
    ----------
    source_images
        CT slices sorted in the order of the masks' axis 0.
    masks
        Label map ``[z, y, x]`` (values are ``Structure.label``) or mapping from
        structure name to boolean mask ``[z, y, x]`` (masks may overlap).
    structures
        Structure table; segment ``i`` is the ``i``-th structure present in ``masks``.
    algorithm
        The model that produced the masks (Algorithm Identification of every segment).
    series_description
        Series Description, e.g. ``"AI OAR segmentation"``.
    series_number
        Series Number of the new series.
    content_label
        Content Label (CS, at most 16 characters, upper case).
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones by default.

    Returns
    -------
    highdicom.seg.Segmentation
        A pydicom Dataset; frames for all slices and segments, in source order.
    """
    geometry = check_source_images(source_images)
    if not content_label or len(content_label) > 16 or content_label != content_label.upper():
        raise ValueError(f"Invalid 'content_label' value '{content_label}' - "
                         "must be 1 to 16 upper-case characters")
    if series_number < 0:
        raise ValueError(f"Invalid 'series_number' value '{series_number}' - must be >= 0")
    if isinstance(masks, Mapping):
        pairs = structure_masks(masks, structures, geometry)
        included = [s for s, _ in pairs]
        stack = np.stack([m for _, m in pairs], axis=-1).astype(np.uint8)
        pixels: np.ndarray = stack
    else:
        # A label map cannot overlap: hand highdicom segment numbers directly (fast path).
        labels = check_label_map(np.asarray(masks), structures, geometry)
        included = list(structures)
        lut = np.zeros(max(256, int(labels.max()) + 1), np.uint8)
        for number, s in enumerate(included, start=1):
            lut[s.label] = number
        if labels.dtype == np.uint8 and all(s.label == number
                                            for number, s in enumerate(included, start=1)):
            # Labels already are the segment numbers (the pipelines' case): the lookup
            # would copy the same values (0.2 s for 512x512x300); highdicom only reads.
            pixels = labels
        else:
            pixels = lut[labels]
    descriptions = [segment_description(i, s, algorithm) for i, s in enumerate(included, 1)]
    seg = hd.seg.Segmentation(
        # patient and study values go in by copy_patient_study, not via highdicom's checks
        source_images=[constructor_source(source_images[0]), *source_images[1:]],
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **object_identity(series_number, series_instance_uid, sop_instance_uid),
        manufacturer_model_name=MODEL_NAME,
        software_versions=list(algorithm.software_versions),  # type: ignore[arg-type]
        device_serial_number="0",
        content_description=f"Generated by {algorithm.describe()}"[:64],
        content_label=content_label,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
    )
    seg.SeriesDescription = series_description
    _frames_in_source_order(seg, [str(im.SOPInstanceUID) for im in source_images])
    copy_patient_study(source_images[0], seg)
    log.info("seg.built", extra=fields(sop=str(seg.SOPInstanceUID), segments=len(included),
                                       frames=int(seg.NumberOfFrames)))
    return seg


def seg_reference(source_images: Sequence[Dataset], structures: Sequence[Structure], *,
                  series_instance_uid: str, sop_instance_uid: str) -> Dataset:
    """What a report needs of the SEG that :func:`build_seg` makes of a label map.

    Its identity (study, series and instance UIDs, SOP class) and its segments (number
    and label), without frames: the SR of a result can be built while the SEG itself is
    being written elsewhere with the same UIDs.

    Parameters
    ----------
    source_images
        The CT slices the SEG is built from.
    structures
        The structure table given to :func:`build_seg` with a label map (segment ``i``
        is its ``i``-th structure).
    series_instance_uid, sop_instance_uid
        The UIDs the SEG is built with.

    Returns
    -------
    pydicom.dataset.Dataset
    """
    ds = Dataset()
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyInstanceUID = source_images[0].StudyInstanceUID
    segments = []
    for number, structure in enumerate(structures, start=1):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = structure.name
        segments.append(item)
    ds.SegmentSequence = DicomSequence(segments)  # type: ignore[assignment]
    return ds
