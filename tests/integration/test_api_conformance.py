"""The whole REST API fuzzed from its OpenAPI spec by schemathesis (bounded), on both databases.

Every schemathesis check runs (`--checks all`). One is refined rather than taken as is:
`positive_data_acceptance` ("a request the schema calls valid is accepted") is replaced by
`positive_data_acceptance_beyond_schema` below, which lets through the refusals of rules a JSON
Schema cannot state, and still fails on any refusal the schema itself should have predicted.
This module is also the schemathesis hooks module that registers that check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from hackboot.core.auth import PROJECT_HEADER
from tests.support import REPO, Cloud, make_cloud

# What pydantic calls an error raised by our own validators (rules), not a schema keyword.
_RULE_ERROR_TYPES = {None, "value_error"}


def _refused_by_a_rule_beyond_the_schema(response: Any, case: Any) -> bool:
    """Whether a refusal of a schema-valid request is for a rule the schema cannot express.

    - 422 whose errors come from the service or our own validators (a referenced flavor that
      does not exist, keep_remote >= keep_local, one PCI address per GPU, a checksum that does
      not match the upload, a webhook URL that must be http(s) to a public address, no NUL in
      strings…). A 422 from pydantic's schema keywords (type, bounds, pattern, required…) is
      the schema and the server disagreeing: that still fails.
    - 400 `invalid_cursor` for a `cursor` the server never issued: cursors are opaque, and
      only the `next_cursor` of a previous page means anything.
    - 400 `invalid_characters`: NUL in a path or query string (no database stores it).
    """
    try:
        problem = response.json()
    except ValueError:
        return False
    if not isinstance(problem, dict):
        return False
    if response.status_code == 400:
        return ((problem.get("code") == "invalid_cursor" and "cursor" in (case.query or {}))
                or problem.get("code") == "invalid_characters")
    if response.status_code == 422:
        errors = problem.get("errors") or []
        return all(isinstance(e, dict) and e.get("type") in _RULE_ERROR_TYPES for e in errors)
    return False


@schemathesis.check
def positive_data_acceptance_beyond_schema(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' `positive_data_acceptance`, except for rules beyond the schema (see above)."""
    if _refused_by_a_rule_beyond_the_schema(response, case):
        return None
    return positive_data_acceptance(ctx, response, case)  # type: ignore[no-any-return]


@pytest.fixture(params=["sqlite", "postgres"])
def agentless_cloud(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    ) -> Iterator[Cloud]:
    """Fuzzing creates whatever the spec allows: no agent, so no guest is ever booted for it."""
    url = request.getfixturevalue("postgres").create_database() if request.param == "postgres" else ""
    cloud = make_cloud(tmp_path_factory.mktemp("fuzz"), url, HACKBOOT_RUN_LOCAL_AGENT="false")
    cloud.start()
    yield cloud
    cloud.stop()


@pytest.mark.timeout(900)
def test_schemathesis_finds_no_server_error_nor_spec_violation(agentless_cloud: Cloud, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "schemathesis"
    cloud = agentless_cloud
    # Bounded: 40 examples per operation (about 8,000 requests), boundary-value coverage plus
    # random fuzzing: about 75 s per database on 2 idle cores.
    result = subprocess.run(
        [str(st), "run", f"{cloud.url}/openapi.json",
         # The admin's login token is not scoped to a project: it names one with the declared header.
         "-H", f"Authorization: Bearer {cloud.admin_token}",
         "-H", f"{PROJECT_HEADER}: {cloud.project_id}",
         "--max-examples", "40", "--seed", "42", "--phases", "examples,coverage,fuzzing",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         # The SSE stream never ends by design; test_events covers it.
         "--exclude-path", "/v1/events/stream",
         # Revoking a token: the fuzzer finds its own in GET /v1/tokens, and every request after
         # would be a 401. tests/integration/identity covers revocation.
         "--exclude-operation-id", "revoke_token_v1_tokens__token_id__delete",
         "--request-timeout", "30", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=850, cwd=REPO,
        env=os.environ | {"SCHEMATHESIS_HOOKS": __name__})
    summary = result.stdout[-6000:]
    assert result.returncode == 0, summary
    assert "passed" in summary


def test_openapi_declares_bearer_auth_and_the_project_header(cloud: Cloud) -> None:
    # (The first request renders the document: seconds on a loaded machine, beyond httpx's 5 s default.)
    spec = httpx.get(f"{cloud.url}/openapi.json", timeout=120).json()
    bearer = spec["components"]["securitySchemes"]["bearer"]
    assert bearer["type"] == "http" and bearer["scheme"] == "bearer"
    op = spec["paths"]["/v1/instances"]["get"]
    assert op["security"] == [{"bearer": []}]
    header = next(p for p in op["parameters"] if p["name"] == PROJECT_HEADER)
    assert header["in"] == "header" and header["required"] is False and header["schema"]["type"] == "string"
    assert "superuser login tokens" in header["description"]
    assert "project_required" in op["responses"]["400"]["description"]
    login = spec["paths"]["/v1/auth/login"]["post"]
    assert "security" not in login
    assert all(p["name"] != PROJECT_HEADER for p in login.get("parameters", []))


def test_a_405_allows_every_method_of_the_path(cloud: Cloud) -> None:
    headers = {"Authorization": f"Bearer {cloud.admin_token}", PROJECT_HEADER: cloud.project_id}
    r = httpx.request("OPTIONS", f"{cloud.url}/v1/keypairs", headers=headers)
    assert r.status_code == 405
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers["allow"] == "GET, POST"
    r = httpx.put(f"{cloud.url}/v1/keypairs/kp-x", headers=headers)
    assert r.status_code == 405 and r.headers["allow"] == "GET, DELETE"


def test_request_bodies_take_json_types_as_declared(cloud: Cloud) -> None:
    """A boolean is no quota limit, a string no integer, 1 no boolean; 12.0 is the integer 12."""
    headers = {"Authorization": f"Bearer {cloud.admin_token}", PROJECT_HEADER: cloud.project_id}
    quotas = f"{cloud.url}/v1/projects/{cloud.project_id}/quotas"
    before = httpx.get(quotas, headers=headers).json()
    for bad in (False, True, "100", 100.5):
        r = httpx.put(f"{quotas}/images", headers=headers, json={"limit": bad})
        assert r.status_code == 422, (bad, r.text)
    assert httpx.get(quotas, headers=headers).json() == before
    for bad in ("yes", 1):
        r = httpx.post(f"{cloud.url}/v1/s3/credentials", headers=headers, json={"read_only": bad})
        assert r.status_code == 422, (bad, r.text)
    limit = next(q["limit"] for q in before if q["resource"] == "images")
    r = httpx.put(f"{quotas}/images", headers=headers, json={"limit": float(limit)})
    assert r.status_code == 200 and r.json()["limit"] == limit, r.text


def test_a_public_key_of_an_unknown_type_is_a_422(cloud: Cloud) -> None:
    """Found by the fuzzer: the key library's UnsupportedAlgorithm was a 500."""
    headers = {"Authorization": f"Bearer {cloud.admin_token}", PROJECT_HEADER: cloud.project_id}
    r = httpx.post(f"{cloud.url}/v1/keypairs", headers=headers, json={"name": "odd", "public_key": "abcd AAAABGFiY2Q="})
    assert r.status_code == 422 and r.json()["code"] == "validation_failed", r.text
