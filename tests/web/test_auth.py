"""Who may look and act (web/auth.py, web/passwords.py, the `web` settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from dicomnode.config import load_settings
from dicomnode.node import Node
from dicomnode.web.app import create_app
from dicomnode.web.passwords import hash_password, verify_password
from tests.web.conftest import PASSWORD_HASH, basic


def _app(node: Node, **web: object) -> TestClient:
    settings = node.settings.model_copy(update={"web": node.settings.web.model_copy(  # type: ignore[union-attr]
        update=web)})
    return TestClient(create_app(settings, node.db))


def test_on_a_non_loopback_bind_nothing_is_shown_before_signing_in(
        stored: tuple[Node, str]) -> None:
    node, uid = stored
    client = _app(node, bind_address="0.0.0.0")
    for path in (f"/studies/{uid}", f"/api/v1/studies/{uid}", "/studies", "/api/v1/studies",
                 "/health", "/metrics", "/api/v1/jobs/1/files/sr.dcm"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert "Secret" not in answer.text and "SECRET-ID-42" not in answer.text
        assert uid not in answer.text
    page = client.get(f"/studies/{uid}", headers=basic())
    assert page.status_code == 200 and "Secret^Patient" in page.text


def test_a_trusted_proxy_header_signs_in_only_from_a_trusted_proxy(
        stored: tuple[Node, str]) -> None:
    node, uid = stored
    header = {"X-Forwarded-User": "bob@hospital.example"}
    untrusted = _app(node, bind_address="0.0.0.0", trusted_user_header="X-Forwarded-User")
    assert untrusted.get("/api/v1/studies", headers=header).status_code == 401
    # the test client connects from "testclient"
    trusted = _app(node, bind_address="0.0.0.0", trusted_user_header="X-Forwarded-User",
                   trusted_proxies=["testclient"])
    assert trusted.get(f"/api/v1/studies/{uid}", headers=header).json()["patient"] is not None
    answer = trusted.post(f"/api/v1/studies/{uid}/rerun", headers=header)
    assert answer.status_code == 200
    study = trusted.get(f"/api/v1/studies/{uid}", headers=header).json()
    assert study["audit"][0]["user"] == "bob@hospital.example"


def test_a_non_loopback_bind_without_any_way_to_sign_in_is_refused_by_the_config(
        tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"web\.bind_address"):
        load_settings(None, data_dir=tmp_path, web={"bind_address": "0.0.0.0"})
    with pytest.raises(ValidationError, match="not a password hash"):
        load_settings(None, data_dir=tmp_path, web={"users": {"alice": "plain-text"}})
    assert load_settings(None, data_dir=tmp_path, web={
        "bind_address": "0.0.0.0", "users": {"alice": PASSWORD_HASH}}).web is not None


def test_the_dashboard_is_off_with_web_null_in_the_config_file(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.delenv("DICOMNODE_WEB", raising=False)
    assert load_settings(None, data_dir=tmp_path).web is not None  # on by default
    config = tmp_path / "node.yaml"
    config.write_text("web: null\n")
    assert load_settings(config).web is None
    monkeypatch.setenv("DICOMNODE_WEB", "off")
    assert load_settings(None, data_dir=tmp_path).web is None


def test_web_passwd_makes_a_hash_that_only_its_password_matches(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "web-passwd", "carol"],
                         input="long enough\nlong enough\n", capture_output=True, text=True,
                         timeout=120, check=True).stdout
    hashed = out.split('carol: "')[1].split('"')[0]
    assert hashed.startswith("scrypt$")
    assert verify_password(hashed, "long enough")
    assert not verify_password(hashed, "long enougH")
    assert "long enough" not in out
    with pytest.raises(ValueError, match="at least 8"):
        hash_password("short")


def test_a_taken_web_port_is_logged_and_the_dicom_listener_keeps_serving(
        stored: tuple[Node, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dicomnode.net.scu import send_files
    from tests.factories import write_series
    from tests.web.conftest import web_settings

    first, _ = stored
    assert first.web is not None and first.web.port
    second = Node(web_settings(tmp_path / "second", web={"port": first.web.port}))
    with caplog.at_level("ERROR", logger="dicomnode.node"):
        second.start()
    try:
        assert second.web is None
        assert any(r.getMessage() == "web.bind_failed" for r in caplog.records)
        files = write_series(tmp_path / "more", 3)
        assert send_files(files, host="127.0.0.1", port=second.scp.port,
                          called_aet="DICOMNODE", calling_aet="CT").ok
    finally:
        second.stop()
