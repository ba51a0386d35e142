"""Real `tiny` guests (TCG) on VPC ports, end to end: the REST API makes instances, VPCs, groups,
floating IPs and NAT gateways; a host agent (compute + network, in this process, on the server's
database) boots the guests with their VPC NIC as eth0 and the restricted user-mode NIC only for SSH.

Three guests for the whole module, shared: `web` (public subnet, floating IP), `db` (private subnet,
out through a NAT gateway), and `other` in another project's default VPC. "The internet" is a namespace
with documentation addresses; hosts' data planes are namespaces too. Everything is removed afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hackboot.core.config import reset_settings_cache
from hackboot.core.db import dispose_engine
from hackboot.loadbalancers import agent as lbagent
from hackboot.network import agent as netagent
from hackboot.network import netns
from hackboot.network.agent import NetworkAgentOptions
from hackboot.sdk import ApiError, Client
from tests.integration.compute.conftest import SSH_OPTS, short_tmpdir
from tests.integration.network.api_helpers import unique
from tests.integration.network.dataplane_contract import INTERNET_IP, TOOL, sh
from tests.support import REPO, Cloud, make_cloud

MISSING = [t for t in ("ip", "bridge", "nft", "dnsmasq", "busybox", "ssh", "qemu-system-x86_64")
           if shutil.which(t) is None]
pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {', '.join(MISSING)} (run `make deps`)"),
    pytest.mark.xdist_group("network-guests"),
]
ZONE = "PAR1-a"
IMAGES = Path(os.environ.get("HACKBOOT_IMAGE_CACHE", "/var/tmp/hackboot-image-cache"))


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 120.0, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(interval)


@dataclass
class Site:
    """The cloud, its host agent (in this process) and the namespaces standing for the world around it."""

    cloud: Cloud
    prefix: str
    agent_dir: Path
    keypath: Path
    agent: Any = None
    stop: threading.Event = field(default_factory=threading.Event)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def inet(self) -> str:
        return f"{self.prefix}-inet"

    @property
    def host_name(self) -> str:
        return f"{self.prefix}h"

    def start_agent(self) -> Any:
        from hackboot.compute.agent import Agent, AgentSettings

        self.stop = threading.Event()
        cfg = AgentSettings(name=self.host_name, zone=ZONE, state_dir=self.agent_dir, driver="qemu", accel="tcg",
                            extensions="hackboot.network.agent,hackboot.loadbalancers.agent", cpu_allocation_ratio=8.0,
                            disk_allocation_ratio=10.0, poll_interval=0.5, heartbeat_interval=1.0,
                            check_interval=5.0)
        self.agent = Agent(cfg, stop_event=self.stop)
        self.agent.start()
        assert self.agent.ready.wait(120), "the host agent did not start"
        assert netagent.local_network_agent() is not None, "the network extension started"
        return self.agent

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            lb = lbagent.local_agent()
            if lb is not None:
                lb.close()
            net = netagent.local_network_agent()
            if net is not None:
                net.stop(wait=True)
                net.driver.close()
            self.agent = None

    def serve(self, ns: str, kind: str, port: int) -> subprocess.Popen[str]:
        proc = netns.popen(ns, [sys.executable, "-u", "-c", TOOL, kind, str(port)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        return proc


def ssh(inst: dict[str, Any], key: Path, command: str, timeout: float = 90.0, check: bool = True) -> str:
    """Run `command` in the guest over its management NIC (127.0.0.1 forward), retrying until sshd answers."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(["ssh", *SSH_OPTS, "-i", str(key), "-p", str(inst["ssh_port"]), "root@127.0.0.1",
                               command], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 or (not check and proc.returncode != 255):
            return proc.stdout
        last = proc.stderr.strip() or proc.stdout.strip()
        time.sleep(0.5)
    raise TimeoutError(f"ssh to {inst['name']} `{command}` failed for {timeout:.0f}s: {last}")


def guest_ok(inst: dict[str, Any], key: Path, command: str) -> bool:
    """Whether `command` succeeds in the guest (ssh itself must work)."""
    out = ssh(inst, key, f"if {command} >/dev/null 2>&1; then echo yes; else echo no; fi")
    return out.strip().endswith("yes")


