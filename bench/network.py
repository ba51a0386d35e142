"""VPC data plane: throughput and latency against a plain veth pair, security-group scale, rule-change
latency, port creation at scale — LinuxNetworkDriver on real namespaces, measured in one run.

Rows:
* ``veth`` (the peer): two namespaces joined by a bare veth pair, no router, no firewall;
* ``same-host``: two ports of a VPC on one host (veth → router namespace with nftables → veth);
* ``cross-host``: the same over VXLAN between two hosts (data-plane namespaces joined by an underlay
  bridge namespace); aims: throughput >= 0.8x the peer on one host, >= 0.6x across hosts;
* ``sg-1000``: same host, the server's group holding 1,000 rules (the allowing one among them) vs a group
  of 1 rule: TCP throughput and new-connection rate (each new connection walks the chains); aim >= 0.95x;
* ``rule-change``: an SG rule added (then removed) → the first connection that gets through (is refused),
  seen by a prober running in the client namespace; p50/p99 of the delay after apply_vpc was called;
  aim p99 < 1 s;
* ``ports``: one apply_vpc creating N veth ports on one host (N=200; aim < 20 s).

Throughput: iperf3 TCP, one stream; latency: UDP round trips from Python (same tool for every row).
Bounded: every iperf3 run lasts --seconds, every loop has a fixed count; all traffic stays in hb-
namespaces this script creates and removes (also on failure).

    .venv/bin/python bench/network.py            # full run (a few minutes)
    .venv/bin/python bench/network.py --smoke    # short runs, 20 ports

Writes bench/results/network.json (network-smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from hackboot.network import netns  # noqa: E402
from hackboot.network.driver import (  # noqa: E402
    Attachment,
    HostUnderlay,
    PeerLink,
    PortSpec,
    RemotePort,
    SecurityGroupRule,
    SecurityGroupSpec,
    SubnetSpec,
    VpcSpec,
)
from hackboot.network.linux import LinuxNetworkDriver  # noqa: E402

RTT = r"""
import socket, sys, time
if sys.argv[1] == "echo":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 7000))
    print("ready", flush=True)
    while True:
        d, a = s.recvfrom(64); s.sendto(d, a)
ip, n = sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
out = []
for i in range(n + 20):
    t = time.perf_counter(); s.sendto(b"x", (ip, 7000))
    try:
        s.recv(64)
    except socket.timeout:
        continue
    if i >= 20:
        out.append((time.perf_counter() - t) * 1e6)
    time.sleep(0.002)
print(" ".join(f"{x:.1f}" for x in out))
"""

CONNECT_RATE = r"""
import socket, sys, time
ip, n = sys.argv[1], int(sys.argv[2])
t = time.perf_counter(); ok = 0
for _ in range(n):
    try:
        c = socket.create_connection((ip, 5201), timeout=2); c.close(); ok += 1
    except OSError:
        pass
print(ok / (time.perf_counter() - t))
"""

# Prints the wall-clock time at which connecting to ip:port first gives `want` (open/closed).
PROBE = r"""
import socket, sys, time
ip, port, want = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "open"
print("ready", flush=True)
deadline = time.time() + 20
while time.time() < deadline:
    try:
        c = socket.create_connection((ip, port), timeout=0.05); c.close(); state = True
    except OSError:
        state = False
    if state == want:
        print(time.time(), flush=True); sys.exit(0)
    time.sleep(0.005)
