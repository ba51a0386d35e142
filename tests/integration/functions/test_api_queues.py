"""Queues through the REST API (the SDK) on the real control plane, on SQLite and PostgreSQL: lifecycle,
send/receive/delete with receipts, visibility changes, dead-lettering, depth counters, refusals and quota."""

from __future__ import annotations

import threading

from tests.integration.network.api_helpers import expect_error, project_client, quota
from tests.support import Cloud


def test_queue_lifecycle_and_messages(any_cloud: Cloud) -> None:
    c = project_client(any_cloud)
    dead = c.queues.create("dead")
    q = c.queues.create("jobs", visibility_timeout_s=120, max_receives=2, dead_letter_queue="dead",
                        description="work")
    assert q["id"].startswith("q-") and q["dead_letter_queue_id"] == dead["id"] and q["max_receives"] == 2
    assert c.queues.get("jobs")["id"] == q["id"] and {x["name"] for x in c.queues.list()} == {"dead", "jobs"}
    sent = c.queues.send("jobs", '{"task": 1}', attributes={"kind": "test"})
    c.queues.send("jobs", "later", delay_s=600)
    assert c.queues.get("jobs")["messages_visible"] == 1 and c.queues.get("jobs")["messages_in_flight"] == 1
    [msg] = c.queues.receive("jobs", max_messages=10)
    assert msg["message_id"] == sent["message_id"] and msg["body"] == '{"task": 1}' and msg["receive_count"] == 1
    assert msg["attributes"] == {"kind": "test"}
    assert c.queues.receive("jobs") == []
    # visible again at once, received again: the old receipt no longer works
    c.queues.change_visibility("jobs", msg["receipt_handle"], 0)
    [again] = c.queues.receive("jobs", visibility_timeout_s=0)
    expect_error(404, c.queues.delete_message, "jobs", msg["receipt_handle"])
    # received twice already: the next receive moves it to the dead-letter queue
    assert again["receive_count"] == 2 and c.queues.receive("jobs") == []
    [dead_msg] = c.queues.receive("dead")
    assert dead_msg["body"] == '{"task": 1}'
    c.queues.delete_message("dead", dead_msg["receipt_handle"])
    expect_error(404, c.queues.delete_message, "dead", dead_msg["receipt_handle"])
    updated = c.queues.update("jobs", visibility_timeout_s=5, dead_letter_queue="")
    assert updated["visibility_timeout_s"] == 5 and updated["dead_letter_queue_id"] is None
    expect_error(404, c.queues.update, "jobs", dead_letter_queue="nope")
    assert quota(c, "queues")["used"] == 2
    c.queues.delete("jobs")
    c.queues.delete("dead")
    assert c.queues.list() == [] and quota(c, "queues")["used"] == 0


def test_refusals(any_cloud: Cloud) -> None:
    c = project_client(any_cloud, queues=1)
    c.queues.create("only")
    expect_error(409, c.queues.create, "only", code="name_in_use")
    expect_error(403, c.queues.create, "second")  # quota
    for fields in ({"visibility_timeout_s": 43201}, {"max_receives": 0}, {"retention_s": 10},
                   {"delay_s": 901}, {"dead_letter_queue": "only"}, {"name": "bad name"}):
        expect_error(422, c.post, "/v1/queues", {"name": "x", **fields})
    expect_error(422, c.queues.send, "only", "x" * 65537)
    expect_error(422, c.queues.receive, "only", max_messages=11)
    expect_error(422, c.queues.receive, "only", wait_s=21)
    expect_error(422, c.post, "/v1/queues/only/messages/receive", {"wait_s": "1"})
    expect_error(404, c.queues.delete_message, "only", "msg-x.forged")
    expect_error(404, c.queues.change_visibility, "only", "msg-x.forged", 10)
    assert c.queues.get("only")["messages_visible"] == 0


def test_long_poll_answers_when_a_message_arrives(any_cloud: Cloud) -> None:
    c = project_client(any_cloud)
    c.queues.create("poll")
    sender = threading.Timer(0.5, lambda: c.queues.send("poll", "hello"))
    sender.start()
    try:
        got = c.queues.receive("poll", wait_s=20)
    finally:
        sender.join()
    assert [m["body"] for m in got] == ["hello"]


def test_concurrent_receivers_through_the_api(any_cloud: Cloud) -> None:
    c = project_client(any_cloud)
    c.queues.create("work", visibility_timeout_s=600)
    sent = {c.queues.send("work", f"m{i}")["message_id"] for i in range(30)}
    got: list[str] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def receiver() -> None:
        client = any_cloud.client(project=c.project_id)  # type: ignore[attr-defined]
        try:
            while True:
                batch = client.queues.receive("work", max_messages=2)
                if not batch:
                    return
                with lock:
                    got.extend(m["message_id"] for m in batch)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=receiver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert len(got) == len(set(got)) == len(sent) and set(got) == sent
