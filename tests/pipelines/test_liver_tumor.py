"""Tests of the liver_tumor pipeline: availability checks, bad input, a phantom abdomen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dicomnode.nn import weights
from dicomnode.pipelines import base, liver_tumor
from dicomnode.pipelines.base import (
    PipelineContext,
    PipelineUnavailableError,
    ResultObject,
    get_pipeline,
    registered,
)
from dicomnode.pipelines.liver_tumor import LiverTumorPipeline
from tests.pipelines.standin import StandInVolume


def _copy_models(tmp_path: Path) -> Path:
    entry = weights.find_entry("liver_tumor")
    target = tmp_path / "models"
    target.mkdir()
    shutil.copy(entry.directory / "manifest.json", target / "manifest.json")
    shutil.copy(entry.path, target / entry.path.name)
    return target


def test_registered_and_declares_its_outputs() -> None:
    assert "liver_tumor" in registered()
    pipeline = get_pipeline("liver_tumor")
    assert isinstance(pipeline, LiverTumorPipeline)
    assert pipeline.region == "abdomen"
    assert pipeline.emits == (ResultObject.SEG, ResultObject.RTSTRUCT, ResultObject.SR)


def test_one_instance_keeps_its_weights_and_reloads_changed_ones(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    import torch

    assert get_pipeline("liver_tumor") is get_pipeline("liver_tumor")
    models = _copy_models(tmp_path)
    pipeline = LiverTumorPipeline(PipelineContext(models, "cpu"))
    pipeline.check()
    pipeline.warm_up()
    first = pipeline._segmenter
    assert first is not None
    pipeline.check()
    pipeline.warm_up()
    assert pipeline._segmenter is first          # the same weights: not loaded again
    # new weights installed under the same name (an update): the next study uses them
    entry = json.loads((models / "manifest.json").read_text())
    item = next(m for m in entry["models"] if m["name"] == "liver_tumor")
    checkpoint = torch.load(models / item["file"], weights_only=True)
    checkpoint["config"]["tumour_threshold"] = 0.77
    torch.save(checkpoint, models / item["file"])
    item["sha256"] = weights.sha256_of(models / item["file"])
    (models / "manifest.json").write_text(json.dumps(entry))
    pipeline.check()
    pipeline.warm_up()
    assert pipeline._segmenter is not first
    assert pipeline._segmenter.tumour_threshold == 0.77


def test_missing_weights_make_it_unavailable(tmp_path: Path) -> None:
    with pytest.raises(PipelineUnavailableError, match="liver_tumor unavailable: no weights"):
        LiverTumorPipeline(PipelineContext(tmp_path)).check()


def test_checksum_mismatch_names_the_file(tmp_path: Path) -> None:
    models = _copy_models(tmp_path)
    entry = next(m for m in json.loads((models / "manifest.json").read_text())["models"]
                 if m["name"] == "liver_tumor")
    with (models / entry["file"]).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(PipelineUnavailableError, match=entry["file"].replace(".", r"\.")
                       + ".*fails its checksum"):
        LiverTumorPipeline(PipelineContext(models)).check()


def test_too_small_volume_is_no_result() -> None:
    volume = StandInVolume(np.zeros((4, 64, 64), dtype=np.int16), (5.0, 3.0, 3.0))
    result = LiverTumorPipeline().run(volume)
    assert not result.ok and "too small" in result.reason
    assert result.label_map is None


def test_too_large_for_memory_is_no_result(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "available_memory", lambda: 1 << 20)
    volume = StandInVolume(np.zeros((40, 128, 128), dtype=np.int16), (5.0, 3.0, 3.0))
    result = LiverTumorPipeline().run(volume)
    assert not result.ok and "too large" in result.reason


def test_volume_without_liver_is_no_result() -> None:
    """A water cylinder in air: no liver, so no finding and no empty mask."""
    _z, y, x = np.mgrid[:40, :128, :128]
    hu = np.full((40, 128, 128), -1000, dtype=np.int16)
    hu[(y - 64) ** 2 + (x - 64) ** 2 < 50 ** 2] = 0
    result = LiverTumorPipeline(PipelineContext(device="cpu")).run(
        StandInVolume(hu, (5.0, 3.125, 3.125)))
    assert not result.ok and "no liver" in result.reason
    assert result.label_map is None
    assert result.algorithm["name"] == "liver_tumor" and len(result.algorithm["sha256"]) == 64


def test_phantom_abdomen_liver_and_measurements() -> None:
    phantoms = pytest.importorskip("dicomnode.phantoms")
    if not hasattr(phantoms, "make_phantom"):
        pytest.skip("dicomnode.phantoms is not installed on this branch")
    phantom = phantoms.make_phantom("abdomen", 3, matrix=192, slices=100)
    volume = StandInVolume(phantom.hu, phantom.spacing)
    result = LiverTumorPipeline(PipelineContext(device="cpu")).run(volume)
    assert result.ok, result.reason
    assert result.label_map is not None
    assert result.label_map.shape == phantom.hu.shape and result.label_map.dtype == np.uint8
    assert result.structures[1] == "Liver"
    assert set(result.structures) <= {1, 2}
    truth = np.isin(phantom.labels, (1, 2))
    pred = result.label_map > 0
    assert 2 * (truth & pred).sum() / (truth.sum() + pred.sum()) > 0.85
    m = result.measurements
    for key in ("liver_volume_ml", "lesion_count", "lesions", "total_tumour_volume_ml",
                "tumour_to_liver_ratio"):
        assert key in m
    assert m["lesion_count"] == len(m["lesions"])
    assert all(d["volume_ml"] > 0 and d["longest_axial_diameter_mm"] > 0 for d in m["lesions"])
    assert {"stage1_liver", "stage2_tumour", "total"} <= set(result.timings)
    json.dumps(result.summary())


def test_structure_names_are_those_of_the_result_codes() -> None:
    from dicomnode.results.codes import ABDOMEN

    assert {s.label: s.name for s in ABDOMEN} == liver_tumor.STRUCTURES


#: sha256 of the label maps the shipped weights give held-out phantoms 0 and 1 (matrix
#: 256), recorded before the model framework moved the liver onto it (stop 13's code).
HELD_OUT_LABEL_MAPS = {
    "weights": "liver_tumor 1.5.0",
    0: "8772e914f13bcc4e8fbb055b12ca053770716905a7b1f78d3496a880493de153",
    1: "eaf47e875c6ffe1be061398bd8f720c3c660353aebb269f720a4e9f45b66711c",
}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_label_maps_are_those_the_weights_gave_before_the_framework(
        seed: int) -> None:
    import hashlib

    from dicomnode.nn.liver_tumor import LiverTumorRecipe

    entry = weights.find_entry("liver_tumor")
    if f"liver_tumor {entry.version}" != HELD_OUT_LABEL_MAPS["weights"]:
        pytest.skip(f"recorded for {HELD_OUT_LABEL_MAPS['weights']}, installed "
                    f"{entry.version}")
    case = LiverTumorRecipe().phantom_case(seed, matrix=256)
    result = LiverTumorPipeline(PipelineContext(device="cpu")).run(
        StandInVolume(case.hu, case.spacing))
    assert result.label_map is not None
    assert hashlib.sha256(result.label_map.tobytes()).hexdigest() == HELD_OUT_LABEL_MAPS[seed]
