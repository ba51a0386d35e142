"""Load balancer rules: load balancers, listeners, rules, pools, members, certificates; and the functions the
host agent calls (``record_health``, ``record_stats``, ``append_logs``, ``finish_delete``; the desired state
and ``mark_applied`` are in ``desired.py``).

Every change runs in one transaction that first locks the load balancer's row and bumps its
``desired_version`` (:func:`_lock_lb`): changes of one load balancer are serialised on PostgreSQL as on
SQLite, and its agent learns that it changed. After the commit the service calls
``core.reconcile.notify("loadbalancer", <host id>)`` (and ``notify("network", <vpc id>)`` for the VIP's
interface).

Everything a user writes here ends up in an HAProxy configuration: names are DNS-label-like (the API's
``Name``), and hosts, paths, URLs, content types and bodies are checked against strict forms in
:mod:`validate` style functions below, so that no value can carry a quote, a control character or a space
into a place where it would change the configuration's meaning.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Select, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hackboot.catalog.models import Host
from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.crypto import seal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.reconcile import notify
from hackboot.core.workers import Loop
from hackboot.events.service import emit
from hackboot.loadbalancers import certs, driver
from hackboot.loadbalancers.models import (
    DELETING,
    HEALTH_UNKNOWN,
    HEALTHS,
    PENDING,
    AccessLogRecord,
    Certificate,
    Listener,
    ListenerCertificate,
    LoadBalancer,
    LoadBalancerStats,
    Member,
    Pool,
    Rule,
)
from hackboot.network import service as network
from hackboot.network.models import Vpc

KIND = "loadbalancer"  # the change channel of core.reconcile (keys: host ids)
NETWORK_KIND = network.KIND
ACCESS_LOG_KEEP = 10_000  # records kept per load balancer (the newest)
ACCESS_LOG_RETENTION_DAYS = 7
MAX_RULES_PER_LISTENER = 100
MAX_CERTIFICATES_PER_LISTENER = 25
MAX_BODY_BYTES = 1024
LISTENER_PROTOCOLS = ("http", "https", "tcp")
POOL_PROTOCOLS = ("http", "tcp")
ALGORITHMS = ("roundrobin", "leastconn", "source")
STICKY = ("none", "cookie", "source_ip")
ADMIN_STATES = ("enabled", "drain", "disabled")
RULE_ACTIONS = ("forward", "redirect", "fixed_response")
REDIRECT_CODES = (301, 302, 303, 307, 308)
T = TypeVar("T")


def _invalid(field_name: str, msg: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(msg, errors=[{"loc": ["body", field_name], "msg": msg}])


# ==================================================================================================
# Values that end in an HAProxy configuration: strict forms
# ==================================================================================================

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}$")
# RFC 3986 path characters without quotes, `$` (HAProxy expands "${…}"), `#` (a comment) and `\`; `%` only
# as a percent-escape.
_PATH = re.compile(r"^/([A-Za-z0-9._~!&()*+,;=:@/-]|%[0-9A-Fa-f]{2})*$")
_QUERY = re.compile(r"^([A-Za-z0-9._~!&()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*$")
_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#&^_.+-]{0,63}/[a-z0-9][a-z0-9!#&^_.+-]{0,63}"
                           r"(; ?charset=[A-Za-z0-9_-]{1,32})?$")
_CODES = re.compile(r"^[1-5][0-9]{2}(-[1-5][0-9]{2})?(,[1-5][0-9]{2}(-[1-5][0-9]{2})?)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_host(value: str, field_name: str = "host") -> str:
    """A DNS name, or "*.suffix"; lower-cased."""
    host = value.lower()
    if len(host) > 253 or not _HOST.fullmatch(host):
        raise _invalid(field_name, f"'{_shown(value)}' is not a DNS name (letters, digits, '-' and '.'; "
                                   "'*.' as a prefix for a wildcard)")
    return host


def check_path(value: str, field_name: str = "path_prefix") -> str:
    if len(value) > 255 or not _PATH.fullmatch(value):
        raise _invalid(field_name, f"'{_shown(value)}' is not a path: it starts with '/' and holds no space, "
                                   "quote, control character, '#', '$' or '\\' (percent-encode them)")
    return value


def check_url(value: str, field_name: str = "redirect_url") -> str:
    """An absolute http(s) URL of safe characters only."""
    bad = _invalid(field_name, f"'{_shown(value)}' is not an absolute http(s) URL without spaces, quotes or "
                               "control characters")
    if len(value) > 2048:
        raise bad
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise bad
    try:
        port = parts.port
    except ValueError:
        raise bad from None
    netloc = parts.hostname + (f":{port}" if port is not None else "")
    if parts.netloc.lower() != netloc.lower():
        raise bad
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        if parts.hostname.startswith("*"):
            raise bad from None
        check_host(parts.hostname, field_name)
    if parts.path and not _PATH.fullmatch(parts.path):
        raise bad
    if not _QUERY.fullmatch(parts.query) or not _QUERY.fullmatch(parts.fragment):
        raise bad
    return value


def check_content_type(value: str) -> str:
    if not _CONTENT_TYPE.fullmatch(value):
        raise _invalid("content_type", f"'{_shown(value)}' is not a media type such as text/plain or "
                                       "application/json; charset=utf-8")
    return value


def check_body(value: str) -> str:
    if len(value.encode()) > MAX_BODY_BYTES:
        raise _invalid("body", f"The body is at most {MAX_BODY_BYTES} bytes")
    if _CONTROL.search(value.replace("\n", "")):
        raise _invalid("body", "The body holds no control characters (new lines are allowed)")
    return value


def check_expected_codes(value: str) -> str:
    if not _CODES.fullmatch(value):
        raise _invalid("health_check.expected_codes", f"'{_shown(value)}' is not a list of HTTP status codes "
                                                      "such as 200, 200,204 or 200-399")
    for part in value.split(","):
        low, _, high = part.partition("-")
        if high and int(high) < int(low):
            raise _invalid("health_check.expected_codes", f"The range {part} is empty")
    return value


def _shown(value: str) -> str:
    """A user's value quoted back in a message: bounded, control characters escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value[:80])


# ==================================================================================================
# Transactions, change notification, lookups
# ==================================================================================================

@dataclass
class Tx:
    s: Session
    vpcs: set[str] = field(default_factory=set)  # VPCs changed: notified after the commit
    hosts: set[str] = field(default_factory=set)  # hosts whose load balancers changed
    locked: dict[str, LoadBalancer] = field(default_factory=dict)


