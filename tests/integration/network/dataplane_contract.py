"""Contract tests for :class:`hackboot.network.driver.NetworkDriver` implementations.

Written once, run against every data-plane driver: subclass :class:`DataplaneContract` in a ``test_*.py``
module and provide a ``harness`` fixture returning a :class:`DataplaneHarness` (how to make a driver for
a "host", how to simulate an agent restart).

Guests are network namespaces (veth attachment) and the checks are real traffic, sent with ``ip netns
exec``: busybox ``ping``/``udhcpc``/``nslookup`` and small Python socket tools (:data:`TOOL`). The world
of a test: hosts' data-plane namespaces joined by an underlay bridge namespace, an "internet" namespace
(198.51.100.1/24 as the outside world, 203.0.113.0/24 the floating pool, on link), guest namespaces.
Every namespace a test makes starts with a per-test prefix and is removed afterwards, failure or not.
Nothing leaves those namespaces.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hackboot.network import netns
from hackboot.network.driver import (
    Attachment,
    FloatingIpSpec,
    FlowLogSpec,
    HostUnderlay,
    InvalidSpec,
    NatSpec,
    NetworkDriver,
    PeerLink,
    PortSpec,
    RemotePort,
    SecurityGroupRule,
    SecurityGroupSpec,
    SubnetSpec,
    UplinkSpec,
    VpcSpec,
)

INTERNET_IP = "198.51.100.1"

# Socket tools run inside a guest namespace: `serve PORT` (TCP: answers "ok" to each connection and keeps
# it open, echoing), `connect IP PORT` (exit 0 if "ok" comes back), `udp-echo PORT`, `udp-count IP PORT N
# INTERVAL` (prints the number of echoes lost), `hold IP PORT SECONDS` (an established connection
# exchanging a byte every 50 ms; exit 0 if it never broke).
TOOL = r"""
import socket, sys, threading, time
cmd = sys.argv[1]
if cmd == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(64)
    print("listening", flush=True)
    def echo(c):
        c.sendall(b"ok")
        try:
            while True:
                d = c.recv(4096)
                if not d: break
                c.sendall(d)
        except OSError: pass
        c.close()
    while True:
        c, a = s.accept()
        print("peer", a[0], flush=True)
        threading.Thread(target=echo, args=(c,), daemon=True).start()
elif cmd == "connect":
    try:
        wait = float(sys.argv[4]) if len(sys.argv) > 4 else 2
        c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=wait)
        ok = c.recv(2) == b"ok"
    except OSError as e:
        print(e); sys.exit(1)
    sys.exit(0 if ok else 1)
elif cmd == "hold":
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=3)
    assert c.recv(2) == b"ok"
    print("established", flush=True)
    end = time.time() + float(sys.argv[4])
    try:
        while time.time() < end:
            c.sendall(b"x")
            if c.recv(1) != b"x": sys.exit(2)
            time.sleep(0.05)
    except OSError as e:
        print(e); sys.exit(1)
    print("held", flush=True)
elif cmd == "udp-echo":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[2])))
    print("listening", flush=True)
    while True:
        d, a = s.recvfrom(2048); s.sendto(d, a)
elif cmd == "udp-count":
    ip, port, n, interval = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
    lost = 0
    for i in range(n):
        s.sendto(str(i).encode(), (ip, port))
        try:
            while s.recv(64) != str(i).encode(): pass
        except socket.timeout:
            lost += 1
        time.sleep(interval)
    print(lost, flush=True)
