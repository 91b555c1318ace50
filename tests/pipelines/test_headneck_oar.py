"""Tests of the headneck_oar pipeline: checks, bad input, absent organs, the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicomnode.nn import weights
from dicomnode.nn.anatomynet import ORGANS
from dicomnode.pipelines.base import (
    PipelineContext,
    PipelineUnavailableError,
    ResultObject,
    get_pipeline,
    registered,
)
from dicomnode.pipelines.headneck_oar import MIN_ML, HeadNeckOarPipeline
from dicomnode.results.codes import HEADNECK
from tests.pipelines.standin import StandInVolume


@pytest.fixture(scope="module")
def pipeline() -> HeadNeckOarPipeline:
    checked = HeadNeckOarPipeline(PipelineContext(device="cpu"))
    checked.check()   # as get_pipeline does: the weights a refusal names
    return checked


@pytest.fixture(scope="module")
def phantom() -> object:
    from dicomnode.phantoms import make_phantom

    return make_phantom("headneck", 7, matrix=256)


def test_registered_with_its_outputs_and_tg263_names() -> None:
    assert "headneck_oar" in registered()
    found = get_pipeline("headneck_oar")
    assert isinstance(found, HeadNeckOarPipeline) and found.region == "headneck"
    assert found.emits == (ResultObject.SEG, ResultObject.RTSTRUCT, ResultObject.SR)
    assert set(MIN_ML) == {s.name for s in HEADNECK}


def test_missing_weights_make_it_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PipelineUnavailableError, match="headneck_oar unavailable: no weights"):
        HeadNeckOarPipeline(PipelineContext(tmp_path)).check()


def test_too_few_slices_and_a_sagittal_series_are_no_result(
        pipeline: HeadNeckOarPipeline) -> None:
    few = pipeline.run(StandInVolume(np.zeros((12, 256, 256), np.int16), (2.5, 1.25, 1.25)))
    assert not few.ok and "too small" in few.reason and few.label_map is None
    sagittal = np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], dtype=float)
    tilted = pipeline.run(StandInVolume(np.zeros((60, 256, 256), np.int16),
                                        (2.5, 1.25, 1.25), sagittal))
    assert not tilted.ok and "not an axial series" in tilted.reason
    assert tilted.algorithm["name"] == "headneck_oar"


def test_a_planning_phantom_gives_the_nine_organs_on_their_sides(
        pipeline: HeadNeckOarPipeline, phantom: object) -> None:
    result = pipeline.run(StandInVolume(phantom.hu, phantom.spacing))  # type: ignore[attr-defined]
    assert result.ok, result.reason
    assert result.label_map is not None and result.label_map.shape == phantom.hu.shape  # type: ignore[attr-defined]
    assert set(result.structures.values()) == {s.name for s in HEADNECK}
    assert result.measurements["absent"] == []
    volumes = result.measurements["volumes_ml"]
    assert volumes["Bone_Mandible"] > 30 and volumes["OpticChiasm"] < 2
    confidence = result.measurements["confidence"]
    assert set(confidence) == set(volumes) and 0.5 < min(confidence.values()) <= 1
    truth = phantom.labels  # type: ignore[attr-defined]
    for value in (1, 3, 6, 7):
        found, true = result.label_map == value, truth == value
        assert 2 * (found & true).sum() / (found.sum() + true.sum()) > 0.7, value
    # patient left is +x in LPS: the left parotid has the larger column index
    xs = {v: np.argwhere(result.label_map == v)[:, 2].mean() for v in (6, 7)}
    assert xs[6] > xs[7]
    json.dumps(result.summary())


def test_a_mirrored_series_keeps_each_organ_on_the_patients_side(
        pipeline: HeadNeckOarPipeline, phantom: object) -> None:
    """Columns stored right to left (row cosine -1): the array is mirrored, the patient is
    not, so the organ the viewer shows on the patient's left is still Parotid_L."""
    mirrored = np.ascontiguousarray(phantom.hu[:, :, ::-1])  # type: ignore[attr-defined]
    direction = np.diag([-1.0, 1.0, 1.0])
    result = pipeline.run(StandInVolume(mirrored, phantom.spacing, direction))  # type: ignore[attr-defined]
    assert result.ok, result.reason
    xs = {v: np.argwhere(result.label_map == v)[:, 2].mean() for v in (6, 7)}
    assert xs[6] < xs[7]          # the left parotid at the lower column index now


@pytest.mark.parametrize("seed, gone", [(9, "Glnd_Submand_L"), (11, "Glnd_Submand_R"),
                                        (7, "Parotid_L"), (13, "Parotid_R"), (15, "Parotid_L")])
