"""The load balancers' host agent: the desired load balancers of this host → running proxies.

Each load balancer placed on this host gets a network namespace of its own (``hb-l<host>-<lb>``). Its VIP is
an interface of the VPC owned by the load balancer; the network agent realises it as a veth whose inner end,
``eth0``, it puts in that namespace (registered below with :func:`hackboot.network.agent.register_owner_attachment`),
so the VPC's router, security groups, floating IP and flow logs apply to the VIP as to any instance's port.
This reconciler makes the namespace, gives ``eth0`` the VIP and the subnet's router as default route, and has
the engine (:class:`~hackboot.loadbalancers.haproxy.HaproxyDriver`) run exactly the desired configuration
there — hitlessly, since the engine reloads without dropping connections.

An observer thread moves what the proxies see into the control plane every ``observe_interval`` seconds:
member health (events when it changes), counters, access logs (by cursor, kept in the state directory so a
restarted agent does not store a record twice). The proxies outlive the agent: a restarted agent adopts them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt
from sqlalchemy import select

from hackboot.core import reconcile
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope
from hackboot.core.reconcile import Reconciler
from hackboot.loadbalancers import desired, service
from hackboot.loadbalancers.driver import InvalidSpec, LoadBalancerDriver
from hackboot.network import agent as network_agent
from hackboot.network import netns
from hackboot.network.driver import Attachment
from hackboot.network.models import NetworkInterface

log = logging.getLogger("hackboot.loadbalancers.agent")

KIND = "loadbalancer"
VIP_IF = "eth0"


def _tag(value: str, n: int) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:n]


def host_prefix(host_id: str) -> str:
    """The prefix of the namespaces of host `host_id`'s load balancers (one machine may play several hosts)."""
    return f"hb-l{_tag(host_id, 6)}-"


def namespace_of(host_id: str, lb_id: str) -> str:
    return host_prefix(host_id) + _tag(lb_id, 16)


def vip_attachment(nic: NetworkInterface) -> Attachment:
    """How the network agent realises a load balancer's VIP interface: a veth into its namespace."""
    return Attachment("veth", namespace=namespace_of(nic.host_id or "", nic.instance_id or ""), ifname=VIP_IF)


def _setting(name: str) -> Any:
    return Field(default_factory=lambda: getattr(get_settings(), f"loadbalancer_{name}"))


class LoadBalancerAgentOptions(BaseModel):
    """One host's load-balancer agent options (the `loadbalancer_*` settings, overridden by explicit values)."""

    model_config = ConfigDict(extra="forbid")

    state_dir: Path | None = _setting("state_dir")  # default: <agent state dir>/loadbalancers
    workers: PositiveInt = _setting("workers")
    poll_interval: PositiveFloat = _setting("poll_interval_s")
    resync_interval: PositiveFloat = _setting("resync_interval_s")
    observe_interval: PositiveFloat = _setting("observe_interval_s")


class VipNotReady(RuntimeError):
    """The network agent has not plugged the VIP into the namespace yet (retried shortly)."""