@contextmanager
def _change() -> Iterator[Tx]:
    with session_scope() as s:
        tx = Tx(s)
        yield tx
    for vpc_id in sorted(tx.vpcs):
        notify(NETWORK_KIND, vpc_id)
    for host_id in sorted(tx.hosts):
        notify(KIND, host_id)


def _lock_lb(tx: Tx, lb_id: str, *, for_change: bool = True) -> LoadBalancer:
    """Lock a load balancer for the rest of the transaction and bump its desired version (once).

    `for_change`: refuse a load balancer being deleted (409)."""
    if lb_id in tx.locked:
        return tx.locked[lb_id]
    lb = tx.s.scalar(select(LoadBalancer).where(LoadBalancer.id == lb_id).with_for_update()
                     .execution_options(populate_existing=True))
    if lb is None:
        raise errors.NotFound(f"Load balancer {lb_id} not found")
    if for_change and lb.status == DELETING:
        raise errors.Conflict(f"Load balancer {lb.name} is being deleted", code="deleting")
    lb.desired_version += 1
    lb.updated_at = utcnow()
    tx.locked[lb_id] = lb
    tx.hosts.add(lb.host_id)
    return lb


def _event(s: Session, lb: LoadBalancer, verb: str, actor: str, **data: Any) -> None:
    emit(s, f"load_balancer.{verb}", resource_type="load_balancer", resource_id=lb.id, project_id=lb.project_id,
         actor=actor, data=data)


def _by_ref(s: Session, stmt: Select[Any], model: Any, ref: str, what: str) -> Any:
    """A row of `stmt` (already limited to the caller's scope) by id, or by name when exactly one has it."""
    row = s.scalar(stmt.where(model.id == ref))
    if row is not None:
        return row
    if not ref or not hasattr(model, "name"):
        raise errors.NotFound(f"{what} {ref} not found")
    rows = list(s.scalars(stmt.where(model.name == ref).limit(2)))
    if not rows:
        raise errors.NotFound(f"{what} {ref} not found")
    if len(rows) > 1:
        raise errors.Conflict(f"Several {what.lower()}s are named '{ref}': use the id", code="ambiguous_name")
    return rows[0]


def get_lb(s: Session, p: Principal, ref: str) -> LoadBalancer:
    """Another project's load balancer is a 404, like a missing one."""
    lb: LoadBalancer = _by_ref(s, select(LoadBalancer).where(LoadBalancer.project_id == p.project), LoadBalancer,
                               ref, "Load balancer")
    return lb


def get_listener(s: Session, lb: LoadBalancer, ref: str) -> Listener:
    row: Listener = _by_ref(s, select(Listener).where(Listener.load_balancer_id == lb.id), Listener, ref, "Listener")
    return row


def get_pool(s: Session, lb: LoadBalancer, ref: str) -> Pool:
    row: Pool = _by_ref(s, select(Pool).where(Pool.load_balancer_id == lb.id), Pool, ref, "Pool")
    return row


def get_member(s: Session, pool: Pool, member_id: str) -> Member:
    row = s.scalar(select(Member).where(Member.pool_id == pool.id, Member.id == member_id))
    if row is None:
        raise errors.NotFound(f"Member {member_id} not found")
    return row


def get_rule(s: Session, listener: Listener, rule_id: str) -> Rule:
    row = s.scalar(select(Rule).where(Rule.listener_id == listener.id, Rule.id == rule_id))
    if row is None:
        raise errors.NotFound(f"Rule {rule_id} not found")
    return row


def get_certificate(s: Session, p: Principal, ref: str) -> Certificate:
    row: Certificate = _by_ref(s, select(Certificate).where(Certificate.project_id == p.project), Certificate, ref,
                               "Certificate")
    return row


def _lb_for_write(tx: Tx, p: Principal, ref: str) -> LoadBalancer:
    return _lock_lb(tx, get_lb(tx.s, p, ref).id)


def _flush(s: Session, conflict: str, code: str = "conflict") -> None:
    """Flush; a unique constraint broken by a concurrent writer is the 409 the pre-check would have given."""
    try:
        s.flush()
    except IntegrityError:
        raise errors.Conflict(conflict, code=code) from None


# ==================================================================================================
# Load balancers
# ==================================================================================================

def lb_query(p: Principal, *, name: str | None = None, vpc_id: str | None = None, subnet_id: str | None = None,
             status: str | None = None) -> Select[LoadBalancer]:
    stmt = select(LoadBalancer).where(LoadBalancer.project_id == p.project)
    if name:
        stmt = stmt.where(LoadBalancer.name == name)
    if vpc_id:
        stmt = stmt.where(LoadBalancer.vpc_id == vpc_id)
    if subnet_id:
        stmt = stmt.where(LoadBalancer.subnet_id == subnet_id)
    if status:
        stmt = stmt.where(LoadBalancer.status == status)
    return stmt


def choose_host(s: Session, zone_id: str) -> str:
    """The host that is up in `zone_id` running the fewest load balancers (ties: the lowest id)."""
    hosts = sorted(s.scalars(select(Host.id).where(Host.zone_id == zone_id, Host.status == "up")))
    if not hosts:
        raise errors.NoCapacity(f"No host is up in zone {zone_id} to run a load balancer", code="no_host")
    load: dict[str, int] = {host_id: n for host_id, n in s.execute(
        select(LoadBalancer.host_id, func.count()).where(LoadBalancer.host_id.in_(hosts))
        .group_by(LoadBalancer.host_id))}
    return min(hosts, key=lambda h: (load.get(h, 0), h))


def public_ips(s: Session, lbs: list[LoadBalancer]) -> dict[str, str]:
    """Load balancer id → its floating IP's address (internet-facing ones)."""
    nic_of = {lb.network_interface_id: lb.id for lb in lbs if lb.network_interface_id}
    fips = network.public_ips_of(s, list(nic_of))
    return {nic_of[nic_id]: fip.address for nic_id, fip in fips.items()}


def security_groups(s: Session, lbs: list[LoadBalancer]) -> dict[str, list[str]]:
    nic_of = {lb.network_interface_id: lb.id for lb in lbs if lb.network_interface_id}
    groups = network.groups_of(s, list(nic_of))
    return {nic_of[nic_id]: ids for nic_id, ids in groups.items()}


