"""The network data-plane driver contract.

A *network driver* makes one host's share of the tenant networks real: the routers, guest ports, security
groups, VXLAN tunnels to other hosts, DHCP/DNS, NAT and floating IPs. Like the compute driver it knows
nothing of HTTP, the database, tenants or quotas: the agent's reconciler reads the control plane's rows,
resolves everything (source groups to member IPs, which ports live on which host) and hands the driver the
complete desired state of one VPC *on this host* as plain frozen dataclasses:

    driver.ensure_host(HostUnderlay(...))                  # once at start, idempotent
    driver.apply_vpc(VpcSpec(...), local_ports=[...], remote_ports=[...], groups=[...],
                     floating_ips=[...], nat=NatSpec(...) | None, flow_logs=[...])
    driver.remove_vpc(vpc_id)                              # nothing left behind
    driver.observed()                                      # what exists (orphan cleanup, status)
    driver.tap_for(port_id) / driver.open_tap(port_id)     # how compute plugs a guest NIC in
    driver.read_flow_logs()                                # flow records since the last read

``apply_vpc`` is declarative and idempotent: called again with the same arguments it changes nothing,
and with different ones it converges to exactly them — without disturbing established flows (firewall
changes are one atomic transaction; interfaces that did not change are not recreated). A new driver
object over the same host (an agent restart) re-discovers what exists instead of rebuilding it.

Errors: :class:`NetworkDriverError` (and :class:`InvalidSpec` for a spec that cannot be realised, e.g. a
port outside its subnet); the reconciler retries the former and reports the latter as the object's
``status_reason``.
"""

from __future__ import annotations

import abc
import datetime as dt
import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["ingress", "egress"]
Protocol = Literal["tcp", "udp", "icmp", "all"]
FlowAction = Literal["accept", "reject"]
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class NetworkDriverError(RuntimeError):
    """The data plane could not be brought to the desired state (retry later)."""


class InvalidSpec(NetworkDriverError, ValueError):
    """The desired state itself is inconsistent (a port outside its subnet, a bad MAC …): do not retry."""


class Capability(enum.Enum):
    SECURITY_GROUPS = "security-groups"  # stateful, per port, sets not linear rules
    VXLAN = "vxlan"  # ports on other hosts reachable over the underlay
    DHCP_DNS = "dhcp-dns"
    FLOATING_IPS = "floating-ips"
    NAT_GATEWAY = "nat-gateway"
    FLOW_LOGS = "flow-logs"
    TAP_PORTS = "tap-ports"  # guest NICs (compute)
    VETH_PORTS = "veth-ports"  # a namespace as the "guest" (tests, benchmarks)


# --- desired state -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerLink:
    """Connect a host interface to the outside: a veth whose other end goes into our namespace
    `namespace` (``hb-…``), enslaved there to bridge `bridge` (created if missing). On one machine two
    hosts share an underlay this way; the "internet" of tests is such a namespace too."""

    namespace: str
    bridge: str = "br0"


@dataclass(frozen=True)
class UplinkSpec:
    """The host's way out (internet gateway): its address on the uplink and the next hop. Off unless the
    operator configures it (in tests: a namespace with documentation addresses)."""

    address: str  # "198.51.100.10/24"
    gateway: str  # "198.51.100.1"
    peer: PeerLink | None = None


@dataclass(frozen=True)
class HostUnderlay:
    """This host: a name (unique in the cloud), its underlay address for VXLAN, its uplink."""

    host: str
    address: str | None = None  # "192.0.2.11/24"; None: a single host, no VXLAN
    peer: PeerLink | None = None
    mtu: int = 1500
    uplink: UplinkSpec | None = None

    @property
    def ip(self) -> str | None:
        return str(ipaddress.ip_interface(self.address).ip) if self.address else None

    @property
    def overlay_mtu(self) -> int:
        return self.mtu - 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14


@dataclass(frozen=True)
class SubnetSpec:
    id: str
    cidr: str
    gateway: str  # the router's address in the subnet (guests' default route)
    dns: str  # the resolver's address in the subnet
    public: bool = False  # may hold floating IPs; private subnets reach out only through a NAT gateway


@dataclass(frozen=True)
class VpcSpec:
    id: str
    vni: int  # VXLAN network identifier, unique per VPC in the cloud
    cidr: str
    subnets: tuple[SubnetSpec, ...]
    domain: str = "vpc.internal"  # ports resolve as <hostname>.<domain>
    dns_upstreams: tuple[str, ...] = ()  # forward other names there (empty: answer only our names)


