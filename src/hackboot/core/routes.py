"""What the ASGI layers must know of routes before routing: which take no token, which stream bodies.

Built from the routers (see `route_policy`): a route is public when no dependency authenticates
it, and streams when its OpenAPI request body is `application/octet-stream`. Every other `/v1`
route needs a bearer token, checked before any byte of the body is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import compile_path

from hackboot.core.auth import authenticated

STREAMING_TYPES = ("application/octet-stream",)


@dataclass
class RoutePolicy:
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


def _authenticates(dependant: Dependant) -> bool:
    return dependant.call is authenticated or any(_authenticates(d) for d in dependant.dependencies)


def streams_body(route: APIRoute) -> bool:
    content = (route.openapi_extra or {}).get("requestBody", {}).get("content", {})
    return any(ctype in STREAMING_TYPES for ctype in content)


def route_policy(routers: Iterable[APIRouter]) -> RoutePolicy:
    """Which /v1 routes take no token (login) and which stream their bodies (declared octet-stream)."""
    policy = RoutePolicy()
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            if not _authenticates(route.dependant):
                policy.add("public", route.path, route.methods or ())
            if streams_body(route):
                policy.add("streaming", route.path, route.methods or ())
    return policy
