"""Catalog rules: regions and zones, flavors, the price list, hypervisor hosts and the capacity report.

Read functions take a session (the API opens a read-only one); write functions open their own
short transaction and emit one event per change (``project_id=None``: the catalog belongs to the
cloud, not to a project). Hooks picked up by ``server.py``: ``seed()`` and ``loops()``.

For the scheduler (compute): ``placeable_zone(session, zone_id)`` refuses zones of regions that
are not operational, and ``Inventory.capacity`` / ``models.allocatable`` is the one formula for
"what may be allocated" that the capacity report uses as well.
"""

from __future__ import annotations

import datetime as dt
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, column, exists, func, inspect, or_, select, table, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from hackboot.catalog import seed_data
from hackboot.catalog.models import (
    GPU_PREFIX,
    REGION_STATUSES,
    RESOURCE_CLASSES,
    Allocation,
    Flavor,
    Host,
    Inventory,
    Price,
    Region,
    Zone,
    allocatable,
)
from hackboot.core import errors
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.pagination import PageParams, encode_cursor
from hackboot.core.workers import Loop
from hackboot.events.service import emit

log = logging.getLogger("hackboot.catalog")

OPERATIONAL = "operational"
ZONE_STATUSES = REGION_STATUSES
MAX_ALLOCATION_RATIO = 64.0
# sku prefix → (kind, unit) for everything that is not a flavor
SKU_PREFIXES: dict[str, tuple[str, str]] = {
    "volume:": ("volume", "GB-month"),
    "s3:": ("object_storage", "GB-month"),
    "transfer:": ("transfer", "GB"),
    "network:": ("network", "hour"),
}
PRICE_KINDS = ("flavor", "volume", "object_storage", "transfer", "network")


def _actor(p: Principal | None) -> str:
    """Events' actor: the user, or "system" when the control plane itself acts (agents, loops)."""
    return p.user_id if p is not None else "system"


def _who(p: Principal | None) -> str:
    return p.username if p is not None else "the system"


