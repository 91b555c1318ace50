"""The REST API and the pages' reads and actions (web/api.py, queries.py, actions.py)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from dicomnode.node import Node
from dicomnode.store.models import AuditEvent, Delivery, Job, JobState
from dicomnode.web.app import create_app
from tests.web.conftest import basic


def test_the_studies_list_shows_state_trigger_routing_jobs_deliveries_and_notifications(
        client: TestClient, stored: tuple[Node, str]) -> None:
    _, uid = stored
    page = client.get("/api/v1/studies").json()
    assert page["total"] == 1
    study = page["studies"][0]
    assert study["study_uid"] == uid
    assert study["status"] == "done"
    assert study["completion_trigger"] == "association_release"
    assert (study["instances"], study["series_count"]) == (5, 1)
    assert study["routing"]["routed"] is True and study["routing"]["pipelines"] == [
        "liver_tumor"]
    liver = next(j for j in study["jobs"] if j["pipeline"] == "liver_tumor")
    assert liver["timings"] == {"load_series": 0.2, "inference": 3.5, "encode": 1.1}
    assert study["deliveries"][0]["attempts"] == 3
    assert study["deliveries"][0]["last_error"] == "connection refused"
    # a webhook URL may carry a token: only its scheme and host are shown
    assert study["notifications"][0]["target"] == "https://hooks.example"
    assert "secret-token" not in client.get("/api/v1/notifications").text


def test_studies_are_found_by_accession_number_uid_prefix_state_pipeline_and_sender(
        client: TestClient, stored: tuple[Node, str]) -> None:
    _, uid = stored

    def total(**params: str) -> int:
        return int(client.get("/api/v1/studies", params=params).json()["total"])

    assert total(q="ACC123") == total(q=uid[:12]) == total(state="done") == 1
    assert total(pipeline="liver_tumor") == total(calling_aet="CTSCANNER") == 1
    assert total(q="ACC999") == total(state="failed") == total(calling_aet="OTHER") == 0
    assert total(received_from="2000-01-01") == 1 and total(received_to="2000-01-01") == 0
    assert "ACC123" in client.get("/studies", params={"q": "ACC123"}).text


def test_a_study_shows_its_measurements_and_links_to_its_result_files(
        client: TestClient, stored: tuple[Node, str]) -> None:
    _, uid = stored
    study = client.get(f"/api/v1/studies/{uid}").json()
    (result,) = study["results"]
    rows = {m["name"]: (m["value"], m["unit"]) for m in result["measurements"]}
    assert rows["Liver volume"] == ("1520.5", "ml")
    assert rows["Lesion 1 longest axial diameter"] == ("31.0", "mm")
    assert rows["Tumour to liver ratio"] == ("0.81", "%")
    (file,) = result["files"]
    download = client.get(file["url"])
    assert download.status_code == 200 and download.content.endswith(b"DICM")
    assert download.headers["content-type"] == "application/dicom"
    # only files the job recorded are served
    job = result["job"]
    assert client.get(f"/api/v1/jobs/{job}/files/dicomnode.db").status_code == 404
    assert client.get(f"/api/v1/jobs/{job}/files/..%2F..%2Fdicomnode.db").status_code == 404
    assert client.get("/api/v1/studies/1.2.999").status_code == 404
    assert "No such study" in client.get("/studies/1.2.999").text


def test_no_patient_name_or_id_is_shown_to_a_viewer_who_has_not_signed_in(
        client: TestClient, stored: tuple[Node, str]) -> None:
    _, uid = stored
    for path in (f"/studies/{uid}", f"/api/v1/studies/{uid}", "/studies", "/api/v1/studies"):
        text = client.get(path).text
        assert "Secret" not in text and "SECRET-ID-42" not in text, path
    signed_in = client.get(f"/api/v1/studies/{uid}", headers=basic()).json()
    assert signed_in["patient"] == {"name": "Secret^Patient", "id": "SECRET-ID-42"}
    assert "Secret^Patient" in client.get(f"/studies/{uid}", headers=basic()).text


def test_an_action_without_a_signed_in_user_is_refused_and_changes_nothing(
        client: TestClient, stored: tuple[Node, str]) -> None:
    node, uid = stored
    with node.db.session() as session:
        before = session.execute(select(Job.id)).scalars().all()
    for path in (f"/api/v1/studies/{uid}/rerun", f"/studies/{uid}/rerun"):
        answer = client.post(path)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"].startswith("Basic")
    wrong = client.post(f"/api/v1/studies/{uid}/rerun", headers=basic(password="guess1234"))
    assert wrong.status_code == 401
    assert client.post("/api/v1/jobs/1/cancel").status_code == 401
    assert client.post(f"/api/v1/studies/{uid}/resend", json={"peer": "PACS"}
                       ).status_code == 401
    with node.db.session() as session:
        assert session.execute(select(Job.id)).scalars().all() == before
        assert session.execute(select(AuditEvent).where(
            AuditEvent.event.like("web.%"))).first() is None


def test_a_rerun_queues_the_pipeline_again_and_records_who_asked(
        client: TestClient, stored: tuple[Node, str]) -> None:
    node, uid = stored
    answer = client.post(f"/api/v1/studies/{uid}/rerun", headers=basic())
    assert answer.status_code == 200, answer.text
    (job_id,) = answer.json()["jobs"]
    with node.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.pipeline, job.state) == ("liver_tumor", "queued")
        assert job.routing and job.routing["action"]["series_instance_uid"] == "1.2.3"
        audit = session.execute(select(AuditEvent).where(AuditEvent.event == "web.rerun")
                                ).scalar_one()
        assert audit.study_uid == uid and audit.detail["user"] == "alice"
        assert audit.detail["jobs"] == [job_id]
    # a second re-run while the first is queued is refused, and says why
    again = client.post(f"/api/v1/studies/{uid}/rerun", headers=basic())
    assert again.status_code == 409 and "already queued" in again.json()["detail"]
    study = client.get(f"/api/v1/studies/{uid}").json()
    assert study["status"] == "queued"
    assert client.post("/api/v1/studies/1.2.999/rerun", headers=basic()).status_code == 404


def test_a_queued_job_can_be_cancelled_and_a_finished_one_cannot(
        client: TestClient, stored: tuple[Node, str]) -> None:
    node, uid = stored
    (job_id,) = client.post(f"/api/v1/studies/{uid}/rerun", headers=basic()).json()["jobs"]
    cancelled = client.post(f"/api/v1/jobs/{job_id}/cancel", headers=basic())
    assert cancelled.status_code == 200
    with node.db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.CANCELLED.value
        assert job.reason == "cancelled by alice"
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=basic()).status_code == 409
    # the cancelled re-run leaves the study as its earlier run left it
    assert client.get(f"/api/v1/studies/{uid}").json()["status"] == "done"
    assert client.post("/api/v1/jobs/999999/cancel", headers=basic()).status_code == 404


def test_reroute_queues_another_pipeline_on_the_routed_series_and_refuses_unknown_ones(
        client: TestClient, stored: tuple[Node, str]) -> None:
    node, uid = stored
    unknown = client.post(f"/api/v1/studies/{uid}/reroute", json={"pipeline": "nope"},
                          headers=basic())
    assert unknown.status_code == 422 and "installed" in unknown.json()["detail"]
    answer = client.post(f"/api/v1/studies/{uid}/reroute", json={"pipeline": "headneck_oar"},
                         headers=basic())
    assert answer.status_code == 200, answer.text
    with node.db.session() as session:
        job = session.get(Job, answer.json()["jobs"][0])
        assert job is not None and job.pipeline == "headneck_oar"
        assert job.routing and job.routing["action"]["rule"] == "re-routed by alice"


def test_resend_queues_the_results_for_a_configured_peer_only(
        client: TestClient, stored: tuple[Node, str]) -> None:
    node, uid = stored
    unknown = client.post(f"/api/v1/studies/{uid}/resend", json={"peer": "ELSEWHERE"},
                          headers=basic())
    assert unknown.status_code == 422 and "PACS" in unknown.json()["detail"]
    answer = client.post(f"/api/v1/studies/{uid}/resend", json={"peer": "PACS"},
                         headers=basic())
    assert answer.status_code == 200, answer.text
    with node.db.session() as session:
        delivery = session.get(Delivery, answer.json()["deliveries"][0])
        assert delivery is not None and delivery.destination_ae == "PACS"
        assert delivery.files[0].endswith("sr.dcm")


def test_a_form_post_from_another_site_is_refused(client: TestClient,
                                                  stored: tuple[Node, str]) -> None:
    node, uid = stored
    answer = client.post(f"/studies/{uid}/rerun", headers={
        **basic(), "Origin": "https://evil.example"}, follow_redirects=False)
    assert answer.status_code == 403
    ok = client.post(f"/studies/{uid}/rerun", headers={**basic(), "Origin": "http://testserver"},
                     follow_redirects=False)
    assert ok.status_code == 303 and "done=queued" in ok.headers["location"]
    # behind a trusted reverse proxy its X-Forwarded-Host is this server
    proxied = TestClient(create_app(
        node.settings.model_copy(update={"web": node.settings.web.model_copy(  # type: ignore[union-attr]
            update={"trusted_proxies": ["testclient"]})}), node.db))
    behind = proxied.post(f"/studies/{uid}/rerun", headers={
        **basic(), "Origin": "https://pacs-tools.example", "X-Forwarded-Host":
        "pacs-tools.example"}, follow_redirects=False)
    assert behind.status_code == 303
    assert client.post(f"/studies/{uid}/rerun", headers={
        **basic(), "Origin": "https://pacs-tools.example", "X-Forwarded-Host":
        "pacs-tools.example"}, follow_redirects=False).status_code == 403


def test_health_shows_the_queue_disk_reserve_and_pipelines(
        client: TestClient, stored: tuple[Node, str]) -> None:
    health = client.get("/api/v1/health").json()
    assert health["disk_ok"] is True and health["disk_free_bytes"] > 0
    assert {p["name"] for p in health["pipelines"]} >= {"liver_tumor", "brain_ich"}
    assert health["listener_up"] is False  # this app runs beside the node, not in it
    page = client.get("/health").text
    assert "liver_tumor" in page and "Disk" in page


def test_a_running_job_shows_its_progress_against_the_pipelines_typical_run(
        client: TestClient, stored: tuple[Node, str]) -> None:
    from datetime import timedelta

    from dicomnode.store.models import Study, utcnow

    node, uid = stored
    now = utcnow()
    with node.db.transaction() as session:
        study = session.execute(select(Study).where(Study.study_uid == uid)).scalar_one()
        for job in study.jobs:  # the fixture's liver job took 100 s
            if job.pipeline == "liver_tumor":
                job.started_at, job.finished_at = now - timedelta(seconds=100), now
        session.add(Job(study=study, study_version=study.version, pipeline="liver_tumor",
                        priority=50, state=JobState.RUNNING.value, attempts=1,
                        started_at=now - timedelta(seconds=40)))
    study_out = client.get(f"/api/v1/studies/{uid}").json()
    running = next(j for j in study_out["jobs"] if j["state"] == "running")
    assert 0.35 <= running["progress"] <= 0.6
    assert study_out["status"] == "running"
    assert "<progress" in client.get("/studies").text


def test_a_nul_character_in_a_parameter_is_refused_as_invalid_not_a_server_error(
        client: TestClient) -> None:
    # Found by the schema run on PostgreSQL, which refuses NUL in a text parameter.
    for url in ("/api/v1/studies?calling_aet=%00", "/api/v1/studies/1.2%003",
                "/studies?q=a%00b"):
        answer = client.get(url)
        assert answer.status_code == 422, (url, answer.status_code)
        assert answer.json()["detail"][0]["msg"] == "NUL characters are not accepted"
