"""The built-in queue service: queues, messages, receive with a visibility timeout, dead-letter queues.

Atomicity without locks in Python, the same on SQLite and PostgreSQL: a receive first reads a few visible
candidates, then takes each one with a compare-and-swap ``UPDATE … WHERE id = ? AND visible_at <= now AND
receive_count = <read>``; only the receiver whose update changed the row got the message, so two receivers
never hold one message while it is invisible (PostgreSQL re-checks the condition after waiting for a
concurrent update's lock; SQLite serialises writers).

A receipt handle is ``<message id>.<secret>``; only the secret's hash is stored, and each receive replaces it,
so a handle stops working as soon as the message is received again (after its visibility timeout ran out).
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Select, case, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.crypto import hash_token
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.events.service import emit
from hackboot.functions.models import Function, FunctionTrigger, Queue, QueueMessage

MAX_BODY_BYTES = 256 * 1024
MAX_BODY_CHARS = MAX_BODY_BYTES // 4  # characters of up to 4 UTF-8 bytes each
MAX_BATCH = 10
MAX_WAIT_S = 20.0
MAX_VISIBILITY_S = 12 * 3600
MAX_DELAY_S = 900
MIN_RETENTION_S, MAX_RETENTION_S = 60, 14 * 86400
MAX_RECEIVES_LIMIT = 1000
_POLL_S = 0.2


def _invalid(field_name: str, msg: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(msg, errors=[{"loc": ["body", field_name], "msg": msg}])


def get_queue(s: Session, p: Principal, ref: str) -> Queue:
    """By id or name; another project's queue is a 404."""
    stmt = select(Queue).where(Queue.project_id == p.project)
    q = s.scalar(stmt.where(Queue.id == ref)) or s.scalar(stmt.where(Queue.name == ref))
    if q is None:
        raise errors.NotFound(f"Queue {ref[:80]} not found")
    return q


def queue_query(p: Principal, *, name: str | None = None) -> Select[Queue]:
    stmt = select(Queue).where(Queue.project_id == p.project)
    if name:
        stmt = stmt.where(Queue.name == name)
    return stmt


def _event(s: Session, q: Queue, verb: str, actor: str, **data: Any) -> None:
    emit(s, f"queue.{verb}", resource_type="queue", resource_id=q.id, project_id=q.project_id, actor=actor,
         data=data)


def _check_settings(visibility_timeout_s: int, max_receives: int | None, retention_s: int, delay_s: int) -> None:
    if not 0 <= visibility_timeout_s <= MAX_VISIBILITY_S:
        raise _invalid("visibility_timeout_s", f"visibility_timeout_s is 0 to {MAX_VISIBILITY_S}")
    if max_receives is not None and not 1 <= max_receives <= MAX_RECEIVES_LIMIT:
        raise _invalid("max_receives", f"max_receives is 1 to {MAX_RECEIVES_LIMIT}")
    if not MIN_RETENTION_S <= retention_s <= MAX_RETENTION_S:
        raise _invalid("retention_s", f"retention_s is {MIN_RETENTION_S} to {MAX_RETENTION_S}")
    if not 0 <= delay_s <= MAX_DELAY_S:
        raise _invalid("delay_s", f"delay_s is 0 to {MAX_DELAY_S}")


def _dead_letter(s: Session, p: Principal, ref: str | None, own_id: str | None) -> str | None:
    if not ref:
        return None
    dlq = get_queue(s, p, ref)
    if dlq.id == own_id:
        raise _invalid("dead_letter_queue", "A queue is not its own dead-letter queue")
    return dlq.id


def create_queue(p: Principal, *, name: str, visibility_timeout_s: int = 30, max_receives: int | None = None,
                 dead_letter_queue: str | None = None, retention_s: int = 4 * 86400, delay_s: int = 0,
                 description: str = "") -> Queue:
    _check_settings(visibility_timeout_s, max_receives, retention_s, delay_s)
    if dead_letter_queue and max_receives is None:
        raise _invalid("max_receives", "A dead-letter queue needs max_receives")
    with session_scope() as s:
        dlq_id = _dead_letter(s, p, dead_letter_queue, None)
        if s.scalar(select(Queue.id).where(Queue.project_id == p.project, Queue.name == name)):
            raise errors.Conflict(f"A queue is named '{name}' already", code="name_in_use")
        quotas.claim(s, p.project, "queues", 1)
        q = Queue(id=new_id("q"), project_id=p.project, name=name, description=description,
                  visibility_timeout_s=visibility_timeout_s, max_receives=max_receives,
                  dead_letter_queue_id=dlq_id, retention_s=retention_s, delay_s=delay_s, created_by=p.user_id)
        s.add(q)
        try:
            s.flush()
        except IntegrityError:
            raise errors.Conflict(f"A queue is named '{name}' already", code="name_in_use") from None
        _event(s, q, "created", p.user_id, name=name, dead_letter_queue_id=dlq_id, max_receives=max_receives)
    return q


