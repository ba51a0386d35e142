"""Asynchronous invocations: accepted now, run by the invoker's loop, retried with backoff, dead-lettered.

An event source that does not wait for the function (an `Invocation-Type: Event` call, a schedule, an
object-storage event) writes a row here in its own transaction — durable before it is acknowledged. The
invoker's loop claims due rows with a compare-and-swap on ``next_attempt_at`` (a short lease that the claimer
renews while it holds the claim — waiting in its pool or running —, so a killed invoker's claims come back
within ``LEASE_S``, however long functions may run), runs them, deletes them when they succeed, and otherwise
retries with exponential backoff; after ``MAX_ATTEMPTS`` the event goes to the function's dead-letter queue (a queue of
the built-in queue service) when it has one, and is dropped with a ``function.async_failed`` event otherwise.

Also here: the cursor through which object-storage events are read from the event log exactly once.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, CursorResult, Integer, String, Text, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from hackboot.core.db import Base, session_scope, utcnow
from hackboot.core.ids import new_id

MAX_ATTEMPTS = 3  # the first try and two retries, as Lambda does for asynchronous events
BASE_BACKOFF_S = 2.0
LEASE_S = 30.0  # renewed every LEASE_S / 3 while held (see `renew`)


class AsyncInvocation(Base):
    __tablename__ = "function_async_invocations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    function_id: Mapped[str] = mapped_column(String(40), index=True)
    qualifier: Mapped[str] = mapped_column(String(64), default="")
    source: Mapped[str] = mapped_column(String(16))  # api | schedule | object_storage
    trigger_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    event: Mapped[str] = mapped_column(Text)  # JSON
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    last_error: Mapped[str] = mapped_column(String(1024), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class EventCursor(Base):
    """How far a consumer of the event log has read (the sequence number of the last event it handled)."""

    __tablename__ = "function_event_cursors"
    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)


@dataclass(frozen=True)
class Claimed:
    id: str
    project_id: str
    function_id: str
    qualifier: str
    source: str
    trigger_id: str | None
    event: str
    attempts: int  # including this one
    lease_until: dt.datetime


def enqueue(s: Session, *, project_id: str, function_id: str, qualifier: str | None, source: str, event: str,
            trigger_id: str | None = None) -> str:
    """Accept an asynchronous invocation in the caller's transaction; returns its id."""
    row = AsyncInvocation(id=new_id("ainv"), project_id=project_id, function_id=function_id,
                          qualifier=qualifier or "", source=source, trigger_id=trigger_id, event=event,
                          next_attempt_at=utcnow())
    s.add(row)
    return row.id


def claim_due(limit: int = 16, now: dt.datetime | None = None) -> list[Claimed]:
    """Claim up to `limit` due invocations (each by exactly one caller) for ``LEASE_S`` seconds."""
    now = now or utcnow()
    with session_scope(write=False) as s:
        rows = s.execute(select(AsyncInvocation.id, AsyncInvocation.next_attempt_at)
                         .where(AsyncInvocation.next_attempt_at <= now)
                         .order_by(AsyncInvocation.next_attempt_at).limit(limit)).tuples().all()
    out = []
    for inv_id, due in rows:
        with session_scope() as s:
            result = cast("CursorResult[Any]", s.execute(
                update(AsyncInvocation).where(AsyncInvocation.id == inv_id, AsyncInvocation.next_attempt_at == due)
                .values(next_attempt_at=now + dt.timedelta(seconds=LEASE_S),
                        attempts=AsyncInvocation.attempts + 1)))
            if result.rowcount != 1:
                continue
            row = s.get(AsyncInvocation, inv_id)
            if row is None:
                continue
            out.append(Claimed(row.id, row.project_id, row.function_id, row.qualifier, row.source, row.trigger_id,
                               row.event, row.attempts, now + dt.timedelta(seconds=LEASE_S)))
    return out


def renew(leases: dict[str, dt.datetime], now: dt.datetime | None = None) -> dict[str, dt.datetime]:
    """Extend the leases still held (`leases`: invocation id → the lease end its holder last wrote). A
    compare-and-swap on that end: a claim that finished meanwhile (deleted, or given a retry time) is left
    as it is. Returns the new ends of the leases renewed."""
    until = (now or utcnow()) + dt.timedelta(seconds=LEASE_S)
    renewed: dict[str, dt.datetime] = {}
    with session_scope() as s:
        for inv_id, held_until in leases.items():
            result = cast("CursorResult[Any]", s.execute(
                update(AsyncInvocation).where(AsyncInvocation.id == inv_id,
                                              AsyncInvocation.next_attempt_at == held_until)
                .values(next_attempt_at=until)))
            if result.rowcount == 1:
                renewed[inv_id] = until
    return renewed


def succeeded(inv_id: str) -> None:
    with session_scope() as s:
        s.execute(delete(AsyncInvocation).where(AsyncInvocation.id == inv_id))


def failed(claim: Claimed, error: str, *, retry: bool = True, now: dt.datetime | None = None) -> bool:
    """Record a failed attempt. Returns True when the invocation is given up (the caller dead-letters it),
    False when it will be retried after a backoff. `retry` False (throttled) retries without counting."""
    now = now or utcnow()
    with session_scope() as s:
        row = s.get(AsyncInvocation, claim.id)
        if row is None:
            return False
        if not retry:
            row.attempts -= 1
            row.next_attempt_at = now + dt.timedelta(seconds=BASE_BACKOFF_S)
            return False
        row.last_error = error[:1024]
        if row.attempts >= MAX_ATTEMPTS:
            s.delete(row)
            return True
        row.next_attempt_at = now + dt.timedelta(seconds=BASE_BACKOFF_S * 2 ** (row.attempts - 1))
        return False



def cursor(name: str) -> int:
    """The last event sequence number consumer `name` handled (created at the log's end on first use, so a
    new consumer does not replay history)."""
    from hackboot.events.models import Event

    with session_scope(write=False) as s:  # the usual case: no write transaction on every poll
        seq = s.scalar(select(EventCursor.seq).where(EventCursor.name == name))
    if seq is not None:
        return int(seq)
    with session_scope() as s:
        row = s.get(EventCursor, name)
        if row is None:
            last = s.scalar(select(Event.seq).order_by(Event.seq.desc()).limit(1)) or 0
            row = EventCursor(name=name, seq=int(last))
            s.add(row)
        return int(row.seq)


def advance(s: Session, name: str, seq: int) -> None:
    """Move consumer `name` to `seq` in the caller's transaction (with what it did for those events)."""
    s.execute(update(EventCursor).where(EventCursor.name == name, EventCursor.seq < seq).values(seq=seq))
