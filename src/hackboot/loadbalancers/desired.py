"""The agent's read of the control plane: the desired state of the load balancers of one host, as the
engine's dataclasses (``driver.LoadBalancerSpec``), and the compare-and-swap that records what was applied.

The agent reconciles by load balancer: :func:`to_reconcile` lists those of its host whose desired version it
has not applied (or that are being deleted), :func:`desired` builds one load balancer's spec from its rows
(members resolved to addresses, certificates unsealed) in one read transaction, and :func:`mark_applied`
records the outcome only if nothing changed meanwhile (else the newer version is applied next).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from hackboot.core.crypto import unseal
from hackboot.core.db import session_scope, utcnow
from hackboot.events.service import emit
from hackboot.loadbalancers.driver import (
    CertificateSpec,
    HealthCheckSpec,
    ListenerSpec,
    LoadBalancerSpec,
    MemberSpec,
    PoolSpec,
    RuleSpec,
)
from hackboot.loadbalancers.models import (
    ACTIVE,
    DELETING,
    ERROR,
    Certificate,
    Listener,
    ListenerCertificate,
    LoadBalancer,
    Member,
    Pool,
    Rule,
)


@dataclass(frozen=True)
class DesiredLoadBalancer:
    id: str
    version: int  # pass it back to mark_applied
    spec: LoadBalancerSpec
    network_interface_id: str | None  # the VIP's interface (the network agent plugs it into the namespace)
    mac: str | None  # the VIP interface's MAC
    prefix_len: int  # the subnet's prefix length (the VIP is vip/prefix_len)
    gateway_ip: str  # the subnet's router: the namespace's default route


@dataclass(frozen=True)
class HostDesired:
    load_balancers: tuple[DesiredLoadBalancer, ...]  # to run (every one that is not being deleted)
    deleting: tuple[str, ...]  # ids to remove, then report with service.finish_delete


def _health_check(data: dict[str, Any] | None) -> HealthCheckSpec | None:
    if data is None:
        return None
    return HealthCheckSpec(protocol=data["protocol"], path=data["path"], host=data.get("host"),
                           expected_codes=data["expected_codes"], interval_s=float(data["interval_s"]),
                           timeout_s=float(data["timeout_s"]), healthy_threshold=int(data["healthy_threshold"]),
                           unhealthy_threshold=int(data["unhealthy_threshold"]))


def _spec(s: Session, lb: LoadBalancer) -> DesiredLoadBalancer:
    from hackboot.network.models import NetworkInterface, Subnet

    pools = list(s.scalars(select(Pool).where(Pool.load_balancer_id == lb.id).order_by(Pool.id)))
    members: dict[str, list[MemberSpec]] = {p.id: [] for p in pools}
    for m in s.scalars(select(Member).where(Member.load_balancer_id == lb.id).order_by(Member.id)):
        members[m.pool_id].append(MemberSpec(id=m.id, address=m.address, port=m.port, weight=m.weight,
                                             admin_state=m.admin_state))  # type: ignore[arg-type]
    pool_specs = tuple(PoolSpec(id=p.id, protocol=p.protocol, algorithm=p.algorithm,  # type: ignore[arg-type]
                                members=tuple(members[p.id]), health_check=_health_check(p.health_check),
                                sticky=p.sticky, proxy_protocol=p.proxy_protocol)  # type: ignore[arg-type]
                       for p in pools)
    listeners = list(s.scalars(select(Listener).where(Listener.load_balancer_id == lb.id).order_by(Listener.port)))
    listener_ids = [listener.id for listener in listeners]
    rules: dict[str, list[RuleSpec]] = {i: [] for i in listener_ids}
    for r in s.scalars(select(Rule).where(Rule.load_balancer_id == lb.id).order_by(Rule.priority)):
        rules[r.listener_id].append(RuleSpec(
            id=r.id, priority=r.priority, action=r.action, host=r.host,  # type: ignore[arg-type]
            path_prefix=r.path_prefix, pool_id=r.pool_id, redirect_url=r.redirect_url,
            redirect_code=r.redirect_code, status_code=r.status_code, content_type=r.content_type, body=r.body))
    cert_ids: dict[str, list[str]] = {i: [] for i in listener_ids}
    if listener_ids:
        for lid, cid in s.execute(select(ListenerCertificate.listener_id, ListenerCertificate.certificate_id)
                                  .where(ListenerCertificate.listener_id.in_(listener_ids))
                                  .order_by(ListenerCertificate.position)):
            cert_ids[lid].append(cid)
    listener_specs = tuple(ListenerSpec(
        id=x.id, protocol=x.protocol, port=x.port, default_pool_id=x.default_pool_id,  # type: ignore[arg-type]
        rules=tuple(rules[x.id]), certificate_ids=tuple(cert_ids[x.id]),
        redirect_to_https_port=x.redirect_to_https_port, connection_limit=x.connection_limit,
        connection_rate_limit=x.connection_rate_limit, request_rate_limit=x.request_rate_limit,
        idle_timeout_s=x.idle_timeout_s) for x in listeners)
    used = sorted({c for ids in cert_ids.values() for c in ids})
    certificates = tuple(CertificateSpec(id=c.id, chain_pem=c.chain_pem,
                                         key_pem=unseal(c.key_sealed, context=c.id.encode()).decode(),
                                         names=tuple(c.names))
                         for c in s.scalars(select(Certificate).where(Certificate.id.in_(used))
                                            .order_by(Certificate.id)))
    nic = s.get(NetworkInterface, lb.network_interface_id) if lb.network_interface_id else None
    subnet = s.get(Subnet, lb.subnet_id)
    prefix_len = int(subnet.cidr.split("/")[1]) if subnet else 32
    return DesiredLoadBalancer(
        id=lb.id, version=lb.desired_version,
        spec=LoadBalancerSpec(id=lb.id, vip=lb.vip, listeners=listener_specs, pools=pool_specs,
                              certificates=certificates),
        network_interface_id=lb.network_interface_id, mac=nic.mac if nic else None, prefix_len=prefix_len,
        gateway_ip=subnet.gateway_ip if subnet else "")


def desired(lb_id: str) -> DesiredLoadBalancer | None:
    """One load balancer's desired state; None when it is being deleted or gone."""
    with session_scope(write=False) as s:
        lb = s.get(LoadBalancer, lb_id)
        if lb is None or lb.status == DELETING:
            return None
        return _spec(s, lb)


