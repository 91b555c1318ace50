#!/usr/bin/env python3
"""Write the small CT series shipped in ``dicomnode/examples`` (generated, do not edit).

Each is a noise-free phantom on a coarse grid, RLE lossless, with fixed UIDs and
seeds, so that the files are the same every time this script runs. The node warms its
networks and result encoders on them at start-up, without the phantom generator.

Usage: ``.venv/bin/python scripts/make_examples.py``
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from dicomnode.phantoms import make_phantom
from dicomnode.phantoms.dicom_writer import write_series

OUT = Path(__file__).resolve().parents[1] / "dicomnode" / "examples"
#: region -> (matrix, slices, study UID, series UID)
EXAMPLES = {
    "abdomen": (64, 40, "1.2.826.0.1.3680043.10.1500.1.1", "1.2.826.0.1.3680043.10.1500.1.2"),
    "headneck": (96, 56, "1.2.826.0.1.3680043.10.1500.2.1",
                 "1.2.826.0.1.3680043.10.1500.2.2"),
}


def _fix(path: Path, sop_uid: str, frame_uid: str) -> None:
    """Fixed UIDs, dates and times, so that every run writes the same bytes."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.FrameOfReferenceUID = frame_uid
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        setattr(ds, keyword, "20260101")
    for keyword in ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"):
        setattr(ds, keyword, "120000")
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    """Regenerate every example series."""
    for region, (matrix, slices, study, series) in EXAMPLES.items():
        folder = OUT / f"ct_{region}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        phantom = make_phantom(region, seed=0, matrix=matrix, slices=slices, noise=0.0)
        write_series(phantom, folder, transfer_syntax="rle", study_uid=study,
                     series_uid=series, patient_name="EXAMPLE^WARM^UP",
                     patient_id="EXAMPLE")
        for number, path in enumerate(sorted(folder.glob("*.dcm")), start=1):
            _fix(path, f"{series}.{number}", f"{study}.9")
        size = sum(f.stat().st_size for f in folder.glob("*.dcm"))
        print(f"{folder}: {len(list(folder.glob('*.dcm')))} files, {size // 1024} KiB")


if __name__ == "__main__":
    main()
