"""ASGI middleware: request ids, early authentication, body limits, metrics, idempotency keys and the audit log.

Written as plain ASGI (not BaseHTTPMiddleware) so streaming uploads stay streams and
each request pays only a few microseconds here.

The audit log: a mutating request that changes anything gets its audit record *in the same
transaction as the change* (a `before_commit` hook reads the request from a context
variable), so an acknowledged change always has its record, even across a crash. Requests
that changed nothing (refused, failed) are recorded after the answer, on a best-effort basis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
from prometheus_client import Counter, Histogram
from sqlalchemy import event, update
from sqlalchemy.orm import ORMExecuteState, Session
from starlette.exceptions import HTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hackboot.core import diskspace, idempotency
from hackboot.core.errors import (
    ApiError,
    BadRequest,
    Conflict,
    InsufficientStorage,
    PayloadTooLarge,
    Unauthenticated,
    ValidationFailed,
)

log = logging.getLogger("hackboot.api")

REQUESTS = Counter("hackboot_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("hackboot_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
STREAMING_TYPES = ("application/octet-stream",)
MAX_IDEMPOTENCY_KEY = 255


@dataclass
class RoutePolicy:
    """What the middleware must know of routes before routing: which take no token, which stream bodies.

    Built from the routers (see `app.build_app`): a route is public when no dependency
    authenticates it, and streams when its OpenAPI request body is `application/octet-stream`.
    Every other `/v1` route needs a bearer token, checked before any byte of the body is read.
    """

    public: list[tuple[re.Pattern[str], frozenset[str]]] = field(default_factory=list)
    streaming: list[tuple[re.Pattern[str], frozenset[str]]] = field(default_factory=list)

    def add(self, kind: str, path: str, methods: Iterable[str]) -> None:
        regex, _, _ = compile_path(path)
        getattr(self, kind).append((regex, frozenset(methods)))

    @staticmethod
    def _matches(rules: list[tuple[re.Pattern[str], frozenset[str]]], method: str, path: str) -> bool:
        return any(method in methods and regex.match(path) for regex, methods in rules)

    def is_public(self, method: str, path: str) -> bool:
        return self._matches(self.public, method, path)

    def needs_token(self, method: str, path: str) -> bool:
        return (path.startswith("/v1/") or path == "/v1") and not self.is_public(method, path)

    def streams(self, method: str, path: str) -> bool:
        return self._matches(self.streaming, method, path)


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return (length not in ("", "0")) or bool(_header(scope, b"transfer-encoding"))


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return ""


async def _send_problem(send: Send, err: ApiError, request_id: str, *, close: bool = False) -> None:
    body = json.dumps(err.to_problem() | {"request_id": request_id}).encode()
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if close:  # the body was not read: end the connection rather than receive it for nothing
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a body streams in: FastAPI passes HTTPExceptions through as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body over {limit} bytes", headers={"Connection": "close"})


@dataclass
class AuditContext:
    """The request a transaction commits for; `scope["state"]["principal"]` appears once it authenticated."""

    scope: Scope
    request_id: str
    active: bool = True  # only while the route runs (not the idempotency bookkeeping around it)
    record_id: str | None = None  # the record committed with the request's first change
    recorded_status: int = 0
    _pending: tuple[str, int] | None = None


_audit_context: ContextVar[AuditContext | None] = ContextVar("hackboot_audit_context", default=None)
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FULL_DETAIL = "The cloud's storage is full: delete resources to free space, or retry later"


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
    from hackboot.core.ids import new_id
    from hackboot.events.models import AuditRecord

    # The answer is not known yet: record what the route answers on success; corrected afterwards
    # in the rare case the request fails after this commit.
    status = getattr(ctx.scope.get("route"), "status_code", None) or 200
    record = AuditRecord(id=new_id("aud"), project_id=principal.project_id, user_id=principal.user_id,
                         username=principal.username, token_id=principal.token_id, method=ctx.scope["method"],
                         path=ctx.scope["path"][:512], status_code=status, request_id=ctx.request_id)
    session.add(record)
    ctx._pending = (record.id, status)


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


class ApiMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, routes: RoutePolicy | None = None) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.routes = routes or RoutePolicy()
        self._reserve_checked_at = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req-" + uuid.uuid4().hex[:20]
        scope.setdefault("state", {})["request_id"] = request_id
        method = scope["method"]
        path = scope["path"]
        started = time.perf_counter()
        status_holder = {"status": 500, "started": 0}
        body_unread = True
        audit = AuditContext(scope=scope, request_id=request_id) if method in MUTATING else None

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = 1
                message.setdefault("headers", [])
                message["headers"] = [*list(message["headers"]), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if "\x00" in path or b"%00" in scope.get("query_string", b""):
                raise BadRequest("NUL characters are not allowed in paths or query strings", code="invalid_characters")
            if self.routes.needs_token(method, path):
                await self._authenticate(scope)
            if method in MUTATING and path.startswith("/v1/"):
                await self._check_disk(method, path)
            streaming = self.routes.streams(method, path)
            length = _header(scope, b"content-length")
            if not streaming and length.isdigit() and int(length) > self.max_body:
                raise PayloadTooLarge(f"Request body over {self.max_body} bytes")
            if not streaming:
                receive = self._limited(receive)
            body_unread = False
            key = _header(scope, b"idempotency-key")
            if key and method == "POST" and not streaming:  # never buffer an upload to hash it
                await self._idempotent(scope, receive, send_wrapper, key, audit)
            else:
                await self._route(scope, receive, send_wrapper, audit)
        except ApiError as err:
            status_holder["status"] = err.status
            await _send_problem(send, err, request_id, close=body_unread and _has_body(scope))
        except BodyTooLarge as err:  # raised while this middleware read the body itself
            status_holder["status"] = 413
            await _send_problem(send, PayloadTooLarge(str(err.detail)), request_id, close=True)
        except Exception as exc:
            # The disk filled between the check above and the write: a clear 507, and the
            # connection stays usable (an exception reaching the server would close it).
            if not diskspace.is_full_error(exc) or status_holder["started"]:
                raise
            log.warning("storage full on %s %s: %s", method, path, exc)
            status_holder["status"] = 507
            await _send_problem(send, InsufficientStorage(_FULL_DETAIL), request_id, close=body_unread)
        finally:
            route = scope.get("route")
            route_name = getattr(route, "path", "unmatched")
            LATENCY.labels(method, route_name).observe(time.perf_counter() - started)
            REQUESTS.labels(method, route_name, str(status_holder["status"])).inc()
            if audit is not None:
                await self._audit_after(audit, status_holder["status"])

    async def _route(self, scope: Scope, receive: Receive, send: Send, audit: AuditContext | None) -> None:
        if audit is None:
            await self.app(scope, receive, send)
            return
        token = _audit_context.set(audit)
        try:
            await self.app(scope, receive, send)
        finally:
            audit.active = False
            _audit_context.reset(token)

    @staticmethod
    async def _audit_after(audit: AuditContext, status: int) -> None:
        """Record refusals and failures too, or correct a status; never fails the answered request."""
        principal = audit.scope["state"].get("principal")
        if principal is None or (audit.record_id is not None and audit.recorded_status == status):
            return
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_audit, principal, audit, status)
        except Exception:
            log.warning("audit record of %s %s (%s) not written", audit.scope["method"], audit.scope["path"],
                        audit.request_id, exc_info=True)

    async def _check_disk(self, method: str, path: str) -> None:
        """507 before anything is written on a full disk; deletes (and logins) may use the reserve.

        A tenant must be able to free space when the disk is full: a DELETE releases the reserve
        file so SQLite has room for its WAL. The reserve comes back once there is room again.
        """
        if diskspace.is_low():
            if method == "DELETE" or self.routes.is_public(method, path):
                diskspace.use_reserve()
                return
            raise InsufficientStorage(_FULL_DETAIL, headers={"Retry-After": "60"})
        now = time.monotonic()
        if now >= self._reserve_checked_at:
            self._reserve_checked_at = now + diskspace.CACHE_S
            if not diskspace.reserve_path().exists():
                await anyio.to_thread.run_sync(diskspace.maintain_reserve)

    @staticmethod
    async def _authenticate(scope: Scope) -> None:
        """Refuse a missing or bad token before the body is read (routes' own dependencies check roles).

        Bodiless requests are left to the route's dependency, which hits the token cache without a
        thread hop; a request with a body pays one hop here so no byte of it is read for nobody.
        So does a POST with an Idempotency-Key: a replayed answer never reaches the route, so a
        revoked or expired token must be refused here.
        """
        header = _header(scope, b"authorization")
        if not header:
            raise Unauthenticated("Missing Authorization header: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization header must be 'Bearer <token>'", code="bad_auth_scheme")
        if _has_body(scope) or (scope["method"] == "POST" and _header(scope, b"idempotency-key")):
            from hackboot.core.auth import PROJECT_HEADER, authenticate_token

            project = _header(scope, PROJECT_HEADER.lower().encode()) or None
            await anyio.to_thread.run_sync(authenticate_token, token.strip(), project)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return limited

    async def _idempotent(self, scope: Scope, receive: Receive, send: Send, key: str,
                          audit: AuditContext | None) -> None:
        if len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
            raise BadRequest(f"Idempotency-Key must be printable and at most {MAX_IDEMPOTENCY_KEY} characters",
                             code="invalid_idempotency_key")
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        query = scope.get("query_string", b"").decode("latin-1")
        kh = idempotency.key_hash(_header(scope, b"authorization"), key, scope["method"],
                                  scope["path"] + "?" + query)
        request_hash = hashlib.sha256(body).hexdigest()
        existing = await anyio.to_thread.run_sync(idempotency.reserve, kh, request_hash)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise ValidationFailed("This Idempotency-Key was used with a different request body",
                                       code="idempotency_key_reused")
            if existing.state != "done":
                raise Conflict("A request with this Idempotency-Key is in progress or was interrupted",
                               code="idempotency_in_progress")
            headers = [(b"content-type", existing.content_type.encode()), (b"idempotent-replayed", b"true")]
            if existing.location:
                headers.append((b"location", existing.location.encode()))
            await send({"type": "http.response.start", "status": existing.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": idempotency.stored_body(existing)})
            return

        delivered = False

        async def replay_body() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        captured: dict[str, Any] = {"status": 500, "ctype": "", "location": "", "body": []}
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            # Held back until the key is recorded as done: a retry racing the first answer
            # must see the stored response, not "in progress".
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                for k, v in message.get("headers", []):
                    if k == b"content-type":
                        captured["ctype"] = v.decode("latin-1")
                    elif k == b"location":
                        captured["location"] = v.decode("latin-1")
            elif message["type"] == "http.response.body":
                captured["body"].append(message.get("body", b""))
            messages.append(message)

        try:
            await self._route(scope, replay_body, capture, audit)
        except BaseException:
            await anyio.to_thread.run_sync(idempotency.release, kh)
            raise
        await anyio.to_thread.run_sync(idempotency.complete, kh, captured["status"], captured["ctype"],
                                       captured["location"], b"".join(captured["body"]))
        for message in messages:
            await send(message)


def _audit(principal: Any, audit: AuditContext, status: int) -> None:
    from hackboot.core.db import session_scope
    from hackboot.core.ids import new_id
    from hackboot.events.models import AuditRecord

    with session_scope() as s:
        if audit.record_id is not None:
            s.execute(update(AuditRecord).where(AuditRecord.id == audit.record_id).values(status_code=status))
            return
        s.add(AuditRecord(id=new_id("aud"), project_id=principal.project_id, user_id=principal.user_id,
                          username=principal.username, token_id=principal.token_id, method=audit.scope["method"],
                          path=audit.scope["path"][:512], status_code=status, request_id=audit.request_id))