print("timeout", flush=True)
"""

LISTEN = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


class Bench:
    def __init__(self, seconds: int) -> None:
        self.prefix = f"hb-bn{uuid.uuid4().hex[:5]}"
        self.seconds = seconds
        self.tmp = Path(tempfile.mkdtemp(prefix="hb-bench-net-"))
        self.procs: list[subprocess.Popen[str]] = []
        self.drivers: list[LinuxNetworkDriver] = []

    def ns(self, name: str) -> str:
        n = f"{self.prefix}-{name}"
        netns.create(n)
        return n

    def spawn(self, ns: str, argv: list[str]) -> subprocess.Popen[str]:
        p = netns.popen(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        return p

    def py(self, ns: str, code: str, *args: object) -> subprocess.Popen[str]:
        return self.spawn(ns, [sys.executable, "-u", "-c", code, *map(str, args)])

    def wait_ready(self, p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def iperf(self, server_ns: str, client_ns: str, ip: str) -> float:
        srv = self.spawn(server_ns, ["iperf3", "-s", "-1", "-B", ip])  # serves one test, then exits
        for _ in range(40):
            time.sleep(0.25)
            out = netns.run(client_ns, ["iperf3", "-c", ip, "-t", str(self.seconds), "-J"], check=False,
                            timeout=self.seconds + 30)
            if out.returncode == 0:
                break
        else:
            raise RuntimeError(f"iperf3 to {ip} failed: {out.stdout[-500:]}")
        srv.wait(10)
        return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9

    def rtt(self, server_ns: str, client_ns: str, ip: str, n: int) -> dict[str, float]:
        echo = self.py(server_ns, RTT, "echo")
        self.wait_ready(echo)
        out = netns.run(client_ns, [sys.executable, "-c", RTT, "ping", ip, str(n)], timeout=120).stdout.split()
        echo.kill()
        vals = sorted(float(x) for x in out)
        return {"rtt_us_p50": round(statistics.median(vals), 1),
                "rtt_us_p99": round(vals[int(len(vals) * 0.99) - 1], 1)}

    def connect_rate(self, server_ns: str, client_ns: str, ip: str, n: int) -> float:
        lst = self.py(server_ns, LISTEN, 5201)
        self.wait_ready(lst)
        out = netns.run(client_ns, [sys.executable, "-c", CONNECT_RATE, ip, str(n)], timeout=300).stdout
        lst.kill()
        return float(out)

    def driver(self, name: str, index: int) -> LinuxNetworkDriver:
        d = LinuxNetworkDriver(self.tmp / name, supervise_interval=None)
        d.ensure_host(HostUnderlay(f"{self.prefix}{name}", f"192.0.2.{10 + index}/24", PeerLink(f"{self.prefix}-ul")))
        self.drivers.append(d)
        return d

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for d in self.drivers:
            try:
                d.close()
                d.destroy_host()
            except Exception as exc:
                print(f"cleanup: {exc}", file=sys.stderr)
        for n in netns.list_ours(self.prefix):
            netns.delete(n)
        for d in self.drivers:
            for n in netns.list_ours(d.host_ns):
                netns.delete(n)
        subprocess.run(["rm", "-rf", str(self.tmp)], check=False)


SUB = SubnetSpec("sn-1", "10.0.0.0/22", "10.0.0.1", "10.0.0.2", True)
VPC = VpcSpec("vpc-bench", 4242, "10.0.0.0/16", (SUB,), "bench.internal")
ALLOW_ALL = SecurityGroupSpec("sg-all", (SecurityGroupRule("egress", "all", cidrs=("0.0.0.0/0",)),
                                         SecurityGroupRule("ingress", "all", cidrs=("10.0.0.0/16",))))


def port(b: Bench, i: int, group: str = "sg-all") -> PortSpec:
    ns = b.ns(f"g{i}")
    return PortSpec(f"eni-{i}", SUB.id, f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
                    str(ipaddress.IPv4Address("10.0.0.10") + i), (group,), f"g{i}", Attachment("veth", ns, "eth0"))


def configure(p: PortSpec) -> None:
    assert p.attachment.namespace
    netns.run(p.attachment.namespace, ["sh", "-c", f"ip addr replace {p.ip}/22 dev eth0; "
                                                   f"ip route replace default via {SUB.gateway}"])


def big_group(n: int, allow_port: int) -> SecurityGroupSpec:
    rules = [SecurityGroupRule("egress", "all", cidrs=("0.0.0.0/0",))]
    rules += [SecurityGroupRule("ingress", "tcp", 10000 + i, 10000 + i, cidrs=(f"172.{16 + i // 250}.{i % 250}.0/24",))
              for i in range(n - 2)]
    rules.append(SecurityGroupRule("ingress", "tcp", allow_port, allow_port, cidrs=("10.0.0.0/16",)))
    rules.append(SecurityGroupRule("ingress", "udp", 7000, 7000, cidrs=("10.0.0.0/16",)))
    return SecurityGroupSpec("sg-big", tuple(rules))


def run(b: Bench, smoke: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"smoke": smoke, "iperf_seconds": b.seconds}
    n_rtt = 200 if smoke else 2000

    # Peer: a bare veth pair.
    va, vb = b.ns("va"), b.ns("vb")
    netns.veth(va, "eth0", vb, "eth0")
    netns.run(va, ["sh", "-c", "ip addr add 10.9.0.1/24 dev eth0; ip link set eth0 up"])
    netns.run(vb, ["sh", "-c", "ip addr add 10.9.0.2/24 dev eth0; ip link set eth0 up"])
    res["veth"] = {"gbit_s": round(b.iperf(vb, va, "10.9.0.2"), 2), **b.rtt(vb, va, "10.9.0.2", n_rtt)}

    # Same host.
    da = b.driver("a", 1)
    p1, p2 = port(b, 1), port(b, 2)
    da.apply_vpc(VPC, [p1, p2], groups=[ALLOW_ALL])
    configure(p1)
    configure(p2)
    ns1, ns2 = p1.attachment.namespace or "", p2.attachment.namespace or ""
    res["same_host"] = {"gbit_s": round(b.iperf(ns2, ns1, p2.ip), 2), **b.rtt(ns2, ns1, p2.ip, n_rtt)}

    # Across hosts (VXLAN).
    db = b.driver("b", 2)
    p3 = port(b, 3)
    da.apply_vpc(VPC, [p1, p2], [RemotePort(p3.id, p3.ip, p3.mac, "192.0.2.12")], groups=[ALLOW_ALL])
    db.apply_vpc(VPC, [p3], [RemotePort(p1.id, p1.ip, p1.mac, "192.0.2.11"),
                             RemotePort(p2.id, p2.ip, p2.mac, "192.0.2.11")], groups=[ALLOW_ALL])
    configure(p3)
    ns3 = p3.attachment.namespace or ""
    res["cross_host"] = {"gbit_s": round(b.iperf(ns3, ns1, p3.ip), 2), **b.rtt(ns3, ns1, p3.ip, n_rtt)}

    # 1,000 rules vs 1.
    n_conn = 300 if smoke else 2000
    small = SecurityGroupSpec("sg-big", (SecurityGroupRule("egress", "all", cidrs=("0.0.0.0/0",)),
                                         SecurityGroupRule("ingress", "tcp", 5201, 5201, cidrs=("10.0.0.0/16",)),
                                         SecurityGroupRule("ingress", "udp", 7000, 7000, cidrs=("10.0.0.0/16",))))
    p2b = PortSpec(p2.id, p2.subnet_id, p2.mac, p2.ip, ("sg-big",), p2.hostname, p2.attachment)
    rows: dict[str, dict[str, float]] = {"rules_1": {"gbit_s": 0.0, "new_conn_per_s": 0.0},
                                         "rules_1000": {"gbit_s": 0.0, "new_conn_per_s": 0.0}}
    # Alternated twice, best of two: the machine's noise and warm-up hit both sides alike.
    for label, group in (("rules_1", small), ("rules_1000", big_group(1000, 5201))) * 2:
        da.apply_vpc(VPC, [p1, p2b], [RemotePort(p3.id, p3.ip, p3.mac, "192.0.2.12")], groups=[ALLOW_ALL, group])
        row = rows[label]
        row["gbit_s"] = max(row["gbit_s"], round(b.iperf(ns2, ns1, p2.ip), 2))
        row["new_conn_per_s"] = max(row["new_conn_per_s"], round(b.connect_rate(ns2, ns1, p2.ip, n_conn)))
    res["sg_scale"] = rows

    # Rule change → enforced.
    lst = b.py(ns2, LISTEN, 6000)
    b.wait_ready(lst)
    base = [ALLOW_ALL, small]
    opened = SecurityGroupSpec("sg-big", (*small.rules, SecurityGroupRule("ingress", "tcp", 6000, 6000,
                                                                           cidrs=("10.0.0.0/16",))))
    lat_open: list[float] = []
    lat_close: list[float] = []
    for _ in range(5 if smoke else 30):
        for target, groups, sink in (("open", [ALLOW_ALL, opened], lat_open), ("closed", base, lat_close)):
            probe = b.py(ns1, PROBE, p2.ip, 6000, target)
            b.wait_ready(probe)
            t0 = time.time()
            da.apply_vpc(VPC, [p1, p2b], [RemotePort(p3.id, p3.ip, p3.mac, "192.0.2.12")], groups=groups)
            assert probe.stdout is not None
            line = probe.stdout.readline().strip()
            probe.wait(30)
            if line == "timeout":
                raise RuntimeError(f"rule change to {target} never took effect")
            sink.append(max(0.0, float(line) - t0))
    lst.kill()

    def pct(vals: list[float]) -> dict[str, float]:
        s = sorted(vals)
        at = -1 if len(s) < 100 else int(len(s) * 0.99)  # few samples: the maximum
        return {"p50_ms": round(statistics.median(s) * 1000, 1), "p99_ms": round(s[at] * 1000, 1), "samples": len(s)}

    res["rule_change"] = {"allow": pct(lat_open), "revoke": pct(lat_close)}

    # Many ports at once.
    n_ports = 20 if smoke else 200
    ports = [port(b, 100 + i) for i in range(n_ports)]
    t0 = time.perf_counter()
    dc = b.driver("c", 3)
    dc.apply_vpc(VpcSpec("vpc-many", 4343, "10.0.0.0/16", (SUB,), "many.internal"), ports, groups=[ALLOW_ALL])
    res["ports"] = {"count": n_ports, "apply_s": round(time.perf_counter() - t0, 2)}
    configure(ports[0])
    configure(ports[-1])
    ok = netns.run(ports[0].attachment.namespace or "", ["busybox", "ping", "-c", "1", "-W", "2", ports[-1].ip],
                   check=False).returncode == 0
    res["ports"]["first_to_last_ping"] = ok
    t0 = time.perf_counter()
    dc.apply_vpc(VpcSpec("vpc-many", 4343, "10.0.0.0/16", (SUB,), "many.internal"), ports, groups=[ALLOW_ALL])
    res["ports"]["reapply_unchanged_s"] = round(time.perf_counter() - t0, 2)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="short runs, 20 ports")
    parser.add_argument("--seconds", type=int, default=None, help="iperf3 duration per row")
    args = parser.parse_args()
    b = Bench(args.seconds or (2 if args.smoke else 8))
    try:
        res = run(b, args.smoke)
    finally:
        b.cleanup()
    peer = res["veth"]
    res["ratios"] = {
        "same_host_throughput_vs_veth": round(res["same_host"]["gbit_s"] / peer["gbit_s"], 3),
        "cross_host_throughput_vs_veth": round(res["cross_host"]["gbit_s"] / peer["gbit_s"], 3),
        "sg_1000_vs_1_throughput": round(res["sg_scale"]["rules_1000"]["gbit_s"]
                                         / res["sg_scale"]["rules_1"]["gbit_s"], 3),
        "sg_1000_vs_1_new_conn_rate": round(res["sg_scale"]["rules_1000"]["new_conn_per_s"]
                                            / res["sg_scale"]["rules_1"]["new_conn_per_s"], 3),
    }
    print(f"\nVPC data plane (iperf3 {b.seconds} s, one TCP stream; UDP round trips)")
    print(f"{'path':<12} {'Gbit/s':>8} {'x veth':>7} {'RTT p50 us':>11} {'RTT p99 us':>11}")
    for key in ("veth", "same_host", "cross_host"):
        r = res[key]
        print(f"{key:<12} {r['gbit_s']:>8.2f} {r['gbit_s'] / peer['gbit_s']:>7.2f} {r['rtt_us_p50']:>11.1f} "
              f"{r['rtt_us_p99']:>11.1f}")
    sg = res["sg_scale"]
    print(f"\nsecurity group of 1 vs 1,000 rules: {sg['rules_1']['gbit_s']:.2f} vs {sg['rules_1000']['gbit_s']:.2f} "
          f"Gbit/s (x{res['ratios']['sg_1000_vs_1_throughput']}), new connections/s {sg['rules_1']['new_conn_per_s']} "
          f"vs {sg['rules_1000']['new_conn_per_s']} (x{res['ratios']['sg_1000_vs_1_new_conn_rate']})")
    rc = res["rule_change"]
    print(f"rule change → enforced: allow p50 {rc['allow']['p50_ms']} ms p99 {rc['allow']['p99_ms']} ms; "
          f"revoke p50 {rc['revoke']['p50_ms']} ms p99 {rc['revoke']['p99_ms']} ms ({rc['allow']['samples']} each)")
    pr = res["ports"]
    print(f"{pr['count']} ports created by one apply_vpc: {pr['apply_s']} s (unchanged re-apply "
          f"{pr['reapply_unchanged_s']} s; first↔last ping {'ok' if pr['first_to_last_ping'] else 'FAILED'})")
    out = REPO / "bench" / "results" / ("network-smoke.json" if args.smoke else "network.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