def _lock(s: Session, key: str) -> None:
    """Serialise writers of one catalog key for the rest of the transaction.

    SQLite needs nothing (every write transaction starts with BEGIN IMMEDIATE). PostgreSQL gets a
    transaction-scoped advisory lock: unique constraints alone do not stop two global prices for
    one sku (NULL region ids are distinct) or two control planes seeding at once.
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(f"catalog:{key}".encode())})


# --- seeding ---------------------------------------------------------------------------------------

def seed() -> dict[str, list[str]]:
    """Insert the seed's regions, zones, flavors and global prices that are missing; touch nothing else.

    Idempotent, and safe when two control planes start together on one PostgreSQL: the loser of an
    insert race retries and then finds the rows present. Returns what was inserted.
    """
    for attempt in range(3):
        try:
            return _seed_once()
        except IntegrityError:
            if attempt == 2:
                raise
            log.info("catalog seed raced with another control plane; retrying")
    raise AssertionError("unreachable")


def _seed_once() -> dict[str, list[str]]:
    inserted: dict[str, list[str]] = {"regions": [], "zones": [], "flavors": [], "prices": []}
    with session_scope() as s:
        _lock(s, "seed")
        regions = set(s.scalars(select(Region.id)))
        zones = set(s.scalars(select(Zone.id)))
        flavors = set(s.scalars(select(Flavor.id)))
        prices = set(s.scalars(select(Price.sku).where(Price.region_id.is_(None))))
        for r in seed_data.REGIONS:
            if r.id not in regions:
                s.add(Region(id=r.id, name=r.name, city=r.city, country=r.country, jurisdiction=r.jurisdiction,
                             status=r.status, status_reason=r.status_reason, peering=r.peering,
                             available_from=r.available_from, note=r.note))
                inserted["regions"].append(r.id)
        s.flush()
        for r in seed_data.REGIONS:
            for z in r.zones:
                if z not in zones:
                    s.add(Zone(id=z, region_id=r.id, status=OPERATIONAL))
                    inserted["zones"].append(z)
        for f in seed_data.FLAVORS:
            if f.id not in flavors:
                s.add(Flavor(id=f.id, family=f.family, vcpus=f.vcpus, memory_mb=f.memory_mb, disk_gb=f.disk_gb,
                             gpu_model=f.gpu_model, gpu_count=f.gpu_count, bandwidth_mbps=f.bandwidth_mbps,
                             description=f.description, source=f.source, active=True))
                inserted["flavors"].append(f.id)
        for pr in seed_data.all_prices():
            if pr.sku not in prices:
                s.add(Price(id=new_id("price"), sku=pr.sku, kind=pr.kind, region_id=None, unit=pr.unit,
                            amount_eur=pr.amount_eur, description=pr.description))
                inserted["prices"].append(pr.sku)
        s.flush()
        if any(inserted.values()):
            emit(s, "catalog.seeded", resource_type="catalog", resource_id="seed", project_id=None,
                 data=inserted)
    return inserted


# --- regions and zones -----------------------------------------------------------------------------

def region_query(*, status: str | None = None, country: str | None = None,
                 jurisdiction: str | None = None) -> Select[Any]:
    stmt = select(Region)
    if status:
        stmt = stmt.where(Region.status == status)
    if country:
        stmt = stmt.where(Region.country == country.upper())
    if jurisdiction:
        stmt = stmt.where(Region.jurisdiction == jurisdiction.upper())
    return stmt


def get_region(s: Session, region_id: str) -> Region:
    region = s.get(Region, region_id)
    if region is None:
        raise errors.NotFound(f"Region {region_id} not found")
    return region


def zones_by_region(s: Session, region_ids: Iterable[str]) -> dict[str, list[str]]:
    ids = list(region_ids)
    out: dict[str, list[str]] = {r: [] for r in ids}
    for zone_id, region_id in s.execute(select(Zone.id, Zone.region_id).where(Zone.region_id.in_(ids))
                                        .order_by(Zone.id)):
        out[region_id].append(zone_id)
    return out


def _set_status(obj: Region | Zone, status: str | None, reason: str | None) -> dict[str, Any]:
    """Apply a status change; a new status without a reason clears the old reason."""
    changes: dict[str, Any] = {}
    if status is not None and status != obj.status:
        changes["status"] = {"from": obj.status, "to": status}
        obj.status = status
        if reason is None and obj.status_reason:
            changes["status_reason"] = {"from": obj.status_reason, "to": ""}
            obj.status_reason = ""
    if reason is not None and reason != obj.status_reason:
        changes["status_reason"] = {"from": obj.status_reason, "to": reason}
        obj.status_reason = reason
    return changes


def update_region(p: Principal | None, region_id: str, *, status: str | None = None,
                  status_reason: str | None = None) -> Region:
    if status is not None and status not in REGION_STATUSES:
        raise errors.ValidationFailed(f"Unknown region status '{status}'",
                                      errors=[{"loc": ["body", "status"], "msg": f"one of {REGION_STATUSES}"}])
    with session_scope() as s:
        region = get_region(s, region_id)
        changes = _set_status(region, status, status_reason)
        if changes:
            emit(s, "region.updated", resource_type="region", resource_id=region.id, project_id=None,
                 actor=_actor(p), data=changes)
        return region


def zone_query(*, region: str | None = None, status: str | None = None) -> Select[Any]:
    stmt = select(Zone)
    if region:
        stmt = stmt.where(Zone.region_id == region)
    if status:
        stmt = stmt.where(Zone.status == status)
    return stmt


def get_zone(s: Session, zone_id: str) -> Zone:
    zone = s.get(Zone, zone_id)
    if zone is None:
        raise errors.NotFound(f"Zone {zone_id} not found")
    return zone


def region_statuses(s: Session) -> dict[str, str]:
    return dict(s.execute(select(Region.id, Region.status)).all())


def update_zone(p: Principal | None, zone_id: str, *, status: str | None = None,
                status_reason: str | None = None) -> Zone:
    if status is not None and status not in ZONE_STATUSES:
        raise errors.ValidationFailed(f"Unknown zone status '{status}'",
                                      errors=[{"loc": ["body", "status"], "msg": f"one of {ZONE_STATUSES}"}])
    with session_scope() as s:
        zone = get_zone(s, zone_id)
        changes = _set_status(zone, status, status_reason)
        if changes:
            emit(s, "zone.updated", resource_type="zone", resource_id=zone.id, project_id=None,
                 actor=_actor(p), data=changes)
        return zone


def _not_operational(kind: str, ident: str, status: str, reason: str, available_from: str = "") -> str:
    what = {"maintenance": "is in maintenance", "planned": "is not open yet (planned)",
            "retired": "is retired"}.get(status, f"is {status}")
    detail = f"{kind} {ident} {what}"
    if status == "planned" and available_from:
        detail += f", expected {available_from}"
    if reason:
        detail += f": {reason}"
    return detail + "; choose an operational region or zone (`hackboot region list --status operational`)"


def placeable_zone(session: Session, zone_id: str) -> Zone:
    """The zone, if new resources may be placed there; for the scheduler.

    Raises NotFound for an unknown zone (or a zone whose region vanished), and
    Conflict(code="region_not_operational") / Conflict(code="zone_not_operational") with a
    message naming the status, e.g. "Region LON1 is in maintenance".
    """
    zone = session.get(Zone, zone_id)
    if zone is None:
        raise errors.NotFound(f"Zone {zone_id} not found")
    region = session.get(Region, zone.region_id)
    if region is None:
        raise errors.NotFound(f"Region {zone.region_id} of zone {zone_id} not found")
    if region.status != OPERATIONAL:
        raise errors.Conflict(_not_operational("Region", region.id, region.status, region.status_reason,
                                               region.available_from), code="region_not_operational")
    if zone.status != OPERATIONAL:
        raise errors.Conflict(_not_operational("Zone", zone.id, zone.status, zone.status_reason),
                              code="zone_not_operational")
    return zone


def placeable_zones(session: Session, region_id: str | None = None) -> list[Zone]:
    """Zones where placement is allowed (operational zone in an operational region), by id."""
    stmt = (select(Zone).join(Region, Region.id == Zone.region_id)
            .where(Zone.status == OPERATIONAL, Region.status == OPERATIONAL).order_by(Zone.id))
    if region_id is not None:
        get_region(session, region_id)
        stmt = stmt.where(Zone.region_id == region_id)
    return list(session.scalars(stmt))


# --- flavors ---------------------------------------------------------------------------------------

def flavor_query(*, family: str | None = None, gpu_model: str | None = None, min_vcpus: int | None = None,
                 min_memory_mb: int | None = None, min_disk_gb: int | None = None, gpu: bool | None = None,
                 include_inactive: bool = False) -> Select[Any]:
    stmt = select(Flavor)
    if not include_inactive:
        stmt = stmt.where(Flavor.active.is_(True))
    if family:
        stmt = stmt.where(Flavor.family == family)
    if gpu_model:
        stmt = stmt.where(Flavor.gpu_model == gpu_model)
    if min_vcpus is not None:
        stmt = stmt.where(Flavor.vcpus >= min_vcpus)
    if min_memory_mb is not None:
        stmt = stmt.where(Flavor.memory_mb >= min_memory_mb)
    if min_disk_gb is not None:
        stmt = stmt.where(Flavor.disk_gb >= min_disk_gb)
    if gpu is True:
        stmt = stmt.where(Flavor.gpu_count > 0)
    elif gpu is False:
        stmt = stmt.where(Flavor.gpu_count == 0)
    return stmt


def get_flavor(s: Session, flavor_id: str) -> Flavor:
    flavor = s.get(Flavor, flavor_id)
    if flavor is None:
        raise errors.NotFound(f"Flavor {flavor_id} not found")
    return flavor


def flavor_hourly_prices(s: Session, flavor_ids: Iterable[str]) -> dict[str, float]:
    """The global (all-regions) hourly price of each flavor that has one."""
    ids = list(flavor_ids)
    if not ids:
        return {}
    rows = s.execute(select(Price.sku, Price.amount_eur).where(Price.sku.in_(ids), Price.region_id.is_(None)))
    return {sku: float(amount) for sku, amount in rows}


def create_flavor(p: Principal | None, *, id: str, family: str, vcpus: int, memory_mb: int, disk_gb: int,
                  gpu_model: str | None = None, gpu_count: int = 0, bandwidth_mbps: int = 1000,
                  description: str = "", source: str = "", price_eur_hour: float | None = None) -> Flavor:
    if (gpu_model is None) != (gpu_count == 0):
        raise errors.ValidationFailed("gpu_model and gpu_count go together: both set (GPU flavor) or neither",
                                      errors=[{"loc": ["body", "gpu_model"], "msg": "set with gpu_count >= 1"}])
    with session_scope() as s:
        _lock(s, f"flavor:{id}")
        if s.get(Flavor, id) is not None:
            raise errors.Conflict(f"Flavor {id} already exists (flavors are immutable: create a new one)",
                                  code="already_exists")
        flavor = Flavor(id=id, family=family, vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb,
                        gpu_model=gpu_model, gpu_count=gpu_count, bandwidth_mbps=bandwidth_mbps,
                        description=description, source=source or f"created by {_who(p)}", active=True)
        s.add(flavor)
        s.flush()
        emit(s, "flavor.created", resource_type="flavor", resource_id=id, project_id=None, actor=_actor(p),
             data={"vcpus": vcpus, "memory_mb": memory_mb, "disk_gb": disk_gb, "gpu_model": gpu_model,
                   "gpu_count": gpu_count})
        if price_eur_hour is not None:
            _upsert_price(s, p, sku=id, amount_eur=price_eur_hour, region_id=None, unit=None, kind="flavor",
                          description="")
        return flavor


def update_flavor(p: Principal | None, flavor_id: str, *, active: bool | None = None,
                  description: str | None = None) -> Flavor:
    """Flavors are immutable in size (instances and bills refer to them); only these fields change."""
    with session_scope() as s:
        flavor = get_flavor(s, flavor_id)
        changes: dict[str, Any] = {}
        if active is not None and active != flavor.active:
            changes["active"] = {"from": flavor.active, "to": active}
            flavor.active = active
        if description is not None and description != flavor.description:
            changes["description"] = {"from": flavor.description, "to": description}
            flavor.description = description
        if changes:
            emit(s, "flavor.updated", resource_type="flavor", resource_id=flavor.id, project_id=None,
                 actor=_actor(p), data=changes)
        return flavor


_CATALOG_TABLES = {"regions", "zones", "flavors", "prices", "hosts", "inventories", "allocations"}


def flavor_references(s: Session, flavor_id: str, metadata: Any = None) -> dict[str, int]:
    """Rows of other services that name this flavor: every table with a `flavor_id` column.

    Generic on purpose: the catalog imports no other service (compute, billing…) to know who uses a
    flavor; it asks the database for its tables (or looks at `metadata`'s), so a service added later
    is covered without touching this code.
    """
    inspector = inspect(s.connection())
    existing = set(inspector.get_table_names())
    if metadata is not None:
        tables = [t for t in metadata.sorted_tables if "flavor_id" in t.c and t.name in existing]
    else:
        tables = [table(name, column("flavor_id")) for name in sorted(existing)
                  if any(c["name"] == "flavor_id" for c in inspector.get_columns(name))]
    counts: dict[str, int] = {}
    for t in tables:
        if t.name in _CATALOG_TABLES:
            continue
        n = s.scalar(select(func.count()).select_from(t).where(t.c.flavor_id == flavor_id)) or 0
        if n:
            counts[t.name] = int(n)
    return counts


@dataclass
class FlavorDeletion:
    id: str
    outcome: str  # deleted | deactivated
    detail: str


def delete_flavor(p: Principal | None, flavor_id: str) -> FlavorDeletion:
    """Delete a flavor, or deactivate it when something refers to it or when it comes from the seed.

    A used flavor stays (deactivated) so that instances and invoices keep a meaning; a seeded one
    stays so that the next start does not seed it again (seeding inserts missing rows).
    """
    seeded = {f.id for f in seed_data.FLAVORS}
    with session_scope() as s:
        flavor = get_flavor(s, flavor_id)
        refs = flavor_references(s, flavor_id)
        if refs or flavor_id in seeded:
            why = (f"in use ({', '.join(f'{n} {t}' for t, n in sorted(refs.items()))})" if refs
                   else "part of the seed catalog")
            detail = f"Flavor {flavor_id} is {why}: deactivated instead of deleted (new instances cannot use it)"
            if flavor.active:
                flavor.active = False
                emit(s, "flavor.deactivated", resource_type="flavor", resource_id=flavor_id, project_id=None,
                     actor=_actor(p), data={"references": refs, "seeded": flavor_id in seeded})
            return FlavorDeletion(flavor_id, "deactivated", detail)
        for price in s.scalars(select(Price).where(Price.sku == flavor_id)):
            s.delete(price)
        s.delete(flavor)
        emit(s, "flavor.deleted", resource_type="flavor", resource_id=flavor_id, project_id=None,
             actor=_actor(p))
        return FlavorDeletion(flavor_id, "deleted", f"Flavor {flavor_id} and its prices deleted")


# --- prices ----------------------------------------------------------------------------------------

def price_page(s: Session, page: PageParams, *, sku: str | None = None, kind: str | None = None,
               region: str | None = None) -> tuple[list[Price], str | None]:
    """Prices ordered by (sku, region), keyset-paginated.

    With `region`: the prices that apply there, i.e. the region's own rows plus the global rows
    it does not override.
    """
    region_key = func.coalesce(Price.region_id, "")
    stmt = select(Price)
    if sku:
        stmt = stmt.where(Price.sku == sku)
    if kind:
        stmt = stmt.where(Price.kind == kind)
    if region:
        get_region(s, region)
        override = aliased(Price)
        stmt = stmt.where(or_(Price.region_id == region, and_(
            Price.region_id.is_(None),
            ~exists().where(override.sku == Price.sku, override.region_id == region))))
    after = page.after_id()
    if after is not None:
        last_sku, _, last_region = after.partition("\x1f")
        stmt = stmt.where(or_(Price.sku > last_sku, and_(Price.sku == last_sku, region_key > last_region)))
    rows = list(s.scalars(stmt.order_by(Price.sku, region_key).limit(page.limit + 1)))
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        last = rows[-1]
        return rows, encode_cursor(f"{last.sku}\x1f{last.region_id or ''}")
    return rows, None


def _kind_for(s: Session, sku: str) -> tuple[str, str]:
    existing = s.scalar(select(Price).where(Price.sku == sku).limit(1))
    if existing is not None:
        return existing.kind, existing.unit
    for prefix, kind_unit in SKU_PREFIXES.items():
        if sku.startswith(prefix):
            return kind_unit
    if s.get(Flavor, sku) is None:
        raise errors.NotFound(
            f"No flavor {sku}: a price's sku is a flavor id or starts with one of {', '.join(SKU_PREFIXES)}")
    return "flavor", "hour"


def _upsert_price(s: Session, p: Principal | None, *, sku: str, amount_eur: float, region_id: str | None,
                  unit: str | None, kind: str | None, description: str | None) -> tuple[Price, bool]:
    if region_id is not None:
        get_region(s, region_id)
    _lock(s, f"price:{sku}")
    inferred_kind, inferred_unit = _kind_for(s, sku)
    if kind is not None and kind != inferred_kind:
        raise errors.ValidationFailed(f"sku {sku} is priced as '{inferred_kind}', not '{kind}'",
                                      errors=[{"loc": ["body", "kind"], "msg": f"must be {inferred_kind}"}])
    if unit is not None and unit != inferred_unit:
        raise errors.ValidationFailed(f"sku {sku} is priced per '{inferred_unit}', not '{unit}'",
                                      errors=[{"loc": ["body", "unit"], "msg": f"must be {inferred_unit}"}])
    region_cond = Price.region_id.is_(None) if region_id is None else Price.region_id == region_id
    price = s.scalar(select(Price).where(Price.sku == sku, region_cond))
    created = price is None
    if price is None:
        price = Price(id=new_id("price"), sku=sku, kind=inferred_kind, region_id=region_id, unit=inferred_unit,
                      amount_eur=amount_eur, description=description or "")
        s.add(price)
        s.flush()
        emit(s, "price.created", resource_type="price", resource_id=price.id, project_id=None, actor=_actor(p),
             data={"sku": sku, "region_id": region_id, "amount_eur": amount_eur, "unit": inferred_unit})
        return price, True
    changes: dict[str, Any] = {}
    if float(price.amount_eur) != float(amount_eur):
        changes["amount_eur"] = {"from": float(price.amount_eur), "to": amount_eur}
        price.amount_eur = amount_eur
    if description is not None and description != price.description:
        changes["description"] = {"from": price.description, "to": description}
        price.description = description
    if changes:
        emit(s, "price.updated", resource_type="price", resource_id=price.id, project_id=None, actor=_actor(p),
             data={"sku": sku, "region_id": region_id, **changes})
    return price, created


def set_price(p: Principal | None, sku: str, amount_eur: float, *, region_id: str | None = None,
              unit: str | None = None, kind: str | None = None,
              description: str | None = None) -> tuple[Price, bool]:
    """Create or update the price of `sku` (globally, or for one region). Returns (price, created)."""
    with session_scope() as s:
        return _upsert_price(s, p, sku=sku, amount_eur=amount_eur, region_id=region_id, unit=unit, kind=kind,
                             description=description)


def delete_price(p: Principal | None, sku: str, region_id: str | None = None) -> None:
    """Remove a regional override, or a global price nobody needs (not a seeded one, not an active flavor's)."""
    with session_scope() as s:
        region_cond = Price.region_id.is_(None) if region_id is None else Price.region_id == region_id
        price = s.scalar(select(Price).where(Price.sku == sku, region_cond))
        if price is None:
            where = f" in {region_id}" if region_id else ""
            raise errors.NotFound(f"No price for {sku}{where}")
        if region_id is None:
            flavor = s.get(Flavor, sku)
            if flavor is not None and flavor.active:
                raise errors.Conflict(f"Flavor {sku} is active and needs a price: set another amount, or "
                                      f"deactivate the flavor first", code="price_required")
            if sku in {pr.sku for pr in seed_data.all_prices()}:
                raise errors.Conflict(f"{sku} is a seeded list price (it would come back at the next start): "
                                      f"set another amount instead", code="price_required")
        s.delete(price)
        emit(s, "price.deleted", resource_type="price", resource_id=price.id, project_id=None, actor=_actor(p),
             data={"sku": sku, "region_id": region_id})


# --- hosts -----------------------------------------------------------------------------------------

@dataclass
class GpuSpec:
    model: str
    count: int
    pci_addresses: list[str] = field(default_factory=list)


@dataclass
class InventoryView:
    resource_class: str
    total: int
    reserved: int
    allocation_ratio: float
    allocatable: int
    used: int
    free: int
    devices: list[str]
    devices_in_use: list[str]


@dataclass
class HostView:
    """A host with its inventories and what is allocated on it."""

    host: Host
    region_id: str
    inventories: list[InventoryView]

    def as_dict(self) -> dict[str, Any]:
        h = self.host
        return {"id": h.id, "name": h.name, "zone_id": h.zone_id, "region_id": self.region_id,
                "status": h.status, "status_reason": h.status_reason, "facts": h.facts, "agent_url": h.agent_url,
                "last_heartbeat_at": h.last_heartbeat_at, "generation": h.generation, "created_at": h.created_at,
                "inventories": [iv.__dict__ for iv in self.inventories]}


def _rc_order(resource_class: str) -> tuple[int, str]:
    if resource_class in RESOURCE_CLASSES:
        return RESOURCE_CLASSES.index(resource_class), ""
    return len(RESOURCE_CLASSES), resource_class


def host_query(*, zone: str | None = None, region: str | None = None, status: str | None = None,
               name: str | None = None) -> Select[Any]:
    stmt = select(Host)
    if zone:
        stmt = stmt.where(Host.zone_id == zone)
    if region:
        stmt = stmt.where(Host.zone_id.in_(select(Zone.id).where(Zone.region_id == region)))
    if status:
        stmt = stmt.where(Host.status == status)
    if name:
        stmt = stmt.where(Host.name == name)
    return stmt


def _host(s: Session, ref: str) -> Host:
    """A host by id, or by its (unique) name."""
    host = s.get(Host, ref) or s.scalar(select(Host).where(Host.name == ref))
    if host is None:
        raise errors.NotFound(f"Host {ref} not found")
    return host


def host_views(s: Session, hosts: Sequence[Host]) -> list[HostView]:
    ids = [h.id for h in hosts]
    if not ids:
        return []
    invs: dict[str, list[Inventory]] = defaultdict(list)
    for inv in s.scalars(select(Inventory).where(Inventory.host_id.in_(ids))):
        invs[inv.host_id].append(inv)
    used: dict[tuple[str, str], int] = defaultdict(int)
    devices: dict[tuple[str, str], list[str]] = defaultdict(list)
    for alloc in s.scalars(select(Allocation).where(Allocation.host_id.in_(ids))):
        used[alloc.host_id, alloc.resource_class] += alloc.amount
        devices[alloc.host_id, alloc.resource_class] += list(alloc.devices or [])
    zone_region = dict(s.execute(select(Zone.id, Zone.region_id).where(
        Zone.id.in_({h.zone_id for h in hosts}))).all())
    views = []
    for h in hosts:
        items = []
        for inv in sorted(invs[h.id], key=lambda i: _rc_order(i.resource_class)):
            cap = inv.capacity
            u = used[h.id, inv.resource_class]
            items.append(InventoryView(inv.resource_class, inv.total, inv.reserved, inv.allocation_ratio, cap, u,
                                       max(0, cap - u), list(inv.devices or []),
                                       sorted(devices[h.id, inv.resource_class])))
        views.append(HostView(h, zone_region.get(h.zone_id, ""), items))
    return views


def get_host(s: Session, ref: str) -> HostView:
    return host_views(s, [_host(s, ref)])[0]


def _host_view_after(host_id: str) -> HostView:
    with session_scope(write=False) as s:
        return get_host(s, host_id)


def _heartbeat_fresh(host: Host, now: dt.datetime) -> bool:
    last = host.last_heartbeat_at
    return last is not None and (now - last).total_seconds() <= get_settings().host_down_after_s


def _desired_inventory(vcpus: int, memory_mb: int, disk_gb: int,
                       gpus: Sequence[GpuSpec]) -> dict[str, tuple[int, list[str]]]:
    desired: dict[str, tuple[int, list[str]]] = {"VCPU": (vcpus, []), "MEMORY_MB": (memory_mb, []),
                                                 "DISK_GB": (disk_gb, [])}
    for i, gpu in enumerate(gpus):
        rc = GPU_PREFIX + gpu.model
        if rc in desired:
            raise errors.ValidationFailed(f"GPU model {gpu.model} is listed twice: give one entry per model",
                                          errors=[{"loc": ["body", "gpus", str(i), "model"], "msg": "duplicate"}])
        if gpu.pci_addresses and len(gpu.pci_addresses) != gpu.count:
            raise errors.ValidationFailed(
                f"GPU {gpu.model}: {gpu.count} devices but {len(gpu.pci_addresses)} PCI addresses",
                errors=[{"loc": ["body", "gpus", str(i), "pci_addresses"], "msg": "one address per device"}])
        if len(set(gpu.pci_addresses)) != len(gpu.pci_addresses):
            raise errors.ValidationFailed(f"GPU {gpu.model}: duplicate PCI addresses",
                                          errors=[{"loc": ["body", "gpus", str(i), "pci_addresses"],
                                                   "msg": "duplicate"}])
        desired[rc] = (gpu.count, list(gpu.pci_addresses))
    all_addresses = [a for _, devs in desired.values() for a in devs]
    if len(set(all_addresses)) != len(all_addresses):
        raise errors.ValidationFailed("A PCI address is listed under two GPU models",
                                      errors=[{"loc": ["body", "gpus"], "msg": "duplicate PCI address"}])
    return desired


def _check_ratio(rc: str, ratio: float) -> None:
    if rc.startswith(GPU_PREFIX) and ratio != 1.0:
        raise errors.ValidationFailed(f"{rc}: GPUs are passed through whole, their allocation_ratio stays 1.0",
                                      errors=[{"loc": ["body", "allocation_ratio", rc], "msg": "must be 1.0"}])
    if not 0 < ratio <= MAX_ALLOCATION_RATIO:
        raise errors.ValidationFailed(f"{rc}: allocation_ratio must be in (0, {MAX_ALLOCATION_RATIO}]",
                                      errors=[{"loc": ["body", "allocation_ratio", rc], "msg": "out of range"}])


def _used_by_class(s: Session, host_id: str) -> dict[str, int]:
    rows = s.execute(select(Allocation.resource_class, func.sum(Allocation.amount))
                     .where(Allocation.host_id == host_id).group_by(Allocation.resource_class))
    return {rc: int(n or 0) for rc, n in rows}


def register_host(p: Principal | None, *, name: str, zone_id: str, vcpus: int, memory_mb: int, disk_gb: int,
                  gpus: Sequence[GpuSpec] = (), facts: Mapping[str, Any] | None = None, agent_url: str = "",
                  allocation_ratio: float | None = None,
                  reserved: Mapping[str, int] | None = None) -> tuple[HostView, bool]:
    """Register a host, or re-register it by name (an agent restarting). Returns (view, created).

    Re-registration replaces the inventory totals, GPU devices, facts and agent_url with what the
    host reports, and counts as a heartbeat. It keeps the administrator's allocation ratios and
    reservations unless `allocation_ratio` / `reserved` are given, and keeps a `disabled` host disabled.
    `allocation_ratio` applies to VCPU, MEMORY_MB and DISK_GB; GPUs always have 1.0.
    """
    desired = _desired_inventory(vcpus, memory_mb, disk_gb, gpus)
    if allocation_ratio is not None:
        _check_ratio("VCPU", allocation_ratio)
    for rc, amount in (reserved or {}).items():
        if rc not in desired:
            raise errors.ValidationFailed(f"reserved: the host has no {rc}",
                                          errors=[{"loc": ["body", "reserved", rc], "msg": "unknown class"}])
        if not 0 <= amount <= desired[rc][0]:
            raise errors.ValidationFailed(f"reserved {rc}: {amount} is not within 0..{desired[rc][0]}",
                                          errors=[{"loc": ["body", "reserved", rc], "msg": "out of range"}])
    now = utcnow()
    with session_scope() as s:
        get_zone(s, zone_id)
        _lock(s, f"host:{name}")
        host = s.scalar(select(Host).where(Host.name == name))
        created = host is None
        if host is None:
            host = Host(id=new_id("host"), name=name, zone_id=zone_id, status="up", status_reason="",
                        facts=dict(facts or {}), agent_url=agent_url, last_heartbeat_at=now, generation=0)
            s.add(host)
            s.flush()
            for rc, (total, devs) in desired.items():
                ratio = 1.0 if rc.startswith(GPU_PREFIX) else (allocation_ratio or 1.0)
                s.add(Inventory(host_id=host.id, resource_class=rc, total=total,
                                reserved=(reserved or {}).get(rc, 0), allocation_ratio=ratio, devices=devs))
            emit(s, "host.registered", resource_type="host", resource_id=host.id, project_id=None,
                 actor=_actor(p), data={"name": name, "zone_id": zone_id,
                                        "inventory": {rc: t for rc, (t, _) in desired.items()}})
            host_id = host.id
        else:
            host_id = host.id
            _reregister(s, p, host, now, zone_id=zone_id, desired=desired, facts=dict(facts or {}),
                        agent_url=agent_url, allocation_ratio=allocation_ratio, reserved=reserved)
    return _host_view_after(host_id), created


def _reregister(s: Session, p: Principal | None, host: Host, now: dt.datetime, *, zone_id: str,
                desired: dict[str, tuple[int, list[str]]], facts: dict[str, Any], agent_url: str,
                allocation_ratio: float | None, reserved: Mapping[str, int] | None) -> None:
    used = _used_by_class(s, host.id)
    changes: dict[str, Any] = {}
    if zone_id != host.zone_id:
        if any(used.values()):
            raise errors.Conflict(f"Host {host.name} has allocations in zone {host.zone_id}: it cannot move to "
                                  f"{zone_id} until they are gone", code="host_in_use")
        changes["zone_id"] = {"from": host.zone_id, "to": zone_id}
        host.zone_id = zone_id
    current = {inv.resource_class: inv for inv in s.scalars(select(Inventory).where(Inventory.host_id == host.id))}
    inventory_changed = False
    for rc, (total, devs) in desired.items():
        inv = current.pop(rc, None)
        if inv is None:
            ratio = 1.0 if rc.startswith(GPU_PREFIX) else (allocation_ratio or 1.0)
            s.add(Inventory(host_id=host.id, resource_class=rc, total=total,
                            reserved=(reserved or {}).get(rc, 0), allocation_ratio=ratio, devices=devs))
            changes[rc] = {"from": None, "to": total}
            inventory_changed = True
            continue
        if inv.total != total or list(inv.devices or []) != devs:
            changes[rc] = {"from": inv.total, "to": total}
            inv.total, inv.devices = total, devs
            inventory_changed = True
        if allocation_ratio is not None and not rc.startswith(GPU_PREFIX) and inv.allocation_ratio != allocation_ratio:
            changes.setdefault(rc, {})["allocation_ratio"] = allocation_ratio
            inv.allocation_ratio = allocation_ratio
            inventory_changed = True
        if reserved is not None and rc in reserved and inv.reserved != reserved[rc]:
            changes.setdefault(rc, {})["reserved"] = reserved[rc]
            inv.reserved = reserved[rc]
            inventory_changed = True
        inv.reserved = min(inv.reserved, inv.total)
    for rc, inv in current.items():  # no longer reported by the host
        changes[rc] = {"from": inv.total, "to": 0}
        inventory_changed = True
        if used.get(rc):
            inv.total, inv.reserved, inv.devices = 0, 0, []  # keep the row while allocations refer to it
        else:
            s.delete(inv)
    for rc, amount in used.items():
        d = desired.get(rc)
        if amount and (d is None or d[0] < amount):
            log.warning("host %s re-registered with less %s (%s) than allocated (%s)", host.name, rc,
                        d[0] if d else 0, amount)
    if facts != host.facts:
        host.facts = facts
        changes["facts"] = "replaced"
    if agent_url != host.agent_url:
        changes["agent_url"] = {"from": host.agent_url, "to": agent_url}
        host.agent_url = agent_url
    host.last_heartbeat_at = now
    if host.status == "down":
        host.status, host.status_reason = "up", ""
        inventory_changed = True
        emit(s, "host.up", resource_type="host", resource_id=host.id, project_id=None, actor=_actor(p),
             data={"name": host.name, "via": "registration"})
    if inventory_changed:
        host.generation += 1
    if changes:
        emit(s, "host.reregistered", resource_type="host", resource_id=host.id, project_id=None,
             actor=_actor(p), data={"name": host.name, "changes": changes})


def update_host(p: Principal | None, ref: str, *, status: str | None = None, status_reason: str | None = None,
                allocation_ratio: Mapping[str, float] | None = None,
                reserved: Mapping[str, int] | None = None) -> HostView:
    """Enable/disable a host, and set allocation ratios and reservations per resource class.

    `status="up"` means "enabled": the host is up if its heartbeat is fresh, else down until its
    next heartbeat. A change that would leave less allocatable than already allocated is refused.
    """
    if status is not None and status not in ("up", "disabled"):
        raise errors.ValidationFailed("status may be set to 'up' or 'disabled' ('down' is observed)",
                                      errors=[{"loc": ["body", "status"], "msg": "up or disabled"}])
    now = utcnow()
    with session_scope() as s:
        host = _host(s, ref)
        invs = {inv.resource_class: inv for inv in s.scalars(select(Inventory).where(Inventory.host_id == host.id))}
        used = _used_by_class(s, host.id)
        changes: dict[str, Any] = {}
        for what, values in (("allocation_ratio", allocation_ratio or {}), ("reserved", reserved or {})):
            for rc in values:
                if rc not in invs:
                    raise errors.ValidationFailed(
                        f"{what}: host {host.name} has no {rc} (it has {', '.join(sorted(invs))})",
                        errors=[{"loc": ["body", what, rc], "msg": "unknown resource class on this host"}])
        for rc, inv in invs.items():
            ratio = (allocation_ratio or {}).get(rc, inv.allocation_ratio)
            res = (reserved or {}).get(rc, inv.reserved)
            if rc in (allocation_ratio or {}):
                _check_ratio(rc, ratio)
            if not 0 <= res <= inv.total:
                raise errors.ValidationFailed(f"reserved {rc}: {res} is not within 0..{inv.total}",
                                              errors=[{"loc": ["body", "reserved", rc], "msg": "out of range"}])
            if ratio == inv.allocation_ratio and res == inv.reserved:
                continue
            new_cap = allocatable(inv.total, res, ratio)
            if new_cap < used.get(rc, 0):
                raise errors.Conflict(f"{rc} on {host.name}: {used[rc]} already allocated, the change would leave "
                                      f"only {new_cap} allocatable", code="capacity_in_use")
            changes[rc] = {"allocation_ratio": ratio, "reserved": res, "allocatable": new_cap}
            inv.allocation_ratio, inv.reserved = ratio, res
        if changes:
            host.generation += 1
            emit(s, "host.updated", resource_type="host", resource_id=host.id, project_id=None, actor=_actor(p),
                 data={"name": host.name, "inventory": changes})
        if status == "disabled" and host.status != "disabled":
            host.status = "disabled"
            host.status_reason = status_reason or f"Disabled by {_who(p)}"
            host.generation += 1
            emit(s, "host.disabled", resource_type="host", resource_id=host.id, project_id=None, actor=_actor(p),
                 data={"name": host.name, "reason": host.status_reason})
        elif status == "up" and host.status == "disabled":
            fresh = _heartbeat_fresh(host, now)
            host.status = "up" if fresh else "down"
            host.status_reason = status_reason or ("" if fresh else "Enabled, but no recent heartbeat")
            host.generation += 1
            emit(s, "host.enabled", resource_type="host", resource_id=host.id, project_id=None, actor=_actor(p),
                 data={"name": host.name, "status": host.status})
        elif status_reason is not None and status_reason != host.status_reason:
            host.status_reason = status_reason
            emit(s, "host.updated", resource_type="host", resource_id=host.id, project_id=None, actor=_actor(p),
                 data={"name": host.name, "status_reason": status_reason})
        host_id = host.id
    return _host_view_after(host_id)


def heartbeat(p: Principal | None, ref: str, facts: Mapping[str, Any] | None = None) -> Host:
    """The agent is alive: record the time, merge the facts it reports, bring a `down` host back `up`."""
    now = utcnow()
    with session_scope() as s:
        host = _host(s, ref)
        host.last_heartbeat_at = now
        if facts:
            host.facts = {**(host.facts or {}), **facts}
        if host.status == "down":
            host.status, host.status_reason = "up", ""
            host.generation += 1
            emit(s, "host.up", resource_type="host", resource_id=host.id, project_id=None, actor=_actor(p),
                 data={"name": host.name})
        return host


def delete_host(p: Principal | None, ref: str) -> None:
    with session_scope() as s:
        host = _host(s, ref)
        n = s.scalar(select(func.count()).select_from(Allocation).where(Allocation.host_id == host.id)) or 0
        if n:
            consumers = s.scalar(select(func.count(func.distinct(Allocation.consumer_id)))
                                 .where(Allocation.host_id == host.id)) or 0
            raise errors.Conflict(f"Host {host.name} still holds allocations of {consumers} consumer(s): move or "
                                  f"delete them first (or disable the host)", code="host_in_use")
        for inv in s.scalars(select(Inventory).where(Inventory.host_id == host.id)):
            s.delete(inv)
        s.delete(host)
        emit(s, "host.deleted", resource_type="host", resource_id=host.id, project_id=None, actor=_actor(p),
             data={"name": host.name, "zone_id": host.zone_id})


def mark_stale_hosts_down(now: dt.datetime | None = None) -> list[str]:
    """Hosts `up` whose last heartbeat is older than `host_down_after_s` become `down` (event host.down).

    A cheap read finds candidates; the write re-checks each one so a heartbeat that lands in
    between wins. Disabled hosts stay disabled (an administrator's decision).
    """
    threshold = get_settings().host_down_after_s
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=threshold)
    stale = or_(Host.last_heartbeat_at < cutoff, and_(Host.last_heartbeat_at.is_(None), Host.created_at < cutoff))
    with session_scope(write=False) as s:
        candidates = list(s.scalars(select(Host.id).where(Host.status == "up", stale)))
    if not candidates:
        return []
    downed = []
    with session_scope() as s:
        for host in s.scalars(select(Host).where(Host.id.in_(candidates), Host.status == "up", stale)):
            last = host.last_heartbeat_at
            age = (now - last).total_seconds() if last else (now - host.created_at).total_seconds()
            host.status = "down"
            host.status_reason = (f"No heartbeat for {age:.0f}s (limit {threshold:g}s); last "
                                  f"{last.isoformat(timespec='seconds') if last else 'never'}")
            host.generation += 1
            emit(s, "host.down", resource_type="host", resource_id=host.id, project_id=None,
                 data={"name": host.name, "last_heartbeat_at": last.isoformat() if last else None,
                       "threshold_s": threshold})
            downed.append(host.id)
    for host_id in downed:
        log.warning("host %s marked down: no heartbeat for over %gs", host_id, threshold)
    return downed


def loops() -> list[Loop]:
    threshold = get_settings().host_down_after_s
    return [Loop("catalog-host-liveness", mark_stale_hosts_down, interval_s=min(5.0, max(0.5, threshold / 4)))]


# --- capacity report -------------------------------------------------------------------------------

@dataclass
class Figures:
    """One resource class in one scope. `free` never counts a host's overcommit against another host."""

    resource_class: str
    total: int = 0
    reserved: int = 0
    allocatable: int = 0
    used: int = 0
    free: int = 0
    schedulable: int = 0  # free on up hosts in operational zones of operational regions

    @property
    def utilisation_pct(self) -> float | None:
        if self.allocatable <= 0:
            return None if self.used == 0 else 100.0
        return round(100.0 * self.used / self.allocatable, 1)

    def add(self, total: int, reserved: int, ratio: float, used: int, schedulable: bool) -> None:
        cap = allocatable(total, reserved, ratio)
        free = max(0, cap - used)
        self.total += total
        self.reserved += reserved
        self.allocatable += cap
        self.used += used
        self.free += free
        if schedulable:
            self.schedulable += free


@dataclass
class Scope:
    id: str
    kind: str  # cloud | region | zone
    status: str
    hosts: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0, "disabled": 0})
    resources: dict[str, Figures] = field(default_factory=dict)
    zones: list[Scope] = field(default_factory=list)

    def figures(self, rc: str) -> Figures:
        if rc not in self.resources:
            self.resources[rc] = Figures(rc)
        return self.resources[rc]

    def ordered(self) -> list[Figures]:
        for rc in RESOURCE_CLASSES:
            self.figures(rc)
        return [self.resources[rc] for rc in sorted(self.resources, key=_rc_order)]