@dataclass(frozen=True)
class Attachment:
    """How a port's guest side is realised.

    ``tap``: a tap device (the guest's QEMU gets it through :meth:`NetworkDriver.open_tap`).
    ``veth``: a veth whose guest end, named `ifname`, is put in namespace `namespace` (``hb-…``, made
    by the caller) — a load balancer's VIP, or a namespace standing in for a guest in tests and benchmarks.
    Until that namespace exists the port is left out (the rest of the VPC is applied; a later apply adds it)."""

    kind: Literal["tap", "veth"] = "tap"
    namespace: str | None = None
    ifname: str = "eth0"


@dataclass(frozen=True)
class PortSpec:
    id: str
    subnet_id: str
    mac: str
    ip: str
    security_groups: tuple[str, ...] = ()  # no group: nothing in, nothing out
    hostname: str | None = None
    attachment: Attachment = field(default_factory=Attachment)


@dataclass(frozen=True)
class RemotePort:
    """A port of this VPC on another host, reached over VXLAN through that host's underlay address."""

    id: str
    ip: str
    mac: str
    host_ip: str  # the other host's underlay IP
    hostname: str | None = None


@dataclass(frozen=True)
class SecurityGroupRule:
    direction: Direction
    protocol: Protocol = "all"
    port_min: int | None = None  # tcp/udp: port range; icmp: type range; None: all
    port_max: int | None = None
    cidrs: tuple[str, ...] = ()  # remote side: CIDRs and/or …
    remote_ips: tuple[str, ...] = ()  # … the member IPs of a source group, resolved by the caller


@dataclass(frozen=True)
class SecurityGroupSpec:
    id: str
    rules: tuple[SecurityGroupRule, ...] = ()


@dataclass(frozen=True)
class FloatingIpSpec:
    public_ip: str
    port_id: str  # a local port in a public subnet


@dataclass(frozen=True)
class NatSpec:
    """A NAT gateway on this host's router: traffic from `source_cidrs` (private subnets) to the
    outside leaves with source `public_ip` (ports translated), and nothing comes in unasked.

    With `host_ip`, the gateway acts on the host with that underlay address instead: this host's router
    relays the private subnets' traffic for the outside to that host's router over VXLAN (no uplink needed
    here), and the answers come back the same way."""

    id: str
    public_ip: str
    source_cidrs: tuple[str, ...]
    host_ip: str | None = None

    @property
    def here(self) -> bool:
        return self.host_ip is None


@dataclass(frozen=True)
class FlowLogSpec:
    id: str
    port_ids: tuple[str, ...] | None = None  # None: every port of the VPC on this host
    traffic: Literal["accept", "reject", "all"] = "all"


# --- observed state ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TapRef:
    namespace: str
    ifname: str


@dataclass(frozen=True)
class ObservedVpc:
    vpc_id: str
    namespace: str
    port_ids: tuple[str, ...]
    dhcp_running: bool


@dataclass(frozen=True)
class Observed:
    host_ready: bool
    vpcs: tuple[ObservedVpc, ...]
    orphan_namespaces: tuple[str, ...]  # ours, but of no VPC this driver knows of (remove_orphans)


@dataclass(frozen=True)
class FlowRecord:
    time: dt.datetime
    vpc_id: str
    port_id: str
    direction: Direction
    action: FlowAction
    protocol: str  # "tcp", "udp", "icmp" or the number
    src_ip: str
    dst_ip: str
    src_port: int | None
    dst_port: int | None
    length: int


# --- validation (shared by every driver) -----------------------------------------------------------