def desired_for_host(host_id: str) -> HostDesired:
    """Every load balancer placed on `host_id`: the specs of those to run, the ids of those being deleted."""
    with session_scope(write=False) as s:
        lbs = list(s.scalars(select(LoadBalancer).where(LoadBalancer.host_id == host_id)
                             .order_by(LoadBalancer.id)))
        return HostDesired(load_balancers=tuple(_spec(s, lb) for lb in lbs if lb.status != DELETING),
                           deleting=tuple(lb.id for lb in lbs if lb.status == DELETING))


def to_reconcile(host_id: str) -> list[str]:
    """Ids of the load balancers of `host_id` whose desired version is not applied, or being deleted."""
    with session_scope(write=False) as s:
        return list(s.scalars(select(LoadBalancer.id).where(
            LoadBalancer.host_id == host_id,
            or_(LoadBalancer.status == DELETING, LoadBalancer.applied_version < LoadBalancer.desired_version))
            .order_by(LoadBalancer.id)))


def mark_applied(lb_id: str, version: int, error: str = "") -> bool:
    """Record that `version` was applied (ACTIVE) or failed (ERROR, `error` as the status reason).

    A compare-and-swap on the desired version: a stale outcome (the load balancer changed since `version`
    was read, or is being deleted) changes nothing and returns False."""
    reason = error.replace("\x00", "")[:500]
    with session_scope() as s:
        lb = s.get(LoadBalancer, lb_id)
        if lb is None:
            return False
        previous, previous_reason = lb.status, lb.status_reason  # the UPDATE below refreshes `lb`
        values: dict[str, Any] = ({"status": ERROR, "status_reason": reason} if error
                                  else {"status": ACTIVE, "status_reason": "", "applied_version": version})
        result = s.execute(update(LoadBalancer).where(
            LoadBalancer.id == lb_id, LoadBalancer.desired_version == version, LoadBalancer.status != DELETING)
            .values(updated_at=utcnow(), **values))
        if getattr(result, "rowcount", 0) != 1:
            return False
        if previous != values["status"] or (error and previous_reason != reason):
            emit(s, "load_balancer.status_changed", resource_type="load_balancer", resource_id=lb.id,
                 project_id=lb.project_id, actor="system",
                 data={"status": values["status"], "previous": previous, "reason": reason, "version": version})
    return True
