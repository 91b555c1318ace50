"""End to end with real peers for head and neck: Orthanc, storescu, dciodvfy, plastimatch.

A head-and-neck planning phantom (a held-out seed, the scanner's 512 matrix) is sent to
the node with the calling AE of Orthanc; the node routes it to ``headneck_oar``, runs
the shipped weights and sends SEG + RTSTRUCT + SR back to Orthanc. There each object is
checked with dciodvfy, and plastimatch rasterises the RTSTRUCT, as a planning system
would read it, back onto the CT: every organ of at least 1 cm3 must agree with the
SEG's segment at Dice >= 0.95, and each left organ must lie on the patient's left.
"""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813 - the usual alias

from dicomnode.config import Peer, Settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.results.encode import series_reference_image
from dicomnode.results.source import check_source_images
from tests.e2e.test_orthanc_liver import (
    RTSTRUCT,
    SEG,
    SR,
    _dciodvfy_errors,
    send_and_collect,
)
from tests.peers import orthanc, orthanc_get
from tests.results.conftest import PLASTIMATCH

pytestmark = pytest.mark.e2e


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def test_headneck_study_comes_back_as_seg_rtstruct_sr_that_agree(
        settings: Settings, tmp_path: Path) -> None:
    assert PLASTIMATCH, "plastimatch is required for this test"
    study_dir = tmp_path / "study"
    phantom = make_phantom("headneck", seed=5, matrix=512)
    files = sorted(p for p in write_phantom(phantom, study_dir) if p.suffix == ".dcm")
    with orthanc(tmp_path / "orthanc") as pacs:
        settings.peers = {"ORTHANC": Peer(host="127.0.0.1", port=int(pacs["dicom_port"]))}
        settings.completion.quiet_period_s = 5
        settings.warm_up = True
        node = Node(settings)
        node.start()
        try:
            url = str(pacs["url"])
            classes = send_and_collect(node, files, url, {SEG, RTSTRUCT, SR})
            assert len(orthanc_get(f"{url}/studies")) == 1  # type: ignore[arg-type]
            paths = {}
            for sop_class, oid in classes.items():
                path = tmp_path / f"{sop_class}.dcm"
                with urllib.request.urlopen(f"{url}/instances/{oid}/file", timeout=30) as r:
                    path.write_bytes(r.read())
                assert _dciodvfy_errors(path) == [], sop_class
                paths[sop_class] = path
        finally:
            node.stop()

    images = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]  # slice order
    geometry = check_source_images(images)
    order = [str(im.SOPInstanceUID) for im in images]
    seg = hd.seg.segread(paths[SEG])
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert set(names.values()) <= {"BrainStem", "OpticChiasm", "Bone_Mandible", "OpticNrv_L",
                                   "OpticNrv_R", "Parotid_L", "Parotid_R", "Glnd_Submand_L",
                                   "Glnd_Submand_R"}
    assert {"BrainStem", "Bone_Mandible", "Parotid_L", "Parotid_R"} <= set(names.values())
    out = tmp_path / "pm"
    subprocess.run([PLASTIMATCH, "convert", "--input", str(paths[RTSTRUCT]),
                    "--referenced-ct", str(study_dir), "--output-prefix", str(out),
                    "--prefix-format", "nrrd", "--xor-contours"],
                   check=True, capture_output=True)
    reference = series_reference_image(geometry)
    checked = []
    centres = {}
    for number, name in names.items():
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=order, segment_numbers=[number],
            combine_segments=False, skip_overlap_checks=True)[..., 0].astype(bool)
        centres[name] = np.asarray(geometry.to_patient(
            int(np.argwhere(mask).mean(0)[0]), *np.argwhere(mask).mean(0)[1:, None])).ravel()
        if mask.sum() * geometry.voxel_volume_mm3 / 1000 < 1.0:
            continue
        image = sitk.ReadImage(str(out / f"{name}.nrrd"))
        back = sitk.GetArrayFromImage(sitk.Resample(
            image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)).astype(bool)
        score = _dice(back, mask)
        assert score >= 0.95, (name, score)
        checked.append(name)
    assert len(checked) >= 5, checked
    # LPS: +x is the patient's left
    for left, right in (("Parotid_L", "Parotid_R"), ("Glnd_Submand_L", "Glnd_Submand_R")):
        if left in centres and right in centres:
            assert centres[left][0] > centres[right][0], (left, centres[left], centres[right])
    report = pydicom.dcmread(paths[SR])
    assert report.SeriesDescription == "AI OAR measurements"