def validate(vpc: VpcSpec, local_ports: Sequence[PortSpec], remote_ports: Sequence[RemotePort],
             groups: Sequence[SecurityGroupSpec], floating_ips: Sequence[FloatingIpSpec],
             nat: NatSpec | None, flow_logs: Sequence[FlowLogSpec]) -> None:
    """Raise :class:`InvalidSpec` unless the desired state is consistent."""

    def bad(msg: str) -> InvalidSpec:
        return InvalidSpec(f"VPC {vpc.id}: {msg}")

    def ident(value: str, what: str) -> None:
        if not _ID_RE.match(value):
            raise bad(f"{what} id {value!r} is not [A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}")

    def addr(value: str, what: str) -> ipaddress.IPv4Address:
        try:
            return ipaddress.IPv4Address(value)
        except ValueError:
            raise bad(f"{what} {value!r} is not an IPv4 address") from None

    def net(value: str, what: str) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(value)
        except ValueError:
            raise bad(f"{what} {value!r} is not an IPv4 network") from None

    ident(vpc.id, "VPC")
    if not 1 <= vpc.vni < 2**24:
        raise bad(f"VNI {vpc.vni} is outside 1..16777215")
    if not _DOMAIN_RE.match(vpc.domain) or len(vpc.domain) > 200:
        raise bad(f"domain {vpc.domain!r} is not a DNS name")
    for up in vpc.dns_upstreams:
        addr(up, "DNS upstream")
    cidr = net(vpc.cidr, "CIDR")
    subnets: dict[str, ipaddress.IPv4Network] = {}
    for s in vpc.subnets:
        ident(s.id, "subnet")
        n = net(s.cidr, f"subnet {s.id} CIDR")
        if not n.subnet_of(cidr):
            raise bad(f"subnet {s.id} {n} is outside {cidr}")
        if n.prefixlen > 29:
            raise bad(f"subnet {s.id} {n} is smaller than /29")
        for other_id, other in subnets.items():
            if n.overlaps(other):
                raise bad(f"subnets {s.id} and {other_id} overlap")
        for what in ("gateway", "dns"):
            a = addr(getattr(s, what), f"subnet {s.id} {what}")
            if a not in n or a in (n.network_address, n.broadcast_address):
                raise bad(f"subnet {s.id} {what} {a} is not a host address of {n}")
        subnets[s.id] = n
    by_subnet = {s.id: s for s in vpc.subnets}
    ips: dict[ipaddress.IPv4Address, str] = {}
    port_ids: set[str] = set()
    group_ids = {g.id for g in groups}
    for p in local_ports:
        ident(p.id, "port")
        if p.id in port_ids:
            raise bad(f"port {p.id} listed twice")
        port_ids.add(p.id)
        if p.subnet_id not in subnets:
            raise bad(f"port {p.id} is in unknown subnet {p.subnet_id}")
        a = addr(p.ip, f"port {p.id} IP")
        n = subnets[p.subnet_id]
        s = by_subnet[p.subnet_id]
        if a not in n or a in (n.network_address, n.broadcast_address) or str(a) in (s.gateway, s.dns):
            raise bad(f"port {p.id} IP {a} is not a free host address of subnet {p.subnet_id} {n}")
        if not _MAC_RE.match(p.mac) or int(p.mac[:2], 16) & 1:
            raise bad(f"port {p.id} MAC {p.mac!r} is not a lowercase unicast MAC")
        if p.hostname is not None and not _HOSTNAME_RE.match(p.hostname):
            raise bad(f"port {p.id} hostname {p.hostname!r} is not a DNS label")
        for gid in p.security_groups:
            if gid not in group_ids:
                raise bad(f"port {p.id} names security group {gid} that is not given")
        att = p.attachment
        if att.kind == "veth" and not att.namespace:
            raise bad(f"port {p.id}: a veth attachment needs a namespace")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$", att.ifname):
            raise bad(f"port {p.id}: interface name {att.ifname!r} is not valid")
        if a in ips:
            raise bad(f"ports {ips[a]} and {p.id} share IP {a}")
        ips[a] = p.id
    for r in remote_ports:
        ident(r.id, "remote port")
        a = addr(r.ip, f"remote port {r.id} IP")
        if not any(a in n for n in subnets.values()):
            raise bad(f"remote port {r.id} IP {a} is in no subnet")
        addr(r.host_ip, f"remote port {r.id} host IP")
        if not _MAC_RE.match(r.mac):
            raise bad(f"remote port {r.id} MAC {r.mac!r} is not a lowercase MAC")
        if r.hostname is not None and not _HOSTNAME_RE.match(r.hostname):
            raise bad(f"remote port {r.id} hostname {r.hostname!r} is not a DNS label")
        if a in ips:
            raise bad(f"ports {ips[a]} and {r.id} share IP {a}")
        ips[a] = r.id
    for g in groups:
        ident(g.id, "security group")
        for i, rule in enumerate(g.rules):
            where = f"security group {g.id} rule {i}"
            if rule.direction not in ("ingress", "egress"):
                raise bad(f"{where}: direction {rule.direction!r}")
            if rule.protocol not in ("tcp", "udp", "icmp", "all"):
                raise bad(f"{where}: protocol {rule.protocol!r}")
            limit = 255 if rule.protocol == "icmp" else 65535
            if (rule.port_min is None) != (rule.port_max is None):
                raise bad(f"{where}: give both ends of the port range or neither")
            if rule.port_min is not None and rule.port_max is not None:
                if rule.protocol == "all":
                    raise bad(f"{where}: a port range needs protocol tcp, udp or icmp")
                if not 0 <= rule.port_min <= rule.port_max <= limit:
                    raise bad(f"{where}: range {rule.port_min}-{rule.port_max} is not within 0-{limit}")
            for c in rule.cidrs:
                net(c, f"{where} CIDR")
            for ip_ in rule.remote_ips:
                addr(ip_, f"{where} remote IP")
    publics: set[str] = set()
    local_by_id = {p.id: p for p in local_ports}
    for f in floating_ips:
        addr(f.public_ip, "floating IP")
        if f.public_ip in publics:
            raise bad(f"public IP {f.public_ip} used twice")
        publics.add(f.public_ip)
        port = local_by_id.get(f.port_id)
        if port is None:
            raise bad(f"floating IP {f.public_ip} targets port {f.port_id}, which is not a local port")
        if not by_subnet[port.subnet_id].public:
            raise bad(f"floating IP {f.public_ip}: port {f.port_id} is in private subnet {port.subnet_id}")
    if sum(1 for f in floating_ips for g in floating_ips if f.port_id == g.port_id) != len(floating_ips):
        raise bad("a port has more than one floating IP")
    if nat is not None:
        ident(nat.id, "NAT gateway")
        addr(nat.public_ip, "NAT gateway IP")
        if nat.public_ip in publics:
            raise bad(f"public IP {nat.public_ip} used twice")
        if nat.host_ip is not None:
            addr(nat.host_ip, "NAT gateway host")
        for c in nat.source_cidrs:
            if not net(c, "NAT source CIDR").subnet_of(cidr):
                raise bad(f"NAT source {c} is outside {cidr}")
    for fl in flow_logs:
        ident(fl.id, "flow log")
        if fl.traffic not in ("accept", "reject", "all"):
            raise bad(f"flow log {fl.id}: traffic {fl.traffic!r}")


