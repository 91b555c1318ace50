"""ICH SR and KOS built on the head phantom's own truth pass dciodvfy and reference it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicomnode.imaging.series import load_series
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.kos import build_kos
from dicomnode.results.source import write
from dicomnode.results.sr import IchResult, build_ich_sr
from tests.results.conftest import dciodvfy_errors

ALGORITHM = AlgorithmInfo("dicomnode-brain-ich-truth", "0.0.0", "0" * 64, "phantom truth")
KEYS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


@pytest.mark.parametrize("seed", [0, 3])
def test_ich_sr_and_kos_from_head_phantom_truth(seed: int, tmp_path: Path) -> None:
    phantom = make_phantom("head", seed=seed, matrix=128)
    files = [p for p in write_phantom(phantom, tmp_path / "ct") if p.suffix == ".dcm"]
    volume = load_series(files)
    truth = phantom.truth
    assert truth is not None and truth["study"]["any"] == 1
    # The volume and the truth both count slices from the most inferior one.
    flagged = {k: tuple(s["index"] for s in truth["slices"] if s[k]) for k in KEYS}
    results = [IchResult(k, 0.9 if truth["study"][k] else 0.05, bool(truth["study"][k]),
                         flagged[k]) for k in KEYS]
    sr = write(build_ich_sr(volume.datasets, results, ALGORITHM), tmp_path / "sr.dcm")
    kos = write(build_kos(volume.datasets, flagged["any"], ALGORITHM), tmp_path / "kos.dcm")
    for path in (sr, kos):
        assert dciodvfy_errors(path) == []
    referenced = {
        item.ReferencedSOPInstanceUID
        for ev in pydicom.dcmread(kos).CurrentRequestedProcedureEvidenceSequence
        for series in ev.ReferencedSeriesSequence for item in series.ReferencedSOPSequence
    }
    assert referenced == {volume.sop_instance_uids[i] for i in flagged["any"]}
    assert pydicom.dcmread(sr).StudyInstanceUID == volume.study_instance_uid