class LoadBalancerReconciler(Reconciler):
    kind = KIND
    id_prefix = "lb-"

    def __init__(self, *, host_id: str, host_name: str, driver: LoadBalancerDriver, state_dir: Path,
                 options: LoadBalancerAgentOptions | None = None, stop: threading.Event | None = None,
                 listen: bool = False) -> None:
        self.options = options or LoadBalancerAgentOptions()
        # Short backoff: the first attempt usually waits for the network agent to plug the VIP in.
        super().__init__(scope=host_id, stop=stop, workers=self.options.workers,
                         poll_interval=self.options.poll_interval, resync_interval=self.options.resync_interval,
                         base_backoff=0.25, max_backoff=10.0, failure_threshold=8, name=f"loadbalancer {host_name}")
        self.host_id = host_id
        self.host_name = host_name
        self.driver = driver
        self.state_dir = state_dir
        self._listen = listen

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self._listen:  # standalone (no compute agent in the process to receive wake-ups for us)
            reconcile.notifier.listen_socket(f"{self.host_name}-{KIND}", self.stopping)
        super().start()
        self._spawn("observe", self._observe_loop)

    def close(self) -> None:
        """Stop the threads; the proxies keep running (a new agent adopts them)."""
        self.stop(wait=True)
        self.driver.close()

    # --- the loop --------------------------------------------------------------------------------

    def list_ids(self) -> Iterable[str]:
        return desired.to_reconcile(self.host_id)

    def namespace(self, lb_id: str) -> str:
        return namespace_of(self.host_id, lb_id)

    def reconcile(self, object_id: str) -> None:
        want = desired.desired(object_id)
        if want is None:  # being deleted (or gone): stop the proxy, then let the control plane finish
            self._take_down(object_id)
            service.finish_delete(object_id)
            return
        ns = self.namespace(object_id)
        if netns.create(ns):
            self._wake_network(want.network_interface_id)
        self._configure_vip(ns, want)
        try:
            self.driver.apply(want.spec, ns)
        except InvalidSpec as exc:  # the engine refused it: retrying cannot help, say why
            log.warning("%s: %s refused: %s", self.name, object_id, exc)
            desired.mark_applied(object_id, want.version, error=f"The proxy refused the configuration: {exc}")
            return
        desired.mark_applied(object_id, want.version)

    def report_failure(self, object_id: str, reason: str, failures: int) -> None:
        super().report_failure(object_id, reason, failures)
        want = desired.desired(object_id)
        if want is not None:
            desired.mark_applied(object_id, want.version, error=f"Retrying after {failures} failed attempts: {reason}")

    @staticmethod
    def _wake_network(nic_id: str | None) -> None:
        """The namespace is new: the network agent may have given up on the VIP for now; wake it."""
        if nic_id is None:
            return
        with session_scope(write=False) as s:
            vpc_id = s.scalar(select(NetworkInterface.vpc_id).where(NetworkInterface.id == nic_id))
        if vpc_id:
            reconcile.notify("network", str(vpc_id))

    @staticmethod
    def _configure_vip(ns: str, want: desired.DesiredLoadBalancer) -> None:
        """``eth0`` carries the VIP, the subnet's router is the default route (idempotent)."""
        links = [lk for lk in netns.ip_json(ns, "addr", "show") if lk.get("ifname") == VIP_IF]
        if not links:
            raise VipNotReady(f"waiting for the network to plug the VIP {want.spec.vip} in")
        address = f"{want.spec.vip}/{want.prefix_len}"
        have = {f"{a['local']}/{a['prefixlen']}" for a in links[0].get("addr_info", []) if a.get("family") == "inet"}
        batch = [f"addr del {a} dev {VIP_IF}" for a in sorted(have - {address})]
        if address not in have:
            batch.append(f"addr add {address} dev {VIP_IF}")
        if want.gateway_ip:
            routes = netns.ip_json(ns, "route", "show", "default")
            if not any(r.get("gateway") == want.gateway_ip for r in routes):
                batch.append(f"route replace default via {want.gateway_ip} dev {VIP_IF}")
        netns.ip_batch(ns, batch)

    def _take_down(self, lb_id: str) -> None:
        self.driver.remove(lb_id)
        netns.delete(self.namespace(lb_id))
        with contextlib.suppress(FileNotFoundError):
            self._cursor_file(lb_id).unlink()

    # --- resync: orphans and dead proxies ------------------------------------------------------------

    def resync(self) -> None:
        host = desired.desired_for_host(self.host_id)
        wanted = {lb.id for lb in host.load_balancers}
        running = set(self.driver.running())
        busy = self.busy()
        for lb_id in sorted(running - wanted - set(host.deleting) - busy):
            log.info("%s: removing the proxy of %s (not wanted on this host)", self.name, lb_id)
            self.submit(lb_id, self._take_down, lb_id)
        for lb_id in sorted(wanted - running - busy):  # a proxy died or a namespace went: apply again
            self.submit(lb_id)
        ours = {self.namespace(lb_id) for lb_id in wanted | set(host.deleting)}
        for name in netns.list_ours(host_prefix(self.host_id)):
            if name not in ours:
                log.info("%s: removing orphaned namespace %s", self.name, name)
                netns.delete(name)

    # --- observation -----------------------------------------------------------------------------

    def _cursor_file(self, lb_id: str) -> Path:
        return self.state_dir / f"{lb_id}.log-cursor"

    def observe_once(self) -> None:
        """Move health, counters and new access log records of every running proxy into the control plane."""
        for lb_id in self.driver.running():
            try:
                health = self.driver.health(lb_id)
                service.record_health(lb_id, {m: (h.status, h.reason) for m, h in health.items()})
                service.record_stats(lb_id, service.stats_to_json(self.driver.stats(lb_id)))
                cursor_file = self._cursor_file(lb_id)
                try:
                    cursor = int(cursor_file.read_text())
                except (OSError, ValueError):
                    cursor = 0
                records = self.driver.access_logs(lb_id, after=cursor)
                if records:
                    service.append_logs(lb_id, records)
                    cursor_file.write_text(str(records[-1].cursor))
            except Exception as exc:  # one load balancer's trouble must not stop the others' observation
                log.warning("%s: cannot observe %s: %s", self.name, lb_id, exc)

    def _observe_loop(self) -> None:
        while not self.stopping.wait(self.options.observe_interval):
            self.observe_once()


# --- the compute agent extension -------------------------------------------------------------------

_local: LoadBalancerReconciler | None = None


def local_agent() -> LoadBalancerReconciler | None:
    return _local


def make_driver(state_dir: Path) -> LoadBalancerDriver:
    from hackboot.loadbalancers.haproxy import HaproxyDriver

    return HaproxyDriver(state_dir)


def attach(compute_agent: Any) -> None:
    """Register this module's hooks with a compute agent (it calls this when loading its extensions)."""
    network_agent.register_owner_attachment("lb-", vip_attachment)
    compute_agent.register_start_hook(start)


def start(compute_agent: Any, options: LoadBalancerAgentOptions | None = None) -> LoadBalancerReconciler:
    """Start the load-balancer reconciler of this host (called by the compute agent once registered)."""
    global _local
    options = options or LoadBalancerAgentOptions()
    state_dir = Path(options.state_dir or Path(compute_agent.state_dir) / "loadbalancers")
    agent = LoadBalancerReconciler(host_id=str(compute_agent.host_id), host_name=str(compute_agent.name),
                                   driver=make_driver(state_dir / "engine"), state_dir=state_dir / "agent",
                                   options=options, stop=compute_agent.stopping)
    agent.start()
    _local = agent
    return agent
