"""The network agent of a host: reads the control plane's VPC rows and drives this host's data plane.

The compute agent loads this module as one of its extensions (``AgentSettings.extensions``) and calls
:func:`attach`, which registers, through its public hooks:

* a start hook, :func:`start`, run once the host is registered: it sets up the host's data-plane
  namespace (:meth:`NetworkDriver.ensure_host`), announces the host's underlay address to the other
  hosts (``network_hosts``) and starts :class:`NetworkReconciler`;
* a spawn hook around every guest start: :func:`prepare_spec` makes room for the instance's VPC
  interfaces, :func:`after_spawn` plugs each into the guest as a tap (:mod:`hackboot.network.tapnic`)
  before its vCPUs run (see that module for why they are plugged rather than put on the command line).

The reconciler (kind ``"network"``, keys: VPC ids) works per VPC. A host carries a VPC when one of the
VPC's interfaces is attached to an instance placed on it. For such a VPC it builds, from one consistent
read (:func:`hackboot.network.service.vpc_state`), the complete desired state *on this host* — local
ports (this host's interfaces), remote ports (the VPC's interfaces on other hosts, with those hosts'
underlay addresses), security groups with source groups resolved to their members' addresses, floating
IPs, the NAT gateway, flow logs — and hands it to :meth:`NetworkDriver.apply_vpc` (declarative,
idempotent, hitless). It then records the applied version per (VPC, host) (``network_host_vpcs``) and
marks the VPC's pending objects active. A VPC this host no longer carries is removed.

The periodic resync re-applies a VPC whose desired state changed without a version (another host's
underlay address) or whose data plane is not what was applied (a namespace deleted by hand), takes down
VPCs and namespaces nobody wants, restarts dead DHCP servers; a separate thread moves flow records from
the driver into the control plane (:func:`hackboot.network.service.ingest_flows`).

Where several hosts carry a VPC, its NAT gateway acts on one of them (the host of the lowest host id
among those with a port in the private subnets it serves; the other hosts with such ports relay their
outside traffic to it over VXLAN) and a floating IP on the host of its port: an address is announced on the
uplink by exactly one host.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from hackboot.core import reconcile
from hackboot.core.config import get_settings
from hackboot.core.reconcile import Reconciler
from hackboot.network import hosts, service
from hackboot.network.driver import (
    Attachment,
    FloatingIpSpec,
    FlowLogSpec,
    FlowRecord,
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
from hackboot.network.models import ACCEPT, ACTIVE, ALL, ERROR, REJECT, NetworkInterface

log = logging.getLogger("hackboot.network.agent")

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TRAFFIC = {ACCEPT: "accept", REJECT: "reject", ALL: "all"}


def _setting(name: str) -> Any:
    """Default of an option: the `network_<name>` setting, read when the options are made."""
    return Field(default_factory=lambda: getattr(get_settings(), f"network_{name}"))


class NetworkAgentOptions(BaseModel):
    """One host's data-plane options (the `network_*` settings, overridden by explicit values).

    Off by default, the safe way: no underlay (a single host, no VXLAN) and no uplink (no floating IP
    or NAT gateway reaches anything). On one machine, `underlay_namespace` / `uplink_namespace` name
    ``hb-`` namespaces holding a bridge that joins the hosts' underlays / plays the outside world.
    """

    model_config = ConfigDict(extra="forbid")

    underlay_address: str | None = _setting("underlay_address")  # "192.0.2.11/24": VXLAN source
    underlay_namespace: str | None = _setting("underlay_namespace")
    mtu: PositiveInt = _setting("mtu")
    uplink_address: str | None = _setting("uplink_address")  # "198.51.100.11/24"
    uplink_gateway: str | None = _setting("uplink_gateway")  # "198.51.100.1"
    uplink_namespace: str | None = _setting("uplink_namespace")
    dns_upstreams: str = _setting("dns_upstreams")  # comma-separated resolvers for other names
    state_dir: Path | None = _setting("state_dir")  # default: <agent state dir>/network
    workers: PositiveInt = _setting("workers")
    poll_interval: PositiveFloat = _setting("poll_interval_s")
    resync_interval: PositiveFloat = _setting("resync_interval_s")
    flow_log_interval: PositiveFloat = _setting("flow_log_interval_s")
    port_wait: PositiveFloat = _setting("port_wait_s")  # a guest start waits this long for its ports

    def underlay(self, host: str) -> HostUnderlay:
        uplink = None
        if self.uplink_address and self.uplink_gateway:
            peer = PeerLink(self.uplink_namespace) if self.uplink_namespace else None
            uplink = UplinkSpec(self.uplink_address, self.uplink_gateway, peer)
        peer = PeerLink(self.underlay_namespace) if self.underlay_namespace else None
        return HostUnderlay(host=host, address=self.underlay_address or None, peer=peer, mtu=self.mtu, uplink=uplink)


AttachmentFor = Callable[[NetworkInterface], Attachment]


def tap_attachment(nic: NetworkInterface) -> Attachment:
    """Guests' interfaces are taps QEMU gets an fd of (the default)."""
    return Attachment("tap")


