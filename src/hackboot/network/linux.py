"""LinuxNetworkDriver: the VPC data plane on Linux namespaces, veth/tap, VXLAN, nftables and dnsmasq.

Design: a *routed* port model (one L3 hop, like Calico) rather than a bridge per subnet.

  host namespace ``hb-<host>``           underlay ``ul0`` (VXLAN sockets live here), uplink ``wan0``,
  │                                      one transit veth ``t<vpc>`` per VPC router, table ``hb_host``
  └─ router namespace ``hb-<host>-<vpc>`` per VPC on this host (so CIDRs of different VPCs may overlap)
       up0      transit to the host namespace (169.254.0.2 ↔ 169.254.0.1, default route)
       vx0      VXLAN, VNI of the VPC, created in the host namespace and moved here
       lo       also holds each subnet's DNS address (/32)
       p<hash>  one interface per local port: a tap (guest) or a veth whose other end is in the
                namespace standing in for a guest; the subnet's gateway address is on it
                (``noprefixroute``), a /32 route and a permanent neighbour entry point at the port

Why routed: every packet between two ports crosses the router's ``forward`` hook with the *port's own
interface* as input or output, so stateful security groups are plain conntrack + verdict maps keyed by
interface (Linux bridges would need bridge-family conntrack or br_netfilter, and lose the port identity).
A guest still sees an ordinary subnet: the router answers ARP for its neighbours (``proxy_arp``: only for
addresses it has a route to, so unknown addresses of the VPC — covered by an ``unreachable`` route —
get no answer), and broadcast stays on the port's own link. Anti-spoofing is exact: a port may only send
from its MAC and IP.

Across hosts each router has a VXLAN device with a MAC derived from (VNI, host underlay IP). A remote
port is a /32 route on ``vx0`` with a permanent neighbour entry naming the remote router's MAC and a
static FDB entry sending that MAC to the remote host's underlay IP: no multicast, no learning, no
flooding. The remote router routes the packet to its local port; egress rules are checked on the
sending host, ingress rules on the receiving host, each with its own conntrack.

Internet: the host namespace routes each public address (floating IPs, NAT gateways) to its router over
the transit link and answers ARP for it on the uplink (proxy ARP), so the outside sees the floating pool
as on-link. The router DNATs/SNATs floating IPs and SNATs private subnets to the NAT gateway's address;
nothing enters a router from the uplink except through a floating IP's DNAT (private subnets are never
reachable from outside). Public-subnet ports without a floating IP, like private ones without a NAT
gateway, do not reach the outside.

Convergence: ``apply_vpc`` reads the namespace's links, addresses, routes, neighbours and FDB and emits
only the differences (one ``ip -batch``); the firewall is one atomic ``nft -f`` replacing the VPC's table
(skipped when the rendered text is unchanged); dnsmasq gets new host files + SIGHUP. Established flows
survive all of it: conntrack lives outside the table and no interface that did not change is touched.
Removing a security-group rule stops *new* connections; an established one keeps flowing until it ends
(conntrack, as in every stateful cloud firewall). Detaching a floating IP deletes its conntrack entries,
so it is cut at once.

A NAT gateway acts on one host; the other hosts with ports in its private subnets relay those ports'
outside traffic to that host's router over VXLAN (policy routing, see ``RELAY_HOP``), so only one host
needs the uplink and the address. A floating IP acts on the host of its port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hackboot.core import privsep
from hackboot.network import dnsmasq, netns, nft
from hackboot.network.driver import (
    Capability,
    FloatingIpSpec,
    FlowLogSpec,
    FlowRecord,
    HostUnderlay,
    InvalidSpec,
    NatSpec,
    NetworkDriver,
    NetworkDriverError,
    Observed,
    ObservedVpc,
    PeerLink,
    PortSpec,
    RemotePort,
    SecurityGroupSpec,
    TapRef,
    VpcSpec,
    validate,
)
from hackboot.network.nflog import NflogReader

log = logging.getLogger(__name__)

UNDERLAY_IF = "ul0"
UPLINK_IF = "wan0"
SVC_IF = "lo"  # holds the subnets' DNS addresses (/32); the router answers ARP for them
RUN_ROOT = Path("/run/hackboot/network")
TRANSIT_HOST_IP = "169.254.0.1"
TRANSIT_ROUTER_IP = "169.254.0.2"
# A NAT gateway acting on another host: this router sends the private subnets' traffic for the outside to a
# next hop on the VXLAN device whose permanent neighbour entry is that host's router (policy routing table
# RELAY_TABLE, consulted after the main table minus its default route).
RELAY_HOP = "169.254.0.3"
RELAY_TABLE = 100
RELAY_RULE_PREF = 1000  # and +1
VXLAN_PORT = 4789
_PORT_IF_RE = re.compile(r"^p[0-9a-f]{11}$")
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def _h(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def host_tag(host: str) -> str:
    slug = re.sub(r"[^a-z0-9]", "", host.lower())[:8]
    return f"{slug}{_h(host, 4)}"


def vpc_tag(vpc_id: str) -> str:
    return _h(vpc_id, 10)


def port_ifname(port_id: str) -> str:
    return "p" + _h(port_id, 11)


def gratuitous_arp(mac: bytes, ip: str) -> bytes:
    """An Ethernet broadcast ARP request for `ip` from `ip` at `mac` (RFC 5227 announcement)."""
    addr = ipaddress.IPv4Address(ip).packed
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\x00" * 6 + addr
    return eth + arp


def router_mac(vni: int, host_ip: str) -> str:
    """The MAC of a VPC router's VXLAN device on the host with underlay `host_ip` (locally administered)."""
    raw = hashlib.sha256(f"{vni}/{host_ip}".encode()).digest()[:5]
    return "0a:" + ":".join(f"{b:02x}" for b in raw)


