"""HTTP for the catalog: regions, zones, flavors, prices, hosts and the capacity report.

Reading the catalog (regions, zones, flavors, prices, capacity) needs any valid token; the seed
promises public metrics ("Transparence : métriques publiques"), so capacity is readable too.
Hosts (names, agent URLs, PCI addresses) and every change are for cloud administrators.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import Field, StringConstraints, field_validator

from hackboot.catalog import seed_data, service
from hackboot.catalog.models import Flavor, Host, Region, Zone
from hackboot.core.auth import Superuser, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Description, Name, Out

router = APIRouter(prefix="/v1", tags=["catalog"])

RegionStatus = Literal["operational", "maintenance", "planned", "retired"]
HostStatus = Literal["up", "down", "disabled"]
PriceKind = Literal["flavor", "volume", "object_storage", "transfer", "network"]
FlavorId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,31}$", max_length=32)]
Family = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,15}$")]
GpuModel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]  # flavors.gpu_model
Sku = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_:-]{0,63}$", max_length=64)]
RegionId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{1,16}$")]
ZoneId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{1,24}$")]
Country = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2}$")]
PciAddress = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")]
ResourceClass = Annotated[str, StringConstraints(pattern=r"^(VCPU|MEMORY_MB|DISK_GB|GPU:[A-Za-z0-9._-]{1,32})$")]
Reason = Annotated[str, StringConstraints(max_length=255)]


# --- regions and zones -----------------------------------------------------------------------------

class RegionOut(Out):
    id: str
    name: str
    city: str
    country: str
    jurisdiction: str
    in_eu: bool = Field(description="Whether the country is an EU member state (data residency)")
    status: str
    status_reason: str
    peering: str
    available_from: str
    note: str
    zones: list[str]
    created_at: dt.datetime


class RegionPatch(Body):
    status: RegionStatus | None = None
    status_reason: Reason | None = Field(None, description="Shown to users; cleared on a status change "
                                                           "unless given")


class ZoneOut(Out):
    id: str
    region_id: str
    status: str
    status_reason: str
    region_status: str
    effective_status: str = Field(description="The region's status unless operational, then the zone's")
    created_at: dt.datetime


class ZonePatch(Body):
    status: RegionStatus | None = None
    status_reason: Reason | None = None


def _region_out(r: Region, zones: list[str]) -> RegionOut:
    return RegionOut(id=r.id, name=r.name, city=r.city, country=r.country, jurisdiction=r.jurisdiction,
                     in_eu=r.country in seed_data.EU_COUNTRIES, status=r.status, status_reason=r.status_reason,
                     peering=r.peering, available_from=r.available_from, note=r.note, zones=zones,
                     created_at=r.created_at)


def _zone_out(z: Zone, region_status: str) -> ZoneOut:
    effective = region_status if region_status != service.OPERATIONAL else z.status
    return ZoneOut(id=z.id, region_id=z.region_id, status=z.status, status_reason=z.status_reason,
                   region_status=region_status, effective_status=effective, created_at=z.created_at)


@router.get("/regions", response_model=Page[RegionOut])
def list_regions(p: Viewer, page: Pagination, status: Annotated[RegionStatus | None, Query()] = None,
                 country: Annotated[Country | None, Query(description="ISO 3166-1 alpha-2, e.g. FR")] = None,
                 jurisdiction: Annotated[str | None, Query(max_length=16)] = None) -> Page[RegionOut]:
    """Regions with their data-residency facts (country, jurisdiction) and status."""
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.region_query(status=status, country=country, jurisdiction=jurisdiction),
                             Region.id, page)
        zones = service.zones_by_region(s, [r.id for r in rows])
        return Page[RegionOut](items=[_region_out(r, zones[r.id]) for r in rows], next_cursor=nxt)


@router.get("/regions/{region_id}", response_model=RegionOut)
def get_region(region_id: str, p: Viewer) -> RegionOut:
    with session_scope(write=False) as s:
        r = service.get_region(s, region_id)
        return _region_out(r, service.zones_by_region(s, [r.id])[r.id])


@router.patch("/regions/{region_id}", response_model=RegionOut)
def update_region(region_id: str, body: RegionPatch, p: Superuser) -> RegionOut:
    """Change a region's status (cloud administrators). Placement only goes to operational regions."""
    service.update_region(p, region_id, status=body.status, status_reason=body.status_reason)
    return get_region(region_id, p)


@router.get("/zones", response_model=Page[ZoneOut])
def list_zones(p: Viewer, page: Pagination, region: Annotated[str | None, Query(max_length=16)] = None,
               status: Annotated[RegionStatus | None, Query()] = None) -> Page[ZoneOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.zone_query(region=region, status=status), Zone.id, page)
        statuses = service.region_statuses(s)
        return Page[ZoneOut](items=[_zone_out(z, statuses.get(z.region_id, "")) for z in rows], next_cursor=nxt)


