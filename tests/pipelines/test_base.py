"""Tests of dicomnode.pipelines.base: the context the node gives its pipelines, the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import load_settings
from dicomnode.pipelines import base
from dicomnode.pipelines.base import PipelineContext, PipelineUnavailableError, get_pipeline


def test_the_node_settings_reach_the_pipelines(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMNODE_DEVICE", "cpu")
    monkeypatch.setenv("DICOMNODE_MODELS_DIR", str(tmp_path / "site-models"))
    settings = load_settings(None, data_dir=tmp_path / "var")
    assert settings.device == "cpu" and settings.models_dir == tmp_path / "site-models"
    context = PipelineContext.from_settings(settings)
    assert context == PipelineContext(tmp_path / "site-models", "cpu")
    assert PipelineContext.from_environment() == context
    # the pipeline looks for its weights where the settings say, and says so
    with pytest.raises(PipelineUnavailableError, match="site-models"):
        get_pipeline("liver_tumor", context)


def test_one_instance_per_pipeline_and_context() -> None:
    cpu = PipelineContext(device="cpu")
    assert get_pipeline("liver_tumor", cpu) is get_pipeline("liver_tumor", cpu)
    other = PipelineContext(Path(base.__file__).resolve().parents[2] / "models", "cpu")
    assert get_pipeline("liver_tumor", other) is not get_pipeline("liver_tumor", cpu)
    with pytest.raises(PipelineUnavailableError, match="'knee_mri' is not installed"):
        get_pipeline("knee_mri", cpu)


def test_a_bad_device_makes_a_pipeline_unavailable_with_the_reason() -> None:
    with pytest.raises(PipelineUnavailableError, match="'device' value 'tpu'"):
        get_pipeline("liver_tumor", PipelineContext(device="tpu"))
