"""Function tables: functions (the unpublished ``$LATEST``), their immutable versions, aliases, triggers,
invocation records; and the built-in queue service's queues and messages.

A function's secrets are one sealed JSON object (``hackboot.core.crypto.seal``, context: the function id);
only their names are stored in clear. A version copies the sealed blob as it was when published.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

LATEST = "$LATEST"
TRIGGER_KINDS = ("http", "schedule", "object_storage", "queue")
OUTCOMES = ("ok", "error", "timeout", "out_of_memory", "crashed", "throttled")


class Function(Base):
    __tablename__ = "functions"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(String(255), default="")
    runtime: Mapped[str] = mapped_column(String(32))
    handler: Mapped[str] = mapped_column(String(128))
    memory_mb: Mapped[int] = mapped_column(Integer, default=128)
    timeout_s: Mapped[int] = mapped_column(Integer, default=3)
    environment: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    secret_names: Mapped[list[str]] = mapped_column(JSON, default=list)
    secrets_sealed: Mapped[str] = mapped_column(Text, default="")  # sealed JSON object; "" when none
    network_egress: Mapped[bool] = mapped_column(Boolean, default=False)
    reserved_concurrency: Mapped[int] = mapped_column(Integer, default=0)
    max_concurrency: Mapped[int] = mapped_column(Integer, default=10)
    # Where an asynchronous invocation's event goes once every attempt failed (a queue of the project).
    dead_letter_queue_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    code_sha256: Mapped[str] = mapped_column(String(64), default="")  # "" until code is uploaded
    code_size: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped by every change of code or configuration: $LATEST's engine version id carries it, so a warm
    # sandbox never runs an older $LATEST.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class FunctionVersion(Base):
    __tablename__ = "function_versions"
    __table_args__ = (UniqueConstraint("function_id", "number"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(255), default="")
    runtime: Mapped[str] = mapped_column(String(32))
    handler: Mapped[str] = mapped_column(String(128))
    memory_mb: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[int] = mapped_column(Integer)
    environment: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    secret_names: Mapped[list[str]] = mapped_column(JSON, default=list)
    secrets_sealed: Mapped[str] = mapped_column(Text, default="")
    network_egress: Mapped[bool] = mapped_column(Boolean, default=False)
    code_sha256: Mapped[str] = mapped_column(String(64))
    code_size: Mapped[int] = mapped_column(Integer)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class FunctionAlias(Base):
    __tablename__ = "function_aliases"
    __table_args__ = (UniqueConstraint("function_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(String(255), default="")
    version: Mapped[int] = mapped_column(Integer)
    additional_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    weight: Mapped[float] = mapped_column(Float, default=0.0)  # share of invocations of additional_version
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class FunctionTrigger(Base):
    __tablename__ = "function_triggers"
    __table_args__ = (Index("ix_function_triggers_due", "kind", "enabled", "next_fire_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    function_id: Mapped[str] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # http | schedule | object_storage | queue
    qualifier: Mapped[str] = mapped_column(String(63), default=LATEST)  # alias name, version number, $LATEST
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    # http
    auth: Mapped[str] = mapped_column(String(8), default="none")  # none | token
    token_hash: Mapped[str] = mapped_column(String(128), default="")
    # schedule
    schedule: Mapped[str] = mapped_column(String(256), default="")
    next_fire_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # object_storage
    bucket: Mapped[str] = mapped_column(String(63), default="", index=True)
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    prefix: Mapped[str] = mapped_column(String(1024), default="")
    suffix: Mapped[str] = mapped_column(String(1024), default="")
    # queue
    queue_id: Mapped[str | None] = mapped_column(ForeignKey("queues.id"), nullable=True, index=True)
    batch_size: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Invocation(Base):
    __tablename__ = "function_invocations"
    __table_args__ = (Index("ix_function_invocations_function_started", "function_id", "started_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # time-sortable: the logs' cursor
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    function_id: Mapped[str] = mapped_column(String(40))  # no foreign key: records outlive nothing, but
    # a record written while its function is deleted must not fail the invoker
    version: Mapped[str] = mapped_column(String(16))  # "$LATEST" or the number
    request_id: Mapped[str] = mapped_column(String(64), default="")
    trigger_kind: Mapped[str] = mapped_column(String(16))  # http | schedule | object_storage | queue | api
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
    init_ms: Mapped[float] = mapped_column(Float, default=0.0)
    cold: Mapped[bool] = mapped_column(Boolean, default=False)
    memory_mb: Mapped[int] = mapped_column(Integer)
    max_memory_mb: Mapped[float] = mapped_column(Float, default=0.0)
    billed_gb_s: Mapped[float] = mapped_column(Float, default=0.0)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    logs: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(String(1024), default="")


class Queue(Base):
    __tablename__ = "queues"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(String(255), default="")
    visibility_timeout_s: Mapped[int] = mapped_column(Integer, default=30)
    max_receives: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: never dead-lettered
    dead_letter_queue_id: Mapped[str | None] = mapped_column(ForeignKey("queues.id"), nullable=True, index=True)
    retention_s: Mapped[int] = mapped_column(Integer, default=4 * 86400)
    delay_s: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class QueueMessage(Base):
    __tablename__ = "queue_messages"
    __table_args__ = (Index("ix_queue_messages_queue_visible", "queue_id", "visible_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    queue_id: Mapped[str] = mapped_column(ForeignKey("queues.id", ondelete="CASCADE"))
    body: Mapped[str] = mapped_column(Text)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sent_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    visible_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    receive_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # The hash of the current receipt's secret: a new receive replaces it, so older receipts stop working.
    receipt_hash: Mapped[str] = mapped_column(String(64), default="")
    source_queue_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # set in a dead-letter queue