def update_queue(p: Principal, ref: str, changes: dict[str, Any]) -> Queue:
    with session_scope() as s:
        q = get_queue(s, p, ref)
        vt = changes.get("visibility_timeout_s", q.visibility_timeout_s)
        mr = changes.get("max_receives", q.max_receives)
        _check_settings(vt, mr, changes.get("retention_s", q.retention_s), changes.get("delay_s", q.delay_s))
        if "dead_letter_queue" in changes:
            q.dead_letter_queue_id = _dead_letter(s, p, changes.pop("dead_letter_queue") or None, q.id)
        if q.dead_letter_queue_id and mr is None:
            raise _invalid("max_receives", "A dead-letter queue needs max_receives")
        for key in ("visibility_timeout_s", "max_receives", "retention_s", "delay_s", "description"):
            if key in changes:
                setattr(q, key, changes[key])
        q.updated_at = utcnow()
        _event(s, q, "updated", p.user_id, **changes)
    return q


def delete_queue(p: Principal, ref: str) -> Queue:
    """409 while a trigger receives from it or a queue or a function dead-letters into it; its messages go
    with it."""
    with session_scope() as s:
        q = get_queue(s, p, ref)
        users = sorted(s.scalars(select(FunctionTrigger.id).where(FunctionTrigger.queue_id == q.id)))
        if users:
            raise errors.Conflict(f"Queue {q.name} is used by trigger {', '.join(users)}", code="in_use")
        sources = sorted(s.scalars(select(Queue.name).where(Queue.dead_letter_queue_id == q.id)))
        sources += sorted(f"function {name}" for name in s.scalars(
            select(Function.name).where(Function.dead_letter_queue_id == q.id)))
        if sources:
            raise errors.Conflict(f"Queue {q.name} is the dead-letter queue of {', '.join(sources)}",
                                  code="in_use")
        s.execute(delete(QueueMessage).where(QueueMessage.queue_id == q.id))
        s.delete(q)
        quotas.release(s, p.project, "queues", 1)
        _event(s, q, "deleted", p.user_id, name=q.name)
    return q


