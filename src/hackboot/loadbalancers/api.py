"""HTTP for load balancers: load balancers, listeners (+ rules), pools (+ members), certificates, stats and
access logs."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import select
from sqlalchemy.orm import Session

from hackboot.core.auth import Member, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Description, Name, Out, Timestamp, as_utc, omitted, patch_changes
from hackboot.loadbalancers import service
from hackboot.loadbalancers.models import AccessLogRecord, Certificate, Listener, LoadBalancer, Pool, Rule
from hackboot.loadbalancers.models import Member as PoolMember

router = APIRouter(prefix="/v1", tags=["load balancers"])

Ref = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                           description="An id, or a name")]
Port = Annotated[int, Field(ge=1, le=65535)]
IdFilter = Annotated[str | None, Query(max_length=50)]
Status = Literal["PENDING", "ACTIVE", "ERROR", "DELETING"]
# Printable text without quotes, spaces or control characters: what a host, a path or a URL may hold. The
# service checks each against its exact form.
Token = r"^[!#-&(-~]+$"




# --- load balancers -----------------------------------------------------------------------------------

class LoadBalancerIn(Body):
    name: Name
    subnet: Ref = Field(description="The subnet of its VIP (id or name)")
    internet_facing: bool = Field(False, description="Give it a floating IP (a public subnet, or a VPC with an "
                                                     "internet gateway)")
    security_groups: list[Ref] | None = Field(None, max_length=5, description="Groups of the VIP (default: the "
                                                                              "VPC's default group)")
    description: Description = ""


class LoadBalancerPatch(Body):
    """Fields left out are unchanged; none may be null."""

    name: Name | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()
    security_groups: Annotated[list[Ref], Field(max_length=5)] | SkipJsonSchema[None] = omitted()


class LoadBalancerOut(Out):
    id: str
    name: str
    description: str
    vpc_id: str
    subnet_id: str
    zone_id: str
    internet_facing: bool
    network_interface_id: str | None
    vip: str = Field(description="Its private address in the subnet")
    public_ip: str | None = None
    security_group_ids: list[str] = Field(default_factory=list)
    host_id: str
    status: str = Field(description="PENDING until its proxy runs the desired state, ACTIVE, ERROR, DELETING")
    status_reason: str
    desired_version: int
    applied_version: int
    created_at: dt.datetime
    updated_at: dt.datetime


def _lbs(s: Session, rows: list[LoadBalancer]) -> list[LoadBalancerOut]:
    ips, groups = service.public_ips(s, rows), service.security_groups(s, rows)
    out = []
    for lb in rows:
        item = LoadBalancerOut.model_validate(lb)
        item.public_ip = ips.get(lb.id)
        item.security_group_ids = groups.get(lb.id, [])
        out.append(item)
    return out


def _lb(lb: LoadBalancer) -> LoadBalancerOut:
    with session_scope(write=False) as s:
        return _lbs(s, [lb])[0]


@router.post("/load-balancers", status_code=202, response_model=LoadBalancerOut)
def create_load_balancer(body: LoadBalancerIn, p: Member, response: Response) -> LoadBalancerOut:
    """A load balancer with a VIP in the subnet; PENDING until a host runs its proxy."""
    lb = service.create_lb(p, **body.model_dump())
    response.headers["Location"] = f"/v1/load-balancers/{lb.id}"
    return _lb(lb)


@router.get("/load-balancers", response_model=Page[LoadBalancerOut])
def list_load_balancers(p: Viewer, page: Pagination, name: Annotated[Name | None, Query()] = None,
                        vpc_id: IdFilter = None, subnet_id: IdFilter = None,
                        status: Annotated[Status | None, Query()] = None) -> Page[LoadBalancerOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.lb_query(p, name=name, vpc_id=vpc_id, subnet_id=subnet_id, status=status),
                             LoadBalancer.id, page)
        return Page[LoadBalancerOut](items=_lbs(s, rows), next_cursor=nxt)


@router.get("/load-balancers/{ref}", response_model=LoadBalancerOut)
def get_load_balancer(ref: str, p: Viewer) -> LoadBalancerOut:
    with session_scope(write=False) as s:
        return _lbs(s, [service.get_lb(s, p, ref)])[0]


@router.patch("/load-balancers/{ref}", response_model=LoadBalancerOut)
def update_load_balancer(ref: str, body: LoadBalancerPatch, p: Member) -> LoadBalancerOut:
    return _lb(service.update_lb(p, ref, **patch_changes(body)))


@router.delete("/load-balancers/{ref}", status_code=202, response_model=LoadBalancerOut)
def delete_load_balancer(ref: str, p: Member) -> LoadBalancerOut:
    """Its listeners, rules, pools and members go with it; DELETING until its proxy has stopped."""
    return _lb(service.delete_lb(p, ref))


# --- pools and members --------------------------------------------------------------------------------

class HealthCheckIn(Body):
    protocol: Literal["http", "tcp"] = "tcp"
    path: Annotated[str, Field(max_length=255, pattern=Token)] = Field("/", description="http: the path checked")
    host: Annotated[str, Field(max_length=253, pattern=Token)] | None = Field(None, description="http: Host header")
    expected_codes: Annotated[str, Field(max_length=64, pattern=r"^[0-9,-]+$")] = Field(
        "200-399", description='http: "200", "200,204", "200-399"')
    interval_s: float = Field(5.0, ge=1, le=300, strict=False)
    timeout_s: float = Field(2.0, ge=0.1, le=300, strict=False, description="Less than the interval")
    healthy_threshold: int = Field(2, ge=1, le=10, description="Successes in a row to come back")
    unhealthy_threshold: int = Field(3, ge=1, le=10, description="Failures in a row to be taken out")


class HealthCheckOut(Out):
    protocol: str
    path: str
    host: str | None
    expected_codes: str
    interval_s: float
    timeout_s: float
    healthy_threshold: int
    unhealthy_threshold: int


class PoolIn(Body):
    name: Name
    protocol: Literal["http", "tcp"] = Field("http", description="http pools serve http/https listeners")
    algorithm: Literal["roundrobin", "leastconn", "source"] = "roundrobin"
    sticky: Literal["none", "cookie", "source_ip"] = Field("none", description="cookie: http pools only")
    proxy_protocol: bool = Field(False, description="tcp pools: send a PROXY protocol v2 header to members")
    health_check: HealthCheckIn | None = Field(None, description="None: members are taken as up")


class PoolPatch(Body):
    """Fields left out are unchanged; none may be null."""

    name: Name | SkipJsonSchema[None] = omitted()
    algorithm: Literal["roundrobin", "leastconn", "source"] | SkipJsonSchema[None] = omitted()
    sticky: Literal["none", "cookie", "source_ip"] | SkipJsonSchema[None] = omitted()
    proxy_protocol: bool | SkipJsonSchema[None] = omitted()
    health_check: HealthCheckIn | SkipJsonSchema[None] = omitted()
    remove_health_check: bool | SkipJsonSchema[None] = omitted()


class MemberOut(Out):
    id: str
    pool_id: str
    network_interface_id: str | None
    address: str
    port: int
    weight: int
    admin_state: str
    health: str = Field(description="unknown, up, down, drain or disabled, as the proxy's checks see it")
    health_reason: str
    created_at: dt.datetime
    updated_at: dt.datetime


class PoolOut(Out):
    id: str
    load_balancer_id: str
    name: str
    protocol: str
    algorithm: str
    sticky: str
    proxy_protocol: bool
    health_check: HealthCheckOut | None
    members: list[MemberOut] = Field(default_factory=list)
    created_at: dt.datetime
    updated_at: dt.datetime


class MemberIn(Body):
    network_interface: Ref | None = Field(None, description="An interface of the load balancer's VPC (give this "
                                                            "or an address)")
    address: Annotated[str, Field(max_length=15, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")] | None = Field(
        None, description="An address in the VPC's network")
    port: Port
    weight: int = Field(1, ge=0, le=256, description="0: no new traffic")
    admin_state: Literal["enabled", "drain", "disabled"] = "enabled"


class MemberPatch(Body):
    """Fields left out are unchanged. admin_state drain: existing (and sticky) sessions only, no new ones."""

    weight: Annotated[int, Field(ge=0, le=256)] | SkipJsonSchema[None] = omitted()
    admin_state: Literal["enabled", "drain", "disabled"] | SkipJsonSchema[None] = omitted()


def _pools(s: Session, rows: list[Pool]) -> list[PoolOut]:
    members: dict[str, list[MemberOut]] = {p.id: [] for p in rows}
    if rows:
        for m in s.scalars(select(PoolMember).where(PoolMember.pool_id.in_(list(members))).order_by(PoolMember.id)):
            members[m.pool_id].append(MemberOut.model_validate(m))
    out = []
    for pool in rows:
        item = PoolOut.model_validate(pool)
        item.members = members[pool.id]
        out.append(item)
    return out


def _pool(pool: Pool) -> PoolOut:
    with session_scope(write=False) as s:
        return _pools(s, [pool])[0]


@router.post("/load-balancers/{ref}/pools", status_code=201, response_model=PoolOut)
def create_pool(ref: str, body: PoolIn, p: Member) -> PoolOut:
    fields = body.model_dump()
    return _pool(service.create_pool(p, ref, **fields))


@router.get("/load-balancers/{ref}/pools", response_model=Page[PoolOut])
def list_pools(ref: str, p: Viewer, page: Pagination) -> Page[PoolOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.pool_query(service.get_lb(s, p, ref)), Pool.id, page)
        return Page[PoolOut](items=_pools(s, rows), next_cursor=nxt)


@router.get("/load-balancers/{ref}/pools/{pool}", response_model=PoolOut)
def get_pool(ref: str, pool: str, p: Viewer) -> PoolOut:
    with session_scope(write=False) as s:
        return _pools(s, [service.get_pool(s, service.get_lb(s, p, ref), pool)])[0]


@router.patch("/load-balancers/{ref}/pools/{pool}", response_model=PoolOut)
def update_pool(ref: str, pool: str, body: PoolPatch, p: Member) -> PoolOut:
    return _pool(service.update_pool(p, ref, pool, **patch_changes(body)))


@router.delete("/load-balancers/{ref}/pools/{pool}", status_code=204)
def delete_pool(ref: str, pool: str, p: Member) -> Response:
    """409 while a listener or a rule forwards to it."""
    service.delete_pool(p, ref, pool)
    return Response(status_code=204)


@router.post("/load-balancers/{ref}/pools/{pool}/members", status_code=201, response_model=MemberOut)
def add_member(ref: str, pool: str, body: MemberIn, p: Member) -> MemberOut:
    return MemberOut.model_validate(service.add_member(p, ref, pool, service.MemberRequest(**body.model_dump())))


@router.get("/load-balancers/{ref}/pools/{pool}/members", response_model=Page[MemberOut])
def list_members(ref: str, pool: str, p: Viewer, page: Pagination) -> Page[MemberOut]:
    with session_scope(write=False) as s:
        found = service.get_pool(s, service.get_lb(s, p, ref), pool)
        rows, nxt = paginate(s, service.member_query(found), PoolMember.id, page)
        return Page[MemberOut](items=[MemberOut.model_validate(m) for m in rows], next_cursor=nxt)


@router.get("/load-balancers/{ref}/pools/{pool}/members/{member_id}", response_model=MemberOut)
def get_member(ref: str, pool: str, member_id: str, p: Viewer) -> MemberOut:
    """With its health as the proxy's checks see it."""
    with session_scope(write=False) as s:
        found = service.get_pool(s, service.get_lb(s, p, ref), pool)
        return MemberOut.model_validate(service.get_member(s, found, member_id))