def _name_free(s: Session, project_id: str, name: str) -> None:
    """409 when a load balancer of the project has the name (one being deleted keeps it until it is gone)."""
    status = s.scalar(select(LoadBalancer.status).where(LoadBalancer.project_id == project_id,
                                                        LoadBalancer.name == name))
    if status == DELETING:
        raise errors.Conflict(f"Load balancer '{name}' is being deleted: its name is free once it is gone",
                              code="name_in_use")
    if status is not None:
        raise errors.Conflict(f"A load balancer is named '{name}' already", code="name_in_use")


def create_lb(p: Principal, *, name: str, subnet: str, internet_facing: bool = False,
              security_groups: list[str] | None = None, description: str = "") -> LoadBalancer:
    """A load balancer in `subnet`: its VIP (an interface of the subnet, with a floating IP when internet-facing)
    made in the same transaction, attached to it on the host chosen for it; PENDING until its agent applied it."""
    with _change() as tx:
        s = tx.s
        sub = network.get_subnet(s, p, subnet)
        _name_free(s, p.project, name)
        host_id = choose_host(s, sub.zone_id)
        quotas.claim(s, p.project, "load_balancers", 1)
        lb_id = new_id("lb")
        nic = network.create_interface_in(s, p, network.InterfaceRequest(
            subnet=sub.id, name=f"lb-{name}"[:63], description=f"VIP of load balancer {name}"[:255],
            security_groups=security_groups, assign_public_ip=internet_facing), tx.vpcs)
        lb = LoadBalancer(id=lb_id, project_id=p.project, name=name, description=description, vpc_id=sub.vpc_id,
                          subnet_id=sub.id, zone_id=sub.zone_id, internet_facing=internet_facing,
                          network_interface_id=nic.id, vip=nic.private_ip, host_id=host_id, status=PENDING,
                          created_by=p.user_id)
        s.add(lb)
        _flush(s, f"A load balancer is named '{name}' already", "name_in_use")
        network.attach_interface(s, p, nic.id, network.InstanceRef(id=lb_id, project_id=p.project,
                                                                   zone_id=sub.zone_id, host_id=host_id),
                                 device_index=0, changed=tx.vpcs)
        tx.hosts.add(host_id)
        _event(s, lb, "created", p.user_id, name=name, subnet_id=sub.id, vpc_id=sub.vpc_id, vip=lb.vip,
               internet_facing=internet_facing, host_id=host_id)
    return lb


def update_lb(p: Principal, ref: str, *, name: str | None = None, description: str | None = None,
              security_groups: list[str] | None = None) -> LoadBalancer:
    if security_groups is not None:
        # The VIP's groups are the interface's: the network service checks and applies them (its transaction).
        with session_scope(write=False) as s:
            current = get_lb(s, p, ref)
            if current.status == DELETING:
                raise errors.Conflict(f"Load balancer {current.name} is being deleted", code="deleting")
            nic_id = current.network_interface_id
        if nic_id:
            network.update_interface(p, nic_id, security_groups=security_groups)
    with _change() as tx:
        lb = _lb_for_write(tx, p, ref)
        changes: dict[str, Any] = {}
        if name is not None and name != lb.name:
            _name_free(tx.s, p.project, name)
            lb.name = changes["name"] = name
        if description is not None:
            lb.description = changes["description"] = description
        if security_groups is not None:
            changes["security_groups"] = security_groups
        _flush(tx.s, f"A load balancer is named '{name}' already", "name_in_use")
        _event(tx.s, lb, "updated", p.user_id, **changes)
    return lb


def _release_children(s: Session, lb: LoadBalancer) -> dict[str, int]:
    """Delete a load balancer's listeners, rules, pools and members; give their quota back."""
    counts = {}
    for model, resource in ((Listener, "listeners"), (Pool, "pools"), (Member, "members")):
        counts[resource] = s.scalar(select(func.count()).select_from(model)
                                    .where(model.load_balancer_id == lb.id)) or 0
    listener_ids = select(Listener.id).where(Listener.load_balancer_id == lb.id)
    s.execute(delete(Rule).where(Rule.load_balancer_id == lb.id))
    s.execute(delete(ListenerCertificate).where(ListenerCertificate.listener_id.in_(listener_ids)))
    s.execute(delete(Listener).where(Listener.load_balancer_id == lb.id))
    s.execute(delete(Member).where(Member.load_balancer_id == lb.id))
    s.execute(delete(Pool).where(Pool.load_balancer_id == lb.id))
    for resource, n in counts.items():
        quotas.release(s, lb.project_id, resource, n)
    return counts


def delete_lb(p: Principal, ref: str) -> LoadBalancer:
    """Its listeners, rules, pools and members go at once; the load balancer stays DELETING until its agent
    has stopped the proxy (:func:`finish_delete`), which then releases its VIP."""
    with _change() as tx:
        lb = _lock_lb(tx, get_lb(tx.s, p, ref).id, for_change=False)
        if lb.status == DELETING:
            return lb
        counts = _release_children(tx.s, lb)
        lb.status, lb.status_reason = DELETING, ""
        _event(tx.s, lb, "deleting", p.user_id, **counts)
    return lb


def finish_delete(lb_id: str) -> bool:
    """The agent stopped a DELETING load balancer's proxy: release its VIP (the interface and a floating IP
    made with it) and its quota, drop its rows. Idempotent; False when there was nothing to finish."""
    with _change() as tx:
        s = tx.s
        lb = s.scalar(select(LoadBalancer).where(LoadBalancer.id == lb_id).with_for_update()
                      .execution_options(populate_existing=True))
        if lb is None or lb.status != DELETING:
            return False
        # The VIP is the load balancer's device 0: network drops it as it drops an instance's primary interface.
        network.release_instance(s, lb.id, "system", tx.vpcs)
        _release_children(s, lb)  # nothing left normally; rows a racing writer added otherwise
        s.execute(delete(AccessLogRecord).where(AccessLogRecord.load_balancer_id == lb.id))
        s.execute(delete(LoadBalancerStats).where(LoadBalancerStats.load_balancer_id == lb.id))
        quotas.release(s, lb.project_id, "load_balancers", 1)
        _event(s, lb, "deleted", "system", name=lb.name)
        s.delete(lb)
    return True


# ==================================================================================================
# Pools and members
# ==================================================================================================

@dataclass
class HealthCheckRequest:
    protocol: str = "tcp"
    path: str = "/"
    host: str | None = None
    expected_codes: str = "200-399"
    interval_s: float = 5.0
    timeout_s: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3


