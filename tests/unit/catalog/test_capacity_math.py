"""The capacity report's arithmetic, on plain rows (no database)."""

from __future__ import annotations

from hackboot.catalog.models import allocatable
from hackboot.catalog.service import InvRow, build_capacity

REGIONS = [("AMS1", "operational"), ("LON1", "maintenance")]
ZONES = [("AMS1-a", "AMS1", "operational"), ("AMS1-b", "AMS1", "maintenance"), ("LON1-a", "LON1", "operational")]


def _figs(scope, rc):  # type: ignore[no-untyped-def]
    return next(f for f in scope.ordered() if f.resource_class == rc)


def test_allocatable_rounds_down_without_losing_a_unit_to_float_noise() -> None:
    assert allocatable(100, 0, 0.29) == 29  # 100 * 0.29 == 28.999999999999996
    assert allocatable(64, 4, 2.0) == 120
    assert allocatable(10, 0, 1.05) == 10
    assert allocatable(3, 5, 1.0) == 0


def test_totals_reserved_ratio_used_free_and_utilisation() -> None:
    hosts = [("h1", "AMS1-a", "up"), ("h2", "AMS1-a", "up")]
    invs = [InvRow("h1", "VCPU", 64, 4, 2.0), InvRow("h1", "MEMORY_MB", 262144, 8192, 1.0),
            InvRow("h1", "GPU:A100", 4, 0, 1.0), InvRow("h2", "VCPU", 32, 0, 1.0)]
    used = {("h1", "VCPU"): 16, ("h1", "GPU:A100"): 3, ("h2", "VCPU"): 30, ("h1", "MEMORY_MB"): 65536}
    cloud, regions = build_capacity(REGIONS, ZONES, hosts, invs, used)
    ams = regions[0]
    vcpu = _figs(ams, "VCPU")
    assert (vcpu.total, vcpu.reserved, vcpu.allocatable, vcpu.used, vcpu.free) == (96, 4, 152, 46, 106)
    assert vcpu.utilisation_pct == round(100 * 46 / 152, 1)
    gpu = _figs(ams, "GPU:A100")
    assert (gpu.total, gpu.allocatable, gpu.used, gpu.free, gpu.utilisation_pct) == (4, 4, 3, 1, 75.0)
    mem = _figs(ams.zones[0], "MEMORY_MB")
    assert (mem.allocatable, mem.used, mem.free) == (253952, 65536, 188416)
    # zones without hosts report zeros, and no utilisation
    assert _figs(ams.zones[1], "VCPU").utilisation_pct is None
    assert [f.resource_class for f in ams.ordered()] == ["VCPU", "MEMORY_MB", "DISK_GB", "GPU:A100"]
    assert ams.hosts == {"up": 2, "down": 0, "disabled": 0}
    assert _figs(cloud, "VCPU").used == 46


def test_an_overcommitted_host_does_not_eat_another_hosts_free_capacity() -> None:
    hosts = [("h1", "AMS1-a", "up"), ("h2", "AMS1-a", "up")]
    invs = [InvRow("h1", "VCPU", 8, 0, 1.0), InvRow("h2", "VCPU", 8, 0, 1.0)]
    used = {("h1", "VCPU"): 12}  # h1 re-registered smaller than what it runs
    _, regions = build_capacity(REGIONS, ZONES, hosts, invs, used)
    vcpu = _figs(regions[0], "VCPU")
    assert (vcpu.allocatable, vcpu.used, vcpu.free, vcpu.utilisation_pct) == (16, 12, 8, 75.0)


def test_schedulable_counts_only_up_hosts_in_operational_zones_and_regions() -> None:
    hosts = [("up", "AMS1-a", "up"), ("down", "AMS1-a", "down"), ("off", "AMS1-a", "disabled"),
             ("mz", "AMS1-b", "up"), ("lon", "LON1-a", "up")]
    invs = [InvRow(h, "VCPU", 10, 0, 1.0) for h, _, _ in hosts]
    cloud, regions = build_capacity(REGIONS, ZONES, hosts, invs, {("up", "VCPU"): 4})
    ams, lon = regions
    assert (_figs(ams, "VCPU").free, _figs(ams, "VCPU").schedulable) == (36, 6)
    assert (_figs(lon, "VCPU").free, _figs(lon, "VCPU").schedulable) == (10, 0)
    assert _figs(cloud, "VCPU").schedulable == 6
    assert ams.hosts == {"up": 2, "down": 1, "disabled": 1}
    # a zone of a region in maintenance shows the region's status
    assert lon.zones[0].status == "maintenance" and ams.zones[1].status == "maintenance"


def test_allocations_without_inventory_still_count_as_used() -> None:
    hosts = [("h1", "AMS1-a", "up")]
    _, regions = build_capacity(REGIONS, ZONES, hosts, [InvRow("h1", "VCPU", 4, 0, 1.0)],
                                {("h1", "GPU:T4"): 1})
    t4 = _figs(regions[0], "GPU:T4")
    assert (t4.total, t4.used, t4.free, t4.utilisation_pct) == (0, 1, 0, 100.0)
