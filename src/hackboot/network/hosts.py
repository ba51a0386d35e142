"""What the network agents of the hosts record: each host's underlay address, and which version of each
VPC each host has applied.

A VPC spans every host that carries one of its ports, and each of those hosts applies it on its own
(its local ports, the others as remote ports over VXLAN). ``Vpc.observed_version`` says that *some*
host applied a version; ``NetworkHostVpc`` says which host applied which, so that every host — not
only the first — converges, and so that a host knows which VPCs it still carries after it lost its
last port in one (and must take them down).

A host finds its peers' underlay addresses in ``NetworkHost``: each agent writes its own row at start,
before applying anything, so a remote port is always sent to the address its host really listens on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import BigInteger, ForeignKey, String, delete, select, update
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, session_scope, utcnow
from hackboot.network.models import DELETED, NetworkInterface, Vpc


class NetworkHost(Base):
    """A host's data plane as its agent announced it."""

    __tablename__ = "network_hosts"
    host_id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the catalog's host id
    name: Mapped[str] = mapped_column(String(253))
    underlay_ip: Mapped[str | None] = mapped_column(String(15), nullable=True)  # None: no VXLAN (one host)
    uplink: Mapped[bool] = mapped_column(default=False)  # floating IPs and NAT gateways can act here
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class NetworkHostVpc(Base):
    """The version of a VPC a host has applied (or failed to: `error`)."""

    __tablename__ = "network_host_vpcs"
    host_id: Mapped[str] = mapped_column(ForeignKey("network_hosts.host_id", ondelete="CASCADE"), primary_key=True)
    vpc_id: Mapped[str] = mapped_column(String(40), primary_key=True, index=True)
    observed_version: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str] = mapped_column(String(500), default="")
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


@dataclass(frozen=True)
class HostInfo:
    host_id: str
    name: str
    underlay_ip: str | None
    uplink: bool


def announce(host_id: str, name: str, underlay_ip: str | None, uplink: bool) -> None:
    """The agent of `host_id` starts: record (or update) its underlay address."""
    with session_scope() as s:
        row = s.get(NetworkHost, host_id)
        if row is None:
            s.add(NetworkHost(host_id=host_id, name=name, underlay_ip=underlay_ip, uplink=uplink))
        elif (row.name, row.underlay_ip, row.uplink) != (name, underlay_ip, uplink):
            row.name, row.underlay_ip, row.uplink = name, underlay_ip, uplink


def hosts(host_ids: Iterable[str] | None = None) -> dict[str, HostInfo]:
    with session_scope(write=False) as s:
        stmt = select(NetworkHost)
        if host_ids is not None:
            stmt = stmt.where(NetworkHost.host_id.in_(sorted(set(host_ids))))
        return {h.host_id: HostInfo(h.host_id, h.name, h.underlay_ip, h.uplink) for h in s.scalars(stmt)}


def work(host_id: str) -> tuple[dict[str, int], dict[str, int]]:
    """(live VPCs with a port on the host → desired version, VPCs the host has applied → observed version)."""
    with session_scope(write=False) as s:
        wanted = {vpc_id: int(version) for vpc_id, version in s.execute(
            select(Vpc.id, Vpc.desired_version).where(
                Vpc.status != DELETED,
                Vpc.id.in_(select(NetworkInterface.vpc_id).where(NetworkInterface.host_id == host_id))))}
        have = {vpc_id: int(version) for vpc_id, version in s.execute(
            select(NetworkHostVpc.vpc_id, NetworkHostVpc.observed_version).where(NetworkHostVpc.host_id == host_id))}
    return wanted, have


def guest_ports(host_id: str) -> dict[str, list[tuple[str, str]]]:
    """Instance id → (interface id, MAC) of its interfaces on the host, in device order."""
    out: dict[str, list[tuple[str, str]]] = {}
    with session_scope(write=False) as s:
        for iid, nic_id, mac in s.execute(
                select(NetworkInterface.instance_id, NetworkInterface.id, NetworkInterface.mac)
                .where(NetworkInterface.host_id == host_id, NetworkInterface.instance_id.is_not(None))
                .order_by(NetworkInterface.instance_id, NetworkInterface.device_index)):
            out.setdefault(str(iid), []).append((nic_id, mac))
    return out


def applied(host_id: str, vpc_id: str, version: int, error: str = "") -> None:
    """The host applied `version` of the VPC (or failed to, with `error`); never moves backwards."""
    with session_scope() as s:
        row = s.get(NetworkHostVpc, (host_id, vpc_id))
        if row is None:
            s.add(NetworkHostVpc(host_id=host_id, vpc_id=vpc_id, observed_version=version, error=error[:500]))
            return
        s.execute(update(NetworkHostVpc).where(NetworkHostVpc.host_id == host_id, NetworkHostVpc.vpc_id == vpc_id,
                                               NetworkHostVpc.observed_version <= version)
                  .values(observed_version=version, error=error[:500]))


def removed(host_id: str, vpc_id: str) -> None:
    """The host no longer carries the VPC."""
    with session_scope() as s:
        s.execute(delete(NetworkHostVpc).where(NetworkHostVpc.host_id == host_id, NetworkHostVpc.vpc_id == vpc_id))
