"""The queue service in-process on a fresh SQLite database (and on PostgreSQL through
tests/integration/functions/test_api_queues_postgres.py): visibility timeout, receipts, dead-letter queues,
concurrent receivers, retention. Time is moved by passing `now` where the service takes one, or by a zero
visibility timeout, never by sleeping for a duration and asserting on it."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.migrate import upgrade
from hackboot.events.models import Event
from hackboot.functions import queues
from hackboot.functions.models import QueueMessage


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", "")
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    reset_settings_cache()
    dispose_engine()
    upgrade(get_settings().effective_database_url)
    yield
    dispose_engine()
    monkeypatch.undo()
    reset_settings_cache()


def project() -> Principal:
    from hackboot.identity.models import Organisation, Project

    with session_scope() as s:
        org = Organisation(id=new_id("org"), name=new_id("o"))
        s.add(org)
        s.flush()
        prj = Project(id=new_id("prj"), org_id=org.id, name="p", description="")
        s.add(prj)
        s.flush()
        quotas.init_project_quotas(s, prj.id)
    return Principal(user_id=new_id("usr"), username="u", token_id="tok", role="admin", is_superuser=False,
                     project_id=prj.id)


def events(resource_id: str, type_: str) -> list[Event]:
    with session_scope(write=False) as s:
        return list(s.scalars(select(Event).where(Event.resource_id == resource_id, Event.type == type_)))


def expire_visibility(queue_id: str) -> None:
    """Make every in-flight message of the queue visible again (as if its visibility timeout ran out)."""
    with session_scope() as s:
        for msg in s.scalars(select(QueueMessage).where(QueueMessage.queue_id == queue_id)):
            msg.visible_at = utcnow() - dt.timedelta(seconds=1)


def test_a_received_message_is_invisible_until_its_timeout_then_comes_back(db: None) -> None:
    p = project()
    q = queues.create_queue(p, name="jobs", visibility_timeout_s=60)
    sent = queues.send(p, "jobs", '{"n": 1}', attributes={"origin": "test"})
    [first] = queues.receive(p, "jobs")
    assert first.message_id == sent.id and first.body == '{"n": 1}' and first.receive_count == 1
    assert first.attributes == {"origin": "test"}
    assert queues.receive(p, q.id) == []  # in flight
    expire_visibility(q.id)
    [again] = queues.receive(p, "jobs")
    assert again.message_id == sent.id and again.receive_count == 2
    assert again.receipt_handle != first.receipt_handle
    # the first receipt stopped working when the message was received again
    with pytest.raises(errors.NotFound):
        queues.delete_message(p, "jobs", first.receipt_handle)
    with pytest.raises(errors.NotFound):
        queues.change_visibility(p, "jobs", first.receipt_handle, 30)
    queues.delete_message(p, "jobs", again.receipt_handle)
    expire_visibility(q.id)
    assert queues.receive(p, "jobs") == []
    with pytest.raises(errors.NotFound):
        queues.delete_message(p, "jobs", again.receipt_handle)


def test_receipts_are_opaque_and_unguessable(db: None) -> None:
    p = project()
    queues.create_queue(p, name="jobs")
    msg = queues.send(p, "jobs", "x")
    [got] = queues.receive(p, "jobs")
    message_id, _, secret = got.receipt_handle.partition(".")
    assert message_id == msg.id and len(secret) >= 32
    for forged in (msg.id, f"{msg.id}.", f"{msg.id}.{'A' * len(secret)}", "garbage", f"msg-x.{secret}"):
        with pytest.raises(errors.NotFound):
            queues.delete_message(p, "jobs", forged)
    with session_scope(write=False) as s:
        row = s.get(QueueMessage, msg.id)
        assert row is not None and secret not in row.receipt_hash  # only a hash is stored


def test_visibility_override_change_and_batch(db: None) -> None:
    p = project()
    q = queues.create_queue(p, name="jobs", visibility_timeout_s=300)
    ids = [queues.send(p, "jobs", f"m{i}").id for i in range(12)]
    batch = queues.receive(p, "jobs", max_messages=10, visibility_timeout_s=0)
    assert [m.message_id for m in batch] == ids[:10]  # oldest first
    # a zero visibility timeout: visible again at once
    again = queues.receive(p, "jobs", max_messages=10)
    assert {m.message_id for m in again} >= set(ids[10:])
    # make one visible at once, then hide it again with its current receipt
    target = again[0]
    visible_at = queues.change_visibility(p, "jobs", target.receipt_handle, 600)
    assert visible_at > utcnow() + dt.timedelta(seconds=500)
    queues.change_visibility(p, "jobs", target.receipt_handle, 0)
    [back] = [m for m in queues.receive(p, q.id, max_messages=10) if m.message_id == target.message_id]
    assert back.receive_count == target.receive_count + 1
    with pytest.raises(errors.ValidationFailed):
        queues.receive(p, "jobs", max_messages=11)
    with pytest.raises(errors.ValidationFailed):
        queues.receive(p, "jobs", wait_s=21)


def test_delay_and_long_poll(db: None) -> None:
    p = project()
    queues.create_queue(p, name="jobs")
    queues.send(p, "jobs", "later", delay_s=600)
    assert queues.receive(p, "jobs") == []
    # a long poll returns as soon as a message arrives (a sender in another thread)
    sender = threading.Timer(0.3, lambda: queues.send(p, "jobs", "now"))
    sender.start()
    try:
        got = queues.receive(p, "jobs", wait_s=20)
    finally:
        sender.join()
    assert [m.body for m in got] == ["now"]


def test_dead_letter_after_max_receives(db: None) -> None:
    p = project()
    dlq = queues.create_queue(p, name="dead")
    q = queues.create_queue(p, name="jobs", max_receives=2, dead_letter_queue="dead", visibility_timeout_s=0)
    msg = queues.send(p, "jobs", "poison")
    assert [m.receive_count for m in queues.receive(p, "jobs")] == [1]
    assert [m.receive_count for m in queues.receive(p, "jobs")] == [2]
    assert queues.receive(p, "jobs") == []  # a third receive moves it instead
    [dead] = queues.receive(p, "dead")
    assert dead.body == "poison" and dead.receive_count == 1
    [moved] = events(q.id, "queue.message_dead_lettered")
    assert moved.data["message_id"] == msg.id and moved.data["dead_letter_queue_id"] == dlq.id
    # without a dead-letter queue, the message is dropped with an event
    lossy = queues.create_queue(p, name="lossy", max_receives=1, visibility_timeout_s=0)
    lost = queues.send(p, "lossy", "once")
    assert len(queues.receive(p, "lossy")) == 1
    assert queues.receive(p, "lossy") == []
    [dropped] = events(lossy.id, "queue.message_dropped")
    assert dropped.data["message_id"] == lost.id


def test_queue_rules_and_deletion(db: None) -> None:
    p = project()
    queues.create_queue(p, name="dead")
    with pytest.raises(errors.Conflict):
        queues.create_queue(p, name="dead")
    with pytest.raises(errors.ValidationFailed):
        queues.create_queue(p, name="x", dead_letter_queue="dead")  # needs max_receives
    with pytest.raises(errors.NotFound):
        queues.create_queue(p, name="x", max_receives=3, dead_letter_queue="nope")
    for bad in ({"visibility_timeout_s": -1}, {"visibility_timeout_s": 43201}, {"retention_s": 59},
                {"max_receives": 0}, {"delay_s": 901}):
        with pytest.raises(errors.ValidationFailed):
            queues.create_queue(p, name="x", **bad)  # type: ignore[arg-type]
    jobs = queues.create_queue(p, name="jobs", max_receives=3, dead_letter_queue="dead")
    with pytest.raises(errors.ValidationFailed):
        queues.update_queue(p, "jobs", {"dead_letter_queue": "jobs"})
    with pytest.raises(errors.Conflict):
        queues.delete_queue(p, "dead")  # jobs dead-letters into it
    with pytest.raises(errors.ValidationFailed):
        queues.send(p, "jobs", "x" * (queues.MAX_BODY_CHARS + 1))
    queues.send(p, "jobs", "x")
    queues.delete_queue(p, "jobs")
    with session_scope(write=False) as s:
        assert s.scalar(select(QueueMessage).where(QueueMessage.queue_id == jobs.id)) is None
    queues.delete_queue(p, "dead")
    # another project sees none of it
    other = project()
    queues.create_queue(p, name="mine")
    with pytest.raises(errors.NotFound):
        queues.send(other, "mine", "x")
    with pytest.raises(errors.NotFound):
        queues.receive(other, "mine")


def test_retention_drops_old_messages(db: None) -> None:
    p = project()
    queues.create_queue(p, name="short", retention_s=60)
    queues.create_queue(p, name="long", retention_s=3600)
    queues.send(p, "short", "a")
    queues.send(p, "long", "b")
    assert queues.purge_expired(utcnow() + dt.timedelta(seconds=120)) == 1
    assert [m.body for m in queues.receive(p, "long")] == ["b"]
    assert queues.receive(p, "short") == []


def test_concurrent_receivers_never_share_a_message(db: None) -> None:
    p = project()
    queues.create_queue(p, name="work", visibility_timeout_s=600)
    sent = {queues.send(p, "work", f"m{i}").id for i in range(60)}
    got: list[str] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def receiver() -> None:
        try:
            while True:
                batch = queues.receive(p, "work", max_messages=3)
                if not batch:
                    return
                with lock:
                    got.extend(m.message_id for m in batch)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=receiver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert not any(t.is_alive() for t in threads)
    assert len(got) == len(set(got)) == len(sent) and set(got) == sent