def fetch(inst: dict[str, Any], key: Path, url: str) -> bool:
    return guest_ok(inst, key, f"timeout 5 wget -q -O - {url} | grep -q ok")  # (busybox wget has no -T here)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    proc = subprocess.run([sys.executable, "-m", "hackboot.images.builder", "tiny", "--out", str(IMAGES)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"building the tiny image failed: {proc.stderr[-2000:]}")
    state = short_tmpdir("hbnv-")
    (state / "images").mkdir()
    (state / "images" / "builtin").symlink_to(IMAGES)
    cloud = make_cloud(state, HACKBOOT_RUN_LOCAL_AGENT="false", HACKBOOT_LOG_LEVEL="info")
    cloud.start()
    prefix = f"hb-g{uuid.uuid4().hex[:5]}"
    s = Site(cloud=cloud, prefix=prefix, agent_dir=short_tmpdir("hbna-"), keypath=state / "vpc.key")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HACKBOOT_STATE_DIR", str(state))
        mp.setenv("HACKBOOT_DATABASE_URL", "")
        mp.setenv("HACKBOOT_CONFIG", str(state / "none.toml"))
        reset_settings_cache()
        dispose_engine()
        netagent.default_options = NetworkAgentOptions(
            underlay_address="192.0.2.11/24", underlay_namespace=f"{prefix}-ul",
            uplink_address="198.51.100.11/24", uplink_gateway=INTERNET_IP, uplink_namespace=s.inet,
            state_dir=s.agent_dir / "network", poll_interval=1.0, resync_interval=10.0)
        try:
            s.start_agent()
            sh(s.inet, f"ip addr add {INTERNET_IP}/24 dev br0; ip addr add 203.0.113.1/24 dev br0")
            yield s
        finally:
            for p in s.procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            driver = s.agent.driver if s.agent is not None else None
            net = netagent.local_network_agent()
            s.stop_agent()
            if driver is not None:  # guests outlive agents by design: these are the test's
                for iid in list(driver.list_instances()):
                    with contextlib.suppress(Exception):
                        driver.destroy(iid)
                with contextlib.suppress(Exception):
                    driver.close()
            lb = lbagent.local_agent()
            if lb is not None:  # proxies outlive agents by design too
                for lb_id in lb.driver.running():
                    with contextlib.suppress(Exception):
                        lb.driver.remove(lb_id)
                for name in netns.list_ours(lbagent.host_prefix(lb.host_id)):
                    netns.delete(name)
            if net is not None:
                with contextlib.suppress(Exception):
                    net.driver.destroy_host()  # type: ignore[attr-defined]
                host_ns = getattr(net.driver, "host_ns", "")
                for name in netns.list_ours(host_ns) if host_ns else []:
                    netns.delete(name)
            for name in netns.list_ours(prefix):
                netns.delete(name)
            netagent.default_options = None
            netagent._local = None
            dispose_engine()
            cloud.stop()
            shutil.rmtree(s.agent_dir, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)
    reset_settings_cache()


@dataclass
class Net:
    client: Client
    other: Client
    vpc: dict[str, Any]
    pub: dict[str, Any]
    priv: dict[str, Any]
    sg_web: dict[str, Any]
    sg_db: dict[str, Any]
    web: dict[str, Any]
    db: dict[str, Any]
    peer: dict[str, Any]  # the other project's guest, on its default VPC


def _project(cloud: Cloud, key: Path) -> Client:
    admin = cloud.admin_client_unscoped()
    project = admin.projects.create(unique("vpcs"))
    client = cloud.client(project=project["id"])
    kp = client.keypairs.create("vpc-key")
    if not key.exists():
        key.write_text(kp["private_key"])
        key.chmod(0o600)
    else:
        client.keypairs.delete("vpc-key")
        client.keypairs.create("vpc-key", public_key=subprocess.run(
            ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True).stdout.strip())
    return client


