"""What runs functions: synchronous calls (API, function URLs) and the event sources' loops.

Every invocation goes through :func:`run`: the control plane resolves the version (``service.resolve``), the
machine's invoker runs it (:mod:`hackboot.functions.invoker`), and the outcome is recorded with its logs and
usage (``service.record_invocation``). The loops, in the main `hackboot serve` process beside the invoker:

- schedules: claim the due periods (``service.due_schedules``, each period once) → asynchronous invocations;
- object storage: read ``object.created`` / ``object.deleted`` from the event log through a cursor (only over
  a contiguous run of sequence numbers, see ``events.stream.safe_watermark``) → asynchronous invocations of the
  matching triggers, written in the same transaction that moves the cursor (each event handled once);
- asynchronous invocations: claim, run, retry with backoff, dead-letter (:mod:`hackboot.functions.asyncq`);
- queues: receive a batch per queue trigger, run the function with it, delete the messages when it succeeds
  (a failure leaves them to reappear after their visibility timeout, and to be dead-lettered after
  ``max_receives`` by the queue itself);
- reaper: stop sandboxes idle for longer than ``functions_idle_s`` (scale to zero).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from hackboot.core import diskspace, errors
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope, utcnow
from hackboot.core.workers import Loop
from hackboot.events.models import Event
from hackboot.events.service import emit
from hackboot.events.stream import safe_watermark
from hackboot.functions import asyncq, codepkg, invoker, queues, service
from hackboot.functions.engine import InvocationResult
from hackboot.functions.invoker import Target, Throttled
from hackboot.functions.models import Function

log = logging.getLogger("hackboot.functions.triggers")

# Labelled by project and function id (their number is bounded by the quotas), never by anything a caller sends.
INVOCATIONS = Counter("hackboot_function_invocations_total", "Function invocations",
                      ["project", "function", "trigger", "outcome", "start"])
DURATION = Histogram("hackboot_function_duration_seconds", "Function handler time (cold start not included)",
                     ["project", "function"],
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900))
COLD_START = Histogram("hackboot_function_cold_start_seconds", "Sandbox + runtime + module start of cold invocations",
                       ["project", "function"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

OBJECT_EVENTS_CURSOR = "object-storage-triggers"
_OBJECT_EVENT_NAMES = {"object.created": ("created", "ObjectCreated:Put"),
                       "object.deleted": ("deleted", "ObjectRemoved:Delete")}


class Recorder:
    """Invocation records written off the request path, many per transaction (a durable commit per
    invocation would cost more than the invocation). A record waits at most ``FLUSH_S``; :meth:`flush` (at
    shutdown) writes what is pending. A crash loses at most that window of records, never an invocation."""

    FLUSH_S = 0.05
    BATCH = 500

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pending: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._pid = 0

    def submit(self, **record: Any) -> None:
        with self._lock:
            self._pending.append(record)
            if self._thread is None or self._pid != os.getpid():  # (a forked API process starts its own)
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="hb-fn-records", daemon=True)
                self._thread.start()
            self._lock.notify()

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            batch, self._pending = self._pending[:self.BATCH], self._pending[self.BATCH:]
            return batch

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._lock.wait()
            time.sleep(self.FLUSH_S)  # let a burst gather into one transaction
            self.flush()

    def flush(self) -> None:
        while batch := self._take():
            try:
                service.record_invocations(batch)
            except OperationalError as exc:  # a full disk: said without a trace (nothing is wrong with us)
                log.warning("cannot store %d invocation records: %s", len(batch), exc.orig)
            except Exception:
                log.exception("cannot store %d invocation records", len(batch))


recorder = Recorder()


def socket_path() -> Path:
    return Path(get_settings().state_dir) / "run" / "functions.sock"


def target_of(resolved: service.ResolvedVersion) -> Target:
    return Target(project_id=resolved.project_id, function_id=resolved.function_id, qualifier=resolved.version,
                  version_id=resolved.version_id, runtime=resolved.runtime, handler=resolved.handler,
                  code_dir=str(resolved.code_dir), code_sha256=resolved.code_sha256, memory_mb=resolved.memory_mb,
                  timeout_s=float(resolved.timeout_s),
                  env=dict(resolved.env), network=resolved.network, max_concurrency=resolved.max_concurrency)


def run(resolved: service.ResolvedVersion, event: bytes, *, trigger_kind: str, request_id: str | None = None,
        record_now: bool = False) -> InvocationResult:
    """Run one invocation now and record it. Raises Throttled (recorded as such) over a concurrency limit.

    `record_now`: the record is durable before this returns (asynchronous sources, which delete their
    pending invocation afterwards: a crash in between runs it again rather than losing its record)."""
    request_id = request_id or str(uuid.uuid4())
    started = utcnow()
    try:
        result = invoker.call(socket_path(), target_of(resolved), event, request_id=request_id)
    except Throttled as exc:
        INVOCATIONS.labels(resolved.project_id, resolved.function_id, trigger_kind, "throttled", "none").inc()
        recorder.submit(function_id=resolved.function_id, version=resolved.version, trigger_kind=trigger_kind,
                        outcome="throttled", duration_ms=0.0, memory_mb=resolved.memory_mb, started_at=started,
                        error=str(exc), request_id=request_id)
        raise
    except codepkg.InvalidPackage as exc:
        raise errors.Conflict(f"Function {resolved.function_name} cannot run: {exc}", code="no_code") from exc
    labels = (resolved.project_id, resolved.function_id)
    INVOCATIONS.labels(*labels, trigger_kind, result.outcome, "cold" if result.cold else "warm").inc()
    DURATION.labels(*labels).observe(result.duration_ms / 1000)
    if result.cold:
        COLD_START.labels(*labels).observe(result.init_ms / 1000)
    record: dict[str, Any] = dict(
        function_id=resolved.function_id, version=resolved.version, trigger_kind=trigger_kind,
        outcome=result.outcome, duration_ms=result.duration_ms, init_ms=result.init_ms, cold=result.cold,
        memory_mb=resolved.memory_mb, max_memory_mb=result.max_memory_mb, started_at=started, ended_at=utcnow(),
        logs=result.logs, error=result.error, request_id=request_id)
    if record_now:
        service.record_invocation(**record)
    else:
        recorder.submit(**record)
    return result


# --- asynchronous invocations -----------------------------------------------------------------------

class HeldClaims:
    """The asynchronous invocations this process has claimed and not finished (queued in the pool or
    running), with their lease ends, so `renew_leases` keeps them from being claimed again elsewhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[str, dt.datetime] = {}

    def add(self, claim: asyncq.Claimed) -> None:
        with self._lock:
            self._leases[claim.id] = claim.lease_until

    def discard(self, inv_id: str) -> None:
        with self._lock:
            self._leases.pop(inv_id, None)

    def renew_leases(self) -> int:
        with self._lock:
            leases = dict(self._leases)
        if not leases:
            return 0
        renewed = asyncq.renew(leases)
        with self._lock:
            for inv_id in leases:
                if inv_id in self._leases:  # (not finished while renewing)
                    if inv_id in renewed:
                        self._leases[inv_id] = renewed[inv_id]
                    else:
                        del self._leases[inv_id]  # lost: it finished, or its lease ran out and another took it
        return len(renewed)


