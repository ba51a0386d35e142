"""Prometheus metrics of the API: requests and latency per route template and status.

Labelled by route template (`/v1/instances/{instance_id}`), never by raw path, so a tenant
cannot blow up the number of series. `/metrics` itself (in `core.app`) is not public.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("hackboot.metrics")

# A service's metrics read from its state at scrape time (load balancers' counters …), which per-process
# counters cannot carry: the server lists these sources, `/metrics` appends what they yield.
MetricSource = Callable[[], Iterable[Metric]]

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


class _Sources:
    def __init__(self, sources: Sequence[MetricSource]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            try:
                yield from list(source())
            except Exception:  # one service's trouble must not take every metric away
                log.exception("metric source %s failed", getattr(source, "__qualname__", source))


def render_sources(sources: Sequence[MetricSource]) -> str:
    """The Prometheus text of `sources` (blocking: they may read the database)."""
    if not sources:
        return ""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Sources(sources))
    return generate_latest(registry).decode()
