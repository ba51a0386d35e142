"""HTTP for VPC networking: VPCs, subnets, network interfaces, security groups (+ rules), floating IPs,
NAT gateways, flow logs (+ their records)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy.orm import Session

from hackboot.core.auth import Member, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Description, Name, Out, Timestamp, as_utc, omitted, patch_changes
from hackboot.network import service
from hackboot.network.models import (
    FloatingIp,
    FlowLog,
    FlowLogRecord,
    NatGateway,
    NetworkInterface,
    SecurityGroup,
    Subnet,
    Vpc,
)

router = APIRouter(prefix="/v1", tags=["network"])

Cidr = Annotated[str, Field(max_length=18, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$",
                            examples=["10.0.0.0/16"])]
Ipv4 = Annotated[str, Field(max_length=15, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$", examples=["10.0.1.10"])]
Ref = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
                           description="An id, or a name")]
IdFilter = Annotated[str | None, Query(max_length=50)]
RegionId = Annotated[str, Field(max_length=16, pattern=r"^[A-Za-z0-9-]{1,16}$")]
ZoneId = Annotated[str, Field(max_length=24, pattern=r"^[A-Za-z0-9-]{1,24}$")]
Status = Literal["pending", "active", "error"]




def _location(response: Response, path: str) -> None:
    response.headers["Location"] = f"/v1/{path}"


# --- VPCs ---------------------------------------------------------------------------------------------

class VpcIn(Body):
    name: Name
    cidr: Cidr = Field(description="RFC 1918 network, /16 to /28")
    region: RegionId | None = Field(None, description="Default: this cloud's region")
    description: Description = ""
    internet_gateway: bool = Field(False, description="Route public subnets and floating IPs to the internet")


class VpcPatch(Body):
    """Fields left out are unchanged; none may be null."""

    name: Name | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()
    internet_gateway: bool | SkipJsonSchema[None] = omitted()


class DefaultVpcIn(Body):
    region: RegionId | None = None


class VpcOut(Out):
    id: str
    name: str
    description: str
    region_id: str
    cidr: str
    vni: int = Field(description="VXLAN network identifier of the VPC's overlay")
    is_default: bool
    internet_gateway: bool
    dns_domain: str = Field("", description="Interfaces resolve as <name>.<dns_domain>")
    status: str
    status_reason: str
    desired_version: int
    observed_version: int
    created_at: dt.datetime
    updated_at: dt.datetime


def _vpc(v: Vpc) -> VpcOut:
    out = VpcOut.model_validate(v)
    out.dns_domain = service.dns_domain(v)
    return out


@router.post("/vpcs", status_code=202, response_model=VpcOut)
def create_vpc(body: VpcIn, p: Member, response: Response) -> VpcOut:
    """Create a VPC with its default security group; 202 until the agents have built it."""
    v = service.create_vpc(p, **body.model_dump())
    _location(response, f"vpcs/{v.id}")
    return _vpc(v)


# Not under /vpcs/: /vpcs/default is the default VPC by name (GET, PATCH, DELETE like any VPC).
@router.post("/default-vpc", response_model=VpcOut)
def default_vpc(p: Member, body: DefaultVpcIn | None = None) -> VpcOut:
    """The project's default VPC of the region (172.31.0.0/16, a public /20 per zone), made on first use."""
    return _vpc(service.create_default_vpc(p, body.region if body else None))


@router.get("/vpcs", response_model=Page[VpcOut])
def list_vpcs(p: Viewer, page: Pagination, name: Annotated[Name | None, Query()] = None,
              region: Annotated[str | None, Query(max_length=16)] = None,
              is_default: Annotated[bool | None, Query()] = None,
              status: Annotated[Status | None, Query()] = None) -> Page[VpcOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.vpc_query(p, name=name, region=region, is_default=is_default, status=status),
                             Vpc.id, page)
        return Page[VpcOut](items=[_vpc(r) for r in rows], next_cursor=nxt)


@router.get("/vpcs/{ref}", response_model=VpcOut)
def get_vpc(ref: str, p: Viewer) -> VpcOut:
    with session_scope(write=False) as s:
        return _vpc(service.get_vpc(s, p, ref))