def _health_check(req: HealthCheckRequest | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if req is None:
        return None
    hc = req if isinstance(req, HealthCheckRequest) else HealthCheckRequest(**dict(req))
    if hc.protocol not in ("http", "tcp"):
        raise _invalid("health_check.protocol", "A health check is http or tcp")
    check_path(hc.path, "health_check.path")
    host = check_host(hc.host, "health_check.host") if hc.host else None
    if host and host.startswith("*"):
        raise _invalid("health_check.host", "A health check's Host header is one name, not a wildcard")
    check_expected_codes(hc.expected_codes)
    if not 1 <= hc.interval_s <= 300:
        raise _invalid("health_check.interval_s", "The interval is 1 to 300 seconds")
    if not 0.1 <= hc.timeout_s < hc.interval_s:
        raise _invalid("health_check.timeout_s", "The timeout is at least 0.1 s and less than the interval")
    for name, value in (("healthy_threshold", hc.healthy_threshold), ("unhealthy_threshold", hc.unhealthy_threshold)):
        if not 1 <= value <= 10:
            raise _invalid(f"health_check.{name}", "A threshold is 1 to 10 checks")
    return {"protocol": hc.protocol, "path": hc.path, "host": host, "expected_codes": hc.expected_codes,
            "interval_s": float(hc.interval_s), "timeout_s": float(hc.timeout_s),
            "healthy_threshold": hc.healthy_threshold, "unhealthy_threshold": hc.unhealthy_threshold}


def _check_pool_options(protocol: str, algorithm: str, sticky: str, proxy_protocol: bool) -> None:
    if protocol not in POOL_PROTOCOLS:
        raise _invalid("protocol", "A pool is http or tcp")
    if algorithm not in ALGORITHMS:
        raise _invalid("algorithm", f"The algorithm is one of {', '.join(ALGORITHMS)}")
    if sticky not in STICKY:
        raise _invalid("sticky", f"sticky is one of {', '.join(STICKY)}")
    if sticky == "cookie" and protocol != "http":
        raise _invalid("sticky", "Cookie stickiness needs an http pool (use source_ip for tcp)")
    if proxy_protocol and protocol != "tcp":
        raise _invalid("proxy_protocol", "The PROXY protocol is for tcp pools (http pools send X-Forwarded-For)")


def pool_query(lb: LoadBalancer) -> Select[Pool]:
    return select(Pool).where(Pool.load_balancer_id == lb.id)


def create_pool(p: Principal, lb_ref: str, *, name: str, protocol: str = "http", algorithm: str = "roundrobin",
                sticky: str = "none", proxy_protocol: bool = False,
                health_check: HealthCheckRequest | Mapping[str, Any] | None = None) -> Pool:
    _check_pool_options(protocol, algorithm, sticky, proxy_protocol)
    hc = _health_check(health_check)
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        if s.scalar(select(Pool.id).where(Pool.load_balancer_id == lb.id, Pool.name == name)) is not None:
            raise errors.Conflict(f"Load balancer {lb.name} has a pool named '{name}' already", code="name_in_use")
        quotas.claim(s, p.project, "pools", 1)
        pool = Pool(id=new_id("lbp"), project_id=p.project, load_balancer_id=lb.id, name=name, protocol=protocol,
                    algorithm=algorithm, sticky=sticky, proxy_protocol=proxy_protocol, health_check=hc)
        s.add(pool)
        _flush(s, f"Load balancer {lb.name} has a pool named '{name}' already", "name_in_use")
        _event(s, lb, "pool_created", p.user_id, pool_id=pool.id, name=name, protocol=protocol)
    return pool


def update_pool(p: Principal, lb_ref: str, pool_ref: str, *, name: str | None = None,
                algorithm: str | None = None, sticky: str | None = None, proxy_protocol: bool | None = None,
                health_check: HealthCheckRequest | Mapping[str, Any] | None = None,
                remove_health_check: bool = False) -> Pool:
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        pool = get_pool(s, lb, pool_ref)
        new_algorithm = algorithm if algorithm is not None else pool.algorithm
        new_sticky = sticky if sticky is not None else pool.sticky
        new_proxy = proxy_protocol if proxy_protocol is not None else pool.proxy_protocol
        _check_pool_options(pool.protocol, new_algorithm, new_sticky, new_proxy)
        changes: dict[str, Any] = {}
        if name is not None and name != pool.name:
            if s.scalar(select(Pool.id).where(Pool.load_balancer_id == lb.id, Pool.name == name)) is not None:
                raise errors.Conflict(f"Load balancer {lb.name} has a pool named '{name}' already",
                                      code="name_in_use")
            pool.name = changes["name"] = name
        pool.algorithm, pool.sticky, pool.proxy_protocol = new_algorithm, new_sticky, new_proxy
        if health_check is not None and remove_health_check:
            raise _invalid("health_check", "Give a health check or remove it, not both")
        if health_check is not None:
            pool.health_check = changes["health_check"] = _health_check(health_check)
        elif remove_health_check:
            pool.health_check = None
            changes["health_check"] = None
        pool.updated_at = utcnow()
        _flush(s, f"Load balancer {lb.name} has a pool named '{name}' already", "name_in_use")
        _event(s, lb, "pool_updated", p.user_id, pool_id=pool.id, algorithm=new_algorithm, sticky=new_sticky,
               proxy_protocol=new_proxy, **changes)
    return pool


def delete_pool(p: Principal, lb_ref: str, pool_ref: str) -> Pool:
    """409 while a listener forwards to it by default or a rule forwards to it."""
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        pool = get_pool(s, lb, pool_ref)
        users = sorted(s.scalars(select(Listener.id).where(Listener.default_pool_id == pool.id)))
        rules = sorted(s.scalars(select(Rule.id).where(Rule.pool_id == pool.id)))
        if users or rules:
            used_by = ", ".join([f"listener {i}" for i in users] + [f"rule {i}" for i in rules])
            raise errors.Conflict(f"Pool {pool.name} is in use by {used_by}", code="in_use")
        members = s.scalar(select(func.count()).select_from(Member).where(Member.pool_id == pool.id)) or 0
        s.execute(delete(Member).where(Member.pool_id == pool.id))
        s.delete(pool)
        quotas.release(s, p.project, "members", members)
        quotas.release(s, p.project, "pools", 1)
        _event(s, lb, "pool_deleted", p.user_id, pool_id=pool.id, members=members)
    return pool


@dataclass
class MemberRequest:
    port: int
    network_interface: str | None = None
    address: str | None = None
    weight: int = 1
    admin_state: str = "enabled"


def _check_member(weight: int, admin_state: str) -> None:
    if not 0 <= weight <= 256:
        raise _invalid("weight", "The weight is 0 to 256")
    if admin_state not in ADMIN_STATES:
        raise _invalid("admin_state", f"admin_state is one of {', '.join(ADMIN_STATES)}")


def add_member(p: Principal, lb_ref: str, pool_ref: str, req: MemberRequest) -> Member:
    """A member is an interface of the load balancer's VPC (its private address) or an address in the VPC."""
    _check_member(req.weight, req.admin_state)
    if not 1 <= req.port <= 65535:
        raise _invalid("port", "The port is 1 to 65535")
    if (req.network_interface is None) == (req.address is None):
        raise _invalid("network_interface", "Give a network_interface or an address, one of them")
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        pool = get_pool(s, lb, pool_ref)
        vpc = s.get(Vpc, lb.vpc_id)
        assert vpc is not None
        nic_id: str | None = None
        if req.network_interface is not None:
            nic = network.get_interface(s, p, req.network_interface)
            if nic.vpc_id != lb.vpc_id:
                raise _invalid("network_interface", f"Network interface {nic.id} is in another VPC than load "
                                                    f"balancer {lb.name}")
            nic_id, address = nic.id, nic.private_ip
        else:
            assert req.address is not None
            try:
                ip = ipaddress.IPv4Address(req.address)
            except ValueError:
                raise _invalid("address", f"'{_shown(req.address)}' is not an IPv4 address") from None
            if ip not in ipaddress.IPv4Network(vpc.cidr):
                raise _invalid("address", f"{ip} is outside the VPC's network {vpc.cidr}: members are in the "
                                          "load balancer's VPC")
            address = str(ip)
        if address == lb.vip:
            raise _invalid("address", "A load balancer cannot be its own member")
        if s.scalar(select(Member.id).where(Member.pool_id == pool.id, Member.address == address,
                                            Member.port == req.port)) is not None:
            raise errors.Conflict(f"{address}:{req.port} is a member of pool {pool.name} already",
                                  code="member_exists")
        quotas.claim(s, p.project, "members", 1)
        member = Member(id=new_id("lbm"), project_id=p.project, load_balancer_id=lb.id, pool_id=pool.id,
                        network_interface_id=nic_id, address=address, port=req.port, weight=req.weight,
                        admin_state=req.admin_state,
                        health="disabled" if req.admin_state == "disabled" else HEALTH_UNKNOWN)
        s.add(member)
        _flush(s, f"{address}:{req.port} is a member of pool {pool.name} already", "member_exists")
        _event(s, lb, "member_added", p.user_id, pool_id=pool.id, member_id=member.id, address=address,
               port=req.port, weight=req.weight, admin_state=req.admin_state)
    return member


def update_member(p: Principal, lb_ref: str, pool_ref: str, member_id: str, *, weight: int | None = None,
                  admin_state: str | None = None) -> Member:
    """Weights and drain apply at runtime (no reload)."""
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        member = get_member(s, get_pool(s, lb, pool_ref), member_id)
        _check_member(weight if weight is not None else member.weight,
                      admin_state if admin_state is not None else member.admin_state)
        changes: dict[str, Any] = {}
        if weight is not None:
            member.weight = changes["weight"] = weight
        if admin_state is not None:
            member.admin_state = changes["admin_state"] = admin_state
        member.updated_at = utcnow()
        _event(s, lb, "member_updated", p.user_id, pool_id=member.pool_id, member_id=member.id, **changes)
    return member


def remove_member(p: Principal, lb_ref: str, pool_ref: str, member_id: str) -> Member:
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        member = get_member(s, get_pool(s, lb, pool_ref), member_id)
        s.delete(member)
        quotas.release(s, p.project, "members", 1)
        _event(s, lb, "member_removed", p.user_id, pool_id=member.pool_id, member_id=member.id,
               address=member.address, port=member.port)
    return member


def member_query(pool: Pool) -> Select[Member]:
    return select(Member).where(Member.pool_id == pool.id)


# ==================================================================================================
# Listeners and rules
# ==================================================================================================

@dataclass
class ListenerRequest:
    protocol: str
    port: int
    name: str = ""
    default_pool: str | None = None
    certificates: list[str] | None = None
    redirect_to_https_port: int | None = None
    connection_limit: int | None = None
    connection_rate_limit: int | None = None
    request_rate_limit: int | None = None
    idle_timeout_s: float = 60.0


def _pool_for_listener(s: Session, lb: LoadBalancer, protocol: str, ref: str, field_name: str) -> Pool:
    try:
        pool = get_pool(s, lb, ref)
    except errors.NotFound as e:
        raise errors.NotFound(f"{e.detail} in load balancer {lb.name}") from None
    wanted = "tcp" if protocol == "tcp" else "http"
    if pool.protocol != wanted:
        raise _invalid(field_name, f"A {protocol} listener forwards to {wanted} pools; pool {pool.name} is "
                                   f"{pool.protocol}")
    return pool


def _certificates(s: Session, p: Principal, refs: list[str]) -> list[str]:
    ids: list[str] = []
    for ref in refs:
        cid = get_certificate(s, p, ref).id
        if cid not in ids:
            ids.append(cid)
    if len(ids) > MAX_CERTIFICATES_PER_LISTENER:
        raise _invalid("certificates", f"At most {MAX_CERTIFICATES_PER_LISTENER} certificates per listener")
    return ids


def _check_listener(protocol: str, cert_ids: list[str], redirect: int | None, conn_limit: int | None,
                    conn_rate: int | None, req_rate: int | None, idle: float) -> None:
    if protocol == "udp":
        raise _invalid("protocol", "HAProxy 2.6 does not balance UDP: use a tcp listener, or UDP to instances")
    if protocol not in LISTENER_PROTOCOLS:
        raise _invalid("protocol", f"A listener is one of {', '.join(LISTENER_PROTOCOLS)}")
    if protocol == "https" and not cert_ids:
        raise _invalid("certificates", "An https listener needs at least one certificate")
    if protocol != "https" and cert_ids:
        raise _invalid("certificates", f"A {protocol} listener takes no certificate (https does)")
    if redirect is not None and protocol != "http":
        raise _invalid("redirect_to_https_port", "Only an http listener redirects to https")
    if redirect is not None and not 1 <= redirect <= 65535:
        raise _invalid("redirect_to_https_port", "The port is 1 to 65535")
    if req_rate is not None and protocol == "tcp":
        raise _invalid("request_rate_limit", "A tcp listener has no requests: use connection_rate_limit")
    for name, value, high in (("connection_limit", conn_limit, 1_000_000), ("connection_rate_limit", conn_rate,
                              1_000_000), ("request_rate_limit", req_rate, 1_000_000)):
        if value is not None and not 1 <= value <= high:
            raise _invalid(name, f"{name} is 1 to {high}")
    if not 1 <= idle <= 3600:
        raise _invalid("idle_timeout_s", "The idle timeout is 1 to 3600 seconds")


def _set_certificates(s: Session, listener_id: str, cert_ids: list[str]) -> None:
    s.execute(delete(ListenerCertificate).where(ListenerCertificate.listener_id == listener_id))
    s.add_all([ListenerCertificate(listener_id=listener_id, certificate_id=c, position=i)
               for i, c in enumerate(cert_ids)])


def certificates_of(s: Session, listener_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {i: [] for i in listener_ids}
    if listener_ids:
        for lid, cid in s.execute(select(ListenerCertificate.listener_id, ListenerCertificate.certificate_id)
                                  .where(ListenerCertificate.listener_id.in_(listener_ids))
                                  .order_by(ListenerCertificate.listener_id, ListenerCertificate.position)):
            out[lid].append(cid)
    return out


def listener_query(lb: LoadBalancer) -> Select[Listener]:
    return select(Listener).where(Listener.load_balancer_id == lb.id)


def create_listener(p: Principal, lb_ref: str, req: ListenerRequest) -> Listener:
    if not 1 <= req.port <= 65535:
        raise _invalid("port", "The port is 1 to 65535")
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        cert_ids = _certificates(s, p, req.certificates or [])
        _check_listener(req.protocol, cert_ids, req.redirect_to_https_port, req.connection_limit,
                        req.connection_rate_limit, req.request_rate_limit, req.idle_timeout_s)
        if s.scalar(select(Listener.id).where(Listener.load_balancer_id == lb.id, Listener.port == req.port)):
            raise errors.Conflict(f"Load balancer {lb.name} listens on port {req.port} already", code="port_in_use")
        pool_id = (_pool_for_listener(s, lb, req.protocol, req.default_pool, "default_pool").id
                   if req.default_pool else None)
        quotas.claim(s, p.project, "listeners", 1)
        listener = Listener(id=new_id("lbl"), project_id=p.project, load_balancer_id=lb.id, name=req.name,
                            protocol=req.protocol, port=req.port, default_pool_id=pool_id,
                            redirect_to_https_port=req.redirect_to_https_port,
                            connection_limit=req.connection_limit, connection_rate_limit=req.connection_rate_limit,
                            request_rate_limit=req.request_rate_limit, idle_timeout_s=float(req.idle_timeout_s))
        s.add(listener)
        _flush(s, f"Load balancer {lb.name} listens on port {req.port} already", "port_in_use")
        _set_certificates(s, listener.id, cert_ids)
        _event(s, lb, "listener_created", p.user_id, listener_id=listener.id, protocol=req.protocol,
               port=req.port, default_pool_id=pool_id, certificate_ids=cert_ids)
    return listener


def update_listener(p: Principal, lb_ref: str, listener_ref: str, *, name: str | None = None,
                    port: int | None = None, default_pool: str | None = None, certificates: list[str] | None = None,
                    redirect_to_https_port: int | None = None, connection_limit: int | None = None,
                    connection_rate_limit: int | None = None, request_rate_limit: int | None = None,
                    idle_timeout_s: float | None = None) -> Listener:
    """Fields left None are unchanged (the protocol is fixed: make another listener)."""
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        listener = get_listener(s, lb, listener_ref)
        cert_ids = (_certificates(s, p, certificates) if certificates is not None
                    else certificates_of(s, [listener.id])[listener.id])

        def pick(new: Any, old: Any) -> Any:
            return old if new is None else new

        limits = (pick(redirect_to_https_port, listener.redirect_to_https_port),
                  pick(connection_limit, listener.connection_limit),
                  pick(connection_rate_limit, listener.connection_rate_limit),
                  pick(request_rate_limit, listener.request_rate_limit),
                  float(pick(idle_timeout_s, listener.idle_timeout_s)))
        _check_listener(listener.protocol, cert_ids, *limits)
        changes: dict[str, Any] = {}
        if port is not None and port != listener.port:
            if not 1 <= port <= 65535:
                raise _invalid("port", "The port is 1 to 65535")
            if s.scalar(select(Listener.id).where(Listener.load_balancer_id == lb.id, Listener.port == port)):
                raise errors.Conflict(f"Load balancer {lb.name} listens on port {port} already", code="port_in_use")
            listener.port = changes["port"] = port
        if default_pool is not None:
            listener.default_pool_id = changes["default_pool_id"] = _pool_for_listener(
                s, lb, listener.protocol, default_pool, "default_pool").id
        if name is not None:
            listener.name = changes["name"] = name
        if certificates is not None:
            _set_certificates(s, listener.id, cert_ids)
            changes["certificate_ids"] = cert_ids
        (listener.redirect_to_https_port, listener.connection_limit, listener.connection_rate_limit,
         listener.request_rate_limit, listener.idle_timeout_s) = limits
        listener.updated_at = utcnow()
        _flush(s, f"Load balancer {lb.name} listens on port {port} already", "port_in_use")
        _event(s, lb, "listener_updated", p.user_id, listener_id=listener.id, **changes)
    return listener


def delete_listener(p: Principal, lb_ref: str, listener_ref: str) -> Listener:
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        listener = get_listener(s, lb, listener_ref)
        rules = s.scalar(select(func.count()).select_from(Rule).where(Rule.listener_id == listener.id)) or 0
        s.execute(delete(Rule).where(Rule.listener_id == listener.id))
        s.execute(delete(ListenerCertificate).where(ListenerCertificate.listener_id == listener.id))
        s.delete(listener)
        quotas.release(s, p.project, "listeners", 1)
        _event(s, lb, "listener_deleted", p.user_id, listener_id=listener.id, port=listener.port, rules=rules)
    return listener


@dataclass
class RuleRequest:
    priority: int
    action: str
    host: str | None = None
    path_prefix: str | None = None
    pool: str | None = None
    redirect_url: str | None = None
    redirect_code: int = 302
    status_code: int = 200
    content_type: str = "text/plain"
    body: str = ""


def rule_query(listener: Listener) -> Select[Rule]:
    return select(Rule).where(Rule.listener_id == listener.id)


def create_rule(p: Principal, lb_ref: str, listener_ref: str, req: RuleRequest) -> Rule:
    """The first rule matching by ascending priority decides; no match: the listener's default pool."""
    if not 1 <= req.priority <= 50_000:
        raise _invalid("priority", "The priority is 1 to 50000")
    if req.action not in RULE_ACTIONS:
        raise _invalid("action", f"The action is one of {', '.join(RULE_ACTIONS)}")
    if req.host is None and req.path_prefix is None:
        raise _invalid("host", "A rule matches a host, a path prefix or both: give at least one")
    host = check_host(req.host) if req.host is not None else None
    path = check_path(req.path_prefix) if req.path_prefix is not None else None
    if req.action != "forward" and req.pool is not None:
        raise _invalid("pool", "Only a forward rule names a pool")
    if req.action == "forward" and req.pool is None:
        raise _invalid("pool", "A forward rule names a pool")
    if req.action == "redirect":
        if req.redirect_url is None:
            raise _invalid("redirect_url", "A redirect rule names a URL")
        check_url(req.redirect_url)
        if req.redirect_code not in REDIRECT_CODES:
            raise _invalid("redirect_code", f"The redirect code is one of {', '.join(map(str, REDIRECT_CODES))}")
    elif req.redirect_url is not None:
        raise _invalid("redirect_url", "Only a redirect rule names a URL")
    if req.action == "fixed_response":
        if not 200 <= req.status_code <= 599:
            raise _invalid("status_code", "The status code is 200 to 599")
        check_content_type(req.content_type)
        check_body(req.body)
    elif req.body:
        raise _invalid("body", "Only a fixed_response rule has a body")
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        listener = get_listener(s, lb, listener_ref)
        if listener.protocol == "tcp":
            raise _invalid("listener", "Rules are for http and https listeners; a tcp listener forwards to its "
                                       "default pool")
        if s.scalar(select(Rule.id).where(Rule.listener_id == listener.id, Rule.priority == req.priority)):
            raise errors.Conflict(f"Listener {listener.id} has a rule of priority {req.priority} already",
                                  code="priority_in_use")
        count = s.scalar(select(func.count()).select_from(Rule).where(Rule.listener_id == listener.id)) or 0
        if count >= MAX_RULES_PER_LISTENER:
            raise errors.Conflict(f"A listener has at most {MAX_RULES_PER_LISTENER} rules", code="too_many_rules")
        pool_id = _pool_for_listener(s, lb, listener.protocol, req.pool, "pool").id if req.pool else None
        rule = Rule(id=new_id("lbr"), project_id=p.project, load_balancer_id=lb.id, listener_id=listener.id,
                    priority=req.priority, action=req.action, host=host, path_prefix=path, pool_id=pool_id,
                    redirect_url=req.redirect_url, redirect_code=req.redirect_code,
                    status_code=req.status_code, content_type=req.content_type, body=req.body)
        s.add(rule)
        _flush(s, f"Listener {listener.id} has a rule of priority {req.priority} already", "priority_in_use")
        _event(s, lb, "rule_created", p.user_id, listener_id=listener.id, rule_id=rule.id, priority=req.priority,
               action=req.action, host=host, path_prefix=path, pool_id=pool_id)
    return rule


def delete_rule(p: Principal, lb_ref: str, listener_ref: str, rule_id: str) -> Rule:
    with _change() as tx:
        s = tx.s
        lb = _lb_for_write(tx, p, lb_ref)
        rule = get_rule(s, get_listener(s, lb, listener_ref), rule_id)
        s.delete(rule)
        _event(s, lb, "rule_deleted", p.user_id, listener_id=rule.listener_id, rule_id=rule.id)
    return rule


# ==================================================================================================
# Certificates
# ==================================================================================================

def certificate_query(p: Principal, *, name: str | None = None) -> Select[Certificate]:
    stmt = select(Certificate).where(Certificate.project_id == p.project)
    if name:
        stmt = stmt.where(Certificate.name == name)
    return stmt


def _cert_event(s: Session, cert: Certificate, verb: str, actor: str, **data: Any) -> None:
    emit(s, f"certificate.{verb}", resource_type="certificate", resource_id=cert.id, project_id=cert.project_id,
         actor=actor, data=data)


def upload_certificate(p: Principal, *, chain_pem: str, key_pem: str, name: str | None = None) -> Certificate:
    """Validate and store a chain (leaf first) and its private key; the key is sealed, never returned."""
    try:
        parsed = certs.parse(chain_pem, key_pem)
    except certs.CertificateError as e:
        raise _invalid("chain_pem" if "key" not in str(e).split(":")[0].lower() else "key_pem", str(e)) from None
    for dns_name in parsed.names:
        if len(dns_name) > 253 or not _HOST.fullmatch(dns_name):
            raise _invalid("chain_pem", f"The certificate names '{_shown(dns_name)}', which is not a DNS name")
    cert_id = new_id("cert")
    with _change() as tx:
        s = tx.s
        name = name or cert_id
        if s.scalar(select(Certificate.id).where(Certificate.project_id == p.project,
                                                 Certificate.name == name)) is not None:
            raise errors.Conflict(f"A certificate is named '{name}' already", code="name_in_use")
        quotas.claim(s, p.project, "certificates", 1)
        cert = Certificate(id=cert_id, project_id=p.project, name=name, chain_pem=parsed.chain_pem,
                           key_sealed=seal(parsed.key_pem.encode(), context=cert_id.encode()),
                           names=list(parsed.names), subject=parsed.subject, issuer=parsed.issuer,
                           not_before=parsed.not_before, not_after=parsed.not_after,
                           fingerprint_sha256=parsed.fingerprint_sha256, created_by=p.user_id)
        s.add(cert)
        _flush(s, f"A certificate is named '{name}' already", "name_in_use")
        _cert_event(s, cert, "uploaded", p.user_id, name=name, names=list(parsed.names),
                    fingerprint_sha256=parsed.fingerprint_sha256, not_after=parsed.not_after.isoformat())
    return cert


def delete_certificate(p: Principal, ref: str) -> Certificate:
    """409 while a listener serves it."""
    with _change() as tx:
        s = tx.s
        cert = get_certificate(s, p, ref)
        users = sorted(s.scalars(select(ListenerCertificate.listener_id)
                                 .where(ListenerCertificate.certificate_id == cert.id)))
        if users:
            raise errors.Conflict(f"Certificate {cert.name} is in use by listener {', '.join(users)}",
                                  code="in_use")
        s.delete(cert)
        quotas.release(s, p.project, "certificates", 1)
        _cert_event(s, cert, "deleted", p.user_id, name=cert.name)
    return cert


# ==================================================================================================
# What the agent reports: member health, stats, access logs
# ==================================================================================================

def _health_name(status: str) -> str:
    status = "unknown" if status == "unchecked" else status
    if status not in HEALTHS:
        raise ValueError(f"unknown member health {status!r}")
    return status


def record_health(lb_id: str, health: Mapping[str, tuple[str, str]]) -> int:
    """Member id → (status, reason) as the proxy sees it; an event for each member whose status changed.
    Members of other load balancers and unknown ids are ignored. Returns the number of changes."""
    changed = 0
    with session_scope() as s:
        lb = s.get(LoadBalancer, lb_id)
        if lb is None or not health:
            return 0
        members = s.scalars(select(Member).where(Member.load_balancer_id == lb_id,
                                                 Member.id.in_(list(health)))).all()
        for member in members:
            status, reason = health[member.id]
            status = _health_name(status)
            reason = _CONTROL.sub(" ", reason)[:255]
            if member.health == status:
                if member.health_reason != reason:
                    member.health_reason = reason
                continue
            previous = member.health
            member.health, member.health_reason = status, reason
            changed += 1
            _event(s, lb, "member_health_changed", "system", pool_id=member.pool_id, member_id=member.id,
                   address=member.address, port=member.port, health=status, previous=previous, reason=reason)
    return changed


def record_stats(lb_id: str, stats: Mapping[str, Any]) -> bool:
    """Replace the load balancer's stats snapshot (JSON: listeners/pools/members → counters)."""
    with session_scope() as s:
        if s.get(LoadBalancer, lb_id) is None:
            return False
        row = s.get(LoadBalancerStats, lb_id)
        if row is None:
            s.add(LoadBalancerStats(load_balancer_id=lb_id, stats=dict(stats), updated_at=utcnow()))
        else:
            row.stats, row.updated_at = dict(stats), utcnow()
    return True


def stats_to_json(stats: driver.Stats) -> dict[str, Any]:
    """The driver's Stats as the JSON record_stats stores."""
    def counters(c: driver.Counters) -> dict[str, Any]:
        return {"requests": c.requests, "errors": c.errors, "active_connections": c.active_connections,
                "bytes_in": c.bytes_in, "bytes_out": c.bytes_out, "response_time_ms": c.response_time_ms}

    return {"listeners": {k: counters(v) for k, v in stats.listeners.items()},
            "pools": {k: counters(v) for k, v in stats.pools.items()},
            "members": {k: counters(v) for k, v in stats.members.items()}}


def get_stats(s: Session, lb: LoadBalancer) -> LoadBalancerStats | None:
    return s.get(LoadBalancerStats, lb.id)


def _log_id(time: dt.datetime) -> str:
    """Time-sortable by the record's own time, unique by its random tail."""
    return f"lbal-{int(time.timestamp() * 1_000_000):016x}{secrets.token_hex(6)}"


def append_logs(lb_id: str, records: Iterable[driver.AccessLogRecord]) -> int:
    """Store access log records of a load balancer, keeping its newest ``ACCESS_LOG_KEEP``."""
    rows = []
    for r in records:
        time = r.time if r.time.tzinfo else r.time.replace(tzinfo=dt.UTC)
        rows.append({"id": _log_id(time), "load_balancer_id": lb_id, "time": time,
                     "listener_id": r.listener_id[:40], "client": r.client[:64],
                     "pool_id": r.pool_id[:40] if r.pool_id else None,
                     "member_id": r.member_id[:40] if r.member_id else None,
                     "method": r.method[:16] if r.method else None, "path": r.path[:2048] if r.path else None,
                     "status": r.status, "duration_ms": max(0, int(r.duration_ms)),
                     "bytes_out": max(0, int(r.bytes_out))})
    if not rows:
        return 0
    with session_scope() as s:
        if s.get(LoadBalancer, lb_id) is None:
            return 0
        s.add_all([AccessLogRecord(**row) for row in rows])
        s.flush()
        cutoff = s.scalar(select(AccessLogRecord.id).where(AccessLogRecord.load_balancer_id == lb_id)
                          .order_by(AccessLogRecord.id.desc()).offset(ACCESS_LOG_KEEP).limit(1))
        if cutoff is not None:
            s.execute(delete(AccessLogRecord).where(AccessLogRecord.load_balancer_id == lb_id,
                                                    AccessLogRecord.id <= cutoff))
    return len(rows)


def log_query(lb: LoadBalancer, *, since: dt.datetime | None = None, status: int | None = None,
              listener_id: str | None = None) -> Select[AccessLogRecord]:
    stmt = select(AccessLogRecord).where(AccessLogRecord.load_balancer_id == lb.id)
    if since is not None:
        stmt = stmt.where(AccessLogRecord.time >= since)
    if status is not None:
        stmt = stmt.where(AccessLogRecord.status == status)
    if listener_id:
        stmt = stmt.where(AccessLogRecord.listener_id == listener_id)
    return stmt


def purge_access_logs(now: dt.datetime | None = None) -> int:
    cutoff = (now or utcnow()) - dt.timedelta(days=ACCESS_LOG_RETENTION_DAYS)
    with session_scope() as s:
        result = s.execute(delete(AccessLogRecord).where(AccessLogRecord.time < cutoff))
        return int(getattr(result, "rowcount", 0) or 0)


def finish_deletes_of_removed_hosts() -> int:
    """Backstop: a load balancer being deleted on a host that was removed from the cloud has no agent left to
    report its proxy gone; its deletion is finished here. Returns how many were finished."""
    with session_scope(write=False) as s:
        ids = list(s.scalars(select(LoadBalancer.id).where(
            LoadBalancer.status == DELETING, ~select(Host.id).where(Host.id == LoadBalancer.host_id).exists())))
    return sum(finish_delete(lb_id) for lb_id in ids)


def loops() -> list[Loop]:
    return [Loop("loadbalancer-access-log-retention", purge_access_logs, 3600.0),
            Loop("loadbalancer-finish-deletes-of-removed-hosts", finish_deletes_of_removed_hosts, 60.0)]

