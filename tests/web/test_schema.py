"""The REST API against its own OpenAPI schema: schemathesis generates the requests.

schemathesis' pytest plugin does not run under this pytest (it reads a private
attribute pytest 9 dropped), so its Python API is driven here: every operation of the
schema, hypothesis-generated cases, every default check (no server error, status codes
and bodies as documented, ...).
"""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings

from dicomnode.web.app import create_app
from tests.web.conftest import basic, stored_study

#: Generated requests per operation (~0.7 s a hundred on the 2-core build machine).
EXAMPLES = 30


def test_every_generated_request_is_answered_without_a_server_error_and_as_documented(
        tmp_path: Path) -> None:
    with stored_study(tmp_path) as (node, uid):
        schema = schemathesis.openapi.from_asgi("/openapi.json",
                                                create_app(node.settings, node.db))
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12
        failures: list[str] = []
        for operation in operations:
            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=basic())

            try:
                run()
            except Exception as exc:  # collect every operation's failure, then report
                failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
        assert not failures, "\n\n".join(failures)
        # and the paths a random UID never reaches: the stored study, acted on
        by_key = {(o.method.upper(), o.path): o for o in operations}
        study = "/api/v1/studies/{study_uid}"
        explicit = [
            ("GET", study, {}), ("POST", f"{study}/rerun", {"body": {}}),
            ("POST", f"{study}/reroute", {"body": {"pipeline": "headneck_oar"}}),
            ("POST", f"{study}/resend", {"body": {"peer": "PACS"}})]
        for method, path, extra in explicit:
            case = by_key[(method, path)].Case(path_parameters={"study_uid": uid},
                                               media_type="application/json", **extra)
            response = case.call_and_validate(headers=basic())
            assert response.status_code == 200, (path, response.text)
        jobs = by_key[("GET", "/api/v1/jobs")].Case(query={"state": "queued"}).call_and_validate(
            headers=basic()).json()
        assert len(jobs) == 2  # the re-run and the re-route
        cancel = by_key[("POST", "/api/v1/jobs/{job_id}/cancel")].Case(
            path_parameters={"job_id": jobs[0]["id"]})
        assert cancel.call_and_validate(headers=basic()).status_code == 200
