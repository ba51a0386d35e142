"""VPC networking rules: VPCs, subnets, network interfaces, security groups, floating IPs, NAT gateways,
flow logs; and the functions the agent and compute call.

Every change runs in one transaction that first locks the VPC's row and bumps its
``desired_version`` (:func:`_lock_vpc`): changes within one VPC are serialised on PostgreSQL as
they are on SQLite, and the agents learn that the VPC changed. After the commit the service calls
``core.reconcile.notify("network", <vpc id>)``. Address allocation is in ``ipam.py``.

Other services call :func:`default_subnet` (an instance created without a subnet),
:func:`attach_interface` / :func:`detach_interface` / :func:`interfaces_of_instance` (compute owns
instances and validates them; this service never reads them) and the agent calls :func:`vpc_state`,
:func:`observed`, :func:`set_status` and :func:`ingest_flows`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Select, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.reconcile import notify
from hackboot.core.workers import Loop
from hackboot.events.service import emit
from hackboot.network import ipam
from hackboot.network.models import (
    ACTIVE,
    ALL,
    DELETED,
    EGRESS,
    INGRESS,
    PENDING,
    FloatingIp,
    FlowLog,
    FlowLogRecord,
    InterfaceSecurityGroup,
    NatGateway,
    NetworkInterface,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
    Vpc,
)

log = logging.getLogger("hackboot.network")

KIND = "network"  # the change channel of core.reconcile (keys: VPC ids)
# The region's floating IP pool. Documentation addresses (RFC 5737): tests and single machines use a
# namespace playing "the internet" with them. The first usable address is the upstream router's.
# One pool per region for now; an operator setting will replace this constant.
FLOATING_IP_POOL = "203.0.113.0/24"
DEFAULT_VPC_CIDR = "172.31.0.0/16"  # as AWS: one /20 public subnet per zone
DEFAULT_SUBNET_PREFIX = 20
DEFAULT_NAME = "default"
VNI_MIN, VNI_MAX = 4096, 2**24 - 1  # VXLAN's 24 bits; the low ones are left to the operator's underlay
MAX_GROUPS_PER_INTERFACE = 5
MAX_INTERFACES_PER_INSTANCE = 8
RETENTION_DAYS = 30  # flow log records
PURGE_BATCH = 5000
T = TypeVar("T")


def _invalid(field_name: str, msg: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(msg, errors=[{"loc": ["body", field_name], "msg": msg}])


# ==================================================================================================
# Transactions, change notification, lookups
# ==================================================================================================

@dataclass
class Tx:
    s: Session
    vpcs: set[str] = field(default_factory=set)  # VPCs changed: notified after the commit
    locked: dict[str, Vpc] = field(default_factory=dict)


@contextmanager
def _change() -> Iterator[Tx]:
    with session_scope() as s:
        tx = Tx(s)
        yield tx
    for vpc_id in sorted(tx.vpcs):
        notify(KIND, vpc_id)


def _reload(s: Session, model: type[T], object_id: str, *, lock: bool = False) -> T | None:
    """The row as committed now (after a lock was taken, earlier reads may be stale on PostgreSQL);
    `lock`: and locked for the rest of the transaction."""
    stmt = select(model).where(model.id == object_id).execution_options(populate_existing=True)  # type: ignore[attr-defined]
    return s.scalar(stmt.with_for_update() if lock else stmt)


def _group_for_write(tx: Tx, p: Principal, ref: str) -> SecurityGroup:
    """The group, its VPC locked, as it is once the lock is held."""
    current = get_group(tx.s, p, ref)
    _lock_vpc(tx, current.vpc_id)
    group = _reload(tx.s, SecurityGroup, current.id)
    if group is None:
        raise errors.NotFound(f"Security group {ref} not found")
    return group


def _lock_vpc(tx: Tx, vpc_id: str) -> Vpc:
    """Lock a live VPC for the rest of the transaction and bump its desired version (once per transaction)."""
    if vpc_id in tx.locked:
        return tx.locked[vpc_id]
    vpc = tx.s.scalar(select(Vpc).where(Vpc.id == vpc_id).with_for_update()
                      .execution_options(populate_existing=True))
    if vpc is None or vpc.status == DELETED:
        raise errors.NotFound(f"VPC {vpc_id} not found")
    vpc.desired_version += 1
    vpc.updated_at = utcnow()
    tx.locked[vpc_id] = vpc
    tx.vpcs.add(vpc_id)
    return vpc


def _event(s: Session, kind: str, verb: str, obj: Any, actor: str, **data: Any) -> None:
    emit(s, f"network.{kind}.{verb}", resource_type=kind, resource_id=obj.id, project_id=obj.project_id,
         actor=actor, data=data)


def _by_ref(s: Session, p: Principal, model: type[T], ref: str, what: str) -> T:
    """A row of the caller's project by id, or by name when exactly one (live) row has it; else 404.

    Another project's row is a 404 like a missing one: its existence is not the caller's to learn.
    """
    m: Any = model
    row = s.get(m, ref)
    if row is not None and row.project_id == p.project and getattr(row, "status", None) != DELETED:
        return row  # type: ignore[no-any-return]
    stmt = select(m).where(m.project_id == p.project, m.name == ref)
    if hasattr(m, "status"):
        stmt = stmt.where(m.status != DELETED)
    rows = list(s.scalars(stmt.limit(2))) if ref else []
    if not rows:
        raise errors.NotFound(f"{what} {ref} not found")
    if len(rows) > 1:
        raise errors.Conflict(f"Several {what}s are named '{ref}': use the id", code="ambiguous_name")
    return rows[0]  # type: ignore[no-any-return]


def get_vpc(s: Session, p: Principal, ref: str) -> Vpc:
    return _by_ref(s, p, Vpc, ref, "VPC")


def get_subnet(s: Session, p: Principal, ref: str) -> Subnet:
    return _by_ref(s, p, Subnet, ref, "Subnet")


def get_interface(s: Session, p: Principal, ref: str) -> NetworkInterface:
    return _by_ref(s, p, NetworkInterface, ref, "Network interface")


def get_group(s: Session, p: Principal, ref: str, vpc_id: str | None = None) -> SecurityGroup:
    """By id, or by name (within `vpc_id` when given: every VPC has a group named `default`)."""
    if vpc_id is None:
        return _by_ref(s, p, SecurityGroup, ref, "Security group")
    row = s.get(SecurityGroup, ref)
    if row is None or row.project_id != p.project:
        row = s.scalar(select(SecurityGroup).where(SecurityGroup.project_id == p.project,
                                                   SecurityGroup.vpc_id == vpc_id, SecurityGroup.name == ref))
        if row is None:
            raise errors.NotFound(f"Security group {ref} not found")
    if row.vpc_id != vpc_id:
        raise _invalid("security_groups", f"Security group {ref} belongs to another VPC")
    return row


def get_floating_ip(s: Session, p: Principal, ref: str) -> FloatingIp:
    row = s.get(FloatingIp, ref)
    if row is None or row.project_id != p.project:
        # an address works as a reference too (unique in a region; the project may hold one per region)
        rows = list(s.scalars(select(FloatingIp).where(FloatingIp.project_id == p.project,
                                                       FloatingIp.address == ref).limit(2)))
        if len(rows) != 1:
            raise errors.NotFound(f"Floating IP {ref} not found")
        row = rows[0]
    return row


def get_nat_gateway(s: Session, p: Principal, ref: str) -> NatGateway:
    return _by_ref(s, p, NatGateway, ref, "NAT gateway")


def get_flow_log(s: Session, p: Principal, ref: str) -> FlowLog:
    return _by_ref(s, p, FlowLog, ref, "Flow log")


def _region(s: Session, region: str | None, field_name: str = "region") -> str:
    from hackboot.catalog.models import Region

    region_id = region or get_settings().region
    row = s.get(Region, region_id)
    if row is None:
        raise _invalid(field_name, f"Region {region_id} does not exist")
    if row.status != "operational":
        raise errors.Conflict(f"Region {region_id} is {row.status}: it does not accept new networks",
                              code="region_not_operational")
    return row.id


def _zone(s: Session, zone: str, region_id: str, field_name: str = "zone") -> str:
    from hackboot.catalog import service as catalog
    from hackboot.catalog.models import Zone

    row = s.get(Zone, zone)
    if row is None:
        raise _invalid(field_name, f"Zone {zone} does not exist")
    if row.region_id != region_id:
        raise _invalid(field_name, f"Zone {zone} is in region {row.region_id}, not in the VPC's region {region_id}")
    catalog.placeable_zone(s, row.id)  # 409 when the zone or its region takes no new resources
    return row.id


def _placeable_zones(s: Session, region_id: str) -> list[str]:
    from hackboot.catalog import service as catalog

    return [z.id for z in catalog.placeable_zones(s, region_id)]


def dns_domain(vpc: Vpc) -> str:
    """`<vpc>.internal`: names resolve as `<name>.<vpc>.internal` (the name made a lower-case DNS label)."""
    label = re.sub(r"[^a-z0-9-]+", "-", vpc.name.lower()).strip("-") or vpc.id
    return f"{label}.internal"


# ==================================================================================================
# VPCs
# ==================================================================================================

def vpc_query(p: Principal, *, name: str | None = None, region: str | None = None, is_default: bool | None = None,
              status: str | None = None) -> Select[Vpc]:
    stmt = select(Vpc).where(Vpc.project_id == p.project, Vpc.status != DELETED)
    if name:
        stmt = stmt.where(Vpc.name == name)
    if region:
        stmt = stmt.where(Vpc.region_id == region)
    if is_default is not None:
        stmt = stmt.where(Vpc.is_default.is_(is_default))
    if status:
        stmt = stmt.where(Vpc.status == status)
    return stmt


def _vpc_name_free(s: Session, project_id: str, region_id: str, name: str, except_id: str | None = None) -> None:
    stmt = select(Vpc.id).where(Vpc.project_id == project_id, Vpc.region_id == region_id, Vpc.name == name,
                                Vpc.status != DELETED)
    if except_id:
        stmt = stmt.where(Vpc.id != except_id)
    if s.scalar(stmt):
        raise errors.Conflict(f"A VPC named '{name}' already exists in region {region_id}", code="already_exists")


def _next_vni(s: Session, region_id: str) -> int:
    top = s.scalar(select(func.max(Vpc.vni)).where(Vpc.region_id == region_id))
    if top is None:
        return VNI_MIN
    if top < VNI_MAX:
        return int(top) + 1
    used = set(s.scalars(select(Vpc.vni).where(Vpc.region_id == region_id)))  # wrapped: look for a hole
    for vni in range(VNI_MIN, VNI_MAX + 1):
        if vni not in used:
            return vni
    raise errors.NoCapacity(f"Region {region_id} has no VXLAN network identifier left")


def _insert_vpc(s: Session, **fields: Any) -> Vpc | None:
    """Insert a VPC with a fresh VNI; None when the insert lost a race (unique VNI or default VPC).

    The insert runs in a savepoint: on PostgreSQL a unique violation aborts only the savepoint, and
    the caller's transaction goes on (it retries, or finds the winner's row).
    """
    vpc = Vpc(id=new_id("vpc"), vni=_next_vni(s, fields["region_id"]), **fields)
    try:
        with s.begin_nested():
            s.add(vpc)
    except IntegrityError:
        return None
    return vpc


def _group_rules(group: SecurityGroup, actor: str, *, default: bool) -> list[SecurityGroupRule]:
    """A new group allows all egress; the default group also allows ingress from its own members."""
    rules = [_rule(group, EGRESS, "all", None, None, "0.0.0.0/0", None, actor, "all egress")]
    if default:
        rules.append(_rule(group, INGRESS, "all", None, None, None, group.id, actor,
                           "traffic between members of the group"))
    return rules


def _new_group(tx: Tx, vpc: Vpc, name: str, description: str, actor: str, *, default: bool = False) -> SecurityGroup:
    group = SecurityGroup(id=new_id("sg"), project_id=vpc.project_id, vpc_id=vpc.id, name=name,
                          description=description, is_default=default, created_by=actor)
    tx.s.add(group)
    tx.s.flush()
    rules = _group_rules(group, actor, default=default)
    tx.s.add_all(rules)
    group.rule_count = len(rules)
    _sync_rule_usage(tx.s, vpc.project_id)
    _event(tx.s, "security_group", "created", group, actor, name=name, vpc_id=vpc.id, default=default)
    return group


def create_vpc(p: Principal, *, name: str, cidr: str, region: str | None = None, description: str = "",
               internet_gateway: bool = False) -> Vpc:
    net = ipam.parse_network(cidr)
    ipam.check_vpc_cidr(net)
    if name == DEFAULT_NAME:
        raise _invalid("name", f"The name '{DEFAULT_NAME}' is the default VPC's (POST /v1/default-vpc makes it)")
    with _change() as tx:
        s = tx.s
        region_id = _region(s, region)
        # the claim first: its row lock queues concurrent creations of the project, so the name check
        # below sees a VPC another request just made (PostgreSQL; SQLite serialises writers anyway)
        quotas.claim(s, p.project, "vpcs", 1)
        _vpc_name_free(s, p.project, region_id, name)
        vpc = None
        for _ in range(5):
            vpc = _insert_vpc(s, project_id=p.project, region_id=region_id, name=name, description=description,
                              cidr=str(net), internet_gateway=internet_gateway, created_by=p.user_id)
            if vpc is not None:
                break
        if vpc is None:
            raise errors.Conflict("Too many VPCs are being created at once in this region: retry",
                                  code="busy", headers={"Retry-After": "1"})
        tx.locked[vpc.id] = vpc
        tx.vpcs.add(vpc.id)
        _event(s, "vpc", "created", vpc, p.user_id, name=name, cidr=vpc.cidr, region=region_id, vni=vpc.vni,
               internet_gateway=internet_gateway)
        _new_group(tx, vpc, DEFAULT_NAME, "Default group of the VPC", p.user_id, default=True)
    return vpc


def ensure_default_vpc(s: Session, project_id: str, region: str | None = None, *, actor: str = "system",
                       changed: set[str] | None = None) -> Vpc:
    """The project's default VPC in `region` (default: this cloud's), created on first use.

    Idempotent under concurrency on both databases: a unique constraint on (project, default_region)
    admits one row; a request that loses the race finds the winner's. The new VPC (172.31.0.0/16,
    with an internet gateway) gets a public /20 subnet per placeable zone of the region and its
    default security group; it counts against the `vpcs` quota. Runs in the caller's transaction;
    the caller notifies the ids added to `changed` after its commit.
    """
    region_id = _region(s, region)
    stmt = select(Vpc).where(Vpc.project_id == project_id, Vpc.default_region == region_id)
    for _ in range(5):
        found = s.scalar(stmt)
        if found is not None:
            return found
        vpc = _insert_vpc(s, project_id=project_id, region_id=region_id, name=DEFAULT_NAME,
                          description="Default VPC", cidr=DEFAULT_VPC_CIDR, is_default=True,
                          default_region=region_id, internet_gateway=True, created_by=actor)
        if vpc is None:
            continue  # another request made it (or took our VNI): look again
        quotas.claim(s, project_id, "vpcs", 1)
        tx = Tx(s, changed if changed is not None else set())
        tx.locked[vpc.id] = vpc
        tx.vpcs.add(vpc.id)
        _event(s, "vpc", "created", vpc, actor, name=vpc.name, cidr=vpc.cidr, region=region_id, vni=vpc.vni,
               default=True, internet_gateway=True)
        _new_group(tx, vpc, DEFAULT_NAME, "Default group of the VPC", actor, default=True)
        subnets = ipaddress.IPv4Network(DEFAULT_VPC_CIDR).subnets(new_prefix=DEFAULT_SUBNET_PREFIX)
        for zone_id, net in zip(_placeable_zones(s, region_id), subnets, strict=False):
            _insert_subnet(tx, vpc, net, zone_id, f"default-{zone_id.lower()}", "Default subnet of the zone", True,
                           actor)
        return vpc
    raise errors.Conflict("The default VPC is being created by another request: retry", code="busy",
                          headers={"Retry-After": "1"})


def default_subnet(s: Session, project_id: str, region: str | None = None, zone: str | None = None, *,
                   actor: str = "system", changed: set[str] | None = None) -> Subnet:
    """The subnet an interface (or an instance) without one goes to: the default VPC's subnet of `zone`.

    `zone` defaults to this cloud's default zone when it is in the region, else the region's first
    placeable zone. Creates the default VPC on first use (see :func:`ensure_default_vpc`).
    """
    vpc = ensure_default_vpc(s, project_id, region, actor=actor, changed=changed)
    if zone is None:
        settings = get_settings()
        zones = _placeable_zones(s, vpc.region_id)
        zone = settings.zone if settings.zone in zones else (zones[0] if zones else None)
        if zone is None:
            raise errors.Conflict(f"Region {vpc.region_id} has no zone that accepts new resources",
                                  code="zone_not_operational")
    else:
        zone = _zone(s, zone, vpc.region_id)
    query = (select(Subnet).where(Subnet.vpc_id == vpc.id, Subnet.zone_id == zone)
             .order_by(Subnet.public.desc(), Subnet.created_at).limit(1))
    subnet = s.scalar(query)
    if subnet is None:
        # A zone opened after the default VPC was made gets its default subnet on first use, as at
        # first use of the VPC: the next free /20 of the VPC, under the VPC's lock (one winner).
        tx = Tx(s, changed if changed is not None else set())
        locked = _lock_vpc(tx, vpc.id)
        subnet = s.scalar(query.execution_options(populate_existing=True))
        if subnet is None:
            taken = [ipaddress.IPv4Network(c) for c in s.scalars(select(Subnet.cidr).where(Subnet.vpc_id == vpc.id))]
            free = (net for net in ipaddress.IPv4Network(locked.cidr).subnets(new_prefix=DEFAULT_SUBNET_PREFIX)
                    if not any(net.overlaps(other) for other in taken))
            net = next(free, None)
            if net is None:
                raise errors.Conflict(f"The default VPC has no subnet in zone {zone} and no room for one: create "
                                      "one, or name a subnet", code="no_default_subnet")
            subnet = _insert_subnet(tx, locked, net, zone, f"default-{zone.lower()}", "Default subnet of the zone",
                                    True, actor)
    return subnet


def create_default_vpc(p: Principal, region: str | None = None) -> Vpc:
    with _change() as tx:
        return ensure_default_vpc(tx.s, p.project, region, actor=p.user_id, changed=tx.vpcs)


def _interfaces_needing_igw(s: Session, vpc_id: str) -> list[str]:
    """Interfaces of private subnets holding a floating IP: only the internet gateway lets them reach out."""
    return list(s.scalars(
        select(NetworkInterface.id).join(Subnet, Subnet.id == NetworkInterface.subnet_id)
        .join(FloatingIp, FloatingIp.network_interface_id == NetworkInterface.id)
        .where(NetworkInterface.vpc_id == vpc_id, Subnet.public.is_(False))))


def update_vpc(p: Principal, ref: str, *, name: str | None = None, description: str | None = None,
               internet_gateway: bool | None = None) -> Vpc:
    with _change() as tx:
        s = tx.s
        vpc = _lock_vpc(tx, get_vpc(s, p, ref).id)
        changes: dict[str, Any] = {}
        if name is not None and name != vpc.name:
            if vpc.is_default or name == DEFAULT_NAME:
                raise _invalid("name", f"The default VPC is named '{DEFAULT_NAME}', and no other VPC may be")
            _vpc_name_free(s, vpc.project_id, vpc.region_id, name, except_id=vpc.id)
            changes["name"] = {"from": vpc.name, "to": name}
            vpc.name = name
        if description is not None:
            vpc.description = description
        if internet_gateway is not None and internet_gateway != vpc.internet_gateway:
            if not internet_gateway:
                users = _interfaces_needing_igw(s, vpc.id)
                if users:
                    raise errors.Conflict(f"Interfaces of private subnets reach the internet through the internet "
                                          f"gateway with their floating IPs: {', '.join(users)}; detach them first",
                                          code="in_use")
            changes["internet_gateway"] = internet_gateway
            vpc.internet_gateway = internet_gateway
        _event(s, "vpc", "updated", vpc, p.user_id, **changes)
    return vpc


def delete_vpc(p: Principal, ref: str) -> Vpc:
    """409 while it has subnets (hence interfaces), NAT gateways or groups other than its default one."""
    with _change() as tx:
        s = tx.s
        vpc = _lock_vpc(tx, get_vpc(s, p, ref).id)
        users = [f"subnet {i}" for i in s.scalars(select(Subnet.id).where(Subnet.vpc_id == vpc.id))]
        users += [f"NAT gateway {i}" for i in s.scalars(select(NatGateway.id).where(NatGateway.vpc_id == vpc.id))]
        users += [f"security group {i}" for i in s.scalars(select(SecurityGroup.id).where(
            SecurityGroup.vpc_id == vpc.id, SecurityGroup.is_default.is_(False)))]
        if users:
            raise errors.Conflict(f"VPC {vpc.name} is in use by {', '.join(users)}: delete them first",
                                  code="in_use")
        for fl in list(s.scalars(select(FlowLog).where(FlowLog.vpc_id == vpc.id))):
            _drop_flow_log(s, fl, p.user_id)
        for group in list(s.scalars(select(SecurityGroup).where(SecurityGroup.vpc_id == vpc.id))):
            s.execute(delete(SecurityGroupRule).where(SecurityGroupRule.security_group_id == group.id))
            s.delete(group)
        vpc.status = DELETED
        vpc.deleted_at = utcnow()
        vpc.default_region = None  # a new default VPC may be made; the VNI stays taken while the row lives
        quotas.release(s, vpc.project_id, "vpcs", 1)
        _sync_rule_usage(s, vpc.project_id)
        _event(s, "vpc", "deleted", vpc, p.user_id, name=vpc.name)
    return vpc


# ==================================================================================================
# Subnets
# ==================================================================================================

def subnet_query(p: Principal, *, vpc_id: str | None = None, zone: str | None = None, name: str | None = None,
                 public: bool | None = None) -> Select[Subnet]:
    stmt = select(Subnet).where(Subnet.project_id == p.project)
    if vpc_id:
        stmt = stmt.where(Subnet.vpc_id == vpc_id)
    if zone:
        stmt = stmt.where(Subnet.zone_id == zone)
    if name:
        stmt = stmt.where(Subnet.name == name)
    if public is not None:
        stmt = stmt.where(Subnet.public.is_(public))
    return stmt


def _insert_subnet(tx: Tx, vpc: Vpc, net: ipaddress.IPv4Network, zone_id: str, name: str, description: str,
                   public: bool, actor: str) -> Subnet:
    lay = ipam.layout(net)
    quotas.claim(tx.s, vpc.project_id, "subnets", 1)
    subnet = Subnet(id=new_id("subnet"), project_id=vpc.project_id, vpc_id=vpc.id, zone_id=zone_id, name=name,
                    description=description, cidr=str(net), public=public, gateway_ip=str(lay.gateway),
                    dns_ip=str(lay.dns), created_by=actor)
    tx.s.add(subnet)
    tx.s.flush()
    _event(tx.s, "subnet", "created", subnet, actor, vpc_id=vpc.id, cidr=subnet.cidr, zone=zone_id, public=public)
    return subnet


def create_subnet(p: Principal, *, vpc: str, cidr: str, zone: str | None = None, name: str = "",
                  description: str = "", public: bool = False) -> Subnet:
    net = ipam.parse_network(cidr)
    with _change() as tx:
        s = tx.s
        v = _lock_vpc(tx, get_vpc(s, p, vpc).id)
        ipam.check_subnet_cidr(net, ipaddress.IPv4Network(v.cidr))
        if zone is None:
            settings = get_settings()
            zones = _placeable_zones(s, v.region_id)
            if not zones:
                raise errors.Conflict(f"Region {v.region_id} has no zone that accepts new resources",
                                      code="zone_not_operational")
            zone = settings.zone if settings.zone in zones else zones[0]
        zone_id = _zone(s, zone, v.region_id)
        siblings = {sid: c for sid, c in s.execute(select(Subnet.id, Subnet.cidr).where(Subnet.vpc_id == v.id))}
        clash = ipam.overlapping(net, siblings)
        if clash:
            raise errors.Conflict(f"{net} overlaps subnet {', '.join(f'{c} ({siblings[c]})' for c in clash)} "
                                  f"of VPC {v.name}", code="overlapping_cidr")
        subnet = _insert_subnet(tx, v, net, zone_id, name, description, public, p.user_id)
    return subnet


def update_subnet(p: Principal, ref: str, *, name: str | None = None, description: str | None = None,
                  public: bool | None = None) -> Subnet:
    with _change() as tx:
        s = tx.s
        current = get_subnet(s, p, ref)
        vpc = _lock_vpc(tx, current.vpc_id)
        subnet = _reload(s, Subnet, current.id)
        if subnet is None:
            raise errors.NotFound(f"Subnet {ref} not found")
        changes: dict[str, Any] = {}
        if name is not None:
            subnet.name = name
        if description is not None:
            subnet.description = description
        if public is not None and public != subnet.public:
            if not public:
                nats = list(s.scalars(select(NatGateway.id).where(NatGateway.subnet_id == subnet.id)))
                if nats:
                    raise errors.Conflict(f"NAT gateways live in public subnets: {', '.join(nats)} is in this one",
                                          code="in_use")
                if not vpc.internet_gateway:
                    holders = list(s.scalars(
                        select(NetworkInterface.id).join(FloatingIp, FloatingIp.network_interface_id
                                                         == NetworkInterface.id)
                        .where(NetworkInterface.subnet_id == subnet.id)))
                    if holders:
                        raise errors.Conflict(f"Interfaces of this subnet hold floating IPs ({', '.join(holders)}) "
                                              "and the VPC has no internet gateway", code="in_use")
            changes["public"] = public
            subnet.public = public
        _event(s, "subnet", "updated", subnet, p.user_id, **changes)
    return subnet


def delete_subnet(p: Principal, ref: str) -> Subnet:
    with _change() as tx:
        s = tx.s
        current = get_subnet(s, p, ref)
        _lock_vpc(tx, current.vpc_id)
        subnet = _reload(s, Subnet, current.id)
        if subnet is None:
            raise errors.NotFound(f"Subnet {ref} not found")
        users = [f"network interface {i}" for i in s.scalars(select(NetworkInterface.id).where(
            NetworkInterface.subnet_id == subnet.id).limit(20))]
        users += [f"NAT gateway {i}" for i in s.scalars(select(NatGateway.id).where(
            NatGateway.subnet_id == subnet.id))]
        if users:
            raise errors.Conflict(f"Subnet {subnet.id} is in use by {', '.join(users)}: delete them first",
                                  code="in_use")
        for fl in list(s.scalars(select(FlowLog).where(FlowLog.resource_id == subnet.id))):
            _drop_flow_log(s, fl, p.user_id)
        s.delete(subnet)
        quotas.release(s, subnet.project_id, "subnets", 1)
        _event(s, "subnet", "deleted", subnet, p.user_id, vpc_id=subnet.vpc_id, cidr=subnet.cidr)
    return subnet


def free_addresses(s: Session, subnets: list[Subnet]) -> dict[str, int]:
    from hackboot.network.models import IpAllocation

    if not subnets:
        return {}
    counts = dict(s.execute(select(IpAllocation.subnet_id, func.count()).where(
        IpAllocation.subnet_id.in_([x.id for x in subnets])).group_by(IpAllocation.subnet_id)).all())
    return {x.id: ipam.layout(ipaddress.IPv4Network(x.cidr)).capacity - int(counts.get(x.id, 0)) for x in subnets}


def nat_for_subnet(s: Session, subnet: Subnet) -> NatGateway | None:
    """Where a private subnet's internet traffic goes: a NAT gateway of its VPC, one of its zone first."""
    if subnet.public:
        return None
    rows = s.execute(select(NatGateway, Subnet.zone_id).join(Subnet, Subnet.id == NatGateway.subnet_id)
                     .where(NatGateway.vpc_id == subnet.vpc_id).order_by(NatGateway.id)).all()
    same_zone = [nat for nat, zone in rows if zone == subnet.zone_id]
    return same_zone[0] if same_zone else (rows[0][0] if rows else None)


