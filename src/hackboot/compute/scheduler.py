"""Placement: choose a host for an instance and claim its resources atomically in the database.

The model is OpenStack Placement's (resource providers): every host is a provider with an
inventory per resource class (``VCPU``, ``MEMORY_MB``, ``DISK_GB``, ``GPU:<model>``) and an
``allocation_ratio`` (1.0 by default: the seed promises no overselling); an instance is a
*consumer* holding ``Allocation`` rows on one host.

Claiming is optimistic concurrency on the host's ``generation``:

1. read the candidate hosts **with their generation first**, then their inventories and usage;
2. filter (zone, host up, capacity, GPU model, server-group policy) and weigh (spread or pack);
3. ``UPDATE hosts SET generation = g + 1 WHERE id = :host AND generation = g`` – the
   compare-and-swap. Zero rows means someone else claimed on that host since we read it: re-read
   and retry. One row means we now own the host's row until commit (PostgreSQL row lock; on
   SQLite the whole write transaction is serialised by BEGIN IMMEDIATE);
4. with the host owned, recompute that host's usage from the allocations (the source of truth)
   and check the request still fits – then insert the allocation rows.

Reading the generation before the usage is what makes this safe on PostgreSQL's READ COMMITTED:
any allocation committed after our read bumped the generation, so our CAS fails.

For speed, usage and inventories per host are cached in the process keyed by the host's
generation: a placement re-reads only the hosts whose generation moved (usually one), so the
cost does not grow with the number of instances. The authoritative check in step 4 does not use
the cache, so a stale cache can cost a retry, never an overcommit.

Every writer of allocations must bump the host's generation (``claim``, ``claim_resize``, ``restore_allocation`` and
``free`` here do).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, insert, select, update
from sqlalchemy.orm import Session

from hackboot.catalog.models import Allocation, Host, Inventory, allocatable
from hackboot.core import errors

log = logging.getLogger("hackboot.scheduler")

VCPU, MEMORY_MB, DISK_GB = "VCPU", "MEMORY_MB", "DISK_GB"
MAX_ATTEMPTS = 25
SPREAD_TIE = 0.02  # spread: pick at random among near-equal best hosts, so concurrent claims rarely collide


def gpu_class(model: str) -> str:
    return f"GPU:{model}"


@dataclass
class Request:
    """What one instance needs."""

    consumer_id: str
    project_id: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    gpu_model: str | None = None
    gpu_count: int = 0
    zone_ids: list[str] = field(default_factory=list)  # candidate zones (already checked operational)
    # server-group policy and the hosts its other members run on
    group_policy: str | None = None
    group_hosts: set[str] = field(default_factory=set)
    weigher: str = "spread"  # spread | pack

    def resources(self) -> dict[str, int]:
        res = {VCPU: self.vcpus, MEMORY_MB: self.memory_mb, DISK_GB: self.disk_gb}
        if self.gpu_model and self.gpu_count > 0:
            res[gpu_class(self.gpu_model)] = self.gpu_count
        return {k: v for k, v in res.items() if v > 0}


@dataclass
class Placement:
    host_id: str
    host_name: str
    zone_id: str
    resources: dict[str, int]
    gpu_devices: list[str]
    attempts: int


@dataclass
class _HostView:
    generation: int
    capacity: dict[str, int]  # per resource class, after reserved and allocation ratio
    used: dict[str, int]
    devices: dict[str, list[str]]  # GPU class -> PCI addresses


class _Cache:
    """Per-process cache of host inventories and usage, valid for one host generation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[str, _HostView] = {}

    def get(self, host_id: str, generation: int) -> _HostView | None:
        with self._lock:
            view = self._views.get(host_id)
        return view if view is not None and view.generation == generation else None

    def put(self, host_id: str, view: _HostView) -> None:
        with self._lock:
            self._views[host_id] = view

    def clear(self) -> None:
        with self._lock:
            self._views.clear()


_cache = _Cache()


def clear_cache() -> None:
    _cache.clear()


