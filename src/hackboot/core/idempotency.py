"""`Idempotency-Key` on POST: the same key replays the first response, never a second resource.

The key is reserved (a `pending` row, committed) before the handler runs, so two
concurrent requests with one key cannot both create. Responses below 500 are stored
and replayed for 24 h; a 5xx frees the key so the client may retry. A reservation
left by a killed server stays `pending` and is answered 409 (the first attempt may
or may not have taken effect: the client should look before retrying with a new key).

Every POST honours the header except those that stream their body (an upload is never
buffered to be hashed); the OpenAPI document declares it on exactly those (`declare_header`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import anyio
from sqlalchemy import Integer, String, Text, delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hackboot.core.asgi import header
from hackboot.core.crypto import seal, unseal
from hackboot.core.db import Base, session_scope, utcnow
from hackboot.core.errors import BadRequest, Conflict, ValidationFailed
from hackboot.core.routes import RoutePolicy

TTL = dt.timedelta(hours=24)
MAX_STORED_BODY = 1024 * 1024
HEADER = "Idempotency-Key"
MAX_KEY = 255


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8), default="pending")
    status_code: Mapped[int] = mapped_column(Integer, default=0)
    content_type: Mapped[str] = mapped_column(String(100), default="")
    location: Mapped[str] = mapped_column(String(500), default="")
    body: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def key_hash(authorization: str, key: str, method: str, path: str) -> str:
    return hashlib.sha256(f"{authorization}\x00{key}\x00{method}\x00{path}".encode()).hexdigest()


def reserve(kh: str, request_hash: str) -> IdempotencyRecord | None:
    """Reserve the key; return None when reserved now, else the existing record."""
    try:
        with session_scope() as s:
            s.add(IdempotencyRecord(key_hash=kh, request_hash=request_hash))
        return None
    except IntegrityError:
        with session_scope(write=False) as s:
            existing = s.get(IdempotencyRecord, kh)
            if existing is not None and existing.created_at < utcnow() - TTL:
                s.delete(existing)
        with session_scope() as s:
            existing = s.get(IdempotencyRecord, kh)
            if existing is not None and existing.created_at < utcnow() - TTL:
                s.delete(existing)
                s.flush()
                s.add(IdempotencyRecord(key_hash=kh, request_hash=request_hash))
                return None
            return existing


def complete(kh: str, status_code: int, content_type: str, location: str, body: bytes) -> None:
    with session_scope() as s:
        rec = s.get(IdempotencyRecord, kh)
        if rec is None:
            return
        if status_code >= 500 or len(body) > MAX_STORED_BODY:
            s.delete(rec)
            return
        rec.state = "done"
        rec.status_code = status_code
        rec.content_type = content_type
        rec.location = location
        # Sealed: stored responses may hold secrets shown once (tokens, webhook secrets).
        rec.body = seal(body, kh.encode())


def stored_body(rec: IdempotencyRecord) -> bytes:
    return unseal(rec.body, rec.key_hash.encode()) if rec.body else b""


def release(kh: str) -> None:
    with session_scope() as s:
        s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.key_hash == kh))


def purge_expired() -> int:
    with session_scope() as s:
        result = s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < utcnow() - TTL))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


# --- the ASGI layer ---------------------------------------------------------------------------------

def valid_key(key: str) -> bool:
    return len(key) <= MAX_KEY and key.isprintable()


class IdempotencyKeys:
    """Replays the stored answer of a POST's key, or runs the route once and stores its answer."""

    def __init__(self, app: ASGIApp, routes: RoutePolicy) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = header(scope, b"idempotency-key") if scope["type"] == "http" and scope["method"] == "POST" else ""
        if not key or self.routes.streams(scope["method"], scope["path"]):  # never buffer an upload to hash it
            await self.app(scope, receive, send)
            return
        if not valid_key(key):
            raise BadRequest(f"{HEADER} must be printable and at most {MAX_KEY} characters",
                             code="invalid_idempotency_key")
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        query = scope.get("query_string", b"").decode("latin-1")
        kh = key_hash(header(scope, b"authorization"), key, scope["method"], scope["path"] + "?" + query)
        request_hash = hashlib.sha256(body).hexdigest()
        existing = await anyio.to_thread.run_sync(reserve, kh, request_hash)
        if existing is not None:
            await self._replay(existing, request_hash, send)
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
            await self.app(scope, replay_body, capture)
        except BaseException:
            await anyio.to_thread.run_sync(release, kh)
            raise
        await anyio.to_thread.run_sync(complete, kh, captured["status"], captured["ctype"], captured["location"],
                                       b"".join(captured["body"]))
        for message in messages:
            await send(message)

    @staticmethod
    async def _replay(existing: IdempotencyRecord, request_hash: str, send: Send) -> None:
        if existing.request_hash != request_hash:
            raise ValidationFailed(f"This {HEADER} was used with a different request body",
                                   code="idempotency_key_reused")
        if existing.state != "done":
            raise Conflict(f"A request with this {HEADER} is in progress or was interrupted",
                           code="idempotency_in_progress")
        headers = [(b"content-type", existing.content_type.encode()), (b"idempotent-replayed", b"true")]
        if existing.location:
            headers.append((b"location", existing.location.encode()))
        await send({"type": "http.response.start", "status": existing.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": stored_body(existing)})


# --- the OpenAPI document ---------------------------------------------------------------------------

# Exactly the keys `valid_key` accepts, as a header carries them (latin-1): printable characters,
# i.e. no control character, no NBSP and no soft hyphen. An empty value means "no key".
_KEY_PATTERN = "^[\\x20-\\x7e\\xa1-\\xac\\xae-\\xff]*$"


def declare_header(operation: dict[str, Any]) -> None:
    """Declare the optional `Idempotency-Key` header parameter on an OpenAPI POST operation."""
    params = operation.setdefault("parameters", [])
    if any(p.get("in") == "header" and p.get("name", "").lower() == HEADER.lower() for p in params):
        return
    params.append({
        "name": HEADER, "in": "header", "required": False,
        "description": ("Makes the POST safe to retry: the first answer (below 500) to this key, from this "
                        "token, on this path, is stored for 24 h and replayed with `Idempotent-Replayed: true`. "
                        "The same key with another body is a 422 `idempotency_key_reused`; while the first "
                        "request runs (or if it was interrupted), a 409 `idempotency_in_progress`."),
        "schema": {"type": "string", "maxLength": MAX_KEY, "pattern": _KEY_PATTERN},
    })