@router.patch("/vpcs/{ref}", response_model=VpcOut)
def update_vpc(ref: str, body: VpcPatch, p: Member) -> VpcOut:
    return _vpc(service.update_vpc(p, ref, **patch_changes(body)))


@router.delete("/vpcs/{ref}", status_code=204)
def delete_vpc(ref: str, p: Member) -> Response:
    """409 while subnets, NAT gateways or security groups other than the default one remain."""
    service.delete_vpc(p, ref)
    return Response(status_code=204)


# --- subnets ------------------------------------------------------------------------------------------

class SubnetIn(Body):
    vpc: Ref
    cidr: Cidr = Field(description="Inside the VPC's network, /28 at most, overlapping no other subnet")
    zone: ZoneId | None = Field(None, description="A zone of the VPC's region (default: this cloud's zone)")
    name: Name | None = None
    description: Description = ""
    public: bool = Field(False, description="Routed to the internet (floating IPs, NAT gateways live here)")


class SubnetPatch(Body):
    """Fields left out are unchanged; none may be null."""

    name: Name | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()
    public: bool | SkipJsonSchema[None] = omitted()


class SubnetOut(Out):
    id: str
    vpc_id: str
    zone_id: str
    name: str
    description: str
    cidr: str
    public: bool
    gateway_ip: str
    dns_ip: str
    available_ips: int = 0
    status: str
    status_reason: str
    created_at: dt.datetime
    updated_at: dt.datetime


def _subnets(s: Session, rows: list[Subnet]) -> list[SubnetOut]:
    free = service.free_addresses(s, rows)
    out = []
    for r in rows:
        item = SubnetOut.model_validate(r)
        item.available_ips = free[r.id]
        out.append(item)
    return out


def _subnet(r: Subnet) -> SubnetOut:
    with session_scope(write=False) as s:
        return _subnets(s, [r])[0]


@router.post("/subnets", status_code=202, response_model=SubnetOut)
def create_subnet(body: SubnetIn, p: Member, response: Response) -> SubnetOut:
    r = service.create_subnet(p, vpc=body.vpc, cidr=body.cidr, zone=body.zone, name=body.name or "",
                              description=body.description, public=body.public)
    _location(response, f"subnets/{r.id}")
    return _subnet(r)


@router.get("/subnets", response_model=Page[SubnetOut])
def list_subnets(p: Viewer, page: Pagination, vpc_id: IdFilter = None,
                 zone: Annotated[str | None, Query(max_length=24)] = None,
                 name: Annotated[Name | None, Query()] = None,
                 public: Annotated[bool | None, Query()] = None) -> Page[SubnetOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.subnet_query(p, vpc_id=vpc_id, zone=zone, name=name, public=public),
                             Subnet.id, page)
        return Page[SubnetOut](items=_subnets(s, rows), next_cursor=nxt)


@router.get("/subnets/{ref}", response_model=SubnetOut)
def get_subnet(ref: str, p: Viewer) -> SubnetOut:
    with session_scope(write=False) as s:
        return _subnets(s, [service.get_subnet(s, p, ref)])[0]


@router.patch("/subnets/{ref}", response_model=SubnetOut)
def update_subnet(ref: str, body: SubnetPatch, p: Member) -> SubnetOut:
    return _subnet(service.update_subnet(p, ref, **patch_changes(body)))


@router.delete("/subnets/{ref}", status_code=204)
def delete_subnet(ref: str, p: Member) -> Response:
    """409 while network interfaces or NAT gateways are in it."""
    service.delete_subnet(p, ref)
    return Response(status_code=204)


# --- security groups ----------------------------------------------------------------------------------

class RuleIn(Body):
    direction: Literal["ingress", "egress"]
    protocol: Literal["tcp", "udp", "icmp", "all"]
    port_min: int | None = Field(None, ge=1, le=65535, description="tcp/udp only; default: every port")
    port_max: int | None = Field(None, ge=1, le=65535, description="tcp/udp only; default: port_min")
    cidr: Cidr | None = Field(None, description="The peer's addresses (give this or remote_group)")
    remote_group: Ref | None = Field(None, description="The members of a group of the same VPC as the peer")
    description: Description = ""