# Owners of interfaces other than instances (a load balancer's VIP …), by the prefix of the owner id the
# interface's ``instance_id`` holds, say how their interfaces are realised on a host. Registered by their
# own agents, so this service does not know them.
_owner_attachments: dict[str, AttachmentFor] = {}


def register_owner_attachment(owner_prefix: str, attachment_for: AttachmentFor) -> None:
    """Interfaces whose owner id starts with `owner_prefix` are realised by `attachment_for`."""
    if owner_prefix.startswith(("i-", "vpc-")) or not owner_prefix.endswith("-"):
        raise ValueError(f"owner prefix {owner_prefix!r} must end with '-' and not be an instance's")
    _owner_attachments[owner_prefix] = attachment_for


def default_attachment(nic: NetworkInterface) -> Attachment:
    """A registered owner's attachment for its interfaces; a tap (an instance's) otherwise."""
    owner = nic.instance_id or ""
    for prefix, attachment_for in _owner_attachments.items():
        if owner.startswith(prefix):
            return attachment_for(nic)
    return tap_attachment(nic)


@dataclass
class DesiredVpc:
    """The arguments of one ``apply_vpc`` call, and what they were built from."""

    version: int
    vpc: VpcSpec
    local_ports: list[PortSpec]
    remote_ports: list[RemotePort] = field(default_factory=list)
    groups: list[SecurityGroupSpec] = field(default_factory=list)
    floating_ips: list[FloatingIpSpec] = field(default_factory=list)
    nat: NatSpec | None = None
    flow_logs: list[FlowLogSpec] = field(default_factory=list)
    local_nics: list[NetworkInterface] = field(default_factory=list)
    problems: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, id) → why it is not applied here

    def fingerprint(self) -> str:
        text = repr((self.vpc, self.local_ports, self.remote_ports, self.groups, self.floating_ips, self.nat,
                     self.flow_logs))
        return hashlib.sha256(text.encode()).hexdigest()

    def apply(self, driver: NetworkDriver) -> None:
        driver.apply_vpc(self.vpc, self.local_ports, self.remote_ports, self.groups, self.floating_ips, self.nat,
                         self.flow_logs)


def _hostname(name: str) -> str | None:
    label = name.lower()
    return label if _LABEL_RE.match(label) else None