@router.get("/zones/{zone_id}", response_model=ZoneOut)
def get_zone(zone_id: str, p: Viewer) -> ZoneOut:
    with session_scope(write=False) as s:
        z = service.get_zone(s, zone_id)
        return _zone_out(z, service.region_statuses(s).get(z.region_id, ""))


@router.patch("/zones/{zone_id}", response_model=ZoneOut)
def update_zone(zone_id: str, body: ZonePatch, p: Superuser) -> ZoneOut:
    service.update_zone(p, zone_id, status=body.status, status_reason=body.status_reason)
    return get_zone(zone_id, p)


# --- flavors ---------------------------------------------------------------------------------------

class FlavorOut(Out):
    id: str
    family: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    gpu_model: str | None
    gpu_count: int
    bandwidth_mbps: int
    description: str
    source: str
    active: bool
    price_eur_hour: float | None = Field(None, description="Global on-demand list price (see /v1/prices)")
    created_at: dt.datetime


class FlavorIn(Body):
    id: FlavorId
    family: Family
    vcpus: int = Field(ge=1, le=1024)
    memory_mb: int = Field(ge=128, le=16 * 1024 * 1024)
    disk_gb: int = Field(ge=0, le=1024 * 1024)
    gpu_model: GpuModel | None = None
    gpu_count: int = Field(0, ge=0, le=16)
    bandwidth_mbps: int = Field(1000, ge=1, le=400_000)
    description: Description = ""
    source: Description = Field("", description="Where the specs come from")
    price_eur_hour: float | None = Field(None, ge=0, le=100_000, description="Creates the global list price")


class FlavorPatch(Body):
    active: bool | None = None
    description: Description | None = None


class FlavorDeleteOut(Out):
    id: str
    outcome: Literal["deleted", "deactivated"]
    detail: str


def _flavor_outs(s: Any, rows: list[Flavor]) -> list[FlavorOut]:
    prices = service.flavor_hourly_prices(s, [f.id for f in rows])
    return [FlavorOut.model_validate(f).model_copy(update={"price_eur_hour": prices.get(f.id)}) for f in rows]


@router.get("/flavors", response_model=Page[FlavorOut])
def list_flavors(p: Viewer, page: Pagination, family: Annotated[str | None, Query(max_length=16)] = None,
                 gpu_model: Annotated[str | None, Query(max_length=40)] = None,
                 gpu: Annotated[bool | None, Query(description="true: GPU flavors only; false: none")] = None,
                 min_vcpus: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
                 min_memory_mb: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
                 min_disk_gb: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
                 include_inactive: Annotated[bool, Query(description="Also list deactivated flavors")] = False,
                 ) -> Page[FlavorOut]:
    with session_scope(write=False) as s:
        stmt = service.flavor_query(family=family, gpu_model=gpu_model, gpu=gpu, min_vcpus=min_vcpus,
                                    min_memory_mb=min_memory_mb, min_disk_gb=min_disk_gb,
                                    include_inactive=include_inactive)
        rows, nxt = paginate(s, stmt, Flavor.id, page)
        return Page[FlavorOut](items=_flavor_outs(s, rows), next_cursor=nxt)


@router.get("/flavors/{flavor_id}", response_model=FlavorOut)
def get_flavor(flavor_id: str, p: Viewer) -> FlavorOut:
    with session_scope(write=False) as s:
        return _flavor_outs(s, [service.get_flavor(s, flavor_id)])[0]


@router.post("/flavors", status_code=201, response_model=FlavorOut)
def create_flavor(body: FlavorIn, p: Superuser) -> FlavorOut:
    """Create a flavor (cloud administrators). Sizes are immutable afterwards."""
    service.create_flavor(p, **body.model_dump())
    return get_flavor(body.id, p)


@router.patch("/flavors/{flavor_id}", response_model=FlavorOut)
def update_flavor(flavor_id: str, body: FlavorPatch, p: Superuser) -> FlavorOut:
    """(De)activate a flavor or change its description; sizes cannot change."""
    service.update_flavor(p, flavor_id, active=body.active, description=body.description)
    return get_flavor(flavor_id, p)


@router.delete("/flavors/{flavor_id}", response_model=FlavorDeleteOut)
def delete_flavor(flavor_id: str, p: Superuser) -> FlavorDeleteOut:
    """Delete a flavor; one in use (or from the seed) is deactivated instead, as `outcome` says."""
    result = service.delete_flavor(p, flavor_id)
    return FlavorDeleteOut(id=result.id, outcome=result.outcome, detail=result.detail)  # type: ignore[arg-type]


# --- prices ----------------------------------------------------------------------------------------

