"""Load balancer tables: load balancers, listeners, rules, pools, members, certificates; and what the
host agents report back (the latest stats snapshot per load balancer, a bounded tail of access logs).

The control plane writes *desired* state here; the agent of the host a load balancer is placed on reads it
(``desired.py``) and drives its HAProxy. Every change to anything of a load balancer bumps
``LoadBalancer.desired_version`` in the same transaction; the agent records the version it applied in
``applied_version`` (compare-and-swap, ``desired.mark_applied``) and the status follows.

A deleted load balancer keeps its row (status ``DELETING``) until its agent reports the proxy gone
(``service.finish_delete``): only then are its network interface and rows dropped.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

PENDING, ACTIVE, ERROR, DELETING = "PENDING", "ACTIVE", "ERROR", "DELETING"
STATUSES = (PENDING, ACTIVE, ERROR, DELETING)
HEALTH_UNKNOWN = "unknown"
HEALTHS = (HEALTH_UNKNOWN, "up", "down", "drain", "disabled")


class LoadBalancer(Base):
    __tablename__ = "load_balancers"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(String(255), default="")
    vpc_id: Mapped[str] = mapped_column(String(40), index=True)
    subnet_id: Mapped[str] = mapped_column(String(40), index=True)
    zone_id: Mapped[str] = mapped_column(String(24))
    internet_facing: Mapped[bool] = mapped_column(Boolean, default=False)
    # The VIP: a network interface of the subnet attached to the load balancer as its "instance"
    network_interface_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    vip: Mapped[str] = mapped_column(String(15))
    host_id: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    desired_version: Mapped[int] = mapped_column(BigInteger, default=1)
    applied_version: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Pool(Base):
    __tablename__ = "lb_pools"
    __table_args__ = (UniqueConstraint("load_balancer_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    load_balancer_id: Mapped[str] = mapped_column(ForeignKey("load_balancers.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    protocol: Mapped[str] = mapped_column(String(8))  # http | tcp
    algorithm: Mapped[str] = mapped_column(String(16), default="roundrobin")
    sticky: Mapped[str] = mapped_column(String(16), default="none")  # none | cookie | source_ip
    proxy_protocol: Mapped[bool] = mapped_column(Boolean, default=False)
    # driver.HealthCheckSpec's fields, or NULL: no check (members taken as up)
    health_check: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Listener(Base):
    __tablename__ = "lb_listeners"
    __table_args__ = (UniqueConstraint("load_balancer_id", "port"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    load_balancer_id: Mapped[str] = mapped_column(ForeignKey("load_balancers.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63), default="")
    protocol: Mapped[str] = mapped_column(String(8))  # http | https | tcp
    port: Mapped[int] = mapped_column(Integer)
    default_pool_id: Mapped[str | None] = mapped_column(ForeignKey("lb_pools.id"), nullable=True, index=True)
    redirect_to_https_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    connection_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    connection_rate_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    request_rate_limit: Mapped[int | None] = mapped_column(Integer, nullable=True)
    idle_timeout_s: Mapped[float] = mapped_column(Float, default=60.0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ListenerCertificate(Base):
    """The certificates of an https listener, in order: the first is the default, the others chosen by SNI."""

    __tablename__ = "lb_listener_certificates"
    listener_id: Mapped[str] = mapped_column(ForeignKey("lb_listeners.id", ondelete="CASCADE"), primary_key=True)
    certificate_id: Mapped[str] = mapped_column(ForeignKey("certificates.id"), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)


class Rule(Base):
    __tablename__ = "lb_rules"
    __table_args__ = (UniqueConstraint("listener_id", "priority"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    load_balancer_id: Mapped[str] = mapped_column(ForeignKey("load_balancers.id", ondelete="CASCADE"), index=True)
    listener_id: Mapped[str] = mapped_column(ForeignKey("lb_listeners.id", ondelete="CASCADE"), index=True)
    priority: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(16))  # forward | redirect | fixed_response
    host: Mapped[str | None] = mapped_column(String(253), nullable=True)
    path_prefix: Mapped[str | None] = mapped_column(String(255), nullable=True)
    pool_id: Mapped[str | None] = mapped_column(ForeignKey("lb_pools.id"), nullable=True, index=True)
    redirect_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    redirect_code: Mapped[int] = mapped_column(Integer, default=302)
    status_code: Mapped[int] = mapped_column(Integer, default=200)
    content_type: Mapped[str] = mapped_column(String(127), default="text/plain")
    body: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Member(Base):
    __tablename__ = "lb_members"
    __table_args__ = (UniqueConstraint("pool_id", "address", "port"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    load_balancer_id: Mapped[str] = mapped_column(ForeignKey("load_balancers.id", ondelete="CASCADE"), index=True)
    pool_id: Mapped[str] = mapped_column(ForeignKey("lb_pools.id", ondelete="CASCADE"), index=True)
    # The interface it was added by (its address is read when the member is made), or NULL: an address
    network_interface_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    address: Mapped[str] = mapped_column(String(15))
    port: Mapped[int] = mapped_column(Integer)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    admin_state: Mapped[str] = mapped_column(String(16), default="enabled")  # enabled | drain | disabled
    health: Mapped[str] = mapped_column(String(16), default=HEALTH_UNKNOWN)
    health_reason: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Certificate(Base):
    """A certificate chain (PEM, leaf first) and its private key, sealed with the master key."""

    __tablename__ = "certificates"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63))
    chain_pem: Mapped[str] = mapped_column(Text)
    key_sealed: Mapped[str] = mapped_column(Text)  # core.crypto.seal(key PEM, context=id)
    names: Mapped[list[str]] = mapped_column(JSON, default=list)  # DNS names of the leaf (SAN)
    subject: Mapped[str] = mapped_column(String(1024), default="")
    issuer: Mapped[str] = mapped_column(String(1024), default="")
    not_before: Mapped[dt.datetime]
    not_after: Mapped[dt.datetime]
    fingerprint_sha256: Mapped[str] = mapped_column(String(95))
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class LoadBalancerStats(Base):
    """The latest counters an agent read from a load balancer's proxy (a snapshot, replaced each time)."""

    __tablename__ = "lb_stats"
    load_balancer_id: Mapped[str] = mapped_column(ForeignKey("load_balancers.id", ondelete="CASCADE"),
                                                  primary_key=True)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AccessLogRecord(Base):
    """One request (http) or session (tcp) through a load balancer; the last ``ACCESS_LOG_KEEP`` per load
    balancer are kept, none older than ``ACCESS_LOG_RETENTION_DAYS`` (service.py)."""

    __tablename__ = "lb_access_logs"
    __table_args__ = (Index("ix_lb_access_logs_lb_time", "load_balancer_id", "time"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # time-sortable: pages in arrival order
    load_balancer_id: Mapped[str] = mapped_column(ForeignKey("load_balancers.id", ondelete="CASCADE"))
    time: Mapped[dt.datetime]
    listener_id: Mapped[str] = mapped_column(String(40))
    client: Mapped[str] = mapped_column(String(64))
    pool_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    member_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    path: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