# ==================================================================================================
# Security groups and rules
# ==================================================================================================

def group_query(p: Principal, *, vpc_id: str | None = None, name: str | None = None) -> Select[SecurityGroup]:
    stmt = select(SecurityGroup).where(SecurityGroup.project_id == p.project)
    if vpc_id:
        stmt = stmt.where(SecurityGroup.vpc_id == vpc_id)
    if name:
        stmt = stmt.where(SecurityGroup.name == name)
    return stmt


def rules_of(s: Session, group_ids: list[str]) -> dict[str, list[SecurityGroupRule]]:
    out: dict[str, list[SecurityGroupRule]] = {g: [] for g in group_ids}
    if group_ids:
        for r in s.scalars(select(SecurityGroupRule).where(SecurityGroupRule.security_group_id.in_(group_ids))
                           .order_by(SecurityGroupRule.id)):
            out[r.security_group_id].append(r)
    return out


def create_group(p: Principal, *, vpc: str, name: str, description: str = "") -> SecurityGroup:
    with _change() as tx:
        s = tx.s
        v = _lock_vpc(tx, get_vpc(s, p, vpc).id)
        if s.scalar(select(SecurityGroup.id).where(SecurityGroup.vpc_id == v.id, SecurityGroup.name == name)):
            raise errors.Conflict(f"VPC {v.name} already has a security group named '{name}'", code="already_exists")
        quotas.claim(s, p.project, "security_groups", 1)
        group = _new_group(tx, v, name, description, p.user_id)
    return group


