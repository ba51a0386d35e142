"""Events: listing, filters, tenancy, the live stream (SSE) and the audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hackboot.sdk import ApiError, Client
from hackboot.sdk.events import parse_sse
from tests.support import Cloud


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _member(cloud: Cloud, role: str = "member") -> tuple[dict[str, Any], dict[str, Any], Client]:
    """A new project and a new user with `role` in it, and that user's client."""
    admin = cloud.admin_client_unscoped()
    project = admin.projects.create(_name("proj"))
    user = admin.users.create(_name("bob"), password="correct-horse-1")
    admin.projects.set_member(project["id"], user["id"], role)
    token = admin.tokens.create(project_id=project["id"], role=role, user_id=user["id"])
    return project, user, cloud.client(token["token"])


def test_creating_projects_and_users_emits_events(any_cloud: Cloud) -> None:
    admin = any_cloud.admin_client_unscoped()
    project = admin.projects.create(_name("proj"))
    user = admin.users.create(_name("carol"))
    admin.projects.set_member(project["id"], user["id"], "viewer")
    in_project = any_cloud.client(project=project["id"])
    events = in_project.events.list()
    assert [e["type"] for e in events] == ["project.created", "project.member_set"]
    created = events[0]
    assert created["resource_type"] == "project" and created["resource_id"] == project["id"]
    assert created["project_id"] == project["id"]
    assert created["actor"] == admin.auth.whoami()["user_id"]
    assert dt.datetime.fromisoformat(created["created_at"]) <= dt.datetime.now(dt.UTC)
    assert events[1]["data"] == {"user_id": user["id"], "role": "viewer"}
    assert events[0]["seq"] < events[1]["seq"]
    assert in_project.events.get(created["id"]) == created
    # user.created is a platform event (no project): superusers see it with all_projects.
    platform = admin.events.list(all_projects=True, types=["user.created"], resource_id=user["id"])
    assert len(platform) == 1 and platform[0]["project_id"] is None


