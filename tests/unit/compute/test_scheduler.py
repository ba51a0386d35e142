"""Placement: filters, weighers, atomic claims (no server, a real SQLite database)."""

from __future__ import annotations

import itertools
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from hackboot.catalog.models import Allocation, Host, Inventory, Region, Zone
from hackboot.compute import scheduler
from hackboot.core import errors
from hackboot.core.db import session_scope

_zones = itertools.count()


def make_zone() -> str:
    zone_id = f"UT-{next(_zones)}-{uuid.uuid4().hex[:4]}"
    with session_scope() as s:
        if s.get(Region, "UTR") is None:
            s.add(Region(id="UTR", name="Unit", country="FR", status="operational"))
            s.flush()
        s.add(Zone(id=zone_id, region_id="UTR", status="operational"))
    return zone_id


def make_host(zone: str, vcpus: int = 8, memory_mb: int = 16384, disk_gb: int = 200, *, ratio: float = 1.0,
              gpus: dict[str, list[str]] | None = None, status: str = "up") -> str:
    host_id = "host-" + uuid.uuid4().hex[:12]
    with session_scope() as s:
        s.add(Host(id=host_id, name=host_id, zone_id=zone, status=status, facts={}, generation=0))
        s.flush()
        for rc, total in (("VCPU", vcpus), ("MEMORY_MB", memory_mb), ("DISK_GB", disk_gb)):
            s.add(Inventory(host_id=host_id, resource_class=rc, total=total, reserved=0, allocation_ratio=ratio,
                            devices=[]))
        for model, addrs in (gpus or {}).items():
            s.add(Inventory(host_id=host_id, resource_class=f"GPU:{model}", total=len(addrs), reserved=0,
                            allocation_ratio=1.0, devices=addrs))
    return host_id


def req(zone: str, vcpus: int = 1, memory_mb: int = 1024, disk_gb: int = 20, **kw: object) -> scheduler.Request:
    return scheduler.Request(consumer_id="i-" + uuid.uuid4().hex[:20], project_id="prj-unit", vcpus=vcpus,
                             memory_mb=memory_mb, disk_gb=disk_gb, zone_ids=[zone], **kw)  # type: ignore[arg-type]


def place(r: scheduler.Request) -> scheduler.Placement:
    with session_scope() as s:
        return scheduler.place(s, r)


def used(host_id: str, rc: str = "VCPU") -> int:
    with session_scope(write=False) as s:
        return scheduler.host_usage(s, host_id)[rc]["used"]


def test_fills_exactly_to_capacity_then_refuses_clearly(database: Path) -> None:
    zone = make_zone()
    a, b = make_host(zone, vcpus=2), make_host(zone, vcpus=3)
    for _ in range(5):
        place(req(zone))
    assert used(a) == 2 and used(b) == 3
    with pytest.raises(errors.NoCapacity) as err:
        place(req(zone))
    assert err.value.code == "no_capacity" and "VCPU" in err.value.detail
    with session_scope(write=False) as s:
        assert scheduler.overcommitted(s) == []


def test_allocation_ratio_is_honoured(database: Path) -> None:
    zone = make_zone()
    h = make_host(zone, vcpus=2, ratio=2.0, memory_mb=100_000)
    for _ in range(4):
        place(req(zone))
    assert used(h) == 4
    with pytest.raises(errors.NoCapacity):
        place(req(zone))


def test_spread_and_pack(database: Path) -> None:
    zone = make_zone()
    hosts = [make_host(zone, vcpus=4) for _ in range(2)]
    p1 = place(req(zone, weigher="pack"))
    p2 = place(req(zone, weigher="pack"))
    assert p1.host_id == p2.host_id  # pack fills one host first
    p3 = place(req(zone, weigher="spread"))
    assert p3.host_id != p1.host_id  # spread prefers the emptier host
    assert sorted(used(h) for h in hosts) == [1, 2]


def test_down_and_disabled_hosts_are_skipped(database: Path) -> None:
    zone = make_zone()
    make_host(zone, status="down")
    make_host(zone, status="disabled")
    up = make_host(zone)
    assert place(req(zone)).host_id == up


def test_no_host_at_all(database: Path) -> None:
    zone = make_zone()
    with pytest.raises(errors.NoCapacity) as err:
        place(req(zone))
    assert "no host is up" in err.value.detail


def test_gpu_flavors_land_only_on_hosts_with_that_model_and_get_pci_addresses(database: Path) -> None:
    zone = make_zone()
    make_host(zone, vcpus=64, memory_mb=500_000)  # no GPU
    t4 = make_host(zone, vcpus=64, memory_mb=500_000, gpus={"T4": ["0000:3b:00.0"]})
    a100 = make_host(zone, vcpus=64, memory_mb=500_000, gpus={"A100": ["0000:81:00.0", "0000:82:00.0"]})
    first = place(req(zone, vcpus=8, gpu_model="A100", gpu_count=1))
    assert first.host_id == a100
    assert place(req(zone, vcpus=8, gpu_model="T4", gpu_count=1)).gpu_devices == ["0000:3b:00.0"]
    # plain instances avoid GPU hosts while a plain host has room
    assert place(req(zone)).host_id not in (t4, a100)
    with session_scope(write=False) as s:
        rows = {a.resource_class: a for a in s.scalars(select(Allocation).where(Allocation.host_id == a100))}
    assert rows["GPU:A100"].devices == first.gpu_devices
    second = place(req(zone, vcpus=8, gpu_model="A100", gpu_count=1))
    assert second.host_id == a100
    assert sorted(first.gpu_devices + second.gpu_devices) == ["0000:81:00.0", "0000:82:00.0"]
    with pytest.raises(errors.NoCapacity) as err:
        place(req(zone, vcpus=8, gpu_model="A100", gpu_count=1))
    assert "GPU:A100" in err.value.detail