class PriceOut(Out):
    id: str
    sku: str
    kind: str
    region_id: str | None = Field(description="null: the list price in every region without an override")
    unit: str
    amount_eur: float
    currency: Literal["EUR"] = "EUR"
    description: str
    created_at: dt.datetime


class PriceIn(Body):
    amount_eur: float = Field(ge=0, le=999_999, description="EUR, excluding VAT, per unit")  # NUMERIC(12, 6)
    unit: Literal["hour", "GB-month", "GB"] | None = Field(None, description="Checked against the sku's kind")
    kind: PriceKind | None = Field(
        None, description="Inferred from the sku (flavor id, volume:, s3:, transfer:, network:)")
    description: Description | None = None


@router.get("/prices", response_model=Page[PriceOut])
def list_prices(p: Viewer, page: Pagination, sku: Annotated[str | None, Query(max_length=64)] = None,
                kind: Annotated[PriceKind | None, Query()] = None,
                region: Annotated[str | None, Query(max_length=16, description=(
                    "The prices that apply in this region: its overrides, else the global list price"))] = None,
                ) -> Page[PriceOut]:
    """The on-demand list prices in EUR (excl. VAT): per hour for flavors, per GB-month for storage."""
    with session_scope(write=False) as s:
        rows, nxt = service.price_page(s, page, sku=sku, kind=kind, region=region)
        return Page[PriceOut](items=[PriceOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.put("/prices/{sku}", response_model=PriceOut,
            responses={201: {"model": PriceOut, "description": "Price created"}})
def set_price(sku: Annotated[Sku, Path()], body: PriceIn, p: Superuser, response: Response,
              region: Annotated[RegionId | None, Query(description="Set a regional override")] = None) -> PriceOut:
    """Set a list price (cloud administrators): 201 when created, 200 when updated."""
    price, created = service.set_price(p, sku, body.amount_eur, region_id=region, unit=body.unit, kind=body.kind,
                                       description=body.description)
    response.status_code = 201 if created else 200
    return PriceOut.model_validate(price)


@router.delete("/prices/{sku}", status_code=204)
def delete_price(sku: Annotated[Sku, Path()], p: Superuser,
                 region: Annotated[RegionId | None, Query()] = None) -> Response:
    """Remove a regional override (or an unneeded global price)."""
    service.delete_price(p, sku, region)
    return Response(status_code=204)


# --- hosts -----------------------------------------------------------------------------------------

class GpuIn(Body):
    model: GpuModel = Field(description=f"e.g. {', '.join(seed_data.GPU_MODELS)}")
    count: int = Field(ge=1, le=64)
    pci_addresses: list[PciAddress] = Field(default_factory=list, max_length=64,
                                            description="One per device, for passthrough")


class HostIn(Body):
    name: Name
    zone: ZoneId
    vcpus: int = Field(ge=1, le=65536)
    memory_mb: int = Field(ge=1, le=1 << 40)
    disk_gb: int = Field(ge=0, le=1 << 40)
    gpus: list[GpuIn] = Field(default_factory=list, max_length=16)
    facts: dict[str, Any] = Field(default_factory=dict, description="What the agent reports (accel, kernel…)")
    agent_url: str = Field("", max_length=255)
    allocation_ratio: float | None = Field(None, gt=0, le=service.MAX_ALLOCATION_RATIO, description=(
        "For VCPU, MEMORY_MB and DISK_GB; 1.0 for a new host, unchanged on re-registration when omitted"))
    reserved: dict[ResourceClass, Annotated[int, Field(ge=0, le=1 << 40)]] | None = Field(
        None, description="Kept for the host itself, per resource class; unchanged when omitted")

    @field_validator("facts")
    @classmethod
    def _small_facts(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > 100:
            raise ValueError("at most 100 facts")
        return v


class HostPatch(Body):
    status: Literal["up", "disabled"] | None = Field(None, description="'up' enables a disabled host")
    status_reason: Reason | None = None
    allocation_ratio: dict[ResourceClass, Annotated[float, Field(gt=0, le=service.MAX_ALLOCATION_RATIO)]] | None = None
    reserved: dict[ResourceClass, Annotated[int, Field(ge=0, le=1 << 40)]] | None = None


class HeartbeatIn(Body):
    facts: dict[str, Any] = Field(default_factory=dict, description="Merged into the host's facts")


class InventoryOut(Out):
    resource_class: str
    total: int
    reserved: int
    allocation_ratio: float
    allocatable: int
    used: int
    free: int
    devices: list[str]
    devices_in_use: list[str]


class HostOut(Out):
    id: str
    name: str
    zone_id: str
    region_id: str
    status: str
    status_reason: str
    facts: dict[str, Any]
    agent_url: str
    last_heartbeat_at: dt.datetime | None
    generation: int
    created_at: dt.datetime
    inventories: list[InventoryOut]


class HeartbeatOut(Out):
    id: str
    name: str
    status: str
    last_heartbeat_at: dt.datetime | None


def _host_out(view: service.HostView) -> HostOut:
    return HostOut.model_validate(view.as_dict())


@router.post("/hosts", response_model=HostOut, status_code=201, tags=["hosts"],
             responses={200: {"model": HostOut, "description": "Re-registered: a host of that name existed"}})
def register_host(body: HostIn, p: Superuser, response: Response) -> HostOut:
    """Register a hypervisor host, or re-register it by name (201 created, 200 re-registered)."""
    view, created = service.register_host(
        p, name=body.name, zone_id=body.zone, vcpus=body.vcpus, memory_mb=body.memory_mb, disk_gb=body.disk_gb,
        gpus=[service.GpuSpec(g.model, g.count, list(g.pci_addresses)) for g in body.gpus], facts=body.facts,
        agent_url=body.agent_url, allocation_ratio=body.allocation_ratio, reserved=body.reserved)
    response.status_code = 201 if created else 200
    return _host_out(view)


@router.get("/hosts", response_model=Page[HostOut], tags=["hosts"])
def list_hosts(p: Superuser, page: Pagination, zone: Annotated[str | None, Query(max_length=24)] = None,
               region: Annotated[str | None, Query(max_length=16)] = None,
               status: Annotated[HostStatus | None, Query()] = None,
               name: Annotated[str | None, Query(max_length=63)] = None) -> Page[HostOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.host_query(zone=zone, region=region, status=status, name=name), Host.id,
                             page)
        return Page[HostOut](items=[_host_out(v) for v in service.host_views(s, rows)], next_cursor=nxt)


@router.get("/hosts/{host}", response_model=HostOut, tags=["hosts"])
def get_host(host: str, p: Superuser) -> HostOut:
    """A host by id or name, with its inventories and what is allocated."""
    with session_scope(write=False) as s:
        return _host_out(service.get_host(s, host))


@router.patch("/hosts/{host}", response_model=HostOut, tags=["hosts"])
def update_host(host: str, body: HostPatch, p: Superuser) -> HostOut:
    return _host_out(service.update_host(p, host, status=body.status, status_reason=body.status_reason,
                                         allocation_ratio=body.allocation_ratio, reserved=body.reserved))


@router.post("/hosts/{host}/heartbeat", response_model=HeartbeatOut, tags=["hosts"])
def heartbeat(host: str, body: HeartbeatIn, p: Superuser) -> HeartbeatOut:
    """The host agent is alive: marks a `down` host `up` and merges the facts it reports."""
    return HeartbeatOut.model_validate(service.heartbeat(p, host, body.facts))


@router.delete("/hosts/{host}", status_code=204, tags=["hosts"])
def delete_host(host: str, p: Superuser) -> Response:
    """Forget a host; refused (409) while allocations exist on it."""
    service.delete_host(p, host)
    return Response(status_code=204)


# --- capacity --------------------------------------------------------------------------------------

class FiguresOut(Out):
    resource_class: str
    total: int
    reserved: int
    allocatable: int = Field(description="(total - reserved) x allocation_ratio, per host")
    used: int = Field(description="Sum of allocations")
    free: int = Field(description="allocatable - used, per host, never below 0")
    schedulable: int = Field(description="free on up hosts in operational zones of operational regions")
    utilisation_pct: float | None = Field(description="used / allocatable; null without capacity")


class ScopeOut(Out):
    id: str
    kind: str
    status: str = Field(description="Zones: the effective status (the region's unless it is operational)")
    hosts: dict[str, int]
    resources: list[FiguresOut]
    zones: list[ScopeOut] = Field(default_factory=list)


class CapacityOut(Out):
    total: ScopeOut = Field(description="The whole selection")
    regions: list[ScopeOut]


def _scope_out(scope: service.Scope) -> ScopeOut:
    return ScopeOut(id=scope.id, kind=scope.kind, status=scope.status, hosts=dict(scope.hosts),
                    resources=[FiguresOut(**f.__dict__, utilisation_pct=f.utilisation_pct) for f in scope.ordered()],
                    zones=[_scope_out(z) for z in scope.zones])


@router.get("/capacity", response_model=CapacityOut, tags=["capacity"])
def get_capacity(p: Viewer, region: Annotated[str | None, Query(max_length=16)] = None,
                 zone: Annotated[str | None, Query(max_length=24)] = None) -> CapacityOut:
    """Capacity vs used per region and zone for VCPU, MEMORY_MB, DISK_GB and each GPU model."""
    with session_scope(write=False) as s:
        total, regions = service.capacity(s, region=region, zone=zone)
    return CapacityOut(total=_scope_out(total), regions=[_scope_out(r) for r in regions])


__all__ = ["router"]
