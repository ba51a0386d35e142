"""Early authentication: a missing or bad token is refused before any byte of the body is read.

Routes' own dependencies (`core.auth`) check roles and set the principal; this gate only makes
sure nobody uploads a body for nothing. Bodiless requests are left to the route's dependency,
which hits the token cache without a thread hop; a request with a body pays one hop here. So
does a POST with an Idempotency-Key: a replayed answer never reaches the route, so a revoked or
expired token must be refused here.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from hackboot.core.asgi import has_body, header
from hackboot.core.auth import PROJECT_HEADER, authenticate_token
from hackboot.core.errors import Unauthenticated
from hackboot.core.routes import RoutePolicy

_PROJECT = PROJECT_HEADER.lower().encode()


class EarlyAuth:
    def __init__(self, app: ASGIApp, routes: RoutePolicy) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.routes.needs_token(scope["method"], scope["path"]):
            await self._authenticate(scope)
        await self.app(scope, receive, send)

    @staticmethod
    async def _authenticate(scope: Scope) -> None:
        value = header(scope, b"authorization")
        if not value:
            raise Unauthenticated("Missing Authorization header: send 'Authorization: Bearer <token>'")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Authorization header must be 'Bearer <token>'", code="bad_auth_scheme")
        if has_body(scope) or (scope["method"] == "POST" and header(scope, b"idempotency-key")):
            project = header(scope, _PROJECT) or None
            await anyio.to_thread.run_sync(authenticate_token, token.strip(), project)
