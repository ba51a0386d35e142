"""Request limits: what a request may carry before it reaches a route.

* no NUL character in the path or query string (no database stores it; a clear 400);
* a body no larger than `max_body_bytes` (413), checked on `Content-Length` before reading and
  counted while reading, except on routes that stream their body (uploads, see `core.routes`).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hackboot.core.asgi import BODY_ADMITTED, header
from hackboot.core.errors import BadRequest, PayloadTooLarge
from hackboot.core.routes import RoutePolicy


class BodyTooLarge(HTTPException):
    """Raised from `receive` while a body streams in: FastAPI passes HTTPExceptions through as they are."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body over {limit} bytes", headers={"Connection": "close"})


class RefuseNul:
    """400 `invalid_characters` for a NUL in the path or query string, before anything else looks at it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")):
            raise BadRequest("NUL characters are not allowed in paths or query strings", code="invalid_characters")
        await self.app(scope, receive, send)


class BodyLimit:
    """The last check before a body is read: marks the body admitted (see `core.asgi.BODY_ADMITTED`)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, routes: RoutePolicy) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.routes.streams(scope["method"], scope["path"]):
            length = header(scope, b"content-length")
            if length.isdigit() and int(length) > self.max_body:
                raise PayloadTooLarge(f"Request body over {self.max_body} bytes")
            receive = self._limited(receive)
        scope.setdefault("state", {})[BODY_ADMITTED] = True
        await self.app(scope, receive, send)

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
