"""The source series a result refers to: checks, slice geometry, copied modules, DS values.

Every result object is filed by the PACS under the source's patient and study, so the
Patient and General Study modules are copied verbatim; the geometry (one origin per
slice, row/column directions, pixel spacing) is what contours and masks are mapped with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import PersonName, format_number_as_ds
from scipy import ndimage

from dicomnode.logs import fields
from dicomnode.results.codes import Structure

log = logging.getLogger(__name__)

#: Patient module (and patient-identification) attributes copied into every result.
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence", "PatientAge", "PatientSize",
    "PatientWeight", "EthnicGroup", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
)
#: General Study module attributes copied into every result.
STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
)
#: Of these, the ones that are type 2 (must be present, may be empty).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")

MANUFACTURER = "dicomnode"
MODEL_NAME = "dicomnode AI node"
_ORIENTATION_TOL = 1e-4
_SPACING_TOL = 1e-3


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry of a series of parallel slices, in the order of the mask's axis 0.

    Attributes
    ----------
    origins
        ``(n, 3)`` ImagePositionPatient of each slice (centre of its first pixel), mm.
    row_direction
        Unit vector along a row (increasing column index), patient coordinates.
    column_direction
        Unit vector down a column (increasing row index).
    spacing
        ``(row spacing, column spacing)`` in mm: PixelSpacing as DICOM orders it.
    shape
        ``(slices, rows, columns)``.
    """

    origins: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    spacing: tuple[float, float]
    shape: tuple[int, int, int]

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the slices (row direction x column direction)."""
        n = np.cross(self.row_direction, self.column_direction)
        return n / np.linalg.norm(n)

    @property
    def slice_spacing(self) -> float:
        """Mean distance between adjacent slices along the normal (mm); 1 for one slice."""
        if len(self.origins) < 2:
            return 1.0
        return float(np.mean(np.abs(np.diff(self.origins @ self.normal))))

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3."""
        return self.spacing[0] * self.spacing[1] * self.slice_spacing

    def to_patient(self, slice_index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Map (row, column) pixel coordinates on one slice to patient coordinates (mm).

        Parameters
        ----------
        slice_index
            Index along axis 0.
        rows, cols
            Fractional pixel indices (0 = centre of the first pixel).

        Returns
        -------
        numpy.ndarray
            ``(n, 3)`` points in mm.
        """
        o = self.origins[slice_index]
        return (o[None, :]
                + np.asarray(cols, float)[:, None] * self.spacing[1] * self.row_direction[None, :]
                + np.asarray(rows, float)[:, None] * self.spacing[0]
                * self.column_direction[None, :])


def check_source_images(source_images: Sequence[Dataset]) -> SliceGeometry:
    """Check that the source images form one series of parallel, equal-sized slices.

    Parameters
    ----------
    source_images
        CT slices in the order of the mask's axis 0 (ascending or descending along the
        slice normal, but monotonic).

    Returns
    -------
    SliceGeometry
        The geometry the masks are mapped with.

    Raises
    ------
    ValueError
        Naming the attribute that is missing or inconsistent.
    """
    if len(source_images) == 0:
        raise ValueError("Invalid 'source_images' value '[]' - at least one image is required")
    first = source_images[0]
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
                    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                    "Rows", "Columns", "SOPInstanceUID", "SOPClassUID"):
        missing = [i for i, ds in enumerate(source_images) if keyword not in ds]
        if missing:
            raise ValueError(
                f"Invalid 'source_images' value - '{keyword}' missing in image {missing[0]}")
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        values = {ds[keyword].value for ds in source_images}
        if len(values) != 1:
            raise ValueError(
                f"Invalid 'source_images' value - '{keyword}' differs between images: "
                f"{sorted(map(str, values))[:3]}")
    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in source_images])
    spacing = np.array([[float(v) for v in ds.PixelSpacing] for ds in source_images])
    if np.abs(iop - iop[0]).max() > _ORIENTATION_TOL:
        raise ValueError("Invalid 'source_images' value - 'ImageOrientationPatient' differs")
    if np.abs(spacing - spacing[0]).max() > _SPACING_TOL:
        raise ValueError("Invalid 'source_images' value - 'PixelSpacing' differs")
    if (spacing[0] <= 0).any():
        raise ValueError(f"Invalid 'PixelSpacing' value '{list(spacing[0])}' - must be positive")
    row = iop[0, :3] / np.linalg.norm(iop[0, :3])
    col = iop[0, 3:] / np.linalg.norm(iop[0, 3:])
    origins = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in source_images])
    geometry = SliceGeometry(origins, row, col, (float(spacing[0, 0]), float(spacing[0, 1])),
                             (len(source_images), int(first.Rows), int(first.Columns)))
    if len(origins) > 1:
        steps = np.diff(origins @ geometry.normal)
        if not ((steps > 1e-3).all() or (steps < -1e-3).all()):
            raise ValueError(
                "Invalid 'source_images' value - slices are not sorted along the normal of "
                "'ImageOrientationPatient' (or two slices share a position)")
    return geometry


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient and General Study modules from a source image into a result.

    Each value is copied as it came, with the source's Specific Character Set: the
    PACS files the result under the same patient and study by these values, so a
    multi-valued PatientName, ideographic name groups or an AccessionNumber longer than
    its VR allows go through unchanged. A value that cannot be read or written at all
    (bytes that are not text in the declared character set, an element pydicom cannot
    decode) is left out, a type 2 attribute kept present and empty, with a warning
    that names the keyword, never the value: one empty attribute is better than no
    result. Attributes already set in ``target`` are overwritten; type 2 attributes
    absent in the source are added empty.
    """
    for keyword in PATIENT_KEYWORDS + STUDY_KEYWORDS:
        if keyword in source:
            element = _copyable(source, keyword)
            if element is not None:
                target[keyword] = element
                continue
            log.warning("result.source_value_dropped", extra=fields(keyword=keyword))
            if keyword in target:
                del target[keyword]
            if keyword not in _TYPE2:
                continue
        if keyword in _TYPE2 and keyword not in target:
            setattr(target, keyword, "")
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet


