"""Whether a received instance is the same as the stored one with its SOP Instance UID.

Senders resend what they sent before: after a lost acknowledgement, from another
archive, in another transfer syntax. Such a resend is a true duplicate and may be
acknowledged without being stored again. Anything else under a UID that is already
stored (other pixels, another patient's values) must not vanish silently, so the store
refuses it. This runs only when the UID is already indexed, never on the common path.
"""

from __future__ import annotations

import filecmp
import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomnode.logs import fields

log = logging.getLogger(__name__)

_PIXEL_DATA = Tag("PixelData")


def same_instance(stored: Path, received: Path) -> bool:
    """Whether two DICOM files hold the same instance.

    The same bytes, or the same dataset apart from the file meta group (0002): every
    element equal, the pixel data compared decoded when the transfer syntaxes differ.

    Parameters
    ----------
    stored, received : Path
        Part 10 files.

    Returns
    -------
    bool
        False as well when either file cannot be read (a stored file gone missing
        included) or its pixels cannot be decoded: then nothing says they are the same.
    """
    try:
        if filecmp.cmp(stored, received, shallow=False):
            return True
        return same_content(pydicom.dcmread(stored), pydicom.dcmread(received))
    except Exception as exc:  # an unreadable file or pixel data is not "the same"
        log.warning("duplicate.compare_failed", extra=fields(error=type(exc).__name__))
        return False


def same_content(a: Dataset, b: Dataset) -> bool:
    """Whether two datasets are equal element by element, the file meta group aside.

    Parameters
    ----------
    a, b : Dataset
        As read by pydicom (``file_meta`` holds each one's transfer syntax).

    Returns
    -------
    bool
        With the same transfer syntax every element must be equal (pixel data byte for
        byte); with different ones the pixel data is compared decoded.

    Raises
    ------
    Exception
        What pydicom raises when pixel data in another transfer syntax cannot be decoded.
    """
    meta_a, meta_b = getattr(a, "file_meta", Dataset()), getattr(b, "file_meta", Dataset())
    same_syntax = meta_a.get("TransferSyntaxUID") == meta_b.get("TransferSyntaxUID")
    keys = {elem.tag for elem in a if elem.tag.group != 0x0002}
    if keys != {elem.tag for elem in b if elem.tag.group != 0x0002}:
        return False
    for tag in keys:
        if tag == _PIXEL_DATA and not same_syntax:
            continue
        if a[tag] != b[tag]:
            return False
    if _PIXEL_DATA in keys and not same_syntax:
        return bool(np.array_equal(a.pixel_array, b.pixel_array))
    return True
