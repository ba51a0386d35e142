"""Invoking functions over HTTP: the API call, and the public function URLs of http triggers.

- ``POST /v1/functions/{ref}/invoke`` (member): the body is the event (JSON); ``?qualifier=`` picks a version
  or alias; ``Invocation-Type: Event`` (or ``?mode=async``) accepts it for later (202) instead of waiting.
- ``/fn/{trigger_id}[/path]`` (any method, public unless the trigger asks for a token): the request becomes an
  event shaped like an AWS Lambda function URL's (payload format 2.0), and the handler's answer becomes the
  response — ``{"statusCode", "headers", "body", "isBase64Encoded"}``, or any other value as a JSON 200.

Over a concurrency limit: 429 with ``Retry-After``. A function's failure is not an HTTP error of the API:
the invoke call answers 200 with ``outcome`` and ``error`` (and the ``X-Function-Error`` header); a function URL
answers 502 (500 for a timeout is 504), as Lambda's do.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from hackboot.core import errors
from hackboot.core.auth import Member
from hackboot.core.db import session_scope
from hackboot.core.schemas import Out
from hackboot.functions import asyncq, service, triggers
from hackboot.functions.engine import InvocationResult
from hackboot.functions.invoker import Throttled

router = APIRouter(prefix="/v1", tags=["functions"])
urls = APIRouter(tags=["function URLs"])

MAX_EVENT_BYTES = 6 * 1024 * 1024  # as Lambda's synchronous payload limit
LOG_TAIL = 4096
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "te", "trailer"}


class TooManyRequests(errors.ApiError):
    status = 429
    code = "too_many_requests"
    title = "Too many requests"


class InvocationOut(Out):
    request_id: str
    outcome: str = Field(description="ok, error, timeout, out_of_memory or crashed")
    result: Any = Field(None, description="What the handler returned (ok), or the error object (error)")
    error: str | None = None
    logs_tail: str = Field("", description="The end of the invocation's output (all of it: the logs API)")
    duration_ms: float
    init_ms: float
    cold: bool


class AcceptedOut(Out):
    id: str = Field(description="The asynchronous invocation")
    status: str = "accepted"


def _throttled(exc: Throttled) -> TooManyRequests:
    return TooManyRequests(str(exc), headers={"Retry-After": "1"})


def _payload(result: InvocationResult) -> Any:
    if not result.payload:
        return None
    try:
        return json.loads(result.payload)
    except ValueError:
        return result.payload.decode(errors="replace")


async def _event_body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > MAX_EVENT_BYTES:
        raise errors.PayloadTooLarge(f"An event is at most {MAX_EVENT_BYTES} bytes")
    return body


@router.post("/functions/{ref}/invoke", response_model=InvocationOut | AcceptedOut,
             responses={202: {"model": AcceptedOut}, 429: {"description": "Over a concurrency limit"}})
async def invoke(ref: str, request: Request, response: Response, p: Member,
                 qualifier: Annotated[str | None, Query(max_length=64)] = None,
                 mode: Annotated[str | None, Query(pattern="^(sync|async)$")] = None,
                 invocation_type: Annotated[str | None, Header(alias="Invocation-Type")] = None) -> Any:
    """Invoke a function with the request body as its event (JSON)."""
    body = await _event_body(request)
    event = body or b"{}"
    try:
        json.loads(event)
    except ValueError:
        raise errors.ValidationFailed("The event (the request body) must be JSON") from None
    resolved = await run_in_threadpool(service.resolve, p.project, ref, qualifier)
    if mode == "async" or (invocation_type or "").lower() == "event":
        def accept() -> str:
            with session_scope() as s:
                return asyncq.enqueue(s, project_id=resolved.project_id, function_id=resolved.function_id,
                                      qualifier=qualifier, source="api", event=event.decode())

        response.status_code = 202
        return AcceptedOut(id=await run_in_threadpool(accept))
    try:
        result = await run_in_threadpool(triggers.run, resolved, event, trigger_kind="api")
    except Throttled as exc:
        raise _throttled(exc) from None
    if result.outcome != "ok":
        response.headers["X-Function-Error"] = result.outcome
    return InvocationOut(request_id=result.request_id, outcome=result.outcome, result=_payload(result),
                         error=result.error, logs_tail=result.logs[-LOG_TAIL:], duration_ms=result.duration_ms,
                         init_ms=result.init_ms, cold=result.cold)


# --- function URLs ----------------------------------------------------------------------------------

def url_event(request: Request, trigger_id: str, path: str, body: bytes) -> dict[str, Any]:
    """The request as a Lambda function URL event (payload format 2.0)."""
    text: str | None
    try:
        text, encoded = body.decode(), False
    except UnicodeDecodeError:
        text, encoded = base64.b64encode(body).decode(), True
    headers: dict[str, str] = {}
    for k, v in request.headers.items():
        if k.lower() != "authorization":  # the trigger's token is the cloud's business, not the handler's
            headers[k.lower()] = f"{headers[k.lower()]},{v}" if k.lower() in headers else v
    cookies = [c.strip() for c in request.headers.get("cookie", "").split(";") if c.strip()]
    now = dt.datetime.now(dt.UTC)
    return {
        "version": "2.0", "routeKey": "$default", "rawPath": "/" + path, "rawQueryString": request.url.query,
        "cookies": cookies or None, "headers": headers,
        "queryStringParameters": dict(request.query_params) or None,
        "requestContext": {"domainName": request.url.hostname, "requestId": request.headers.get("x-request-id", ""),
                           "apiId": trigger_id, "time": now.isoformat(), "timeEpoch": int(now.timestamp() * 1000),
                           "http": {"method": request.method, "path": "/" + path,
                                    "protocol": f"HTTP/{request.scope.get('http_version', '1.1')}",
                                    "sourceIp": request.client.host if request.client else "",
                                    "userAgent": request.headers.get("user-agent", "")}},
        "body": text if body else None, "isBase64Encoded": encoded}


def url_response(result: InvocationResult) -> Response:
    if result.outcome != "ok":
        return JSONResponse({"message": "The function failed", "outcome": result.outcome,
                             "request_id": result.request_id}, status_code=504 if result.outcome == "timeout" else 502)
    value = _payload(result)
    if isinstance(value, dict) and "statusCode" in value:
        status: Any = value.get("statusCode")
        if not isinstance(status, int) or not 100 <= status <= 599:
            return JSONResponse({"message": "The function answered an invalid statusCode"}, status_code=502)
        body = value.get("body") or ""
        raw = base64.b64decode(body) if value.get("isBase64Encoded") else str(body).encode()
        headers = {str(k): str(v) for k, v in (value.get("headers") or {}).items()
                   if str(k).lower() not in _HOP_BY_HOP and "\n" not in str(v) and "\r" not in str(v)}
        response = Response(raw, status_code=status, headers=headers)
        for cookie in value.get("cookies") or []:
            if "\n" not in str(cookie) and "\r" not in str(cookie):
                response.headers.append("set-cookie", str(cookie))
        return response
    return JSONResponse(value, status_code=200)


@urls.api_route("/fn/{trigger_id}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                include_in_schema=False)
@urls.api_route("/fn/{trigger_id}/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                include_in_schema=False)
async def function_url(trigger_id: str, request: Request, path: str = "") -> Response:
    """A function's public URL (an http trigger)."""
    body = await _event_body(request)
    resolved, auth = await run_in_threadpool(service.resolve_http_trigger, trigger_id)
    presented = request.headers.get("authorization", "")
    token = presented[7:].strip() if presented.lower().startswith("bearer ") else None
    if not auth.allows(token):
        raise errors.Unauthenticated("This function URL needs 'Authorization: Bearer <its token>'",
                                     headers={"WWW-Authenticate": "Bearer"})
    event = json.dumps(url_event(request, trigger_id, path, body)).encode()
    try:
        result = await run_in_threadpool(triggers.run, resolved, event, trigger_kind="http")
    except Throttled as exc:
        raise _throttled(exc) from None
    return url_response(result)
