"""Result objects: the encoders' warm-up, and the SEG written in a helper process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue

from dicomnode.imaging.series import Volume, load_series
from dicomnode.logs import configure_logging
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.pipelines.base import PipelineResult, ResultObject
from dicomnode.workflow.emit import SegWriter, warm_up_encoders, write_result_objects

EMITS = (ResultObject.SEG, ResultObject.RTSTRUCT, ResultObject.SR)


def test_warm_up_encodes_a_small_phantom_and_cleans_up(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    scratch = tmp_path / "results"
    seconds = warm_up_encoders(scratch)
    assert seconds > 0
    assert scratch.is_dir() and list(scratch.iterdir()) == []
    # its made-up study (series loaded, SEG built, results written) is not in the log
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def liver_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, Volume]:
    phantom = make_phantom("abdomen", seed=3, matrix=64, slices=40)
    folder = tmp_path_factory.mktemp("ct")
    volume = load_series([f for f in write_phantom(phantom, folder) if f.suffix == ".dcm"])
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[10:30, 20:44, 18:40] = 1
    labels[15:19, 28:34, 24:30] = 2
    labels[24:26, 36:40, 30:34] = 2
    result = PipelineResult("liver_tumor", ok=True, label_map=labels,
                            structures={1: "Liver", 2: "Lesion_Liver"},
                            algorithm={"name": "test", "version": "1", "sha256": "0" * 64})
    return result, volume


def _segment_references(ds: Any) -> set[tuple[str, int]]:
    """(SEG instance, segment number) of every content item of an SR that refers to one."""
    found: set[tuple[str, int]] = set()
    for item in ds.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            numbers = ref.get("ReferencedSegmentNumber")
            if numbers is None:
                continue
            for number in numbers if isinstance(numbers, MultiValue) else [numbers]:
                found.add((str(ref.ReferencedSOPInstanceUID), int(number)))
        found |= _segment_references(item)
    return found


def test_seg_from_the_helper_process_equals_the_seg_written_here(
        liver_result: tuple[PipelineResult, Volume], tmp_path: Path) -> None:
    result, volume = liver_result
    writer = SegWriter()
    try:
        assert writer.start().result(timeout=120) > 0
        here = write_result_objects(result, volume, tmp_path / "here", EMITS)
        helper = write_result_objects(result, volume, tmp_path / "helper", EMITS,
                                      seg_writer=writer)
    finally:
        writer.stop()
    assert writer.written == 1
    assert [p.name for p in here] == [p.name for p in helper] == [
        "seg.dcm", "rtstruct.dcm", "sr.dcm"]
    seg_here, seg = (pydicom.dcmread(d / "seg.dcm") for d in (tmp_path / "here",
                                                               tmp_path / "helper"))
    assert seg.PixelData == seg_here.PixelData
    assert seg.NumberOfFrames == seg_here.NumberOfFrames
    assert seg.PerFrameFunctionalGroupsSequence == seg_here.PerFrameFunctionalGroupsSequence
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        s.SegmentLabel for s in seg_here.SegmentSequence]
    assert seg.SeriesDescription == seg_here.SeriesDescription
    # the SR written beside it refers to it: evidence and every referenced segment
    sr_here, sr = (pydicom.dcmread(d / "sr.dcm") for d in (tmp_path / "here",
                                                            tmp_path / "helper"))
    evidence = {(series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID)
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence}
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) in evidence
    references = _segment_references(sr)
    assert {uid for uid, _ in references} == {str(seg.SOPInstanceUID)}
    assert sorted(n for _, n in references) == sorted(
        n for _, n in _segment_references(sr_here))


@pytest.fixture
def helper() -> Iterator[tuple[SegWriter, int]]:
    """A started, warmed SEG helper and its process id; stopped afterwards."""
    writer = SegWriter()
    try:
        writer.start().result(timeout=120)
        (pid,) = writer._pool._processes  # type: ignore[union-attr]
        yield writer, pid
    finally:
        writer.stop()


def test_a_dead_helper_is_replaced_and_the_seg_still_written(
        liver_result: tuple[PipelineResult, Volume], helper: tuple[SegWriter, int],
        tmp_path: Path) -> None:
    result, volume = liver_result
    writer, pid = helper
    os.kill(pid, signal.SIGKILL)
    files = write_result_objects(result, volume, tmp_path / "out", EMITS, seg_writer=writer)
    assert [p.name for p in files] == ["seg.dcm", "rtstruct.dcm", "sr.dcm"]
    seg = pydicom.dcmread(files[0])
    assert int(seg.NumberOfFrames) == 2 * volume.shape[0]
    assert writer.written == 0  # written here, not by the helper that was killed
    assert writer.running  # a new helper for the next study
    assert writer.start().result(timeout=120) > 0


def test_ctrl_c_and_sigterm_to_the_group_leave_the_helper_to_its_node(
        liver_result: tuple[PipelineResult, Volume], helper: tuple[SegWriter, int],
        tmp_path: Path) -> None:
    # a terminal's Ctrl-C and a service manager's stop signal every process of the
    # group; the helper keeps going (no traceback, no SEG lost) until the node stops it
    result, volume = liver_result
    writer, pid = helper
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert _alive(pid)
    files = write_result_objects(result, volume, tmp_path / "out", EMITS, seg_writer=writer)
    assert files[0].name == "seg.dcm" and writer.written == 1
    writer.stop()
    assert not _alive(pid)


def test_the_helper_ends_when_its_node_is_killed_outright(tmp_path: Path) -> None:
    # SIGKILL (or the out-of-memory killer) gives the pool no shutdown, and the helper's
    # own pipes keep it waiting: it watches its parent and ends with it
    node = subprocess.Popen(
        [sys.executable, "-c",
         "import os, time\n"
         "from dicomnode.workflow.emit import SegWriter\n"
         "writer = SegWriter()\n"
         "writer.start().result(timeout=120)\n"
         "print(*writer._pool._processes, flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert node.stdout is not None
        (helper,) = (int(pid) for pid in node.stdout.readline().split())
    finally:
        node.kill()
        node.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(helper):
        time.sleep(0.2)
    assert not _alive(helper)


def _alive(pid: int) -> bool:
    """Whether a process (not our child: a zombie waiting for its new parent counts as
    ended) is still running."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_the_liver_results_carry_a_multi_valued_patient_name_as_sent(
        liver_result: tuple[PipelineResult, Volume], tmp_path: Path) -> None:
    # Issue 17: "Doe^John\Roe^Jane" (PN with VM 2, as real systems send) failed the job.
    result, volume = liver_result
    folder = tmp_path / "ct"
    folder.mkdir()
    files = []
    for i, ds in enumerate(volume.datasets):
        ds = pydicom.dcmread(ds.filename) if getattr(ds, "filename", None) else ds
        ds.PatientName = "Doe^John\\Roe^Jane"
        del ds.PatientSex  # a type 2 attribute some senders leave out
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
        files.append(folder / f"{i:03d}.dcm")
    awkward = load_series(files)
    written = write_result_objects(result, awkward, tmp_path / "out", EMITS)
    assert len(written) == 3
    for path in written:
        back = pydicom.dcmread(path)
        assert [str(v) for v in back.PatientName] == ["Doe^John", "Roe^Jane"], path.name
        assert "PatientSex" in back and back.PatientSex == ""


