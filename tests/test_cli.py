"""The command line: serve with the embedded default + storescu + status --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import free_port
from tests.factories import write_series
from tests.peers import wait_port


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_serve_store_status(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env.update(DICOMNODE_PORT=str(port), DICOMNODE_BIND_ADDRESS="127.0.0.1",
               DICOMNODE_DISK_RESERVE_MB="0")
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve"], cwd=tmp_path,
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port, 30)
        paths = write_series(tmp_path / "study", 300, rows=16, cols=16)
        out = subprocess.run(["storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                              *map(str, paths)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 10
        while True:
            status = json.loads(_cli("status", "--json", cwd=tmp_path, env=env).stdout)
            if status["studies"] and status["studies"][0]["state"] == "complete":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        study = status["studies"][0]
        assert study["instances"] == 300 and study["completion_trigger"] == "association_release"
        assert (tmp_path / "var" / "dicomnode.db").is_file()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "node.stopped" in err


def test_process_reports_honestly(tmp_path: Path) -> None:
    write_series(tmp_path / "study", 5)
    res = _cli("process", str(tmp_path / "study"), "--out", str(tmp_path / "out"),
               cwd=tmp_path, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["state"] == "no_result" and summary["reason"]


def test_bad_config_exits_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: -1\n")
    res = _cli("status", "--config", str(cfg), cwd=tmp_path, env=dict(os.environ))
    assert res.returncode == 2 and "port" in res.stderr
