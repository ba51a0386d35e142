"""DHCP + DNS of one VPC router: a dnsmasq process inside the router namespace.

dnsmasq starts as root (to bind port 67 and 53 in the namespace) and drops to the unprivileged account
of :mod:`hackboot.core.privsep` at once (``--user``): it parses packets from tenants, so it must not keep
root. It daemonizes and outlives the agent; the pid file lets a new driver re-discover it (checked
against ``/proc/<pid>/cmdline``, so a recycled pid is never mistaken for it).

Files (in the VPC's run directory, which the account can reach; owned by it, mode 0600):
  ``dnsmasq.conf``  interfaces, one static ``dhcp-range`` per subnet with its router/DNS/MTU options,
                    the VPC's domain; changing it restarts dnsmasq (subnets change rarely);
  ``dhcp-hosts``    ``<mac>,<ip>,<hostname>,infinite`` per local port;
  ``hosts``         ``<ip> <hostname>.<domain> <hostname>`` per port of the VPC (every host);
changing only the two host files is a rewrite + SIGHUP (dnsmasq re-reads them, no restart).

Leases are static (a port's MAC → its IP), so dnsmasq keeps no lease file (``leasefile-ro``).
DNS listens on the wildcard address and answers only what arrives on the ports' interfaces (the
subnets' DNS addresses are on the router's loopback); names of the VPC's domain are never forwarded upstream.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hackboot.core import privsep
from hackboot.network import netns
from hackboot.network.driver import NetworkDriverError, PortSpec, RemotePort, VpcSpec

DNSMASQ = "dnsmasq"


@dataclass(frozen=True)
class DnsmasqFiles:
    conf: str
    dhcp_hosts: str
    hosts: str


def render(vpc: VpcSpec, local_ports: Sequence[PortSpec], remote_ports: Sequence[RemotePort], *,
           run_dir: Path, user: str, group: str, mtu: int, port_glob: str) -> DnsmasqFiles:
    """The three files of a VPC's dnsmasq (pure)."""
    conf = [
        "# Written by hackboot: changes are overwritten.",
        f"pid-file={run_dir / 'dnsmasq.pid'}",
        f"user={user}",
        f"group={group}",
        f"interface={port_glob}",
        "no-resolv",
        "no-hosts",
        "no-poll",
        "domain-needed",
        "bogus-priv",
        f"log-facility={run_dir / 'dnsmasq.log'}",
        "quiet-dhcp",  # a tenant's DHCP chatter must not fill the host's disk
        "cache-size=1000",
        f"domain={vpc.domain}",
        f"local=/{vpc.domain}/",
        f"addn-hosts={run_dir / 'hosts'}",
        f"dhcp-hostsfile={run_dir / 'dhcp-hosts'}",
        "leasefile-ro",
        "dhcp-authoritative",
        "dhcp-ignore-names",  # the name is ours (the port's hostname), not the one a client asks for
        f"dhcp-option=option:domain-name,{vpc.domain}",
        f"dhcp-option=option:domain-search,{vpc.domain}",
        f"dhcp-option=option:mtu,{mtu}",
    ]
    conf += [f"server={up}" for up in vpc.dns_upstreams]
    for i, s in enumerate(sorted(vpc.subnets, key=lambda s: s.id)):
        net = ipaddress.IPv4Network(s.cidr)
        conf += [f"dhcp-range=set:s{i},{net.network_address},static,{net.netmask},12h",
                 f"dhcp-option=tag:s{i},option:router,{s.gateway}",
                 f"dhcp-option=tag:s{i},option:dns-server,{s.dns}"]
    dhcp = [f"{p.mac},{p.ip}" + (f",{p.hostname}" if p.hostname else "") + ",infinite"
            for p in sorted(local_ports, key=lambda p: p.id)]
    named = [(p.ip, p.hostname) for p in local_ports if p.hostname]
    named += [(r.ip, r.hostname) for r in remote_ports if r.hostname]
    hosts = [f"{ip} {name}.{vpc.domain} {name}" for ip, name in sorted(named, key=lambda t: (t[1], t[0]))]
    return DnsmasqFiles("\n".join(conf) + "\n", "\n".join(dhcp) + "\n" if dhcp else "",
                        "\n".join(hosts) + "\n" if hosts else "")


class Dnsmasq:
    """The dnsmasq of one router namespace, its files in `run_dir`."""

    def __init__(self, namespace: str, run_dir: Path) -> None:
        self.namespace = netns.check_name(namespace)
        self.run_dir = run_dir

    @property
    def conf_path(self) -> Path:
        return self.run_dir / "dnsmasq.conf"

    def pid(self) -> int | None:
        """The running dnsmasq's pid (ours: its command line names our config), else None."""
        try:
            pid = int((self.run_dir / "dnsmasq.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError):
            return None
        if f"--conf-file={self.conf_path}".encode() not in cmdline or stat.split(") ", 1)[1][:1] == "Z":
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def apply(self, files: DnsmasqFiles) -> str:
        """Write the files and make dnsmasq use them: 'started', 'restarted', 'reloaded' or 'unchanged'."""
        account = privsep.unprivileged_account()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        privsep.give_to(account, self.run_dir)
        conf_changed = _write(self.conf_path, files.conf, account)
        hosts_changed = _write(self.run_dir / "dhcp-hosts", files.dhcp_hosts, account)
        hosts_changed |= _write(self.run_dir / "hosts", files.hosts, account)
        log_file = self.run_dir / "dnsmasq.log"
        if not log_file.exists():
            _write(log_file, "", account)
        pid = self.pid()
        if pid is None:
            self.start()
            return "started"
        if conf_changed:
            self.stop()
            self.start()
            return "restarted"
        if hosts_changed:
            os.kill(pid, signal.SIGHUP)
            return "reloaded"
        return "unchanged"

    def start(self) -> None:
        proc = netns.run(self.namespace, [DNSMASQ, f"--conf-file={self.conf_path}"], check=False, timeout=30)
        if proc.returncode != 0:
            raise NetworkDriverError(f"dnsmasq in {self.namespace} failed to start: {proc.stderr.strip()[:500]}")
        deadline = time.monotonic() + 5
        while self.pid() is None:
            if time.monotonic() > deadline:
                raise NetworkDriverError(f"dnsmasq in {self.namespace} did not write its pid file")
            time.sleep(0.02)

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.pid() == pid and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.pid() == pid:
            os.kill(pid, signal.SIGKILL)


def _write(path: Path, text: str, account: privsep.Account) -> bool:
    """Atomically replace `path` with `text` (owned by `account`, 0600); False when it already held it."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    privsep.give_to(account, tmp)
    os.replace(tmp, path)
    return True