def test_filters_globs_time_and_keyset_pagination(any_cloud: Cloud) -> None:
    admin = any_cloud.admin_client_unscoped()
    project = admin.projects.create(_name("proj"))
    users = [admin.users.create(_name("u")) for _ in range(3)]
    for u in users:
        admin.projects.set_member(project["id"], u["id"], "viewer")
    c = any_cloud.client(project=project["id"])
    assert len(c.events.list(types=["project.member_*"])) == 3  # '_' is literal, '*' a glob
    assert len(c.events.list(types=["project.member?set"])) == 3
    assert len(c.events.list(types=["project.created", "nothing.*"])) == 1
    assert c.events.list(types=["project_member*"]) == []  # '_' is not a wildcard
    assert len(c.events.list(resource_type="project", resource_id=project["id"])) == 4
    # Keyset pagination on seq, both directions.
    seen, cursor = [], None
    while True:
        page = c.events.page(limit=1, cursor=cursor)
        seen += [e["seq"] for e in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 4 and seen == sorted(seen)
    assert [e["seq"] for e in c.events.list(order="desc")] == sorted(seen, reverse=True)
    newest = c.events.list(order="desc")[0]
    assert [e["id"] for e in c.events.list(since=newest["created_at"])] == [newest["id"]]
    assert newest["id"] not in [e["id"] for e in c.events.list(until=newest["created_at"])]
    with pytest.raises(ApiError) as err:
        c.get("/v1/events", cursor="garbage!")
    assert err.value.status == 400
    with pytest.raises(ApiError) as err:
        c.get("/v1/events", type="bad pattern[")
    assert err.value.status == 422


def test_another_projects_events_are_invisible(any_cloud: Cloud) -> None:
    project, _user, bob = _member(any_cloud)
    mine = bob.events.list()
    assert {e["project_id"] for e in mine} == {project["id"]}
    assert "project.created" in [e["type"] for e in mine]
    default_event = any_cloud.client().events.list(order="desc")[0]
    assert default_event["id"] not in [e["id"] for e in mine]
    with pytest.raises(ApiError) as err:
        bob.events.get(default_event["id"])
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        bob.events.list(all_projects=True)
    assert err.value.status == 403
    # Nor can bob follow another project: the stream is the same scope.
    it = bob.events.stream(after=0, reconnect=False)
    first = next(it)
    it.close()
    assert first["project_id"] == project["id"]


def _open_stream(client: Client, **params: Any) -> Iterator[str]:
    """A raw SSE connection: returns its lines once the server has said it is following."""
    cm = client.http.stream("GET", "/v1/events/stream", params=params, timeout=httpx.Timeout(10, read=15))
    resp = cm.__enter__()
    assert resp.status_code == 200, resp.read()
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = resp.iter_lines()
    for line in lines:
        if line == ": connected":
            break

    def rest() -> Iterator[str]:
        try:
            yield from lines
        finally:
            cm.__exit__(None, None, None)

    return rest()


def test_stream_delivers_a_new_event_live_and_resumes_from_last_event_id(any_cloud: Cloud) -> None:
    admin = any_cloud.client()
    lines = _open_stream(admin, type="token.*")
    started = time.monotonic()
    tok = admin.tokens.create(role="viewer", name="sse1")
    messages = parse_sse(lines)
    msg = next(m for m in messages if "data" in m)
    assert time.monotonic() - started < 5
    event = json.loads(msg["data"])
    assert msg["event"] == "token.created" == event["type"]
    assert event["resource_id"] == tok["id"] and int(msg["id"]) == event["seq"]
    lines.close()  # type: ignore[attr-defined]

    # Two more events while nobody listens; resuming from the first one's id gets exactly those.
    tok2 = admin.tokens.create(role="viewer", name="sse2")
    tok3 = admin.tokens.create(role="viewer", name="sse3")
    resp_lines = admin.http.stream("GET", "/v1/events/stream", params={"type": "token.*"},
                                   headers={"Last-Event-ID": msg["id"]}, timeout=httpx.Timeout(10, read=15))
    with resp_lines as resp:
        got = []
        for m in parse_sse(resp.iter_lines()):
            if "data" in m:
                got.append(json.loads(m["data"]))
            if len(got) == 2:
                break
    assert [e["resource_id"] for e in got] == [tok2["id"], tok3["id"]]
    # The SDK iterator resumes the same way (after=seq).
    it = admin.events.stream(types=["token.*"], after=event["seq"], reconnect=False)
    assert [next(it)["resource_id"], next(it)["resource_id"]] == [tok2["id"], tok3["id"]]
    it.close()


def test_stream_rejects_a_bad_last_event_id_and_needs_auth(any_cloud: Cloud) -> None:
    resp = httpx.get(any_cloud.url + "/v1/events/stream", headers={
        "Authorization": f"Bearer {any_cloud.admin_token}", "X-Hackboot-Project": any_cloud.project_id,
        "Last-Event-ID": "nope"})
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_last_event_id"
    assert httpx.get(any_cloud.url + "/v1/events/stream").status_code == 401


def test_audit_log_records_a_members_post_with_their_username(any_cloud: Cloud) -> None:
    project, user, bob = _member(any_cloud)
    bob.tokens.create(role="viewer", name="mine")
    project_admin = any_cloud.client(project=project["id"])
    deadline = time.monotonic() + 10
    while True:  # the middleware writes the record just after answering
        records = project_admin.audit.list(user_id=user["id"])
        if records or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(records) == 1
    rec = records[0]
    assert rec["username"] == user["username"] and rec["user_id"] == user["id"]
    assert rec["method"] == "POST" and rec["path"] == "/v1/tokens" and rec["status_code"] == 201
    assert rec["project_id"] == project["id"] and rec["request_id"].startswith("req-")
    assert project_admin.audit.list(username=user["username"], method="post", path_prefix="/v1/tok") == records
    assert project_admin.audit.list(user_id=user["id"], path_prefix="/v1/projects") == []
    # Members are not project admins: the audit log is not theirs to read.
    with pytest.raises(ApiError) as err:
        bob.audit.list()
    assert err.value.status == 403
    # Another project's admin view does not include it; the cloud-wide view does.
    assert user["id"] not in {r["user_id"] for r in any_cloud.client().audit.list()}
    everywhere = any_cloud.admin_client_unscoped().audit.list(all_projects=True, user_id=user["id"])
    assert [r["id"] for r in everywhere] == [rec["id"]]


def test_garbage_input_is_a_4xx_never_a_500(any_cloud: Cloud) -> None:
    import base64

    c = any_cloud.client()
    huge = base64.urlsafe_b64encode(b"c1:99999999999999999999999").decode().rstrip("=")
    for path, params, status in [
        ("/v1/events", {"resource_id": "a\x00b"}, 400),  # NUL refused for every route by the middleware
        ("/v1/events", {"cursor": huge}, 400),
        ("/v1/events", {"since": "yesterday"}, 422),
        ("/v1/events/evt-nope", {}, 404),
        ("/v1/events/%00", {}, 400),
        ("/v1/webhooks/wh%00x", {}, 400),
        ("/v1/webhooks/wh-nope/deliveries", {}, 404),
        ("/v1/audit", {"path_prefix": "/v1/\x00"}, 400),
        ("/v1/audit", {"cursor": base64.urlsafe_b64encode(b"c1:\x00").decode()}, 400),
    ]:
        with pytest.raises(ApiError) as err:
            c.get(path, **params)
        assert err.value.status == status, (path, params, err.value)
    resp = httpx.get(any_cloud.url + "/v1/events/stream", params={"after": str(2**64)}, headers={
        "Authorization": f"Bearer {any_cloud.admin_token}", "X-Hackboot-Project": any_cloud.project_id})
    assert resp.status_code == 422
    with pytest.raises(ApiError) as err:
        c.post("/v1/webhooks", {"url": "https://example.com/", "description": "a\x00b", "enabled": False})
    assert err.value.status == 422
