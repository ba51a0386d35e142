"""Functions and queues through the API against hostile tenants: another project's functions, versions,
aliases, triggers, records, logs, queues and messages are 404 (never a 403 that would confirm they exist), a
viewer changes nothing (403), a trigger cannot point at another project's queue or bucket, and a function's
secrets appear in no answer and no event."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from typing import Any

import pytest

from hackboot.sdk import ApiError
from tests.security.conftest import Tenant

SECRET = "hunter2-0b7c5e91"


def refused(status: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args, **kwargs)
    assert err.value.status == status, (fn, args, kwargs, err.value.problem)
    return err.value


def package() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("main.py", "def handler(event, context):\n    return 1\n")
    return buf.getvalue()


@pytest.fixture
def victim(tenant_factory: Callable[..., Tenant]) -> tuple[Tenant, dict[str, Any]]:
    t = tenant_factory("member")
    c: Any = t.client
    fn = c.functions.create("victim-fn", "python3.11", "main.handler", secrets={"DB_PASSWORD": SECRET})
    c.functions.upload_code(fn["id"], package())
    c.functions.publish_version(fn["id"])
    c.functions.set_alias(fn["id"], "prod", 1)
    queue = c.queues.create("victim-q")
    # disabled: the cloud's invoker would otherwise consume the message below
    trigger = c.functions.add_trigger(fn["id"], "queue", queue="victim-q", enabled=False)
    http = c.functions.add_trigger(fn["id"], "http", auth="token")
    c.queues.send("victim-q", "private payload")
    return t, {"fn": fn, "queue": queue, "trigger": trigger, "http": http}


def test_another_tenants_functions_and_queues_are_invisible_and_untouchable(
        tenant_factory: Callable[..., Tenant], victim: tuple[Tenant, dict[str, Any]]) -> None:
    owner, r = victim
    a: Any = tenant_factory("member").client
    fn, queue, trigger = r["fn"]["id"], r["queue"]["id"], r["trigger"]["id"]
    assert a.functions.list() == [] and a.queues.list() == []
    for ref in (fn, "victim-fn"):
        refused(404, a.functions.get, ref)
        refused(404, a.functions.update, ref, memory_mb=256)
        refused(404, a.functions.upload_code, ref, package())
        refused(404, a.functions.delete, ref)
        refused(404, a.functions.publish_version, ref)
        refused(404, a.functions.versions, ref)
        refused(404, a.functions.get_version, ref, 1)
        refused(404, a.functions.aliases, ref)
        refused(404, a.functions.set_alias, ref, "prod", 1)
        refused(404, a.functions.delete_alias, ref, "prod")
        refused(404, a.functions.triggers, ref)
        refused(404, a.functions.add_trigger, ref, "http")
        refused(404, a.functions.invoke, ref, {})
        refused(404, a.functions.invoke, ref, {}, asynchronous=True)
        refused(404, a.functions.get_trigger, ref, trigger)
        refused(404, a.functions.update_trigger, ref, trigger, enabled=False)
        refused(404, a.functions.delete_trigger, ref, trigger)
        refused(404, a.functions.invocations, ref)
        refused(404, a.functions.logs, ref)
    for ref in (queue, "victim-q"):
        refused(404, a.queues.get, ref)
        refused(404, a.queues.update, ref, visibility_timeout_s=1)
        refused(404, a.queues.delete, ref)
        refused(404, a.queues.send, ref, "spam")
        refused(404, a.queues.receive, ref)
    # the attacker's own function cannot be triggered by the victim's queue, nor dead-letter into it
    mine = a.functions.create("mine", "python3.11", "main.handler")
    refused(404, a.functions.add_trigger, mine["id"], "queue", queue=queue)
    refused(404, a.functions.add_trigger, mine["id"], "queue", queue="victim-q")
    refused(404, a.queues.create, "mine-q", max_receives=1, dead_letter_queue=queue)
    refused(404, a.functions.update, mine["id"], dead_letter_queue=queue)
    refused(404, a.functions.create, "mine2", "python3.11", "main.handler", dead_letter_queue="victim-q")
    # a trigger of the victim's function by id from the attacker's function path: not found
    refused(404, a.functions.get_trigger, mine["id"], trigger)
    # the owner still has everything, and the message was not taken
    o: Any = owner.client
    assert o.functions.get(fn)["name"] == "victim-fn" and len(o.functions.triggers(fn)) == 2
    assert [m["body"] for m in o.queues.receive("victim-q")] == ["private payload"]


def test_a_receipt_handle_of_another_project_is_useless(
        tenant_factory: Callable[..., Tenant], victim: tuple[Tenant, dict[str, Any]]) -> None:
    owner, r = victim
    [msg] = owner.client.queues.receive("victim-q", visibility_timeout_s=600)
    a: Any = tenant_factory("member").client
    a.queues.create("victim-q")  # the same name in the attacker's project
    refused(404, a.queues.delete_message, "victim-q", msg["receipt_handle"])
    refused(404, a.queues.change_visibility, "victim-q", msg["receipt_handle"], 0)
    refused(404, a.queues.delete_message, r["queue"]["id"], msg["receipt_handle"])
    owner.client.queues.delete_message("victim-q", msg["receipt_handle"])


def test_a_viewer_token_creates_nothing(tenant_factory: Callable[..., Tenant]) -> None:
    v: Any = tenant_factory("viewer").client
    assert v.functions.list() == [] and v.queues.list() == []
    refused(403, v.functions.create, "x", "python3.11", "main.handler")
    refused(403, v.queues.create, "x")
    assert v.functions.list() == [] and v.queues.list() == []


def test_viewer_in_the_same_project_reads_but_cannot_write(cloud: Any) -> None:
    from tests.security.conftest import make_tenant

    owner = make_tenant(cloud, "member")
    o: Any = owner.client
    fn = o.functions.create("shared", "python3.11", "main.handler")
    o.queues.create("shared-q")
    admin = cloud.admin_client_unscoped()
    issued = admin.tokens.create(project_id=owner.project_id, role="viewer", user_id=owner.user_id, name="ro")
    v: Any = cloud.client(issued["token"])
    assert v.functions.get("shared")["id"] == fn["id"] and v.queues.get("shared-q")["name"] == "shared-q"
    refused(403, v.functions.update, "shared", memory_mb=256)
    refused(403, v.functions.delete, "shared")
    refused(403, v.functions.upload_code, "shared", package())
    refused(403, v.functions.publish_version, "shared")
    refused(403, v.functions.set_alias, "shared", "prod", 1)
    refused(403, v.functions.add_trigger, "shared", "http")
    refused(403, v.functions.invoke, "shared", {})
    refused(403, v.functions.invoke, "shared", {}, asynchronous=True)
    refused(403, v.queues.send, "shared-q", "x")
    refused(403, v.queues.receive, "shared-q")
    refused(403, v.queues.delete, "shared-q")
    assert o.functions.get("shared")["code_sha256"] == "" and o.queues.get("shared-q")["messages_visible"] == 0


def test_secrets_are_in_no_answer_and_no_event(victim: tuple[Tenant, dict[str, Any]]) -> None:
    owner, r = victim
    c: Any = owner.client
    fn = r["fn"]["id"]
    answers = [c.functions.get(fn), c.functions.list(), c.functions.versions(fn), c.functions.aliases(fn),
               c.functions.triggers(fn), c.get("/v1/events", limit=500),
               c.functions.update(fn, secrets={"DB_PASSWORD": SECRET + "-rotated"}), c.functions.publish_version(fn),
               c.get("/v1/events", resource_id=fn, limit=500)]
    text = json.dumps(answers)
    assert SECRET not in text and "DB_PASSWORD" in text
    # the http trigger's token was shown once, and is in no later answer or event
    token = r["http"]["token"]
    assert token and token not in text