def _load_views(session: Session, host_gens: dict[str, int]) -> dict[str, _HostView]:
    """Inventory and usage for these hosts; cached ones are reused if their generation matches."""
    views: dict[str, _HostView] = {}
    missing = []
    for host_id, gen in host_gens.items():
        view = _cache.get(host_id, gen)
        if view is None:
            missing.append(host_id)
        else:
            views[host_id] = view
    if missing:
        for chunk_start in range(0, len(missing), 500):
            chunk = missing[chunk_start:chunk_start + 500]
            fresh = {h: _HostView(host_gens[h], {}, {}, {}) for h in chunk}
            for host_id, rc, total, reserved, ratio, devs in session.execute(
                    select(Inventory.host_id, Inventory.resource_class, Inventory.total, Inventory.reserved,
                           Inventory.allocation_ratio, Inventory.devices).where(Inventory.host_id.in_(chunk))):
                fresh[host_id].capacity[rc] = allocatable(total, reserved, ratio)
                if devs:
                    fresh[host_id].devices[rc] = list(devs)
            rows = session.execute(
                select(Allocation.host_id, Allocation.resource_class, func.sum(Allocation.amount))
                .where(Allocation.host_id.in_(chunk)).group_by(Allocation.host_id, Allocation.resource_class))
            for host_id, rc, used in rows:
                fresh[host_id].used[rc] = int(used or 0)
            for host_id, view in fresh.items():
                _cache.put(host_id, view)
                views[host_id] = view
    return views


def _usage_now(session: Session, host_id: str, exclude_consumer: str | None = None) -> dict[str, int]:
    stmt = (select(Allocation.resource_class, func.sum(Allocation.amount))
            .where(Allocation.host_id == host_id).group_by(Allocation.resource_class))
    if exclude_consumer is not None:
        stmt = stmt.where(Allocation.consumer_id != exclude_consumer)
    return {rc: int(used or 0) for rc, used in session.execute(stmt)}


def _fits(capacity: dict[str, int], used: dict[str, int], wanted: dict[str, int]) -> str | None:
    """None when `wanted` fits, else the first resource class that does not."""
    for rc, amount in wanted.items():
        if used.get(rc, 0) + amount > capacity.get(rc, 0):
            return rc
    return None


def _weigh(view: _HostView, wanted: dict[str, int], weigher: str) -> float:
    ratios = []
    for rc in (VCPU, MEMORY_MB):
        cap = view.capacity.get(rc, 0)
        if cap > 0:
            ratios.append((cap - view.used.get(rc, 0) - wanted.get(rc, 0)) / cap)
    free = sum(ratios) / len(ratios) if ratios else 0.0
    return free if weigher == "spread" else -free