@router.patch("/load-balancers/{ref}/pools/{pool}/members/{member_id}", response_model=MemberOut)
def update_member(ref: str, pool: str, member_id: str, body: MemberPatch, p: Member) -> MemberOut:
    """Weight and drain apply without a reload."""
    return MemberOut.model_validate(service.update_member(p, ref, pool, member_id, **patch_changes(body)))


@router.delete("/load-balancers/{ref}/pools/{pool}/members/{member_id}", status_code=204)
def remove_member(ref: str, pool: str, member_id: str, p: Member) -> Response:
    service.remove_member(p, ref, pool, member_id)
    return Response(status_code=204)


# --- listeners and rules ------------------------------------------------------------------------------

class ListenerIn(Body):
    protocol: Literal["http", "https", "tcp", "udp"] = Field(description="udp is refused: HAProxy 2.6 does not "
                                                                         "balance it")
    port: Port
    name: Name | None = None
    default_pool: Ref | None = Field(None, description="Where requests no rule matches go (none: 503 / reset)")
    certificates: list[Ref] | None = Field(None, max_length=service.MAX_CERTIFICATES_PER_LISTENER,
                                           description="https: the first is the default, the others by SNI")
    redirect_to_https_port: Port | None = Field(None, description="http: answer 301 to https on this port")
    connection_limit: int | None = Field(None, ge=1, le=1_000_000, description="Concurrent connections")
    connection_rate_limit: int | None = Field(None, ge=1, le=1_000_000,
                                              description="New connections per second per client address")
    request_rate_limit: int | None = Field(None, ge=1, le=1_000_000,
                                           description="http/https: requests per second per client (429 over)")
    idle_timeout_s: float = Field(60.0, ge=1, le=3600, strict=False)