def queue_depths(s: Session, queue_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Queue id → (messages visible now, messages in flight or delayed)."""
    if not queue_ids:
        return {}
    now = utcnow()
    out: dict[str, tuple[int, int]] = {qid: (0, 0) for qid in queue_ids}
    for qid, visible, total in s.execute(
            select(QueueMessage.queue_id, func.sum(case((QueueMessage.visible_at <= now, 1), else_=0)),
                   func.count()).where(QueueMessage.queue_id.in_(queue_ids)).group_by(QueueMessage.queue_id)):
        out[qid] = (int(visible or 0), int(total) - int(visible or 0))
    return out


# --- messages ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Received:
    message_id: str
    body: str
    receipt_handle: str
    receive_count: int
    sent_at: dt.datetime
    attributes: dict[str, Any]


def send(p: Principal, ref: str, body: str, *, delay_s: int | None = None,
         attributes: dict[str, Any] | None = None) -> QueueMessage:
    with session_scope(write=False) as s:
        queue_id = get_queue(s, p, ref).id
    return send_by_id(queue_id, body, delay_s=delay_s, attributes=attributes)


def send_by_id(queue_id: str, body: str | bytes, *, delay_s: int | None = None,
               attributes: dict[str, Any] | None = None) -> QueueMessage:
    """Send to a queue by id (the invoker's dead-lettering of failed asynchronous invocations; no tenant
    check). Bytes are decoded as UTF-8 (invalid sequences replaced)."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if len(body) > MAX_BODY_CHARS or len(body.encode()) > MAX_BODY_BYTES:
        raise _invalid("body", f"A message body is at most {MAX_BODY_CHARS} characters ({MAX_BODY_BYTES} bytes)")
    with session_scope() as s:
        q = s.get(Queue, queue_id)
        if q is None:
            raise errors.NotFound(f"Queue {queue_id} not found")
        delay = q.delay_s if delay_s is None else delay_s
        if not 0 <= delay <= MAX_DELAY_S:
            raise _invalid("delay_s", f"delay_s is 0 to {MAX_DELAY_S}")
        now = utcnow()
        msg = QueueMessage(id=new_id("msg"), queue_id=q.id, body=body, attributes=attributes or {}, sent_at=now,
                           visible_at=now + dt.timedelta(seconds=delay))
        s.add(msg)
    return msg


def _receipt(message_id: str) -> tuple[str, str]:
    secret = secrets.token_urlsafe(24)
    return f"{message_id}.{secret}", hash_token(secret)


def _parse_receipt(handle: str) -> tuple[str, str]:
    message_id, dot, secret = handle.partition(".")
    if not dot or not message_id or not secret or len(handle) > 200:
        raise errors.NotFound("Receipt handle not valid (the message was received again, or deleted)")
    return message_id, hash_token(secret)


def _receive_once(queue_id: str, n: int, visibility_s: int) -> list[Received]:
    """One non-blocking pass: claim up to `n` visible messages (moving those past max_receives away)."""
    now = utcnow()
    with session_scope(write=False) as s:
        q = s.get(Queue, queue_id)
        if q is None:
            raise errors.NotFound(f"Queue {queue_id} not found")
        max_receives, dlq_id, project_id, name = q.max_receives, q.dead_letter_queue_id, q.project_id, q.name
        candidates = s.execute(select(QueueMessage.id, QueueMessage.receive_count)
                               .where(QueueMessage.queue_id == queue_id, QueueMessage.visible_at <= now)
                               .order_by(QueueMessage.visible_at, QueueMessage.id).limit(n * 3)).all()
    got: list[Received] = []
    for message_id, count in candidates:
        if len(got) >= n:
            break
        with session_scope() as s:
            if max_receives is not None and count >= max_receives:
                _dead_letter_move(s, queue_id, name, project_id, dlq_id, message_id, count, now)
                continue
            handle, digest = _receipt(message_id)
            result = cast("CursorResult[Any]", s.execute(
                update(QueueMessage).where(QueueMessage.id == message_id, QueueMessage.queue_id == queue_id,
                                           QueueMessage.visible_at <= now, QueueMessage.receive_count == count)
                .values(visible_at=now + dt.timedelta(seconds=visibility_s), receive_count=count + 1,
                        receipt_hash=digest,
                        first_received_at=func.coalesce(QueueMessage.first_received_at, now))))
            if result.rowcount != 1:
                continue  # another receiver took it
            msg = s.get(QueueMessage, message_id)
            assert msg is not None
            got.append(Received(msg.id, msg.body, handle, count + 1, msg.sent_at, dict(msg.attributes)))
    return got


def _dead_letter_move(s: Session, queue_id: str, name: str, project_id: str, dlq_id: str | None,
                      message_id: str, count: int, now: dt.datetime) -> None:
    """Move (or drop, without a dead-letter queue) a message received max_receives times, if still there."""
    msg = s.scalar(select(QueueMessage).where(QueueMessage.id == message_id, QueueMessage.queue_id == queue_id,
                                              QueueMessage.visible_at <= now, QueueMessage.receive_count == count))
    if msg is None:
        return
    result = cast("CursorResult[Any]", s.execute(
        delete(QueueMessage).where(QueueMessage.id == message_id, QueueMessage.receive_count == count,
                                   QueueMessage.visible_at <= now)))
    if result.rowcount != 1:
        return
    if dlq_id is not None:
        s.add(QueueMessage(id=new_id("msg"), queue_id=dlq_id, body=msg.body, attributes=dict(msg.attributes),
                           sent_at=now, visible_at=now, source_queue_id=queue_id))
        emit(s, "queue.message_dead_lettered", resource_type="queue", resource_id=queue_id,
             project_id=project_id, data={"message_id": message_id, "receive_count": count,
                                          "dead_letter_queue_id": dlq_id})
    else:
        emit(s, "queue.message_dropped", resource_type="queue", resource_id=queue_id, project_id=project_id,
             data={"message_id": message_id, "receive_count": count, "queue": name,
                   "reason": "max_receives reached and no dead-letter queue"})


def receive_by_id(queue_id: str, *, max_messages: int = 1, visibility_timeout_s: int | None = None,
                  wait_s: float = 0.0) -> list[Received]:
    """Receive from a queue by id (the invoker's queue triggers; no tenant check): see :func:`receive`."""
    if not 1 <= max_messages <= MAX_BATCH:
        raise _invalid("max_messages", f"max_messages is 1 to {MAX_BATCH}")
    if not 0 <= wait_s <= MAX_WAIT_S:
        raise _invalid("wait_s", f"wait_s is 0 to {MAX_WAIT_S:.0f}")
    if visibility_timeout_s is not None and not 0 <= visibility_timeout_s <= MAX_VISIBILITY_S:
        raise _invalid("visibility_timeout_s", f"visibility_timeout_s is 0 to {MAX_VISIBILITY_S}")
    with session_scope(write=False) as s:
        q = s.get(Queue, queue_id)
        if q is None:
            raise errors.NotFound(f"Queue {queue_id} not found")
        vt = q.visibility_timeout_s if visibility_timeout_s is None else visibility_timeout_s
    deadline = time.monotonic() + wait_s
    while True:
        got = _receive_once(queue_id, max_messages, vt)
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))