def _copyable(source: Dataset, keyword: str) -> DataElement | None:
    """The source's element if it can be read and written back unchanged, else None."""
    try:
        element = source[keyword]
        if _replaced_text(element.value):
            return None  # bytes that are not text in the declared character set
        # Write it (with the character set) and read it back: pydicom replaces what it
        # cannot encode with "?" rather than failing, so compare the values.
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        if "SpecificCharacterSet" in source:
            write_data_element(out, source["SpecificCharacterSet"])
        write_data_element(out, element, source._character_set)
        back = read_dataset(BytesIO(out.getvalue()), is_implicit_VR=False,
                            is_little_endian=True)
        if back[keyword].value != element.value:
            return None
    except Exception:  # whatever pydicom cannot read or write is not copied
        return None
    return element


def _replaced_text(value: Any) -> bool:
    """Whether a decoded value holds U+FFFD, pydicom's mark of bytes it could not decode."""
    if isinstance(value, (str, PersonName)):
        return "\ufffd" in str(value)
    if isinstance(value, (list, MultiValue)):
        return any(_replaced_text(v) for v in value)
    return False


#: The patient and study values highdicom's constructors read from the first source
#: image (or evidence) and check as if a user had typed them.
_CONSTRUCTOR_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                         "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                         "ReferringPhysicianName")


def constructor_source(source: Dataset) -> Dataset:
    """A stand-in for a source image, to hand to a highdicom constructor.

    highdicom's constructors take the patient and study values from the first source
    image and check them as user input: a multi-valued PatientName is a TypeError, a
    PatientSex other than M/F/O or a malformed date a ValueError, a missing type 2
    attribute an AttributeError, and the job would end with no result (its warnings
    would also quote the name). The stand-in shares every element with ``source``
    (nothing is copied or decoded) except that the patient and study values are left
    out and the ones the constructors read are empty; :func:`copy_patient_study` then
    puts the source's own values into the result.

    Parameters
    ----------
    source : Dataset
        A source image (evidence) as read.

    Returns
    -------
    Dataset
        A new dataset; ``source`` is not changed.
    """
    stand_in = Dataset(dict(source._dict))  # a new mapping: changes stay in the stand-in
    if hasattr(source, "file_meta"):
        stand_in.file_meta = source.file_meta
    for keyword in PATIENT_KEYWORDS + STUDY_KEYWORDS:
        if keyword != "StudyInstanceUID" and keyword in stand_in:
            del stand_in[keyword]
    for keyword in _CONSTRUCTOR_KEYWORDS:
        setattr(stand_in, keyword, "")
    return stand_in


def check_mask_shape(name: str, mask: np.ndarray, geometry: SliceGeometry) -> None:
    """Raise ``ValueError`` unless ``mask`` has the source's ``(slices, rows, columns)``."""
    if mask.shape != geometry.shape:
        raise ValueError(
            f"Invalid '{name}' shape '{mask.shape}' - must match the source series "
            f"{geometry.shape} (slices, rows, columns)")