def build(state: service.VpcState, host_id: str, peers: dict[str, hosts.HostInfo], *, underlay: bool, uplink: bool,
          attachment_for: AttachmentFor = tap_attachment, dns_upstreams: tuple[str, ...] = ()) -> DesiredVpc:
    """The desired state of one VPC on host `host_id` (pure: no I/O)."""
    vpc = state.vpc
    subnets = {s.id: s for s in state.subnets}
    spec = VpcSpec(id=vpc.id, vni=vpc.vni, cidr=vpc.cidr, domain=state.dns_domain, dns_upstreams=dns_upstreams,
                   subnets=tuple(SubnetSpec(s.id, s.cidr, s.gateway_ip, s.dns_ip, s.public) for s in state.subnets))
    placed = [n for n in state.interfaces if n.instance_id is not None and n.host_id is not None
              and n.subnet_id in subnets]
    local = [n for n in placed if n.host_id == host_id]
    out = DesiredVpc(version=vpc.desired_version, vpc=spec, local_ports=[], local_nics=local)

    # Names: one port per name (the first by id), so DNS answers one address.
    names: dict[str, str] = {}
    for n in sorted(placed, key=lambda n: n.id):
        label = _hostname(n.name)
        if label and label not in names:
            names[label] = n.id
    hostname = {nic_id: label for label, nic_id in names.items()}

    for n in local:
        out.local_ports.append(PortSpec(
            id=n.id, subnet_id=n.subnet_id, mac=n.mac, ip=n.private_ip,
            security_groups=tuple(sorted(state.interface_groups.get(n.id, []))), hostname=hostname.get(n.id),
            attachment=attachment_for(n)))
    if underlay:
        for n in placed:
            peer = peers.get(n.host_id or "")
            if n.host_id == host_id or peer is None or not peer.underlay_ip:
                continue
            out.remote_ports.append(RemotePort(id=n.id, ip=n.private_ip, mac=n.mac, host_ip=peer.underlay_ip,
                                               hostname=hostname.get(n.id)))

    # Security groups: those local ports name; a source group stands for its members' addresses.
    members: dict[str, list[str]] = {}
    ip_of = {n.id: n.private_ip for n in state.interfaces}
    for nic_id, group_ids in state.interface_groups.items():
        for gid in group_ids:
            if nic_id in ip_of:
                members.setdefault(gid, []).append(ip_of[nic_id])
    used = {g for p in out.local_ports for g in p.security_groups}
    rules: dict[str, list[SecurityGroupRule]] = {}
    for r in state.rules:
        if r.security_group_id not in used:
            continue
        rules.setdefault(r.security_group_id, []).append(SecurityGroupRule(
            direction=r.direction, protocol=r.protocol, port_min=r.port_min,  # type: ignore[arg-type]
            port_max=r.port_max, cidrs=(r.cidr,) if r.cidr else (),
            remote_ips=tuple(sorted(members.get(r.remote_group_id, []))) if r.remote_group_id else ()))
    out.groups = [SecurityGroupSpec(g.id, tuple(rules.get(g.id, []))) for g in state.groups if g.id in used]

    # Floating IPs act on the host of their port; a NAT gateway on one host of those it serves.
    local_ids = {n.id for n in local}
    for f in state.floating_ips:
        if f.network_interface_id in local_ids:
            nic = next(n for n in local if n.id == f.network_interface_id)
            if not subnets[nic.subnet_id].public:
                continue
            if not uplink:
                out.problems[("floating_ip", f.id)] = f"host {host_id} has no uplink"
                continue
            out.floating_ips.append(FloatingIpSpec(f.address, f.network_interface_id or ""))
    nat_ip = {f.nat_gateway_id: f.address for f in state.floating_ips if f.nat_gateway_id}
    served: dict[str, list[str]] = {}
    for subnet_id, nat_id in state.subnet_nat.items():
        if nat_id is not None:
            served.setdefault(nat_id, []).append(subnet_id)
    best: tuple[int, str] | None = None
    for nat in state.nat_gateways:
        sources = served.get(nat.id, [])
        users = [n for n in placed if n.subnet_id in sources]
        if not users or min(n.host_id or "" for n in users) != host_id or nat.id not in nat_ip:
            continue
        mine = sum(1 for n in users if n.host_id == host_id)
        if best is None or (mine, nat.id) > best:
            best = (mine, nat.id)
    if best is not None:
        nat = next(g for g in state.nat_gateways if g.id == best[1])
        if uplink:
            out.nat = NatSpec(nat.id, nat_ip[nat.id],
                              tuple(sorted(subnets[s].cidr for s in served[nat.id] if s in subnets)))
        else:
            out.problems[("nat_gateway", nat.id)] = f"host {host_id} has no uplink"
    elif underlay:
        # Local ports a gateway on another host serves: relay their outside traffic to it over VXLAN.
        for nat in sorted(state.nat_gateways, key=lambda g: g.id):
            sources = served.get(nat.id, [])
            users = [n for n in placed if n.subnet_id in sources]
            if not any(n.host_id == host_id for n in users) or nat.id not in nat_ip:
                continue
            peer = peers.get(min(n.host_id or "" for n in users))
            if peer is not None and peer.underlay_ip:
                out.nat = NatSpec(nat.id, nat_ip[nat.id],
                                  tuple(sorted(subnets[s].cidr for s in sources if s in subnets)),
                                  host_ip=peer.underlay_ip)
                break

    for fl in state.flow_logs:
        port_ids: tuple[str, ...] | None
        if fl.resource_type == "vpc":
            port_ids = None
        elif fl.resource_type == "subnet":
            port_ids = tuple(sorted(n.id for n in local if n.subnet_id == fl.resource_id))
        else:
            port_ids = (fl.resource_id,) if fl.resource_id in local_ids else ()
        if port_ids == ():
            continue
        out.flow_logs.append(FlowLogSpec(fl.id, port_ids, _TRAFFIC.get(fl.traffic_type, "all")))  # type: ignore[arg-type]
    return out


