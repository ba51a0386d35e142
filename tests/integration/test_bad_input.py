"""Bad input gets a clear 4xx problem and changes nothing."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.support import Cloud


def _headers(cloud: Cloud) -> dict[str, str]:
    return {"Authorization": f"Bearer {cloud.admin_token}", "X-Hackboot-Project": cloud.project_id}


def _count_projects(cloud: Cloud) -> int:
    return len(cloud.admin_client_unscoped().projects.list())


@pytest.mark.parametrize("body, status, code", [
    ({"name": 12}, 422, "validation_failed"),
    ({"name": "ok", "unknown_field": 1}, 422, "validation_failed"),
    ({"name": "x'; DROP TABLE projects; --"}, 422, "validation_failed"),
    ({"name": "a" * 64}, 422, "validation_failed"),
    ({}, 422, "validation_failed"),
])
def test_bad_project_bodies(cloud: Cloud, body: dict[str, object], status: int, code: str) -> None:
    before = _count_projects(cloud)
    resp = httpx.post(cloud.url + "/v1/projects", json=body, headers=_headers(cloud))
    assert resp.status_code == status, resp.text
    problem = resp.json()
    assert problem["code"] == code and problem["detail"]
    assert resp.headers["content-type"] == "application/problem+json"
    assert _count_projects(cloud) == before


def test_malformed_json_and_oversized_body(cloud: Cloud) -> None:
    resp = httpx.post(cloud.url + "/v1/projects", content=b"{not json", headers=_headers(cloud)
                      | {"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["code"] == "validation_failed"
    big = b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    resp = httpx.post(cloud.url + "/v1/projects", content=big, headers=_headers(cloud)
                      | {"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["code"] == "payload_too_large"


def test_sql_looking_filter_is_just_a_string(cloud: Cloud) -> None:
    resp = httpx.get(cloud.url + "/v1/projects", params={"name": "x' OR '1'='1"}, headers=_headers(cloud))
    assert resp.status_code == 422  # not a valid name: rejected, never interpolated
    resp = httpx.get(cloud.url + "/v1/users", params={"username": "admin--"}, headers=_headers(cloud))
    assert resp.status_code == 200 and resp.json()["items"] == []


@pytest.mark.parametrize("params", [{"limit": 100000}, {"limit": 0}, {"limit": "ten"}, {"cursor": "garbage!!"}])
def test_bad_pagination(cloud: Cloud, params: dict[str, object]) -> None:
    resp = httpx.get(cloud.url + "/v1/projects", params=params, headers=_headers(cloud))
    assert resp.status_code in (400, 422), resp.text
    assert resp.json()["code"] in ("validation_failed", "invalid_cursor")


def test_pagination_walks_every_item_once(cloud: Cloud) -> None:
    admin = cloud.admin_client_unscoped()
    for i in range(7):
        admin.projects.create(f"page-{uuid.uuid4().hex[:6]}-{i}")
    everything = [p["id"] for p in admin.paginate("/v1/projects", page_size=3)]
    assert len(everything) == len(set(everything)) == _count_projects(cloud)
    assert everything == sorted(everything)


def test_expired_token_is_refused(cloud: Cloud) -> None:
    admin = cloud.admin_client_unscoped()
    issued = admin.tokens.create(project_id=cloud.project_id, role="viewer", expires_in_hours=1)
    engine = create_engine(f"sqlite:///{cloud.state_dir / 'hackboot.db'}")
    with engine.begin() as conn:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        conn.execute(text("UPDATE api_tokens SET expires_at = :t WHERE id = :id"), {"t": past, "id": issued["id"]})
    engine.dispose()
    resp = httpx.get(cloud.url + "/v1/auth/whoami", headers={"Authorization": f"Bearer {issued['token']}"})
    assert resp.status_code == 401 and resp.json()["code"] == "token_expired"
    assert "www-authenticate" in resp.headers


def test_bad_auth_headers(cloud: Cloud) -> None:
    for value in ("Basic YWRtaW46eA==", "Bearer", "Bearer hbk_doesnotexist"):
        resp = httpx.get(cloud.url + "/v1/auth/whoami", headers={"Authorization": value})
        assert resp.status_code == 401, value
        assert resp.json()["code"] in ("bad_auth_scheme", "invalid_token", "unauthenticated")


def test_health_and_metrics(cloud: Cloud) -> None:
    assert httpx.get(cloud.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(cloud.url + "/readyz").json() == {"status": "ok"}
    httpx.get(cloud.url + "/v1/projects", headers=_headers(cloud))
    metrics = httpx.get(cloud.url + "/metrics", headers={"Authorization": f"Bearer {cloud.admin_token}"}).text
    assert 'hackboot_http_requests_total{method="GET",route="/v1/projects",status="200"}' in metrics
    assert "hackboot_http_request_duration_seconds_bucket" in metrics