class RuleOut(Out):
    id: str
    security_group_id: str
    direction: str
    protocol: str
    port_min: int | None
    port_max: int | None
    cidr: str | None
    remote_group_id: str | None
    description: str
    created_at: dt.datetime


class GroupIn(Body):
    vpc: Ref
    name: Name
    description: Description = ""


class GroupPatch(Body):
    """Fields left out are unchanged; none may be null."""

    name: Name | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()


class GroupOut(Out):
    id: str
    vpc_id: str
    name: str
    description: str
    is_default: bool
    rules: list[RuleOut] = Field(default_factory=list)
    created_at: dt.datetime
    updated_at: dt.datetime


def _groups(s: Session, rows: list[SecurityGroup]) -> list[GroupOut]:
    rules = service.rules_of(s, [g.id for g in rows])
    out = []
    for g in rows:
        item = GroupOut.model_validate(g)
        item.rules = [RuleOut.model_validate(r) for r in rules[g.id]]
        out.append(item)
    return out


def _group(g: SecurityGroup) -> GroupOut:
    with session_scope(write=False) as s:
        return _groups(s, [g])[0]


@router.post("/security-groups", status_code=201, response_model=GroupOut)
def create_group(body: GroupIn, p: Member, response: Response) -> GroupOut:
    """A new group denies all ingress and allows all egress."""
    g = service.create_group(p, vpc=body.vpc, name=body.name, description=body.description)
    _location(response, f"security-groups/{g.id}")
    return _group(g)


@router.get("/security-groups", response_model=Page[GroupOut])
def list_groups(p: Viewer, page: Pagination, vpc_id: IdFilter = None,
                name: Annotated[Name | None, Query()] = None) -> Page[GroupOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.group_query(p, vpc_id=vpc_id, name=name), SecurityGroup.id, page)
        return Page[GroupOut](items=_groups(s, rows), next_cursor=nxt)


@router.get("/security-groups/{ref}", response_model=GroupOut)
def get_group(ref: str, p: Viewer) -> GroupOut:
    with session_scope(write=False) as s:
        return _groups(s, [service.get_group(s, p, ref)])[0]


@router.patch("/security-groups/{ref}", response_model=GroupOut)
def update_group(ref: str, body: GroupPatch, p: Member) -> GroupOut:
    return _group(service.update_group(p, ref, **patch_changes(body)))


@router.delete("/security-groups/{ref}", status_code=204)
def delete_group(ref: str, p: Member) -> Response:
    """409 while interfaces use it or rules of other groups name it; a VPC's default group goes with the VPC."""
    service.delete_group(p, ref)
    return Response(status_code=204)


@router.get("/security-groups/{ref}/rules", response_model=list[RuleOut])
def list_rules(ref: str, p: Viewer) -> list[RuleOut]:
    with session_scope(write=False) as s:
        g = service.get_group(s, p, ref)
        return [RuleOut.model_validate(r) for r in service.rules_of(s, [g.id])[g.id]]


@router.post("/security-groups/{ref}/rules", status_code=201, response_model=RuleOut)
def add_rule(ref: str, body: RuleIn, p: Member) -> RuleOut:
    """Allow traffic (stateful: replies are allowed). A duplicate is a 409; rules per group are a quota."""
    return RuleOut.model_validate(service.add_rule(p, ref, service.RuleRequest(**body.model_dump())))


@router.delete("/security-groups/{ref}/rules/{rule_id}", status_code=204)
def delete_rule(ref: str, rule_id: str, p: Member) -> Response:
    service.delete_rule(p, ref, rule_id)
    return Response(status_code=204)


# --- network interfaces -------------------------------------------------------------------------------

class InterfaceIn(Body):
    subnet: Ref | None = Field(None, description="Default: the default VPC's subnet of `zone` (made on first use)")
    zone: ZoneId | None = Field(None, description="Without a subnet: the zone of the default VPC's subnet")
    region: RegionId | None = Field(None, description="Without a subnet: the region of the default VPC")
    name: Name | None = None
    description: Description = ""
    private_ip: Ipv4 | None = Field(None, description="Default: the lowest free address of the subnet")
    security_groups: list[Ref] | None = Field(None, max_length=service.MAX_GROUPS_PER_INTERFACE,
                                              description="Groups of the same VPC (default: the VPC's default)")
    assign_public_ip: bool = Field(False, description="Allocate a floating IP released with the interface")