GUESTS = "guests"  # the busy-set key of the guest NIC sync (not a VPC id)


def flows(records: Iterable[FlowRecord]) -> list[service.Flow]:
    return [service.Flow(interface_id=r.port_id, direction=r.direction, action=r.action.upper(), protocol=r.protocol,
                         src_addr=r.src_ip, dst_addr=r.dst_ip, start_time=r.time, src_port=r.src_port,
                         dst_port=r.dst_port, bytes=r.length) for r in records]


class NetworkReconciler(Reconciler):
    """The VPCs this host carries → :meth:`NetworkDriver.apply_vpc` (or ``remove_vpc``)."""

    kind = service.KIND
    id_prefix = "vpc-"

    def __init__(self, *, host_id: str, host_name: str, driver: NetworkDriver,
                 options: NetworkAgentOptions | None = None, attachment_for: AttachmentFor = default_attachment,
                 stop: threading.Event | None = None, listen: bool = False, compute: Any = None) -> None:
        self.options = options or NetworkAgentOptions()
        super().__init__(scope=host_id, stop=stop, workers=self.options.workers,
                         poll_interval=self.options.poll_interval, resync_interval=self.options.resync_interval,
                         base_backoff=1.0, max_backoff=30.0, name=f"network {host_name}")
        self.host_id = host_id
        self.host_name = host_name
        self.driver = driver
        self.attachment_for = attachment_for
        self.underlay = self.options.underlay(host_name)
        self._listen = listen
        self.compute = compute  # the host's compute agent: its driver plugs VPC NICs into running guests
        self._guests_dirty = threading.Event()
        self._applied: dict[str, str] = {}  # VPC id → fingerprint of what this object applied
        self._applied_lock = threading.Lock()
        self.applied_event = threading.Condition()

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Set up the host's namespace, announce it, then run the loop, the resync and the flow-log threads."""
        self.driver.ensure_host(self.underlay)
        hosts.announce(self.host_id, self.host_name, self.underlay.ip, self.underlay.uplink is not None)
        if self._listen:  # standalone (no compute agent in the process to receive wake-ups for us)
            reconcile.notifier.listen_socket(f"{self.host_name}-network", self.stopping)
        super().start()
        self._spawn("flow-logs", self._flow_log_loop)

    def close(self) -> None:
        """Stop the threads and the driver's; the data plane keeps running (a new agent adopts it)."""
        self.stop(wait=True)
        self.driver.close()

    # --- the loop --------------------------------------------------------------------------------

    def run_once(self) -> None:
        super().run_once()
        if self._guests_dirty.is_set():  # asked for while a sync ran
            self.submit(GUESTS, self._sync_guests)

    def list_ids(self) -> Iterable[str]:
        wanted, have = hosts.work(self.host_id)
        ids = [v for v, desired in sorted(wanted.items()) if have.get(v, -1) < desired]
        return ids + sorted(set(have) - set(wanted))

    def desired(self, vpc_id: str) -> DesiredVpc | None:
        """What this host should have of the VPC (None: nothing)."""
        state = service.vpc_state(vpc_id)
        if state is None:
            return None
        host_ids = {n.host_id for n in state.interfaces if n.host_id}
        if self.host_id not in host_ids:
            return None
        desired = build(state, self.host_id, hosts.hosts(host_ids), underlay=self.underlay.ip is not None,
                        uplink=self.underlay.uplink is not None, attachment_for=self.attachment_for,
                        dns_upstreams=tuple(u.strip() for u in self.options.dns_upstreams.split(",") if u.strip()))
        return desired if desired.local_ports else None

    def reconcile(self, object_id: str) -> None:
        self._converge(object_id, True)

    def _converge(self, vpc_id: str, force: bool) -> None:
        desired = self.desired(vpc_id)
        if desired is None:
            self.driver.remove_vpc(vpc_id)
            hosts.removed(self.host_id, vpc_id)
            with self._applied_lock:
                self._applied.pop(vpc_id, None)
            log.info("%s: VPC %s removed from this host", self.name, vpc_id)
            self._notify_applied()
            self.request_guest_sync()
            return
        fingerprint = desired.fingerprint()
        with self._applied_lock:
            unchanged = self._applied.get(vpc_id) == fingerprint
        if unchanged and not force:
            return
        try:
            desired.apply(self.driver)
        except InvalidSpec as exc:  # retrying cannot help: visible until the next change
            reason = f"{exc} (host {self.host_name})"
            log.warning("%s: %s", self.name, reason)
            hosts.applied(self.host_id, vpc_id, desired.version, error=reason)
            service.observed(vpc_id, desired.version, error=reason)
            return
        with self._applied_lock:
            self._applied[vpc_id] = fingerprint
        hosts.applied(self.host_id, vpc_id, desired.version)
        service.observed(vpc_id, desired.version)
        for nic in desired.local_nics:  # a failure reported earlier is over
            if nic.status == ERROR:
                service.set_status("network_interface", nic.id, ACTIVE)
        for (kind, object_id), why in desired.problems.items():
            if kind == "nat_gateway":
                service.set_status(kind, object_id, ERROR, why)
        self._notify_applied()
        self.request_guest_sync()

    def _notify_applied(self) -> None:
        with self.applied_event:
            self.applied_event.notify_all()

    def report_failure(self, object_id: str, reason: str, failures: int) -> None:
        """The data plane keeps failing: say so on this host's interfaces of the VPC."""
        super().report_failure(object_id, reason, failures)
        state = service.vpc_state(object_id)
        for nic in state.interfaces if state else []:
            if nic.host_id == self.host_id:
                service.set_status("network_interface", nic.id, ERROR,
                                   f"The network of host {self.host_name} cannot be set up: {reason}")

    # --- resync ----------------------------------------------------------------------------------

    def resync(self) -> None:
        wanted, have = hosts.work(self.host_id)
        observed = self.driver.observed()
        present = {v.vpc_id: v for v in observed.vpcs}
        busy = self.busy()
        for vpc_id in sorted(set(wanted) | set(have) | set(present)):
            if vpc_id in busy:
                continue
            seen = present.get(vpc_id)
            if vpc_id not in wanted:
                self.submit(vpc_id, self._converge, vpc_id, True)  # removes it
            elif seen is None:
                self.submit(vpc_id, self._converge, vpc_id, True)  # gone from the system: rebuild
            else:
                self.submit(vpc_id, self._converge, vpc_id, False)  # re-applied only if the desired state moved
        # Namespaces and state of VPCs nobody knows (a crash between steps): everything known is kept.
        keep = set(wanted) | set(have) | set(present) | self.busy()
        for removed in self.driver.remove_orphans(sorted(keep)):
            log.info("%s: removed the orphaned data plane of %s", self.name, removed)
        supervise = getattr(self.driver, "supervise", None)
        if supervise is not None:
            supervise()
        self.request_guest_sync()
        self.collect_flow_logs()

    def collect_flow_logs(self) -> int:
        records = self.driver.read_flow_logs()
        return service.ingest_flows(flows(records)) if records else 0

    def _flow_log_loop(self) -> None:
        while not self.stopping.wait(self.options.flow_log_interval):
            try:
                self.collect_flow_logs()
            except Exception:
                log.exception("%s: storing flow records failed", self.name)

    # --- guests ----------------------------------------------------------------------------------

    def request_guest_sync(self) -> None:
        """Have the running guests' VPC NICs match their attached interfaces (soon, in the pool)."""
        if self.compute is None:
            return
        self._guests_dirty.set()
        self.submit(GUESTS, self._sync_guests)

    def _sync_guests(self) -> None:
        while self._guests_dirty.is_set():
            self._guests_dirty.clear()
            self.sync_guests()

    def sync_guests(self) -> None:
        """Hot-plug into each running guest of this host the VPC NICs of the interfaces attached to its
        instance (once their taps exist), and unplug those of interfaces no longer attached to it."""
        from hackboot.network import tapnic

        compute_driver = self.compute.driver if self.compute is not None else None
        if compute_driver is None or not hasattr(compute_driver, "attach_nic"):
            return
        want = hosts.guest_ports(self.host_id)
        built = {p for v in self.driver.observed().vpcs for p in v.port_ids}
        for iid in compute_driver.list_instances():
            try:
                if str(compute_driver.state(iid).value) not in ("running", "paused"):
                    continue
            except Exception:
                continue
            ports = want.get(iid, [])
            with tapnic.instance_lock(iid):
                have = tapnic.plugged(compute_driver, iid)
                for port_id in sorted(set(have) - {p for p, _ in ports}):
                    try:
                        tapnic.unplug(compute_driver, iid, port_id)
                        log.info("%s: unplugged %s from %s", self.name, port_id, iid)
                    except Exception as exc:
                        log.warning("%s: cannot unplug %s from %s: %s", self.name, port_id, iid, exc)
                for port_id, mac in ports:
                    if port_id in have or port_id not in built:
                        continue
                    try:
                        tapnic.plug(compute_driver, self.driver, iid, port_id, mac)
                        log.info("%s: plugged %s into %s", self.name, port_id, iid)
                    except Exception as exc:
                        log.warning("%s: cannot plug %s into %s: %s", self.name, port_id, iid, exc)
                        service.set_status("network_interface", port_id, ERROR,
                                           f"Cannot plug it into instance {iid}: {exc}")

    # --- for compute -----------------------------------------------------------------------------

    def wait_for_ports(self, port_ids: Iterable[str], timeout: float) -> None:
        """Until every port is built on this host (its VPC applied); raises TimeoutError."""
        import time

        wanted = list(port_ids)
        deadline = time.monotonic() + timeout
        missing = wanted
        while True:
            observed = {p for v in self.driver.observed().vpcs for p in v.port_ids}
            missing = [p for p in wanted if p not in observed]
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"network interfaces {', '.join(missing)} are not set up on host "
                                   f"{self.host_name} after {timeout:.0f}s")
            self.wake(None)
            with self.applied_event:
                self.applied_event.wait(min(left, 1.0))