def ds_string(value: float) -> str:
    """Format a number as a DICOM DS string of at most 16 characters.

    Uses four decimals (0.1 micrometre) where that fits, else pydicom's
    ``format_number_as_ds``; planning systems reject longer values.
    """
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = format_number_as_ds(float(value))
    return text


def now() -> tuple[str, str]:
    """Current local date and time as DICOM DA and TM strings."""
    stamp = datetime.now()
    return stamp.strftime("%Y%m%d"), stamp.strftime("%H%M%S")


def new_uid() -> str:
    """A fresh UID (pydicom's root)."""
    return str(generate_uid())


def object_identity(series_number: int, series_instance_uid: str | None,
                    sop_instance_uid: str | None) -> dict[str, Any]:
    """The identity arguments every highdicom result constructor takes.

    A new series of one instance, made by this node; UIDs are fresh unless given.
    """
    return {"series_instance_uid": series_instance_uid or new_uid(),
            "series_number": series_number,
            "sop_instance_uid": sop_instance_uid or new_uid(),
            "instance_number": 1, "manufacturer": MANUFACTURER}


#: VRs whose values are ASCII in the default repertoire, the same bytes in either byte
#: order and under every Specific Character Set: stored bytes of these stay valid as they are.
_PLAIN_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"})


def _prepare_for_writing(ds: Dataset, transfer_syntax: UID) -> None:
    """Do once, up front, what pydicom's writer would redo for every nested dataset.

    A dataset built in memory has no "original encoding", so pydicom's ``write_dataset``
    corrects ambiguous VRs of the whole subtree and decodes every raw element again for
    each sequence item it writes (the SEG's 600 per-frame items, each nested three
    deep), and it decodes the RTSTRUCT's pre-encoded Contour Data into 90 000 DSfloat
    values only to format them back to the same text. Here the ambiguous VRs are
    corrected once for the whole tree (pydicom's own ``correct_ambiguous_vr``), every
    raw element that is not plain ASCII text (binary, character-set dependent, or of
    unknown VR, e.g. copied from a source file) is decoded, and each dataset is marked
    as already encoded with the output's transfer syntax (``set_original_encoding``,
    which pydicom provides for this), so the writer takes its direct path. The bytes
    written are the same.
    """
    implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    correct_ambiguous_vr(ds, little)
    pending = [ds]
    while pending:
        item = pending.pop()
        for elem in list(item.elements()):
            if elem.is_raw and elem.VR not in _PLAIN_VRS:
                elem = item[elem.tag]
            if elem.VR == "SQ":
                pending.extend(item[elem.tag].value)
        item.set_original_encoding(implicit, little, item._character_set)