def update_group(p: Principal, ref: str, *, name: str | None = None, description: str | None = None) -> SecurityGroup:
    with _change() as tx:
        s = tx.s
        group = _group_for_write(tx, p, ref)
        if name is not None and name != group.name:
            if group.is_default:
                raise errors.Conflict("The default group keeps its name", code="default_group")
            if s.scalar(select(SecurityGroup.id).where(SecurityGroup.vpc_id == group.vpc_id,
                                                       SecurityGroup.name == name)):
                raise errors.Conflict(f"The VPC already has a security group named '{name}'", code="already_exists")
            group.name = name
        if description is not None:
            group.description = description
        _event(s, "security_group", "updated", group, p.user_id, name=group.name)
    return group


def delete_group(p: Principal, ref: str) -> SecurityGroup:
    with _change() as tx:
        s = tx.s
        group = _group_for_write(tx, p, ref)
        if group.is_default:
            raise errors.Conflict("A VPC's default security group goes with the VPC", code="default_group")
        users = [f"network interface {i}" for i in s.scalars(select(InterfaceSecurityGroup.interface_id).where(
            InterfaceSecurityGroup.security_group_id == group.id).limit(20))]
        users += [f"a rule of security group {i}" for i in s.scalars(
            select(SecurityGroupRule.security_group_id).where(SecurityGroupRule.remote_group_id == group.id,
                                                              SecurityGroupRule.security_group_id != group.id)
            .distinct().limit(20))]
        if users:
            raise errors.Conflict(f"Security group {group.name} is used by {', '.join(users)}", code="in_use")
        s.execute(delete(SecurityGroupRule).where(SecurityGroupRule.security_group_id == group.id))
        s.delete(group)
        s.flush()
        quotas.release(s, group.project_id, "security_groups", 1)
        _sync_rule_usage(s, group.project_id)
        _event(s, "security_group", "deleted", group, p.user_id, name=group.name, vpc_id=group.vpc_id)
    return group