class ListenerPatch(Body):
    """Fields left out are unchanged; none may be null (the protocol is fixed)."""

    name: Name | SkipJsonSchema[None] = omitted()
    port: Port | SkipJsonSchema[None] = omitted()
    default_pool: Ref | SkipJsonSchema[None] = omitted()
    certificates: Annotated[list[Ref], Field(max_length=service.MAX_CERTIFICATES_PER_LISTENER)] | SkipJsonSchema[
        None] = omitted()
    redirect_to_https_port: Port | SkipJsonSchema[None] = omitted()
    connection_limit: Annotated[int, Field(ge=1, le=1_000_000)] | SkipJsonSchema[None] = omitted()
    connection_rate_limit: Annotated[int, Field(ge=1, le=1_000_000)] | SkipJsonSchema[None] = omitted()
    request_rate_limit: Annotated[int, Field(ge=1, le=1_000_000)] | SkipJsonSchema[None] = omitted()
    idle_timeout_s: Annotated[float, Field(ge=1, le=3600, strict=False)] | SkipJsonSchema[None] = omitted()


class ListenerOut(Out):
    id: str
    load_balancer_id: str
    name: str
    protocol: str
    port: int
    default_pool_id: str | None
    certificate_ids: list[str] = Field(default_factory=list)
    redirect_to_https_port: int | None
    connection_limit: int | None
    connection_rate_limit: int | None
    request_rate_limit: int | None
    idle_timeout_s: float
    created_at: dt.datetime
    updated_at: dt.datetime


