"""The invoker's side of the control plane, in-process on SQLite and PostgreSQL: resolving a function at a
qualifier (versions, weighted aliases, unsealed secrets), http triggers and their auth, schedules claimed once
per period by concurrent callers (and after a restart), object-storage and queue triggers, invocation records
with their usage events, and the runtime list hook."""

from __future__ import annotations

import datetime as dt
import io
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.migrate import upgrade
from hackboot.events.models import Event
from hackboot.functions import asyncq, queues, service
from hackboot.functions.models import FunctionTrigger
from hackboot.objectstore.models import Bucket


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    url = request.getfixturevalue("postgres").create_database() if request.param == "postgres" else ""
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", url)
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


def code(text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("main.py", f"def handler(event, context):\n    return {text!r}\n")
    return buf.getvalue()


def function(p: Principal, name: str = "fn", **kw: object) -> str:
    fn = service.create_function(p, name=name, runtime="python3.11", handler="main.handler", **kw)  # type: ignore[arg-type]
    service.upload_code(p, fn.id, code("v0"))
    return fn.id


def events(resource_id: str, type_: str) -> list[Event]:
    with session_scope(write=False) as s:
        return list(s.scalars(select(Event).where(Event.resource_id == resource_id, Event.type == type_)
                              .order_by(Event.id)))


def test_resolve_latest_versions_and_aliases_with_unsealed_secrets(db: None) -> None:
    p = project()
    fn_id = function(p, environment={"MODE": "test"}, secrets={"TOKEN": "t0p-s3cret"}, memory_mb=256)
    latest = service.resolve(p.project, "fn")
    assert latest.function_id == fn_id and latest.version == "$LATEST" and latest.memory_mb == 256
    assert latest.env == {"MODE": "test", "TOKEN": "t0p-s3cret"}
    assert latest.code_zip.is_file() and (latest.code_dir / "main.py").is_file()
    assert latest.code_zip.name == f"{latest.code_sha256}.zip"
    service.publish_version(p, fn_id)
    service.update_function(p, fn_id, {"memory_mb": 512})
    service.upload_code(p, fn_id, code("v2"))
    service.publish_version(p, fn_id)
    v1, v2 = service.resolve(p.project, fn_id, "1"), service.resolve(None, fn_id, "2")
    assert (v1.memory_mb, v2.memory_mb) == (256, 512) and v1.code_sha256 != v2.code_sha256
    assert v1.version_id != v2.version_id and v1.env["TOKEN"] == "t0p-s3cret"
    # $LATEST's identity changes with every change, so a warm sandbox never serves an older one
    before = service.resolve(p.project, fn_id).version_id
    service.update_function(p, fn_id, {"timeout_s": 30})
    assert service.resolve(p.project, fn_id).version_id != before
    # a weighted alias: the additional version with its weight
    service.set_alias(p, fn_id, "prod", version=1, additional_version=2, weight=0.25)
    assert service.resolve(p.project, fn_id, "prod", rng=lambda: 0.2).version == "2"
    assert service.resolve(p.project, fn_id, "prod", rng=lambda: 0.3).version == "1"
    picks = [service.resolve(p.project, fn_id, "prod").version for _ in range(200)]
    assert 0 < picks.count("2") < 200  # both versions serve
    # missing or another project's: 404
    other = project()
    for args in ((other.project, fn_id, None), (other.project, "fn", None), (p.project, fn_id, "9"),
                 (p.project, fn_id, "staging"), (p.project, "nope", None)):
        with pytest.raises(errors.NotFound):
            service.resolve(*args)
    no_code = service.create_function(p, name="empty", runtime="python3.11", handler="main.handler")
    with pytest.raises(errors.Conflict):
        service.resolve(p.project, no_code.id)


def test_http_trigger_resolution_and_token_auth(db: None) -> None:
    p = project()
    fn_id = function(p)
    open_trigger, no_token = service.create_trigger(p, fn_id, service.TriggerRequest(kind="http"))
    locked, token = service.create_trigger(p, fn_id, service.TriggerRequest(kind="http", auth="token"))
    assert no_token is None and token
    resolved, auth = service.resolve_http_trigger(open_trigger.id)
    assert resolved.function_id == fn_id and auth.allows(None)
    _, auth = service.resolve_http_trigger(locked.id)
    assert auth.allows(token) and not auth.allows(None) and not auth.allows(token + "x")
    with session_scope(write=False) as s:
        stored = s.get(FunctionTrigger, locked.id)
        assert stored is not None and token not in stored.token_hash
    service.update_trigger(p, fn_id, open_trigger.id, enabled=False)
    with pytest.raises(errors.NotFound):
        service.resolve_http_trigger(open_trigger.id)
    with pytest.raises(errors.NotFound):
        service.resolve_http_trigger("fnt-nope")


def test_due_schedules_claim_each_period_once_across_concurrent_callers(db: None) -> None:
    p = project()
    fn_id = function(p)
    triggers = [service.create_trigger(p, fn_id, service.TriggerRequest(kind="schedule", schedule="* * * * *"))[0]
                for _ in range(5)]
    first_fire = min(t.next_fire_at for t in triggers if t.next_fire_at)
    assert service.due_schedules(first_fire - dt.timedelta(seconds=1)) == []
    now = first_fire + dt.timedelta(seconds=5)
    claims: list[service.TriggerTarget] = []
    lock = threading.Lock()
    failures: list[BaseException] = []
    barrier = threading.Barrier(6)

    def caller() -> None:
        try:
            barrier.wait(timeout=60)
            got = service.due_schedules(now)
            with lock:
                claims.extend(got)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert sorted(c.trigger_id for c in claims) == sorted(t.id for t in triggers)  # each once
    assert all(c.scheduled_at == first_fire and c.function_id == fn_id for c in claims)
    # a "restart": the same moment claims nothing again; the next period is a minute later
    assert service.due_schedules(now) == []
    again = service.due_schedules(first_fire + dt.timedelta(minutes=1, seconds=1))
    assert len(again) == 5 and {c.scheduled_at for c in again} == {first_fire + dt.timedelta(minutes=1)}
    # after a long outage, the missed periods fire once and the schedule continues from now
    late = first_fire + dt.timedelta(hours=3, seconds=30)
    assert len(service.due_schedules(late)) == 5
    assert service.due_schedules(late) == []
    with session_scope(write=False) as s:
        nxt = {t.next_fire_at for t in s.scalars(select(FunctionTrigger).where(FunctionTrigger.function_id == fn_id))}
    assert nxt == {first_fire + dt.timedelta(hours=3, minutes=1)}
    # disabled triggers are not due
    for t in triggers:
        service.update_trigger(p, fn_id, t.id, enabled=False)
    assert service.due_schedules(late + dt.timedelta(days=1)) == []


def test_a_claimed_period_and_its_invocation_commit_together(db: None) -> None:
    """The schedule's claim and the asynchronous invocation it accepts are one transaction: when writing the
    invocation fails (a crash there), the period is not claimed and fires on the next pass."""
    p = project()
    fn_id = function(p)
    trig = service.create_trigger(p, fn_id, service.TriggerRequest(kind="schedule", schedule="* * * * *"))[0]
    assert trig.next_fire_at is not None
    now = trig.next_fire_at + dt.timedelta(seconds=5)

    def crash(s: Session, target: service.TriggerTarget) -> None:
        raise RuntimeError("killed between the claim and the invocation")

    with pytest.raises(RuntimeError):
        service.due_schedules(now, on_claim=crash)
    with session_scope(write=False) as s:
        assert s.get(FunctionTrigger, trig.id).next_fire_at == trig.next_fire_at  # type: ignore[union-attr]
    [claim] = service.due_schedules(now, on_claim=lambda s, t: asyncq.enqueue(
        s, project_id=t.project_id, function_id=t.function_id, qualifier=t.qualifier, source="schedule",
        trigger_id=t.trigger_id, event="{}"))
    [queued] = asyncq.claim_due(now=utcnow() + dt.timedelta(seconds=1))
    assert (queued.trigger_id, queued.source) == (claim.trigger_id, "schedule")


def test_an_async_claim_is_held_while_renewed_and_returns_soon_after_its_holder_dies(db: None) -> None:
    p = project()
    fn_id = function(p)
    with session_scope() as s:
        inv_id = asyncq.enqueue(s, project_id=p.project, function_id=fn_id, qualifier=None, source="api", event="{}")
    t0 = utcnow() + dt.timedelta(seconds=1)
    [claim] = asyncq.claim_due(now=t0)
    lease = dt.timedelta(seconds=asyncq.LEASE_S)
    assert claim.id == inv_id and claim.lease_until == t0 + lease
    assert asyncq.claim_due(now=t0 + lease / 2) == []  # held
    # the holder renews: still held past the first lease's end
    renewed = asyncq.renew({inv_id: claim.lease_until}, now=t0 + lease / 2)
    assert renewed == {inv_id: t0 + lease / 2 + lease}
    assert asyncq.claim_due(now=t0 + lease + dt.timedelta(seconds=1)) == []
    # a stale lease end (another holder took it meanwhile, or it finished) is not renewed
    assert asyncq.renew({inv_id: claim.lease_until}, now=t0 + lease) == {}
    # the holder dies (no more renewals): the claim comes back once the lease ends, not a function timeout later
    [again] = asyncq.claim_due(now=renewed[inv_id] + dt.timedelta(seconds=1))
    assert again.id == inv_id and again.attempts == 2
    # a finished invocation is not brought back by a late renewal
    asyncq.succeeded(inv_id)
    assert asyncq.renew({inv_id: again.lease_until}) == {}


def test_object_and_queue_triggers(db: None) -> None:
    p = project()
    fn_id = function(p)
    with session_scope() as s:
        s.add(Bucket(id=new_id("bkt"), name=f"photos-{new_id('x')[-6:]}", project_id=p.project))
    with session_scope(write=False) as s:
        bucket = s.scalar(select(Bucket).where(Bucket.project_id == p.project))
        assert bucket is not None
        bucket_name = bucket.name
    thumbs, _ = service.create_trigger(p, fn_id, service.TriggerRequest(
        kind="object_storage", bucket=bucket_name, events=["created"], prefix="uploads/", suffix=".jpg"))
    deletions, _ = service.create_trigger(p, fn_id, service.TriggerRequest(
        kind="object_storage", bucket=bucket_name, events=["deleted"], qualifier="$LATEST"))

    def ids(key: str, event: str, project_id: str = p.project) -> set[str]:
        return {t.trigger_id for t in service.object_triggers(project_id, bucket_name, key, event)}

    assert ids("uploads/cat.jpg", "created") == {thumbs.id}
    assert ids("uploads/cat.png", "created") == set() == ids("other/cat.jpg", "created")
    assert ids("uploads/cat.jpg", "deleted") == {deletions.id}
    assert ids("uploads/cat.jpg", "created", project().project) == set()
    other = project()
    with pytest.raises(errors.NotFound):  # another project's bucket cannot be watched
        service.create_trigger(other, function(other, "theirs"), service.TriggerRequest(
            kind="object_storage", bucket=bucket_name))
    q = queues.create_queue(p, name="jobs")
    qt, _ = service.create_trigger(p, fn_id, service.TriggerRequest(kind="queue", queue="jobs", batch_size=4))
    [target] = service.queue_triggers()
    assert (target.trigger_id, target.queue_id, target.batch_size) == (qt.id, q.id, 4)
    service.update_trigger(p, fn_id, qt.id, enabled=False)
    assert service.queue_triggers() == []


def test_record_invocation_with_usage_event_and_bounded_logs(db: None) -> None:
    p = project()
    fn_id = function(p, memory_mb=512)
    inv = service.record_invocation(function_id=fn_id, version="$LATEST", trigger_kind="http", outcome="ok",
                                    duration_ms=100.2, memory_mb=512, init_ms=30.0, cold=True,
                                    logs="line\n" * 100_000, request_id="req-1")
    assert inv is not None and inv.billed_gb_s == pytest.approx(0.101 * 0.5)
    assert len(inv.logs) < 70_000 and inv.logs.endswith("[logs cut]")
    [usage] = events(fn_id, "function.invoked")
    assert usage.data["billed_gb_s"] == inv.billed_gb_s and usage.data["invocations"] == 1
    assert usage.project_id == p.project
    service.record_invocation(function_id=fn_id, version="1", trigger_kind="schedule", outcome="error",
                              duration_ms=5, memory_mb=512, error="ValueError: bad")
    rows = service.logs_after(p, fn_id, since=None, after=None, limit=10)
    assert [r.outcome for r in rows] == ["ok", "error"] and rows[1].error == "ValueError: bad"
    assert [r.id for r in service.logs_after(p, fn_id, since=None, after=rows[0].id, limit=10)] == [rows[1].id]
    assert service.purge_invocations(utcnow() + dt.timedelta(days=service.INVOCATION_RETENTION_DAYS + 1)) == 2
    service.delete_function(p, fn_id)
    assert service.record_invocation(function_id=fn_id, version="1", trigger_kind="http", outcome="ok",
                                     duration_ms=1, memory_mb=128) is None


def test_runtime_list_hook(db: None) -> None:
    p = project()
    try:
        service.register_runtime_source(lambda: ["python3.11", "nodejs20"])
        with pytest.raises(errors.ValidationFailed):
            service.create_function(p, name="old", runtime="python3.9", handler="main.handler")
        assert service.create_function(p, name="ok", runtime="nodejs20", handler="index.handler").runtime == \
            "nodejs20"
    finally:
        service._runtime_source = None
    assert service.create_function(p, name="any", runtime="python3.9", handler="main.handler").runtime == "python3.9"


def test_deleting_a_function_removes_its_code(db: None) -> None:
    p = project()
    fn_id = function(p)
    resolved = service.resolve(p.project, fn_id)
    assert resolved.code_dir.is_dir()
    service.delete_function(p, fn_id)
    assert not resolved.code_zip.exists() and not resolved.code_dir.exists()
