"""Webhooks against a receiver on 127.0.0.1: signatures, retries with backoff, give-up, the delivery log."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from hackboot.sdk.events import verify_webhook_signature
from tests.integration.events.conftest import Receiver
from tests.support import Cloud

PAYLOAD_KEYS = {"id", "type", "resource_type", "resource_id", "project_id", "actor", "data", "created_at"}


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _project_admin(cloud: Cloud) -> tuple[str, Client]:
    """A fresh project (so webhook quotas and deliveries do not mix between tests) and its admin client."""
    project = cloud.admin_client_unscoped().projects.create(_name("wh"))
    return project["id"], cloud.client(project=project["id"])


def _wait_done(c: Client, hook_id: str, delivery_id: str, timeout: float = 30.0) -> dict[str, Any]:
    return c.webhooks.wait_delivery(hook_id, delivery_id, timeout=timeout)


def _ts(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


def test_delivery_is_signed_with_the_secret_returned_once(wh_any_cloud: Cloud, receiver: Receiver) -> None:
    project_id, c = _project_admin(wh_any_cloud)
    path = receiver.new_path(200)
    hook = c.webhooks.create(receiver.url(path), ["token.*"], description="ci")
    secret = hook["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert "secret" not in c.webhooks.get(hook["id"]) and "secret" not in c.webhooks.list()[0]
    assert c.webhooks.get(hook["id"])["event_types"] == ["token.*"]

    token = c.tokens.create(role="viewer", name="hooked")
    [req] = receiver.wait(path, lambda got: len(got) >= 1)
    h = req.headers
    expected = hmac.new(secret.encode(), h["x-hackboot-timestamp"].encode() + b"." + req.body,
                        hashlib.sha256).hexdigest()
    assert h["x-hackboot-signature"] == "sha256=" + expected
    assert verify_webhook_signature(secret, req.body, h["x-hackboot-timestamp"], h["x-hackboot-signature"])
    assert abs(int(h["x-hackboot-timestamp"]) - time.time()) < 60
    assert h["content-type"] == "application/json" and h["x-hackboot-event"] == "token.created"
    body = json.loads(req.body)
    assert set(body) == PAYLOAD_KEYS
    assert body["type"] == "token.created" and body["resource_id"] == token["id"]
    assert body["project_id"] == project_id and body["resource_type"] == "token"

    [delivery] = c.webhooks.deliveries(hook["id"])
    assert h["x-hackboot-delivery"] == delivery["id"]
    delivery = _wait_done(c, hook["id"], delivery["id"])
    assert delivery["status"] == "delivered" and delivery["attempts"] == 1
    assert delivery["last_status_code"] == 200 and delivery["event_type"] == "token.created"
    assert delivery["event_id"] == body["id"] and delivery["delivered_at"] and delivery["next_attempt_at"] is None
    assert delivery["attempt_log"][0]["response_excerpt"] == '{"ok":true}'

    # Rotation: the new secret (returned once) signs from now on; the old one no longer verifies.
    rotated = c.webhooks.rotate_secret(hook["id"])
    assert rotated["secret"] != secret
    ping = c.webhooks.ping(hook["id"])
    assert ping["status"] == "pending" and ping["event_type"] == "webhook.ping"
    got = receiver.wait(path, lambda got: len(got) >= 2)[1]
    assert got.headers["x-hackboot-event"] == "webhook.ping"
    assert got.headers["x-hackboot-delivery"] == ping["id"]
    ts, sig = got.headers["x-hackboot-timestamp"], got.headers["x-hackboot-signature"]
    assert verify_webhook_signature(rotated["secret"], got.body, ts, sig)
    assert not verify_webhook_signature(secret, got.body, ts, sig)


def test_receiver_failing_twice_gets_the_event_on_the_third_attempt_with_growing_delays(
        wh_any_cloud: Cloud, receiver: Receiver) -> None:
    _, c = _project_admin(wh_any_cloud)
    path = receiver.new_path(500, 500, 200)
    hook = c.webhooks.create(receiver.url(path))
    ping = c.webhooks.ping(hook["id"])
    delivery = _wait_done(c, hook["id"], ping["id"])
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    log = delivery["attempt_log"]
    assert [a["attempt"] for a in log] == [1, 2, 3]
    assert [a["status_code"] for a in log] == [500, 500, 200]
    assert log[0]["error"].startswith("HTTP 500") and log[0]["response_excerpt"] == "receiver says no"
    starts = [_ts(a["started_at"]) for a in log]
    first_delay, second_delay = starts[1] - starts[0], starts[2] - starts[1]
    # Base 1 s with jitter in [0.75, 1]: ~1 s then ~2 s.
    assert 0.7 <= first_delay < second_delay, (first_delay, second_delay)
    assert 1.4 <= second_delay <= 6
    reqs = receiver.at(path)
    assert len(reqs) == 3
    assert {r.headers["x-hackboot-delivery"] for r in reqs} == {ping["id"]}
    assert [r.headers["x-hackboot-attempt"] for r in reqs] == ["1", "2", "3"]
    assert len({r.body for r in reqs}) == 1  # same event, same body; only the timestamp/signature differ


def test_failing_receiver_ends_failed_after_max_attempts_and_can_be_redelivered(
        wh_any_cloud: Cloud, receiver: Receiver) -> None:
    _, c = _project_admin(wh_any_cloud)
    path = receiver.new_path(503)
    hook = c.webhooks.create(receiver.url(path))
    ping = c.webhooks.ping(hook["id"])
    delivery = _wait_done(c, hook["id"], ping["id"])
    assert delivery["status"] == "failed" and delivery["attempts"] == 3  # HACKBOOT_WEBHOOK_MAX_ATTEMPTS=3
    assert delivery["last_status_code"] == 503 and "503" in delivery["last_error"]
    assert delivery["next_attempt_at"] is None and delivery["delivered_at"] is None
    assert len(delivery["attempt_log"]) == 3
    time.sleep(1.5)
    assert len(receiver.at(path)) == 3  # and no fourth attempt
    assert c.webhooks.deliveries(hook["id"], status="failed")[0]["id"] == ping["id"]

    # The receiver is fixed: a redelivery is a new delivery of the same event.
    receiver.scripts[path] = [(200, {})]
    again = c.webhooks.redeliver(hook["id"], ping["id"])
    assert again["id"] != ping["id"] and again["redelivery_of"] == ping["id"]
    assert again["event_id"] == ping["event_id"] and again["status"] == "pending"
    assert _wait_done(c, hook["id"], again["id"])["status"] == "delivered"
    assert json.loads(receiver.at(path)[-1].body)["id"] == ping["event_id"]
    with pytest.raises(ApiError) as err:
        c.webhooks.redeliver(hook["id"], "whd-nope")
    assert err.value.status == 404


def test_redirects_are_not_followed(wh_cloud: Cloud, receiver: Receiver) -> None:
    _, c = _project_admin(wh_cloud)
    target = receiver.new_path(200)
    path = receiver.new_path((302, {"Location": receiver.url(target)}))
    hook = c.webhooks.create(receiver.url(path))
    ping = c.webhooks.ping(hook["id"])
    delivery = _wait_done(c, hook["id"], ping["id"])
    assert delivery["status"] == "failed" and delivery["last_status_code"] == 302
    assert "redirect" in delivery["last_error"] and "not followed" in delivery["last_error"]
    assert receiver.at(target) == []


def test_event_type_globs_choose_what_is_queued(wh_any_cloud: Cloud, receiver: Receiver) -> None:
    project_id, c = _project_admin(wh_any_cloud)
    path = receiver.new_path(200)
    hook = c.webhooks.create(receiver.url(path), ["project.member_*"])
    admin = wh_any_cloud.admin_client_unscoped()
    user = admin.users.create(_name("dora"))
    c.tokens.create(role="viewer")  # token.created: not subscribed
    admin.projects.set_member(project_id, user["id"], "viewer")  # project.member_set: subscribed
    deliveries = c.webhooks.deliveries(hook["id"])  # queued in the same transaction as the change
    assert [d["event_type"] for d in deliveries] == ["project.member_set"]
    _wait_done(c, hook["id"], deliveries[0]["id"])
    assert [json.loads(r.body)["type"] for r in receiver.at(path)] == ["project.member_set"]

    # Disabled: nothing is queued, and a ping says why it cannot be sent.
    assert c.webhooks.update(hook["id"], enabled=False)["enabled"] is False
    admin.projects.set_member(project_id, user["id"], "member")
    assert len(c.webhooks.deliveries(hook["id"])) == 1
    with pytest.raises(ApiError) as err:
        c.webhooks.ping(hook["id"])
    assert err.value.status == 409 and err.value.code == "webhook_disabled"
    updated = c.webhooks.update(hook["id"], enabled=True, event_types=[], description="all")
    assert updated["event_types"] == [] and updated["description"] == "all"
    changes = c.events.list(types=["webhook.*"], resource_id=hook["id"])
    assert [e["type"] for e in changes] == ["webhook.created", "webhook.updated", "webhook.updated"]


def test_webhook_crud_quota_and_tenancy(wh_any_cloud: Cloud) -> None:
    project_id, c = _project_admin(wh_any_cloud)
    admin = wh_any_cloud.admin_client_unscoped()
    admin.projects.set_quota(project_id, "webhooks", 1)
    hook = c.webhooks.create("http://127.0.0.1:9/never", enabled=False)
    with pytest.raises(ApiError) as err:
        c.webhooks.create("http://127.0.0.1:9/never2", enabled=False)
    assert err.value.status == 403 and err.value.code == "quota_exceeded"
    # Another project's webhook is a 404, never a 403.
    _, other = _project_admin(wh_any_cloud)
    for call in (lambda: other.webhooks.get(hook["id"]), lambda: other.webhooks.delete(hook["id"]),
                 lambda: other.webhooks.deliveries(hook["id"]), lambda: other.webhooks.ping(hook["id"])):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.status == 404
    assert other.webhooks.list() == []
    c.webhooks.delete(hook["id"])
    with pytest.raises(ApiError) as err:
        c.webhooks.get(hook["id"])
    assert err.value.status == 404
    # The quota unit came back.
    c.webhooks.create("http://127.0.0.1:9/again", enabled=False)
    usage = {q["resource"]: q for q in admin.projects.quotas(project_id)}["webhooks"]
    assert usage["used"] == 1


def test_members_and_viewers_cannot_manage_webhooks(wh_cloud: Cloud) -> None:
    project_id, _ = _project_admin(wh_cloud)
    admin = wh_cloud.admin_client_unscoped()
    user = admin.users.create(_name("mel"))
    admin.projects.set_member(project_id, user["id"], "member")
    member = wh_cloud.client(admin.tokens.create(project_id=project_id, user_id=user["id"])["token"])
    with pytest.raises(ApiError) as err:
        member.webhooks.create("http://127.0.0.1:9/x")
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        member.webhooks.list()
    assert err.value.status == 403
    assert member.events.list()  # but members read the project's events


@pytest.mark.parametrize("body,field", [
    ({"url": "ftp://example.com/x"}, "url"),
    ({"url": "http://127.0.0.1:8080/"}, "url"),  # private targets are refused by default
    ({"url": "http://169.254.169.254/latest"}, "url"),
    ({"url": "https://user:pw@example.com/"}, "url"),
    ({"url": "https://example.com/", "event_types": ["bad pattern"]}, "event_types"),
    ({"url": "https://example.com/", "surprise": True}, "surprise"),
    ({}, "url"),
])
def test_invalid_webhooks_are_refused_with_a_clear_422(cloud: Cloud, body: dict[str, Any], field: str) -> None:
    c = cloud.client()
    with pytest.raises(ApiError) as err:
        c.post("/v1/webhooks", body)
    assert err.value.status == 422
    assert any(field in e["loc"] for e in err.value.problem["errors"]), err.value.problem
    assert err.value.detail


def test_stream_sends_keepalive_comments(wh_cloud: Cloud) -> None:
    import httpx

    c = wh_cloud.client()
    with c.http.stream("GET", "/v1/events/stream", timeout=httpx.Timeout(10, read=10)) as resp:
        started = time.monotonic()
        for line in resp.iter_lines():
            if line == ": keepalive":
                break
        assert time.monotonic() - started < 5  # HACKBOOT_EVENTS_STREAM_HEARTBEAT_S=1
