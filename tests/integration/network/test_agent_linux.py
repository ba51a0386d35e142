"""The network agent's reconciler against the real server and a real LinuxNetworkDriver.

Resources are made through the REST API (the SDK); an interface is "placed" on a host the way compute's
scheduler does it (``service.attach_interface`` with the host, in this process, on the server's database).
Guests are network namespaces (the driver's veth attachment): every check is real traffic. Hosts are
data-plane namespaces joined by an underlay bridge namespace; "the internet" is a namespace with
documentation addresses. Every namespace is removed afterwards, failure or not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hackboot.core.auth import Principal
from hackboot.core.config import reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope
from hackboot.core.reconcile import notify
from hackboot.network import netns, service
from hackboot.network.agent import NetworkAgentOptions, NetworkReconciler
from hackboot.network.driver import Attachment
from hackboot.network.hosts import NetworkHostVpc
from hackboot.network.linux import LinuxNetworkDriver
from hackboot.network.models import NetworkInterface, Vpc
from hackboot.sdk import Client
from tests.integration.network.api_helpers import unique
from tests.integration.network.dataplane_contract import INTERNET_IP, TOOL, connects, ping, sh
from tests.support import Cloud, make_cloud

MISSING = [t for t in ("ip", "bridge", "nft", "dnsmasq", "busybox") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {', '.join(MISSING)} (run `make deps`)"),
    pytest.mark.xdist_group("network-agent"),
]
ZONE = "PAR1-a"


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll until `cond()` is truthy (returns it); fail with `what` otherwise. Generous: the machine is loaded."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def netcloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """A control plane of its own (no local compute agent), whose database this process uses too."""
    state = tmp_path_factory.mktemp("netagent")
    cloud = make_cloud(state, HACKBOOT_RUN_LOCAL_AGENT="false")
    cloud.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HACKBOOT_STATE_DIR", str(state))
        mp.setenv("HACKBOOT_DATABASE_URL", "")
        mp.setenv("HACKBOOT_CONFIG", str(state / "none.toml"))
        reset_settings_cache()
        dispose_engine()
        try:
            yield cloud
        finally:
            dispose_engine()
            cloud.stop()
    reset_settings_cache()


@dataclass
class World:
    """One test's hosts (reconcilers), guests (namespaces) and project; everything named `prefix`…"""

    prefix: str
    tmp: Path
    client: Client
    principal: Principal
    agents: dict[str, NetworkReconciler] = field(default_factory=dict)
    guests: dict[str, str] = field(default_factory=dict)  # interface id → guest namespace
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    host_namespaces: set[str] = field(default_factory=set)

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    def host_id(self, name: str) -> str:
        return f"host-{self.prefix}-{name}"

    def options(self, index: int) -> NetworkAgentOptions:
        return NetworkAgentOptions(
            underlay_address=f"192.0.2.{10 + index}/24", underlay_namespace=f"{self.prefix}-ul",
            uplink_address=f"198.51.100.{10 + index}/24", uplink_gateway=INTERNET_IP, uplink_namespace=self.inet,
            poll_interval=1.0, resync_interval=3600.0, flow_log_interval=0.5, workers=2)

    def agent(self, name: str, index: int = 1) -> NetworkReconciler:
        """Start (or restart) the network agent of host `name`: a new driver object on the host's state."""
        driver = LinuxNetworkDriver(self.tmp / name, supervise_interval=0.5)
        agent = NetworkReconciler(host_id=self.host_id(name), host_name=f"{self.prefix}{name}", driver=driver,
                                  options=self.options(index), attachment_for=self.attachment, listen=True)
        agent.start()
        self.agents[name] = agent
        self.host_namespaces.add(driver.host_ns)
        have = sh(self.inet, "ip -4 -o addr show dev br0").stdout
        if INTERNET_IP not in have:
            sh(self.inet, f"ip addr add {INTERNET_IP}/24 dev br0; ip addr add 203.0.113.1/24 dev br0")
        return agent

    def attachment(self, nic: NetworkInterface) -> Attachment:
        ns = self.guests.get(nic.id)
        return Attachment("veth", ns, "eth0") if ns else Attachment("tap")

    def port(self, name: str, subnet: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """An interface made through the API, with a namespace standing in for its guest."""
        nic = self.client.network_interfaces.create(subnet["id"], name=name, **kwargs)
        ns = f"{self.prefix}-{name}"
        netns.create(ns)
        self.guests[nic["id"]] = ns
        nic["ns"] = ns
        return nic

    def place(self, nic: dict[str, Any], host: str | None) -> None:
        """What compute does when its scheduler places the instance of `nic` on `host` (None: detach)."""
        changed: set[str] = set()
        with session_scope() as s:
            if host is None:
                service.detach_interface(s, self.principal, nic["id"], changed=changed)
            else:
                ref = service.InstanceRef(f"i-{uuid.uuid4().hex[:12]}", self.principal.project, ZONE,
                                          self.host_id(host))
                service.attach_interface(s, self.principal, nic["id"], ref, changed=changed)
        for vpc_id in changed:
            notify(service.KIND, vpc_id)

    def configure(self, nic: dict[str, Any], subnet: dict[str, Any]) -> None:
        """Give the guest its address by DHCP from the VPC's dnsmasq (udhcpc prints the lease; applied here)."""
        out = sh(nic["ns"], "busybox udhcpc -i eth0 -n -q -f -t 10 -T 1 -s /bin/true 2>&1").stdout
        assert f"lease of {nic['private_ip']} obtained" in out, out
        plen = subnet["cidr"].split("/")[1]
        sh(nic["ns"], f"ip addr replace {nic['private_ip']}/{plen} dev eth0; "
                      f"ip route replace default via {subnet['gateway_ip']}")

    def converged(self, vpc_id: str, *hosts: str) -> None:
        """Until each host has applied the VPC's current desired version."""
        def done() -> bool:
            with session_scope(write=False) as s:
                desired = s.scalar(select(Vpc.desired_version).where(Vpc.id == vpc_id))
                rows = {r.host_id: r for r in s.scalars(select(NetworkHostVpc).where(NetworkHostVpc.vpc_id == vpc_id))}
            for h in hosts:
                row = rows.get(self.host_id(h))
                if row is None or row.observed_version < (desired or 0):
                    return False
                assert not row.error, row.error
            return not any(self.agents[h].busy() for h in hosts)

        wait_for(f"{vpc_id} applied on {', '.join(hosts)}", done)

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
        for agent in self.agents.values():
            try:
                agent.close()
            finally:
                driver = agent.driver
                assert isinstance(driver, LinuxNetworkDriver)
                with contextlib.suppress(Exception):  # the namespaces are deleted below anyway
                    driver.destroy_host()
        for prefix in [self.prefix, *sorted(self.host_namespaces)]:
            for name in netns.list_ours(prefix):
                netns.delete(name)


@pytest.fixture
def world(netcloud: Cloud, tmp_path: Path) -> Iterator[World]:
    admin = netcloud.admin_client_unscoped()
    project = admin.projects.create(unique("netagent"))
    client = netcloud.client(project=project["id"])
    principal = Principal(user_id="usr-netagent-test", username="test", token_id="tok", role="admin",
                          is_superuser=False, project_id=project["id"])
    w = World(prefix=f"hb-a{uuid.uuid4().hex[:6]}", tmp=tmp_path, client=client, principal=principal)
    try:
        yield w
    finally:
        w.cleanup()
        left = [n for p in [w.prefix, *w.host_namespaces] for n in netns.list_ours(p)]
        assert not left, f"the test left namespaces behind: {left}"


def vpc_with_subnets(w: World, cidr: str = "10.31.0.0/16") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    base = cidr.split(".")[0] + "." + cidr.split(".")[1]
    vpc = w.client.vpcs.create(unique("vpc"), cidr, internet_gateway=True)
    pub = w.client.subnets.create(vpc["id"], f"{base}.1.0/24", zone=ZONE, public=True)
    priv = w.client.subnets.create(vpc["id"], f"{base}.2.0/24", zone=ZONE)
    return vpc, pub, priv


def router_links(agent: NetworkReconciler, vpc_id: str) -> str:
    [obs] = [v for v in agent.driver.observed().vpcs if v.vpc_id == vpc_id]
    return sh(obs.namespace, "ip -o link show").stdout


# --------------------------------------------------------------------------------------------------

def test_ports_made_through_the_api_are_applied_resync_changes_nothing_and_unplaced_ports_go(world: World) -> None:
    a = world.agent("a")
    vpc, pub, priv = vpc_with_subnets(world)
    web, app = world.port("web", pub), world.port("app", priv)
    for nic in (web, app):
        world.place(nic, "a")
    world.converged(vpc["id"], "a")
    assert world.client.vpcs.get(vpc["id"])["status"] == "active"
    assert world.client.network_interfaces.get(web["id"])["status"] == "active"
    world.configure(web, pub)
    world.configure(app, priv)
    assert ping(web["ns"], app["private_ip"]), "members of the default group reach each other across subnets"
    domain = service.dns_domain(Vpc(name=vpc["name"], id=vpc["id"]))
    assert app["private_ip"] in sh(web["ns"], f"busybox nslookup app.{domain} {pub['dns_ip']}").stdout

    # A resync (and a forced re-apply) with nothing changed touches nothing, and traffic keeps flowing.
    world.serve(app["ns"], "udp-echo", 7000)
    world.client.security_groups.add_rule(
        world.client.security_groups.list(vpc_id=vpc["id"], name="default")[0]["id"],
        "ingress", "udp", port_min=7000, port_max=7000, cidr="10.31.0.0/16")
    world.converged(vpc["id"], "a")
    links = router_links(a, vpc["id"])
    counter = world.background(web["ns"], "udp-count", app["private_ip"], 7000, 150, 0.01)
    a.resync()
    a.reconcile(vpc["id"])
    a.resync()
    out, _ = counter.communicate(timeout=60)
    assert out.strip() == "0", f"echoes lost while the agent re-applied an unchanged VPC: {out}"
    assert router_links(a, vpc["id"]) == links, "no interface was recreated"

    # Unplaced, the port leaves the host; with no port left the VPC goes from it entirely.
    world.place(app, None)
    world.converged(vpc["id"], "a")
    assert not ping(web["ns"], app["private_ip"], wait=1)
    [obs] = a.driver.observed().vpcs
    assert obs.port_ids == (web["id"],)
    world.place(web, None)
    wait_for("the VPC removed from the host", lambda: a.driver.observed().vpcs == ())
    with session_scope(write=False) as s:
        assert s.scalar(select(NetworkHostVpc).where(NetworkHostVpc.vpc_id == vpc["id"])) is None


def test_a_security_group_rule_change_reaches_the_data_plane(world: World) -> None:
    world.agent("a")
    vpc, pub, _ = vpc_with_subnets(world, "10.32.0.0/16")
    sg = world.client.security_groups.create(vpc["id"], "web")
    default = world.client.security_groups.list(vpc_id=vpc["id"], name="default")[0]
    server = world.port("server", pub, security_groups=[sg["id"]])
    client = world.port("client", pub)  # the default group
    stranger = world.port("stranger", pub, security_groups=[sg["id"]])
    for nic in (server, client, stranger):
        world.place(nic, "a")
    world.converged(vpc["id"], "a")
    for nic in (server, client, stranger):
        world.configure(nic, pub)
    world.serve(server["ns"], "serve", 8080)
    assert not connects(client["ns"], server["private_ip"], 8080, timeout=1), "a new group lets nothing in"

    rule = world.client.security_groups.add_rule(
        sg["id"], "ingress", "tcp", port_min=8080, port_max=8080, remote_group=default["id"])
    world.converged(vpc["id"], "a")
    assert connects(client["ns"], server["private_ip"], 8080), "the source group's member gets in"
    assert not connects(stranger["ns"], server["private_ip"], 8080, timeout=1), "others do not"
    assert not connects(client["ns"], server["private_ip"], 8081, timeout=1), "only the port the rule names"

    world.client.security_groups.delete_rule(sg["id"], rule["id"])
    world.converged(vpc["id"], "a")
    assert not connects(client["ns"], server["private_ip"], 8080, timeout=1), "removed: new connections refused"


def test_agent_restart_converges_without_disturbing_an_established_flow(world: World) -> None:
    a = world.agent("a")
    vpc, pub, priv = vpc_with_subnets(world, "10.33.0.0/16")
    web, db = world.port("web", pub), world.port("db", priv)
    for nic in (web, db):
        world.place(nic, "a")
    world.converged(vpc["id"], "a")
    world.configure(web, pub)
    world.configure(db, priv)
    world.serve(db["ns"], "serve", 5432)
    sg = world.client.security_groups.list(vpc_id=vpc["id"], name="default")[0]
    held = world.background(web["ns"], "hold", db["private_ip"], 5432, 8)
    assert held.stdout is not None and held.stdout.readline().strip() == "established"
    links = router_links(a, vpc["id"])

    a.close()  # the agent stops; the data plane keeps running
    late = world.port("late", pub)  # changed while no agent runs
    world.place(late, "a")
    world.client.security_groups.add_rule(
        sg["id"], "ingress", "tcp", port_min=9000, port_max=9000, cidr="10.33.0.0/16")
    a2 = world.agent("a")
    world.converged(vpc["id"], "a")
    world.configure(late, pub)
    assert ping(late["ns"], db["private_ip"]), "the port made while the agent was away works"
    out, _ = held.communicate(timeout=60)
    assert held.returncode == 0, f"the established connection broke across the agent restart: {out}"
    assert set(links.splitlines()) <= set(router_links(a2, vpc["id"]).splitlines()), "nothing was recreated"


def test_two_hosts_reach_each_other_and_the_internet_through_their_own_uplinks(world: World) -> None:
    world.agent("a", 1)
    b = world.agent("b", 2)
    vpc, pub, priv = vpc_with_subnets(world, "10.34.0.0/16")
    alpha, beta = world.port("alpha", pub), world.port("beta", priv)
    world.place(alpha, "a")
    world.place(beta, "b")
    world.converged(vpc["id"], "a", "b")
    world.configure(alpha, pub)
    world.configure(beta, priv)
    assert ping(alpha["ns"], beta["private_ip"]) and ping(beta["ns"], alpha["private_ip"]), "over VXLAN"
    domain = service.dns_domain(Vpc(name=vpc["name"], id=vpc["id"]))
    assert beta["private_ip"] in sh(alpha["ns"], f"busybox nslookup beta.{domain} {pub['dns_ip']}").stdout

    # A floating IP on alpha's port is announced by host a; detaching it cuts it.
    sg = world.client.security_groups.list(vpc_id=vpc["id"], name="default")[0]
    world.client.security_groups.add_rule(
        sg["id"], "ingress", "tcp", port_min=8080, port_max=8080, cidr="0.0.0.0/0")
    fip = world.client.floating_ips.allocate()
    world.client.floating_ips.attach(fip["id"], alpha["id"])
    world.converged(vpc["id"], "a", "b")
    world.serve(alpha["ns"], "serve", 8080)
    assert connects(world.inet, fip["address"], 8080), "the floating IP reaches the port from the internet"
    world.client.floating_ips.detach(fip["id"])
    world.converged(vpc["id"], "a", "b")
    assert not connects(world.inet, fip["address"], 8080, timeout=1), "detached: unreachable"

    # beta's private subnet goes out through a NAT gateway, applied on beta's host b.
    nat = world.client.nat_gateways.create(pub["id"])
    world.converged(vpc["id"], "a", "b")
    outside = world.serve(world.inet, "serve", 9090)
    assert connects(beta["ns"], INTERNET_IP, 9090), "the private subnet reaches out through NAT"
    assert outside.stdout is not None and outside.stdout.readline().split() == ["peer", nat["public_ip"]]
    assert not connects(world.inet, beta["private_ip"], 22, timeout=1)

    # A private port on host a too: the gateway acts on one of the two hosts and the other relays its
    # private ports' outside traffic to it over VXLAN; both leave with the gateway's address.
    gamma = world.port("gamma", priv)
    world.place(gamma, "a")
    world.converged(vpc["id"], "a", "b")
    world.configure(gamma, priv)
    for who in (beta, gamma):
        assert connects(who["ns"], INTERNET_IP, 9090), f"{who['name']} reaches out through the gateway"
        assert outside.stdout.readline().split() == ["peer", nat["public_ip"]]
    world.place(gamma, None)

    # Host b loses its only port of the VPC: it takes the VPC down; host a keeps it.
    world.place(beta, None)
    world.converged(vpc["id"], "a")
    wait_for("the VPC gone from host b", lambda: b.driver.observed().vpcs == ())
    assert [v.vpc_id for v in world.agents["a"].driver.observed().vpcs] == [vpc["id"]]


def test_interfaces_of_deleted_instances_are_released(world: World) -> None:
    """The backstop loop: a deleted instance's primary interface goes, its other interfaces are detached
    (when the instance was deleted where the network hooks were not registered)."""
    from hackboot.compute.models import DELETED, Instance
    from hackboot.network.instances import release_deleted_instances

    _vpc, pub, _ = vpc_with_subnets(world, "10.35.0.0/16")
    primary, extra = world.port("first", pub), world.port("second", pub)
    iid = f"i-{uuid.uuid4().hex[:12]}"
    with session_scope() as s:
        s.add(Instance(id=iid, project_id=world.principal.project, name="gone", flavor_id="VPS-NANO",
                       image_id="img-x", vcpus=1, memory_mb=128, disk_gb=1, status=DELETED, zone_id=ZONE))
    for index, nic in enumerate((primary, extra)):
        with session_scope() as s:
            service.attach_interface(s, world.principal, nic["id"],
                                     service.InstanceRef(iid, world.principal.project, ZONE, None), device_index=index)
    assert release_deleted_instances() == 1
    assert release_deleted_instances() == 0, "nothing left to release"
    left = {n["id"]: n for n in world.client.network_interfaces.list(subnet_id=pub["id"])}
    assert primary["id"] not in left, "the primary interface went with its instance"
    assert left[extra["id"]]["instance_id"] is None, "the other one is detached and stays"