class RuleIn(Body):
    priority: int = Field(ge=1, le=50_000, description="Unique per listener; the lowest matching rule wins")
    action: Literal["forward", "redirect", "fixed_response"]
    host: Annotated[str, Field(max_length=253, pattern=Token)] | None = Field(
        None, description='A DNS name or "*.suffix"')
    path_prefix: Annotated[str, Field(max_length=255, pattern=Token)] | None = Field(None, description='"/api/"')
    pool: Ref | None = Field(None, description="forward: an http pool of the load balancer")
    redirect_url: Annotated[str, Field(max_length=2048, pattern=Token)] | None = Field(
        None, description="redirect: an absolute http(s) URL")
    redirect_code: Literal[301, 302, 303, 307, 308] = 302
    status_code: int = Field(200, ge=200, le=599, description="fixed_response")
    content_type: Annotated[str, Field(max_length=127)] = "text/plain"
    body: Annotated[str, Field(max_length=service.MAX_BODY_BYTES)] = Field("", description="fixed_response, "
                                                                                          "at most 1 KiB")


class RuleOut(Out):
    id: str
    listener_id: str
    priority: int
    action: str
    host: str | None
    path_prefix: str | None
    pool_id: str | None
    redirect_url: str | None
    redirect_code: int
    status_code: int
    content_type: str
    body: str
    created_at: dt.datetime


