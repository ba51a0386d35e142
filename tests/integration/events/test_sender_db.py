"""The webhook sender's claims and the retention loop, in-process against a real database (SQLite, PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from hackboot.core import crypto
from hackboot.core.config import reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.migrate import upgrade
from hackboot.events import service, webhooks
from hackboot.events.models import AuditRecord, Event, Webhook, WebhookAttempt, WebhookDelivery
from tests.support import Postgres


@pytest.fixture(params=["sqlite", "postgres"])
def local_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point this process's settings and engine at a fresh, migrated database."""
    state = tmp_path_factory.mktemp("eventsdb")
    url = ""
    if request.param == "postgres":
        pg: Postgres = request.getfixturevalue("postgres")
        url = pg.create_database()
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(state))
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", url)
    monkeypatch.setenv("HACKBOOT_CONFIG", str(state / "none.toml"))
    monkeypatch.setenv("HACKBOOT_WEBHOOK_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("HACKBOOT_WEBHOOK_BACKOFF_BASE_S", "10")
    reset_settings_cache()
    dispose_engine()
    crypto.master_key.cache_clear()
    from hackboot.core.config import get_settings

    upgrade(get_settings().effective_database_url)
    yield request.param
    dispose_engine()
    monkeypatch.undo()
    reset_settings_cache()
    crypto.master_key.cache_clear()


def _hook_with_deliveries(n: int) -> tuple[str, list[str]]:
    with session_scope() as s:
        hook = Webhook(id=new_id("wh"), project_id="prj-test", url="http://127.0.0.1:9/", event_types=[],
                       secret_sealed="")
        hook.secret_sealed = crypto.seal(b"whsec_test", hook.id.encode())
        s.add(hook)
        s.flush()
        for _ in range(n):
            service.emit(s, "thing.happened", resource_type="thing", resource_id="t-1", project_id="prj-test")
        s.flush()
        ids = list(s.scalars(select(WebhookDelivery.id).where(WebhookDelivery.webhook_id == hook.id)))
    return hook.id, ids


def test_two_senders_never_claim_the_same_attempt(local_db: str) -> None:
    _, ids = _hook_with_deliveries(30)
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def sender() -> None:
        barrier.wait()
        for _ in range(5):
            got = webhooks.claim_due(10)
            with lock:
                claimed.extend(c.delivery_id for c in got)

    threads = [threading.Thread(target=sender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # each claimed exactly once
    with session_scope(write=False) as s:
        assert set(s.scalars(select(WebhookDelivery.attempts))) == {1}
    assert webhooks.claim_due(10) == []  # leased: nothing is due until an outcome is recorded


def test_claims_carry_the_signed_payload_and_outcomes_move_deliveries_on(local_db: str) -> None:
    _, [delivery_id] = _hook_with_deliveries(1)
    [claim] = webhooks.claim_due(10)
    assert claim.attempt == 1 and claim.secret == "whsec_test" and claim.event_type == "thing.happened"
    assert claim.body.startswith(b'{"id":"evt-')
    before = utcnow()
    webhooks.record(claim, webhooks.Outcome(ok=False, status_code=500, error="HTTP 500", started_at=before))
    with session_scope(write=False) as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None and d.status == "pending" and d.attempts == 1 and d.last_status_code == 500
        delay = (d.next_attempt_at - before).total_seconds()
        assert 7.4 <= delay <= 10.5  # base 10 s, jitter [0.75, 1]
    # A stale sender (whose lease ran out and whose attempt was re-claimed) cannot overwrite the outcome.
    later = utcnow() + dt.timedelta(seconds=11)
    [again] = webhooks.claim_due(10, now=later)
    assert again.attempt == 2
    webhooks.record(claim, webhooks.Outcome(ok=True, status_code=200))
    webhooks.record(again, webhooks.Outcome(ok=False, status_code=502, error="HTTP 502"))
    [third] = webhooks.claim_due(10, now=later + dt.timedelta(seconds=30))
    webhooks.record(third, webhooks.Outcome(ok=False, error="timed out after 5s"))
    with session_scope(write=False) as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None and d.status == "failed" and d.attempts == 3  # max attempts 3
        log = list(s.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
                             .order_by(WebhookAttempt.attempt)))
        assert [(a.attempt, a.status_code) for a in log] == [(1, 500), (2, 502), (3, None)]


def test_disabled_webhook_fails_its_queued_deliveries_without_sending(local_db: str) -> None:
    hook_id, [delivery_id] = _hook_with_deliveries(1)
    with session_scope() as s:
        hook = s.get(Webhook, hook_id)
        assert hook is not None
        hook.enabled = False
    sender = webhooks.Sender()
    try:
        assert sender.step() == 1
    finally:
        sender.close()
    with session_scope(write=False) as s:
        d = s.get(WebhookDelivery, delivery_id)
        assert d is not None and d.status == "failed" and "disabled" in d.last_error


def test_retention_prunes_old_events_deliveries_and_audit(local_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from hackboot.core.config import reset_settings_cache

    monkeypatch.setenv("HACKBOOT_EVENTS_RETENTION_DAYS", "30")
    reset_settings_cache()  # settings are read once per process
    hook_id, _ = _hook_with_deliveries(0)
    old = utcnow() - dt.timedelta(days=31)
    with session_scope() as s:
        for when, tag in ((old, "old"), (utcnow(), "new")):
            for i in range(3):
                ev = Event(id=new_id("evt"), type=f"{tag}.event", resource_type="x", resource_id=str(i),
                           project_id="prj-test", created_at=when)
                d = WebhookDelivery(id=new_id("whd"), webhook_id=hook_id, project_id="prj-test", event_id=ev.id,
                                    status="delivered", created_at=when)
                s.add_all([ev, d])
                s.flush()
                s.add(WebhookAttempt(id=new_id("wha"), delivery_id=d.id, attempt=1, started_at=when))
                s.add(AuditRecord(id=new_id("aud"), project_id="prj-test", user_id="usr-1", username=tag,
                                  token_id="tok-1", method="POST", path="/v1/x", status_code=201,
                                  request_id="req-1", created_at=when))
    counts = service.prune()
    assert counts == {"events": 3, "webhook_deliveries": 3, "audit_log": 3}
    with session_scope(write=False) as s:
        assert {e.type for e in s.scalars(select(Event))} == {"new.event"}
        assert {a.username for a in s.scalars(select(AuditRecord))} == {"new"}
        assert s.scalar(select(func.count()).select_from(WebhookDelivery)) == 3
        assert s.scalar(select(func.count()).select_from(WebhookAttempt)) == 3  # cascaded
    assert service.prune() == {"events": 0, "webhook_deliveries": 0, "audit_log": 0}
    monkeypatch.setenv("HACKBOOT_EVENTS_RETENTION_DAYS", "0")
    reset_settings_cache()
    try:
        assert service.prune() == {}
    finally:
        monkeypatch.delenv("HACKBOOT_EVENTS_RETENTION_DAYS")
        reset_settings_cache()


def test_stream_polling_waits_at_a_young_gap_then_skips_it(local_db: str) -> None:
    with session_scope() as s:
        for i in (1, 2, 4):  # seq 3 is "still being committed"
            s.add(Event(seq=i, id=new_id("evt"), type="t.x", resource_type="x", resource_id=str(i),
                        project_id="prj-a"))
    f = service.EventFilter(project_id="prj-a")
    events, cursor, _ = service.poll_events(f, 0)
    assert [e.seq for e in events] == [1, 2] and cursor == 2
    with session_scope() as s:
        s.add(Event(seq=3, id=new_id("evt"), type="t.x", resource_type="x", resource_id="3", project_id="prj-b"))
    events, cursor, _ = service.poll_events(f, cursor)
    assert [e.seq for e in events] == [4] and cursor == 4  # 3 is another project's: skipped, not sent


def test_a_held_webhook_backlog_is_deferred_without_spending_attempts(local_db: str) -> None:
    hook_id, ids = _hook_with_deliveries(3)
    later = utcnow() + dt.timedelta(seconds=60)
    with session_scope() as s:  # one delivery is already planned after the hold: it stays as it is
        d = s.get(WebhookDelivery, ids[0])
        assert d is not None
        d.next_attempt_at = later + dt.timedelta(seconds=60)
    assert webhooks.defer_webhook(hook_id, later) == 2
    assert webhooks.claim_due(10) == []  # nothing due before the hold ends
    with session_scope(write=False) as s:
        rows = {d.id: d for d in s.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == hook_id))}
        assert {d.attempts for d in rows.values()} == {0}
        assert rows[ids[0]].next_attempt_at == later + dt.timedelta(seconds=60)
        assert {rows[i].next_attempt_at for i in ids[1:]} == {later}
    assert len(webhooks.claim_due(10, now=later)) == 2
