"""The systemd unit in deploy/ agrees with the package and the production example."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "dicomnode.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT)
    return parser


def test_unit_runs_serve_with_the_production_config_in_its_state_directory() -> None:
    service = _unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name == "dicomnode" and command[1:3] == ["serve", "--config"]
    production = yaml.safe_load((ROOT / "config" / "production.yaml").read_text())
    # data_dir of the production example is where systemd gives the service its state
    assert production["data_dir"] == f"/var/lib/{service['StateDirectory']}"
    assert service["WorkingDirectory"] == production["data_dir"]
    # only the node gets SIGTERM: it stops its SEG helper itself
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert "PrivateDevices" not in service  # the GPU stays reachable


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    # the install paths and the service user do not exist on a build machine: point the
    # unit at this checkout's console script and at root, and let systemd check the rest
    script = Path(sys.executable).with_name("dicomnode")
    text = (UNIT.read_text().replace("/opt/dicomnode/.venv/bin/dicomnode", str(script))
            .replace("User=dicomnode", "User=root").replace("Group=dicomnode", "Group=root"))
    unit = tmp_path / "dicomnode.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    # unknown or malformed settings are only warnings to systemd: none may be printed
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