# ---------------------------------------------------------------------------------------------- hooks

_local: NetworkReconciler | None = None
# Options of the reconciler the compute agent's start hook makes (None: NetworkAgentOptions(), i.e. the
# network_* settings); a process running agents of its own (tests, tools) may set it first.
default_options: NetworkAgentOptions | None = None


def local_network_agent() -> NetworkReconciler | None:
    return _local


def make_driver(state_dir: Path) -> NetworkDriver:
    from hackboot.network.linux import LinuxNetworkDriver

    return LinuxNetworkDriver(state_dir)


def attach(compute_agent: Any) -> None:
    """Register this module's hooks with a compute agent (it calls this when loading its extensions)."""
    from hackboot.network import tapnic

    compute_agent.register_spawn_hook(tapnic.prepare_spec, tapnic.after_spawn)
    compute_agent.register_start_hook(start)
    compute_agent.enable_vpc_nics()


def start(compute_agent: Any, options: NetworkAgentOptions | None = None) -> NetworkReconciler:
    """Start the network reconciler of this host (called by the compute agent once registered)."""
    global _local
    options = options or default_options or NetworkAgentOptions()
    state_dir = Path(options.state_dir or Path(compute_agent.state_dir) / "network")
    agent = NetworkReconciler(host_id=str(compute_agent.host_id), host_name=str(compute_agent.name),
                              driver=make_driver(state_dir), options=options, stop=compute_agent.stopping,
                              compute=compute_agent)
    agent.start()
    _local = agent

    def close_on_stop() -> None:
        compute_agent.stopping.wait()
        with contextlib.suppress(Exception):
            agent.driver.close()

    threading.Thread(target=close_on_stop, name="hb-network-close", daemon=True).start()
    return agent
