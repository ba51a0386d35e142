"""Prometheus metrics of the API: requests and latency per route template and status.

Labelled by route template (`/v1/instances/{instance_id}`), never by raw path, so a tenant
cannot blow up the number of series. `/metrics` itself (in `core.app`) is not public.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("hackboot_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram("hackboot_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))


class Metrics:
    """Counts every answer, including the problems the layers inside it send (refusals before routing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when an exception gets past every layer

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope["method"]
            route = getattr(scope.get("route"), "path", "unmatched")
            LATENCY.labels(method, route).observe(time.perf_counter() - started)
            REQUESTS.labels(method, route, str(status)).inc()
