"""Small helpers shared by the API's ASGI layers (request ids, limits, authentication, idempotency…).

The layers are plain ASGI (not BaseHTTPMiddleware) so streaming uploads stay streams and each
request pays only a few microseconds per layer; `core.app.build_app` stacks them.
"""

from __future__ import annotations

import json

from starlette.types import Scope, Send

from hackboot.core.errors import ApiError

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Set in scope["state"] once the checks that come before reading a body have passed: a refusal
# before that point closes the connection rather than receive a body for nothing.
BODY_ADMITTED = "body_admitted"


def header(scope: Scope, name: bytes) -> str:
    """A request header's value (latin-1), or "" when absent; `name` in lower case."""
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return ""


def has_body(scope: Scope) -> bool:
    length = header(scope, b"content-length")
    return (length not in ("", "0")) or bool(header(scope, b"transfer-encoding"))


def request_id(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


async def send_problem(send: Send, scope: Scope, err: ApiError, *, close: bool = False) -> None:
    """Answer `err` as problem+json (the request-id layer adds the X-Request-Id header)."""
    body = json.dumps(err.to_problem() | {"request_id": request_id(scope)}).encode()
    headers = [(b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if close:  # the body was not read: end the connection rather than receive it for nothing
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