def receive(p: Principal, ref: str, *, max_messages: int = 1, visibility_timeout_s: int | None = None,
            wait_s: float = 0.0) -> list[Received]:
    """Up to `max_messages` (1-10) visible messages, each invisible to others for the visibility timeout
    (the queue's, or `visibility_timeout_s`); long poll up to `wait_s` (≤ 20 s) while none is visible.
    A message already received max_receives times goes to the dead-letter queue (or is dropped with an
    event ``queue.message_dropped``) instead of being delivered again."""
    with session_scope(write=False) as s:
        queue_id = get_queue(s, p, ref).id
    return receive_by_id(queue_id, max_messages=max_messages, visibility_timeout_s=visibility_timeout_s,
                         wait_s=wait_s)


def delete_message_by_id(queue_id: str, receipt_handle: str) -> None:
    message_id, digest = _parse_receipt(receipt_handle)
    with session_scope() as s:
        result = cast("CursorResult[Any]", s.execute(
            delete(QueueMessage).where(QueueMessage.id == message_id, QueueMessage.queue_id == queue_id,
                                       QueueMessage.receipt_hash == digest)))
        if result.rowcount != 1:
            raise errors.NotFound("Receipt handle not valid (the message was received again, or deleted)")


def delete_message(p: Principal, ref: str, receipt_handle: str) -> None:
    """Delete a received message with its current receipt handle (404 for a stale or unknown one)."""
    with session_scope(write=False) as s:
        queue_id = get_queue(s, p, ref).id
    delete_message_by_id(queue_id, receipt_handle)


def change_visibility_by_id(queue_id: str, receipt_handle: str, visibility_timeout_s: int) -> dt.datetime:
    if not 0 <= visibility_timeout_s <= MAX_VISIBILITY_S:
        raise _invalid("visibility_timeout_s", f"visibility_timeout_s is 0 to {MAX_VISIBILITY_S}")
    message_id, digest = _parse_receipt(receipt_handle)
    now = utcnow()
    visible_at = now + dt.timedelta(seconds=visibility_timeout_s)
    with session_scope() as s:
        # Only while the message is still in flight under this receipt: once visible again, another
        # receiver may take it at any moment, and the receipt holder no longer owns it.
        result = cast("CursorResult[Any]", s.execute(
            update(QueueMessage).where(QueueMessage.id == message_id, QueueMessage.queue_id == queue_id,
                                       QueueMessage.receipt_hash == digest, QueueMessage.visible_at > now)
            .values(visible_at=visible_at)))
        if result.rowcount != 1:
            raise errors.NotFound("Receipt handle not valid (the message's visibility timeout ran out, it was "
                                  "received again, or deleted)")
    return visible_at


def change_visibility(p: Principal, ref: str, receipt_handle: str, visibility_timeout_s: int) -> dt.datetime:
    with session_scope(write=False) as s:
        queue_id = get_queue(s, p, ref).id
    return change_visibility_by_id(queue_id, receipt_handle, visibility_timeout_s)


def purge_expired(now: dt.datetime | None = None) -> int:
    """Drop messages older than their queue's retention."""
    now = now or utcnow()
    removed = 0
    with session_scope(write=False) as s:
        retention = [(row[0], row[1]) for row in s.execute(select(Queue.id, Queue.retention_s))]
    for queue_id, retention_s in retention:
        with session_scope() as s:
            result = cast("CursorResult[Any]", s.execute(
                delete(QueueMessage).where(QueueMessage.queue_id == queue_id,
                                           QueueMessage.sent_at < now - dt.timedelta(seconds=retention_s))))
            removed += int(result.rowcount or 0)
    return removed
