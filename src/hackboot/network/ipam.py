"""IP address management: what a VPC or subnet CIDR may be, which addresses of a subnet are reserved,
and the atomic allocation of the others.

Rules (those of AWS VPCs):

* a VPC's CIDR is an RFC 1918 network (10/8, 172.16/12, 192.168/16) of prefix /16 to /28;
* a subnet's CIDR lies inside its VPC's, is /28 at most, and overlaps no sibling subnet;
* in every subnet the network address, the gateway (first usable: the VPC router), the DNS server
  (second usable: dnsmasq) and the broadcast address are reserved, so a /28 offers 12 addresses.

Allocation is atomic on both databases: the caller holds the subnet's row lock (``SELECT … FOR
UPDATE`` on PostgreSQL; SQLite serialises writers anyway), and the address is the primary key of
its ``IpAllocation`` row, so even a bug upstream cannot hand out one address twice.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from hackboot.core import errors
from hackboot.network.models import IpAllocation, Subnet

RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
VPC_MIN_PREFIX, VPC_MAX_PREFIX = 16, 28
SUBNET_MAX_PREFIX = 28


def _invalid(field: str, msg: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(f"{field}: {msg}", errors=[{"loc": ["body", field], "msg": msg}])


def parse_network(text: str, field: str = "cidr") -> ipaddress.IPv4Network:
    """An IPv4 network in CIDR notation whose host bits are zero (`10.0.1.0/24`), else a 422 saying why."""
    if "/" not in text:
        raise _invalid(field, f"'{text}' is not in CIDR notation (address/prefix, e.g. 10.0.0.0/16)")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _invalid(field, f"'{text}' is not an IPv4 network in CIDR notation (e.g. 10.0.0.0/16)") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise _invalid(field, "only IPv4 networks are supported")
    if str(net) != text:
        # 10.0.0.1/24 names an address, not a network: say which network was meant instead of guessing
        raise _invalid(field, f"'{text}' has host bits set: the network is {net}")
    return net


def parse_address(text: str, field: str = "private_ip") -> ipaddress.IPv4Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise _invalid(field, f"'{text}' is not an IPv4 address") from None
    if not isinstance(addr, ipaddress.IPv4Address) or str(addr) != text:
        raise _invalid(field, f"'{text}' is not an IPv4 address in dotted-quad form")
    return addr


def check_vpc_cidr(net: ipaddress.IPv4Network, field: str = "cidr") -> None:
    if not any(net.subnet_of(block) for block in RFC1918):
        raise _invalid(field, f"{net} is not a private (RFC 1918) network: use a network inside 10.0.0.0/8, "
                              "172.16.0.0/12 or 192.168.0.0/16")
    if not VPC_MIN_PREFIX <= net.prefixlen <= VPC_MAX_PREFIX:
        raise _invalid(field, f"a VPC's prefix is /{VPC_MIN_PREFIX} to /{VPC_MAX_PREFIX}, not /{net.prefixlen}")


def check_subnet_cidr(net: ipaddress.IPv4Network, vpc: ipaddress.IPv4Network, field: str = "cidr") -> None:
    if not net.subnet_of(vpc):
        raise _invalid(field, f"{net} is not inside the VPC's network {vpc}")
    if net.prefixlen > SUBNET_MAX_PREFIX:
        raise _invalid(field, f"a subnet's prefix is at most /{SUBNET_MAX_PREFIX} (16 addresses, 4 of them "
                              f"reserved), not /{net.prefixlen}")


def overlapping(net: ipaddress.IPv4Network, others: dict[str, str]) -> list[str]:
    """The keys of `others` (key → CIDR) whose network overlaps `net`."""
    return [key for key, cidr in others.items() if net.overlaps(ipaddress.IPv4Network(cidr))]


@dataclass(frozen=True)
class Layout:
    """The fixed addresses of a subnet."""

    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    dns: ipaddress.IPv4Address
    broadcast: ipaddress.IPv4Address

    @property
    def reserved(self) -> frozenset[ipaddress.IPv4Address]:
        return frozenset({self.network.network_address, self.gateway, self.dns, self.broadcast})

    @property
    def first_free(self) -> int:
        return int(self.dns) + 1

    @property
    def last_free(self) -> int:
        return int(self.broadcast) - 1

    @property
    def capacity(self) -> int:
        """Addresses interfaces and NAT gateways may hold."""
        return self.last_free - self.first_free + 1


def layout(net: ipaddress.IPv4Network) -> Layout:
    if net.prefixlen > SUBNET_MAX_PREFIX:  # never for a stored subnet; a guard for callers
        raise ValueError(f"{net} is smaller than /{SUBNET_MAX_PREFIX}")
    base = int(net.network_address)
    return Layout(network=net, gateway=ipaddress.IPv4Address(base + 1), dns=ipaddress.IPv4Address(base + 2),
                  broadcast=net.broadcast_address)


def pick_free(lay: Layout, used: set[int]) -> ipaddress.IPv4Address | None:
    """The lowest address of the subnet that is neither reserved nor in `used`; None when full."""
    for value in range(lay.first_free, lay.last_free + 1):
        if value not in used:
            return ipaddress.IPv4Address(value)
    return None


def check_requested(lay: Layout, addr: ipaddress.IPv4Address, used: set[int], field: str = "private_ip") -> None:
    """A requested address must be a free, unreserved address of the subnet."""
    if addr not in lay.network:
        raise _invalid(field, f"{addr} is not in the subnet {lay.network}")
    if addr in lay.reserved:
        raise _invalid(field, f"{addr} is reserved in {lay.network} (network {lay.network.network_address}, "
                              f"gateway {lay.gateway}, DNS {lay.dns}, broadcast {lay.broadcast})")
    if int(addr) in used:
        raise errors.Conflict(f"{addr} is already in use in subnet {lay.network}", code="address_in_use")


def new_mac() -> str:
    """A random locally administered unicast MAC (first octet x2, x6, xA or xE: 02:…)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in raw)