def test_a_haemorrhage_result_with_blood_gives_its_seg_the_report_sr_and_key_images(
        tmp_path: Path) -> None:
    phantom = make_phantom("head", seed=3, matrix=64)
    volume = load_series([f for f in write_phantom(phantom, tmp_path / "ct")
                          if f.suffix == ".dcm"])
    blood = (phantom.labels >= 4).astype(np.uint8)
    flagged = sorted(int(k) for k in np.flatnonzero(blood.any(axis=(1, 2))))
    keys = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid",
            "subdural")
    result = PipelineResult(
        "brain_ich", ok=True, label_map=blood, structures={1: "Hemorrhage_Intracranial"},
        probabilities={k: 0.9 if k in ("any", "intraventricular") else 0.01 for k in keys},
        decisions={k: k in ("any", "intraventricular") for k in keys},
        flagged_slices=flagged, measurements={"slices": {"any": flagged}},
        algorithm={"name": "test", "version": "1", "sha256": "0" * 64})
    files = write_result_objects(result, volume, tmp_path / "out",
                                 (ResultObject.SEG, ResultObject.SR, ResultObject.KOS))
    assert [p.name for p in files] == ["seg.dcm", "sr.dcm", "kos.dcm"]
    sr = pydicom.dcmread(tmp_path / "out" / "sr.dcm")
    # the haemorrhage report, not the segmentation's measurements, in the one SR
    assert sr.SeriesDescription == "AI haemorrhage report: haemorrhage suspected"
    assert "Probability" in str(sr)
    seg = pydicom.dcmread(tmp_path / "out" / "seg.dcm")
    assert seg.SegmentSequence[0].SegmentLabel == "Hemorrhage_Intracranial"


def test_with_burned_in_series_each_slice_with_a_structure_follows_the_sr_as_an_sc_image(
        liver_result: tuple[PipelineResult, Volume], tmp_path: Path) -> None:
    from tests.results.conftest import dciodvfy_errors

    result, volume = liver_result
    emits = (ResultObject.SEG, ResultObject.RTSTRUCT, ResultObject.SR)
    plain = write_result_objects(result, volume, tmp_path / "plain", emits)
    assert [p.name for p in plain] == ["seg.dcm", "rtstruct.dcm", "sr.dcm"]  # off by default
    files = write_result_objects(result, volume, tmp_path / "out", emits,
                                 burned_in_series=True)
    assert [p.name for p in files[:3]] == ["seg.dcm", "rtstruct.dcm", "sr.dcm"]
    burned = [pydicom.dcmread(p) for p in files[3:]]
    assert len(burned) == 20  # slices 10 to 29 hold the liver
    assert {ds.SOPClassUID for ds in burned} == {"1.2.840.10008.5.1.4.1.1.7"}
    assert {ds.SeriesDescription for ds in burned} == {"AI liver overlay, not for diagnosis"}
    assert {ds.StudyInstanceUID for ds in burned} == {volume.study_instance_uid}
    assert dciodvfy_errors(files[3]) == [] and dciodvfy_errors(files[-1]) == []
