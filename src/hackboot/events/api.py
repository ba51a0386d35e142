"""HTTP for events (list and live stream), webhooks with their delivery log, and the audit log.

Permissions: any project member (viewer and up) reads the project's events; webhooks (their
URLs may embed capabilities, and they receive every event) and the audit log belong to project
admins. Superusers may read every project's events and audit records with `all_projects=true`.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, Field, StringConstraints

from hackboot.core import errors
from hackboot.core.auth import PROJECT_HEADER, Admin, Viewer, authenticate_token
from hackboot.core.config import get_settings
from hackboot.core.pagination import Page, Pagination
from hackboot.core.schemas import Body, Out, ResourceId, Timestamp, as_utc
from hackboot.events import service, stream
from hackboot.events.webhooks import validate_url

router = APIRouter(prefix="/v1", tags=["events"])

AUTH_RECHECK_S = 30.0
MAX_PATTERNS = 32
_PATTERN_RE = re.compile(r"^[A-Za-z0-9_.*?-]{1,64}$")
_PATTERN_HELP = "letters, digits, '.', '_', '-' and the globs '*' and '?', at most 64 characters"

EventPattern = Annotated[str, StringConstraints(pattern=_PATTERN_RE.pattern)]
# Free text without control characters (PostgreSQL refuses NUL in text: a 422 here, never a 500).
_TEXT = r"^[^\x00-\x1f\x7f]*$"
WebhookDescription = Annotated[str, StringConstraints(max_length=255, pattern=_TEXT)]
MAX_SEQ = 2**63 - 1
Order = Literal["asc", "desc"]


def _check_url(url: str) -> str:
    return validate_url(url, allow_private=get_settings().webhook_allow_private_targets)


WebhookUrl = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_url)]



def _patterns(values: list[str] | None) -> list[str]:
    """`?type=a.*&type=b.*` and `?type=a.*,b.*` both mean "a.* or b.*"."""
    out = [v.strip() for raw in values or [] for v in raw.split(",") if v.strip()]
    bad = [v for v in out if not _PATTERN_RE.match(v)]
    if bad:
        raise errors.ValidationFailed(f"Invalid event type pattern {bad[0]!r}: {_PATTERN_HELP}",
                                      errors=[{"loc": ["query", "type"], "msg": _PATTERN_HELP}])
    if len(out) > MAX_PATTERNS:
        raise errors.ValidationFailed(f"At most {MAX_PATTERNS} type patterns")
    return out


# --- events ------------------------------------------------------------------------------------------

class EventOut(Out):
    seq: int = Field(description="Position in the cloud-wide event log; the SSE id")
    id: str
    type: str
    resource_type: str
    resource_id: str
    project_id: str | None
    actor: str
    data: dict[str, Any]
    created_at: dt.datetime


TypeQ = Annotated[list[str] | None, Query(description="Event type or glob, e.g. instance.* (repeat or "
                                                       "comma-separate for several)")]
ResourceTypeQ = Annotated[str | None, Query(max_length=32, pattern=_TEXT)]
ResourceIdQ = Annotated[str | None, Query(max_length=64, pattern=_TEXT)]
SinceQ = Annotated[Timestamp | None, Query(description="Only events at or after this time (ISO 8601)")]
UntilQ = Annotated[Timestamp | None, Query(description="Only events before this time (ISO 8601)")]
AllProjectsQ = Annotated[bool, Query(description="Superusers: every project, and platform events "
                                                 "(project_id null)")]


def _event_filter(p: Any, type: list[str] | None, resource_type: str | None, resource_id: str | None,
                  since: dt.datetime | None, until: dt.datetime | None,
                  all_projects: bool) -> service.EventFilter:
    return service.event_filter(p, all_projects=all_projects, types=_patterns(type), resource_type=resource_type,
                                resource_id=resource_id, since=as_utc(since), until=as_utc(until))


@router.get("/events", response_model=Page[EventOut])
def list_events(p: Viewer, page: Pagination, type: TypeQ = None, resource_type: ResourceTypeQ = None,
                resource_id: ResourceIdQ = None, since: SinceQ = None, until: UntilQ = None,
                all_projects: AllProjectsQ = False,
                order: Annotated[Order, Query(description="asc: oldest first; desc: newest first")] = "asc",
                ) -> Page[EventOut]:
    """The project's events (every change to a resource), oldest first unless `order=desc`."""
    f = _event_filter(p, type, resource_type, resource_id, since, until, all_projects)
    rows, nxt = service.list_events(f, page, descending=order == "desc")
    return Page[EventOut](items=[EventOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/events/stream", response_class=StreamingResponse,
            responses={200: {"description": "Server-sent events: `id: <seq>`, `event: <type>`, "
                                            "`data: <event json>`; a comment every ~15 s keeps it alive",
                             "content": {"text/event-stream": {}}}})
async def stream_events(request: Request, p: Viewer, type: TypeQ = None, resource_type: ResourceTypeQ = None,
                        resource_id: ResourceIdQ = None, since: SinceQ = None, until: UntilQ = None,
                        all_projects: AllProjectsQ = False,
                        after: Annotated[int | None, Query(ge=0, le=MAX_SEQ,
                                                           description="Resume after this seq")] = None,
                        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
                        ) -> StreamingResponse:
    """Follow events live. Resumes after `Last-Event-ID` (sent by EventSource on reconnect) or `?after=`;
    with neither, starts at `since` when given, else with the next new event."""
    f = _event_filter(p, type, resource_type, resource_id, since, until, all_projects)
    resume = after
    if last_event_id is not None and last_event_id.strip():
        resume = stream.parse_last_event_id(last_event_id)
        if resume is None or resume > MAX_SEQ:
            raise errors.BadRequest("Last-Event-ID must be the seq of an event (a non-negative integer)",
                                    code="invalid_last_event_id")
    start = await anyio.to_thread.run_sync(service.stream_start, f, resume)
    token = request.headers.get("authorization", "").partition(" ")[2].strip()
    project_header = request.headers.get(PROJECT_HEADER)
    poll_s = get_settings().events_stream_poll_s
    heartbeat_s = get_settings().events_stream_heartbeat_s

    async def body() -> AsyncIterator[str]:
        cursor = start
        yield stream.preamble()
        last_write = last_auth = time.monotonic()
        while True:
            events, cursor, more = await anyio.to_thread.run_sync(service.poll_events, f, cursor)
            for event in events:
                yield stream.message(EventOut.model_validate(event).model_dump(mode="json"))
                last_write = time.monotonic()
            now = time.monotonic()
            if now - last_write >= heartbeat_s:
                yield stream.comment("keepalive")
                last_write = now
            if now - last_auth >= AUTH_RECHECK_S:
                # A revoked or expired token, or a removed member, stops following within a minute;
                # the client's reconnection then gets the 401.
                try:
                    await anyio.to_thread.run_sync(authenticate_token, token, project_header)
                except errors.ApiError:
                    return
                last_auth = now
            if not more:
                await anyio.sleep(poll_s)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/events/{event_id}", response_model=EventOut)
def get_event(event_id: str, p: Viewer, all_projects: AllProjectsQ = False) -> EventOut:
    f = service.event_filter(p, all_projects=all_projects)
    return EventOut.model_validate(service.get_event(f, event_id))


# --- webhooks ----------------------------------------------------------------------------------------

class WebhookIn(Body):
    url: WebhookUrl = Field(description="http:// or https:// URL that receives the POSTs")
    event_types: list[EventPattern] = Field(default_factory=list, max_length=MAX_PATTERNS,
                                            description="Globs such as instance.*; empty means every event")
    description: WebhookDescription = ""
    enabled: bool = True


class WebhookPatch(Body):
    url: WebhookUrl | None = None
    event_types: list[EventPattern] | None = Field(None, max_length=MAX_PATTERNS)
    description: WebhookDescription | None = None
    enabled: bool | None = None


class WebhookOut(Out):
    id: str
    project_id: str
    url: str
    event_types: list[str]
    description: str
    enabled: bool
    created_at: dt.datetime


class WebhookSecretOut(WebhookOut):
    secret: str = Field(description="The signing secret: shown once, store it now")


class AttemptOut(Out):
    attempt: int
    started_at: dt.datetime
    duration_ms: int
    status_code: int | None
    error: str
    response_excerpt: str


class DeliveryOut(Out):
    id: str
    webhook_id: str
    event_id: str
    event_type: str | None = Field(None, description="null once the event was pruned")
    status: str = Field(description="pending, delivered or failed")
    attempts: int
    next_attempt_at: dt.datetime | None = Field(None, description="When the next attempt is due (pending only)")
    last_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str
    delivered_at: dt.datetime | None
    redelivery_of: str | None
    created_at: dt.datetime
    attempt_log: list[AttemptOut]


def _secret_out(created: service.CreatedWebhook) -> WebhookSecretOut:
    return WebhookSecretOut(**WebhookOut.model_validate(created.webhook).model_dump(), secret=created.secret)


def _delivery_out(view: service.DeliveryView) -> DeliveryOut:
    d = view.delivery
    return DeliveryOut(id=d.id, webhook_id=d.webhook_id, event_id=d.event_id, event_type=view.event_type,
                       status=d.status, attempts=d.attempts,
                       next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
                       last_attempt_at=d.last_attempt_at, last_status_code=d.last_status_code,
                       last_error=d.last_error, delivered_at=d.delivered_at, redelivery_of=d.redelivery_of,
                       created_at=d.created_at,
                       attempt_log=[AttemptOut.model_validate(a) for a in view.attempts])


@router.post("/webhooks", status_code=201, response_model=WebhookSecretOut, tags=["webhooks"])
def create_webhook(body: WebhookIn, p: Admin) -> WebhookSecretOut:
    """Create a webhook; the response carries its signing secret, which is never shown again."""
    return _secret_out(service.create_webhook(p, url=body.url, event_types=body.event_types,
                                              description=body.description, enabled=body.enabled))


@router.get("/webhooks", response_model=Page[WebhookOut], tags=["webhooks"])
def list_webhooks(p: Admin, page: Pagination, enabled: Annotated[bool | None, Query()] = None) -> Page[WebhookOut]:
    rows, nxt = service.list_webhooks(p, page, enabled)
    return Page[WebhookOut](items=[WebhookOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/webhooks/{webhook_id}", response_model=WebhookOut, tags=["webhooks"])
def get_webhook(webhook_id: str, p: Admin) -> WebhookOut:
    return WebhookOut.model_validate(service.get_webhook(p, webhook_id))


@router.patch("/webhooks/{webhook_id}", response_model=WebhookOut, tags=["webhooks"])
def update_webhook(webhook_id: str, body: WebhookPatch, p: Admin) -> WebhookOut:
    """Change the URL, event types, description or enabled flag (absent or null fields stay)."""
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    return WebhookOut.model_validate(service.update_webhook(p, webhook_id, changes))


@router.delete("/webhooks/{webhook_id}", status_code=204, tags=["webhooks"])
def delete_webhook(webhook_id: str, p: Admin) -> Response:
    service.delete_webhook(p, webhook_id)
    return Response(status_code=204)


@router.post("/webhooks/{webhook_id}/rotate-secret", response_model=WebhookSecretOut, tags=["webhooks"])
def rotate_secret(webhook_id: str, p: Admin) -> WebhookSecretOut:
    """Replace the signing secret (returned once); every delivery from now on, retries included, uses it."""
    return _secret_out(service.rotate_secret(p, webhook_id))


@router.post("/webhooks/{webhook_id}/ping", status_code=202, response_model=DeliveryOut, tags=["webhooks"])
def ping_webhook(webhook_id: str, p: Admin) -> DeliveryOut:
    """Queue a `webhook.ping` event for this webhook only; follow it in the delivery log."""
    delivery = service.ping(p, webhook_id)
    return _delivery_out(service.DeliveryView(delivery, "webhook.ping", []))


@router.get("/webhooks/{webhook_id}/deliveries", response_model=Page[DeliveryOut], tags=["webhooks"])
def list_deliveries(webhook_id: str, p: Admin, page: Pagination,
                    status: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
                    order: Annotated[Order, Query(description="desc (default): newest first")] = "desc",
                    ) -> Page[DeliveryOut]:
    """The delivery log: status, attempts with their times, status codes and errors."""
    views, nxt = service.list_deliveries(p, webhook_id, page, status, descending=order == "desc")
    return Page[DeliveryOut](items=[_delivery_out(v) for v in views], next_cursor=nxt)


@router.get("/webhooks/{webhook_id}/deliveries/{delivery_id}", response_model=DeliveryOut, tags=["webhooks"])
def get_delivery(webhook_id: str, delivery_id: str, p: Admin) -> DeliveryOut:
    return _delivery_out(service.get_delivery(p, webhook_id, delivery_id))


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202,
             response_model=DeliveryOut, tags=["webhooks"])
def redeliver(webhook_id: str, delivery_id: str, p: Admin) -> DeliveryOut:
    """Send the delivery's event again, as a new delivery (`redelivery_of` points at this one)."""
    return _delivery_out(service.redeliver(p, webhook_id, delivery_id))


# --- audit -------------------------------------------------------------------------------------------

class AuditOut(Out):
    id: str
    project_id: str | None
    user_id: str
    username: str
    token_id: str
    method: str
    path: str
    status_code: int
    request_id: str
    created_at: dt.datetime


@router.get("/audit", response_model=Page[AuditOut], tags=["audit"])
def list_audit(p: Admin, page: Pagination,
               user_id: Annotated[ResourceId | None, Query()] = None,
               username: Annotated[str | None, Query(max_length=63, pattern=_TEXT)] = None,
               method: Annotated[str | None, Query(pattern=r"^[A-Za-z]{1,8}$")] = None,
               path_prefix: Annotated[str | None, Query(max_length=512, pattern=_TEXT,
                                                                  description="e.g. /v1/webhooks")] = None,
               since: SinceQ = None, until: UntilQ = None, all_projects: AllProjectsQ = False,
               order: Annotated[Order, Query()] = "asc") -> Page[AuditOut]:
    """Who did what: every authenticated change (non-GET request) with its user, path and status."""
    f = service.audit_filter(p, all_projects=all_projects, user_id=user_id, username=username, method=method,
                             path_prefix=path_prefix, since=as_utc(since), until=as_utc(until))
    rows, nxt = service.list_audit(f, page, descending=order == "desc")
    return Page[AuditOut](items=[AuditOut.model_validate(r) for r in rows], next_cursor=nxt)