def test_a_resected_gland_is_left_out_and_named(
        pipeline: HeadNeckOarPipeline, seed: int, gone: str) -> None:
    """The bed of a resected gland, filled with the neck's fat, is not drawn as a gland;
    every other organ, the other side's gland too, still is."""
    from dicomnode.phantoms import make_phantom

    operated = make_phantom("headneck", seed, matrix=256, resected=(gone,))
    result = pipeline.run(StandInVolume(operated.hu, operated.spacing))
    assert result.ok, result.reason
    assert result.measurements["absent"] == [gone]
    assert gone not in result.structures.values()
    assert set(result.structures.values()) == {s.name for s in HEADNECK} - {gone}
    value = next(v for v, name in ORGANS.items() if name == gone)
    assert not (result.label_map == value).any()


def test_a_gland_read_with_little_confidence_is_left_out_and_named(
        pipeline: HeadNeckOarPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fat of a resected gland's bed can pass for gland in places; read with less
    confidence than MIN_CONFIDENCE, the gland is named absent and its voxels dropped."""
    from dicomnode.nn.runtime import Segmentation
    from dicomnode.pipelines import headneck_oar

    monkeypatch.setattr(headneck_oar, "MIN_CONFIDENCE", {"Parotid_L": 0.8, "Parotid_R": 0.8})
    labels = np.zeros((40, 64, 64), dtype=np.uint8)
    labels[10:30, 40:60, 20:44] = 3                     # mandible, 24 ml at 2.5 x 1 x 1
    labels[10:20, 5:20, 5:20] = 7                       # Parotid_R, 5.6 ml
    labels[10:20, 5:20, 45:60] = 6                      # Parotid_L, 5.6 ml, unsure
    sure = 0.9
    segmentation = Segmentation(labels, {}, None, {3: 0.95, 7: sure, 6: 0.7})
    result = pipeline.report(segmentation, StandInVolume(labels.astype(np.int16),
                                                         (2.5, 1.0, 1.0)), {}, {})
    assert result.ok, result.reason
    assert "Parotid_L" in result.measurements["absent"]
    assert "Parotid_R" not in result.measurements["absent"]
    assert not (result.label_map == 6).any() and (result.label_map == 7).sum() == 2250
    assert result.measurements["confidence"]["Parotid_R"] == pytest.approx(sure)
    assert "Parotid_L" in result.reason


def test_organs_above_the_field_of_view_are_left_out_and_named(
        pipeline: HeadNeckOarPipeline, phantom: object) -> None:
    """A scan that stops below the orbits: no optic nerve or chiasm in it, the rest found."""
    optic = np.flatnonzero(np.isin(phantom.labels, (2, 4, 5)).any(axis=(1, 2)))  # type: ignore[attr-defined]
    cut = slice(None, int(optic[0]) - 2)      # the last slice lies just below the nerves
    result = pipeline.run(StandInVolume(phantom.hu[cut], phantom.spacing))  # type: ignore[attr-defined]
    assert result.ok, result.reason
    assert {"OpticChiasm", "OpticNrv_L", "OpticNrv_R"} <= set(result.measurements["absent"])
    assert not set(result.structures.values()) & {"OpticChiasm", "OpticNrv_L", "OpticNrv_R"}
    assert not np.isin(result.label_map, (2, 4, 5)).any()
    assert {"Bone_Mandible", "Parotid_L", "Parotid_R"} <= set(result.structures.values())
    assert "not found: " in result.reason


def test_a_field_of_view_that_cuts_the_mandible_is_no_result(
        pipeline: HeadNeckOarPipeline, phantom: object) -> None:
    mandible = np.flatnonzero((phantom.labels == 3).any(axis=(1, 2)))  # type: ignore[attr-defined]
    cut = slice(int(mandible[0]) + 6, None)      # the scan starts inside the mandible
    result = pipeline.run(StandInVolume(phantom.hu[cut], phantom.spacing))  # type: ignore[attr-defined]
    assert not result.ok and "cuts the mandible" in result.reason
    assert result.label_map is None


@pytest.mark.parametrize("region", ["abdomen", "head"])
def test_an_abdomen_or_a_head_only_scan_routed_here_is_no_result(
        pipeline: HeadNeckOarPipeline, region: str) -> None:
    from dicomnode.phantoms import make_phantom

    other = make_phantom(region, 3, matrix=192, slices=80 if region == "abdomen" else None)
    result = pipeline.run(StandInVolume(other.hu, other.spacing))
    assert not result.ok and "no head-and-neck anatomy" in result.reason
    assert result.label_map is None


def test_weights_are_small_and_named_in_the_manifest() -> None:
    entry = weights.verify("headneck_oar")
    assert entry.path.stat().st_size < 20 * 2**20
    assert entry.data["input"]["labels"] == {str(s.label): s.name for s in HEADNECK}
