"""A full disk answers 507 before anything is written, and deletes can still free space.

A tenant must be able to free space when the disk is full: a DELETE (or a login, to get the
token for it) may use the reserve file (`core.diskspace`), which it releases so SQLite has room
for its WAL; the reserve comes back once there is room again. A write that fails on a full disk
anyway is answered 507 by the error boundary (`core.problems`).
"""

from __future__ import annotations

import time

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from hackboot.core import diskspace
from hackboot.core.asgi import MUTATING
from hackboot.core.errors import InsufficientStorage
from hackboot.core.routes import RoutePolicy

FULL_DETAIL = "The cloud's storage is full: delete resources to free space, or retry later"


class DiskGuard:
    """507 `insufficient_storage` for a mutating /v1 request while the disk is low (DELETE excepted)."""

    def __init__(self, app: ASGIApp, routes: RoutePolicy) -> None:
        self.app = app
        self.routes = routes
        self._reserve_checked_at = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in MUTATING and scope["path"].startswith("/v1/"):
            await self._check(scope["method"], scope["path"])
        await self.app(scope, receive, send)

    async def _check(self, method: str, path: str) -> None:
        if diskspace.is_low():
            if method == "DELETE" or self.routes.is_public(method, path):
                diskspace.use_reserve()
                return
            raise InsufficientStorage(FULL_DETAIL, headers={"Retry-After": "60"})
        now = time.monotonic()
        if now >= self._reserve_checked_at:
            self._reserve_checked_at = now + diskspace.CACHE_S
            if not diskspace.reserve_path().exists():
                await anyio.to_thread.run_sync(diskspace.maintain_reserve)