held_claims = HeldClaims()


def run_async_once(limit: int = 16, pool: ThreadPoolExecutor | None = None) -> int:
    """Claim the due asynchronous invocations and run them (in `pool` when given). Returns how many."""
    claims = asyncq.claim_due(limit)
    for claim in claims:
        held_claims.add(claim)
    if pool is None:
        for claim in claims:
            _run_claim(claim)
    else:
        for claim in claims:
            pool.submit(_run_claim, claim)
    return len(claims)


def _run_claim(claim: asyncq.Claimed) -> None:
    try:
        _run_claimed(claim)
    finally:
        held_claims.discard(claim.id)


def _run_claimed(claim: asyncq.Claimed) -> None:
    try:
        resolved = service.resolve(claim.project_id, claim.function_id, claim.qualifier or None)
    except errors.ApiError as exc:  # the function, version or alias went: nothing to retry
        _give_up(claim, f"cannot resolve the function: {exc}")
        asyncq.succeeded(claim.id)
        return
    try:
        result = run(resolved, claim.event.encode(), trigger_kind=claim.source, record_now=True)
    except Throttled:
        asyncq.failed(claim, "throttled", retry=False)
        return
    except Exception as exc:
        log.exception("asynchronous invocation %s failed to run", claim.id)
        if asyncq.failed(claim, f"{type(exc).__name__}: {exc}"):
            _give_up(claim, str(exc))
        return
    if result.outcome == "ok":
        asyncq.succeeded(claim.id)
    elif asyncq.failed(claim, result.error or result.outcome):
        _give_up(claim, result.error or result.outcome)


