"""Functions through the REST API (the SDK) on the real control plane: configuration, code packages, versions,
aliases, triggers, records and logs; every refusal with a clear 4xx that changes nothing."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from hackboot.core import errors
from hackboot.sdk import Client
from tests.integration.network.api_helpers import expect_error, project_client, quota
from tests.support import Cloud

QUOTA_EXCEEDED = errors.QuotaExceeded.status
HELLO = b"def handler(event, context):\n    return {'hello': event.get('name', 'world')}\n"


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buf.getvalue()


def event_types(client: Client, resource_id: str) -> list[str]:
    return [e["type"] for e in client.get("/v1/events", resource_id=resource_id, limit=500)["items"]]


def with_code(c: Client, name: str = "hello", **kw: Any) -> dict[str, Any]:
    fn = c.functions.create(name, "python3.11", "main.handler", **kw)  # type: ignore[attr-defined]
    return c.functions.upload_code(fn["id"], zip_of({"main.py": HELLO}))  # type: ignore[attr-defined]


def test_create_read_update_list_delete(cloud: Cloud) -> None:
    c = project_client(cloud)
    fn = c.functions.create("hello", "python3.11", "main.handler", memory_mb=256, timeout_s=10,
                            environment={"GREETING": "hi"}, description="says hello")
    assert fn["id"].startswith("fn-") and fn["runtime"] == "python3.11" and fn["handler"] == "main.handler"
    assert fn["memory_mb"] == 256 and fn["timeout_s"] == 10 and fn["environment"] == {"GREETING": "hi"}
    assert fn["code_sha256"] == "" and fn["code_size"] == 0 and fn["last_version"] == 0
    assert fn["network_egress"] is False and fn["max_concurrency"] == 10 and fn["reserved_concurrency"] == 0
    assert c.functions.get("hello")["id"] == fn["id"] == c.functions.get(fn["id"])["id"]
    node = c.functions.create("node", "nodejs20", "index.handler")
    assert {f["id"] for f in c.functions.list()} == {fn["id"], node["id"]}
    assert [f["id"] for f in c.functions.list(runtime="nodejs20")] == [node["id"]]
    updated = c.functions.update("hello", memory_mb=512, environment={"A": "1"}, network_egress=True)
    assert updated["memory_mb"] == 512 and updated["environment"] == {"A": "1"} and updated["network_egress"]
    renamed = c.functions.update(fn["id"], name="hello2")
    assert renamed["name"] == "hello2"
    expect_error(409, c.functions.update, "hello2", name="node", code="name_in_use")
    assert quota(c, "functions")["used"] == 2
    c.functions.delete("hello2")
    expect_error(404, c.functions.get, fn["id"])
    assert quota(c, "functions")["used"] == 1
    types = event_types(c, fn["id"])
    assert {"function.created", "function.updated", "function.deleted"} <= set(types)


@pytest.mark.parametrize("fields, bad", [
    ({"runtime": "cobol85"}, "runtime"),
    ({"runtime": "python3.11", "handler": "nodot"}, "handler"),
    ({"runtime": "python3.11", "handler": "../etc.passwd"}, "handler"),
    ({"runtime": "python3.11", "handler": "main.handler", "memory_mb": 100}, "memory_mb"),
    ({"runtime": "python3.11", "handler": "main.handler", "memory_mb": 8192}, "memory_mb"),
    ({"runtime": "python3.11", "handler": "main.handler", "memory_mb": 130}, "memory_mb"),
    ({"runtime": "python3.11", "handler": "main.handler", "timeout_s": 0}, "timeout_s"),
    ({"runtime": "python3.11", "handler": "main.handler", "timeout_s": 901}, "timeout_s"),
    ({"runtime": "python3.11", "handler": "main.handler", "environment": {"1BAD": "x"}}, "environment"),
    ({"runtime": "python3.11", "handler": "main.handler", "environment": {"AWS_REGION": "x"}}, "environment"),
    ({"runtime": "python3.11", "handler": "main.handler", "environment": {"BIG": "x" * 4096}}, "environment"),
    ({"runtime": "python3.11", "handler": "main.handler", "environment": {"K": "1"}, "secrets": {"K": "2"}},
     "secrets"),
    ({"runtime": "python3.11", "handler": "main.handler", "reserved_concurrency": 11, "max_concurrency": 10},
     "reserved_concurrency"),
])
def test_bad_configuration_is_a_422_and_creates_nothing(cloud: Cloud, fields: dict[str, Any], bad: str) -> None:
    c = project_client(cloud)
    err = expect_error(422, c.post, "/v1/functions", {"name": "bad", "handler": "main.handler", **fields})
    assert bad in json.dumps(err.problem)
    assert c.functions.list() == [] and quota(c, "functions")["used"] == 0


def test_duplicate_names_and_quota(cloud: Cloud) -> None:
    c = project_client(cloud, functions=2, function_concurrency=20)
    c.functions.create("one", "python3.11", "main.handler")
    expect_error(409, c.functions.create, "one", "nodejs20", "index.handler", code="name_in_use")
    c.functions.create("two", "python3.11", "main.handler", reserved_concurrency=5)
    err = expect_error(QUOTA_EXCEEDED, c.functions.create, "three", "python3.11", "main.handler")
    assert "functions" in err.detail
    assert quota(c, "function_concurrency")["used"] == 5
    # max_concurrency above the project's function_concurrency quota, reserved above what is left
    expect_error(QUOTA_EXCEEDED, c.functions.update, "two", max_concurrency=21)
    expect_error(QUOTA_EXCEEDED, c.functions.update, "one", reserved_concurrency=16, max_concurrency=16)
    c.functions.update("one", reserved_concurrency=15, max_concurrency=15)
    assert quota(c, "function_concurrency")["used"] == 20
    c.functions.delete("two")
    assert quota(c, "function_concurrency")["used"] == 15


def test_code_upload_zip_single_file_folder_and_refusals(cloud: Cloud, tmp_path: Path) -> None:
    c = project_client(cloud)
    fn = c.functions.create("hello", "python3.11", "main.handler")
    before = c.functions.get(fn["id"])
    up = c.functions.upload_code(fn["id"], zip_of({"main.py": HELLO, "lib/util.py": b"X = 1\n"}))
    assert len(up["code_sha256"]) == 64 and up["code_size"] > 0 and up["code_sha256"] != before["code_sha256"]
    # a single file is kept under its name, wrapped in a zip: the same upload gives the same digest
    single = c.functions.upload_code(fn["id"], HELLO, filename="main.py")
    again = c.functions.upload_code(fn["id"], HELLO, filename="main.py")
    assert single["code_sha256"] == again["code_sha256"] != up["code_sha256"]
    # a folder, zipped by the SDK
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "main.py").write_bytes(HELLO)
    folder = c.functions.upload_code(fn["id"], tmp_path / "pkg")
    assert folder["code_size"] > 0
    current = folder["code_sha256"]
    # refusals: traversal, absolute path, a symlink entry, not a zip and no filename, a bad single-file name
    link = zipfile.ZipInfo("evil")
    link.create_system, link.external_attr = 3, (0o120777 << 16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(link, "/etc/passwd")
    for bad in (zip_of({"../escape.py": b"x"}), zip_of({"/abs.py": b"x"}), buf.getvalue()):
        expect_error(422, c.functions.upload_code, fn["id"], bad)
    expect_error(422, c.request, "PUT", f"/v1/functions/{fn['id']}/code", content=b"print(1)",
                 headers={"Content-Type": "text/plain"})
    expect_error(422, c.functions.upload_code, fn["id"], b"print(1)", filename="main.sh")
    expect_error(422, c.functions.upload_code, fn["id"], b"", filename="main.py")
    assert c.functions.get(fn["id"])["code_sha256"] == current
    assert "function.code_uploaded" in event_types(c, fn["id"])


def test_code_over_50_mib_is_refused(cloud: Cloud) -> None:
    c = project_client(cloud)
    fn = c.functions.create("big", "python3.11", "main.handler")
    expect_error(413, c.functions.upload_code, fn["id"], b"#" * (50 * 1024 * 1024 + 1), filename="main.py")
    assert c.functions.get(fn["id"])["code_sha256"] == ""


def test_versions_are_immutable_snapshots(cloud: Cloud) -> None:
    c = project_client(cloud)
    fn = c.functions.create("hello", "python3.11", "main.handler", environment={"V": "1"})
    expect_error(409, c.functions.publish_version, fn["id"], code="no_code")
    c.functions.upload_code(fn["id"], zip_of({"main.py": HELLO}))
    v1 = c.functions.publish_version(fn["id"], description="first")
    assert v1["number"] == 1 and v1["environment"] == {"V": "1"} and v1["description"] == "first"
    c.functions.update(fn["id"], environment={"V": "2"}, memory_mb=1024)
    c.functions.upload_code(fn["id"], HELLO + b"# v2\n", filename="main.py")
    v2 = c.functions.publish_version(fn["id"])
    assert v2["number"] == 2 and v2["memory_mb"] == 1024 and v2["code_sha256"] != v1["code_sha256"]
    assert c.functions.publish_version(fn["id"]) == v2  # nothing changed since: the same version
    assert c.functions.get_version(fn["id"], 1) == v1
    assert [v["number"] for v in c.functions.versions(fn["id"])] == [1, 2]
    assert c.functions.get(fn["id"])["last_version"] == 2
    expect_error(404, c.functions.get_version, fn["id"], 3)


def test_aliases_and_canary_weights(cloud: Cloud) -> None:
    c = project_client(cloud)
    fn = with_code(c)
    for n in range(3):
        c.functions.update(fn["id"], environment={"N": str(n)})
        c.functions.publish_version(fn["id"])
    prod = c.functions.set_alias(fn["id"], "prod", 1)
    assert prod["version"] == 1 and prod["additional_version"] is None and prod["weight"] == 0
    canary = c.functions.set_alias(fn["id"], "prod", 2, additional_version=3, weight=0.1)
    assert canary["id"] == prod["id"] and canary["additional_version"] == 3 and canary["weight"] == 0.1
    assert [a["name"] for a in c.functions.aliases(fn["id"])] == ["prod"]
    expect_error(404, c.functions.set_alias, fn["id"], "staging", 9)
    expect_error(422, c.functions.set_alias, fn["id"], "staging", 1, additional_version=1, weight=0.5)
    expect_error(422, c.functions.set_alias, fn["id"], "staging", 1, additional_version=2, weight=1.0)
    expect_error(422, c.functions.set_alias, fn["id"], "staging", 1, weight=0.5)
    expect_error(422, c.functions.set_alias, fn["id"], "7", 1)
    expect_error(409, c.post, f"/v1/functions/{fn['id']}/aliases", {"name": "prod", "version": 1})
    created = c.post(f"/v1/functions/{fn['id']}/aliases", {"name": "beta", "version": 3})
    assert created["version"] == 3
    c.functions.delete_alias(fn["id"], "beta")
    expect_error(404, c.functions.get_alias, fn["id"], "beta")


def test_triggers_of_each_kind(cloud: Cloud) -> None:
    c = project_client(cloud)
    fn = with_code(c)
    c.functions.publish_version(fn["id"])
    c.functions.set_alias(fn["id"], "prod", 1)
    http = c.functions.add_trigger(fn["id"], "http", qualifier="prod", auth="token")
    assert http["url_path"] == f"/fn/{http['id']}/" and http["auth"] == "token"
    assert http["token"] and http["token"].startswith("hbfn_")
    assert c.functions.get_trigger(fn["id"], http["id"])["token"] is None  # shown once
    sched = c.functions.add_trigger(fn["id"], "schedule", schedule="*/5 * * * *")
    assert sched["next_fire_at"] is not None and sched["next_fire_at"][14:16] in {"00", "05", "10", "15", "20",
                                                                                   "25", "30", "35", "40", "45",
                                                                                   "50", "55"}
    rate = c.functions.add_trigger(fn["id"], "schedule", schedule="rate(5 minutes)", qualifier="1")
    assert rate["schedule"] == "rate(5 minutes)"
    q = c.queues.create("jobs")
    queue = c.functions.add_trigger(fn["id"], "queue", queue="jobs", batch_size=5)
    assert queue["queue_id"] == q["id"] and queue["queue_name"] == "jobs" and queue["batch_size"] == 5
    assert len(c.functions.triggers(fn["id"])) == 4
    assert [t["id"] for t in c.functions.triggers(fn["id"], kind="queue")] == [queue["id"]]
    assert quota(c, "function_triggers")["used"] == 4
    off = c.functions.update_trigger(fn["id"], http["id"], enabled=False)
    assert off["enabled"] is False
    # refusals
    expect_error(422, c.functions.add_trigger, fn["id"], "schedule", schedule="61 * * * *")
    expect_error(422, c.functions.add_trigger, fn["id"], "schedule", schedule="rate(0 minutes)")
    expect_error(404, c.functions.add_trigger, fn["id"], "object_storage", bucket="no-such-bucket-here")
    expect_error(404, c.functions.add_trigger, fn["id"], "queue", queue="nope")
    expect_error(422, c.functions.add_trigger, fn["id"], "queue", queue="jobs", batch_size=11)
    expect_error(404, c.functions.add_trigger, fn["id"], "http", qualifier="staging")
    expect_error(404, c.functions.add_trigger, fn["id"], "http", qualifier="9")
    expect_error(409, c.functions.delete_alias, fn["id"], "prod", code="in_use")
    expect_error(409, c.queues.delete, "jobs", code="in_use")
    assert quota(c, "function_triggers")["used"] == 4
    c.functions.delete_trigger(fn["id"], queue["id"])
    c.queues.delete("jobs")
    # deleting the function takes its triggers (and their quota)
    c.functions.delete(fn["id"])
    assert quota(c, "function_triggers")["used"] == 0


def test_secrets_are_never_returned_nor_in_events(cloud: Cloud) -> None:
    c = project_client(cloud)
    secret = "s3cr3t-value-7f1d2c"
    fn = c.functions.create("sec", "python3.11", "main.handler", secrets={"DB_PASSWORD": secret})
    assert fn["secret_names"] == ["DB_PASSWORD"] and secret not in json.dumps(fn)
    c.functions.upload_code(fn["id"], zip_of({"main.py": HELLO}))
    v = c.functions.publish_version(fn["id"])
    assert v["secret_names"] == ["DB_PASSWORD"]
    rotated = c.functions.update(fn["id"], secrets={"DB_PASSWORD": secret + "2", "API_KEY": secret + "3"})
    assert rotated["secret_names"] == ["API_KEY", "DB_PASSWORD"]
    answers = [c.functions.get(fn["id"]), c.functions.list(), c.functions.versions(fn["id"]), rotated,
               c.get("/v1/events", resource_id=fn["id"], limit=500)]
    assert secret not in json.dumps(answers)


def test_invocation_records_and_logs_when_there_are_none(cloud: Cloud) -> None:
    """Records are written by the invoker (service.record_invocation, tested in-process in
    test_api_service_side.py); through the API an uninvoked function has none."""
    c = project_client(cloud)
    fn = with_code(c, "logged")
    assert c.functions.invocations(fn["id"]) == []
    page = c.functions.logs(fn["id"])
    assert page["items"] == [] and page["next_after"] is None
    # nothing to read: a follow waits and answers empty (no timing asserted)
    assert c.functions.logs(fn["id"], follow=True, wait_s=0.5)["items"] == []


def test_a_retried_create_with_the_same_idempotency_key_makes_one_function_and_one_queue(cloud: Cloud) -> None:
    c = project_client(cloud)
    first = c.functions.create("retried", "python3.11", "main.handler", idempotency_key="fn-create-1")
    again = c.functions.create("retried", "python3.11", "main.handler", idempotency_key="fn-create-1")
    assert again["id"] == first["id"] and [f["id"] for f in c.functions.list()] == [first["id"]]
    q1 = c.queues.create("retried-q", idempotency_key="q-create-1")
    q2 = c.queues.create("retried-q", idempotency_key="q-create-1")
    assert q1["id"] == q2["id"] and quota(c, "queues")["used"] == 1


def test_a_functions_dead_letter_queue(cloud: Cloud) -> None:
    c = project_client(cloud)
    dlq = c.queues.create("failed-events")
    fn = c.functions.create("async", "python3.11", "main.handler", dead_letter_queue="failed-events")
    assert fn["dead_letter_queue_id"] == dlq["id"]
    expect_error(409, c.queues.delete, "failed-events", code="in_use", text="function async")
    expect_error(404, c.functions.update, "async", dead_letter_queue="no-such-queue")
    expect_error(404, c.functions.create, "other", "python3.11", "main.handler", dead_letter_queue="nope")
    assert c.functions.update("async", dead_letter_queue="")["dead_letter_queue_id"] is None
    c.queues.delete("failed-events")


def test_invocations_and_logs_of_a_real_invocation(cloud: Cloud) -> None:
    """Through the invoker (a real sandbox): the record and its output come back through the API, and a
    follow from the last record answers with the next one."""
    c = project_client(cloud)
    fn = c.functions.create("printer", "python3.11", "main.handler")
    c.functions.upload_code(fn["id"], zip_of({"main.py": b"def handler(event, context):\n"
                                                         b"    print('printed', event['n'])\n"
                                                         b"    return event['n'] * 2\n"}))
    c.functions.invoke(fn["id"], {"n": 21})
    # records are written off the request path, in batches: wait for it (with a deadline)
    deadline = time.monotonic() + 60
    while not c.functions.invocations(fn["id"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    [record] = c.functions.invocations(fn["id"])
    assert record["outcome"] == "ok" and record["version"] == "$LATEST" and record["billed_gb_s"] > 0
    assert c.functions.invocations(fn["id"], outcome="error") == []
    page = c.functions.logs(fn["id"])
    assert [r["id"] for r in page["items"]] == [record["id"]] and "printed 21" in page["items"][0]["logs"]
    # a follow from the last record waits for the next one
    invoker = threading.Timer(0.5, lambda: c.functions.invoke(fn["id"], {"n": 1}))
    invoker.start()
    try:
        follow = c.functions.logs(fn["id"], after=page["next_after"], follow=True, wait_s=20)
    finally:
        invoker.join()
    assert len(follow["items"]) == 1 and "printed 1" in follow["items"][0]["logs"]
    assert follow["next_after"] == follow["items"][0]["id"]