# --- allocation in the database ------------------------------------------------------------------------

def lock_subnet(s: Session, subnet_id: str) -> Subnet:
    """The subnet's row, locked for the rest of the transaction (allocations in it are serialised)."""
    subnet = s.scalar(select(Subnet).where(Subnet.id == subnet_id).with_for_update())
    if subnet is None:
        raise errors.NotFound(f"Subnet {subnet_id} not found")
    return subnet


def used_addresses(s: Session, subnet_id: str) -> set[int]:
    return {int(ipaddress.IPv4Address(a)) for a in
            s.scalars(select(IpAllocation.address).where(IpAllocation.subnet_id == subnet_id))}


def allocate(s: Session, subnet: Subnet, *, owner_kind: str, owner_id: str, requested: str | None = None,
             field: str = "private_ip") -> str:
    """Take an address of `subnet` (the given one, or the lowest free) for an owner; 409 when full.

    The caller must hold the subnet's lock (:func:`lock_subnet`) in its transaction.
    """
    lay = layout(ipaddress.IPv4Network(subnet.cidr))
    used = used_addresses(s, subnet.id)
    if requested is not None:
        addr = parse_address(requested, field)
        check_requested(lay, addr, used, field)
    else:
        picked = pick_free(lay, used)
        if picked is None:
            raise errors.Conflict(f"Subnet {subnet.id} ({subnet.cidr}) has no free address left: all "
                                  f"{lay.capacity} usable addresses are taken", code="subnet_full")
        addr = picked
    s.add(IpAllocation(subnet_id=subnet.id, address=str(addr), owner_kind=owner_kind, owner_id=owner_id,
                       project_id=subnet.project_id))
    s.flush()
    return str(addr)


def release(s: Session, subnet_id: str, address: str) -> None:
    row = s.get(IpAllocation, (subnet_id, address))
    if row is not None:
        s.delete(row)


def free_count(s: Session, subnet: Subnet) -> int:
    lay = layout(ipaddress.IPv4Network(subnet.cidr))
    return lay.capacity - len(used_addresses(s, subnet.id))
