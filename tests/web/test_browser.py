"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

A phantom abdomen study is sent with dcmtk's storescu to a real node, which completes,
routes and runs the liver pipeline on it and sends the results to a dcmtk storescp.
Chromium then opens the studies list, the study page (preview image, measurements) and
presses Re-run; screenshots of the pages are written to the test's folder, and kept in
``$DICOMNODE_SCREENSHOTS_DIR`` when it is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.models import AuditEvent, Job
from tests.peers import storescp
from tests.web.conftest import PASSWORD, USER, web_settings

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


def _liver_jobs(node: Node) -> list[tuple[int, str]]:
    with node.db.session() as session:
        return [(j.id, j.state) for j in session.execute(
            select(Job).where(Job.pipeline == "liver_tumor").order_by(Job.id)).scalars()]


def _wait_liver_jobs_done(node: Node, count: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = _liver_jobs(node)
        if any(state in ("failed", "no_result") for _, state in jobs):
            pytest.fail(f"liver job ended without a result: {jobs}")
        if len([s for _, s in jobs if s == "done"]) >= count:
            return
        time.sleep(0.5)
    pytest.fail(f"liver jobs not done in {timeout_s} s: {_liver_jobs(node)}")


def test_a_processed_abdomen_study_is_shown_previewed_and_rerun_in_chromium(
        tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (scripts/test installs it)")
    from playwright.sync_api import expect, sync_playwright

    phantom = make_phantom("abdomen", seed=7, matrix=256, spacing=(2.5, 1.6, 1.6))
    files = sorted(p for p in write_phantom(phantom, tmp_path / "study",
                                            patient_name="Doe^Jane", patient_id="PID-77")
                   if p.suffix == ".dcm")
    shots = tmp_path / "screenshots"
    with storescp(tmp_path / "pacs") as (pacs_port, _):
        settings = web_settings(tmp_path, workers=1, urgent_workers=1,
                                peers={"CTSCANNER": {"host": "127.0.0.1", "port": pacs_port,
                                                     "ae_title": "STORESCP"}})
        node = Node(settings)
        node.start()
        try:
            assert node.web is not None and node.web.url
            url = node.web.url
            sent = subprocess.run(
                ["storescu", "-aet", "CTSCANNER", "-aec", "DICOMNODE", "127.0.0.1",
                 str(node.scp.port), *map(str, files)],
                capture_output=True, text=True, timeout=300)
            assert sent.returncode == 0, sent.stderr
            _wait_liver_jobs_done(node, 1)
            uid = str(phantom_study_uid(files[0]))
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    # an anonymous viewer sees the study but not the patient
                    anonymous = browser.new_page()
                    anonymous.goto(f"{url}/studies/{uid}")
                    expect(anonymous.locator("h1")).to_contain_text(uid)
                    assert "Doe^Jane" not in anonymous.content()
                    assert "PID-77" not in anonymous.content()
                    expect(anonymous.locator("#rerun")).to_have_count(0)

                    context = browser.new_context(
                        viewport={"width": 1280, "height": 900},
                        http_credentials={"username": USER, "password": PASSWORD})
                    page = context.new_page()
                    page.goto(f"{url}/studies")
                    # the browser answers the server's challenge (HTTP Basic) with the
                    # user's credentials, then sends them with every request
                    page.get_by_role("link", name="Sign in").click()
                    expect(page.locator("header .who")).to_contain_text(f"signed in as {USER}")
                    row = page.locator(f'tr[data-study-uid="{uid}"]')
                    expect(row.locator("td").nth(3)).to_have_text("done", timeout=30_000)
                    expect(row).to_contain_text("liver_tumor")
                    page.screenshot(path=str(shots / "studies.png"), full_page=True)

                    row.locator("a").first.click()
                    page.wait_for_url(f"**/studies/{uid}")
                    expect(page.locator("#patient")).to_contain_text("Doe^Jane")
                    expect(page.locator("table.measurements").first).to_contain_text(
                        "Liver volume")
                    page.wait_for_function(
                        "() => { const i = document.querySelector('img.preview');"
                        " return i && i.complete && i.naturalWidth > 0; }", timeout=60_000)
                    page.screenshot(path=str(shots / "study.png"), full_page=True)

                    page.locator("#rerun").click()
                    expect(page.locator(".flash.ok")).to_contain_text("queued 1 job")
                    # closed while its renderer answers: a tab left idle for the whole job
                    # on a loaded machine has had its renderer go away (and then neither
                    # reloads nor closes); a new tab of the same signed-in context follows
                    page.close()
                    _wait_liver_jobs_done(node, 2)
                    page = context.new_page()
                    page.goto(f"{url}/studies/{uid}")
                    expect(page.locator('#jobs tr[data-state="done"]')).to_have_count(3)
                    expect(page.locator("#audit")).to_contain_text("web.rerun")
                    expect(page.locator("#audit")).to_contain_text(USER)

                    page.goto(f"{url}/health")
                    expect(page.locator("#pipelines")).to_contain_text("liver_tumor")
                    expect(page.locator("#listener")).to_contain_text("up")
                    page.screenshot(path=str(shots / "health.png"), full_page=True)
                finally:
                    browser.close()
            with node.db.session() as session:
                audit = session.execute(select(AuditEvent).where(
                    AuditEvent.event == "web.rerun")).scalar_one()
                assert audit.detail is not None and audit.detail["user"] == USER
            assert [state for _, state in _liver_jobs(node)] == ["done", "done"]
        finally:
            node.stop()
    for name in ("studies.png", "study.png", "health.png"):
        assert (shots / name).stat().st_size > 10_000, name
    keep = os.environ.get("DICOMNODE_SCREENSHOTS_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copy2(shot, Path(keep) / shot.name)


def phantom_study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