def _listeners(s: Session, rows: list[Listener]) -> list[ListenerOut]:
    certs = service.certificates_of(s, [x.id for x in rows])
    out = []
    for x in rows:
        item = ListenerOut.model_validate(x)
        item.certificate_ids = certs[x.id]
        out.append(item)
    return out


def _listener(x: Listener) -> ListenerOut:
    with session_scope(write=False) as s:
        return _listeners(s, [x])[0]


@router.post("/load-balancers/{ref}/listeners", status_code=201, response_model=ListenerOut)
def create_listener(ref: str, body: ListenerIn, p: Member) -> ListenerOut:
    """A port of the VIP: 409 when the load balancer listens on it already."""
    req = service.ListenerRequest(**(body.model_dump() | {"name": body.name or ""}))
    return _listener(service.create_listener(p, ref, req))


@router.get("/load-balancers/{ref}/listeners", response_model=Page[ListenerOut])
def list_listeners(ref: str, p: Viewer, page: Pagination) -> Page[ListenerOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.listener_query(service.get_lb(s, p, ref)), Listener.id, page)
        return Page[ListenerOut](items=_listeners(s, rows), next_cursor=nxt)


@router.get("/load-balancers/{ref}/listeners/{listener}", response_model=ListenerOut)
def get_listener(ref: str, listener: str, p: Viewer) -> ListenerOut:
    with session_scope(write=False) as s:
        return _listeners(s, [service.get_listener(s, service.get_lb(s, p, ref), listener)])[0]


@router.patch("/load-balancers/{ref}/listeners/{listener}", response_model=ListenerOut)
def update_listener(ref: str, listener: str, body: ListenerPatch, p: Member) -> ListenerOut:
    return _listener(service.update_listener(p, ref, listener, **patch_changes(body)))


@router.delete("/load-balancers/{ref}/listeners/{listener}", status_code=204)
def delete_listener(ref: str, listener: str, p: Member) -> Response:
    """Its rules go with it."""
    service.delete_listener(p, ref, listener)
    return Response(status_code=204)


@router.post("/load-balancers/{ref}/listeners/{listener}/rules", status_code=201, response_model=RuleOut)
def create_rule(ref: str, listener: str, body: RuleIn, p: Member) -> RuleOut:
    return RuleOut.model_validate(service.create_rule(p, ref, listener, service.RuleRequest(**body.model_dump())))