def _give_up(claim: asyncq.Claimed, reason: str) -> None:
    """After the last attempt: the event goes to the function's dead-letter queue, else an event says so."""
    with session_scope(write=False) as s:
        dlq = s.scalar(select(Function.dead_letter_queue_id).where(Function.id == claim.function_id))
    if dlq is not None:
        queues.send_by_id(dlq, claim.event, attributes={
            "function_id": claim.function_id, "source": claim.source, "attempts": claim.attempts,
            "error": reason[:512]})
        return
    with session_scope() as s:
        emit(s, "function.async_failed", resource_type="function", resource_id=claim.function_id,
             project_id=claim.project_id, data={"source": claim.source, "attempts": claim.attempts,
                                                "error": reason[:512]})


# --- schedules --------------------------------------------------------------------------------------

def fire_schedules_once(now: dt.datetime | None = None) -> int:
    if diskspace.is_low():  # a period claimed now could not be written down: claim it once there is room
        return 0
    return len(service.due_schedules(now, on_claim=_enqueue_scheduled))


def _enqueue_scheduled(s: Session, t: service.TriggerTarget) -> None:
    event = {"source": "hackboot.schedule", "trigger_id": t.trigger_id,
             "time": (t.scheduled_at or utcnow()).isoformat()}
    asyncq.enqueue(s, project_id=t.project_id, function_id=t.function_id, qualifier=t.qualifier,
                   source="schedule", trigger_id=t.trigger_id, event=json.dumps(event))


# --- object storage events --------------------------------------------------------------------------

def object_event_record(e: Event, name: str) -> dict[str, Any]:
    data = e.data or {}
    obj: dict[str, Any] = {"key": data.get("key", ""), "versionId": data.get("version_id")}
    if "size" in data:
        obj.update(size=data["size"], eTag=data.get("etag"))
    return {"eventVersion": "2.1", "eventSource": "hackboot:s3", "eventName": name,
            "eventTime": e.created_at.isoformat(), "s3": {"bucket": {"name": data.get("bucket", "")}, "object": obj}}


