"""The FastAPI application shell: error rendering, health, metrics, and the stack of ASGI layers.

Routers come from server.py. The layers, outermost first (each a module of its own):
request ids → metrics → error boundary → NUL refusal → early authentication → disk guard →
body limits → idempotency keys → audit trail → the routes.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from hackboot.core import idempotency
from hackboot.core.audit import AuditTrail
from hackboot.core.auth import PROJECT_HEADER, authenticate_token
from hackboot.core.authgate import EarlyAuth
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope
from hackboot.core.errors import ApiError, Forbidden, Unauthenticated
from hackboot.core.idempotency import IdempotencyKeys
from hackboot.core.limits import BodyLimit, RefuseNul
from hackboot.core.metrics import Metrics, MetricSource, render_sources
from hackboot.core.problems import ProblemBoundary
from hackboot.core.request_ids import RequestIds
from hackboot.core.routes import route_policy, streams_body
from hackboot.core.storagefull import DiskGuard

log = logging.getLogger("hackboot.api")
PROBLEM = "application/problem+json"
_HTTP_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_failed", 429: "too_many_requests"}


def _problem(request: Request, status: int, code: str, title: str, detail: str, **extra: object) -> JSONResponse:
    body = {"type": f"https://hackboot.cloud/problems/{code}", "title": title, "status": status, "code": code,
            "detail": detail, "instance": request.url.path,
            "request_id": request.scope.get("state", {}).get("request_id", "")} | extra
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


async def _metrics_caller(request: Request) -> None:
    """Let through the configured scrape token or a superuser; route names and rates are not public."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("Metrics need 'Authorization: Bearer <metrics token or superuser token>'")
    configured = get_settings().metrics_token
    if configured and hmac.compare_digest(token.encode(), configured.encode()):
        return
    principal = await anyio.to_thread.run_sync(authenticate_token, token, None)
    if not principal.is_superuser:
        raise Forbidden("Only the metrics token or a cloud administrator (superuser) may read metrics")


def build_app(routers: Iterable[APIRouter], *, title: str = "Hackboot Cloud API",
              metric_sources: Sequence[MetricSource] = ()) -> FastAPI:
    routers = list(routers)
    app = FastAPI(title=title, version="1.0.0", description=(
        "Self-hostable IaaS: identity, catalog, compute, volumes, object storage. "
        "Authenticate with `Authorization: Bearer <token>`; errors are RFC 9457 problem+json."))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        resp = JSONResponse(exc.to_problem(request.url.path)
                            | {"request_id": request.scope.get("state", {}).get("request_id", "")},
                            status_code=exc.status, media_type=PROBLEM)
        resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(f['loc'])}: {f['msg']}" for f in fields[:5])
        return _problem(request, 422, "validation_failed", "Validation failed", summary or "Invalid request",
                        errors=fields)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        resp = _problem(request, exc.status_code, code, code.replace("_", " ").capitalize(), str(exc.detail))
        if exc.headers:
            resp.headers.update(exc.headers)
        if exc.status_code == 405:
            # Starlette names only the methods of the first route whose path matched; a path served by
            # several routes (GET list + POST create) supports the union of their methods.
            resp.headers["Allow"] = ", ".join(_allowed_methods(method_routes, request))
        return resp

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _problem(request, 500, "internal_error", "Internal error",
                        "An unexpected error occurred; quote the request_id when reporting it")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Readiness: the database answers."""
        try:
            with session_scope(write=False) as s:
                s.execute(text("SELECT 1"))
        except Exception:
            # Public endpoint: the reason (database host, user, file paths) goes to the log only.
            log.warning("readiness check failed", exc_info=True)
            return JSONResponse({"status": "unavailable", "detail": "the database does not answer"},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse,
             openapi_extra={"security": [{"bearer": []}]})
    async def metrics(request: Request) -> PlainTextResponse:
        """Prometheus metrics: request counts and latency histograms per route.

        Not public: send `Authorization: Bearer <metrics_token>` (setting `metrics_token`, meant for
        Prometheus) or a superuser's token.
        """
        await _metrics_caller(request)
        services = await run_in_threadpool(render_sources, metric_sources)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Several API processes: add up every process's samples.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return PlainTextResponse(generate_latest(registry).decode() + services, media_type=CONTENT_TYPE_LATEST)
        return PlainTextResponse(generate_latest().decode() + services, media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    # The routes that answer on a path, for `Allow` (the app's own, and each router's with its prefix).
    method_routes = [r for r in app.router.routes if isinstance(r, Route)] + [
        r for router in routers for r in router.routes if isinstance(r, Route)]
    # POSTs that honour Idempotency-Key: every one but those that stream their body.
    idempotent = {route.path_format for router in routers for route in router.routes
                  if isinstance(route, APIRoute) and "POST" in (route.methods or ()) and not streams_body(route)}
    _document_problems(app, idempotent)
    _add_layers(app, routers)
    return app


def _add_layers(app: FastAPI, routers: list[APIRouter]) -> None:
    routes = route_policy(routers)
    outermost_first: list[tuple[Any, dict[str, Any]]] = [
        (RequestIds, {}),
        (Metrics, {}),  # counts the problems the layers below answer
        (ProblemBoundary, {}),  # renders what the layers below raise
        (RefuseNul, {}),
        (EarlyAuth, {"routes": routes}),  # no body is read for nobody
        (DiskGuard, {"routes": routes}),
        (BodyLimit, {"max_body_bytes": get_settings().max_body_bytes, "routes": routes}),
        (IdempotencyKeys, {"routes": routes}),  # reads the (limited) body itself
        (AuditTrail, {}),  # around the route only, not the idempotency bookkeeping
    ]
    for layer, options in reversed(outermost_first):  # Starlette wraps each new layer around the others
        app.add_middleware(layer, **options)


_METHOD_ORDER = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _allowed_methods(routes: list[Route], request: Request) -> list[str]:
    """Every method some route serves on this request's path (RFC 9110 `Allow`)."""
    methods: set[str] = set()
    for route in routes:
        if route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods, key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else len(_METHOD_ORDER), m))


PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "code", "detail"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "code": {"type": "string", "description": "Stable machine-readable error code"},
        "detail": {"type": "string"}, "instance": {"type": "string"}, "request_id": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}
_PROBLEM_STATUSES = {"400": "Bad request", "401": "Not authenticated", "403": "Not allowed or over quota",
                     "404": "Not found (including other projects' resources)", "409": "Conflict with current state",
                     "413": "Body too large", "422": "Validation failed",
                     "431": "Request header fields too large", "503": "Not ready",
                     "507": "Storage full: delete resources to free space, or retry later"}


_PROJECT_REQUIRED = (f"; `project_required` when the token is not scoped to a project (superuser login tokens) "
                     f"and no {PROJECT_HEADER} header names one")


def _headers_not_nullable(op: dict[str, Any]) -> None:
    """An optional header is absent or a string, never JSON null: drop pydantic's `anyOf [.., null]`."""
    for param in op.get("parameters", []):
        schema = param.get("schema", {})
        if param.get("in") != "header" or "anyOf" not in schema:
            continue
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            param["schema"] = options[0] | rest


def _closed_pattern_maps(node: object) -> None:
    """A dict with constrained keys refuses other keys: say so (`patternProperties` alone allows them)."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _closed_pattern_maps(value)
    elif isinstance(node, list):
        for value in node:
            _closed_pattern_maps(value)


def _document_problems(app: FastAPI, idempotent: set[str]) -> None:
    """Declare the problem+json answers every operation can give, so clients and fuzzers know them;
    and the Idempotency-Key header on the POSTs that honour it."""
    original = app.openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
        _closed_pattern_maps(schema)
        ref = {"content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
        for path, path_item in schema.get("paths", {}).items():
            for method, op in path_item.items():
                if method == "post" and path in idempotent:
                    idempotency.declare_header(op)
                _headers_not_nullable(op)
                responses = op.setdefault("responses", {})
                for status, description in _PROBLEM_STATUSES.items():
                    if status == "400" and any(p.get("name") == PROJECT_HEADER for p in op.get("parameters", [])):
                        description += _PROJECT_REQUIRED
                    if status == "422" and status in responses:
                        responses[status] = {"description": description} | ref
                    responses.setdefault(status, {"description": description} | ref)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