@pytest.fixture(scope="module")
def net(site: Site) -> Net:
    c = _project(site.cloud, site.keypath)
    other = _project(site.cloud, site.keypath)
    vpc = c.vpcs.create(unique("shop"), "10.40.0.0/16", internet_gateway=True)
    pub = c.subnets.create(vpc["id"], "10.40.1.0/24", zone=ZONE, public=True, name="web")
    priv = c.subnets.create(vpc["id"], "10.40.2.0/24", zone=ZONE, name="db")
    sg_web = c.security_groups.create(vpc["id"], "web")
    sg_db = c.security_groups.create(vpc["id"], "db")
    c.security_groups.add_rule(sg_web["id"], "ingress", "tcp", port_min=8080, port_max=8080, cidr="0.0.0.0/0")
    for sg in (sg_web, sg_db):
        c.security_groups.add_rule(sg["id"], "ingress", "icmp", cidr="10.40.0.0/16")
    web = c.instances.create("web", flavor="VPS-NANO", image="tiny", keypair="vpc-key", subnet=pub["id"],
                             security_groups=[sg_web["id"]])
    db = c.instances.create("db", flavor="VPS-NANO", image="tiny", keypair="vpc-key", subnet=priv["id"],
                            security_groups=[sg_db["id"]], private_ip="10.40.2.20")
    peer = other.instances.create("peer", flavor="VPS-NANO", image="tiny", keypair="vpc-key")  # default VPC
    out = []
    for client, inst in ((c, web), (c, db), (other, peer)):
        inst = client.instances.wait(inst["id"], timeout=300)
        assert inst["status"] == "ACTIVE", inst
        ssh(inst, site.keypath, "true", timeout=180)
        out.append(inst)
    return Net(c, other, vpc, pub, priv, sg_web, sg_db, *out)


def nics(client: Client, inst: dict[str, Any]) -> list[dict[str, Any]]:
    return client.instances.interfaces(inst["id"])


def primary_ip(client: Client, inst: dict[str, Any]) -> str:
    return str(nics(client, inst)[0]["private_ip"])


# --------------------------------------------------------------------------------------------------

def test_the_vpc_nic_is_the_guests_first_and_its_only_default_route(site: Site, net: Net) -> None:
    [web_nic] = nics(net.client, net.web)
    assert web_nic["subnet_id"] == net.pub["id"] and web_nic["status"] == "active"
    assert net.sg_web["id"] in web_nic["security_groups"]
    assert primary_ip(net.client, net.db) == "10.40.2.20", "the requested private address"
    addrs = ssh(net.web, site.keypath, "ip -4 -o addr show dev eth0")
    assert f"{web_nic['private_ip']}/24" in addrs, addrs
    routes = ssh(net.web, site.keypath, "ip route")
    defaults = [line.split()[:5] for line in routes.splitlines() if line.startswith("default")]
    assert defaults == [["default", "via", net.pub["gateway_ip"], "dev", "eth0"]], \
        f"one default route, through the VPC, none through the management NIC: {routes}"
    # The other project's guest was given its default VPC and subnet, made on first use.
    [default] = net.other.vpcs.list(is_default=True)
    [peer_nic] = nics(net.other, net.peer)
    assert peer_nic["vpc_id"] == default["id"]


def test_same_and_cross_subnet_reachability_and_names(site: Site, net: Net) -> None:
    db_ip, web_ip = primary_ip(net.client, net.db), primary_ip(net.client, net.web)
    assert guest_ok(net.web, site.keypath, f"ping -c 2 -W 3 {db_ip}"), "web → db across subnets"
    assert guest_ok(net.db, site.keypath, f"ping -c 2 -W 3 {web_ip}"), "db → web"
    assert guest_ok(net.web, site.keypath, f"ping -c 2 -W 3 {net.pub['gateway_ip']}"), "the router answers"
    domain = re.sub(r"[^a-z0-9-]+", "-", net.vpc["name"].lower()).strip("-") + ".internal"
    answer = ssh(net.web, site.keypath, f"nslookup db.{domain} {net.pub['dns_ip']}", check=False)
    assert db_ip in answer, answer


def test_a_security_group_blocks_tcp_until_a_rule_allows_it_without_a_restart(site: Site, net: Net) -> None:
    db_ip = primary_ip(net.client, net.db)
    ssh(net.db, site.keypath, "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && "
                              "httpd -p 5432 -h /tmp/www")
    assert not fetch(net.web, site.keypath, f"http://{db_ip}:5432/"), "the db group lets no TCP in"
    rule = net.client.security_groups.add_rule(net.sg_db["id"], "ingress", "tcp", port_min=5432, port_max=5432,
                                               remote_group=net.sg_web["id"])
    wait_for("the rule to apply", lambda: fetch(net.web, site.keypath, f"http://{db_ip}:5432/"))
    launched = net.client.instances.get(net.db["id"])["launched_at"]
    assert launched == net.db["launched_at"], "no restart"
    net.client.security_groups.delete_rule(net.sg_db["id"], rule["id"])
    wait_for("the rule to go", lambda: not fetch(net.web, site.keypath, f"http://{db_ip}:5432/"))


