"""Benchmark: encode SEG + RTSTRUCT + SR for 9 structures on a 512x512x180 CT series.

Target: under 5 s on the project's 2-core build machine. Per the project rule the figure
is printed as a ratio against a peer measured in the same process: pydicom writing the
same 180-slice CT series to disk (a plain, familiar cost of handling that series). The
highdicom SEG alone is printed as well, to show where the time goes.

Run: ``PYTHONPATH=. python benchmarks/bench_encoding.py [--repeats 3]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import HEADNECK
from dicomnode.results.rtstruct import build_rtstruct
from dicomnode.results.seg import build_seg
from dicomnode.results.source import write
from dicomnode.results.sr import build_segmentation_sr

SLICES, MATRIX, SPACING, THICKNESS = 180, 512, 0.9765625, 2.0

# Organ-like ellipsoids (centre mm, radii mm) in patient coordinates; label = table order.
_ORGANS = {
    1: ((0, 20, 40), (13, 13, 30)),      # BrainStem
    2: ((0, -15, 75), (8, 4, 3)),        # Chiasm
    4: ((18, -40, 75), (3, 14, 3)),      # OpticNrv_L
    5: ((-18, -40, 75), (3, 14, 3)),     # OpticNrv_R
    6: ((50, 10, 0), (14, 20, 24)),      # Parotid_L
    7: ((-50, 10, 0), (14, 20, 24)),     # Parotid_R
    8: ((35, -30, -50), (10, 12, 12)),   # Glnd_Submand_L
    9: ((-35, -30, -50), (10, 12, 12)),  # Glnd_Submand_R
}
_MANDIBLE = ((0, -35, -40), (55, 50, 22), (45, 40, 40))  # shell: a hole on every slice


def make_series() -> tuple[list[Dataset], np.ndarray]:
    """CT slices (with pixel data) and a label map of the 9 head-and-neck structures."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    half = (MATRIX - 1) / 2 * SPACING
    xs = -half + np.arange(MATRIX) * SPACING
    ys = -half + np.arange(MATRIX) * SPACING
    zs = -(SLICES - 1) / 2 * THICKNESS + np.arange(SLICES) * THICKNESS
    z3, y3, x3 = np.meshgrid(zs, ys, xs, indexing="ij", sparse=True)
    labels = np.zeros((SLICES, MATRIX, MATRIX), np.uint8)
    (cx, cy, cz), outer, inner = _MANDIBLE
    d_out = ((x3 - cx) / outer[0]) ** 2 + ((y3 - cy) / outer[1]) ** 2 + ((z3 - cz) / outer[2]) ** 2
    d_in = ((x3 - cx) / inner[0]) ** 2 + ((y3 - cy) / inner[1]) ** 2 + ((z3 - cz) / inner[2]) ** 2
    labels[(d_out < 1) & (d_in >= 1)] = 3
    for label, ((cx, cy, cz), (rx, ry, rz)) in _ORGANS.items():
        d = ((x3 - cx) / rx) ** 2 + ((y3 - cy) / ry) ** 2 + ((z3 - cz) / rz) ** 2
        labels[d < 1] = label
    images = []
    for k in range(SLICES):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^", "B1", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "1200", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.ImagePositionPatient = [-half, -half, float(zs[k])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [SPACING, SPACING]
        ds.SliceThickness = THICKNESS
        ds.Rows = ds.Columns = MATRIX
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (labels[k].astype(np.int16) * 10 + 1000).tobytes()
        images.append(ds)
    return images, labels


def best_of(repeats: int, action: Callable[[], object]) -> float:
    """Median wall time of ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images, labels = make_series()
    algorithm = AlgorithmInfo("bench-oar", "0.0.0", "0" * 64, "benchmark")
    out = Path(tempfile.mkdtemp(prefix="bench_encoding_"))

    def encode_all() -> None:
        seg = build_seg(images, labels, HEADNECK, algorithm)
        rtstruct = build_rtstruct(images, labels, HEADNECK, algorithm)
        build_segmentation_sr(images, seg, labels, HEADNECK, algorithm)
        del rtstruct

    def encode_and_write() -> None:
        seg = build_seg(images, labels, HEADNECK, algorithm)
        write(seg, out / "seg.dcm")
        write(build_rtstruct(images, labels, HEADNECK, algorithm), out / "rtstruct.dcm")
        write(build_segmentation_sr(images, seg, labels, HEADNECK, algorithm), out / "sr.dcm")

    def seg_only() -> None:
        build_seg(images, labels, HEADNECK, algorithm)

    def peer_write_ct() -> None:
        for k, ds in enumerate(images):
            ds.save_as(out / f"ct_{k:03d}.dcm", enforce_file_format=True)

    encode_all()  # warm caches (highdicom loads its standard tables once)
    ours = best_of(args.repeats, encode_all)
    ours_written = best_of(args.repeats, encode_and_write)
    seg_alone = best_of(args.repeats, seg_only)
    peer = best_of(args.repeats, peer_write_ct)
    voxels = {s.name: int((labels == s.label).sum()) for s in HEADNECK}
    print(f"series: {SLICES} x {MATRIX} x {MATRIX}, structures: {len(HEADNECK)}, "
          f"smallest {min(voxels.values())} voxels")
    print(f"SEG+RTSTRUCT+SR build:          {ours:6.2f} s  (target < 5 s)")
    print(f"SEG+RTSTRUCT+SR build + write:  {ours_written:6.2f} s")
    print(f"highdicom SEG alone:            {seg_alone:6.2f} s")
    print(f"peer: pydicom writes CT series: {peer:6.2f} s")
    print(f"ratio encode / peer:            {ours / peer:6.2f}")
    print(f"ratio encode+write / peer:      {ours_written / peer:6.2f}")


if __name__ == "__main__":
    main()
