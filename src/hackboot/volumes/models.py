"""Block storage tables: volumes, attachments, snapshots, backups, backup policies, backup credentials.

A volume row carries both halves of the reconcile contract (as instances do):

* *desired* state written by the API: ``size_gb``, ``tier``, ``task_state`` (the operation in
  flight) and ``action_seq`` (bumped on every accepted request, so the agent finishes exactly the
  request it worked on with a compare-and-swap);
* *observed* state written by the agent of the volume's host: ``status``, ``status_reason``,
  ``applied_size_gb``, ``applied_tier``, ``active_file`` (the qcow2 file the volume writes to).

Files live on the host's storage pool (``<agent state dir>/volumes/``); every path stored here is
relative to that pool (``vol-…/f-….qcow2``). A volume's files form a qcow2 backing tree: the
active file is the top; each snapshot is a frozen file somewhere below it; a clone's active file
backs onto a snapshot file of another volume.

Placement lives in ``catalog.models.Allocation`` (consumer = the volume id, resource DISK_GB).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

# Volume statuses (user-facing; see lifecycle.py)
CREATING, AVAILABLE, ATTACHING, IN_USE, DETACHING, BACKING_UP, ERROR, DELETING, DELETED = (
    "creating", "available", "attaching", "in-use", "detaching", "backing-up", "error", "deleting", "deleted")
STATUSES = (CREATING, AVAILABLE, ATTACHING, IN_USE, DETACHING, BACKING_UP, ERROR, DELETING, DELETED)


class Volume(Base):
    __tablename__ = "volumes"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    zone_id: Mapped[str] = mapped_column(String(24), index=True)
    host_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)

    # desired
    size_gb: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(32))
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    # the volume's LUKS passphrase (256 random bits), sealed with the master key (context: volume id)
    key_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)
    shareable: Mapped[bool] = mapped_column(Boolean, default=False)
    bootable: Mapped[bool] = mapped_column(Boolean, default=False)
    source_type: Mapped[str] = mapped_column(String(16), default="blank")  # blank|snapshot|backup|image
    source_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    task_state: Mapped[str | None] = mapped_column(String(24), nullable=True, index=True)
    action_seq: Mapped[int] = mapped_column(Integer, default=0)
    # parameters of the task in flight (snapshot id, attachment id, revert target…)
    task_args: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    # observed
    status: Mapped[str] = mapped_column(String(16), default=CREATING, index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    applied_size_gb: Mapped[int] = mapped_column(Integer, default=0)
    applied_tier: Mapped[str] = mapped_column(String(32), default="")
    active_file: Mapped[str] = mapped_column(String(255), default="")
    allocated_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    last_backup_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)

    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class VolumeAttachment(Base):
    """One volume on one instance. ``state``: attaching → attached → detaching → detached (or error)."""

    __tablename__ = "volume_attachments"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    volume_id: Mapped[str] = mapped_column(String(40), index=True)
    instance_id: Mapped[str] = mapped_column(String(40), index=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    host_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    mode: Mapped[str] = mapped_column(String(2), default="rw")  # rw | ro
    state: Mapped[str] = mapped_column(String(16), default="attaching", index=True)
    force: Mapped[bool] = mapped_column(Boolean, default=False)  # forced detach asked
    slot: Mapped[int] = mapped_column(Integer, default=0)  # hot-plug port (hbvp<slot>) on the instance
    boot: Mapped[bool] = mapped_column(Boolean, default=False)  # the instance's root disk
    reason: Mapped[str] = mapped_column(String(500), default="")
    # the I/O limits QEMU reports for the device (query-block), read back after each change
    io_limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    attached_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    detached_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class VolumeSnapshot(Base):
    """A frozen qcow2 file of a volume. ``kind``: user (asked for) or backup (a backup's point in time)."""

    __tablename__ = "volume_snapshots"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    volume_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    kind: Mapped[str] = mapped_column(String(8), default="user")
    # creating | available | deleting | error | deleted
    status: Mapped[str] = mapped_column(String(16), default="creating", index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    file: Mapped[str] = mapped_column(String(255), default="")  # frozen file, relative to the pool
    size_gb: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)  # local retention (backup points)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class VolumeBackup(Base):
    """A remote copy in the project's S3 bucket: the volume's qcow2 layers since the previous backup."""

    __tablename__ = "volume_backups"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    volume_id: Mapped[str] = mapped_column(String(40), index=True)
    volume_name: Mapped[str] = mapped_column(String(63), default="")
    policy_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(12), default="full")  # full | incremental
    parent_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    snapshot_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the local point in time
    status: Mapped[str] = mapped_column(String(16), default="creating", index=True)  # creating|available|error|deleted
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    endpoint: Mapped[str] = mapped_column(String(255), default="")
    bucket: Mapped[str] = mapped_column(String(63), default="")
    prefix: Mapped[str] = mapped_column(String(255), default="")
    # uploaded layers, bottom first: [{"key":…, "file":…, "bytes":…, "sha256":…}]
    objects: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    volume_size_gb: Mapped[int] = mapped_column(Integer, default=0)
    tier: Mapped[str] = mapped_column(String(32), default="")
    encrypted: Mapped[bool] = mapped_column(Boolean, default=False)
    key_sealed: Mapped[str | None] = mapped_column(Text, nullable=True)  # sealed with context = backup id
    point_in_time: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    rpo_seconds: Mapped[float | None] = mapped_column(nullable=True)  # data-loss window this backup closed
    duration_seconds: Mapped[float | None] = mapped_column(nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)  # remote retention
    deleted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class BackupPolicy(Base):
    __tablename__ = "volume_backup_policies"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    every_s: Mapped[int] = mapped_column(Integer)
    keep_local_s: Mapped[int] = mapped_column(Integer)
    keep_remote_s: Mapped[int] = mapped_column(Integer)
    bucket: Mapped[str] = mapped_column(String(63))
    full_every: Mapped[int] = mapped_column(Integer, default=28)  # a full backup after this many incrementals
    volume_ids: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None: every volume of the project
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    last_run_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class BackupCredential(Base):
    """The S3 key the block storage service uses for a project's backups (created through objectstore)."""

    __tablename__ = "volume_backup_credentials"
    project_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    credential_id: Mapped[str] = mapped_column(String(40))
    access_key: Mapped[str] = mapped_column(String(64))
    secret_sealed: Mapped[str] = mapped_column(Text)  # sealed, context = b"volume-backup-s3:" + project id
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