def test_floating_ip_reaches_web_from_the_internet_and_detaching_cuts_it(site: Site, net: Net) -> None:
    ssh(net.web, site.keypath, "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && httpd -p 8080 -h /tmp/www")
    [web_nic] = nics(net.client, net.web)
    fip = net.client.floating_ips.allocate()
    net.client.floating_ips.attach(fip["id"], web_nic["id"])

    def reachable() -> bool:
        return "ok" in sh(site.inet, f"busybox timeout 5 busybox wget -q -O - http://{fip['address']}:8080/").stdout

    wait_for("the floating IP to answer from the internet", reachable)
    net.client.floating_ips.detach(fip["id"])
    wait_for("the detached floating IP to stop answering", lambda: not reachable())
    net.client.floating_ips.release(fip["id"])


def test_private_subnet_reaches_out_through_nat_and_is_not_reachable_from_outside(site: Site, net: Net) -> None:
    outside = site.serve(site.inet, "serve", 9090)
    assert not guest_ok(net.db, site.keypath, f"nc -w 3 {INTERNET_IP} 9090 </dev/null | grep -q ok"), \
        "no way out before a NAT gateway"
    nat = net.client.nat_gateways.create(net.pub["id"])
    wait_for("the NAT gateway", lambda: guest_ok(net.db, site.keypath,
                                                 f"nc -w 3 {INTERNET_IP} 9090 </dev/null | grep -q ok"))
    assert outside.stdout is not None
    nat_ip = net.client.floating_ips.get(nat["floating_ip_id"])["address"]
    assert outside.stdout.readline().split() == ["peer", nat_ip], "the outside sees the NAT gateway's address"
    ssh(net.db, site.keypath, "mkdir -p /tmp/www && echo ok > /tmp/www/index.html && httpd -p 8081 -h /tmp/www")
    for target in (nat_ip, primary_ip(net.client, net.db)):
        out = sh(site.inet, f"ip route replace 10.40.0.0/16 via 198.51.100.11; "
                            f"busybox timeout 5 busybox wget -q -O - http://{target}:8081/").stdout
        assert "ok" not in out, f"{target} let the outside in"


def test_nic_hotplug_on_a_running_instance(site: Site, net: Net) -> None:
    extra = net.client.network_interfaces.create(net.priv["id"], name="web-db",
                                                 security_groups=[net.sg_db["id"]])
    net.client.instances.attach_interface(net.web["id"], extra["id"])
    wait_for("the guest to see a second VPC NIC",
             lambda: guest_ok(net.web, site.keypath, "test -e /sys/class/net/eth2 || "
                                                     "ip -o link | grep -q " + extra["mac"]))
    iface = ssh(net.web, site.keypath, f"ip -o link | grep {extra['mac']} | cut -d: -f2").strip()
    ssh(net.web, site.keypath, f"ip link set {iface} up; udhcpc -i {iface} -n -q -t 5 -T 1 -s /bin/true 2>&1;"
                               f" ip addr add {extra['private_ip']}/24 dev {iface}", check=False)
    assert guest_ok(net.web, site.keypath, f"ping -c 2 -W 3 -I {iface} {primary_ip(net.client, net.db)}"), \
        "the hot-plugged NIC reaches db on its own subnet"
    assert [n["id"] for n in nics(net.client, net.web)][1:] == [extra["id"]]
    net.client.instances.detach_interface(net.web["id"], extra["id"])
    wait_for("the NIC to be unplugged",
             lambda: not guest_ok(net.web, site.keypath, f"ip -o link | grep -q {extra['mac']}"))
    with pytest.raises(ApiError) as err:  # the primary interface goes with the instance only
        net.client.instances.detach_interface(net.web["id"], nics(net.client, net.web)[0]["id"])
    assert err.value.status == 409
    net.client.network_interfaces.delete(extra["id"])