@dataclass
class RuleRequest:
    direction: str
    protocol: str
    port_min: int | None = None
    port_max: int | None = None
    cidr: str | None = None
    remote_group: str | None = None
    description: str = ""


def _fingerprint(direction: str, protocol: str, pmin: int | None, pmax: int | None, cidr: str | None,
                 remote: str | None) -> str:
    return f"{direction}|{protocol}|{pmin or ''}-{pmax or ''}|{cidr or ''}|{remote or ''}"


def _rule(group: SecurityGroup, direction: str, protocol: str, pmin: int | None, pmax: int | None,
          cidr: str | None, remote: str | None, actor: str, description: str = "") -> SecurityGroupRule:
    return SecurityGroupRule(id=new_id("sgr"), project_id=group.project_id, vpc_id=group.vpc_id,
                             security_group_id=group.id, direction=direction, protocol=protocol, port_min=pmin,
                             port_max=pmax, cidr=cidr, remote_group_id=remote, description=description,
                             fingerprint=_fingerprint(direction, protocol, pmin, pmax, cidr, remote),
                             created_by=actor)


def _normalise_rule(req: RuleRequest) -> tuple[int | None, int | None, str | None]:
    """Ports for tcp/udp (default: all), none for icmp/all; exactly one peer. Returns (min, max, cidr)."""
    pmin: int | None
    pmax: int | None
    if req.protocol in ("tcp", "udp"):
        pmin = req.port_min if req.port_min is not None else (1 if req.port_max is None else req.port_max)
        pmax = req.port_max if req.port_max is not None else (65535 if req.port_min is None else req.port_min)
        if pmin > pmax:
            raise _invalid("port_min", f"port_min ({pmin}) is above port_max ({pmax})")
    else:
        if req.port_min is not None or req.port_max is not None:
            raise _invalid("port_min", f"Ports apply to tcp and udp rules, not to protocol {req.protocol}")
        pmin = pmax = None
    if (req.cidr is None) == (req.remote_group is None):
        raise _invalid("cidr", "Give exactly one peer: cidr (addresses) or remote_group (members of a group)")
    cidr = str(ipam.parse_network(req.cidr)) if req.cidr is not None else None
    return pmin, pmax, cidr


def _rule_limit(s: Session, project_id: str) -> int:
    row = s.get(quotas.QuotaUsage, (project_id, "security_group_rules"))
    return int(row.limit) if row is not None else quotas.DEFAULT_QUOTAS["security_group_rules"]


def _sync_rule_usage(s: Session, project_id: str) -> None:
    """The `security_group_rules` quota is per group: its `used` shows the project's fullest group."""
    s.flush()
    fullest = select(func.coalesce(func.max(SecurityGroup.rule_count), 0)).where(
        SecurityGroup.project_id == project_id).scalar_subquery()
    s.execute(update(quotas.QuotaUsage).where(quotas.QuotaUsage.project_id == project_id,
                                              quotas.QuotaUsage.resource == "security_group_rules")
              .values(used=fullest))


def add_rule(p: Principal, group_ref: str, req: RuleRequest) -> SecurityGroupRule:
    pmin, pmax, cidr = _normalise_rule(req)
    with _change() as tx:
        s = tx.s
        group = _group_for_write(tx, p, group_ref)
        remote_id = None
        if req.remote_group is not None:
            try:
                remote_id = get_group(s, p, req.remote_group, vpc_id=group.vpc_id).id
            except errors.ValidationFailed:
                raise _invalid("remote_group", f"Security group {req.remote_group} is in another VPC: rules name "
                                               "groups of their own VPC") from None
        fingerprint = _fingerprint(req.direction, req.protocol, pmin, pmax, cidr, remote_id)
        dup = s.scalar(select(SecurityGroupRule.id).where(SecurityGroupRule.security_group_id == group.id,
                                                          SecurityGroupRule.fingerprint == fingerprint))
        if dup:
            raise errors.Conflict(f"Security group {group.name} already has this rule ({dup})", code="duplicate_rule")
        limit = _rule_limit(s, p.project)
        # conditional UPDATE: two concurrent adds can never both take the group's last rule
        taken = s.execute(update(SecurityGroup).where(SecurityGroup.id == group.id,
                                                      SecurityGroup.rule_count + 1 <= limit)
                          .values(rule_count=SecurityGroup.rule_count + 1))
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise errors.QuotaExceeded(f"Quota exceeded for security_group_rules: security group {group.name} has "
                                       f"{group.rule_count} rules, the limit per group is {limit}")
        rule = _rule(group, req.direction, req.protocol, pmin, pmax, cidr, remote_id, p.user_id, req.description)
        s.add(rule)
        s.flush()
        _sync_rule_usage(s, p.project)
        _event(s, "security_group", "rule_added", group, p.user_id, rule_id=rule.id, direction=rule.direction,
               protocol=rule.protocol, port_min=pmin, port_max=pmax, cidr=cidr, remote_group_id=remote_id)
    return rule