class LinuxNetworkDriver(NetworkDriver):
    name = "linux"
    capabilities = frozenset(Capability)

    def __init__(self, state_dir: Path, *, run_root: Path = RUN_ROOT, supervise_interval: float | None = 2.0) -> None:
        """`state_dir`: this host's data-plane files (what each VPC published to the host namespace, the
        rulesets last loaded); `run_root`: dnsmasq's files. With `supervise_interval`, a thread restarts
        dead dnsmasq processes."""
        self.state_dir = Path(state_dir)
        self.run_root = Path(run_root)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o711)
        self._host: HostUnderlay | None = None
        self._host_lock = threading.Lock()
        self._vpc_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._readers: dict[str, NflogReader] = {}
        self._pending: list[FlowRecord] = []
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        if supervise_interval:
            self._supervisor = threading.Thread(target=self._supervise_loop, args=(supervise_interval,),
                                                name="netdrv-supervisor", daemon=True)
            self._supervisor.start()

    # --- naming ----------------------------------------------------------------------------------

    def _require_host(self) -> HostUnderlay:
        if self._host is None:
            raise NetworkDriverError("ensure_host() must be called first")
        return self._host

    @property
    def host_ns(self) -> str:
        return f"hb-{host_tag(self._require_host().host)}"

    def router_ns(self, vpc_id: str) -> str:
        return f"{self.host_ns}-{vpc_tag(vpc_id)}"

    def _vpc_dir(self, vpc_id: str) -> Path:
        return self.state_dir / "vpcs" / vpc_tag(vpc_id)

    def _dhcp_dir(self, tag: str) -> Path:
        """dnsmasq's files for the VPC of `tag`: under the run root, which the unprivileged account can
        traverse (the agent's state directory is closed to it; dnsmasq re-reads its host files after
        dropping root)."""
        return self.run_root / host_tag(self._require_host().host) / tag

    def _dhcp(self, vpc_id: str) -> dnsmasq.Dnsmasq:
        tag = vpc_tag(vpc_id)
        return dnsmasq.Dnsmasq(f"{self.host_ns}-{tag}", self._dhcp_dir(tag))

    @contextlib.contextmanager
    def _vpc_lock(self, vpc_id: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._vpc_locks.setdefault(vpc_id, threading.Lock())
        with lock:
            yield

    # --- host ------------------------------------------------------------------------------------

    def ensure_host(self, underlay: HostUnderlay) -> None:
        if not underlay.host or len(underlay.host) > 253:
            raise InvalidSpec("host name is empty or too long")
        if underlay.mtu < 1280 or underlay.mtu > 9216:
            raise InvalidSpec(f"underlay MTU {underlay.mtu} is outside 1280..9216")
        self._host = underlay
        ns = self.host_ns
        with self._host_lock:
            netns.create(ns)
            netns.sysctl(ns, {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                              "net.ipv4.conf.default.rp_filter": 0, "net.ipv6.conf.all.disable_ipv6": 1,
                              "net.ipv6.conf.default.disable_ipv6": 1})
            links = {lk["ifname"]: lk for lk in netns.ip_json(ns, "link", "show")}
            tag = _h(underlay.host, 10)
            if underlay.address:
                ipaddress.IPv4Interface(underlay.address)
                self._ensure_link(ns, UNDERLAY_IF, links, underlay.peer, f"u{tag}", underlay.mtu)
                self._ensure_addr(ns, UNDERLAY_IF, underlay.address)
            if underlay.uplink:
                up = underlay.uplink
                ipaddress.IPv4Interface(up.address)
                ipaddress.IPv4Address(up.gateway)
                self._ensure_link(ns, UPLINK_IF, links, up.peer, f"w{tag}", 1500)
                self._ensure_addr(ns, UPLINK_IF, up.address)
                netns.ip(ns, "route", "replace", "default", "via", up.gateway, "dev", UPLINK_IF)
                # The outside finds the floating pool "on link": we answer ARP for addresses routed to routers.
                netns.sysctl(ns, {f"net.ipv4.conf.{UPLINK_IF}.proxy_arp": 1})
            self._apply_host_table()

    def _ensure_link(self, ns: str, ifname: str, links: dict[str, Any], peer: PeerLink | None, peer_name: str,
                     mtu: int) -> None:
        if ifname in links:
            return
        if peer is None:
            # No peer: an empty bridge holds the address (a single host; an operator may enslave a NIC to it).
            netns.ip(ns, "link", "add", ifname, "mtu", str(mtu), "type", "bridge")
        else:
            netns.create(peer.namespace)
            peer_links = {lk["ifname"] for lk in netns.ip_json(peer.namespace, "link", "show")}
            if peer.bridge not in peer_links:
                netns.ip_batch(peer.namespace, [f"link add {peer.bridge} type bridge", f"link set {peer.bridge} up"])
            if peer_name in peer_links:
                netns.ip(peer.namespace, "link", "del", peer_name)
            netns.veth(ns, ifname, peer.namespace, peer_name, mtu=mtu)
            netns.ip_batch(peer.namespace, [f"link set {peer_name} master {peer.bridge}", f"link set {peer_name} up"])
        netns.ip(ns, "link", "set", ifname, "up")

    @staticmethod
    def _ensure_addr(ns: str, ifname: str, address: str) -> None:
        have = {f"{a['local']}/{a['prefixlen']}" for lk in netns.ip_json(ns, "addr", "show", "dev", ifname)
                for a in lk.get("addr_info", []) if a.get("family") == "inet"}
        if address not in have:
            for old in have:
                netns.ip(ns, "addr", "del", old, "dev", ifname)
            netns.ip(ns, "addr", "add", address, "dev", ifname)

    def _published(self) -> list[dict[str, Any]]:
        """What every VPC on this host published to the host namespace (its state files)."""
        out = []
        for f in sorted((self.state_dir / "vpcs").glob("*/published.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(f.read_text()))
        return out

    def _apply_host_table(self) -> None:
        pub = self._published()
        text = nft.render_host(underlay_if=UNDERLAY_IF, uplink_if=UPLINK_IF, transit_prefix="t",
                               public_src=[(p["transit"], ip) for p in pub for ip in p["public_ips"]],
                               vxlan_peers=[ip for p in pub for ip in p["peers"]])
        cache = self.state_dir / "host.nft"
        if _read(cache) == text and self._table_exists(self.host_ns, nft.HOST_TABLE):
            return
        netns.nft(self.host_ns, text)
        cache.write_text(text)

    @staticmethod
    def _table_exists(ns: str, table: str) -> bool:
        return netns.run(ns, ["nft", "list", "table", "inet", table], check=False).returncode == 0

    # --- VPC -------------------------------------------------------------------------------------

    def apply_vpc(self, vpc: VpcSpec, local_ports: Sequence[PortSpec] = (),
                  remote_ports: Sequence[RemotePort] = (), groups: Sequence[SecurityGroupSpec] = (),
                  floating_ips: Sequence[FloatingIpSpec] = (), nat: NatSpec | None = None,
                  flow_logs: Sequence[FlowLogSpec] = ()) -> None:
        validate(vpc, local_ports, remote_ports, groups, floating_ips, nat, flow_logs)
        host = self._require_host()
        # A veth port goes into a namespace its owner makes (a load balancer's): until that exists, the rest
        # of the VPC is applied without the port (the next apply_vpc adds it).
        waiting = {p.id for p in local_ports if p.attachment.kind == "veth"
                   and not netns.exists(netns.check_name(p.attachment.namespace or ""))}
        if waiting:
            log.info("ports %s wait for their namespaces", ", ".join(sorted(waiting)))
            local_ports = [p for p in local_ports if p.id not in waiting]
            floating_ips = [f for f in floating_ips if f.port_id not in waiting]
            flow_logs = [dataclasses.replace(fl, port_ids=tuple(i for i in fl.port_ids if i not in waiting))
                         if fl.port_ids is not None else fl for fl in flow_logs]
        if remote_ports and not host.ip:
            raise InvalidSpec("remote ports need a host underlay address (VXLAN)")
        if (floating_ips or (nat and nat.here)) and not host.uplink:
            raise InvalidSpec("floating IPs and NAT gateways need a host uplink")
        if nat is not None and not nat.here and not host.ip:
            raise InvalidSpec("a NAT gateway on another host needs a host underlay address (VXLAN)")
        ns = self.router_ns(vpc.id)
        vdir = self._vpc_dir(vpc.id)
        with self._vpc_lock(vpc.id):
            vdir.mkdir(parents=True, exist_ok=True)
            (vdir / "vpc_id").write_text(vpc.id)
            previous = _read_json(vdir / "published.json")
            netns.create(ns)
            self._converge_links(vpc, ns, local_ports, remote_ports, nat)
            ifnames = {p.id: port_ifname(p.id) for p in local_ports}
            nat_here = nat if nat is not None and nat.here else None
            text = nft.render_router(vpc, local_ports, ifnames, remote_ports, groups, floating_ips, nat_here,
                                     flow_logs)
            if _read(vdir / "router.nft") != text or not self._table_exists(ns, nft.ROUTER_TABLE):
                netns.nft(ns, text)
                (vdir / "router.nft").write_text(text)
            self._converge_dhcp(vpc, ns, vdir, local_ports, remote_ports)
            publics = sorted({f.public_ip for f in floating_ips} | ({nat_here.public_ip} if nat_here else set()))
            relay = {nat.host_ip} if nat is not None and nat.host_ip else set()
            published = {"vpc_id": vpc.id, "transit": "t" + vpc_tag(vpc.id), "public_ips": publics,
                         "peers": sorted({r.host_ip for r in remote_ports} | relay)}
            added = self._converge_host_routes(published)
            with self._host_lock:
                _write_json(vdir / "published.json", published)
                self._apply_host_table()
            if added and host.uplink:
                self._announce(added)
            gone = set(previous.get("public_ips", [])) - set(publics) if previous else set()
            if gone:
                self._forget_connections(ns, sorted(gone))
            self._converge_flow_logs(vpc.id, ns, bool(flow_logs))

    def _converge_links(self, vpc: VpcSpec, ns: str, ports: Sequence[PortSpec],
                        remote_ports: Sequence[RemotePort], nat: NatSpec | None = None) -> None:
        host = self._require_host()
        mtu = host.overlay_mtu
        tag = vpc_tag(vpc.id)
        netns.sysctl(ns, {"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                          "net.ipv4.conf.default.rp_filter": 0, "net.ipv4.conf.default.proxy_arp": 1,
                          "net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        links = {lk["ifname"]: lk for lk in netns.ip_json(ns, "-d", "link", "show")}
        if nft.UPLINK_IF not in links:
            transit = "t" + tag
            with contextlib.suppress(netns.NetnsError):
                netns.ip(self.host_ns, "link", "del", transit)  # a leftover of a half-built router
            netns.veth(ns, nft.UPLINK_IF, self.host_ns, transit)
            netns.ip_batch(self.host_ns, [f"addr add {TRANSIT_HOST_IP}/32 dev {transit}", f"link set {transit} up"])
            netns.ip_batch(ns, [f"addr add {TRANSIT_ROUTER_IP}/32 dev {nft.UPLINK_IF}",
                                f"link set {nft.UPLINK_IF} up"])
        vx = links.get(nft.VXLAN_IF)
        if vx is not None and vx.get("linkinfo", {}).get("info_data", {}).get("id") != vpc.vni:
            netns.ip(ns, "link", "del", nft.VXLAN_IF)
            vx = None
        if vx is None and host.ip:
            tmp = "x" + tag
            with contextlib.suppress(netns.NetnsError):
                netns.ip(self.host_ns, "link", "del", tmp)
            # Created in the host namespace (its UDP socket stays there, on the underlay), then moved in.
            netns.ip(self.host_ns, "link", "add", tmp, "address", router_mac(vpc.vni, host.ip), "mtu", str(mtu),
                     "type", "vxlan", "id", str(vpc.vni), "local", host.ip, "dstport", str(VXLAN_PORT),
                     "nolearning")
            netns.ip(self.host_ns, "link", "set", tmp, "netns", ns)
            netns.ip_batch(ns, [f"link set {tmp} name {nft.VXLAN_IF}", f"link set {nft.VXLAN_IF} up"])

        # Ports: create what is missing or changed, delete what is no longer wanted.
        account = None
        batch: list[str] = []
        want = {port_ifname(p.id): p for p in ports}
        for name in links:
            if _PORT_IF_RE.match(name) and name not in want:
                batch.append(f"link del {name}")
        for name, p in sorted(want.items()):
            att = p.attachment
            alias = f"{p.id} {att.kind} {att.namespace or '-'} {att.ifname} {p.mac}"
            lk = links.get(name)
            if lk is not None and lk.get("ifalias") == alias and lk.get("mtu") == mtu:
                continue
            if lk is not None:
                netns.ip(ns, "link", "del", name)
            if att.kind == "veth":
                ns_g = netns.check_name(att.namespace or "")
                with contextlib.suppress(netns.NetnsError):
                    netns.ip(ns_g, "link", "del", att.ifname)
                netns.ip(ns, "link", "add", name, "mtu", str(mtu), "type", "veth", "peer", "name", att.ifname,
                         "address", p.mac, "mtu", str(mtu), "netns", ns_g)
                netns.ip(ns_g, "link", "set", att.ifname, "up")
            else:
                account = account or privsep.unprivileged_account()
                netns.ip(ns, "tuntap", "add", "dev", name, "mode", "tap", "user", str(account.uid),
                         "group", str(account.gid))
                netns.ip(ns, "link", "set", name, "mtu", str(mtu))
            batch += [f'link set {name} alias "{alias}"', f"link set {name} up"]
        netns.ip_batch(ns, batch)
        if want:
            netns.sysctl(ns, {f"net.ipv4.conf.{n}.proxy_arp": 1 for n in want})
        iface_off = {f"net.ipv4.conf.{n}.proxy_arp": 0 for n in (nft.UPLINK_IF, nft.VXLAN_IF)
                     if n == nft.UPLINK_IF or host.ip}
        netns.sysctl(ns, iface_off)

        # Addresses: each port carries its subnet's gateway (the prefix tells dnsmasq the subnet);
        # the loopback holds every subnet's DNS address.
        subnets = {s.id: s for s in vpc.subnets}
        want_addrs: dict[str, set[str]] = {SVC_IF: {f"{s.dns}/32" for s in vpc.subnets}}
        for name, p in want.items():
            s = subnets[p.subnet_id]
            want_addrs[name] = {f"{s.gateway}/{ipaddress.IPv4Network(s.cidr).prefixlen}"}
        have_addrs: dict[str, set[str]] = {}
        for lk in netns.ip_json(ns, "addr", "show"):
            if lk["ifname"] in want_addrs:
                have_addrs[lk["ifname"]] = {f"{a['local']}/{a['prefixlen']}" for a in lk.get("addr_info", [])
                                            if a.get("family") == "inet"}
        batch = []
        for dev, addrs in want_addrs.items():
            have = have_addrs.get(dev, set())
            batch += [f"addr del {a} dev {dev}" for a in sorted(have - addrs) if a != "127.0.0.1/8"]
            batch += [f"addr add {a} dev {dev}" + ("" if dev == SVC_IF else " noprefixroute")
                      for a in sorted(addrs - have)]
        netns.ip_batch(ns, batch)

        # Routes, neighbours, FDB.
        want_routes = {("unicast", "default", nft.UPLINK_IF, TRANSIT_HOST_IP),
                       ("unreachable", str(ipaddress.IPv4Network(vpc.cidr)), "", "")}
        want_neigh: dict[tuple[str, str], str] = {}
        for name, p in want.items():
            want_routes.add(("unicast", p.ip, name, ""))
            want_neigh[(p.ip, name)] = p.mac
        fdb: dict[str, str] = {}
        for r in remote_ports:
            mac = router_mac(vpc.vni, r.host_ip)
            want_routes.add(("unicast", r.ip, nft.VXLAN_IF, ""))
            want_neigh[(r.ip, nft.VXLAN_IF)] = mac
            fdb[mac] = r.host_ip
        relay_sources: tuple[str, ...] = ()
        if nat is not None and nat.host_ip is not None:
            mac = router_mac(vpc.vni, nat.host_ip)
            want_neigh[(RELAY_HOP, nft.VXLAN_IF)] = mac
            fdb[mac] = nat.host_ip
            relay_sources = nat.source_cidrs
        have_routes = set()
        for rt in netns.ip_json(ns, "route", "show", "table", "main"):
            have_routes.add((rt.get("type", "unicast"), rt["dst"], rt.get("dev", ""), rt.get("gateway", "")))
        batch = []
        for typ, dst, dev, _gw in sorted(have_routes - want_routes):
            if dev == SVC_IF or (dev and dev not in want and dev not in (nft.VXLAN_IF, nft.UPLINK_IF)):
                continue  # kernel routes of interfaces being deleted go with them
            batch.append(f"route del {'' if typ == 'unicast' else typ + ' '}{dst}" + (f" dev {dev}" if dev else ""))
        for typ, dst, dev, gw in sorted(want_routes - have_routes):
            if typ == "unreachable":
                batch.append(f"route replace unreachable {dst}")
            elif gw:
                batch.append(f"route replace {dst} via {gw} dev {dev} onlink")
            else:
                batch.append(f"route replace {dst} dev {dev} scope link")
        have_neigh: dict[tuple[str, str], str] = {}
        for n in netns.ip_json(ns, "neigh", "show", "nud", "permanent"):
            if n.get("dev") in want or n.get("dev") == nft.VXLAN_IF or _PORT_IF_RE.match(n.get("dev", "")):
                have_neigh[(n["dst"], n["dev"])] = n.get("lladdr", "")
        for key in sorted(have_neigh):
            if key not in want_neigh and (key[1] in want or key[1] == nft.VXLAN_IF):
                batch.append(f"neigh del {key[0]} dev {key[1]}")
        for key, mac in sorted(want_neigh.items()):
            if have_neigh.get(key) != mac:
                batch.append(f"neigh replace {key[0]} lladdr {mac} dev {key[1]} nud permanent")
        netns.ip_batch(ns, batch)
        if host.ip:
            have_fdb = {}
            for e in _bridge_fdb(ns, nft.VXLAN_IF):
                if e.get("dst") and e.get("mac") != "00:00:00:00:00:00":
                    have_fdb[e["mac"]] = e["dst"]
            fb = [f"fdb del {m} dev {nft.VXLAN_IF} dst {ip} self" for m, ip in sorted(have_fdb.items())
                  if fdb.get(m) != ip]
            fb += [f"fdb replace {m} dev {nft.VXLAN_IF} dst {ip} self permanent" for m, ip in sorted(fdb.items())
                   if have_fdb.get(m) != ip]
            netns.ip_batch(ns, fb, tool="bridge")
        self._converge_relay(ns, relay_sources)

    @staticmethod
    def _converge_relay(ns: str, sources: Sequence[str]) -> None:
        """Policy routing of the private subnets' outside traffic to the NAT gateway's host (see RELAY_HOP):
        per source CIDR, the main table without its default route first, then RELAY_TABLE."""
        want = set()
        for cidr in sources:
            want.add((RELAY_RULE_PREF, f"from {cidr} lookup main suppress_prefixlength 0"))
            want.add((RELAY_RULE_PREF + 1, f"from {cidr} lookup {RELAY_TABLE}"))
        have = set()
        for r in netns.ip_json(ns, "rule", "show"):
            pref = r.get("priority")
            if pref in (RELAY_RULE_PREF, RELAY_RULE_PREF + 1):
                src = f"{r.get('src')}/{r.get('srclen', 32)}"
                table = "main" if pref == RELAY_RULE_PREF else str(RELAY_TABLE)
                extra = " suppress_prefixlength 0" if pref == RELAY_RULE_PREF else ""
                have.add((pref, f"from {src} lookup {table}{extra}"))
        batch = [f"rule del pref {pref} {rule}" for pref, rule in sorted(have - want)]
        batch += [f"rule add pref {pref} {rule}" for pref, rule in sorted(want - have)]
        # (`ip route show table N` fails while the table is empty: list them all and pick ours.)
        routes = [r for r in netns.ip_json(ns, "route", "show", "table", "all")
                  if str(r.get("table")) == str(RELAY_TABLE)]
        if want and not routes:
            batch.append(f"route replace default via {RELAY_HOP} dev {nft.VXLAN_IF} onlink table {RELAY_TABLE}")
        elif not want and routes:
            batch.append(f"route flush table {RELAY_TABLE}")
        netns.ip_batch(ns, batch)

    def _converge_host_routes(self, published: dict[str, Any]) -> list[str]:
        """Route the VPC's public addresses to its router; returns those routed now."""
        transit = published["transit"]
        have = {rt["dst"] for rt in netns.ip_json(self.host_ns, "route", "show", "dev", transit)
                if rt.get("gateway") == TRANSIT_ROUTER_IP}
        want = set(published["public_ips"])
        batch = [f"route del {ip} dev {transit}" for ip in sorted(have - want)]
        batch += [f"route replace {ip} via {TRANSIT_ROUTER_IP} dev {transit} onlink" for ip in sorted(want - have)]
        netns.ip_batch(self.host_ns, batch)
        return sorted(want - have)

    def _announce(self, ips: Sequence[str]) -> None:
        """Gratuitous ARP on the uplink for public addresses this host starts answering for, so the outside
        forgets at once the host that answered before (a floating IP or NAT gateway moved between hosts).
        Best effort: without it the neighbours' ARP caches expire on their own."""
        try:
            mac = bytes.fromhex(netns.ip_json(self.host_ns, "link", "show", UPLINK_IF)[0]["address"].replace(":", ""))
            frames = [gratuitous_arp(mac, ip) for ip in ips]

            def send() -> None:
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                    sock.bind((UPLINK_IF, 0))
                    for frame in frames:
                        sock.send(frame)

            netns.in_thread(self.host_ns, send)
        except (OSError, netns.NetnsError, IndexError, KeyError, ValueError) as exc:
            log.warning("cannot announce %s on the uplink: %s", ", ".join(ips), exc)

    def _converge_dhcp(self, vpc: VpcSpec, ns: str, vdir: Path, ports: Sequence[PortSpec],
                       remote_ports: Sequence[RemotePort]) -> None:
        account = privsep.unprivileged_account()
        try:
            import grp

            group = grp.getgrgid(account.gid).gr_name
        except KeyError:
            group = str(account.gid)
        d = self._dhcp(vpc.id)
        _traversable(self.run_root, d.run_dir.parent)
        files = dnsmasq.render(vpc, ports, remote_ports, run_dir=d.run_dir, user=account.name, group=group,
                               mtu=self._require_host().overlay_mtu, port_glob="p*")
        d.apply(files)

    def _forget_connections(self, ns: str, public_ips: Sequence[str]) -> None:
        """Delete the router's conntrack entries of public addresses no longer attached (cut at once)."""
        from pyroute2 import Conntrack  # type: ignore[import-untyped]
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple  # type: ignore[import-untyped]

        def work() -> int:
            n = 0
            ct = Conntrack()
            try:
                for ip in public_ips:
                    for flt in ({"tuple_orig": NFCTAttrTuple(daddr=ip)}, {"tuple_reply": NFCTAttrTuple(daddr=ip)}):
                        for entry in list(ct.dump_entries(**flt)):
                            with contextlib.suppress(Exception):
                                ct.delete(entry)
                                n += 1
            finally:
                ct.close()
            return n

        netns.in_thread(ns, work)

    def _converge_flow_logs(self, vpc_id: str, ns: str, wanted: bool) -> None:
        reader = self._readers.get(vpc_id)
        if wanted and (reader is None or not reader.alive()):
            if reader is not None:
                self._pending += reader.drain()
            reader = NflogReader(ns, vpc_id)
            reader.start()
            self._readers[vpc_id] = reader
        elif not wanted and reader is not None:
            reader.stop()
            self._pending += reader.drain()
            del self._readers[vpc_id]

    def remove_vpc(self, vpc_id: str) -> None:
        ns = self.router_ns(vpc_id)  # (needs ensure_host)
        vdir = self._vpc_dir(vpc_id)
        with self._vpc_lock(vpc_id):
            reader = self._readers.pop(vpc_id, None)
            if reader is not None:
                reader.stop()
                self._pending += reader.drain()
            if netns.exists(ns):
                self._dhcp(vpc_id).stop()
                netns.delete(ns)
            # Deleting the namespace destroyed the transit veth; its host routes went with it.
            transit = "t" + vpc_tag(vpc_id)
            with contextlib.suppress(netns.NetnsError):
                netns.ip(self.host_ns, "link", "del", transit)
            with self._host_lock:
                with contextlib.suppress(FileNotFoundError):
                    (vdir / "published.json").unlink()
                self._apply_host_table()
            _rmtree(vdir)
            _rmtree(self._dhcp(vpc_id).run_dir)

    # --- observation -----------------------------------------------------------------------------

    def _known(self) -> dict[str, str]:
        """vpc tag → VPC id, from the state directory."""
        out = {}
        for f in (self.state_dir / "vpcs").glob("*/vpc_id"):
            with contextlib.suppress(OSError):
                out[f.parent.name] = f.read_text().strip()
        return out

    def observed(self) -> Observed:
        host_ready = netns.exists(self.host_ns)
        known = self._known()
        vpcs, orphans = [], []
        for name in netns.list_ours(self.host_ns + "-"):
            tag = name[len(self.host_ns) + 1:]
            vpc_id = known.get(tag)
            if vpc_id is None:
                orphans.append(name)
                continue
            links = netns.ip_json(name, "link", "show")
            port_ids = sorted(lk.get("ifalias", "").split(" ")[0] for lk in links
                              if _PORT_IF_RE.match(lk["ifname"]) and lk.get("ifalias"))
            running = self._dhcp(vpc_id).running()
            vpcs.append(ObservedVpc(vpc_id, name, tuple(port_ids), running))
        return Observed(host_ready, tuple(vpcs), tuple(orphans))

    def remove_orphans(self, keep_vpc_ids: Sequence[str]) -> list[str]:
        keep = set(keep_vpc_ids)
        removed = []
        for v in self.observed().vpcs:
            if v.vpc_id not in keep:
                self.remove_vpc(v.vpc_id)
                removed.append(v.vpc_id)
        for name in self.observed().orphan_namespaces:
            netns.delete(name)
        for tag, vpc_id in self._known().items():  # state of a VPC whose namespace is already gone
            if vpc_id not in keep and not netns.exists(f"{self.host_ns}-{tag}"):
                self.remove_vpc(vpc_id)
                removed.append(vpc_id)
        return removed

    def destroy_host(self) -> None:
        """Remove every VPC and the host namespace (tests; decommissioning a host)."""
        for vpc_id in self._known().values():
            self.remove_vpc(vpc_id)
        for name in netns.list_ours(self.host_ns + "-"):
            netns.delete(name)
        netns.delete(self.host_ns)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "host.nft").unlink()
        _rmtree(self.run_root / host_tag(self._require_host().host))

    # --- taps ------------------------------------------------------------------------------------

    def _find_port(self, port_id: str) -> tuple[str, dict[str, Any]]:
        name = port_ifname(port_id)
        for vpc_id in self._known().values():
            ns = self.router_ns(vpc_id)
            if not netns.exists(ns):
                continue
            for lk in netns.ip_json(ns, "-d", "link", "show"):
                if lk["ifname"] == name and (lk.get("ifalias") or "").split(" ")[0] == port_id:
                    return ns, lk
        raise NetworkDriverError(f"port {port_id} is not on this host")

    def tap_for(self, port_id: str) -> TapRef:
        ns, lk = self._find_port(port_id)
        if lk.get("linkinfo", {}).get("info_kind") != "tun":
            raise NetworkDriverError(f"port {port_id} is not a tap port")
        return TapRef(ns, lk["ifname"])

    def open_tap(self, port_id: str) -> int:
        ref = self.tap_for(port_id)

        def work() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ref.ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            except OSError:
                os.close(fd)
                raise
            return fd

        return netns.in_thread(ref.namespace, work)

    # --- flow logs -------------------------------------------------------------------------------

    def read_flow_logs(self) -> list[FlowRecord]:
        out, self._pending = self._pending, []
        for reader in list(self._readers.values()):
            out += reader.drain()
        out.sort(key=lambda r: r.time)
        return out

    # --- supervision -----------------------------------------------------------------------------

    def supervise(self) -> list[str]:
        """Restart dead dnsmasq processes of the VPCs on this host; returns the VPC ids repaired."""
        if self._host is None:
            return []
        fixed = []
        for tag, vpc_id in self._known().items():
            ns = f"{self.host_ns}-{tag}"
            d = self._dhcp(vpc_id)
            if not netns.exists(ns) or not d.conf_path.exists():
                continue
            with self._vpc_lock(vpc_id):
                if netns.exists(ns) and d.conf_path.exists() and not d.running():
                    log.warning("dnsmasq of VPC %s died: restarting it", vpc_id)
                    d.start()
                    fixed.append(vpc_id)
        return fixed

    def _supervise_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.supervise()
            except Exception:
                log.exception("network supervisor pass failed")

    def close(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        for reader in self._readers.values():
            reader.stop()
            self._pending += reader.drain()
        self._readers.clear()


def _bridge_fdb(ns: str, dev: str) -> list[dict[str, Any]]:
    out = netns._run(["bridge", "-j", "-n", ns, "fdb", "show", "dev", dev]).stdout.strip()
    return json.loads(out) if out else []


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    text = _read(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _traversable(root: Path, path: Path) -> None:
    """Create `path` (under `root`) with every directory from `root` down mode 0711: the unprivileged
    account may pass through, not list."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.parents]:
        os.chmod(p, 0o711)
        if p == root:
            break


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


