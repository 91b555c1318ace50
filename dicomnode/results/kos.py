"""Key Object Selection of the slices the ICH pipeline flags, via highdicom.ko.

The radiologist's viewer shows a KOS as "key images": opening the study jumps to the
slices where the model found haemorrhage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode.logs import fields
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.source import (
    MANUFACTURER,
    check_source_images,
    constructor_source,
    copy_patient_study,
    object_identity,
)

log = logging.getLogger(__name__)


def build_kos(
    source_images: Sequence[Dataset],
    slice_indices: Sequence[int],
    algorithm: AlgorithmInfo,
    *,
    description: str = "AI: slices with suspected intracranial haemorrhage",
    series_description: str = "AI key images",
    series_number: int = 904,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """Build a Key Object Selection document ("Of Interest") referencing flagged slices.

    Parameters
    ----------
    source_images
        The CT slices, in the order the indices refer to.
    slice_indices
        Indices of the flagged slices (at least one; duplicates are ignored).
    algorithm
        The model that flagged them (device observer context).
    description
        Key Object Description shown by viewers (at most 1024 characters).
    series_description, series_number
        Of the new KO series.
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones by default.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
    """
    check_source_images(source_images)
    indices = sorted(set(int(i) for i in slice_indices))
    if not indices:
        raise ValueError("Invalid 'slice_indices' value '[]' - at least one slice is required")
    if indices[0] < 0 or indices[-1] >= len(source_images):
        bad = indices[0] if indices[0] < 0 else indices[-1]
        raise ValueError(f"Invalid 'slice_indices' value '{bad}' - the series has "
                         f"{len(source_images)} slices")
    if len(description) > 1024:
        raise ValueError("Invalid 'description' value - more than 1024 characters")
    flagged = [source_images[i] for i in indices]
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[algorithm.name, algorithm.version]),
            name=algorithm.name, manufacturer_name=MANUFACTURER,
            model_name=algorithm.version))
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=flagged,
        observer_device_context=observer,
        description=description,
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        # patient and study values go in by copy_patient_study, not via highdicom's checks
        evidence=[constructor_source(flagged[0]), *flagged[1:]],
        content=content,
        **object_identity(series_number, series_instance_uid, sop_instance_uid),
    )
    kos.SeriesDescription = series_description
    kos.SoftwareVersions = list(algorithm.software_versions)  # type: ignore[assignment]
    copy_patient_study(source_images[0], kos)
    log.info("kos.built", extra=fields(sop=str(kos.SOPInstanceUID), images=len(flagged)))
    return kos