def write(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write a result object as a DICOM Part 10 file (Explicit VR Little Endian default).

    Parameters
    ----------
    ds
        The result dataset (pydicom or highdicom).
    path
        File to write; its parent folder is created.

    Returns
    -------
    pathlib.Path
        The path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _prepare_for_writing(ds, UID(ds.file_meta.TransferSyntaxUID))
    ds.save_as(target, enforce_file_format=True)
    log.info("result.written", extra=fields(sop=str(ds.SOPInstanceUID),
                                             modality=str(ds.get("Modality", ""))))
    return target


def structure_masks(
    masks: np.ndarray | Mapping[str, np.ndarray],
    structures: Sequence[Structure],
    geometry: SliceGeometry,
) -> list[tuple[Structure, np.ndarray]]:
    """Pair each structure of a table with its boolean mask.

    Parameters
    ----------
    masks
        A label map ``[z, y, x]`` (integer values are ``Structure.label``), or a mapping
        from structure name to boolean mask ``[z, y, x]``.
    structures
        The structure table (names, labels, codes).
    geometry
        Geometry of the source series; every mask must have its shape.

    Returns
    -------
    list of (Structure, numpy.ndarray)
        In table order. With a mapping, only the structures it names, in table order.

    Raises
    ------
    ValueError
        For a shape mismatch, a name not in the table, or label values not in the table.
    """
    if not structures:
        raise ValueError("Invalid 'structures' value '()' - at least one structure is required")
    if isinstance(masks, Mapping):
        by_name = {s.name: s for s in structures}
        unknown = [name for name in masks if name not in by_name]
        if unknown:
            raise ValueError(
                f"Invalid 'masks' key '{unknown[0]}' - not in the structure table "
                f"{sorted(by_name)}")
        pairs = []
        for s in structures:
            if s.name in masks:
                mask = np.asarray(masks[s.name]).astype(bool, copy=False)
                check_mask_shape(f"masks['{s.name}']", mask, geometry)
                pairs.append((s, mask))
        return pairs
    labels = check_label_map(np.asarray(masks), structures, geometry)
    return [(s, labels == s.label) for s in structures]


def label_boxes(labels: np.ndarray) -> list[tuple[slice, ...] | None]:
    """Bounding box of every label value, as ``scipy.ndimage.find_objects`` gives them.

    The same boxes, found faster: the label map is first cut to the box of all its
    non-zero voxels (per-axis maxima, which numpy reduces quickly), and
    ``find_objects`` (a slow scalar loop over every voxel) runs on that cut only. On a
    512x512x300 abdomen with the liver this cuts 0.2 s to 0.03 s.

    Parameters
    ----------
    labels : numpy.ndarray
        Non-negative integer label map of any dimension.

    Returns
    -------
    list of (tuple of slice) or None
        Item ``i`` is the box of label ``i + 1`` in ``labels``' own indices, ``None``
        where that label is absent; empty when ``labels`` has no non-zero voxel.
    """
    if labels.size == 0:
        return []
    box: list[slice] = []
    cut = labels
    for axis in range(labels.ndim):
        # Each projection runs on the part already cut along the earlier axes.
        others = tuple(a for a in range(labels.ndim) if a != axis)
        present = np.flatnonzero(cut.max(axis=others) if others else cut)
        if present.size == 0:
            return []
        box.append(slice(int(present[0]), int(present[-1]) + 1))
        cut = labels[tuple(box)]
    found = ndimage.find_objects(cut)
    return [None if inner is None else
            tuple(slice(outer.start + part.start, outer.start + part.stop)
                  for outer, part in zip(box, inner, strict=True))
            for inner in found]


def structure_crops(
    masks: np.ndarray | Mapping[str, np.ndarray],
    structures: Sequence[Structure],
    geometry: SliceGeometry,
) -> list[tuple[Structure, tuple[slice, slice, slice], np.ndarray]]:
    """Like :func:`structure_masks`, but each mask cropped to its bounding box.

    Returns
    -------
    list of (Structure, box, numpy.ndarray)
        ``box`` indexes the full ``[z, y, x]`` grid; the mask is ``full[box]``. An empty
        structure has an empty box and a ``(0, 0, 0)`` mask.
    """
    empty = (slice(0, 0), slice(0, 0), slice(0, 0))

    def crop(boxes: list[tuple[slice, ...] | None], label: int) -> tuple[slice, slice, slice]:
        box = boxes[label - 1] if label <= len(boxes) else None
        return empty if box is None else cast(tuple[slice, slice, slice], box)

    if isinstance(masks, Mapping):
        out = []
        for s, mask in structure_masks(masks, structures, geometry):
            crop_box = crop(label_boxes(mask.astype(np.uint8, copy=False)), 1)
            out.append((s, crop_box, mask[crop_box]))
        return out
    labels = check_label_map(np.asarray(masks), structures, geometry)
    boxes = label_boxes(labels)
    out = []
    for s in structures:
        crop_box = crop(boxes, s.label)
        out.append((s, crop_box, labels[crop_box] == s.label))
    return out


def check_label_map(labels: np.ndarray, structures: Sequence[Structure],
                    geometry: SliceGeometry) -> np.ndarray:
    """Check a label map's shape, type and values against the source and the table.

    Returns
    -------
    numpy.ndarray
        ``labels`` unchanged.

    Raises
    ------
    ValueError
        For a shape that is not the source's, a non-integer type, or a label value that
        is not in the structure table.
    """
    check_mask_shape("masks", labels, geometry)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"Invalid 'masks' dtype '{labels.dtype}' - a label map must be integer")
    known = {0} | {s.label for s in structures}
    low, high = int(labels.min(initial=0)), int(labels.max(initial=0))
    if low >= 0 and set(range(high + 1)) <= known:
        return labels  # every value up to the maximum is a known label: no full scan
    present = np.unique(labels)
    stray = [int(v) for v in present if int(v) not in known]
    if stray:
        raise ValueError(
            f"Invalid 'masks' label value '{stray[0]}' - not in the structure table "
            f"(labels {sorted(known - {0})})")
    return labels

