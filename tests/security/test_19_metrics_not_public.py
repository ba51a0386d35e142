"""Finding 19: /metrics is not open to whoever reaches the API port.

Anonymous callers and tenants are refused; a superuser's token or the configured scrape token
(`metrics_token`, what Prometheus sends) reads it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.security.conftest import Tenant
from tests.support import Cloud, make_cloud

SCRAPE_TOKEN = "scrape-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def scraped_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    c = make_cloud(Path(tmp_path_factory.mktemp("metrics")), HACKBOOT_RUN_LOCAL_AGENT="false",
                   HACKBOOT_METRICS_TOKEN=SCRAPE_TOKEN)
    c.start()
    yield c
    c.stop()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_metrics_refuse_anonymous_and_tenants(cloud: Cloud, tenant_factory: Callable[..., Tenant]) -> None:
    anonymous = httpx.get(cloud.url + "/metrics")
    assert anonymous.status_code == 401, anonymous.text[:200]
    assert anonymous.json()["code"] == "unauthenticated"
    assert "hackboot_http_requests_total" not in anonymous.text
    assert httpx.get(cloud.url + "/metrics", headers=_bearer("hbk_guessed")).status_code == 401
    tenant = tenant_factory("admin")  # even a project admin is not a cloud operator
    refused = httpx.get(cloud.url + "/metrics", headers=_bearer(tenant.token))
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    operator = httpx.get(cloud.url + "/metrics", headers=_bearer(cloud.admin_token))
    assert operator.status_code == 200 and "hackboot_http_requests_total" in operator.text


def test_scrape_token_reads_metrics(scraped_cloud: Cloud) -> None:
    url = scraped_cloud.url + "/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=_bearer(SCRAPE_TOKEN[:-1])).status_code == 401
    scraped = httpx.get(url, headers=_bearer(SCRAPE_TOKEN))
    assert scraped.status_code == 200 and "hackboot_http_request_duration_seconds" in scraped.text