def _describe_shortfall(wanted: dict[str, int], reasons: dict[str, int], hosts: int) -> str:
    if hosts == 0:
        return "no host is up in the requested zone(s)"
    parts = ", ".join(f"{rc} on {n} host(s)" for rc, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    need = ", ".join(f"{rc}={amount}" for rc, amount in wanted.items())
    return f"no host has room for {need} (short of {parts})"


def _candidates(session: Session, req: Request, wanted: dict[str, int],
                hosts: list[tuple[str, str, str, int]]) -> tuple[list[tuple[float, str]], dict[str, int]]:
    views = _load_views(session, {h[0]: h[3] for h in hosts})
    wants_gpu = any(rc.startswith("GPU:") for rc in wanted)
    shortfalls: dict[str, int] = {}
    scored: list[tuple[float, str]] = []
    for host_id, _name, _zone, _gen in hosts:
        if req.group_policy == "affinity" and req.group_hosts and host_id not in req.group_hosts:
            shortfalls["server-group affinity"] = shortfalls.get("server-group affinity", 0) + 1
            continue
        if req.group_policy == "anti-affinity" and host_id in req.group_hosts:
            shortfalls["server-group anti-affinity"] = shortfalls.get("server-group anti-affinity", 0) + 1
            continue
        view = views[host_id]
        if not wants_gpu and any(rc.startswith("GPU:") and cap > 0 for rc, cap in view.capacity.items()):
            # GPU hosts are kept for GPU flavors: CPU-only instances there would strand their GPUs
            shortfalls["GPU host kept for GPU flavors"] = shortfalls.get("GPU host kept for GPU flavors", 0) + 1
            continue
        short = _fits(view.capacity, view.used, wanted)
        if short is not None:
            shortfalls[short] = shortfalls.get(short, 0) + 1
            continue
        scored.append((_weigh(view, wanted, req.weigher), host_id))
    scored.sort(key=lambda s: s[0], reverse=True)
    return scored, shortfalls


def _pick_devices(session: Session, host_id: str, rc: str, count: int, inventory_devices: list[str],
                  exclude_consumer: str | None = None) -> list[str]:
    stmt = select(Allocation.devices).where(Allocation.host_id == host_id, Allocation.resource_class == rc)
    if exclude_consumer is not None:
        stmt = stmt.where(Allocation.consumer_id != exclude_consumer)
    taken = {d for devs in session.scalars(stmt) for d in (devs or [])}
    free = [d for d in inventory_devices if d not in taken]
    return free[:count] if len(free) >= count else []


def _cas(session: Session, host_id: str, generation: int) -> bool:
    # An UPDATE's result is a CursorResult (it has the row count); Session.execute is typed for any statement.
    result = cast("CursorResult[Any]", session.execute(
        update(Host).where(Host.id == host_id, Host.generation == generation).values(generation=generation + 1)))
    return result.rowcount == 1


@dataclass
class _Inv:
    capacity: int
    devices: list[str]


def _inventory(session: Session, host_id: str) -> dict[str, _Inv]:
    rows = session.execute(select(Inventory.resource_class, Inventory.total, Inventory.reserved,
                                  Inventory.allocation_ratio, Inventory.devices).where(Inventory.host_id == host_id))
    return {rc: _Inv(allocatable(total, reserved, ratio), list(devs or []))
            for rc, total, reserved, ratio, devs in rows}


def _write(session: Session, host_id: str, consumer_id: str, project_id: str, wanted: dict[str, int],
           devices: dict[str, list[str]]) -> None:
    session.execute(insert(Allocation), [
        {"consumer_id": consumer_id, "host_id": host_id, "resource_class": rc, "amount": amount,
         "project_id": project_id, "devices": devices.get(rc, [])} for rc, amount in wanted.items()])


def place(session: Session, req: Request) -> Placement:
    """Choose a host and claim `req` on it, in the caller's transaction; raise NoCapacity otherwise."""
    wanted = req.resources()
    if not req.zone_ids:
        raise errors.NoCapacity("No zone to place the instance in")
    excluded: set[str] = set()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        # (1) hosts with their generation, read before any usage
        hosts = session.execute(
            select(Host.id, Host.name, Host.zone_id, Host.generation)
            .where(Host.zone_id.in_(req.zone_ids), Host.status == "up")).tuples().all()
        hosts = [h for h in hosts if h[0] not in excluded]
        scored, shortfalls = _candidates(session, req, wanted, hosts)
        if not scored:
            raise errors.NoCapacity(
                f"No capacity for {req.consumer_id}: {_describe_shortfall(wanted, shortfalls, len(hosts))}")
        if req.weigher == "spread":
            best = scored[0][0]
            pick = random.choice([h for score, h in scored if score >= best - SPREAD_TIE])
        else:
            pick = scored[0][1]
        host = next(h for h in hosts if h[0] == pick)
        host_id, host_name, zone_id, generation = host
        if not _cas(session, host_id, generation):
            log.debug("generation conflict on %s (attempt %d)", host_name, attempt)
            continue  # someone claimed there since our read: re-read everything
        # (4) we own the host until commit: authoritative check from the allocations table
        inventory = _inventory(session, host_id)
        capacity = {rc: inv.capacity for rc, inv in inventory.items()}
        used = _usage_now(session, host_id)
        view = _HostView(generation + 1, capacity, used,
                         {rc: list(inv.devices) for rc, inv in inventory.items() if inv.devices})
        _cache.put(host_id, view)
        if _fits(capacity, used, wanted) is not None:
            excluded.add(host_id)  # stale cache: that host is full after all
            continue
        devices: dict[str, list[str]] = {}
        for rc, amount in wanted.items():
            if rc.startswith("GPU:") and inventory[rc].devices:
                picked = _pick_devices(session, host_id, rc, amount, list(inventory[rc].devices))
                if not picked:
                    excluded.add(host_id)
                    break
                devices[rc] = picked
        else:
            _write(session, host_id, req.consumer_id, req.project_id, wanted, devices)
            used_after = dict(used)
            for rc, amount in wanted.items():
                used_after[rc] = used_after.get(rc, 0) + amount
            _cache.put(host_id, _HostView(generation + 1, capacity, used_after, view.devices))
            gpus = [d for devs in devices.values() for d in devs]
            return Placement(host_id, host_name, zone_id, wanted, gpus, attempt)
    raise errors.NoCapacity(f"No capacity for {req.consumer_id}: too many concurrent claims, try again",
                            code="no_capacity")


def claim_resize(session: Session, consumer_id: str, project_id: str, host_id: str,
                 wanted: dict[str, int]) -> list[str]:
    """Replace a consumer's allocation on its host with `wanted` (resize in place).

    Re-checks capacity against everyone else's allocations under the host generation CAS.
    Returns the GPU PCI addresses now held. Raises NoCapacity when the host has no room.
    """
    for _attempt in range(MAX_ATTEMPTS):
        generation = session.scalar(select(Host.generation).where(Host.id == host_id))
        if generation is None:
            raise errors.NoCapacity(f"Host {host_id} of {consumer_id} no longer exists")
        if not _cas(session, host_id, generation):
            continue
        inventory = _inventory(session, host_id)
        capacity = {rc: inv.capacity for rc, inv in inventory.items()}
        used = _usage_now(session, host_id, exclude_consumer=consumer_id)
        short = _fits(capacity, used, wanted)
        if short is not None:
            free = capacity.get(short, 0) - used.get(short, 0)
            raise errors.NoCapacity(
                f"Not enough {short} on the instance's host for this resize: {wanted[short]} needed, {free} free")
        current = {a.resource_class: a for a in session.scalars(
            select(Allocation).where(Allocation.consumer_id == consumer_id, Allocation.host_id == host_id))}
        devices: dict[str, list[str]] = {}
        for rc, amount in wanted.items():
            if rc.startswith("GPU:") and rc in inventory and inventory[rc].devices:
                keep = list(current[rc].devices)[:amount] if rc in current else []
                extra = _pick_devices(session, host_id, rc, amount - len(keep), [
                    d for d in inventory[rc].devices if d not in keep], exclude_consumer=consumer_id)
                if len(keep) + len(extra) < amount:
                    raise errors.NoCapacity(f"Not enough free {rc} devices on the instance's host")
                devices[rc] = keep + extra
        session.execute(delete(Allocation).where(Allocation.consumer_id == consumer_id))
        session.flush()
        _write(session, host_id, consumer_id, project_id, wanted, devices)
        return [d for devs in devices.values() for d in devs]
    raise errors.NoCapacity("Too many concurrent claims on the instance's host, try again")


def restore_allocation(session: Session, consumer_id: str, project_id: str, host_id: str,
                       wanted: dict[str, int], devices: dict[str, list[str]]) -> str | None:
    """Put back a consumer's earlier allocation on its host (a failed resize), exact devices included.

    Checked against everyone else's allocations under the host generation CAS, like a claim.
    Returns None when restored, else why not (the allocation is then left as it is).
    """
    for _attempt in range(MAX_ATTEMPTS):
        generation = session.scalar(select(Host.generation).where(Host.id == host_id))
        if generation is None:
            return f"host {host_id} no longer exists"
        if not _cas(session, host_id, generation):
            continue
        inventory = _inventory(session, host_id)
        used = _usage_now(session, host_id, exclude_consumer=consumer_id)
        short = _fits({rc: inv.capacity for rc, inv in inventory.items()}, used, wanted)
        if short is not None:
            return f"its {short} went to other instances meanwhile"
        for rc, devs in devices.items():
            if devs and _pick_devices(session, host_id, rc, len(devs), devs, exclude_consumer=consumer_id) != devs:
                return f"its {rc} devices went to other instances meanwhile"
        session.execute(delete(Allocation).where(Allocation.consumer_id == consumer_id))
        session.flush()
        _write(session, host_id, consumer_id, project_id, wanted, devices)
        return None
    return "too many concurrent claims on the host"


def free(session: Session, consumer_id: str) -> None:
    """Drop a consumer's allocations (instance deleted) and bump the hosts' generations."""
    host_ids = set(session.scalars(select(Allocation.host_id).where(Allocation.consumer_id == consumer_id)))
    if not host_ids:
        return
    session.execute(delete(Allocation).where(Allocation.consumer_id == consumer_id))
    for host_id in host_ids:
        session.execute(update(Host).where(Host.id == host_id).values(generation=Host.generation + 1))


def largest_fit(session: Session, zone_ids: Iterable[str], wanted: dict[str, int]) -> str | None:
    """None when at least one host (up or not) could hold `wanted` when empty, else why not.

    Used at create time to tell "this flavor is larger than any host" (a permanent error)
    apart from "the hosts are full right now". Reads inventories through the generation cache.
    """
    host_gens = {h: g for h, g in session.execute(
        select(Host.id, Host.generation).where(Host.zone_id.in_(list(zone_ids)), Host.status != "disabled"))}
    if not host_gens:
        return "there is no host in the requested zone(s)"
    best: dict[str, int] = {}
    wants_gpu = any(rc.startswith("GPU:") for rc in wanted)
    for view in _load_views(session, host_gens).values():
        if not wants_gpu and any(rc.startswith("GPU:") and cap > 0 for rc, cap in view.capacity.items()):
            continue
        if _fits(view.capacity, {}, wanted) is None:
            return None
        for rc in wanted:
            best[rc] = max(best.get(rc, 0), view.capacity.get(rc, 0))
    parts = [f"{rc} {wanted[rc]} > largest host's {best.get(rc, 0)}" for rc in wanted if wanted[rc] > best.get(rc, 0)]
    if not best:
        return "only GPU hosts in the requested zone(s), and they are kept for GPU flavors"
    if not parts:
        parts = ["no single host has all of " + ", ".join(f"{rc}={v}" for rc, v in wanted.items())]
    return "; ".join(parts)


def host_usage(session: Session, host_id: str) -> dict[str, dict[str, int]]:
    """{resource_class: {capacity, used}} for one host (for `host show` and the benchmarks)."""
    inventory = _inventory(session, host_id)
    used = _usage_now(session, host_id)
    return {rc: {"capacity": inv.capacity, "used": used.get(rc, 0)} for rc, inv in inventory.items()}


def overcommitted(session: Session) -> list[tuple[str, str, int, int]]:
    """(host, resource class, used, capacity) for every inventory used beyond capacity (should be [])."""
    used = {(h, rc): int(u or 0) for h, rc, u in session.execute(
        select(Allocation.host_id, Allocation.resource_class, func.sum(Allocation.amount))
        .group_by(Allocation.host_id, Allocation.resource_class))}
    out = []
    for inv in session.scalars(select(Inventory)):
        u = used.get((inv.host_id, inv.resource_class), 0)
        if u > inv.capacity:
            out.append((inv.host_id, inv.resource_class, u, inv.capacity))
    for (h, rc), u in used.items():
        if u > 0 and session.get(Inventory, (h, rc)) is None:
            out.append((h, rc, u, 0))
    return out