def test_an_internet_facing_load_balancer_spreads_over_two_guests_and_follows_their_health(site: Site,
                                                                                            net: Net) -> None:
    c = net.client
    sg_lb = c.security_groups.create(net.vpc["id"], unique("lb"))
    c.security_groups.add_rule(sg_lb["id"], "ingress", "tcp", port_min=80, port_max=80, cidr="0.0.0.0/0")
    for sg in (net.sg_web, net.sg_db):  # the members admit the load balancer's group only
        c.security_groups.add_rule(sg["id"], "ingress", "tcp", port_min=8090, port_max=8090, remote_group=sg_lb["id"])
    for inst, name in ((net.web, "web"), (net.db, "db")):
        ssh(inst, site.keypath, f"mkdir -p /tmp/lb && echo {name} > /tmp/lb/index.html && httpd -p 8090 -h /tmp/lb")
    lb = c.load_balancers.create(unique("lb"), net.pub["id"], internet_facing=True, security_groups=[sg_lb["id"]])
    pool = c.load_balancers.add_pool(lb["id"], "app", protocol="http", health_check={
        "protocol": "http", "path": "/", "expected_codes": "200", "interval_s": 2, "timeout_s": 1,
        "healthy_threshold": 1, "unhealthy_threshold": 2})
    members = {name: c.load_balancers.add_member(lb["id"], pool["id"], 8090, network_interface=nics(c, inst)[0]["id"])
               for inst, name in ((net.web, "web"), (net.db, "db"))}
    c.load_balancers.add_listener(lb["id"], "http", 80, default_pool=pool["id"])
    c.load_balancers.wait(lb["id"], "ACTIVE", timeout=120)

    def health() -> dict[str, str]:
        """Member → "up" once a check passed (HAProxy starts members up before their first check)."""
        by_id = {m["id"]: m["health"] if m["health"] != "up" or "passed" in m["health_reason"] else "starting"
                 for m in c.load_balancers.members(lb["id"], pool["id"])}
        return {name: by_id[m["id"]] for name, m in members.items()}

    def answers(n: int) -> dict[str, int]:
        got: dict[str, int] = {}
        for _ in range(n):
            body = sh(site.inet, f"curl -s -m 5 http://{lb['public_ip']}/").stdout.strip() or "(nothing)"
            got[body] = got.get(body, 0) + 1
        return got

    wait_for("both guests healthy", lambda: health() == {"web": "up", "db": "up"})
    assert answers(6) == {"web": 3, "db": 3}, "round robin over the guests, from the internet"
    ssh(net.db, site.keypath,  # (tiny has no pkill)
        'for p in $(pidof httpd); do tr "\\0" " " < /proc/$p/cmdline | grep -q "p 8090" && kill $p; done; true')
    wait_for("db taken out", lambda: health() == {"web": "up", "db": "down"})
    assert answers(4) == {"web": 4}, "traffic moves to the healthy guest"
    ssh(net.db, site.keypath, "httpd -p 8090 -h /tmp/lb")
    wait_for("db back", lambda: health() == {"web": "up", "db": "up"})
    assert answers(4) == {"web": 2, "db": 2}, "and returns"
    c.load_balancers.delete(lb["id"])
    c.load_balancers.wait(lb["id"], "DELETED", timeout=120)


def test_two_projects_cannot_reach_each_other(site: Site, net: Net) -> None:
    peer_ip, web_ip = primary_ip(net.other, net.peer), primary_ip(net.client, net.web)
    assert not guest_ok(net.web, site.keypath, f"ping -c 2 -W 2 {peer_ip}")
    assert not guest_ok(net.peer, site.keypath, f"ping -c 2 -W 2 {web_ip}")
    gateway = net.other.subnets.get(nics(net.other, net.peer)[0]["subnet_id"])["gateway_ip"]
    assert guest_ok(net.peer, site.keypath, f"ping -c 1 -W 3 {gateway}"), "its own network works"


def test_agent_restart_keeps_traffic_flowing(site: Site, net: Net) -> None:
    db_ip = primary_ip(net.client, net.db)
    ssh(net.web, site.keypath, f"(ping -c 100 -i 0.2 {db_ip} > /tmp/ping.log 2>&1 &)")
    site.stop_agent()
    site.start_agent()
    wait_for("the ping to finish", lambda: "packet loss" in ssh(net.web, site.keypath, "cat /tmp/ping.log"),
             timeout=120)
    log = ssh(net.web, site.keypath, "cat /tmp/ping.log")
    assert " 0% packet loss" in log, log
    assert guest_ok(net.web, site.keypath, f"ping -c 1 -W 3 {db_ip}"), "and after the restart"


def test_deleting_an_instance_deletes_its_primary_interface(site: Site, net: Net) -> None:
    [peer_nic] = nics(net.other, net.peer)
    net.other.instances.delete(net.peer["id"])
    net.other.instances.wait_deleted(net.peer["id"], timeout=120)
    with pytest.raises(ApiError) as err:
        net.other.network_interfaces.get(peer_nic["id"])
    assert err.value.status == 404