class InterfacePatch(Body):
    """Fields left out are unchanged; none may be null."""

    name: Name | SkipJsonSchema[None] = omitted()
    description: Description | SkipJsonSchema[None] = omitted()
    security_groups: Annotated[list[Ref], Field(max_length=service.MAX_GROUPS_PER_INTERFACE)] | SkipJsonSchema[
        None] = omitted()


class InterfaceOut(Out):
    id: str
    vpc_id: str
    subnet_id: str
    name: str
    description: str
    mac: str
    private_ip: str
    security_group_ids: list[str] = Field(default_factory=list)
    public_ip: str | None = None
    floating_ip_id: str | None = None
    instance_id: str | None
    device_index: int | None
    host_id: str | None
    status: str
    status_reason: str
    attached_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


def _interfaces(s: Session, rows: list[NetworkInterface]) -> list[InterfaceOut]:
    ids = [n.id for n in rows]
    groups, fips = service.groups_of(s, ids), service.public_ips_of(s, ids)
    out = []
    for n in rows:
        item = InterfaceOut.model_validate(n)
        item.security_group_ids = groups[n.id]
        fip = fips.get(n.id)
        item.public_ip, item.floating_ip_id = (fip.address, fip.id) if fip else (None, None)
        out.append(item)
    return out


def _interface(n: NetworkInterface) -> InterfaceOut:
    with session_scope(write=False) as s:
        return _interfaces(s, [n])[0]


@router.post("/network-interfaces", status_code=202, response_model=InterfaceOut)
def create_interface(body: InterfaceIn, p: Member, response: Response) -> InterfaceOut:
    """A port: a MAC and a private address of the subnet, filtered by its security groups."""
    req = service.InterfaceRequest(**(body.model_dump() | {"name": body.name or ""}))
    n = service.create_interface(p, req)
    _location(response, f"network-interfaces/{n.id}")
    return _interface(n)


@router.get("/network-interfaces", response_model=Page[InterfaceOut])
def list_interfaces(p: Viewer, page: Pagination, vpc_id: IdFilter = None, subnet_id: IdFilter = None,
                    instance_id: IdFilter = None, status: Annotated[Status | None, Query()] = None,
                    attached: Annotated[bool | None, Query()] = None) -> Page[InterfaceOut]:
    with session_scope(write=False) as s:
        stmt = service.interface_query(p, vpc_id=vpc_id, subnet_id=subnet_id, instance_id=instance_id,
                                       status=status, attached=attached)
        rows, nxt = paginate(s, stmt, NetworkInterface.id, page)
        return Page[InterfaceOut](items=_interfaces(s, rows), next_cursor=nxt)


@router.get("/network-interfaces/{ref}", response_model=InterfaceOut)
def get_interface(ref: str, p: Viewer) -> InterfaceOut:
    with session_scope(write=False) as s:
        return _interfaces(s, [service.get_interface(s, p, ref)])[0]


@router.patch("/network-interfaces/{ref}", response_model=InterfaceOut)
def update_interface(ref: str, body: InterfacePatch, p: Member) -> InterfaceOut:
    """Security group changes apply to running instances at once."""
    return _interface(service.update_interface(p, ref, **patch_changes(body)))


@router.delete("/network-interfaces/{ref}", status_code=204)
def delete_interface(ref: str, p: Member) -> Response:
    """409 while attached to an instance."""
    service.delete_interface(p, ref)
    return Response(status_code=204)


# --- floating IPs -------------------------------------------------------------------------------------

class FloatingIpIn(Body):
    region: RegionId | None = None
    description: Description = ""


class FloatingIpPatch(Body):
    description: Description | SkipJsonSchema[None] = omitted()


class FloatingIpAttach(Body):
    network_interface: Ref = Field(description="Its subnet is public, or its VPC has an internet gateway")