def delete_rule(p: Principal, group_ref: str, rule_id: str) -> SecurityGroupRule:
    with _change() as tx:
        s = tx.s
        group = _group_for_write(tx, p, group_ref)
        rule = s.get(SecurityGroupRule, rule_id)
        if rule is None or rule.security_group_id != group.id:
            raise errors.NotFound(f"Rule {rule_id} not found in security group {group.name}")
        s.delete(rule)
        s.execute(update(SecurityGroup).where(SecurityGroup.id == group.id)
                  .values(rule_count=SecurityGroup.rule_count - 1))
        _sync_rule_usage(s, p.project)
        _event(s, "security_group", "rule_removed", group, p.user_id, rule_id=rule.id)
    return rule


# ==================================================================================================
# Network interfaces
# ==================================================================================================

@dataclass
class InterfaceRequest:
    subnet: str | None = None
    zone: str | None = None
    region: str | None = None
    name: str = ""
    description: str = ""
    private_ip: str | None = None
    security_groups: list[str] | None = None
    assign_public_ip: bool = False


def interface_query(p: Principal, *, vpc_id: str | None = None, subnet_id: str | None = None,
                    instance_id: str | None = None, status: str | None = None,
                    attached: bool | None = None) -> Select[NetworkInterface]:
    stmt = select(NetworkInterface).where(NetworkInterface.project_id == p.project)
    if vpc_id:
        stmt = stmt.where(NetworkInterface.vpc_id == vpc_id)
    if subnet_id:
        stmt = stmt.where(NetworkInterface.subnet_id == subnet_id)
    if instance_id:
        stmt = stmt.where(NetworkInterface.instance_id == instance_id)
    if status:
        stmt = stmt.where(NetworkInterface.status == status)
    if attached is not None:
        stmt = stmt.where(NetworkInterface.instance_id.isnot(None) if attached
                          else NetworkInterface.instance_id.is_(None))
    return stmt


