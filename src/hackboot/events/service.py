"""Events, webhooks and the audit log: the rules and transactions.

Emitting events: one row per change, written in the same transaction as the change.
Webhook deliveries are queued in that transaction as well, so an event is never lost
between "resource changed" and "webhook scheduled"; a worker (`webhooks.Sender`) sends
them later, outside any transaction.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, func, or_, select, update
from sqlalchemy.orm import Session

from hackboot.core import audit, errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.crypto import seal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.pagination import PageParams, encode_cursor
from hackboot.core.workers import Loop
from hackboot.events import stream
from hackboot.events.models import AuditRecord, Event, Webhook, WebhookAttempt, WebhookDelivery

SECRET_PREFIX = "whsec_"
_ID_RE = re.compile(r"^[a-z0-9]{1,8}-[a-z0-9]{1,40}$")
RETENTION_BATCH = 1000
RETENTION_INTERVAL_S = 3600.0


# --- emitting ----------------------------------------------------------------------------------------

def _matches(event_type: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


def emit(session: Session, type: str, *, resource_type: str, resource_id: str, project_id: str | None,
         actor: str = "system", data: dict[str, Any] | None = None) -> Event:
    event = Event(id=new_id("evt"), type=type, resource_type=resource_type, resource_id=resource_id,
                  project_id=project_id, actor=actor, data=data or {})
    session.add(event)
    if project_id is not None:
        hooks = session.scalars(select(Webhook).where(Webhook.project_id == project_id, Webhook.enabled))
        for hook in hooks:
            if _matches(type, hook.event_types):
                session.add(WebhookDelivery(id=new_id("whd"), webhook_id=hook.id, project_id=project_id,
                                            event_id=event.id))
    return event


# --- the audit log's sink ----------------------------------------------------------------------------

class AuditLog:
    """Writes core's audit entries (`hackboot.core.audit`) to `audit_log`, in the caller's transaction."""

    def add(self, session: Session, entry: audit.AuditEntry) -> None:
        session.add(AuditRecord(id=entry.id, project_id=entry.project_id, user_id=entry.user_id,
                                username=entry.username, token_id=entry.token_id, method=entry.method,
                                path=entry.path, status_code=entry.status_code, request_id=entry.request_id))

    def set_status(self, session: Session, entry_id: str, status_code: int) -> None:
        session.execute(update(AuditRecord).where(AuditRecord.id == entry_id).values(status_code=status_code))


audit.register_sink(AuditLog())


# --- listing helpers ---------------------------------------------------------------------------------

def glob_condition(column: Any, pattern: str) -> ColumnElement[bool]:
    """`*` and `?` globs as SQL LIKE (with `%`, `_` and `\\` taken literally)."""
    if "*" not in pattern and "?" not in pattern:
        return column == pattern  # type: ignore[no-any-return]
    like = (pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            .replace("*", "%").replace("?", "_"))
    return column.like(like, escape="\\")  # type: ignore[no-any-return]


def prefix_condition(column: Any, prefix: str) -> ColumnElement[bool]:
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return column.like(like, escape="\\")  # type: ignore[no-any-return]


def keyset(session: Session, stmt: Select[Any], column: Any, page: PageParams, *, descending: bool = False,
           integer: bool = False) -> tuple[list[Any], str | None]:
    """Keyset pagination on `column` in either direction; the cursor is the last key of the page."""
    after_raw = page.after_id()
    if after_raw is not None:
        after: Any = after_raw
        if integer:
            try:
                after = int(after_raw)
                if not 0 <= after < 2**63:
                    raise ValueError(after)
            except ValueError:
                raise errors.BadRequest("Invalid pagination cursor: pass back next_cursor unchanged",
                                        code="invalid_cursor") from None
        elif not _ID_RE.match(after):
            raise errors.BadRequest("Invalid pagination cursor: pass back next_cursor unchanged",
                                    code="invalid_cursor")
        stmt = stmt.where(column < after if descending else column > after)
    stmt = stmt.order_by(column.desc() if descending else column.asc()).limit(page.limit + 1)
    rows = list(session.scalars(stmt))
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        return rows, encode_cursor(str(getattr(rows[-1], column.key)))
    return rows, None


# --- events ------------------------------------------------------------------------------------------

@dataclass
class EventFilter:
    """Which events a caller sees: one project (or all, for superusers) narrowed by filters."""

    project_id: str | None  # None with all_projects: every project and platform events
    all_projects: bool = False
    types: list[str] = field(default_factory=list)
    resource_type: str | None = None
    resource_id: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        if not self.all_projects:
            stmt = stmt.where(Event.project_id == self.project_id)
        if self.types:
            stmt = stmt.where(or_(*[glob_condition(Event.type, t) for t in self.types]))
        if self.resource_type:
            stmt = stmt.where(Event.resource_type == self.resource_type)
        if self.resource_id:
            stmt = stmt.where(Event.resource_id == self.resource_id)
        if self.since is not None:
            stmt = stmt.where(Event.created_at >= self.since)
        if self.until is not None:
            stmt = stmt.where(Event.created_at < self.until)
        return stmt


def event_filter(p: Principal, *, all_projects: bool, **filters: Any) -> EventFilter:
    if all_projects:
        if not p.is_superuser:
            raise errors.Forbidden("Only cloud administrators (superusers) may list every project's events")
        return EventFilter(project_id=None, all_projects=True, **filters)
    return EventFilter(project_id=p.project, **filters)


def list_events(f: EventFilter, page: PageParams, descending: bool = False) -> tuple[list[Event], str | None]:
    with session_scope(write=False) as s:
        return keyset(s, f.apply(select(Event)), Event.seq, page, descending=descending, integer=True)


def get_event(f: EventFilter, event_id: str) -> Event:
    if not _ID_RE.match(event_id):
        raise errors.NotFound(f"Event {event_id[:64]!r} not found")
    with session_scope(write=False) as s:
        event: Event | None = s.scalar(f.apply(select(Event)).where(Event.id == event_id))
        if event is None:
            raise errors.NotFound(f"Event {event_id} not found")
        return event


def stream_start(f: EventFilter, after: int | None) -> int:
    """Where a new follower starts: after `after`, else at `since`, else at the newest event."""
    if after is not None:
        return after
    with session_scope(write=False) as s:
        if f.since is not None:
            first = s.scalar(select(func.min(Event.seq)).where(Event.created_at >= f.since))
            if first is not None:
                return int(first) - 1
        return int(s.scalar(select(func.max(Event.seq))) or 0)


def poll_events(f: EventFilter, cursor: int, limit: int = 500) -> tuple[list[Event], int, bool]:
    """Events after `cursor` that are safe to send (see `stream`); the new cursor; more waiting?"""
    with session_scope(write=False) as s:
        rows = [(int(seq), created) for seq, created in s.execute(
            select(Event.seq, Event.created_at).where(Event.seq > cursor).order_by(Event.seq).limit(limit))]
        mark = stream.safe_watermark(cursor, rows, utcnow())
        if mark <= cursor:
            return [], cursor, False
        events = list(s.scalars(f.apply(select(Event)).where(Event.seq > cursor, Event.seq <= mark)
                                .order_by(Event.seq)))
        return events, mark, len(rows) == limit and mark == rows[-1][0]


# --- webhooks ----------------------------------------------------------------------------------------

@dataclass
class CreatedWebhook:
    webhook: Webhook
    secret: str  # shown once


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _seal_secret(webhook_id: str, secret: str) -> str:
    return seal(secret.encode(), webhook_id.encode())


def _webhook(s: Session, p: Principal, webhook_id: str) -> Webhook:
    hook = s.get(Webhook, webhook_id) if _ID_RE.match(webhook_id) else None
    if hook is None or hook.project_id != p.project:
        raise errors.NotFound(f"Webhook {webhook_id} not found")
    return hook


def get_webhook(p: Principal, webhook_id: str) -> Webhook:
    with session_scope(write=False) as s:
        return _webhook(s, p, webhook_id)


def list_webhooks(p: Principal, page: PageParams, enabled: bool | None) -> tuple[list[Webhook], str | None]:
    stmt = select(Webhook).where(Webhook.project_id == p.project)
    if enabled is not None:
        stmt = stmt.where(Webhook.enabled == enabled)
    with session_scope(write=False) as s:
        return keyset(s, stmt, Webhook.id, page)


def create_webhook(p: Principal, *, url: str, event_types: list[str], description: str,
                   enabled: bool) -> CreatedWebhook:
    project_id = p.project
    secret = _new_secret()
    with session_scope() as s:
        quotas.claim(s, project_id, "webhooks", 1)
        hook = Webhook(id=new_id("wh"), project_id=project_id, url=url, event_types=event_types,
                       description=description, enabled=enabled, secret_sealed="")
        hook.secret_sealed = _seal_secret(hook.id, secret)
        # Emitted before the webhook exists: the project's other webhooks hear of it, not itself.
        emit(s, "webhook.created", resource_type="webhook", resource_id=hook.id, project_id=project_id,
             actor=p.user_id, data={"event_types": event_types, "enabled": enabled})
        s.add(hook)
        s.flush()
        return CreatedWebhook(webhook=hook, secret=secret)


def update_webhook(p: Principal, webhook_id: str, changes: dict[str, Any]) -> Webhook:
    with session_scope() as s:
        hook = _webhook(s, p, webhook_id)
        changed = {k: v for k, v in changes.items() if getattr(hook, k) != v}
        for key, value in changed.items():
            setattr(hook, key, value)
        if changed:
            emit(s, "webhook.updated", resource_type="webhook", resource_id=hook.id, project_id=hook.project_id,
                 actor=p.user_id, data={"changed": sorted(changed)})
        return hook


def delete_webhook(p: Principal, webhook_id: str) -> None:
    with session_scope() as s:
        hook = _webhook(s, p, webhook_id)
        s.delete(hook)  # deliveries and their attempts go with it (ON DELETE CASCADE)
        s.flush()
        quotas.release(s, hook.project_id, "webhooks", 1)
        emit(s, "webhook.deleted", resource_type="webhook", resource_id=hook.id, project_id=hook.project_id,
             actor=p.user_id)


def rotate_secret(p: Principal, webhook_id: str) -> CreatedWebhook:
    secret = _new_secret()
    with session_scope() as s:
        hook = _webhook(s, p, webhook_id)
        hook.secret_sealed = _seal_secret(hook.id, secret)
        emit(s, "webhook.secret_rotated", resource_type="webhook", resource_id=hook.id,
             project_id=hook.project_id, actor=p.user_id)
        return CreatedWebhook(webhook=hook, secret=secret)


def ping(p: Principal, webhook_id: str) -> WebhookDelivery:
    """Queue a `webhook.ping` event for this webhook only, whatever its event_types."""
    with session_scope() as s:
        hook = _webhook(s, p, webhook_id)
        if not hook.enabled:
            raise errors.Conflict(f"Webhook {webhook_id} is disabled: enable it before pinging it",
                                  code="webhook_disabled")
        # Written directly rather than through emit(): other webhooks of the project must not get it.
        event = Event(id=new_id("evt"), type="webhook.ping", resource_type="webhook", resource_id=hook.id,
                      project_id=hook.project_id, actor=p.user_id,
                      data={"webhook_id": hook.id, "event_types": hook.event_types})  # no URL: viewers see events
        delivery = WebhookDelivery(id=new_id("whd"), webhook_id=hook.id, project_id=hook.project_id,
                                   event_id=event.id)
        s.add_all([event, delivery])
        s.flush()
        return delivery


def delivery_query(p: Principal, webhook_id: str, status: str | None) -> Select[Any]:
    stmt = select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id,
                                         WebhookDelivery.project_id == p.project)
    if status:
        stmt = stmt.where(WebhookDelivery.status == status)
    return stmt


@dataclass
class DeliveryView:
    delivery: WebhookDelivery
    event_type: str | None
    attempts: list[WebhookAttempt]


def _views(s: Session, deliveries: list[WebhookDelivery]) -> list[DeliveryView]:
    ids = [d.id for d in deliveries]
    event_ids = list({d.event_id for d in deliveries})
    types = dict(s.execute(select(Event.id, Event.type).where(Event.id.in_(event_ids))).tuples().all()) \
        if event_ids else {}
    attempts: dict[str, list[WebhookAttempt]] = {i: [] for i in ids}
    if ids:
        for a in s.scalars(select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids))
                           .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)):
            attempts[a.delivery_id].append(a)
    return [DeliveryView(d, types.get(d.event_id), attempts[d.id]) for d in deliveries]


def list_deliveries(p: Principal, webhook_id: str, page: PageParams, status: str | None,
                    descending: bool) -> tuple[list[DeliveryView], str | None]:
    with session_scope(write=False) as s:
        _webhook(s, p, webhook_id)
        rows, nxt = keyset(s, delivery_query(p, webhook_id, status), WebhookDelivery.id, page,
                           descending=descending)
        return _views(s, rows), nxt


def _delivery(s: Session, p: Principal, webhook_id: str, delivery_id: str) -> WebhookDelivery:
    _webhook(s, p, webhook_id)
    d = s.get(WebhookDelivery, delivery_id) if _ID_RE.match(delivery_id) else None
    if d is None or d.webhook_id != webhook_id or d.project_id != p.project:
        raise errors.NotFound(f"Delivery {delivery_id} of webhook {webhook_id} not found")
    return d


def get_delivery(p: Principal, webhook_id: str, delivery_id: str) -> DeliveryView:
    with session_scope(write=False) as s:
        return _views(s, [_delivery(s, p, webhook_id, delivery_id)])[0]


def redeliver(p: Principal, webhook_id: str, delivery_id: str) -> DeliveryView:
    """Queue a new delivery of the same event (receivers de-duplicate on the event id)."""
    with session_scope() as s:
        original = _delivery(s, p, webhook_id, delivery_id)
        if original.status == "pending":
            raise errors.Conflict(f"Delivery {delivery_id} is still pending: it will be retried",
                                  code="delivery_pending")
        if s.scalar(select(Event.seq).where(Event.id == original.event_id)) is None:
            raise errors.Conflict(f"The event of delivery {delivery_id} was pruned by retention",
                                  code="event_pruned")
        copy = WebhookDelivery(id=new_id("whd"), webhook_id=webhook_id, project_id=original.project_id,
                               event_id=original.event_id, redelivery_of=original.id)
        s.add(copy)
        s.flush()
        return _views(s, [copy])[0]


# --- audit -------------------------------------------------------------------------------------------

@dataclass
class AuditFilter:
    project_id: str | None
    all_projects: bool = False
    user_id: str | None = None
    username: str | None = None
    method: str | None = None
    path_prefix: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        if not self.all_projects:
            stmt = stmt.where(AuditRecord.project_id == self.project_id)
        if self.user_id:
            stmt = stmt.where(AuditRecord.user_id == self.user_id)
        if self.username:
            stmt = stmt.where(AuditRecord.username == self.username)
        if self.method:
            stmt = stmt.where(AuditRecord.method == self.method.upper())
        if self.path_prefix:
            stmt = stmt.where(prefix_condition(AuditRecord.path, self.path_prefix))
        if self.since is not None:
            stmt = stmt.where(AuditRecord.created_at >= self.since)
        if self.until is not None:
            stmt = stmt.where(AuditRecord.created_at < self.until)
        return stmt


def audit_filter(p: Principal, *, all_projects: bool, **filters: Any) -> AuditFilter:
    if all_projects:
        if not p.is_superuser:
            raise errors.Forbidden("Only cloud administrators (superusers) may read every project's audit log")
        return AuditFilter(project_id=None, all_projects=True, **filters)
    return AuditFilter(project_id=p.project, **filters)


def list_audit(f: AuditFilter, page: PageParams, descending: bool) -> tuple[list[AuditRecord], str | None]:
    with session_scope(write=False) as s:
        return keyset(s, f.apply(select(AuditRecord)), AuditRecord.id, page, descending=descending)


# --- retention ---------------------------------------------------------------------------------------

def prune(now: dt.datetime | None = None) -> dict[str, int]:
    """Delete events, webhook deliveries (with their attempts) and audit records past retention.

    Works from the oldest rows by primary key (time-ordered), in small transactions, so it reads
    only what it deletes plus one batch and never holds the SQLite write lock for long.
    """
    days = get_settings().events_retention_days
    if days <= 0:
        return {}
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    counts: dict[str, int] = {}
    for name, model, key in (("events", Event, Event.seq), ("webhook_deliveries", WebhookDelivery,
                                                            WebhookDelivery.id),
                             ("audit_log", AuditRecord, AuditRecord.id)):
        total = 0
        while True:
            with session_scope() as s:
                rows = s.execute(select(key, model.created_at).order_by(key).limit(RETENTION_BATCH)).all()
                old = [k for k, created in rows if created < cutoff]
                if old:
                    s.execute(delete(model).where(key.in_(old)))
            total += len(old)
            if len(old) < RETENTION_BATCH:
                break
        counts[name] = total
    return counts


# --- background loops --------------------------------------------------------------------------------

def loops() -> list[Loop]:
    from hackboot.events.webhooks import Sender

    sender = Sender()
    return [Loop("webhook-sender", sender.step, get_settings().webhook_poll_interval_s),
            Loop("events-retention", prune, RETENTION_INTERVAL_S)]
