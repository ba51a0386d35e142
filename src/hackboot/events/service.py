"""Emitting events: one row per change, written in the same transaction as the change.

Webhook deliveries are queued in that transaction as well, so an event is never lost
between "resource changed" and "webhook scheduled"; a worker sends them later.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hackboot.core.ids import new_id
from hackboot.events.models import Event, Webhook, WebhookDelivery


def emit(session: Session, type: str, *, resource_type: str, resource_id: str, project_id: str | None,
         actor: str = "system", data: dict[str, Any] | None = None) -> Event:
    event = Event(id=new_id("evt"), type=type, resource_type=resource_type, resource_id=resource_id,
                  project_id=project_id, actor=actor, data=data or {})
    session.add(event)
    if project_id is not None:
        hooks = session.scalars(select(Webhook).where(Webhook.project_id == project_id, Webhook.enabled))
        for hook in hooks:
            if not hook.event_types or any(fnmatch.fnmatchcase(type, p) for p in hook.event_types):
                session.add(WebhookDelivery(id=new_id("whd"), webhook_id=hook.id, project_id=project_id,
                                            event_id=event.id))
    return event