# --- the contract ----------------------------------------------------------------------------------

class NetworkDriver(abc.ABC):
    """One host's data plane. Methods are synchronous; the caller serialises calls per VPC (the
    reconciler never works on one object twice at once) and may call for different VPCs concurrently."""

    name: str = "abstract"
    capabilities: frozenset[Capability] = frozenset()

    @abc.abstractmethod
    def ensure_host(self, underlay: HostUnderlay) -> None:
        """Create or converge this host's data-plane namespace (underlay, uplink, host firewall)."""

    @abc.abstractmethod
    def apply_vpc(self, vpc: VpcSpec, local_ports: Sequence[PortSpec] = (),
                  remote_ports: Sequence[RemotePort] = (), groups: Sequence[SecurityGroupSpec] = (),
                  floating_ips: Sequence[FloatingIpSpec] = (), nat: NatSpec | None = None,
                  flow_logs: Sequence[FlowLogSpec] = ()) -> None:
        """Converge this VPC on this host to exactly the given state (idempotent, hitless when unchanged).

        `groups` holds every security group a local port names; rules' source groups come resolved to
        member IPs (`remote_ips`). `remote_ports` are this VPC's ports on other hosts."""

    @abc.abstractmethod
    def remove_vpc(self, vpc_id: str) -> None:
        """Remove everything of the VPC on this host (idempotent)."""

    @abc.abstractmethod
    def observed(self) -> Observed:
        """What exists on this host, read from the system (not from memory)."""

    @abc.abstractmethod
    def remove_orphans(self, keep_vpc_ids: Sequence[str]) -> list[str]:
        """Remove the VPCs on this host whose id is not in `keep_vpc_ids`; returns the ids removed."""

    @abc.abstractmethod
    def tap_for(self, port_id: str) -> TapRef:
        """Where the tap of a local tap port is (namespace + interface name)."""

    @abc.abstractmethod
    def open_tap(self, port_id: str) -> int:
        """An open file descriptor on the port's tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) for QEMU."""

    @abc.abstractmethod
    def read_flow_logs(self) -> list[FlowRecord]:
        """Flow records collected since the previous call (new connections accepted, packets rejected)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop the driver's threads; what it built keeps running (a new driver object adopts it)."""
