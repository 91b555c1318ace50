"""Tests of the brain_ich pipeline: shipped weights on phantom heads, results, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from dicomnode.imaging.series import Volume, load_series
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.pipelines.base import (
    PipelineContext,
    PipelineUnavailableError,
    ResultObject,
    get_pipeline,
    registered,
)
from dicomnode.pipelines.brain_ich import BrainIchPipeline, brain_extent_mm
from dicomnode.workflow.emit import write_result_objects
from tests.pipelines.standin import StandInVolume
from tests.results.conftest import DCIODVFY, dciodvfy_errors

#: Held-out seeds of the shipped weights (models/brain_ich.md): a subdural haematoma,
#: and a head without a bleed.
POSITIVE_SEED = 3003
NEGATIVE_SEED = 3002


def _head(tmp_path: Path, seed: int, **kwargs: Any) -> tuple[Volume, dict[str, Any]]:
    phantom = make_phantom("head", seed, **{"matrix": 256, **kwargs})
    files = [p for p in write_phantom(phantom, tmp_path / f"ct-{seed}") if p.suffix == ".dcm"]
    assert phantom.truth is not None
    return load_series(files), phantom.truth


@pytest.fixture(scope="module")
def pipeline() -> BrainIchPipeline:
    found = get_pipeline("brain_ich", PipelineContext(None, "cpu"))
    assert isinstance(found, BrainIchPipeline)
    return found


def test_registered_and_declares_its_outputs() -> None:
    assert "brain_ich" in registered()
    assert BrainIchPipeline.region == "head"
    assert BrainIchPipeline.emits == (ResultObject.SEG, ResultObject.SR, ResultObject.KOS)


def test_missing_weights_make_it_unavailable(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with pytest.raises(PipelineUnavailableError, match="brain_ich unavailable"):
        get_pipeline("brain_ich", PipelineContext(tmp_path / "models", "cpu"))


def test_a_head_with_a_bleed_is_flagged_with_an_sr_and_its_key_images(
        tmp_path: Path, pipeline: BrainIchPipeline) -> None:
    volume, truth = _head(tmp_path, POSITIVE_SEED)
    assert truth["study"]["any"] == 1
    result = pipeline.run(volume)
    assert result.ok, result.reason
    assert result.decisions["any"] and result.urgent
    assert result.reason.startswith("haemorrhage suspected")
    bleeding = {row["index"] for row in truth["slices"] if row["any"]}
    assert set(result.flagged_slices) & bleeding
    assert set(result.probabilities) == {"any", "epidural", "intraparenchymal",
                                         "intraventricular", "subarachnoid", "subdural"}
    assert len(result.measurements["slice_probabilities"]["any"]) == volume.shape[0]
    files = write_result_objects(result, volume, tmp_path / "out", pipeline.emits)
    names = {p.name for p in files}
    assert {"sr.dcm", "kos.dcm"} <= names
    sr = pydicom.dcmread(tmp_path / "out" / "sr.dcm")
    assert "haemorrhage suspected" in sr.SeriesDescription
    kos = pydicom.dcmread(tmp_path / "out" / "kos.dcm")
    referenced = {item.ReferencedSOPInstanceUID
                  for ev in kos.CurrentRequestedProcedureEvidenceSequence
                  for series in ev.ReferencedSeriesSequence
                  for item in series.ReferencedSOPSequence}
    assert referenced == {volume.sop_instance_uids[i] for i in result.flagged_slices}
    if DCIODVFY:
        for path in files:
            assert dciodvfy_errors(path) == [], path.name


def test_a_head_without_a_bleed_gets_an_sr_that_says_no_haemorrhage_detected(
        tmp_path: Path, pipeline: BrainIchPipeline) -> None:
    volume, truth = _head(tmp_path, NEGATIVE_SEED)
    assert truth["study"]["any"] == 0
    result = pipeline.run(volume)
    assert result.ok and result.reason == "no haemorrhage detected"
    assert not result.decisions["any"] and not result.urgent
    assert result.flagged_slices == [] and result.label_map is None
    files = write_result_objects(result, volume, tmp_path / "out", pipeline.emits)
    assert [p.name for p in files] == ["sr.dcm"]            # no key images, no SEG
    sr = pydicom.dcmread(files[0])
    assert "no haemorrhage detected" in sr.SeriesDescription
    text = str(sr)
    assert "Absent" in text and "Probability" in text
    if DCIODVFY:
        assert dciodvfy_errors(files[0]) == []


def test_a_thin_series_is_read_in_5_mm_slabs(tmp_path: Path,
                                             pipeline: BrainIchPipeline) -> None:
    volume, _ = _head(tmp_path, POSITIVE_SEED, matrix=128, spacing=1.25)
    result = pipeline.run(volume)
    assert result.ok and result.decisions["any"]
    probabilities = result.measurements["slice_probabilities"]["any"]
    assert len(probabilities) == volume.shape[0]
    assert probabilities[0] == probabilities[1] == probabilities[2] == probabilities[3]


@pytest.fixture(scope="module")
def head_volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return _head(tmp_path_factory.mktemp("bad"), NEGATIVE_SEED, matrix=128)[0]


def _changed(volume: Volume, **tags: Any) -> StandInVolume:
    datasets = []
    for ds in volume.datasets:
        changed = copy.deepcopy(ds)
        for key, value in tags.items():
            setattr(changed, key, value)
        datasets.append(changed)
    return StandInVolume(volume.hu, volume.spacing, volume.direction, datasets)


@pytest.mark.parametrize(("change", "reason"), [
    ({"Modality": "MR"}, "not a CT (modality MR)"),
    ({"ContrastBolusAgent": "Iohexol"}, "a contrast-enhanced CT"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "a localizer (scout)"),
])
def test_input_the_model_was_not_made_for_gives_no_result_and_why(
        head_volume: Volume, pipeline: BrainIchPipeline, change: dict[str, Any],
        reason: str) -> None:
    result = pipeline.run(_changed(head_volume, **change))
    assert not result.ok and reason in result.reason
    assert not result.decisions and not result.urgent


def test_fewer_than_10_slices_give_no_result(head_volume: Volume,
                                             pipeline: BrainIchPipeline) -> None:
    volume = StandInVolume(head_volume.hu[10:19], head_volume.spacing,
                           head_volume.direction, head_volume.datasets[10:19])
    result = pipeline.run(volume)
    assert not result.ok and "9 slices" in result.reason


def test_a_series_that_is_not_axial_gives_no_result(head_volume: Volume,
                                                    pipeline: BrainIchPipeline) -> None:
    coronal = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])
    result = pipeline.run(StandInVolume(head_volume.hu, head_volume.spacing, coronal,
                                        head_volume.datasets))
    assert not result.ok and "not an axial series" in result.reason


def test_a_field_of_view_that_misses_the_brain_gives_no_result(
        head_volume: Volume, pipeline: BrainIchPipeline) -> None:
    # the same head with its brain replaced by air: a skull and a face, no brain
    hu = head_volume.hu.copy()
    assert brain_extent_mm(hu, head_volume.spacing) > 50
    hu[(hu > 0) & (hu < 80)] = -1000
    result = pipeline.run(StandInVolume(hu, head_volume.spacing, head_volume.direction,
                                        head_volume.datasets))
    assert not result.ok and "no brain in the field of view" in result.reason


def test_dicomnode_process_routes_a_head_ct_to_brain_ich_with_an_sr(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicomnode.cli import app

    write_phantom(make_phantom("head", POSITIVE_SEED, matrix=128), tmp_path / "study")
    for extra in ("labels.nii.gz", "labels.json", "truth.json"):
        (tmp_path / "study" / extra).unlink()
    outcome = CliRunner().invoke(app, ["process", str(tmp_path / "study"), "--out",
                                       str(tmp_path / "out")])
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(outcome.output)
    assert summary["pipeline"] == "brain_ich", summary
    written = {Path(p).name for p in summary["result_files"]}
    assert {"sr.dcm", "kos.dcm"} <= written
