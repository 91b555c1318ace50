"""Tests for dicomnode.phantoms.command and the ``dicomnode phantom`` CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.phantoms.command import parse_spacing


def test_cli_writes_series_truth_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "head"
    result = CliRunner().invoke(app, ["phantom", "head", "--out", str(out), "--seed", "3",
                                      "--matrix", "64", "--slices", "12", "--preview",
                                      "--transfer-syntax", "jpegls", "--body-part", "none"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["dicom_files"] == 12 and summary["shape"] == [12, 64, 64]
    for name in ("labels.nii.gz", "labels.json", "truth.json", "preview.png"):
        assert (out / name).is_file()
    assert len(list(out.glob("*.dcm"))) == 12


def test_cli_leaves_out_the_resected_glands_and_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["phantom", "headneck", "--out", str(tmp_path / "op"),
                                      "--seed", "4", "--matrix", "96", "--slices", "48",
                                      "--resected", "Parotid_L, Glnd_Submand_R"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["resected"] == ["Glnd_Submand_R", "Parotid_L"]
    assert "Parotid_L" not in summary["labels"] and "Parotid_R" in summary["labels"]
    refused = CliRunner().invoke(app, ["phantom", "headneck", "--out", str(tmp_path / "x"),
                                       "--resected", "BrainStem"])
    assert refused.exit_code != 0 and "resected" in refused.output


def test_cli_reports_bad_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["phantom", "knee", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "region" in result.output


def test_parse_spacing() -> None:
    assert parse_spacing(None) is None
    assert parse_spacing("2.5") == (2.5,)
    assert parse_spacing("2.5,0.8") == (2.5, 0.8)
    assert parse_spacing("1x0.7x0.7") == (1.0, 0.7, 0.7)
    with pytest.raises(ValueError, match="spacing"):
        parse_spacing("a,b")
