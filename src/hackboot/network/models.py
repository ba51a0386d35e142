"""VPC networking tables: VPCs, subnets, IP allocations, network interfaces (ports), security groups and
their rules, floating IPs, NAT gateways, flow logs and their records.

The control plane writes *desired* state here; the host agents (one per hypervisor host) read it and
drive the data plane (namespaces, bridges, VXLAN, nftables, dnsmasq). The contract between the two:

* every change to anything inside a VPC bumps ``Vpc.desired_version`` in the same transaction and,
  after the commit, calls ``core.reconcile.notify("network", <vpc id>)``; an agent that has applied
  a version records it in ``observed_version`` (compare-and-swap, see ``service.observed``);
* rows carry a user-visible ``status`` (``pending`` until an agent has applied them, then
  ``active``; ``error`` with ``status_reason``);
* rows other than VPCs are deleted outright: an agent converges on the rows that exist (anything it
  finds on its host without a row is an orphan to remove). A deleted VPC keeps its row (status
  ``deleted``) so that its VNI is never handed to another VPC while some host may still carry the
  old VXLAN segment.

Addresses are IPv4 text (``10.0.1.5``), networks CIDR text (``10.0.1.0/24``).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

PENDING, ACTIVE, ERROR, DELETED = "pending", "active", "error", "deleted"
STATUSES = (PENDING, ACTIVE, ERROR)

INGRESS, EGRESS = "ingress", "egress"
DIRECTIONS = (INGRESS, EGRESS)
PROTOCOLS = ("tcp", "udp", "icmp", "all")
ACCEPT, REJECT, ALL = "ACCEPT", "REJECT", "ALL"
TRAFFIC_TYPES = (ACCEPT, REJECT, ALL)
FLOW_LOG_TARGETS = ("vpc", "subnet", "network_interface")


class Vpc(Base):
    __tablename__ = "vpcs"
    __table_args__ = (UniqueConstraint("region_id", "vni"), UniqueConstraint("project_id", "default_region"))
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    region_id: Mapped[str] = mapped_column(String(16), index=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    cidr: Mapped[str] = mapped_column(String(18))
    # VXLAN network identifier of the VPC's overlay, unique in the region and never reused while the row lives
    vni: Mapped[int] = mapped_column(Integer)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    # The region id while this is the project's live default VPC there, else NULL: the unique constraint
    # makes "one default VPC per project and region" hold under concurrent first uses.
    default_region: Mapped[str | None] = mapped_column(String(16), nullable=True)
    internet_gateway: Mapped[bool] = mapped_column(Boolean, default=False)
    desired_version: Mapped[int] = mapped_column(BigInteger, default=1)
    observed_version: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class Subnet(Base):
    __tablename__ = "subnets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    vpc_id: Mapped[str] = mapped_column(ForeignKey("vpcs.id"), index=True)
    zone_id: Mapped[str] = mapped_column(String(24), index=True)
    name: Mapped[str] = mapped_column(String(63), default="", index=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    cidr: Mapped[str] = mapped_column(String(18))
    # public: routed to the internet through the VPC's router; private: out through a NAT gateway if any
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    gateway_ip: Mapped[str] = mapped_column(String(15))  # first usable address: the VPC router
    dns_ip: Mapped[str] = mapped_column(String(15))  # second usable address: DHCP + DNS (dnsmasq)
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class IpAllocation(Base):
    """One address of a subnet held by a network interface or a NAT gateway.

    The primary key is the address itself: two concurrent allocations of one address cannot both
    commit, whatever the database and whatever a bug upstream might do.
    """

    __tablename__ = "ip_allocations"
    subnet_id: Mapped[str] = mapped_column(ForeignKey("subnets.id"), primary_key=True)
    address: Mapped[str] = mapped_column(String(15), primary_key=True)
    owner_kind: Mapped[str] = mapped_column(String(24))  # network_interface | nat_gateway
    owner_id: Mapped[str] = mapped_column(String(40), index=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SecurityGroup(Base):
    __tablename__ = "security_groups"
    __table_args__ = (UniqueConstraint("vpc_id", "name"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    vpc_id: Mapped[str] = mapped_column(ForeignKey("vpcs.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(String(255), default="")
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    # rules in the group, kept by a conditional UPDATE so the per-group quota holds under concurrency
    rule_count: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SecurityGroupRule(Base):
    """An allow rule (groups are default deny for ingress). `cidr` XOR `remote_group_id` names the peer:
    the source of ingress traffic, the destination of egress traffic."""

    __tablename__ = "security_group_rules"
    __table_args__ = (UniqueConstraint("security_group_id", "fingerprint"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    vpc_id: Mapped[str] = mapped_column(String(40), index=True)
    security_group_id: Mapped[str] = mapped_column(ForeignKey("security_groups.id", ondelete="CASCADE"),
                                                   index=True)
    direction: Mapped[str] = mapped_column(String(8))  # ingress | egress
    protocol: Mapped[str] = mapped_column(String(8))  # tcp | udp | icmp | all
    port_min: Mapped[int | None] = mapped_column(Integer, nullable=True)  # tcp/udp only
    port_max: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cidr: Mapped[str | None] = mapped_column(String(18), nullable=True)
    remote_group_id: Mapped[str | None] = mapped_column(ForeignKey("security_groups.id"), nullable=True, index=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    # direction|protocol|ports|peer: what makes two rules the same rule (duplicates are a 409)
    fingerprint: Mapped[str] = mapped_column(String(128))
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class NetworkInterface(Base):
    """A port: one MAC and one private address on a subnet, filtered by its security groups."""

    __tablename__ = "network_interfaces"
    __table_args__ = (UniqueConstraint("mac"), UniqueConstraint("instance_id", "device_index"))
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    vpc_id: Mapped[str] = mapped_column(ForeignKey("vpcs.id"), index=True)
    subnet_id: Mapped[str] = mapped_column(ForeignKey("subnets.id"), index=True)
    name: Mapped[str] = mapped_column(String(63), default="", index=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    mac: Mapped[str] = mapped_column(String(17))  # locally administered unicast
    private_ip: Mapped[str] = mapped_column(String(15))
    instance_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    device_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)  # set by compute on placement
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    attached_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class InterfaceSecurityGroup(Base):
    __tablename__ = "network_interface_security_groups"
    interface_id: Mapped[str] = mapped_column(ForeignKey("network_interfaces.id", ondelete="CASCADE"),
                                              primary_key=True)
    security_group_id: Mapped[str] = mapped_column(ForeignKey("security_groups.id"), primary_key=True, index=True)


class FloatingIp(Base):
    """A public address of the region's pool, held by a project; DNAT/SNAT'd on the VPC router to the
    private address of the interface it is attached to, or the outside address of a NAT gateway."""

    __tablename__ = "floating_ips"
    __table_args__ = (UniqueConstraint("region_id", "address"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    region_id: Mapped[str] = mapped_column(String(16), index=True)
    address: Mapped[str] = mapped_column(String(15))
    description: Mapped[str] = mapped_column(String(255), default="")
    network_interface_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    nat_gateway_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    vpc_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)  # of what it is attached to
    # The interface or NAT gateway it was allocated for: released together with it.
    release_with: Mapped[str | None] = mapped_column(String(40), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=ACTIVE, index=True)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    attached_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class NatGateway(Base):
    """Masquerade for the private subnets of a VPC: it lives in a public subnet and goes out with a floating IP."""

    __tablename__ = "nat_gateways"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    vpc_id: Mapped[str] = mapped_column(ForeignKey("vpcs.id"), index=True)
    subnet_id: Mapped[str] = mapped_column(ForeignKey("subnets.id"), index=True)
    name: Mapped[str] = mapped_column(String(63), default="")
    floating_ip_id: Mapped[str] = mapped_column(String(40), index=True)
    private_ip: Mapped[str] = mapped_column(String(15))
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class FlowLog(Base):
    """Capture of the traffic of a VPC, a subnet or one interface (accepted, rejected or both)."""

    __tablename__ = "flow_logs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(40), index=True)
    vpc_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(63), default="")
    resource_type: Mapped[str] = mapped_column(String(24))  # vpc | subnet | network_interface
    resource_id: Mapped[str] = mapped_column(String(40), index=True)
    traffic_type: Mapped[str] = mapped_column(String(8))  # ACCEPT | REJECT | ALL
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class FlowLogRecord(Base):
    """One flow seen by an agent (from nftables log groups), kept ``RETENTION_DAYS`` (service.py)."""

    __tablename__ = "flow_log_records"
    __table_args__ = (Index("ix_flow_log_records_log_time", "flow_log_id", "start_time"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # time-sortable: pages in arrival order
    flow_log_id: Mapped[str] = mapped_column(String(40))
    project_id: Mapped[str] = mapped_column(String(40))
    interface_id: Mapped[str] = mapped_column(String(40))
    direction: Mapped[str] = mapped_column(String(8))  # ingress | egress (seen from the interface)
    action: Mapped[str] = mapped_column(String(8))  # ACCEPT | REJECT
    protocol: Mapped[str] = mapped_column(String(8))  # tcp, udp, icmp or the IP protocol number
    src_addr: Mapped[str] = mapped_column(String(15))
    src_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dst_addr: Mapped[str] = mapped_column(String(15))
    dst_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    packets: Mapped[int] = mapped_column(BigInteger, default=1)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    start_time: Mapped[dt.datetime] = mapped_column(index=True)
    end_time: Mapped[dt.datetime]
