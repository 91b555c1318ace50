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
    with stored_study(tmp_path) as (node, _):
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
