"""Compute tables: key pairs, server groups, instances.

An instance row carries both halves of the reconcile contract:

* the *desired* state, written by the API: ``desired_power`` (on/off), the flavor
  sizes, ``task_state`` (the pending operation) and ``action_seq`` (bumped on every
  accepted action so an agent can finish exactly the request it worked on with a
  compare-and-swap);
* the *observed* state, written by the host agent: ``status``, ``power_state``
  (what the driver sees), ``status_reason``, ``ssh_port``, ``accel``, ``timings``.

Placement lives in ``catalog.models.Allocation`` (consumer = the instance id).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

# Instance statuses (the user-facing state machine, see lifecycle.py).
BUILDING, ACTIVE, SHUTOFF, REBOOTING, RESIZING, ERROR, DELETED = (
    "BUILDING", "ACTIVE", "SHUTOFF", "REBOOTING", "RESIZING", "ERROR", "DELETED")
STATUSES = (BUILDING, ACTIVE, SHUTOFF, REBOOTING, RESIZING, ERROR, DELETED)


class KeyPair(Base):
    __tablename__ = "keypairs"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    key_type: Mapped[str] = mapped_column(String(32))  # ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(80))  # SHA256:… as ssh-keygen -l prints it
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ServerGroup(Base):
    __tablename__ = "server_groups"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    policy: Mapped[str] = mapped_column(String(16))  # affinity | anti-affinity
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    flavor_id: Mapped[str] = mapped_column(String(32))
    image_id: Mapped[str] = mapped_column(String(40))
    keypair_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    keypair_name: Mapped[str | None] = mapped_column(String(63), nullable=True)
    region_id: Mapped[str] = mapped_column(String(16), default="")
    zone_id: Mapped[str] = mapped_column(String(24), default="", index=True)
    host_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    server_group_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    user_data: Mapped[str | None] = mapped_column(Text, nullable=True)

    # sizes currently allocated (a snapshot of the flavor: flavors may change later)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    gpu_model: Mapped[str | None] = mapped_column(String(32), nullable=True)
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    gpu_pci_addresses: Mapped[list[str]] = mapped_column(JSON, default=list)

    # desired state
    desired_power: Mapped[str] = mapped_column(String(8), default="on")  # on | off
    task_state: Mapped[str | None] = mapped_column(String(24), nullable=True, index=True)
    action_seq: Mapped[int] = mapped_column(Integer, default=0)
    reboot_hard: Mapped[bool] = mapped_column(Boolean, default=False)
    previous_status: Mapped[str | None] = mapped_column(String(16), nullable=True)  # before a resize
    # the sizes before a resize (flavor_id, vcpus, memory_mb, disk_gb, gpu_model, gpu_count,
    # gpu_pci_addresses), kept until the resize ends: a failed resize goes back to them
    resize_from: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    snapshot_image_id: Mapped[str | None] = mapped_column(String(40), nullable=True)

    # observed state
    status: Mapped[str] = mapped_column(String(16), default=BUILDING, index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    # set while the instance's host is down (status_reason then says so); cleared when the host is back
    # or when the agent reports a newer reason
    host_down_since: Mapped[dt.datetime | None] = mapped_column(nullable=True, index=True)
    power_state: Mapped[str] = mapped_column(String(16), default="missing")
    accel: Mapped[str | None] = mapped_column(String(8), nullable=True)
    ssh_host: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ssh_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # wall-clock milestones (unix seconds) of the last build/boot: created, scheduled, picked, qemu_started…
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    launched_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