class FloatingIpOut(Out):
    id: str
    region_id: str
    address: str
    description: str
    network_interface_id: str | None
    nat_gateway_id: str | None
    vpc_id: str | None
    status: str
    attached_at: dt.datetime | None
    created_at: dt.datetime


@router.post("/floating-ips", status_code=201, response_model=FloatingIpOut)
def allocate_floating_ip(p: Member, response: Response, body: FloatingIpIn | None = None) -> FloatingIpOut:
    """Take a public address of the region's pool (409 when it is exhausted)."""
    body = body or FloatingIpIn()
    f = service.allocate_floating_ip(p, region=body.region, description=body.description)
    _location(response, f"floating-ips/{f.id}")
    return FloatingIpOut.model_validate(f)


@router.get("/floating-ips", response_model=Page[FloatingIpOut])
def list_floating_ips(p: Viewer, page: Pagination, region: Annotated[str | None, Query(max_length=16)] = None,
                      attached: Annotated[bool | None, Query()] = None,
                      address: Annotated[str | None, Query(max_length=15)] = None) -> Page[FloatingIpOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.floating_ip_query(p, region=region, attached=attached, address=address),
                             FloatingIp.id, page)
        return Page[FloatingIpOut](items=[FloatingIpOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/floating-ips/{ref}", response_model=FloatingIpOut)
def get_floating_ip(ref: str, p: Viewer) -> FloatingIpOut:
    with session_scope(write=False) as s:
        return FloatingIpOut.model_validate(service.get_floating_ip(s, p, ref))


@router.patch("/floating-ips/{ref}", response_model=FloatingIpOut)
def update_floating_ip(ref: str, body: FloatingIpPatch, p: Member) -> FloatingIpOut:
    return FloatingIpOut.model_validate(service.update_floating_ip(p, ref, **patch_changes(body)))


@router.post("/floating-ips/{ref}/attach", response_model=FloatingIpOut)
def attach_floating_ip(ref: str, body: FloatingIpAttach, p: Member) -> FloatingIpOut:
    """DNAT/SNAT on the VPC router, live."""
    return FloatingIpOut.model_validate(service.attach_floating_ip(p, ref, body.network_interface))


@router.post("/floating-ips/{ref}/detach", response_model=FloatingIpOut)
def detach_floating_ip(ref: str, p: Member) -> FloatingIpOut:
    return FloatingIpOut.model_validate(service.detach_floating_ip(p, ref))


@router.delete("/floating-ips/{ref}", status_code=204)
def release_floating_ip(ref: str, p: Member) -> Response:
    """Give the address back to the pool; 409 while attached."""
    service.release_floating_ip(p, ref)
    return Response(status_code=204)


# --- NAT gateways -------------------------------------------------------------------------------------

class NatIn(Body):
    subnet: Ref = Field(description="A public subnet")
    floating_ip: Ref | None = Field(None, description="A free floating IP (id or address); default: a new one, "
                                                      "released with the gateway")
    name: Name | None = None


class NatOut(Out):
    id: str
    vpc_id: str
    subnet_id: str
    name: str
    floating_ip_id: str
    public_ip: str = ""
    private_ip: str
    status: str
    status_reason: str
    created_at: dt.datetime


def _nats(s: Session, rows: list[NatGateway]) -> list[NatOut]:
    addresses = service.nat_public_ips(s, rows)
    out = []
    for n in rows:
        item = NatOut.model_validate(n)
        item.public_ip = addresses.get(n.floating_ip_id, "")
        out.append(item)
    return out


@router.post("/nat-gateways", status_code=202, response_model=NatOut)
def create_nat_gateway(body: NatIn, p: Member, response: Response) -> NatOut:
    """Masquerade the VPC's private subnets behind a floating IP (those of its zone first)."""
    n = service.create_nat_gateway(p, subnet=body.subnet, floating_ip=body.floating_ip, name=body.name or "")
    _location(response, f"nat-gateways/{n.id}")
    with session_scope(write=False) as s:
        return _nats(s, [n])[0]


@router.get("/nat-gateways", response_model=Page[NatOut])
def list_nat_gateways(p: Viewer, page: Pagination, vpc_id: IdFilter = None,
                      subnet_id: IdFilter = None) -> Page[NatOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.nat_query(p, vpc_id=vpc_id, subnet_id=subnet_id), NatGateway.id, page)
        return Page[NatOut](items=_nats(s, rows), next_cursor=nxt)


@router.get("/nat-gateways/{ref}", response_model=NatOut)
def get_nat_gateway(ref: str, p: Viewer) -> NatOut:
    with session_scope(write=False) as s:
        return _nats(s, [service.get_nat_gateway(s, p, ref)])[0]


@router.delete("/nat-gateways/{ref}", status_code=204)
def delete_nat_gateway(ref: str, p: Member) -> Response:
    service.delete_nat_gateway(p, ref)
    return Response(status_code=204)


# --- flow logs ----------------------------------------------------------------------------------------

class FlowLogIn(Body):
    resource: Annotated[str, Field(max_length=50, pattern=r"^(vpc|subnet|nic)-[a-z0-9]{1,40}$")] = Field(
        description="The id of a VPC, a subnet or a network interface")
    traffic_type: Literal["ACCEPT", "REJECT", "ALL"] = "ALL"
    name: Name | None = None


class FlowLogOut(Out):
    id: str
    vpc_id: str
    name: str
    resource_type: str
    resource_id: str
    traffic_type: str
    status: str
    created_at: dt.datetime


class FlowRecordOut(Out):
    id: str
    interface_id: str
    direction: str
    action: str
    protocol: str
    src_addr: str
    src_port: int | None
    dst_addr: str
    dst_port: int | None
    packets: int
    bytes: int
    start_time: dt.datetime
    end_time: dt.datetime


@router.post("/flow-logs", status_code=202, response_model=FlowLogOut)
def create_flow_log(body: FlowLogIn, p: Member, response: Response) -> FlowLogOut:
    """Capture the flows of a VPC, subnet or interface; records are kept 30 days."""
    fl = service.create_flow_log(p, resource=body.resource, traffic_type=body.traffic_type, name=body.name or "")
    _location(response, f"flow-logs/{fl.id}")
    return FlowLogOut.model_validate(fl)


@router.get("/flow-logs", response_model=Page[FlowLogOut])
def list_flow_logs(p: Viewer, page: Pagination, vpc_id: IdFilter = None,
                   resource_id: IdFilter = None) -> Page[FlowLogOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.flow_log_query(p, vpc_id=vpc_id, resource_id=resource_id), FlowLog.id, page)
        return Page[FlowLogOut](items=[FlowLogOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/flow-logs/{ref}", response_model=FlowLogOut)
def get_flow_log(ref: str, p: Viewer) -> FlowLogOut:
    with session_scope(write=False) as s:
        return FlowLogOut.model_validate(service.get_flow_log(s, p, ref))


@router.delete("/flow-logs/{ref}", status_code=204)
def delete_flow_log(ref: str, p: Member) -> Response:
    service.delete_flow_log(p, ref)
    return Response(status_code=204)


@router.get("/flow-logs/{ref}/records", response_model=Page[FlowRecordOut])
def list_flow_records(ref: str, p: Viewer, page: Pagination,
                      since: Annotated[Timestamp | None, Query(description="Flows started at or after")] = None,
                      until: Annotated[Timestamp | None, Query(description="Flows started before")] = None,
                      action: Annotated[Literal["ACCEPT", "REJECT"] | None, Query()] = None,
                      interface_id: IdFilter = None,
                      address: Annotated[str | None, Query(max_length=15, description="Source or destination")] = None,
                      port: Annotated[int | None, Query(ge=0, le=65535, description="Source or destination")] = None,
                      protocol: Annotated[str | None, Query(max_length=8)] = None) -> Page[FlowRecordOut]:
    with session_scope(write=False) as s:
        fl = service.get_flow_log(s, p, ref)
        f = service.RecordFilter(since=as_utc(since), until=as_utc(until), action=action, interface_id=interface_id,
                                 address=address, port=port, protocol=protocol)
        rows, nxt = paginate(s, service.record_query(fl, f), FlowLogRecord.id, page)
        return Page[FlowRecordOut](items=[FlowRecordOut.model_validate(r) for r in rows], next_cursor=nxt)

