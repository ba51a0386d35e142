"""Hosts and the capacity report through the SDK, with allocations written as the scheduler would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hackboot.sdk import Client
from tests.integration.catalog.conftest import CloudDb, RoleClients, expect_error, unique

PCI = ["0000:41:00.0", "0000:42:00.0", "0000:43:00.0", "0000:44:00.0"]
Register = Callable[..., dict[str, Any]]


def _inv(host: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["resource_class"]: i for i in host["inventories"]}


def _figs(scope: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["resource_class"]: f for f in scope["resources"]}


def _zone(report: dict[str, Any], zone_id: str) -> dict[str, Any]:
    return next(z for r in report["regions"] for z in r["zones"] if z["id"] == zone_id)


def _delta(after: dict[str, Any], before: dict[str, Any], rc: str, key: str) -> int:
    return int(_figs(after).get(rc, {}).get(key, 0)) - int(_figs(before).get(rc, {}).get(key, 0))


def test_register_is_idempotent_and_keeps_admin_settings(admin: Client, hosts: Register, db: CloudDb) -> None:
    h = hosts("hv", zone="AMS1-a", vcpus=32, memory_mb=131072, disk_gb=1000, facts={"accel": "kvm"},
              gpus=[{"model": "T4", "count": 2, "pci_addresses": PCI[:2]}])
    assert (h["status"], h["zone_id"], h["region_id"], h["facts"]) == ("up", "AMS1-a", "AMS1", {"accel": "kvm"})
    inv = _inv(h)
    assert list(inv) == ["VCPU", "MEMORY_MB", "DISK_GB", "GPU:T4"]
    assert (inv["GPU:T4"]["total"], inv["GPU:T4"]["devices"]) == (2, PCI[:2])
    assert all(i["allocation_ratio"] == 1.0 and i["reserved"] == 0 for i in inv.values())
    # the same registration again: same host, nothing changed, no event
    events = len(db.events(h["id"]))
    again = admin.request("POST", "/v1/hosts", json={
        "name": h["name"], "zone": "AMS1-a", "vcpus": 32, "memory_mb": 131072, "disk_gb": 1000,
        "facts": {"accel": "kvm"}, "gpus": [{"model": "T4", "count": 2, "pci_addresses": PCI[:2]}]})
    assert again["id"] == h["id"] and again["generation"] == h["generation"]
    assert len(db.events(h["id"])) == events
    assert len(admin.hosts.list(name=h["name"])) == 1
    # an administrator's ratio and reservation survive a re-registration that does not mention them
    admin.hosts.update(h["id"], allocation_ratio={"VCPU": 4.0}, reserved={"MEMORY_MB": 4096})
    grown = admin.hosts.register(h["name"], zone="AMS1-a", vcpus=48, memory_mb=131072, disk_gb=1000,
                                 facts={"accel": "tcg"})
    inv = _inv(grown)
    assert (inv["VCPU"]["total"], inv["VCPU"]["allocation_ratio"], inv["VCPU"]["allocatable"]) == (48, 4.0, 192)
    assert (inv["MEMORY_MB"]["reserved"], inv["MEMORY_MB"]["allocatable"]) == (4096, 131072 - 4096)
    assert "GPU:T4" not in inv and grown["facts"] == {"accel": "tcg"}
    assert grown["generation"] > h["generation"]
    assert [e.type for e in db.events(h["id"])] == ["host.registered", "host.updated", "host.reregistered"]
    # by id or by name
    assert admin.hosts.get(h["name"])["id"] == h["id"]


def test_register_validation(admin: Client, hosts: Register) -> None:
    name = unique("bad")
    expect_error(404, admin.hosts.register, name, zone="ZZZ9-a", vcpus=1, memory_mb=1024, disk_gb=1)
    err = expect_error(422, admin.hosts.register, name, zone="PAR1-a", vcpus=1, memory_mb=1024, disk_gb=1,
                       gpus=[{"model": "A100", "count": 2, "pci_addresses": PCI[:1]}])
    assert "PCI" in err.detail
    expect_error(422, admin.hosts.register, name, zone="PAR1-a", vcpus=1, memory_mb=1024, disk_gb=1,
                 gpus=[{"model": "A100", "count": 1, "pci_addresses": ["41:00.0"]}])
    expect_error(422, admin.hosts.register, name, zone="PAR1-a", vcpus=0, memory_mb=1024, disk_gb=1)
    expect_error(422, admin.hosts.register, name, zone="PAR1-a", vcpus=2, memory_mb=1024, disk_gb=1,
                 reserved={"VCPU": 3})
    expect_error(422, admin.hosts.register, name, zone="PAR1-a", vcpus=2, memory_mb=1024, disk_gb=1,
                 gpus=[{"model": "T4", "count": 1}, {"model": "T4", "count": 1}])
    assert admin.hosts.list(name=name) == []


def test_hosts_are_for_cloud_administrators(roles: RoleClients, hosts: Register) -> None:
    h = hosts("hv", zone="PAR1-c", vcpus=4, memory_mb=8192, disk_gb=100)
    for client in (roles.viewer, roles.member, roles.project_admin):
        expect_error(403, client.hosts.list)
        expect_error(403, client.hosts.get, h["id"])
        expect_error(403, client.hosts.register, unique("x"), zone="PAR1-a", vcpus=1, memory_mb=1024, disk_gb=1)
        expect_error(403, client.hosts.update, h["id"], status="disabled")
        expect_error(403, client.hosts.heartbeat, h["id"])
        expect_error(403, client.hosts.delete, h["id"])
        assert client.capacity.report(region="PAR1")["regions"][0]["id"] == "PAR1"  # capacity is public


def test_host_list_filters(admin: Client, hosts: Register) -> None:
    a = hosts("hv", zone="FRA1-a", vcpus=4, memory_mb=8192, disk_gb=100)
    b = hosts("hv", zone="FRA1-b", vcpus=4, memory_mb=8192, disk_gb=100)
    fra = {h["id"] for h in admin.hosts.list(region="FRA1")}
    assert {a["id"], b["id"]} <= fra
    assert a["id"] in {h["id"] for h in admin.hosts.list(zone="FRA1-a")}
    assert b["id"] not in {h["id"] for h in admin.hosts.list(zone="FRA1-a")}
    admin.hosts.disable(b["id"], "bad DIMM")
    disabled = {h["id"]: h for h in admin.hosts.list(status="disabled")}
    assert b["id"] in disabled and disabled[b["id"]]["status_reason"] == "bad DIMM"
    assert b["id"] not in {h["id"] for h in admin.hosts.list(status="up")}
    page = admin.get("/v1/hosts", limit=1, region="FRA1")
    assert len(page["items"]) == 1 and page["next_cursor"]


def test_capacity_report_numbers(admin: Client, hosts: Register, db: CloudDb) -> None:
    before = admin.capacity.report(region="FRA1")
    b_region, b_zone_b, b_zone_c = before["regions"][0], _zone(before, "FRA1-b"), _zone(before, "FRA1-c")
    h1 = hosts("gpu", zone="FRA1-b", vcpus=64, memory_mb=262144, disk_gb=2000, allocation_ratio=2.0,
               reserved={"VCPU": 4, "MEMORY_MB": 8192},
               gpus=[{"model": "RTX4090", "count": 4, "pci_addresses": PCI}])
    h2 = hosts("hv", zone="FRA1-c", vcpus=32, memory_mb=65536, disk_gb=500)
    inv1 = _inv(h1)
    assert (inv1["VCPU"]["allocatable"], inv1["MEMORY_MB"]["allocatable"], inv1["DISK_GB"]["allocatable"]) == (
        120, (262144 - 8192) * 2, 4000)
    assert inv1["GPU:RTX4090"]["allocation_ratio"] == 1.0  # GPUs are never oversubscribed
    c1, c2 = unique("i"), unique("i")
    db.allocate(h1["id"], c1, {"VCPU": 16, "MEMORY_MB": 65536, "DISK_GB": 100, "GPU:RTX4090": 2},
                devices={"GPU:RTX4090": PCI[:2]})
    db.allocate(h2["id"], c2, {"VCPU": 30, "MEMORY_MB": 1024})

    shown = _inv(admin.hosts.get(h1["id"]))
    assert (shown["VCPU"]["used"], shown["VCPU"]["free"]) == (16, 104)
    assert (shown["GPU:RTX4090"]["used"], shown["GPU:RTX4090"]["devices_in_use"]) == (2, PCI[:2])

    after = admin.capacity.report(region="FRA1")
    region = after["regions"][0]
    assert [r["id"] for r in after["regions"]] == ["FRA1"]
    assert [z["id"] for z in region["zones"]] == ["FRA1-a", "FRA1-b", "FRA1-c"]
    expected = {  # rc: (total, reserved, allocatable, used, free)
        "VCPU": (96, 4, 152, 46, 106),
        "MEMORY_MB": (327680, 8192, 507904 + 65536, 66560, 507904 - 65536 + 64512),
        "DISK_GB": (2500, 0, 4500, 100, 4400),
        "GPU:RTX4090": (4, 0, 4, 2, 2),
    }
    for rc, (total, reserved, alloc, used, free) in expected.items():
        got = tuple(_delta(region, b_region, rc, k) for k in ("total", "reserved", "allocatable", "used", "free"))
        assert got == (total, reserved, alloc, used, free), rc
        assert _delta(after["total"], before["total"], rc, "used") == used
    z_c = _figs(_zone(after, "FRA1-c"))["VCPU"]
    base_c = _figs(b_zone_c)["VCPU"]
    assert z_c["utilisation_pct"] == round(100 * (base_c["used"] + 30) / (base_c["allocatable"] + 32), 1)
    assert _delta(_zone(after, "FRA1-b"), b_zone_b, "GPU:RTX4090", "schedulable") == 2
    assert region["hosts"]["up"] - b_region["hosts"]["up"] == 2
    # the zone filter narrows to one zone of one region
    only = admin.capacity.report(zone="FRA1-c")
    assert [r["id"] for r in only["regions"]] == ["FRA1"] and [z["id"] for z in only["regions"][0]["zones"]] == [
        "FRA1-c"]
    assert _figs(only["total"])["VCPU"]["used"] == z_c["used"]
    expect_error(404, admin.capacity.report, zone="FRA1-z")
    expect_error(404, admin.capacity.report, region="PAR1", zone="FRA1-a")

    # a disabled host keeps its capacity and usage, but nothing more can be placed there
    admin.hosts.disable(h2["id"])
    off = admin.capacity.report(region="FRA1")["regions"][0]
    assert _delta(off, region, "VCPU", "schedulable") == -2 and _delta(off, region, "VCPU", "used") == 0
    assert off["hosts"]["disabled"] - region["hosts"]["disabled"] == 1

    # ratios cannot drop below what is allocated; a host with allocations cannot be deleted
    err = expect_error(409, admin.hosts.update, h2["id"], allocation_ratio={"VCPU": 0.5})
    assert err.code == "capacity_in_use"
    err = expect_error(409, admin.hosts.delete, h1["id"])
    assert err.code == "host_in_use"
    db.release(c1)
    admin.hosts.delete(h1["id"])
    expect_error(404, admin.hosts.get, h1["id"])
    assert [e.type for e in db.events(h1["id"])] == ["host.registered", "host.deleted"]


def test_hosts_in_a_region_under_maintenance_exist_but_are_not_schedulable(admin: Client, hosts: Register) -> None:
    before = admin.capacity.report(region="LON1")
    h = hosts("lon", zone="LON1-a", vcpus=8, memory_mb=16384, disk_gb=200,
              gpus=[{"model": "T4", "count": 4, "pci_addresses": []}])
    assert h["status"] == "up"
    after = admin.capacity.report(region="LON1")
    lon = after["regions"][0]
    assert lon["status"] == "maintenance" and _zone(after, "LON1-a")["status"] == "maintenance"
    assert _delta(lon, before["regions"][0], "GPU:T4", "free") == 4
    assert _figs(lon)["GPU:T4"]["schedulable"] == 0 and _figs(lon)["VCPU"]["schedulable"] == 0


def test_patch_host_status_and_validation(admin: Client, hosts: Register, db: CloudDb) -> None:
    h = hosts("hv", zone="AMS1-b", vcpus=8, memory_mb=16384, disk_gb=200,
              gpus=[{"model": "A100", "count": 1, "pci_addresses": PCI[:1]}])
    off = admin.hosts.disable(h["id"], "firmware upgrade")
    assert (off["status"], off["status_reason"]) == ("disabled", "firmware upgrade")
    # a heartbeat does not override an administrator's decision
    assert admin.hosts.heartbeat(h["id"], {"qemu": "9.2"})["status"] == "disabled"
    on = admin.hosts.enable(h["id"])
    assert (on["status"], on["status_reason"], on["facts"]["qemu"]) == ("up", "", "9.2")
    err = expect_error(422, admin.hosts.update, h["id"], allocation_ratio={"GPU:A100": 2.0})
    assert "passed through" in err.detail
    expect_error(422, admin.hosts.update, h["id"], allocation_ratio={"GPU:T4": 1.0})  # not on this host
    expect_error(422, admin.hosts.update, h["id"], reserved={"VCPU": 9})
    expect_error(422, admin.hosts.update, h["id"], status="down")  # down is observed, not set
    expect_error(404, admin.hosts.update, unique("ghost"), status="disabled")
    assert [e.type for e in db.events(h["id"])] == ["host.registered", "host.disabled", "host.enabled"]


def test_concurrent_registrations_of_one_name_make_one_host(admin: Client, hosts: Register) -> None:
    from concurrent.futures import ThreadPoolExecutor

    name = unique("race")
    spec = {"zone": "PAR1-c", "vcpus": 8, "memory_mb": 16384, "disk_gb": 100}

    def register(_: int) -> str:
        with admin.with_token(admin.http.headers["Authorization"].split()[1]) as c:
            return str(c.hosts.register(name, **spec)["id"])  # type: ignore[attr-defined]

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(register, range(8)))
    assert len(ids) == 1
    assert [h["id"] for h in admin.hosts.list(name=name)] == list(ids)
    admin.hosts.delete(ids.pop())