@dataclass(frozen=True)
class InvRow:
    host_id: str
    resource_class: str
    total: int
    reserved: int
    allocation_ratio: float


def build_capacity(regions: Sequence[tuple[str, str]], zones: Sequence[tuple[str, str, str]],
                   hosts: Sequence[tuple[str, str, str]], inventories: Sequence[InvRow],
                   used: Mapping[tuple[str, str], int]) -> tuple[Scope, list[Scope]]:
    """Pure: aggregate inventories and allocations per zone, region and cloud.

    regions: (id, status); zones: (id, region_id, status); hosts: (id, zone_id, status);
    used: (host_id, resource_class) → amount allocated. Returns (cloud total, regions with zones).
    """
    cloud = Scope("all", "cloud", "")
    region_scopes = {rid: Scope(rid, "region", status) for rid, status in regions}
    region_ok = {rid: status == OPERATIONAL for rid, status in regions}
    zone_scopes: dict[str, Scope] = {}
    zone_ok: dict[str, bool] = {}
    for zid, rid, status in zones:
        if rid in region_scopes:
            # A zone shows its region's status when the region is not operational (effective status).
            shown = status if region_ok[rid] else region_scopes[rid].status
            zone_scopes[zid] = Scope(zid, "zone", shown)
            region_scopes[rid].zones.append(zone_scopes[zid])
            zone_ok[zid] = status == OPERATIONAL and region_ok[rid]
    zone_region = {zid: rid for zid, rid, _ in zones}
    host_info = {hid: (zid, status) for hid, zid, status in hosts if zid in zone_scopes}
    for _, zid, status in hosts:
        if zid not in zone_scopes:
            continue
        for scope in (zone_scopes[zid], region_scopes[zone_region[zid]], cloud):
            scope.hosts[status] = scope.hosts.get(status, 0) + 1
    seen: set[tuple[str, str]] = set()
    for inv in inventories:
        if inv.host_id not in host_info:
            continue
        zid, status = host_info[inv.host_id]
        u = used.get((inv.host_id, inv.resource_class), 0)
        seen.add((inv.host_id, inv.resource_class))
        ok = status == "up" and zone_ok[zid]
        for scope in (zone_scopes[zid], region_scopes[zone_region[zid]], cloud):
            scope.figures(inv.resource_class).add(inv.total, inv.reserved, inv.allocation_ratio, u, ok)
    for (host_id, rc), u in used.items():  # allocations without an inventory row still count as used
        if (host_id, rc) not in seen and host_id in host_info and u:
            zid = host_info[host_id][0]
            for scope in (zone_scopes[zid], region_scopes[zone_region[zid]], cloud):
                scope.figures(rc).add(0, 0, 1.0, u, False)
    ordered = [region_scopes[rid] for rid, _ in regions]
    for r in ordered:
        r.zones.sort(key=lambda z: z.id)
    return cloud, ordered


