"""ASGI middleware: request ids, body limits, metrics, idempotency keys and the audit log.

Written as plain ASGI (not BaseHTTPMiddleware) so streaming uploads stay streams and
each request pays only a few microseconds here.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import anyio
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hackboot.core import idempotency
from hackboot.core.errors import ApiError, BadRequest, Conflict, PayloadTooLarge, ValidationFailed

REQUESTS = Counter("hackboot_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("hackboot_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
STREAMING_TYPES = ("application/octet-stream",)
MAX_IDEMPOTENCY_KEY = 255


def _header(scope: Scope, name: bytes) -> str:
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return ""


async def _send_problem(send: Send, err: ApiError, request_id: str) -> None:
    body = json.dumps(err.to_problem() | {"request_id": request_id}).encode()
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req-" + uuid.uuid4().hex[:20]
        scope.setdefault("state", {})["request_id"] = request_id
        method = scope["method"]
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*list(message["headers"]), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
                raise BadRequest("NUL characters are not allowed in paths or query strings", code="invalid_characters")
            ctype = _header(scope, b"content-type").split(";")[0].strip().lower()
            streaming = ctype in STREAMING_TYPES
            length = _header(scope, b"content-length")
            if not streaming and length.isdigit() and int(length) > self.max_body:
                raise PayloadTooLarge(f"Request body over {self.max_body} bytes")
            if not streaming:
                receive = self._limited(receive)
            key = _header(scope, b"idempotency-key")
            if key and method == "POST":
                await self._idempotent(scope, receive, send_wrapper, key)
            else:
                await self.app(scope, receive, send_wrapper)
        except ApiError as err:
            status_holder["status"] = err.status
            await _send_problem(send, err, request_id)
        finally:
            route = scope.get("route")
            route_name = getattr(route, "path", "unmatched")
            LATENCY.labels(method, route_name).observe(time.perf_counter() - started)
            REQUESTS.labels(method, route_name, str(status_holder["status"])).inc()
            principal = scope["state"].get("principal")
            if principal is not None and method not in ("GET", "HEAD", "OPTIONS"):
                await anyio.to_thread.run_sync(_audit, principal, method, scope["path"],
                                               status_holder["status"], request_id)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise PayloadTooLarge(f"Request body over {self.max_body} bytes")
            return message

        return limited

    async def _idempotent(self, scope: Scope, receive: Receive, send: Send, key: str) -> None:
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
            await self.app(scope, replay_body, capture)
        except BaseException:
            await anyio.to_thread.run_sync(idempotency.release, kh)
            raise
        await anyio.to_thread.run_sync(idempotency.complete, kh, captured["status"], captured["ctype"],
                                       captured["location"], b"".join(captured["body"]))
        for message in messages:
            await send(message)


def _audit(principal: Any, method: str, path: str, status: int, request_id: str) -> None:
    from hackboot.core.db import session_scope
    from hackboot.core.ids import new_id
    from hackboot.events.models import AuditRecord

    with session_scope() as s:
        s.add(AuditRecord(id=new_id("aud"), project_id=principal.project_id, user_id=principal.user_id,
                          username=principal.username, token_id=principal.token_id, method=method,
                          path=path[:512], status_code=status, request_id=request_id))
