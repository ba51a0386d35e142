"""The load-balancer agent end to end: API → desired state → namespace + VIP (plugged in by the network
agent) → HAProxy, with real traffic from the internet namespace through the floating IP and from inside the VPC.

The network agent and the load-balancer agent of one host run in this process on the server's database (the
way `tests/integration/network/test_agent_linux.py` runs the network agent); backends are namespaces standing
in for instances, serving HTTP with `python3 -m http.server`. Every namespace and process is removed afterwards.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from hackboot.catalog.models import Host
from hackboot.core.auth import Principal
from hackboot.core.db import session_scope
from hackboot.loadbalancers.agent import (
    LoadBalancerAgentOptions,
    LoadBalancerReconciler,
    host_prefix,
    namespace_of,
    vip_attachment,
)
from hackboot.loadbalancers.haproxy import HaproxyDriver
from hackboot.network import netns
from hackboot.network.driver import Attachment
from hackboot.network.models import NetworkInterface
from tests.integration.network.api_helpers import unique
from tests.integration.network.dataplane_contract import sh
from tests.integration.network.test_agent_linux import ZONE, World, netcloud, vpc_with_subnets, wait_for
from tests.support import Cloud

__all__ = ["netcloud"]  # the module fixture, shared with the network agent's tests

MISSING = [t for t in ("ip", "nft", "dnsmasq", "busybox", "haproxy", "curl") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {', '.join(MISSING)} (run `make deps`)"),
    pytest.mark.xdist_group("network-agent"),
]


@dataclass
class LbWorld(World):
    """The network agent's world, plus a load-balancer agent on host "a"."""

    lb_agent: LoadBalancerReconciler | None = None
    engine_dirs: dict[str, Path] = field(default_factory=dict)

    def attachment(self, nic: NetworkInterface) -> Attachment:
        if (nic.instance_id or "").startswith("lb-"):
            return vip_attachment(nic)
        return super().attachment(nic)

    def start_lb_agent(self, name: str = "a") -> LoadBalancerReconciler:
        host_id = self.host_id(name)
        # The engine's unix sockets live in its state dir: keep the path short (107 bytes at most). A restarted
        # agent finds its proxies there.
        if name not in self.engine_dirs:
            self.engine_dirs[name] = Path(tempfile.mkdtemp(prefix="hblb-", dir="/tmp"))
        engine_dir = self.engine_dirs[name]
        agent = LoadBalancerReconciler(
            host_id=host_id, host_name=f"{self.prefix}{name}", driver=HaproxyDriver(engine_dir),
            state_dir=self.tmp / f"lbagent-{name}", listen=True,
            options=LoadBalancerAgentOptions(poll_interval=0.5, resync_interval=3600.0, observe_interval=0.5))
        agent.start()
        self.lb_agent = agent
        return agent

    def backend(self, nic: dict[str, Any], name: str) -> subprocess.Popen[str]:
        """An HTTP server on :8080 in the guest namespace of `nic`, answering its own name."""
        root = self.tmp / f"www-{name}"
        root.mkdir(exist_ok=True)
        (root / "index.html").write_text(name)
        proc = netns.popen(nic["ns"], [sys.executable, "-m", "http.server", "8080", "--bind", "0.0.0.0",
                                       "--directory", str(root)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        agent, self.lb_agent = self.lb_agent, None
        if agent is not None:
            agent.close()
            driver = agent.driver
            for lb_id in driver.running():
                driver.remove(lb_id)
            for name in netns.list_ours(host_prefix(agent.host_id)):
                netns.delete(name)
        for d in self.engine_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        super().cleanup()


@pytest.fixture
def world(netcloud: Cloud, tmp_path: Path) -> Iterator[LbWorld]:
    admin = netcloud.admin_client_unscoped()
    project = admin.projects.create(unique("lbagent"))
    client = netcloud.client(project=project["id"])
    principal = Principal(user_id="usr-lbagent-test", username="test", token_id="tok", role="admin",
                          is_superuser=False, project_id=project["id"])
    w = LbWorld(prefix=f"hb-b{uuid.uuid4().hex[:6]}", tmp=tmp_path, client=client, principal=principal)
    with session_scope() as s:  # the host load balancers are scheduled on (what a compute agent registers)
        s.add(Host(id=w.host_id("a"), name=f"{w.prefix}a", zone_id=ZONE, status="up",
                   last_heartbeat_at=dt.datetime.now(dt.UTC)))
    try:
        yield w
    finally:
        try:
            w.cleanup()
        finally:
            with session_scope() as s:
                host = s.get(Host, w.host_id("a"))
                if host is not None:
                    host.status = "down"  # other tests' load balancers must not land on a gone host
        left = [n for p in [w.prefix, *w.host_namespaces] for n in netns.list_ours(p)]
        assert not left, f"the test left namespaces behind: {left}"


def curl(ns: str, url: str, timeout: float = 5) -> tuple[int, str]:
    proc = sh(ns, f"curl -s -m {timeout} -o /dev/stdout -w '\\n%{{http_code}}' {url}", timeout=timeout + 10)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def test_an_internet_facing_load_balancer_spreads_requests_follows_health_and_goes_away(world: LbWorld,
                                                                                       netcloud: Cloud) -> None:
    world.agent("a", 1)
    lb_agent = world.start_lb_agent("a")
    c = world.client
    vpc, pub, _priv = vpc_with_subnets(world, "10.52.0.0/16")
    web_sg = c.security_groups.create(vpc["id"], unique("lbweb"))
    c.security_groups.add_rule(web_sg["id"], "ingress", "tcp", port_min=80, port_max=80, cidr="0.0.0.0/0")
    app_sg = c.security_groups.create(vpc["id"], unique("lbapp"))
    c.security_groups.add_rule(app_sg["id"], "ingress", "tcp", port_min=8080, port_max=8080,
                               remote_group=web_sg["id"])
    b1 = world.port("b1", pub, security_groups=[app_sg["id"]])
    b2 = world.port("b2", pub, security_groups=[app_sg["id"]])
    client = world.port("cl", pub)  # a VPC client in the default group: not allowed to reach the backends
    for nic in (b1, b2, client):
        world.place(nic, "a")
    world.converged(vpc["id"], "a")
    for nic in (b1, b2, client):
        world.configure(nic, pub)
    world.backend(b1, "b1")
    s2 = world.backend(b2, "b2")

    lb = c.load_balancers.create(unique("lb"), pub["id"], internet_facing=True, security_groups=[web_sg["id"]])
    assert lb["status"] == "PENDING" and lb["vip"] and lb["public_ip"]
    pool = c.load_balancers.add_pool(lb["id"], "web", protocol="http", health_check={
        "protocol": "http", "path": "/", "expected_codes": "200", "interval_s": 1, "timeout_s": 0.9,
        "healthy_threshold": 1, "unhealthy_threshold": 2})
    m1 = c.load_balancers.add_member(lb["id"], pool["id"], 8080, network_interface=b1["id"])
    m2 = c.load_balancers.add_member(lb["id"], pool["id"], 8080, network_interface=b2["id"])
    c.load_balancers.add_listener(lb["id"], "http", 80, default_pool=pool["id"])
    c.load_balancers.wait(lb["id"], "ACTIVE", timeout=60)
    world.converged(vpc["id"], "a")
    ns = namespace_of(lb_agent.host_id, lb["id"])
    assert f"{lb['vip']}/" in sh(ns, "ip -4 -o addr show dev eth0").stdout, "the VIP is on the namespace's eth0"

    def answers(ns: str, url: str, n: int) -> Counter[str]:
        got: Counter[str] = Counter()
        for _ in range(n):
            code, body = curl(ns, url)
            got[body if code == 200 else f"HTTP {code}"] += 1
        return got

    # Checked healthy, not merely "up": HAProxy starts members up before their first check, and the first
    # checks may meet a backend whose security group does not know the VIP's address yet.
    def checked_up() -> bool:
        return all(m["health"] == "up" and "passed" in m["health_reason"]
                   for m in c.load_balancers.members(lb["id"], pool["id"]))

    wait_for("both members checked healthy", checked_up)
    spread = answers(world.inet, f"http://{lb['public_ip']}/", 10)
    assert spread == Counter({"b1": 5, "b2": 5}), f"round robin from the internet through the floating IP: {spread}"
    assert answers(client["ns"], f"http://{lb['vip']}/", 4) == Counter({"b1": 2, "b2": 2}), "and from the VPC"
    assert curl(client["ns"], f"http://{b1['private_ip']}:8080/", timeout=1)[0] == 0, \
        "the backends admit only the load balancer's security group"

    # One member stops: the health check takes it out (visible in the API, as an event), traffic moves.
    def health() -> dict[str, str]:
        return {m["id"]: m["health"] for m in c.load_balancers.members(lb["id"], pool["id"])}

    s2.kill()
    s2.wait()
    wait_for("b2 down", lambda: health() == {m1["id"]: "up", m2["id"]: "down"})
    assert answers(world.inet, f"http://{lb['public_ip']}/", 6) == Counter({"b1": 6})
    world.backend(b2, "b2")
    wait_for("b2 back", checked_up)
    assert answers(world.inet, f"http://{lb['public_ip']}/", 4) == Counter({"b1": 2, "b2": 2})
    changes = [e["data"] for e in c.events.list(resource_id=lb["id"])
               if e["type"].endswith("member_health_changed") and e["data"].get("member_id") == m2["id"]]
    assert [(d["previous"], d["health"]) for d in changes][-2:] == [("up", "down"), ("down", "up")], changes
    wait_for("access logs", lambda: len(c.load_balancers.logs(lb["id"])) >= 24)
    stats = c.load_balancers.stats(lb["id"])
    assert sum(int(m.get("requests", 0)) for m in stats["members"].values()) >= 24, stats
    scrape = httpx.get(netcloud.url + "/metrics", headers={"Authorization": f"Bearer {netcloud.admin_token}"}).text
    member_series = [line for line in scrape.splitlines() if line.startswith("hackboot_lb_requests_total{")
                     and f'load_balancer="{lb["id"]}"' in line and 'kind="member"' in line]
    assert len(member_series) == 2 and all(float(line.rsplit(" ", 1)[1]) >= 1 for line in member_series), \
        "the members' counters are in /metrics"

    # An agent restart adopts the running proxy (same master process) and it keeps serving throughout.
    engine = lb_agent.driver
    assert isinstance(engine, HaproxyDriver)
    master = engine.master_pid(lb["id"])
    lb_agent.close()
    assert answers(world.inet, f"http://{lb['public_ip']}/", 2) == Counter({"b1": 1, "b2": 1}), "agent down"
    lb_agent = world.start_lb_agent("a")
    c.load_balancers.add_rule(lb["id"], c.load_balancers.listeners(lb["id"])[0]["id"], 10, "fixed_response",
                              path_prefix="/ping", status_code=200, body="pong")
    wait_for("the rule applied", lambda: curl(world.inet, f"http://{lb['public_ip']}/ping")[1] == "pong")
    new_engine = lb_agent.driver
    assert isinstance(new_engine, HaproxyDriver) and new_engine.master_pid(lb["id"]) == master, "adopted"

    # Deleting it stops the proxy, removes its namespace and releases the VIP and its floating IP.
    c.load_balancers.delete(lb["id"])
    c.load_balancers.wait(lb["id"], "DELETED", timeout=60)
    assert lb["id"] not in lb_agent.driver.running()
    wait_for("the namespace gone", lambda: not netns.exists(ns))
    assert all(n["id"] != lb.get("network_interface_id") for n in c.network_interfaces.list())
    world.converged(vpc["id"], "a")
    assert curl(world.inet, f"http://{lb['public_ip']}/", timeout=1)[0] == 0