@router.get("/load-balancers/{ref}/listeners/{listener}/rules", response_model=Page[RuleOut])
def list_rules(ref: str, listener: str, p: Viewer, page: Pagination) -> Page[RuleOut]:
    with session_scope(write=False) as s:
        found = service.get_listener(s, service.get_lb(s, p, ref), listener)
        rows, nxt = paginate(s, service.rule_query(found), Rule.id, page)
        return Page[RuleOut](items=[RuleOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/load-balancers/{ref}/listeners/{listener}/rules/{rule_id}", response_model=RuleOut)
def get_rule(ref: str, listener: str, rule_id: str, p: Viewer) -> RuleOut:
    with session_scope(write=False) as s:
        found = service.get_listener(s, service.get_lb(s, p, ref), listener)
        return RuleOut.model_validate(service.get_rule(s, found, rule_id))


@router.delete("/load-balancers/{ref}/listeners/{listener}/rules/{rule_id}", status_code=204)
def delete_rule(ref: str, listener: str, rule_id: str, p: Member) -> Response:
    service.delete_rule(p, ref, listener, rule_id)
    return Response(status_code=204)


# --- stats and access logs ----------------------------------------------------------------------------

class CountersOut(Out):
    requests: int = 0
    errors: int = 0
    active_connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    response_time_ms: float = 0.0


class StatsOut(Out):
    load_balancer_id: str
    updated_at: dt.datetime | None = Field(description="When the agent read them (None: not yet)")
    listeners: dict[str, CountersOut] = Field(default_factory=dict)
    pools: dict[str, CountersOut] = Field(default_factory=dict)
    members: dict[str, CountersOut] = Field(default_factory=dict)


class AccessLogOut(Out):
    id: str
    time: dt.datetime
    listener_id: str
    client: str
    pool_id: str | None
    member_id: str | None
    method: str | None
    path: str | None
    status: int | None
    duration_ms: int
    bytes_out: int


def _counters(value: Any) -> dict[str, CountersOut]:
    if not isinstance(value, dict):
        return {}
    return {str(k): CountersOut.model_validate(v) for k, v in value.items() if isinstance(v, dict)}


@router.get("/load-balancers/{ref}/stats", response_model=StatsOut)
def get_stats(ref: str, p: Viewer) -> StatsOut:
    """Counters per listener, pool and member, as the load balancer's agent last read them."""
    with session_scope(write=False) as s:
        lb = service.get_lb(s, p, ref)
        row = service.get_stats(s, lb)
        data = row.stats if row else {}
        return StatsOut(load_balancer_id=lb.id, updated_at=row.updated_at if row else None,
                        listeners=_counters(data.get("listeners")), pools=_counters(data.get("pools")),
                        members=_counters(data.get("members")))


@router.get("/load-balancers/{ref}/logs", response_model=Page[AccessLogOut])
def list_logs(ref: str, p: Viewer, page: Pagination,
              since: Annotated[Timestamp | None, Query(description="Records at or after")] = None,
              status: Annotated[int | None, Query(ge=100, le=599, description="HTTP status")] = None,
              listener_id: IdFilter = None) -> Page[AccessLogOut]:
    """Access logs, oldest first (the newest 10 000 per load balancer are kept, at most 7 days)."""
    with session_scope(write=False) as s:
        lb = service.get_lb(s, p, ref)
        rows, nxt = paginate(s, service.log_query(lb, since=as_utc(since), status=status, listener_id=listener_id),
                             AccessLogRecord.id, page)
        return Page[AccessLogOut](items=[AccessLogOut.model_validate(r) for r in rows], next_cursor=nxt)


# --- certificates -------------------------------------------------------------------------------------

class CertificateIn(Body):
    chain_pem: Annotated[str, Field(min_length=1, max_length=64 * 1024)] = Field(
        description="PEM certificates: the leaf first, then each issuer")
    key_pem: Annotated[str, Field(min_length=1, max_length=64 * 1024)] = Field(
        description="The leaf's private key, PEM, unencrypted (stored sealed, never returned)")
    name: Name | None = None


class CertificateOut(Out):
    id: str
    name: str
    names: list[str] = Field(description="DNS names it serves (subject alternative names)")
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str
    created_at: dt.datetime


@router.post("/certificates", status_code=201, response_model=CertificateOut)
def upload_certificate(body: CertificateIn, p: Member, response: Response) -> CertificateOut:
    """422 when the chain does not parse, is out of order, expired, or the key is weak or not the leaf's."""
    cert = service.upload_certificate(p, chain_pem=body.chain_pem, key_pem=body.key_pem, name=body.name)
    response.headers["Location"] = f"/v1/certificates/{cert.id}"
    return CertificateOut.model_validate(cert)


@router.get("/certificates", response_model=Page[CertificateOut])
def list_certificates(p: Viewer, page: Pagination,
                      name: Annotated[Name | None, Query()] = None) -> Page[CertificateOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.certificate_query(p, name=name), Certificate.id, page)
        return Page[CertificateOut](items=[CertificateOut.model_validate(c) for c in rows], next_cursor=nxt)


@router.get("/certificates/{ref}", response_model=CertificateOut)
def get_certificate(ref: str, p: Viewer) -> CertificateOut:
    with session_scope(write=False) as s:
        return CertificateOut.model_validate(service.get_certificate(s, p, ref))


@router.delete("/certificates/{ref}", status_code=204)
def delete_certificate(ref: str, p: Member) -> Response:
    """409 while a listener serves it."""
    service.delete_certificate(p, ref)
    return Response(status_code=204)
