"""`Idempotency-Key` on POST: the same key replays the first response, never a second resource.

The key is reserved (a `pending` row, committed) before the handler runs, so two
concurrent requests with one key cannot both create. Responses below 500 are stored
and replayed for 24 h; a 5xx frees the key so the client may retry. A reservation
left by a killed server stays `pending` and is answered 409 (the first attempt may
or may not have taken effect: the client should look before retrying with a new key).
"""

from __future__ import annotations

import datetime as dt
import hashlib

from sqlalchemy import Integer, String, Text, delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.crypto import seal, unseal
from hackboot.core.db import Base, session_scope, utcnow

TTL = dt.timedelta(hours=24)
MAX_STORED_BODY = 1024 * 1024


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8), default="pending")
    status_code: Mapped[int] = mapped_column(Integer, default=0)
    content_type: Mapped[str] = mapped_column(String(100), default="")
    location: Mapped[str] = mapped_column(String(500), default="")
    body: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def key_hash(authorization: str, key: str, method: str, path: str) -> str:
    return hashlib.sha256(f"{authorization}\x00{key}\x00{method}\x00{path}".encode()).hexdigest()


def reserve(kh: str, request_hash: str) -> IdempotencyRecord | None:
    """Reserve the key; return None when reserved now, else the existing record."""
    try:
        with session_scope() as s:
            s.add(IdempotencyRecord(key_hash=kh, request_hash=request_hash))
        return None
    except IntegrityError:
        with session_scope(write=False) as s:
            existing = s.get(IdempotencyRecord, kh)
            if existing is not None and existing.created_at < utcnow() - TTL:
                s.delete(existing)
        with session_scope() as s:
            existing = s.get(IdempotencyRecord, kh)
            if existing is not None and existing.created_at < utcnow() - TTL:
                s.delete(existing)
                s.flush()
                s.add(IdempotencyRecord(key_hash=kh, request_hash=request_hash))
                return None
            return existing


def complete(kh: str, status_code: int, content_type: str, location: str, body: bytes) -> None:
    with session_scope() as s:
        rec = s.get(IdempotencyRecord, kh)
        if rec is None:
            return
        if status_code >= 500 or len(body) > MAX_STORED_BODY:
            s.delete(rec)
            return
        rec.state = "done"
        rec.status_code = status_code
        rec.content_type = content_type
        rec.location = location
        # Sealed: stored responses may hold secrets shown once (tokens, webhook secrets).
        rec.body = seal(body, kh.encode())


def stored_body(rec: IdempotencyRecord) -> bytes:
    return unseal(rec.body, rec.key_hash.encode()) if rec.body else b""


def release(kh: str) -> None:
    with session_scope() as s:
        s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.key_hash == kh))


def purge_expired() -> int:
    with session_scope() as s:
        result = s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < utcnow() - TTL))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
