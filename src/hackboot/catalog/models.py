"""Regions, zones, flavors (products), prices, hypervisor hosts and placement allocations.

Placement follows the resource-provider model: each host is a provider with an
inventory per resource class (VCPU, MEMORY_MB, DISK_GB, GPU:<model>), an allocation
ratio, and a generation number bumped on every claim so that concurrent claims on
one host are detected (compare-and-swap) instead of overselling it.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    Numeric,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

REGION_STATUSES = ("operational", "maintenance", "planned", "retired")
HOST_STATUSES = ("up", "down", "disabled")
RESOURCE_CLASSES = ("VCPU", "MEMORY_MB", "DISK_GB")  # plus "GPU:<model>" per GPU model
GPU_PREFIX = "GPU:"


def allocatable(total: int, reserved: int, allocation_ratio: float) -> int:
    """What may be allocated: (total - reserved) x ratio, rounded down.

    The epsilon keeps float noise from losing a unit: (100 - 0) x 0.29 is 28.999999999999996.
    """
    return max(0, math.floor((total - reserved) * allocation_ratio + 1e-9))


class Region(Base):
    __tablename__ = "regions"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # PAR1, FRA1…
    name: Mapped[str] = mapped_column(String(63))
    city: Mapped[str] = mapped_column(String(63), default="")
    country: Mapped[str] = mapped_column(String(2))  # ISO 3166-1 alpha-2
    jurisdiction: Mapped[str] = mapped_column(String(16), default="EU")
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str] = mapped_column(String(255), default="")
    peering: Mapped[str] = mapped_column(String(63), default="")
    available_from: Mapped[str] = mapped_column(String(16), default="")  # e.g. "2025-Q2" for planned sites
    # Free-text caveat shown with the region (e.g. LON1: outside the EU, see seed_data.py)
    note: Mapped[str] = mapped_column(String(500), default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Zone(Base):
    __tablename__ = "zones"
    id: Mapped[str] = mapped_column(String(24), primary_key=True)  # PAR1-a
    region_id: Mapped[str] = mapped_column(ForeignKey("regions.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="operational")
    status_reason: Mapped[str] = mapped_column(String(255), default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Flavor(Base):
    __tablename__ = "flavors"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # VPS-NANO, t3.micro…
    family: Mapped[str] = mapped_column(String(16))  # vps, gpu, general, compute, memory
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_gb: Mapped[int] = mapped_column(Integer)
    gpu_model: Mapped[str | None] = mapped_column(String(32), nullable=True)
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    bandwidth_mbps: Mapped[int] = mapped_column(Integer, default=1000)
    description: Mapped[str] = mapped_column(String(255), default="")
    source: Mapped[str] = mapped_column(String(255), default="")  # where the specs come from
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Price(Base):
    """On-demand price list in EUR: per flavor-hour, per GB-month for storage, etc."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("sku", "region_id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), index=True)  # flavor id, "volume:ssd-standard", "s3:GLACIER"…
    kind: Mapped[str] = mapped_column(String(16))  # flavor, volume, object_storage, transfer
    region_id: Mapped[str | None] = mapped_column(ForeignKey("regions.id"), nullable=True)  # None: all regions
    unit: Mapped[str] = mapped_column(String(16))  # hour, GB-month
    amount_eur: Mapped[float] = mapped_column(Numeric(12, 6, asdecimal=False))
    description: Mapped[str] = mapped_column(String(255), default="", server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    zone_id: Mapped[str] = mapped_column(ForeignKey("zones.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="up")
    status_reason: Mapped[str] = mapped_column(String(255), default="")
    # Facts the agent reports: accelerator (kvm/tcg) and why, kernel, qemu version, state dir…
    facts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    agent_url: Mapped[str] = mapped_column(String(255), default="")
    last_heartbeat_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Inventory(Base):
    __tablename__ = "inventories"
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True)
    resource_class: Mapped[str] = mapped_column(String(48), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    # 1.0 by default: the seed promises no overselling. Admins may raise it per host.
    allocation_ratio: Mapped[float] = mapped_column(Float, default=1.0)
    # For GPUs: the PCI addresses of the devices, handed out one per allocated unit.
    devices: Mapped[list[str]] = mapped_column(JSON, default=list)

    @property
    def capacity(self) -> int:
        return allocatable(self.total, self.reserved, self.allocation_ratio)


class Allocation(Base):
    """Resources a consumer (an instance, a volume) holds on a host."""

    __tablename__ = "allocations"
    consumer_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"), primary_key=True, index=True)
    resource_class: Mapped[str] = mapped_column(String(48), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    # GPU PCI addresses assigned to this consumer
    devices: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