"""


def tool(ns: str, *args: object, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return netns.run(ns, [sys.executable, "-c", TOOL, *map(str, args)], check=False, timeout=timeout)


def sh(ns: str, cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return netns.run(ns, ["sh", "-c", cmd], check=False, timeout=timeout)


def ping(ns: str, ip: str, count: int = 1, wait: int = 2) -> bool:
    """True if `ip` answers (a couple of tries: the first packet may wait for ARP)."""
    return any(sh(ns, f"busybox ping -c {count} -W {wait} {ip}").returncode == 0 for _ in range(2))


def connects(ns: str, ip: str, port: int, timeout: float = 2) -> bool:
    return tool(ns, "connect", ip, port, timeout).returncode == 0


@dataclass
class Guest:
    ns: str
    port: PortSpec

    @property
    def ip(self) -> str:
        return self.port.ip


@dataclass
class World:
    """The namespaces of one test (all named `prefix`…) and the drivers made for it."""

    prefix: str
    state: Path
    make_driver: Callable[[Path], NetworkDriver]
    drivers: dict[str, NetworkDriver] = field(default_factory=dict)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _mac: int = 0

    @property
    def ul(self) -> str:
        return f"{self.prefix}-ul"

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    def host(self, name: str, *, uplink: bool = True, index: int = 1) -> NetworkDriver:
        """A host's driver, with an underlay address and (by default) an uplink to the internet namespace."""
        if name in self.drivers:
            return self.drivers[name]
        driver = self.make_driver(self.state / name)
        driver.ensure_host(self.underlay(name, uplink=uplink, index=index))
        self.drivers[name] = driver
        if uplink:
            self._internet_addresses()
        return driver

    def underlay(self, name: str, *, uplink: bool = True, index: int = 1) -> HostUnderlay:
        return HostUnderlay(
            host=f"{self.prefix}{name}", address=f"192.0.2.{10 + index}/24", peer=PeerLink(self.ul),
            uplink=UplinkSpec(f"198.51.100.{10 + index}/24", INTERNET_IP, PeerLink(self.inet)) if uplink else None)

    def _internet_addresses(self) -> None:
        have = sh(self.inet, "ip -4 -o addr show dev br0").stdout
        if INTERNET_IP not in have:
            sh(self.inet, f"ip addr add {INTERNET_IP}/24 dev br0; ip addr add 203.0.113.1/24 dev br0")

    def guest_ns(self, name: str) -> str:
        ns = f"{self.prefix}-{name}"
        netns.create(ns)
        return ns

    def port(self, name: str, subnet: SubnetSpec, ip_suffix: int, groups: Sequence[str] = ("sg-default",),
             hostname: str | None = None) -> Guest:
        """A guest namespace and the veth port that will plug it in (addresses set after apply: `configure`)."""
        self._mac += 1
        ns = self.guest_ns(name)
        base = subnet.cidr.split("/")[0].rsplit(".", 1)[0]
        mac = f"02:00:00:00:{self._mac // 256:02x}:{self._mac % 256:02x}"
        p = PortSpec(id=f"eni-{name}", subnet_id=subnet.id, mac=mac,
                     ip=f"{base}.{ip_suffix}", security_groups=tuple(groups), hostname=hostname,
                     attachment=Attachment("veth", ns, "eth0"))
        return Guest(ns, p)

    def configure(self, *guests: Guest, subnets: Sequence[SubnetSpec]) -> None:
        """Give guests their address and route statically (as a DHCP client would)."""
        by_id = {s.id: s for s in subnets}
        for g in guests:
            s = by_id[g.port.subnet_id]
            plen = s.cidr.split("/")[1]
            sh(g.ns, f"ip addr replace {g.ip}/{plen} dev eth0; ip route replace default via {s.gateway}")

    def serve(self, ns: str, kind: str, port: int) -> subprocess.Popen[str]:
        proc = netns.popen(ns, [sys.executable, "-u", "-c", TOOL, kind, str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        return proc

    def background(self, ns: str, *args: object) -> subprocess.Popen[str]:
        proc = netns.popen(ns, [sys.executable, "-u", "-c", TOOL, *map(str, args)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for d in self.drivers.values():
            with _suppress():
                d.close()
            destroy = getattr(d, "destroy_host", None)
            if destroy is not None:
                with _suppress():
                    destroy()
        for name in netns.list_ours(self.prefix):
            netns.delete(name)
        for d in self.drivers.values():  # a host namespace is named after the host, itself after the prefix
            host_ns = getattr(d, "host_ns", None)
            if host_ns:
                for name in netns.list_ours(host_ns):
                    netns.delete(name)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


class DataplaneHarness(abc.ABC):
    @abc.abstractmethod
    def make_driver(self, state_dir: Path) -> NetworkDriver:
        """A new driver object for the host whose files are in `state_dir` (also: a restarted agent's)."""


def subnets(public: str = "10.0.1.0/24", private: str = "10.0.2.0/24") -> tuple[SubnetSpec, SubnetSpec]:
    def mk(sid: str, cidr: str, pub: bool) -> SubnetSpec:
        base = cidr.split("/")[0].rsplit(".", 1)[0]
        return SubnetSpec(sid, cidr, f"{base}.1", f"{base}.2", pub)

    return mk("sn-pub", public, True), mk("sn-priv", private, False)


def default_group(*extra: SecurityGroupRule, members: Sequence[str] = ()) -> SecurityGroupSpec:
    """AWS-like default: egress anywhere, ingress from the group's own members (given as IPs) and ICMP
    from the VPC, plus `extra` rules."""
    rules = [SecurityGroupRule("egress", "all", cidrs=("0.0.0.0/0",)),
             SecurityGroupRule("ingress", "icmp", cidrs=("10.0.0.0/16",))]
    if members:
        rules.append(SecurityGroupRule("ingress", "all", remote_ips=tuple(members)))
    return SecurityGroupSpec("sg-default", tuple([*rules, *extra]))


def vpc(vpc_id: str = "vpc-a", vni: int = 1001, cidr: str = "10.0.0.0/16", sns: Sequence[SubnetSpec] | None = None,
        domain: str = "a.internal") -> VpcSpec:
    return VpcSpec(vpc_id, vni, cidr, tuple(sns if sns is not None else subnets()), domain)


class DataplaneContract:
    """Behaviour every NetworkDriver must show. Needs a `harness` fixture (a DataplaneHarness)."""

    @pytest.fixture
    def world(self, harness: DataplaneHarness, tmp_path: Path) -> Iterator[World]:
        w = World(prefix=f"hb-t{uuid.uuid4().hex[:6]}", state=tmp_path, make_driver=harness.make_driver)
        try:
            yield w
        finally:
            w.cleanup()
            assert not netns.list_ours(w.prefix), "the test left namespaces behind"

    # --- reachability ----------------------------------------------------------------------------

    def test_same_and_cross_subnet_reachability(self, world: World) -> None:
        d = world.host("a")
        pub, priv = subnets()
        g1, g2, g3 = world.port("g1", pub, 10), world.port("g2", pub, 11), world.port("g3", priv, 10)
        d.apply_vpc(vpc(), [g1.port, g2.port, g3.port], groups=[default_group()])
        world.configure(g1, g2, g3, subnets=(pub, priv))
        assert ping(g1.ns, g2.ip), "same subnet"
        assert ping(g1.ns, g3.ip), "across subnets"
        assert ping(g3.ns, g1.ip)
        assert ping(g1.ns, pub.gateway), "the gateway answers"
        assert not ping(g1.ns, "10.0.1.99", wait=1), "no answer for an address with no port"

    def test_a_veth_port_waits_for_its_namespace_without_holding_up_the_vpc(self, world: World) -> None:
        d = world.host("a")
        pub, _priv = subnets()
        a, late = world.port("a", pub, 10), world.port("late", pub, 11)
        netns.delete(late.ns)  # its owner has not made it yet
        d.apply_vpc(vpc(), [a.port, late.port], groups=[default_group()])
        world.configure(a, subnets=(pub,))
        assert ping(a.ns, pub.gateway), "the rest of the VPC is up"
        [obs] = d.observed().vpcs
        assert late.port.id not in obs.port_ids
        netns.create(late.ns)
        d.apply_vpc(vpc(), [a.port, late.port], groups=[default_group()])
        world.configure(late, subnets=(pub,))
        assert ping(late.ns, a.ip), "the next apply plugs it in"

    def test_overlapping_vpcs_are_isolated(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        a1, a2 = world.port("a1", pub, 10), world.port("a2", pub, 11)
        b1, b2 = world.port("b1", pub, 10), world.port("b2", pub, 12)
        d.apply_vpc(vpc("vpc-a", 1001, sns=[pub]), [a1.port, a2.port], groups=[default_group()])
        d.apply_vpc(vpc("vpc-b", 1002, sns=[pub]), [b1.port, b2.port], groups=[default_group()])
        world.configure(a1, a2, b1, b2, subnets=(pub,))
        assert ping(a1.ns, a2.ip) and ping(b1.ns, b2.ip), "each VPC works with the same CIDR"
        assert not ping(a1.ns, b2.ip, wait=1), "VPC A cannot reach VPC B's address"
        assert not ping(b2.ns, a2.ip, wait=1)

    # --- security groups -------------------------------------------------------------------------

    def test_security_group_rule_opens_and_closes_tcp_without_restart(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        client, server = world.port("c", pub, 10), world.port("s", pub, 11)
        spec = vpc(sns=[pub])
        d.apply_vpc(spec, [client.port, server.port], groups=[default_group()])
        world.configure(client, server, subnets=(pub,))
        world.serve(server.ns, "serve", 8080)
        assert ping(client.ns, server.ip), "ICMP is allowed by the group"
        assert not connects(client.ns, server.ip, 8080), "TCP is denied until a rule allows it"

        rule = SecurityGroupRule("ingress", "tcp", 8000, 8100, cidrs=(f"{client.ip}/32",))
        d.apply_vpc(spec, [client.port, server.port], groups=[default_group(rule)])
        assert connects(client.ns, server.ip, 8080), "the rule takes effect at once"

        held = world.background(client.ns, "hold", server.ip, 8080, 4)
        assert held.stdout is not None and held.stdout.readline().strip() == "established"
        d.apply_vpc(spec, [client.port, server.port], groups=[default_group()])
        assert not connects(client.ns, server.ip, 8080), "removing the rule cuts new connections"
        out, _ = held.communicate(timeout=30)
        # Documented: an established connection outlives the rule (conntrack), as in every stateful firewall.
        assert held.returncode == 0 and "held" in out, out

    def test_source_group_rule_admits_members_only(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        member, outsider, server = world.port("m", pub, 10), world.port("o", pub, 11), world.port("s", pub, 12)
        web = SecurityGroupSpec("sg-web", (SecurityGroupRule("egress", "all", cidrs=("0.0.0.0/0",)),
                                           SecurityGroupRule("ingress", "tcp", 8080, 8080,
                                                             remote_ips=(member.ip,))))
        server.port = dataclasses.replace(server.port, security_groups=("sg-web",))
        d.apply_vpc(vpc(sns=[pub]), [member.port, outsider.port, server.port], groups=[default_group(), web])
        world.configure(member, outsider, server, subnets=(pub,))
        world.serve(server.ns, "serve", 8080)
        assert connects(member.ns, server.ip, 8080)
        assert not connects(outsider.ns, server.ip, 8080)

    def test_a_thousand_overlapping_rules_load_and_enforce(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        c, s = world.port("c", pub, 10), world.port("s", pub, 11)
        rules = [SecurityGroupRule("egress", "all", cidrs=("0.0.0.0/0",))]
        rules += [SecurityGroupRule("ingress", "tcp", 9000 + i % 50, 9000 + i % 50 + i % 7,
                                    cidrs=(f"10.{i % 4}.0.0/16", f"10.0.{i % 250}.0/24"))
                  for i in range(996)]
        rules += [SecurityGroupRule("ingress", "tcp", 8080, 8080, remote_ips=(c.ip,)),
                  SecurityGroupRule("ingress", "tcp", 8000, 8100, cidrs=("10.0.1.0/24",)),
                  SecurityGroupRule("ingress", "icmp", cidrs=("10.0.0.0/8",))]
        big = SecurityGroupSpec("sg-big", tuple(rules))
        s.port = dataclasses.replace(s.port, security_groups=("sg-big",))
        d.apply_vpc(vpc(sns=[pub]), [c.port, s.port], groups=[default_group(), big])
        world.configure(c, s, subnets=(pub,))
        world.serve(s.ns, "serve", 8080)
        world.serve(s.ns, "serve", 8200)
        assert ping(c.ns, s.ip)
        assert connects(c.ns, s.ip, 8080)
        assert not connects(c.ns, s.ip, 8200, timeout=1), "a port no rule names stays closed"

    def test_anti_spoofing(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        a, b = world.port("a", pub, 10), world.port("b", pub, 11)
        d.apply_vpc(vpc(sns=[pub]), [a.port, b.port], groups=[default_group()])
        world.configure(a, b, subnets=(pub,))
        assert ping(a.ns, b.ip)
        sh(a.ns, f"ip addr flush dev eth0; ip addr add 10.0.1.50/24 dev eth0; "
                 f"ip route replace default via {pub.gateway}")
        assert not ping(a.ns, b.ip, wait=1), "a port cannot send from an address that is not its own"

    # --- DHCP / DNS ------------------------------------------------------------------------------

    def test_dhcp_gives_the_port_its_address_and_dns_resolves_names(self, world: World) -> None:
        d = world.host("a")
        pub, priv = subnets()
        g1, g2 = world.port("g1", pub, 10, hostname="web"), world.port("g2", priv, 20, hostname="db")
        spec = vpc(domain="prod.internal")
        d.apply_vpc(spec, [g1.port, g2.port], groups=[default_group()])
        # udhcpc without a script: it prints the lease, the test applies it (busybox-static's default
        # script path does not exist here).
        out = sh(g1.ns, "busybox udhcpc -i eth0 -n -q -f -t 5 -T 1 -s /bin/true -O dns -O router -O domain "
                        "2>&1").stdout
        assert f"lease of {g1.ip} obtained" in out, out
        world.configure(g1, g2, subnets=(pub, priv))
        res = sh(g1.ns, f"busybox nslookup db.prod.internal {pub.dns}").stdout
        assert g2.ip in res, res
        res = sh(g2.ns, f"busybox nslookup web.prod.internal {priv.dns}").stdout
        assert g1.ip in res, res
        assert g2.ip not in sh(g1.ns, f"busybox nslookup nothere.prod.internal {pub.dns}").stdout

    def test_dhcp_server_is_supervised(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        g = world.port("g", pub, 10, hostname="web")
        d.apply_vpc(vpc(sns=[pub]), [g.port], groups=[default_group()])
        [obs] = d.observed().vpcs
        assert obs.dhcp_running
        [pid] = netns.pids(obs.namespace)  # the only process in the router namespace
        os.kill(pid, signal.SIGKILL)
        # SIGKILL takes effect asynchronously: "running" is only news once the killed pid has left the
        # namespace (a loaded host can still show it alive right after the kill).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if pid not in netns.pids(obs.namespace) and d.observed().vpcs[0].dhcp_running:
                break
            supervise = getattr(d, "supervise", None)
            if supervise is not None:
                supervise()
            time.sleep(0.1)
        assert pid not in netns.pids(obs.namespace) and d.observed().vpcs[0].dhcp_running, "dnsmasq was restarted"
        world.configure(g, subnets=(pub,))
        assert "10.0.1.10" in sh(g.ns, f"busybox nslookup web.a.internal {pub.dns}").stdout

    # --- internet --------------------------------------------------------------------------------

    def test_floating_ip_reachable_from_internet_and_detach_cuts_it(self, world: World) -> None:
        d = world.host("a")
        pub, priv = subnets()
        g = world.port("web", pub, 10)
        web = SecurityGroupRule("ingress", "tcp", 8080, 8080, cidrs=("0.0.0.0/0",))
        spec = vpc()
        d.apply_vpc(spec, [g.port], groups=[default_group(web)],
                    floating_ips=[FloatingIpSpec("203.0.113.5", g.port.id)])
        world.configure(g, subnets=(pub, priv))
        world.serve(g.ns, "serve", 8080)
        assert connects(world.inet, "203.0.113.5", 8080), "the floating IP reaches the port"
        assert not connects(world.inet, "203.0.113.5", 8081, timeout=1), "only what the group allows"
        # The guest sees the outside through its floating IP (SNAT): the internet's server sees 203.0.113.5.
        outside = world.serve(world.inet, "serve", 9090)
        assert connects(g.ns, INTERNET_IP, 9090)
        assert outside.stdout is not None and outside.stdout.readline().split() == ["peer", "203.0.113.5"]
        held = world.background(world.inet, "hold", "203.0.113.5", 8080, 6)
        assert held.stdout is not None and held.stdout.readline().strip() == "established"
        d.apply_vpc(spec, [g.port], groups=[default_group(web)], floating_ips=[])
        assert not connects(world.inet, "203.0.113.5", 8080, timeout=1), "detached: unreachable"
        held.communicate(timeout=30)
        assert held.returncode != 0, "detaching cuts established connections too"
        assert not connects(g.ns, INTERNET_IP, 9090, timeout=1), "a public-subnet port without one has no way out"

    def test_nat_gateway_private_subnet_reaches_out_but_is_not_reachable(self, world: World) -> None:
        d = world.host("a")
        pub, priv = subnets()
        g = world.port("app", priv, 10)
        everything = SecurityGroupRule("ingress", "all", cidrs=("0.0.0.0/0",))
        nat = NatSpec("nat-1", "203.0.113.9", (priv.cidr,))
        d.apply_vpc(vpc(), [g.port], groups=[default_group(everything)], nat=nat)
        world.configure(g, subnets=(pub, priv))
        outside = world.serve(world.inet, "serve", 9090)
        world.serve(g.ns, "serve", 8080)
        assert connects(g.ns, INTERNET_IP, 9090), "private subnet reaches the outside through NAT"
        assert outside.stdout is not None and outside.stdout.readline().split() == ["peer", "203.0.113.9"]
        assert not connects(world.inet, "203.0.113.9", 8080, timeout=1), "nothing comes in through the NAT IP"
        sh(world.inet, "ip route replace 10.0.0.0/16 via 198.51.100.11")
        assert not connects(world.inet, g.ip, 8080, timeout=1), "the private address is unreachable from outside"
        assert not ping(world.inet, g.ip, wait=1)

    # --- several hosts ---------------------------------------------------------------------------

    def test_two_hosts_over_vxlan(self, world: World) -> None:
        da, db = world.host("a", uplink=False, index=1), world.host("b", uplink=False, index=2)
        pub, priv = subnets()
        ga, gb = world.port("ga", pub, 10, hostname="alpha"), world.port("gb", priv, 20, hostname="beta")
        spec = vpc()
        group = default_group(SecurityGroupRule("ingress", "tcp", 8080, 8080, cidrs=("10.0.0.0/16",)))
        ul_a, ul_b = world.underlay("a", uplink=False, index=1), world.underlay("b", uplink=False, index=2)
        da.apply_vpc(spec, [ga.port], [RemotePort(gb.port.id, gb.ip, gb.port.mac, str(ul_b.ip), "beta")],
                     groups=[group])
        db.apply_vpc(spec, [gb.port], [RemotePort(ga.port.id, ga.ip, ga.port.mac, str(ul_a.ip), "alpha")],
                     groups=[group])
        world.configure(ga, gb, subnets=(pub, priv))
        assert ping(ga.ns, gb.ip) and ping(gb.ns, ga.ip)
        world.serve(gb.ns, "serve", 8080)
        assert connects(ga.ns, gb.ip, 8080)
        assert not connects(ga.ns, gb.ip, 8081, timeout=1), "the remote host enforces the ingress rules"
        assert gb.ip in sh(ga.ns, f"busybox nslookup beta.a.internal {pub.dns}").stdout
        # Another VPC with the same addresses on both hosts stays apart (its own VNI).
        ox, oy = world.port("ox", pub, 10), world.port("oy", priv, 20)
        other = vpc("vpc-o", 1002)
        da.apply_vpc(other, [ox.port], [], groups=[default_group()])
        db.apply_vpc(other, [oy.port], [], groups=[default_group()])
        world.configure(ox, oy, subnets=(pub, priv))
        assert not ping(ox.ns, gb.ip, wait=1)

    def test_nat_gateway_on_another_host_serves_this_hosts_private_ports(self, world: World) -> None:
        da, db = world.host("a", index=1), world.host("b", uplink=False, index=2)
        pub, priv = subnets()
        ga, gb = world.port("na", priv, 10), world.port("nb", priv, 20)
        spec = vpc()
        group = default_group(SecurityGroupRule("ingress", "all", cidrs=("0.0.0.0/0",)))
        ul_a, ul_b = world.underlay("a", index=1), world.underlay("b", uplink=False, index=2)
        nat = NatSpec("nat-1", "203.0.113.9", (priv.cidr,))
        da.apply_vpc(spec, [ga.port], [RemotePort(gb.port.id, gb.ip, gb.port.mac, str(ul_b.ip))], groups=[group],
                     nat=nat)
        relay = NatSpec("nat-1", "203.0.113.9", (priv.cidr,), host_ip=str(ul_a.ip))
        db.apply_vpc(spec, [gb.port], [RemotePort(ga.port.id, ga.ip, ga.port.mac, str(ul_a.ip))], groups=[group],
                     nat=relay)
        db.apply_vpc(spec, [gb.port], [RemotePort(ga.port.id, ga.ip, ga.port.mac, str(ul_a.ip))], groups=[group],
                     nat=relay)  # converged: nothing to add twice
        world.configure(ga, gb, subnets=(pub, priv))
        outside = world.serve(world.inet, "serve", 9090)
        world.serve(gb.ns, "serve", 8080)
        assert connects(gb.ns, INTERNET_IP, 9090), "the port on the host without the gateway reaches out"
        assert outside.stdout is not None and outside.stdout.readline().split() == ["peer", "203.0.113.9"]
        assert ping(gb.ns, ga.ip), "traffic inside the VPC still goes straight to its port"
        assert not connects(world.inet, "203.0.113.9", 8080, timeout=1), "nothing comes in through the NAT IP"
        # Without the gateway, the relay goes: no way out any more.
        db.apply_vpc(spec, [gb.port], [RemotePort(ga.port.id, ga.ip, ga.port.mac, str(ul_a.ip))], groups=[group])
        assert not connects(gb.ns, INTERNET_IP, 9090, timeout=1)
        assert ping(gb.ns, ga.ip)

    # --- convergence -----------------------------------------------------------------------------

    def test_apply_is_idempotent_and_hitless_across_a_driver_restart(self, world: World,
                                                                     harness: DataplaneHarness) -> None:
        d = world.host("a")
        pub, priv = subnets()
        a, b = world.port("a", pub, 10, hostname="a"), world.port("b", priv, 10)
        udp = SecurityGroupRule("ingress", "udp", 7000, 7000, cidrs=("10.0.0.0/16",))
        args: dict[str, Any] = {"groups": [default_group(udp)],
                                "floating_ips": [FloatingIpSpec("203.0.113.7", a.port.id)],
                                "nat": NatSpec("nat-1", "203.0.113.8", (priv.cidr,)), "flow_logs": [FlowLogSpec("fl")]}
        spec = vpc()
        d.apply_vpc(spec, [a.port, b.port], **args)
        world.configure(a, b, subnets=(pub, priv))
        before = d.observed()
        links_before = sh(before.vpcs[0].namespace, "ip -o link show").stdout
        world.serve(b.ns, "udp-echo", 7000)
        counter = world.background(a.ns, "udp-count", b.ip, 7000, 300, 0.01)
        for _ in range(3):
            d.apply_vpc(spec, [a.port, b.port], **args)
        d.close()
        d2 = harness.make_driver(world.state / "a")  # a restarted agent: new object, same namespaces
        world.drivers["a"] = d2
        d2.ensure_host(world.underlay("a"))
        d2.apply_vpc(spec, [a.port, b.port], **args)
        out, _ = counter.communicate(timeout=60)
        assert out.strip() == "0", f"packets lost on an established flow: {out}"
        after = d2.observed()
        assert after == before
        assert sh(after.vpcs[0].namespace, "ip -o link show").stdout == links_before, "nothing was recreated"

    def test_remove_vpc_leaves_nothing(self, world: World) -> None:
        d = world.host("a")
        pub, _priv = subnets()
        g = world.port("g", pub, 10, hostname="g")
        d.apply_vpc(vpc(), [g.port], groups=[default_group()],
                    floating_ips=[FloatingIpSpec("203.0.113.5", g.port.id)], flow_logs=[FlowLogSpec("fl")])
        [obs] = d.observed().vpcs
        dnsmasq_pids = netns.pids(obs.namespace)
        assert dnsmasq_pids, "the DHCP server runs in the router namespace"
        d.remove_vpc("vpc-a")
        d.remove_vpc("vpc-a")  # idempotent
        assert d.observed().vpcs == ()
        assert not netns.exists(obs.namespace)
        assert "eth0" not in sh(g.ns, "ip -o link show").stdout, "the guest side of the port went too"
        for pid in dnsmasq_pids:
            assert not Path(f"/proc/{pid}").exists() or b"dnsmasq" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not ping(world.inet, "203.0.113.5", wait=1)

    def test_remove_orphans(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        g1, g2 = world.port("g1", pub, 10), world.port("g2", pub, 10)
        d.apply_vpc(vpc("vpc-keep", 1001, sns=[pub]), [g1.port], groups=[default_group()])
        d.apply_vpc(vpc("vpc-gone", 1002, sns=[pub]), [g2.port], groups=[default_group()])
        assert d.remove_orphans(["vpc-keep"]) == ["vpc-gone"]
        assert [v.vpc_id for v in d.observed().vpcs] == ["vpc-keep"]

    # --- flow logs -------------------------------------------------------------------------------

    def test_flow_logs_record_accepted_and_rejected_flows(self, world: World) -> None:
        d = world.host("a")
        pub, _ = subnets()
        c, s = world.port("c", pub, 10), world.port("s", pub, 11)
        d.apply_vpc(vpc(sns=[pub]), [c.port, s.port], groups=[default_group()],
                    flow_logs=[FlowLogSpec("fl", port_ids=(s.port.id,))])
        world.configure(c, s, subnets=(pub,))
        d.read_flow_logs()
        assert ping(c.ns, s.ip)
        assert not connects(c.ns, s.ip, 8080, timeout=1)
        records: list[Any] = []
        for _ in range(50):
            records += d.read_flow_logs()
            if any(r.action == "reject" for r in records):
                break
            time.sleep(0.1)
        mine = [r for r in records if r.port_id == s.port.id]
        assert all(r.port_id == s.port.id for r in records), "only the logged port"
        assert any(r.action == "accept" and r.protocol == "icmp" and r.direction == "ingress" for r in mine), mine
        rejected = [r for r in mine if r.action == "reject"]
        assert rejected and rejected[0].protocol == "tcp" and rejected[0].dst_port == 8080, mine
        assert rejected[0].src_ip == c.ip and rejected[0].vpc_id == "vpc-a"

    # --- guests' taps -------------------------------------------------------------------------------

    def test_tap_port_opens_for_a_guest(self, world: World) -> None:
        d = world.host("a", uplink=False)
        pub, _ = subnets()
        tap = PortSpec("eni-tap", pub.id, "02:00:00:00:aa:01", "10.0.1.30", ("sg-default",), "vm")
        d.apply_vpc(vpc(sns=[pub]), [tap], groups=[default_group()])
        ref = d.tap_for(tap.id)
        assert "NO-CARRIER" in sh(ref.namespace, f"ip link show {ref.ifname}").stdout, "no guest yet"
        fd = d.open_tap(tap.id)
        try:
            assert "NO-CARRIER" not in sh(ref.namespace, f"ip link show {ref.ifname}").stdout, "the guest is plugged"
        finally:
            os.close(fd)

    # --- bad input -------------------------------------------------------------------------------

    def test_inconsistent_specs_are_refused(self, world: World) -> None:
        d = world.host("a", uplink=False)
        pub, priv = subnets()
        g = world.port("g", pub, 10)
        with pytest.raises(InvalidSpec, match="not a free host address"):
            d.apply_vpc(vpc(), [dataclasses.replace(g.port, ip="10.0.2.5")], groups=[default_group()])
        with pytest.raises(InvalidSpec, match="security group"):
            d.apply_vpc(vpc(), [dataclasses.replace(g.port, security_groups=("sg-nope",))], groups=[])
        with pytest.raises(InvalidSpec, match="private subnet"):
            p = dataclasses.replace(g.port, subnet_id=priv.id, ip="10.0.2.10")
            d.apply_vpc(vpc(), [p], groups=[default_group()], floating_ips=[FloatingIpSpec("203.0.113.5", p.id)])
        with pytest.raises(ValueError, match="hb-"):
            bad = dataclasses.replace(g.port, attachment=Attachment("veth", "root-ns", "eth0"))
            d.apply_vpc(vpc(), [bad], groups=[default_group()])
        assert d.observed().vpcs == (), "nothing was built for a refused spec"
