"""The whole REST API fuzzed from its OpenAPI spec by schemathesis (bounded), on both databases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Cloud

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
])


@pytest.mark.timeout(900)
def test_schemathesis_finds_no_server_error_nor_spec_violation(any_cloud: Cloud, tmp_path: Path) -> None:
    st = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [str(st), "run", f"{any_cloud.url}/openapi.json",
         "-H", f"Authorization: Bearer {any_cloud.admin_token}",
         "-H", f"X-Hackboot-Project: {any_cloud.project_id}",
         "--max-examples", "15", "--seed", "42", "--checks", CHECKS,
         "--request-timeout", "30", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=850)
    summary = result.stdout[-4000:]
    assert result.returncode == 0, summary
    assert "passed" in summary
