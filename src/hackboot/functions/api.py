"""HTTP for functions (code, versions, aliases, triggers, invocation records and logs) and queues."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Query, Request, Response
from pydantic import Field, StringConstraints
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy.orm import Session

from hackboot.core import errors
from hackboot.core.auth import Member, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Description, Name, Out, Timestamp, as_utc, omitted, patch_changes
from hackboot.functions import queues, service
from hackboot.functions.models import (
    LATEST,
    Function,
    FunctionAlias,
    FunctionTrigger,
    FunctionVersion,
    Invocation,
    Queue,
)

router = APIRouter(prefix="/v1", tags=["functions"])

Runtime = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9.]{1,31}$", max_length=32)]
Handler = Annotated[str, StringConstraints(min_length=3, max_length=128)]
Qualifier = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^(\$LATEST|[A-Za-z0-9][A-Za-z0-9._-]{0,62})$",
                                 description="$LATEST, a version number or an alias name")]
Ref = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                           description="An id, or a name")]
Vars = Annotated[dict[Annotated[str, StringConstraints(max_length=128)], Annotated[str, StringConstraints(
    max_length=4096)]], Field(max_length=100)]
ObjectEvent = Literal["created", "deleted"]
Outcome = Literal["ok", "error", "timeout", "out_of_memory", "crashed", "throttled"]
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PROBLEM: dict[str, Any] = {"application/problem+json": {}}




# --- functions ----------------------------------------------------------------------------------------

class FunctionIn(Body):
    name: Name
    runtime: Runtime = Field(description="python3.11, nodejs20, … (what the hosts provide)")
    handler: Handler = Field(description='python: "module.function"; nodejs: "file.export"')
    memory_mb: int = Field(128, description="128 to 4096, a multiple of 64")
    timeout_s: int = Field(3, description="1 to 900")
    environment: Vars = Field(default_factory=dict, description="At most 4 KiB of names and values")
    secrets: Vars = Field(default_factory=dict, description="Stored sealed, given to the function as "
                                                            "environment variables, never returned")
    network_egress: bool = Field(False, description="Let the function reach the network")
    reserved_concurrency: int = Field(0, ge=0, description="Counted against the project's function_concurrency")
    max_concurrency: int = Field(10, ge=1, description="Invocations at once; more are answered 429")
    description: Description = ""
    dead_letter_queue: Ref | None = Field(None, description="A queue of the project (id or name) receiving the "
                                                            "events of asynchronous invocations that failed "
                                                            "every attempt")


class FunctionPatch(Body):
    """Fields left out are unchanged; none may be null. `environment` and `secrets` replace the whole set."""

    name: Name | SkipJsonSchema[None] = omitted()
    runtime: Runtime | SkipJsonSchema[None] = omitted()
    handler: Handler | SkipJsonSchema[None] = omitted()
    memory_mb: int | SkipJsonSchema[None] = omitted()
    timeout_s: int | SkipJsonSchema[None] = omitted()
    environment: Vars | SkipJsonSchema[None] = omitted()
    secrets: Vars | SkipJsonSchema[None] = omitted()
    network_egress: bool | SkipJsonSchema[None] = omitted()
    reserved_concurrency: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = omitted()
    max_concurrency: Annotated[int, Field(ge=1)] | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()
    dead_letter_queue: Annotated[str, StringConstraints(max_length=63)] | SkipJsonSchema[None] = omitted()


class FunctionOut(Out):
    id: str
    name: str
    description: str
    runtime: str
    handler: str
    memory_mb: int
    timeout_s: int
    environment: dict[str, str]
    secret_names: list[str] = Field(description="The secrets' names (their values are never returned)")
    network_egress: bool
    reserved_concurrency: int
    max_concurrency: int
    dead_letter_queue_id: str | None = None
    code_sha256: str = Field(description="sha256 of the stored package; empty until code is uploaded")
    code_size: int
    last_version: int = Field(description="The newest published version (0: none)")
    created_at: dt.datetime
    updated_at: dt.datetime


@router.post("/functions", status_code=201, response_model=FunctionOut)
def create_function(body: FunctionIn, p: Member, response: Response) -> FunctionOut:
    """A function ($LATEST) without code: upload it with PUT /v1/functions/{ref}/code."""
    fn = service.create_function(p, **body.model_dump())
    response.headers["Location"] = f"/v1/functions/{fn.id}"
    return FunctionOut.model_validate(fn)


@router.get("/functions", response_model=Page[FunctionOut])
def list_functions(p: Viewer, page: Pagination, name: Annotated[Name | None, Query()] = None,
                   runtime: Annotated[Runtime | None, Query()] = None) -> Page[FunctionOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.function_query(p, name=name, runtime=runtime), Function.id, page)
        return Page[FunctionOut](items=[FunctionOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/functions/{ref}", response_model=FunctionOut)
def get_function(ref: str, p: Viewer) -> FunctionOut:
    with session_scope(write=False) as s:
        return FunctionOut.model_validate(service.get_function(s, p, ref))


@router.patch("/functions/{ref}", response_model=FunctionOut)
def update_function(ref: str, body: FunctionPatch, p: Member) -> FunctionOut:
    return FunctionOut.model_validate(service.update_function(p, ref, patch_changes(body)))


@router.delete("/functions/{ref}", status_code=204)
def delete_function(ref: str, p: Member) -> Response:
    """The function with its versions, aliases and triggers."""
    service.delete_function(p, ref)
    return Response(status_code=204)


@router.put(
    "/functions/{ref}/code", response_model=FunctionOut,
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/zip": _BINARY, "application/octet-stream": _BINARY}}},
    responses={413: {"description": "Over 50 MiB", "content": _PROBLEM}},
)
async def upload_code(
    ref: str, request: Request, p: Member,
    filename: Annotated[str | None, Query(max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
                                          description="The file's name, for a single-file (non-zip) body")] = None,
) -> FunctionOut:
    """The code of $LATEST: a zip (`application/zip`), or a single source file (any other type) stored as
    `filename`. Checked (paths, links, sizes) before it replaces the current code."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > service.MAX_CODE_BYTES:
        raise errors.PayloadTooLarge(f"A code package is at most {service.MAX_CODE_BYTES} bytes")
    buffer = bytearray()
    async for chunk in request.stream():
        buffer += chunk
        if len(buffer) > service.MAX_CODE_BYTES:
            raise errors.PayloadTooLarge(f"A code package is at most {service.MAX_CODE_BYTES} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_zip_type = ctype in ("application/zip", "application/x-zip-compressed")
    if not is_zip_type and filename is None and not bytes(buffer[:4]).startswith(b"PK"):
        raise errors.ValidationFailed("A single-file upload needs the filename query parameter",
                                      errors=[{"loc": ["query", "filename"], "msg": "required for a single file"}])
    fn = await anyio.to_thread.run_sync(lambda: service.upload_code(p, ref, bytes(buffer), filename=filename))
    return FunctionOut.model_validate(fn)


# --- versions -----------------------------------------------------------------------------------------

class VersionIn(Body):
    description: Description = ""


class VersionOut(Out):
    id: str
    function_id: str
    number: int
    description: str
    runtime: str
    handler: str
    memory_mb: int
    timeout_s: int
    environment: dict[str, str]
    secret_names: list[str]
    network_egress: bool
    code_sha256: str
    code_size: int
    created_at: dt.datetime


@router.post("/functions/{ref}/versions", status_code=201, response_model=VersionOut)
def publish_version(ref: str, body: VersionIn, p: Member) -> VersionOut:
    """Freeze the current code and configuration ($LATEST) as the next version (1, 2, …)."""
    return VersionOut.model_validate(service.publish_version(p, ref, description=body.description))


@router.get("/functions/{ref}/versions", response_model=Page[VersionOut])
def list_versions(ref: str, p: Viewer, page: Pagination) -> Page[VersionOut]:
    with session_scope(write=False) as s:
        fn = service.get_function(s, p, ref)
        rows, nxt = paginate(s, service.version_query(fn), FunctionVersion.id, page)
        return Page[VersionOut](items=[VersionOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/functions/{ref}/versions/{number}", response_model=VersionOut)
def get_version(ref: str, number: int, p: Viewer) -> VersionOut:
    with session_scope(write=False) as s:
        return VersionOut.model_validate(service.get_version(s, service.get_function(s, p, ref), number))


# --- aliases ------------------------------------------------------------------------------------------

class AliasIn(Body):
    name: Name
    version: int = Field(ge=1)
    additional_version: int | None = Field(None, ge=1, description="A second version for a canary")
    weight: float = Field(0.0, ge=0.0, le=1.0, description="The share of additional_version")
    description: Description = ""


class AliasPut(Body):
    version: int = Field(ge=1)
    additional_version: int | None = Field(None, ge=1)
    weight: float = Field(0.0, ge=0.0, le=1.0)
    description: Description | SkipJsonSchema[None] = omitted()


class AliasOut(Out):
    id: str
    function_id: str
    name: str
    description: str
    version: int
    additional_version: int | None
    weight: float
    created_at: dt.datetime
    updated_at: dt.datetime


@router.post("/functions/{ref}/aliases", status_code=201, response_model=AliasOut)
def create_alias(ref: str, body: AliasIn, p: Member) -> AliasOut:
    with session_scope(write=False) as s:
        fn = service.get_function(s, p, ref)
        if s.query(FunctionAlias.id).filter(FunctionAlias.function_id == fn.id,
                                            FunctionAlias.name == body.name).first() is not None:
            raise errors.Conflict(f"Alias {body.name} exists already: PUT it to change it", code="name_in_use")
    alias, _ = service.set_alias(p, ref, body.name, version=body.version, additional_version=body.additional_version,
                                 weight=body.weight, description=body.description)
    return AliasOut.model_validate(alias)


@router.get("/functions/{ref}/aliases", response_model=Page[AliasOut])
def list_aliases(ref: str, p: Viewer, page: Pagination) -> Page[AliasOut]:
    with session_scope(write=False) as s:
        fn = service.get_function(s, p, ref)
        rows, nxt = paginate(s, service.alias_query(fn), FunctionAlias.id, page)
        return Page[AliasOut](items=[AliasOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/functions/{ref}/aliases/{name}", response_model=AliasOut)
def get_alias(ref: str, name: str, p: Viewer) -> AliasOut:
    with session_scope(write=False) as s:
        return AliasOut.model_validate(service.get_alias(s, service.get_function(s, p, ref), name))


@router.put("/functions/{ref}/aliases/{name}", response_model=AliasOut)
def put_alias(ref: str, name: Name, body: AliasPut, p: Member) -> AliasOut:
    """Create or repoint the alias (a weighted second version for a canary, or none)."""
    alias, _ = service.set_alias(p, ref, name, version=body.version, additional_version=body.additional_version,
                                 weight=body.weight, description=body.description)
    return AliasOut.model_validate(alias)


@router.delete("/functions/{ref}/aliases/{name}", status_code=204)
def delete_alias(ref: str, name: str, p: Member) -> Response:
    service.delete_alias(p, ref, name)
    return Response(status_code=204)


# --- triggers -----------------------------------------------------------------------------------------

class TriggerIn(Body):
    kind: Literal["http", "schedule", "object_storage", "queue"]
    qualifier: Qualifier = LATEST
    enabled: bool = True
    description: Description = ""
    auth: Literal["none", "token"] = Field("none", description="http: 'token' asks for a bearer token (shown "
                                                               "once, in this answer)")
    schedule: Annotated[str, StringConstraints(max_length=256)] = Field(
        "", description="schedule: a cron expression (5 fields, UTC) or rate(5 minutes)")
    bucket: Annotated[str, StringConstraints(max_length=63)] = Field("", description="object_storage: a bucket "
                                                                                     "of the project")
    events: Annotated[list[ObjectEvent], Field(min_length=1, max_length=2)] = Field(
        default_factory=lambda: list[ObjectEvent](["created"]))
    prefix: Annotated[str, StringConstraints(max_length=1024)] = ""
    suffix: Annotated[str, StringConstraints(max_length=1024)] = ""
    queue: Annotated[str, StringConstraints(max_length=63)] = Field("", description="queue: a queue of the "
                                                                                    "project (id or name)")
    batch_size: int = Field(1, description="queue: messages per invocation, 1 to 10")


class TriggerPatch(Body):
    enabled: bool | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()
    qualifier: Qualifier | SkipJsonSchema[None] = omitted()


class TriggerOut(Out):
    id: str
    function_id: str
    kind: str
    qualifier: str
    enabled: bool
    description: str
    auth: str
    url_path: str | None = Field(None, description="http: the path the cloud serves the function on")
    token: str | None = Field(None, description="http with token auth: the token, in the create answer only")
    schedule: str
    next_fire_at: dt.datetime | None
    bucket: str
    events: list[str]
    prefix: str
    suffix: str
    queue_id: str | None
    queue_name: str | None = None
    batch_size: int
    created_at: dt.datetime
    updated_at: dt.datetime


def _triggers(s: Session, rows: list[FunctionTrigger]) -> list[TriggerOut]:
    names = service.queue_names(s, [t.queue_id for t in rows if t.queue_id])
    out = []
    for t in rows:
        item = TriggerOut.model_validate(t)
        if t.kind == "http":
            item.url_path = f"/fn/{t.id}/"
        if t.kind != "object_storage":
            item.events = []
        item.queue_name = names.get(t.queue_id or "")
        out.append(item)
    return out


def _trigger(t: FunctionTrigger) -> TriggerOut:
    with session_scope(write=False) as s:
        return _triggers(s, [t])[0]


@router.post("/functions/{ref}/triggers", status_code=201, response_model=TriggerOut)
def create_trigger(ref: str, body: TriggerIn, p: Member) -> TriggerOut:
    trig, token = service.create_trigger(p, ref, service.TriggerRequest(**body.model_dump()))
    out = _trigger(trig)
    out.token = token
    return out


@router.get("/functions/{ref}/triggers", response_model=Page[TriggerOut])
def list_triggers(ref: str, p: Viewer, page: Pagination,
                  kind: Annotated[Literal["http", "schedule", "object_storage", "queue"] | None, Query()] = None,
                  ) -> Page[TriggerOut]:
    with session_scope(write=False) as s:
        fn = service.get_function(s, p, ref)
        rows, nxt = paginate(s, service.trigger_query(fn, kind=kind), FunctionTrigger.id, page)
        return Page[TriggerOut](items=_triggers(s, rows), next_cursor=nxt)


@router.get("/functions/{ref}/triggers/{trigger_id}", response_model=TriggerOut)
def get_trigger(ref: str, trigger_id: str, p: Viewer) -> TriggerOut:
    with session_scope(write=False) as s:
        return _triggers(s, [service.get_trigger(s, service.get_function(s, p, ref), trigger_id)])[0]


@router.patch("/functions/{ref}/triggers/{trigger_id}", response_model=TriggerOut)
def update_trigger(ref: str, trigger_id: str, body: TriggerPatch, p: Member) -> TriggerOut:
    """Enable or disable it, or point it at another qualifier."""
    return _trigger(service.update_trigger(p, ref, trigger_id, **patch_changes(body)))


@router.delete("/functions/{ref}/triggers/{trigger_id}", status_code=204)
def delete_trigger(ref: str, trigger_id: str, p: Member) -> Response:
    service.delete_trigger(p, ref, trigger_id)
    return Response(status_code=204)


# --- invocation records and logs -------------------------------------------------------------------------

class InvocationOut(Out):
    id: str
    function_id: str
    version: str
    request_id: str
    trigger_kind: str
    outcome: str
    duration_ms: float
    init_ms: float
    cold: bool
    memory_mb: int
    max_memory_mb: float
    billed_gb_s: float
    started_at: dt.datetime
    ended_at: dt.datetime
    error: str


class LogRecordOut(InvocationOut):
    logs: str


class LogsOut(Out):
    items: list[LogRecordOut]
    next_after: str | None = Field(description="Pass back as `after` for the records that follow")


@router.get("/functions/{ref}/invocations", response_model=Page[InvocationOut])
def list_invocations(ref: str, p: Viewer, page: Pagination,
                     since: Annotated[Timestamp | None, Query(description="Started at or after")] = None,
                     outcome: Annotated[Outcome | None, Query()] = None) -> Page[InvocationOut]:
    with session_scope(write=False) as s:
        fn = service.get_function(s, p, ref)
        rows, nxt = paginate(s, service.invocation_query(fn, since=as_utc(since), outcome=outcome), Invocation.id,
                             page)
        return Page[InvocationOut](items=[InvocationOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/functions/{ref}/logs", response_model=LogsOut)
async def get_logs(ref: str, p: Viewer,
                   since: Annotated[Timestamp | None, Query(description="Invocations started at or after")] = None,
                   after: Annotated[str | None, Query(max_length=50, description="next_after of a previous "
                                                                                 "answer")] = None,
                   follow: Annotated[bool, Query(description="Wait (long poll) for new records when none")] = False,
                   wait_s: Annotated[float, Query(ge=0, le=20, description="follow: how long to wait")] = 20.0,
                   limit: Annotated[int, Query(ge=1, le=500)] = 100) -> LogsOut:
    """Each invocation's stdout and stderr, oldest first. `follow` waits up to `wait_s` for a record after
    `after` (or `since`); clients loop with the answer's `next_after`."""
    deadline = anyio.current_time() + (wait_s if follow else 0.0)
    while True:
        rows = await anyio.to_thread.run_sync(
            lambda: service.logs_after(p, ref, since=as_utc(since), after=after, limit=limit))
        if rows or anyio.current_time() >= deadline:
            break
        await anyio.sleep(min(0.5, max(0.0, deadline - anyio.current_time())))
    return LogsOut(items=[LogRecordOut.model_validate(r) for r in rows],
                   next_after=rows[-1].id if rows else after)


# --- queues -------------------------------------------------------------------------------------------

queue_router = APIRouter(prefix="/v1", tags=["queues"])


class QueueIn(Body):
    name: Name
    visibility_timeout_s: int = Field(30, description="0 to 43200")
    max_receives: int | None = Field(None, description="Receives before a message is dead-lettered (or dropped)")
    dead_letter_queue: Ref | None = Field(None, description="A queue of the project (id or name)")
    retention_s: int = Field(4 * 86400, description="60 s to 14 days")
    delay_s: int = Field(0, description="Default delivery delay, 0 to 900")
    description: Description = ""


class QueuePatch(Body):
    visibility_timeout_s: int | SkipJsonSchema[None] = omitted()
    max_receives: int | SkipJsonSchema[None] = omitted()
    dead_letter_queue: Annotated[str, StringConstraints(max_length=63)] | SkipJsonSchema[None] = omitted()
    retention_s: int | SkipJsonSchema[None] = omitted()
    delay_s: int | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()


class QueueOut(Out):
    id: str
    name: str
    description: str
    visibility_timeout_s: int
    max_receives: int | None
    dead_letter_queue_id: str | None
    retention_s: int
    delay_s: int
    messages_visible: int = 0
    messages_in_flight: int = Field(0, description="Received and not deleted yet, or delayed")
    created_at: dt.datetime
    updated_at: dt.datetime


class SendIn(Body):
    # In characters: 65,536 of them are at most 256 KiB of UTF-8, and their JSON form (up to 12 bytes each
    # when escaped) stays under the API's request size limit, so an oversized body is a 422, not a 413.
    body: Annotated[str, StringConstraints(max_length=queues.MAX_BODY_CHARS)] = Field(
        description="At most 65,536 characters (256 KiB of UTF-8)")
    delay_s: int | None = Field(None, ge=0, le=queues.MAX_DELAY_S)
    attributes: Annotated[dict[Annotated[str, StringConstraints(max_length=64)], Annotated[
        str, StringConstraints(max_length=256)]], Field(max_length=10)] = Field(default_factory=dict)


class SentOut(Out):
    message_id: str
    sent_at: dt.datetime
    visible_at: dt.datetime


class ReceiveIn(Body):
    max_messages: int = Field(1, ge=1, le=queues.MAX_BATCH)
    visibility_timeout_s: int | None = Field(None, ge=0, le=queues.MAX_VISIBILITY_S)
    wait_s: float = Field(0.0, ge=0.0, le=queues.MAX_WAIT_S, description="Long poll")


class MessageOut(Out):
    message_id: str
    body: str
    receipt_handle: str
    receive_count: int
    sent_at: dt.datetime
    attributes: dict[str, Any]


class ReceivedOut(Out):
    messages: list[MessageOut]


class VisibilityIn(Body):
    visibility_timeout_s: int = Field(ge=0, le=queues.MAX_VISIBILITY_S)


class VisibilityOut(Out):
    visible_at: dt.datetime


def _queues(s: Session, rows: list[Queue]) -> list[QueueOut]:
    depths = queues.queue_depths(s, [q.id for q in rows])
    out = []
    for q in rows:
        item = QueueOut.model_validate(q)
        item.messages_visible, item.messages_in_flight = depths.get(q.id, (0, 0))
        out.append(item)
    return out


def _queue(q: Queue) -> QueueOut:
    with session_scope(write=False) as s:
        return _queues(s, [q])[0]


@queue_router.post("/queues", status_code=201, response_model=QueueOut)
def create_queue(body: QueueIn, p: Member, response: Response) -> QueueOut:
    q = queues.create_queue(p, **body.model_dump())
    response.headers["Location"] = f"/v1/queues/{q.id}"
    return _queue(q)


@queue_router.get("/queues", response_model=Page[QueueOut])
def list_queues(p: Viewer, page: Pagination, name: Annotated[Name | None, Query()] = None) -> Page[QueueOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, queues.queue_query(p, name=name), Queue.id, page)
        return Page[QueueOut](items=_queues(s, rows), next_cursor=nxt)


@queue_router.get("/queues/{ref}", response_model=QueueOut)
def get_queue(ref: str, p: Viewer) -> QueueOut:
    with session_scope(write=False) as s:
        return _queues(s, [queues.get_queue(s, p, ref)])[0]


@queue_router.patch("/queues/{ref}", response_model=QueueOut)
def update_queue(ref: str, body: QueuePatch, p: Member) -> QueueOut:
    """`dead_letter_queue` "" removes it."""
    return _queue(queues.update_queue(p, ref, patch_changes(body)))


@queue_router.delete("/queues/{ref}", status_code=204)
def delete_queue(ref: str, p: Member) -> Response:
    """409 while a trigger uses it or it is another queue's dead-letter queue."""
    queues.delete_queue(p, ref)
    return Response(status_code=204)


@queue_router.post("/queues/{ref}/messages", status_code=201, response_model=SentOut)
def send_message(ref: str, body: SendIn, p: Member) -> SentOut:
    msg = queues.send(p, ref, body.body, delay_s=body.delay_s, attributes=body.attributes)
    return SentOut(message_id=msg.id, sent_at=msg.sent_at, visible_at=msg.visible_at)


@queue_router.post("/queues/{ref}/messages/receive", response_model=ReceivedOut)
async def receive_messages(ref: str, body: ReceiveIn, p: Member) -> ReceivedOut:
    """Up to max_messages visible messages, hidden from other receivers for the visibility timeout; waits up
    to wait_s for one when none is visible. Delete each one processed with its receipt handle."""
    got = await anyio.to_thread.run_sync(lambda: queues.receive(
        p, ref, max_messages=body.max_messages, visibility_timeout_s=body.visibility_timeout_s, wait_s=body.wait_s))
    return ReceivedOut(messages=[MessageOut(message_id=m.message_id, body=m.body, receipt_handle=m.receipt_handle,
                                            receive_count=m.receive_count, sent_at=m.sent_at,
                                            attributes=m.attributes) for m in got])


@queue_router.delete("/queues/{ref}/receipts/{receipt_handle}", status_code=204)
def delete_message(ref: str, receipt_handle: str, p: Member) -> Response:
    """Delete the received message (404 for a receipt that is no longer current: the message was received
    again, or deleted). Under /receipts, not /messages, so that no handle can be taken for .../receive."""
    queues.delete_message(p, ref, receipt_handle)
    return Response(status_code=204)


@queue_router.post("/queues/{ref}/receipts/{receipt_handle}/visibility", response_model=VisibilityOut)
def change_visibility(ref: str, receipt_handle: str, body: VisibilityIn, p: Member) -> VisibilityOut:
    """Hide a message in flight for visibility_timeout_s more seconds from now (0: visible at once)."""
    return VisibilityOut(visible_at=queues.change_visibility(p, ref, receipt_handle, body.visibility_timeout_s))
