"""The audit log's plumbing: which request a transaction commits for, and where its record goes.

A mutating request that changes anything gets its audit record *in the same transaction as the
change*: a `before_commit` hook reads the request from a context variable and hands an
:class:`AuditEntry` to the registered sinks, so an acknowledged change always has its record, even
across a crash. Requests that changed nothing (refused, failed) are recorded after the answer, on
a best-effort basis.

core knows no table: a service registers a sink (:func:`register_sink`, an :class:`AuditSink`);
the events service registers the one that writes ``audit_log``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hackboot.core.asgi import MUTATING
from hackboot.core.problems import status_for

log = logging.getLogger("hackboot.api")


@dataclass(frozen=True)
class AuditEntry:
    """One audited request: who did what, and what they were answered."""

    id: str
    project_id: str | None
    user_id: str
    username: str
    token_id: str
    method: str
    path: str
    status_code: int
    request_id: str


class AuditSink(Protocol):
    """Where audit entries go. Both methods write in the caller's session (its transaction) and never commit."""

    def add(self, session: Session, entry: AuditEntry) -> None:
        """Record a new entry."""

    def set_status(self, session: Session, entry_id: str, status_code: int) -> None:
        """Correct the status of an entry added earlier (the request failed after its change committed)."""


_sinks: list[AuditSink] = []
_sinks_lock = threading.Lock()


def register_sink(sink: AuditSink) -> Callable[[], None]:
    """Send audit entries to `sink` too (once, however often it is registered); returns an unregister."""
    with _sinks_lock:
        if all(s is not sink for s in _sinks):
            _sinks.append(sink)

    def unregister() -> None:
        with _sinks_lock:
            _sinks[:] = [s for s in _sinks if s is not sink]

    return unregister


def _current_sinks() -> list[AuditSink]:
    with _sinks_lock:
        return list(_sinks)


@dataclass
class AuditContext:
    """The request a transaction commits for; `scope["state"]["principal"]` appears once it authenticated."""

    scope: Scope
    request_id: str
    active: bool = True  # only while the route runs (not the idempotency bookkeeping around it)
    record_id: str | None = None  # the entry committed with the request's first change
    recorded_status: int = 0
    _pending: tuple[str, int] | None = None

    def entry(self, principal: Any, status: int) -> AuditEntry:
        from hackboot.core.ids import new_id

        return AuditEntry(id=new_id("aud"), project_id=principal.project_id, user_id=principal.user_id,
                          username=principal.username, token_id=principal.token_id, method=self.scope["method"],
                          path=self.scope["path"][:512], status_code=status, request_id=self.request_id)


_audit_context: ContextVar[AuditContext | None] = ContextVar("hackboot_audit_context", default=None)


@event.listens_for(Session, "do_orm_execute")
def _note_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info["hackboot_wrote"] = True


@event.listens_for(Session, "after_flush")
def _note_flush(session: Session, _flush_context: Any) -> None:
    session.info["hackboot_wrote"] = True


@event.listens_for(Session, "before_commit")
def _audit_in_transaction(session: Session) -> None:
    ctx = _audit_context.get()
    if ctx is None or not ctx.active or ctx.record_id is not None:
        return
    principal = ctx.scope.get("state", {}).get("principal")
    if principal is None:
        return
    if not (session.info.get("hackboot_wrote") or session.new or session.dirty or session.deleted):
        return  # a read, or a refusal that changed nothing
    sinks = _current_sinks()
    if not sinks:
        return
    # The answer is not known yet: record what the route answers on success; corrected afterwards
    # in the rare case the request fails after this commit.
    status = getattr(ctx.scope.get("route"), "status_code", None) or 200
    entry = ctx.entry(principal, status)
    for sink in sinks:
        sink.add(session, entry)
    ctx._pending = (entry.id, status)


@event.listens_for(Session, "after_commit")
def _audit_committed(session: Session) -> None:
    session.info.pop("hackboot_wrote", None)
    ctx = _audit_context.get()
    if ctx is not None and ctx._pending is not None:
        ctx.record_id, ctx.recorded_status = ctx._pending
        ctx._pending = None


@event.listens_for(Session, "after_soft_rollback")
def _audit_rolled_back(session: Session, _previous: Any) -> None:
    session.info.pop("hackboot_wrote", None)
    ctx = _audit_context.get()
    if ctx is not None:
        ctx._pending = None


def _record_after(principal: Any, audit: AuditContext, status: int) -> None:
    from hackboot.core.db import session_scope

    sinks = _current_sinks()
    if not sinks:
        return
    with session_scope() as s:
        if audit.record_id is not None:
            for sink in sinks:
                sink.set_status(s, audit.record_id, status)
            return
        entry = audit.entry(principal, status)
        for sink in sinks:
            sink.add(s, entry)


class AuditTrail:
    """ASGI layer around the routes: marks the request the route's transactions commit for.

    Sits inside the idempotency layer so only the route's own transactions are audited (not the
    key's bookkeeping), and records refusals and failures after the route, with their status.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        audit = AuditContext(scope=scope, request_id=scope.get("state", {}).get("request_id", ""))
        status, started = 500, False

        async def send_status(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        token = _audit_context.set(audit)
        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            if not started:  # the answer the layers outside give for it
                status = status_for(exc)
            raise
        finally:
            audit.active = False
            _audit_context.reset(token)
            await _audit_after(audit, status)


async def _audit_after(audit: AuditContext, status: int) -> None:
    """Record refusals and failures too, or correct a status; never fails the answered request."""
    principal = audit.scope.get("state", {}).get("principal")
    if principal is None or (audit.record_id is not None and audit.recorded_status == status):
        return
    try:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_record_after, principal, audit, status)
    except Exception:
        log.warning("audit record of %s %s (%s) not written", audit.scope["method"], audit.scope["path"],
                    audit.request_id, exc_info=True)