def test_server_group_anti_affinity_and_affinity(database: Path) -> None:
    zone = make_zone()
    hosts = {make_host(zone) for _ in range(3)}
    seen: set[str] = set()
    for _ in range(3):
        p = place(req(zone, group_policy="anti-affinity", group_hosts=set(seen)))
        assert p.host_id not in seen
        seen.add(p.host_id)
    assert seen == hosts
    with pytest.raises(errors.NoCapacity) as err:
        place(req(zone, group_policy="anti-affinity", group_hosts=set(seen)))
    assert "anti-affinity" in err.value.detail
    first = place(req(zone, group_policy="affinity", group_hosts=set()))
    for _ in range(3):
        assert place(req(zone, group_policy="affinity", group_hosts={first.host_id})).host_id == first.host_id


def test_free_releases_and_resize_rechecks(database: Path) -> None:
    zone = make_zone()
    h = make_host(zone, vcpus=4, memory_mb=8192)
    r = req(zone, vcpus=2, memory_mb=2048)
    place(r)
    other = place(req(zone, vcpus=1, memory_mb=1024))
    with session_scope() as s:
        scheduler.claim_resize(s, r.consumer_id, r.project_id, h, {"VCPU": 3, "MEMORY_MB": 4096, "DISK_GB": 20})
    assert used(h) == 4
    with pytest.raises(errors.NoCapacity) as err, session_scope() as s:
        scheduler.claim_resize(s, r.consumer_id, r.project_id, h, {"VCPU": 4, "MEMORY_MB": 4096, "DISK_GB": 20})
    assert "VCPU" in err.value.detail
    assert used(h) == 4  # the failed resize left the allocation alone
    with session_scope() as s:
        scheduler.free(s, r.consumer_id)
    assert used(h) == 1
    with session_scope() as s:
        scheduler.free(s, other.host_id and "i-none")  # unknown consumer: nothing happens
    assert used(h) == 1


def test_largest_fit_tells_too_big_from_full(database: Path) -> None:
    zone = make_zone()
    make_host(zone, vcpus=4, memory_mb=8192)
    with session_scope(write=False) as s:
        assert scheduler.largest_fit(s, [zone], {"VCPU": 4, "MEMORY_MB": 8192}) is None
        why = scheduler.largest_fit(s, [zone], {"VCPU": 64, "MEMORY_MB": 8192})
    assert why is not None and "VCPU 64 > largest host's 4" in why


def test_generation_conflict_is_retried_never_overcommitted(database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zone = make_zone()
    h = make_host(zone, vcpus=2)
    real_cas = scheduler._cas
    calls = {"n": 0}

    def flaky(session, host_id, generation):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] <= 2:
            # another scheduler won the race: it took a vCPU and bumped the generation (simulated in
            # our transaction: SQLite would serialise a real rival before our claim started)
            session.add(Allocation(consumer_id="i-rival" + str(calls["n"]), host_id=host_id, resource_class="VCPU",
                                   amount=1, project_id="prj-unit", devices=[]))
            session.execute(Host.__table__.update().where(Host.id == host_id).values(generation=Host.generation + 1))
            return False
        return real_cas(session, host_id, generation)

    monkeypatch.setattr(scheduler, "_cas", flaky)
    with pytest.raises(errors.NoCapacity):
        place(req(zone))  # both vCPUs went to the rivals: the retry sees it and refuses
    assert calls["n"] == 2  # refused on the re-read, before any CAS could succeed
    assert used(h) == 0  # the failed request rolled back its transaction, rivals included


def test_stale_cache_cannot_overcommit(database: Path) -> None:
    zone = make_zone()
    h = make_host(zone, vcpus=2)
    scheduler.clear_cache()
    place(req(zone))
    # a writer that forgets to bump the generation leaves the cache believing one vCPU is free:
    # the authoritative check under the host lock still refuses
    with session_scope() as s:
        s.add(Allocation(consumer_id="i-sneaky", host_id=h, resource_class="VCPU", amount=1, project_id="p",
                         devices=[]))
    with pytest.raises(errors.NoCapacity):
        place(req(zone))
    assert used(h) == 2


def test_concurrent_claims_never_overcommit(database: Path) -> None:
    zone = make_zone()
    hosts = [make_host(zone, vcpus=5) for _ in range(4)]  # room for exactly 20
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            place(req(zone))
            outcome = "placed"
        except errors.NoCapacity:
            outcome = "full"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("placed") == 20 and results.count("full") == 10
    assert [used(h) for h in hosts] == [5, 5, 5, 5]