def capacity(s: Session, *, region: str | None = None, zone: str | None = None) -> tuple[Scope, list[Scope]]:
    """Capacity vs used per region and zone (and cloud-wide over the selection)."""
    region_stmt = select(Region.id, Region.status).order_by(Region.id)
    zone_stmt = select(Zone.id, Zone.region_id, Zone.status)
    if zone:
        z = get_zone(s, zone)
        if region and z.region_id != region:
            raise errors.NotFound(f"Zone {zone} is not in region {region}")
        region = z.region_id
        zone_stmt = zone_stmt.where(Zone.id == zone)
    if region:
        get_region(s, region)
        region_stmt = region_stmt.where(Region.id == region)
        zone_stmt = zone_stmt.where(Zone.region_id == region)
    regions = list(s.execute(region_stmt))
    zones = list(s.execute(zone_stmt))
    zone_ids = [z[0] for z in zones]
    hosts = list(s.execute(select(Host.id, Host.zone_id, Host.status).where(Host.zone_id.in_(zone_ids))))
    host_ids = [h[0] for h in hosts]
    invs = [InvRow(*row) for row in s.execute(
        select(Inventory.host_id, Inventory.resource_class, Inventory.total, Inventory.reserved,
               Inventory.allocation_ratio).where(Inventory.host_id.in_(host_ids)))]
    used = {(h, rc): int(n or 0) for h, rc, n in s.execute(
        select(Allocation.host_id, Allocation.resource_class, func.sum(Allocation.amount))
        .where(Allocation.host_id.in_(host_ids)).group_by(Allocation.host_id, Allocation.resource_class))}
    return build_capacity(regions, zones, hosts, invs, used)
