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


COMPOSE = ROOT / "deploy" / "compose.yaml"
WORKER_UNIT = ROOT / "deploy" / "dicomnode-worker@.service"
GUIDE = ROOT / "deploy" / "README.md"


def _guide_services() -> set[str]:
    """The services of the guide's table: the first column's `name`s."""
    rows = [line for line in GUIDE.read_text().splitlines() if line.startswith("| `")]
    return {row.split("`")[1] for row in rows}


def test_compose_file_runs_the_services_the_guide_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMNODE_DATABASE_URL", raising=False)  # the PostgreSQL pass's
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == _guide_services() == {
        "node", "worker-gpu0", "worker-gpu1", "postgres", "rabbitmq", "orthanc"}
    # node and workers share the data volume and one config, which is a valid config
    for name in ("node", "worker-gpu0", "worker-gpu1"):
        assert "data:/var/lib/dicomnode" in services[name]["volumes"]
    assert services["node"]["command"][0] == "serve"
    for name in ("worker-gpu0", "worker-gpu1"):
        command = services[name]["command"]
        assert command[:3] == ["worker", "--config", "/etc/dicomnode/node.yaml"]
    from dicomnode.config import load_settings

    settings = load_settings(ROOT / "deploy" / "node.compose.yaml")
    assert settings.executor == "celery" and settings.broker_url.startswith("amqp://")
    assert settings.db_url.startswith("postgresql") and "@postgres:" in settings.db_url
    assert "@rabbitmq:5672/" in settings.broker_url
    assert settings.peers["ORTHANC"].host == "orthanc"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_worker_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("dicomnode")
    text = (WORKER_UNIT.read_text()
            .replace("/opt/dicomnode/.venv/bin/dicomnode", str(script))
            .replace("User=dicomnode", "User=root").replace("Group=dicomnode", "Group=root"))
    unit = tmp_path / "dicomnode-worker@.service"
    unit.write_text(text)
    instance = tmp_path / "dicomnode-worker@0.service"
    instance.symlink_to(unit)
    out = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


def test_worker_unit_runs_one_worker_per_gpu() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(WORKER_UNIT)
    service = parser["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[1:4] == ["worker", "--config", "/etc/dicomnode/node.yaml"]
    assert command[command.index("--concurrency") + 1] == "1"
    # each instance sees only its GPU (several Environment= lines: the parser keeps one)
    assert "\nEnvironment=CUDA_VISIBLE_DEVICES=%i\n" in WORKER_UNIT.read_text()
