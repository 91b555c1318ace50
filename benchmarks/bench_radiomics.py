"""Radiomics: the time the features add to a 512x512x300 abdomen with 3 liver lesions.

The node's extraction (:func:`dicomnode.results.radiomics.compute_radiomics`, default
settings: 1 mm isotropic, bin width 25 HU, 3D volume merge, each structure cropped to
its box plus 5 mm before MIRP resamples it) runs on the phantom's ground-truth label
map, lesions only (``organs: false``) and with the liver. The peer, in the same process,
is what the node does for the same result without radiomics: its SEG and TID 1500 SR
built from the label map (the encoding the features are added to).

Run: ``OMP_NUM_THREADS=1 nice python benchmarks/bench_radiomics.py [--slices 300]``.
Target (issue 21): <= 10 s added on the 2-core CPU for the 3 lesions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from dicomnode.phantoms import make_phantom
from dicomnode.phantoms.dicom_writer import write_series
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import ABDOMEN
from dicomnode.results.measure import label_lesions
from dicomnode.results.radiomics import RadiomicsParameters, compute_radiomics
from dicomnode.results.seg import build_seg
from dicomnode.results.sr import build_segmentation_sr


def main() -> None:
    """Find a phantom with 3 lesions, time the features against the SEG + SR encoding."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--lesions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11,
                        help="First phantom seed tried (11: the first with 3 lesions at 512 x 300)")
    args = parser.parse_args()
    for seed in range(args.seed, args.seed + 100):
        phantom = make_phantom("abdomen", seed, slices=args.slices, matrix=args.matrix)
        if len(label_lesions(phantom.labels == 2)) == args.lesions:
            break
    labels = np.where(np.isin(phantom.labels, (1, 2)), phantom.labels, 0).astype(np.uint8)
    structures = {1: "Liver", 2: "Lesion_Liver"}
    print(f"phantom seed {seed}: {labels.shape}, spacing {phantom.spacing}, "
          f"{args.lesions} lesions", flush=True)
    hu = phantom.hu.astype(np.float32)
    started = time.perf_counter()
    lesions = compute_radiomics(hu, labels, structures, phantom.spacing,
                                RadiomicsParameters(organs=False))
    lesions_s = time.perf_counter() - started
    started = time.perf_counter()
    everything = compute_radiomics(hu, labels, structures, phantom.spacing,
                                   RadiomicsParameters(organs=True))
    all_s = time.perf_counter() - started
    import tempfile

    from dicomnode.imaging.series import load_series

    with tempfile.TemporaryDirectory() as tmp:
        files, _, _ = write_series(phantom, Path(tmp))
        volume = load_series(files)
        images = volume.datasets
        if not np.array_equal(volume.hu, phantom.hu):  # the series is stored the other way
            labels = labels[::-1].copy()
        algorithm = AlgorithmInfo("bench", "0", "0" * 64, "benchmark")
        started = time.perf_counter()
        seg = build_seg(images, labels, ABDOMEN, algorithm)
        seg_s = time.perf_counter() - started
        started = time.perf_counter()
        build_segmentation_sr(images, seg, labels, ABDOMEN, algorithm)
        sr_s = time.perf_counter() - started
        started = time.perf_counter()
        build_segmentation_sr(images, seg, labels, ABDOMEN, algorithm, radiomics=lesions)
        sr_lesions_s = time.perf_counter() - started
        started = time.perf_counter()
        build_segmentation_sr(images, seg, labels, ABDOMEN, algorithm, radiomics=everything)
        sr_all_s = time.perf_counter() - started
    encode_s = seg_s + sr_s
    added_lesions = lesions_s + sr_lesions_s - sr_s
    added_all = all_s + sr_all_s - sr_s
    print(f"features, {len(lesions.structures)} lesions:           {lesions_s:6.1f} s")
    print(f"features, lesions and liver:         {all_s:6.1f} s")
    print(f"SR: without / lesions' / all features: {sr_s:.1f} / {sr_lesions_s:.1f} / "
          f"{sr_all_s:.1f} s")
    print(f"peer: SEG + SR without radiomics:    {encode_s:6.1f} s")
    print(f"added, lesions only (organs: false): {added_lesions:6.1f} s  "
          f"(ratio to peer {added_lesions / encode_s:.2f})")
    print(f"added, lesions and liver:            {added_all:6.1f} s  "
          f"(ratio to peer {added_all / encode_s:.2f})")


if __name__ == "__main__":
    main()