def groups_of(s: Session, interface_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {i: [] for i in interface_ids}
    if interface_ids:
        for iid, gid in s.execute(select(InterfaceSecurityGroup.interface_id, InterfaceSecurityGroup.security_group_id)
                                  .where(InterfaceSecurityGroup.interface_id.in_(interface_ids))
                                  .order_by(InterfaceSecurityGroup.security_group_id)):
            out[iid].append(gid)
    return out


def public_ips_of(s: Session, interface_ids: list[str]) -> dict[str, FloatingIp]:
    if not interface_ids:
        return {}
    return {f.network_interface_id: f for f in s.scalars(select(FloatingIp).where(  # type: ignore[misc]
        FloatingIp.network_interface_id.in_(interface_ids)))}


def _resolve_groups(s: Session, p: Principal, vpc: Vpc, refs: list[str] | None) -> list[str]:
    if refs is None:
        default = s.scalar(select(SecurityGroup.id).where(SecurityGroup.vpc_id == vpc.id,
                                                          SecurityGroup.is_default.is_(True)))
        return [default] if default else []
    ids: list[str] = []
    for ref in refs:
        gid = get_group(s, p, ref, vpc_id=vpc.id).id
        if gid not in ids:
            ids.append(gid)
    if len(ids) > MAX_GROUPS_PER_INTERFACE:
        raise _invalid("security_groups", f"At most {MAX_GROUPS_PER_INTERFACE} security groups per interface")
    return ids


def _unused_mac(s: Session) -> str:
    for _ in range(10):
        mac = ipam.new_mac()
        if s.scalar(select(NetworkInterface.id).where(NetworkInterface.mac == mac)) is None:
            return mac
    raise errors.Unavailable("Could not draw an unused MAC address: retry")  # 46 random bits: never in practice


def _public_route(s: Session, vpc: Vpc, subnet: Subnet) -> None:
    if not (subnet.public or vpc.internet_gateway):
        raise errors.Conflict(f"Subnet {subnet.id} is private and VPC {vpc.name} has no internet gateway: a "
                              "floating IP needs either", code="no_internet_route")


def create_interface(p: Principal, req: InterfaceRequest) -> NetworkInterface:
    with _change() as tx:
        return _create_interface(tx, p, req)


def create_interface_in(s: Session, p: Principal, req: InterfaceRequest,
                        changed: set[str] | None = None) -> NetworkInterface:
    """:func:`create_interface` in the caller's transaction (compute: an instance's primary interface, made
    with the instance). The caller notifies the VPC ids added to `changed` after its commit."""
    return _create_interface(Tx(s, changed if changed is not None else set()), p, req)


def _create_interface(tx: Tx, p: Principal, req: InterfaceRequest) -> NetworkInterface:
    s = tx.s
    if req.subnet is not None:
        if req.zone is not None or req.region is not None:
            raise _invalid("zone", "Give a subnet, or a zone/region for the default VPC's subnet, not both")
        subnet_id = get_subnet(s, p, req.subnet).id
    else:
        region = req.region
        if req.zone is not None and region is None:
            from hackboot.catalog.models import Zone

            z = s.get(Zone, req.zone)
            if z is None:
                raise _invalid("zone", f"Zone {req.zone} does not exist")
            region = z.region_id
        subnet_id = default_subnet(s, p.project, region, req.zone, actor=p.user_id, changed=tx.vpcs).id
    vpc_id = s.scalar(select(Subnet.vpc_id).where(Subnet.id == subnet_id))
    vpc = _lock_vpc(tx, str(vpc_id))  # the VPC first, then the subnet: one lock order everywhere
    subnet = ipam.lock_subnet(s, subnet_id)
    groups = _resolve_groups(s, p, vpc, req.security_groups)
    quotas.claim(s, p.project, "network_interfaces", 1)
    nic_id = new_id("nic")
    address = ipam.allocate(s, subnet, owner_kind="network_interface", owner_id=nic_id, requested=req.private_ip)
    nic = NetworkInterface(id=nic_id, project_id=p.project, vpc_id=vpc.id, subnet_id=subnet.id, name=req.name,
                           description=req.description, mac=_unused_mac(s), private_ip=address,
                           created_by=p.user_id)
    s.add(nic)
    s.flush()
    s.add_all([InterfaceSecurityGroup(interface_id=nic.id, security_group_id=g) for g in groups])
    _event(s, "network_interface", "created", nic, p.user_id, vpc_id=vpc.id, subnet_id=subnet.id,
           private_ip=address, mac=nic.mac, security_groups=groups)
    if req.assign_public_ip:
        _public_route(s, vpc, subnet)
        fip = _allocate_floating_ip(s, p, vpc.region_id, f"Public address of {nic.id}", release_with=nic.id)
        _attach_fip(s, fip, nic, p.user_id)
    return nic


def update_interface(p: Principal, ref: str, *, name: str | None = None, description: str | None = None,
                     security_groups: list[str] | None = None) -> NetworkInterface:
    with _change() as tx:
        s = tx.s
        current = get_interface(s, p, ref)
        vpc = _lock_vpc(tx, current.vpc_id)
        nic = _reload(s, NetworkInterface, current.id)
        if nic is None:
            raise errors.NotFound(f"Network interface {ref} not found")
        changes: dict[str, Any] = {}
        if name is not None:
            nic.name = name
        if description is not None:
            nic.description = description
        if security_groups is not None:
            groups = _resolve_groups(s, p, vpc, security_groups)
            s.execute(delete(InterfaceSecurityGroup).where(InterfaceSecurityGroup.interface_id == nic.id))
            s.add_all([InterfaceSecurityGroup(interface_id=nic.id, security_group_id=g) for g in groups])
            changes["security_groups"] = groups
        _event(s, "network_interface", "updated", nic, p.user_id, **changes)
    return nic


def delete_interface(p: Principal, ref: str) -> NetworkInterface:
    """409 while attached to an instance. A floating IP allocated with it is released; another is detached."""
    with _change() as tx:
        s = tx.s
        current = get_interface(s, p, ref)
        _lock_vpc(tx, current.vpc_id)
        nic = _reload(s, NetworkInterface, current.id)
        if nic is None:
            raise errors.NotFound(f"Network interface {ref} not found")
        if nic.instance_id is not None:
            raise errors.Conflict(f"Network interface {nic.id} is attached to instance {nic.instance_id}: detach it "
                                  "first", code="in_use")
        _drop_interface(s, nic, p.user_id)
    return nic


def _drop_interface(s: Session, nic: NetworkInterface, actor: str) -> None:
    for fip in list(s.scalars(select(FloatingIp).where(FloatingIp.network_interface_id == nic.id))):
        if fip.release_with == nic.id:
            _release_fip(s, fip, actor)
        else:
            _detach_fip(s, fip, actor)
    for fl in list(s.scalars(select(FlowLog).where(FlowLog.resource_id == nic.id))):
        _drop_flow_log(s, fl, actor)
    s.execute(delete(InterfaceSecurityGroup).where(InterfaceSecurityGroup.interface_id == nic.id))
    ipam.release(s, nic.subnet_id, nic.private_ip)
    s.delete(nic)
    quotas.release(s, nic.project_id, "network_interfaces", 1)
    _event(s, "network_interface", "deleted", nic, actor, private_ip=nic.private_ip, subnet_id=nic.subnet_id)


@dataclass(frozen=True)
class InstanceRef:
    """What compute tells this service about an instance it has validated (same project, not deleted)."""

    id: str
    project_id: str
    zone_id: str
    host_id: str | None


def attach_interface(s: Session, p: Principal, ref: str, instance: InstanceRef, device_index: int | None = None,
                     changed: set[str] | None = None) -> NetworkInterface:
    """Attach an interface to an instance compute has checked; in the caller's transaction.

    The interface must be free and in the instance's zone; `device_index` (default: the lowest
    free) orders the instance's interfaces. The caller notifies the ids added to `changed`.
    """
    if instance.project_id != p.project:
        raise errors.NotFound(f"Instance {instance.id} not found")
    tx = Tx(s, changed if changed is not None else set())
    current = get_interface(s, p, ref)
    _lock_vpc(tx, current.vpc_id)
    nic = _reload(s, NetworkInterface, current.id)
    if nic is None:
        raise errors.NotFound(f"Network interface {ref} not found")
    if nic.instance_id is not None:
        raise errors.Conflict(f"Network interface {nic.id} is already attached to instance {nic.instance_id}",
                              code="already_attached")
    subnet = s.get(Subnet, nic.subnet_id)
    assert subnet is not None
    if instance.zone_id != subnet.zone_id:
        raise errors.Conflict(f"Network interface {nic.id} is in zone {subnet.zone_id}, instance {instance.id} in "
                              f"{instance.zone_id}: interfaces attach to instances of their subnet's zone",
                              code="different_zone")
    taken = set(s.scalars(select(NetworkInterface.device_index).where(
        NetworkInterface.instance_id == instance.id)))
    if device_index is None:
        free = [i for i in range(MAX_INTERFACES_PER_INSTANCE) if i not in taken]
        if not free:
            raise errors.Conflict(f"Instance {instance.id} has {MAX_INTERFACES_PER_INSTANCE} interfaces already",
                                  code="too_many_interfaces")
        device_index = free[0]
    elif not 0 <= device_index < MAX_INTERFACES_PER_INSTANCE:
        raise _invalid("device_index", f"device_index is 0 to {MAX_INTERFACES_PER_INSTANCE - 1}")
    elif device_index in taken:
        raise errors.Conflict(f"Instance {instance.id} already has an interface at device index {device_index}",
                              code="device_index_in_use")
    nic.instance_id, nic.device_index, nic.host_id = instance.id, device_index, instance.host_id
    nic.attached_at = utcnow()
    s.flush()
    _event(s, "network_interface", "attached", nic, p.user_id, instance_id=instance.id, device_index=device_index)
    return nic


def detach_interface(s: Session, p: Principal, ref: str, changed: set[str] | None = None) -> NetworkInterface:
    tx = Tx(s, changed if changed is not None else set())
    current = get_interface(s, p, ref)
    _lock_vpc(tx, current.vpc_id)
    nic = _reload(s, NetworkInterface, current.id)
    if nic is None:
        raise errors.NotFound(f"Network interface {ref} not found")
    if nic.instance_id is None:
        raise errors.Conflict(f"Network interface {nic.id} is not attached", code="not_attached")
    instance_id = nic.instance_id
    nic.instance_id = nic.device_index = nic.host_id = None
    nic.attached_at = None
    _event(s, "network_interface", "detached", nic, p.user_id, instance_id=instance_id)
    return nic


def interfaces_of_instance(s: Session, instance_id: str) -> list[NetworkInterface]:
    return list(s.scalars(select(NetworkInterface).where(NetworkInterface.instance_id == instance_id)
                          .order_by(NetworkInterface.device_index)))


def place_interfaces(s: Session, instance_id: str, host_id: str | None, changed: set[str] | None = None) -> int:
    """Compute placed (or moved) an instance: its interfaces now live on `host_id`."""
    tx = Tx(s, changed if changed is not None else set())
    nics = interfaces_of_instance(s, instance_id)
    for vpc_id in sorted({n.vpc_id for n in nics}):
        _lock_vpc(tx, vpc_id)
    for nic in nics:
        nic.host_id = host_id
    return len(nics)


def release_instance(s: Session, instance_id: str, actor: str, changed: set[str] | None = None) -> int:
    """Compute deleted an instance (in its transaction): its primary interface (device 0, made with it)
    is deleted, the others are detached and stay the project's. Returns the number of interfaces."""
    tx = Tx(s, changed if changed is not None else set())
    nics = interfaces_of_instance(s, instance_id)
    for vpc_id in sorted({n.vpc_id for n in nics}):
        _lock_vpc(tx, vpc_id)
    for current in nics:
        nic = _reload(s, NetworkInterface, current.id)
        if nic is None or nic.instance_id != instance_id:
            continue
        if nic.device_index == 0:
            _drop_interface(s, nic, actor)
            continue
        nic.instance_id = nic.device_index = nic.host_id = None
        nic.attached_at = None
        _event(s, "network_interface", "detached", nic, actor, instance_id=instance_id)
    return len(nics)


# ==================================================================================================
# Floating IPs
# ==================================================================================================

def floating_ip_query(p: Principal, *, region: str | None = None, attached: bool | None = None,
                      address: str | None = None) -> Select[FloatingIp]:
    stmt = select(FloatingIp).where(FloatingIp.project_id == p.project)
    if region:
        stmt = stmt.where(FloatingIp.region_id == region)
    if address:
        stmt = stmt.where(FloatingIp.address == address)
    if attached is not None:
        busy = or_(FloatingIp.network_interface_id.isnot(None), FloatingIp.nat_gateway_id.isnot(None))
        stmt = stmt.where(busy if attached else ~busy)
    return stmt


def pool_of(region_id: str) -> tuple[ipaddress.IPv4Network, list[ipaddress.IPv4Address]]:
    """The region's pool and the addresses it hands out (not the network, the upstream router, the broadcast)."""
    net = ipaddress.IPv4Network(FLOATING_IP_POOL)
    return net, [a for a in net.hosts() if int(a) != int(net.network_address) + 1]


def _allocate_floating_ip(s: Session, p: Principal, region_id: str, description: str,
                          release_with: str | None = None) -> FloatingIp:
    """A random free address of the pool (not the lowest: a just-released address is seldom handed straight
    to another project); 409 when the pool is exhausted. Counts against the `floating_ips` quota."""
    quotas.claim(s, p.project, "floating_ips", 1)
    _, addresses = pool_of(region_id)
    for _ in range(5):
        used = set(s.scalars(select(FloatingIp.address).where(FloatingIp.region_id == region_id)))
        free = [a for a in addresses if str(a) not in used]
        if not free:
            raise errors.Conflict(f"The floating IP pool of region {region_id} is exhausted", code="pool_exhausted")
        fip = FloatingIp(id=new_id("fip"), project_id=p.project, region_id=region_id, address=str(secrets.choice(free)),
                         description=description, release_with=release_with, created_by=p.user_id)
        try:
            with s.begin_nested():  # a concurrent allocation of the same address loses here and draws again
                s.add(fip)
        except IntegrityError:
            continue
        _event(s, "floating_ip", "allocated", fip, p.user_id, address=fip.address, region=region_id)
        return fip
    raise errors.Conflict("Too many floating IPs are being allocated at once: retry", code="busy",
                          headers={"Retry-After": "1"})


def allocate_floating_ip(p: Principal, *, region: str | None = None, description: str = "") -> FloatingIp:
    with _change() as tx:
        return _allocate_floating_ip(tx.s, p, _region(tx.s, region), description)


def _attach_fip(s: Session, fip: FloatingIp, nic: NetworkInterface, actor: str) -> None:
    fip.network_interface_id, fip.vpc_id, fip.attached_at = nic.id, nic.vpc_id, utcnow()
    s.flush()
    _event(s, "floating_ip", "attached", fip, actor, address=fip.address, network_interface_id=nic.id,
           private_ip=nic.private_ip)


def _detach_fip(s: Session, fip: FloatingIp, actor: str) -> None:
    previous = fip.network_interface_id
    fip.network_interface_id = fip.vpc_id = fip.attached_at = None
    fip.release_with = None  # detached, it is the project's to keep or release
    s.flush()
    _event(s, "floating_ip", "detached", fip, actor, address=fip.address, network_interface_id=previous)


def _release_fip(s: Session, fip: FloatingIp, actor: str) -> None:
    s.delete(fip)
    quotas.release(s, fip.project_id, "floating_ips", 1)
    _event(s, "floating_ip", "released", fip, actor, address=fip.address)


def attach_floating_ip(p: Principal, ref: str, interface: str) -> FloatingIp:
    with _change() as tx:
        s = tx.s
        fip = get_floating_ip(s, p, ref)
        nic = get_interface(s, p, interface)
        vpc_ids = sorted({nic.vpc_id} | ({fip.vpc_id} if fip.vpc_id else set()))
        vpcs = {v: _lock_vpc(tx, v) for v in vpc_ids}  # in id order: no deadlock between two such moves
        fip, nic = _reload(s, FloatingIp, fip.id, lock=True), _reload(s, NetworkInterface, nic.id)  # type: ignore[assignment]
        if fip is None or nic is None:
            raise errors.NotFound(f"Floating IP {ref} or network interface {interface} not found")
        if fip.nat_gateway_id is not None:
            raise errors.Conflict(f"Floating IP {fip.address} is the address of NAT gateway {fip.nat_gateway_id}",
                                  code="in_use")
        if fip.network_interface_id == nic.id:
            return fip
        if fip.network_interface_id is not None:
            raise errors.Conflict(f"Floating IP {fip.address} is attached to {fip.network_interface_id}: detach it "
                                  "first", code="already_attached")
        vpc = vpcs[nic.vpc_id]
        if fip.region_id != vpc.region_id:
            raise errors.Conflict(f"Floating IP {fip.address} is of region {fip.region_id}, the interface's VPC is "
                                  f"in {vpc.region_id}", code="different_region")
        holder = s.scalar(select(FloatingIp.address).where(FloatingIp.network_interface_id == nic.id))
        if holder:
            raise errors.Conflict(f"Network interface {nic.id} already has floating IP {holder}",
                                  code="already_attached")
        subnet = s.get(Subnet, nic.subnet_id)
        assert subnet is not None
        _public_route(s, vpc, subnet)
        _attach_fip(s, fip, nic, p.user_id)
    return fip


def detach_floating_ip(p: Principal, ref: str) -> FloatingIp:
    with _change() as tx:
        s = tx.s
        fip = get_floating_ip(s, p, ref)
        if fip.nat_gateway_id is not None:
            raise errors.Conflict(f"Floating IP {fip.address} is the address of NAT gateway {fip.nat_gateway_id}: "
                                  "delete the gateway", code="in_use")
        if fip.vpc_id is None:
            raise errors.Conflict(f"Floating IP {fip.address} is not attached", code="not_attached")
        _lock_vpc(tx, fip.vpc_id)
        fip = _reload(s, FloatingIp, fip.id, lock=True)  # type: ignore[assignment]
        if fip is None:
            raise errors.NotFound(f"Floating IP {ref} not found")
        if fip.network_interface_id is None:
            raise errors.Conflict(f"Floating IP {fip.address} is not attached", code="not_attached")
        _detach_fip(s, fip, p.user_id)
    return fip


def release_floating_ip(p: Principal, ref: str) -> FloatingIp:
    """409 while attached: releasing an address in use would cut traffic the owner may not expect to lose."""
    with _change() as tx:
        s = tx.s
        # locked: an attach committing meanwhile (it locks the address too) is seen, not overwritten
        locked = _reload(s, FloatingIp, get_floating_ip(s, p, ref).id, lock=True)
        if locked is None:
            raise errors.NotFound(f"Floating IP {ref} not found")
        fip = locked
        if fip.nat_gateway_id is not None:
            raise errors.Conflict(f"Floating IP {fip.address} is the address of NAT gateway {fip.nat_gateway_id}",
                                  code="in_use")
        if fip.network_interface_id is not None:
            raise errors.Conflict(f"Floating IP {fip.address} is attached to {fip.network_interface_id}: detach it "
                                  "first", code="in_use")
        _release_fip(s, fip, p.user_id)
    return fip


def update_floating_ip(p: Principal, ref: str, *, description: str | None = None) -> FloatingIp:
    with _change() as tx:
        fip = get_floating_ip(tx.s, p, ref)
        if description is not None:
            fip.description = description
    return fip


# ==================================================================================================
# NAT gateways
# ==================================================================================================

def nat_query(p: Principal, *, vpc_id: str | None = None, subnet_id: str | None = None) -> Select[NatGateway]:
    stmt = select(NatGateway).where(NatGateway.project_id == p.project)
    if vpc_id:
        stmt = stmt.where(NatGateway.vpc_id == vpc_id)
    if subnet_id:
        stmt = stmt.where(NatGateway.subnet_id == subnet_id)
    return stmt


def create_nat_gateway(p: Principal, *, subnet: str, floating_ip: str | None = None, name: str = "") -> NatGateway:
    with _change() as tx:
        s = tx.s
        sub = get_subnet(s, p, subnet)
        vpc = _lock_vpc(tx, sub.vpc_id)
        sub = ipam.lock_subnet(s, sub.id)
        if not sub.public:
            raise errors.Conflict(f"Subnet {sub.id} is private: a NAT gateway lives in a public subnet",
                                  code="subnet_not_public")
        nat_id = new_id("nat")
        if floating_ip is not None:
            fip = get_floating_ip(s, p, floating_ip)
            if fip.vpc_id is not None and fip.vpc_id != vpc.id:
                _lock_vpc(tx, fip.vpc_id)
            fip = _reload(s, FloatingIp, fip.id, lock=True)  # type: ignore[assignment]
            if fip is None:
                raise errors.NotFound(f"Floating IP {floating_ip} not found")
            if fip.network_interface_id is not None or fip.nat_gateway_id is not None:
                raise errors.Conflict(f"Floating IP {fip.address} is in use by "
                                      f"{fip.network_interface_id or fip.nat_gateway_id}", code="in_use")
            if fip.region_id != vpc.region_id:
                raise errors.Conflict(f"Floating IP {fip.address} is of region {fip.region_id}, the subnet's VPC is "
                                      f"in {vpc.region_id}", code="different_region")
        else:
            fip = _allocate_floating_ip(s, p, vpc.region_id, f"Address of NAT gateway {nat_id}", release_with=nat_id)
        address = ipam.allocate(s, sub, owner_kind="nat_gateway", owner_id=nat_id)
        nat = NatGateway(id=nat_id, project_id=p.project, vpc_id=vpc.id, subnet_id=sub.id, name=name,
                         floating_ip_id=fip.id, private_ip=address, created_by=p.user_id)
        s.add(nat)
        s.flush()
        fip.nat_gateway_id, fip.vpc_id, fip.attached_at = nat.id, vpc.id, utcnow()
        _event(s, "nat_gateway", "created", nat, p.user_id, vpc_id=vpc.id, subnet_id=sub.id, private_ip=address,
               public_ip=fip.address)
    return nat


def delete_nat_gateway(p: Principal, ref: str) -> NatGateway:
    with _change() as tx:
        s = tx.s
        current = get_nat_gateway(s, p, ref)
        _lock_vpc(tx, current.vpc_id)
        nat = _reload(s, NatGateway, current.id)
        if nat is None:
            raise errors.NotFound(f"NAT gateway {ref} not found")
        fip = s.get(FloatingIp, nat.floating_ip_id)
        if fip is not None:
            if fip.release_with == nat.id:
                _release_fip(s, fip, p.user_id)
            else:
                fip.nat_gateway_id = fip.vpc_id = fip.attached_at = None
        ipam.release(s, nat.subnet_id, nat.private_ip)
        s.delete(nat)
        _event(s, "nat_gateway", "deleted", nat, p.user_id, vpc_id=nat.vpc_id)
    return nat


def nat_public_ips(s: Session, nats: list[NatGateway]) -> dict[str, str]:
    if not nats:
        return {}
    return {fid: address for fid, address in s.execute(select(FloatingIp.id, FloatingIp.address).where(
        FloatingIp.id.in_([n.floating_ip_id for n in nats])))}


# ==================================================================================================
# Flow logs
# ==================================================================================================

def flow_log_query(p: Principal, *, vpc_id: str | None = None,
                   resource_id: str | None = None) -> Select[FlowLog]:
    stmt = select(FlowLog).where(FlowLog.project_id == p.project)
    if vpc_id:
        stmt = stmt.where(FlowLog.vpc_id == vpc_id)
    if resource_id:
        stmt = stmt.where(FlowLog.resource_id == resource_id)
    return stmt


def create_flow_log(p: Principal, *, resource: str, traffic_type: str = ALL, name: str = "") -> FlowLog:
    with _change() as tx:
        s = tx.s
        target: Vpc | Subnet | NetworkInterface
        if resource.startswith("vpc-"):
            target, kind = get_vpc(s, p, resource), "vpc"
            vpc_id = target.id
        elif resource.startswith("subnet-"):
            target, kind = get_subnet(s, p, resource), "subnet"
            vpc_id = target.vpc_id
        elif resource.startswith("nic-"):
            target, kind = get_interface(s, p, resource), "network_interface"
            vpc_id = target.vpc_id
        else:
            raise _invalid("resource", "A flow log captures a VPC (vpc-…), a subnet (subnet-…) or a network "
                                       "interface (nic-…): give its id")
        _lock_vpc(tx, vpc_id)
        if _reload(s, type(target), target.id) is None:  # deleted while we waited for the lock
            raise errors.NotFound(f"{resource} not found")
        quotas.claim(s, p.project, "flow_logs", 1)
        fl = FlowLog(id=new_id("fl"), project_id=p.project, vpc_id=vpc_id, name=name, resource_type=kind,
                     resource_id=target.id, traffic_type=traffic_type, created_by=p.user_id)
        s.add(fl)
        s.flush()
        _event(s, "flow_log", "created", fl, p.user_id, resource_type=kind, resource_id=target.id,
               traffic_type=traffic_type)
    return fl


def _drop_flow_log(s: Session, fl: FlowLog, actor: str) -> None:
    """Its records stay until the retention purge takes them (a bulk delete has no place in a request)."""
    s.delete(fl)
    quotas.release(s, fl.project_id, "flow_logs", 1)
    _event(s, "flow_log", "deleted", fl, actor, resource_id=fl.resource_id)


def delete_flow_log(p: Principal, ref: str) -> FlowLog:
    with _change() as tx:
        s = tx.s
        fl = get_flow_log(s, p, ref)
        _lock_vpc(tx, fl.vpc_id)
        _drop_flow_log(s, fl, p.user_id)
    return fl


@dataclass
class RecordFilter:
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    action: str | None = None
    interface_id: str | None = None
    address: str | None = None  # source or destination
    port: int | None = None  # source or destination
    protocol: str | None = None


def record_query(fl: FlowLog, f: RecordFilter) -> Select[FlowLogRecord]:
    stmt = select(FlowLogRecord).where(FlowLogRecord.flow_log_id == fl.id)
    if f.since is not None:
        stmt = stmt.where(FlowLogRecord.start_time >= f.since)
    if f.until is not None:
        stmt = stmt.where(FlowLogRecord.start_time < f.until)
    if f.action:
        stmt = stmt.where(FlowLogRecord.action == f.action)
    if f.interface_id:
        stmt = stmt.where(FlowLogRecord.interface_id == f.interface_id)
    if f.address:
        stmt = stmt.where(or_(FlowLogRecord.src_addr == f.address, FlowLogRecord.dst_addr == f.address))
    if f.port is not None:
        stmt = stmt.where(or_(FlowLogRecord.src_port == f.port, FlowLogRecord.dst_port == f.port))
    if f.protocol:
        stmt = stmt.where(FlowLogRecord.protocol == f.protocol)
    return stmt


@dataclass
class Flow:
    """One flow as an agent saw it (nftables log group) on an interface."""

    interface_id: str
    direction: str  # ingress | egress, seen from the interface
    action: str  # ACCEPT | REJECT
    protocol: str
    src_addr: str
    dst_addr: str
    start_time: dt.datetime
    src_port: int | None = None
    dst_port: int | None = None
    packets: int = 1
    bytes: int = 0
    end_time: dt.datetime | None = None


_B32 = "0123456789abcdefghjkmnpqrstvwxyz"  # core.ids' alphabet


def _record_id(start: dt.datetime) -> str:
    """Time-sortable by the flow's start rather than its arrival: pages of records run in time order."""
    millis = int(start.timestamp() * 1000) & ((1 << 48) - 1)
    stamp = "".join(_B32[(millis >> (5 * i)) & 31] for i in reversed(range(10)))
    return f"flr-{stamp}{new_id('flr')[-16:]}"  # and the 80 random bits of a fresh id


def ingest_flows(flows: Iterable[Flow]) -> int:
    """Agent side: store each flow under every flow log that covers its interface (the interface's, its
    subnet's, its VPC's) and wants its action. Returns the number of records written."""
    flows = list(flows)
    if not flows:
        return 0
    written = 0
    with session_scope() as s:
        nic_ids = sorted({f.interface_id for f in flows})
        nics = {n.id: n for n in s.scalars(select(NetworkInterface).where(NetworkInterface.id.in_(nic_ids)))}
        scopes = set(nics) | {n.subnet_id for n in nics.values()} | {n.vpc_id for n in nics.values()}
        logs: dict[str, list[FlowLog]] = {}
        for fl in list(s.scalars(select(FlowLog).where(FlowLog.resource_id.in_(sorted(scopes))))):
            logs.setdefault(fl.resource_id, []).append(fl)
        for f in flows:
            nic = nics.get(f.interface_id)
            if nic is None:
                continue  # deleted since: nothing captures it any more
            for fl in logs.get(nic.id, []) + logs.get(nic.subnet_id, []) + logs.get(nic.vpc_id, []):
                if fl.traffic_type not in (ALL, f.action):
                    continue
                s.add(FlowLogRecord(id=_record_id(f.start_time), flow_log_id=fl.id, project_id=fl.project_id,
                                    interface_id=nic.id, direction=f.direction, action=f.action,
                                    protocol=f.protocol, src_addr=f.src_addr, src_port=f.src_port,
                                    dst_addr=f.dst_addr, dst_port=f.dst_port, packets=f.packets, bytes=f.bytes,
                                    start_time=f.start_time, end_time=f.end_time or f.start_time))
                written += 1
    return written


def purge_flow_records(now: dt.datetime | None = None) -> int:
    """Delete records older than RETENTION_DAYS and records of deleted flow logs, a batch at a time."""
    cutoff = (now or utcnow()) - dt.timedelta(days=RETENTION_DAYS)
    total = 0
    while True:
        with session_scope() as s:
            ids = list(s.scalars(select(FlowLogRecord.id).where(or_(
                FlowLogRecord.start_time < cutoff,
                ~select(FlowLog.id).where(FlowLog.id == FlowLogRecord.flow_log_id).exists())).limit(PURGE_BATCH)))
            if ids:
                s.execute(delete(FlowLogRecord).where(FlowLogRecord.id.in_(ids)))
        total += len(ids)
        if len(ids) < PURGE_BATCH:
            return total


def loops() -> list[Loop]:
    from hackboot.network import instances

    return [Loop("network-flow-retention", purge_flow_records, 3600.0),
            Loop("network-release-deleted-instances", instances.release_deleted_instances, 60.0)]


# ==================================================================================================
# The agent's side: desired state of a VPC, observed versions, statuses
# ==================================================================================================

@dataclass
class VpcState:
    """Everything a host agent needs to render one VPC, read in one transaction (plain rows, detached)."""

    vpc: Vpc
    dns_domain: str
    subnets: list[Subnet]
    interfaces: list[NetworkInterface]
    interface_groups: dict[str, list[str]]
    groups: list[SecurityGroup]
    rules: list[SecurityGroupRule]
    floating_ips: list[FloatingIp]
    nat_gateways: list[NatGateway]
    subnet_nat: dict[str, str | None]  # private subnet id → the NAT gateway its traffic leaves through
    flow_logs: list[FlowLog]


def vpc_state(vpc_id: str) -> VpcState | None:
    """The desired state of a live VPC (None once deleted: the agent removes what it has of it)."""
    with session_scope(write=False) as s:
        vpc = s.get(Vpc, vpc_id)
        if vpc is None or vpc.status == DELETED:
            return None
        subnets = list(s.scalars(select(Subnet).where(Subnet.vpc_id == vpc_id).order_by(Subnet.id)))
        nics = list(s.scalars(select(NetworkInterface).where(NetworkInterface.vpc_id == vpc_id)
                              .order_by(NetworkInterface.id)))
        return VpcState(
            vpc=vpc, dns_domain=dns_domain(vpc), subnets=subnets, interfaces=nics,
            interface_groups=groups_of(s, [n.id for n in nics]),
            groups=list(s.scalars(select(SecurityGroup).where(SecurityGroup.vpc_id == vpc_id)
                                  .order_by(SecurityGroup.id))),
            rules=list(s.scalars(select(SecurityGroupRule).where(SecurityGroupRule.vpc_id == vpc_id)
                                 .order_by(SecurityGroupRule.id))),
            floating_ips=list(s.scalars(select(FloatingIp).where(FloatingIp.vpc_id == vpc_id).order_by(FloatingIp.id))),
            nat_gateways=list(s.scalars(select(NatGateway).where(NatGateway.vpc_id == vpc_id).order_by(NatGateway.id))),
            subnet_nat={x.id: (n.id if (n := nat_for_subnet(s, x)) else None) for x in subnets if not x.public},
            flow_logs=list(s.scalars(select(FlowLog).where(FlowLog.vpc_id == vpc_id).order_by(FlowLog.id))),
        )


def vpcs_to_reconcile() -> list[tuple[str, int, int]]:
    """(VPC id, desired, observed) of live VPCs whose desired version is not applied yet."""
    with session_scope(write=False) as s:
        return [(i, d, o) for i, d, o in s.execute(
            select(Vpc.id, Vpc.desired_version, Vpc.observed_version)
            .where(Vpc.status != DELETED, Vpc.observed_version < Vpc.desired_version).order_by(Vpc.id))]


def observed(vpc_id: str, version: int, *, error: str | None = None) -> bool:
    """Agent: `version` of the VPC is applied (or failed with `error`). Never moves backwards (CAS).

    Marks the VPC and its pending subnets, interfaces, NAT gateways and flow logs active (or the
    VPC in error with the reason). False when a newer version was recorded, or the VPC is gone.
    """
    with session_scope() as s:
        values: dict[str, Any] = {"observed_version": version}
        values.update({"status": "error", "status_reason": error[:500]} if error
                      else {"status": ACTIVE, "status_reason": ""})
        done = s.execute(update(Vpc).where(Vpc.id == vpc_id, Vpc.status != DELETED,
                                           Vpc.observed_version < version, Vpc.desired_version >= version)
                         .values(**values))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return False
        if not error:
            for model in (Subnet, NetworkInterface, NatGateway, FlowLog):
                s.execute(update(model).where(model.vpc_id == vpc_id, model.status == PENDING)
                          .values(status=ACTIVE))
        return True


_STATUS_MODELS: dict[str, Any] = {"subnet": Subnet, "network_interface": NetworkInterface, "nat_gateway": NatGateway,
                                  "flow_log": FlowLog}


def set_status(kind: str, object_id: str, status: str, reason: str = "") -> bool:
    """Agent: the observed status of one subnet, interface, NAT gateway or flow log (e.g. `error` + why)."""
    model = _STATUS_MODELS[kind]
    values: dict[str, Any] = {"status": status}
    if hasattr(model, "status_reason"):
        values["status_reason"] = reason[:500]
    with session_scope() as s:
        return bool(s.execute(update(model).where(model.id == object_id).values(**values)).rowcount)  # type: ignore[attr-defined]


def _register_with_compute() -> None:
    """Compute reaches instances' interfaces through hooks (this service depends on compute, not the reverse)."""
    from hackboot.network import instances

    instances.register()


_register_with_compute()
