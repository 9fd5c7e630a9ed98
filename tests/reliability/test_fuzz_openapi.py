"""Fuzz every operation of the OpenAPI schema with schemathesis, in-process against the ASGI app (real
Postgres and Redis behind it), with and without a valid key: whatever the input, never a 5xx."""
from __future__ import annotations

import secrets
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from schemathesis.checks import not_a_server_error

from onp_service_fixtures import make_settings
from relutil import make_key

MAX_EXAMPLES = 25  # per operation and auth mode: bounded (the whole module runs in well under a minute)


@pytest.fixture(scope="module")
def fuzz_app(settings, tmp_path_factory):
    from api.app import create_app

    s = make_settings(settings.database_url, tmp_path_factory.mktemp("fuzz"), f"onprel-{secrets.token_hex(3)}:",
                      auth_failures_burst=0, key_requests_burst=0)  # limits off: fuzz the handlers, not the 429s
    app = create_app(s, start_worker=False)
    app.state.fuzz_key = make_key(s, f"fuzzer-{secrets.token_hex(3)}")
    app.state.requests = Counter()

    @app.middleware("http")
    async def count(request, call_next):  # proof that the fuzzer reached the app, per status code
        response = await call_next(request)
        app.state.requests[response.status_code] += 1
        return response

    return app


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


FUZZ = hsettings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


def _fuzz_all(api_schema, headers: dict[str, str]) -> list[str]:
    """Run every operation's strategy through Hypothesis (schemathesis' pytest plugin does the same; it is
    driven by hand here because its fixture loader does not support pytest 9)."""
    import torch

    torch.set_flush_denormal(False)  # Hypothesis refuses to run with flush-to-zero on (set by training code)
    failures, labels = [], []
    for result in api_schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @given(case=operation.as_strategy())
        @FUZZ
        def run(case) -> None:
            case.call_and_validate(headers=headers, checks=[not_a_server_error])

        try:
            run()
        except Exception as exc:  # keep going: report every failing operation at once
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert len(labels) >= 9, labels  # every operation of /v1/repairs and the probes was fuzzed
    return failures


@pytest.mark.timeout(600)
def test_no_server_errors_with_a_valid_key(api_schema, fuzz_app) -> None:
    failures = _fuzz_all(api_schema, {"Authorization": f"Bearer {fuzz_app.state.fuzz_key}"})
    assert not failures, "\n\n".join(failures)


@pytest.mark.timeout(600)
def test_no_server_errors_without_a_key(api_schema, fuzz_app) -> None:
    failures = _fuzz_all(api_schema, {})
    assert not failures, "\n\n".join(failures)
    seen = fuzz_app.state.requests
    assert sum(seen.values()) >= 200 and seen[401] > 0 and seen[422] > 0, seen
    assert not any(code >= 500 for code in seen), seen


def test_crafted_list_cursors_are_422(fuzz_app) -> None:
    """Found while fuzzing by hand: a base64-JSON cursor whose id is not a string crashed (500)."""
    import asyncio
    import base64
    import json

    import httpx

    async def go(raw) -> int:
        cursor = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fuzz_app), base_url="http://t") as c:
            r = await c.get("/v1/repairs", params={"cursor": cursor},
                            headers={"Authorization": f"Bearer {fuzz_app.state.fuzz_key}"})
            return r.status_code

    for raw in (["2020-01-01", 5], ["2020-01-01", [1]], ["2020-01-01", None], [1, 2, 3], {"a": 1}, "x"):
        assert asyncio.run(go(raw)) == 422, raw