def read_object_events_once(limit: int = 500, now: dt.datetime | None = None) -> int:
    """Turn new object-storage events into asynchronous invocations of the matching triggers."""
    if diskspace.is_low():  # nothing to write with: the events wait in the log until there is room
        return 0
    at = asyncq.cursor(OBJECT_EVENTS_CURSOR)
    with session_scope(write=False) as s:
        rows = s.execute(select(Event.seq, Event.created_at).where(Event.seq > at).order_by(Event.seq)
                         .limit(limit)).tuples().all()
        mark = safe_watermark(at, rows, now or utcnow())
        if mark == at:
            return 0
        events = list(s.scalars(select(Event).where(Event.seq > at, Event.seq <= mark,
                                                    Event.type.in_(list(_OBJECT_EVENT_NAMES)))
                                .order_by(Event.seq)))
    work = []
    for e in events:
        kind, name = _OBJECT_EVENT_NAMES[e.type]
        data = e.data or {}
        if e.project_id:
            for t in service.object_triggers(e.project_id, str(data.get("bucket", "")), str(data.get("key", "")),
                                             kind):
                work.append((t, json.dumps({"Records": [object_event_record(e, name)]})))
    with session_scope() as s:  # the invocations and the cursor together: each event handled once
        for t, event in work:
            asyncq.enqueue(s, project_id=t.project_id, function_id=t.function_id, qualifier=t.qualifier,
                           source="object_storage", trigger_id=t.trigger_id, event=event)
        asyncq.advance(s, OBJECT_EVENTS_CURSOR, mark)
    return len(work)


# --- queues -----------------------------------------------------------------------------------------

def poll_queues_once(pool: ThreadPoolExecutor | None = None) -> int:
    """One receive per queue trigger; each batch runs the function (in `pool` when given)."""
    count = 0
    for t in service.queue_triggers():
        if t.queue_id is None:
            continue
        try:
            batch = queues.receive_by_id(t.queue_id, max_messages=t.batch_size)
        except errors.ApiError:
            continue
        if batch:
            count += len(batch)
            if pool is None:
                _run_batch(t, batch)
            else:
                pool.submit(_run_batch, t, batch)
    return count


def _run_batch(t: service.TriggerTarget, batch: list[queues.Received]) -> None:
    assert t.queue_id is not None
    records = [{"messageId": m.message_id, "receiptHandle": m.receipt_handle, "body": m.body,
                "attributes": {"ApproximateReceiveCount": str(m.receive_count), "SentTimestamp": m.sent_at.isoformat()},
                "messageAttributes": m.attributes, "eventSource": "hackboot:queue", "eventSourceId": t.queue_id}
               for m in batch]
    try:
        resolved = service.resolve(t.project_id, t.function_id, t.qualifier or None)
        result = run(resolved, json.dumps({"Records": records}).encode(), trigger_kind="queue")
    except Exception as exc:  # the messages reappear after their visibility timeout
        log.info("queue trigger %s: batch not processed: %s", t.trigger_id, exc)
        return
    if result.outcome != "ok":
        return
    for m in batch:
        with contextlib.suppress(errors.ApiError):  # its visibility ran out meanwhile: another receiver has it
            queues.delete_message_by_id(t.queue_id, m.receipt_handle)


# --- the loops --------------------------------------------------------------------------------------

def _patient(step: Callable[[], object], name: str) -> Callable[[], object]:
    """`step`, with a full disk taken as "later" rather than as a failure (the loop runs again once there
    is room; what it would have written waits where it is: the event log, the due schedule, the queue)."""
    def run() -> object:
        try:
            return step()
        except OperationalError as exc:
            if "full" not in str(exc):
                raise
            log.warning("%s: the disk is full, waiting for room", name)
            return None

    return run


class Runner:
    """The trigger loops' shared pool (invocations run concurrently, bounded)."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hb-fn-run")
        self._lock = threading.Lock()

    def loops(self, reap: Callable[[], object]) -> list[Loop]:
        settings = get_settings()
        steps: list[tuple[str, Callable[[], object], float]] = [
            ("functions-schedules", fire_schedules_once, 1.0),
            ("functions-object-events", read_object_events_once, settings.functions_poll_interval_s),
            ("functions-async", lambda: run_async_once(pool=self.pool), settings.functions_poll_interval_s),
            ("functions-queues", lambda: poll_queues_once(pool=self.pool), settings.functions_poll_interval_s),
            ("functions-leases", held_claims.renew_leases, asyncq.LEASE_S / 3),
            ("functions-reaper", reap, 10.0)]
        return [Loop(name, _patient(step, name), interval) for name, step, interval in steps]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
