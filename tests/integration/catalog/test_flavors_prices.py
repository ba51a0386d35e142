"""Flavors and the price list through the SDK, on SQLite and PostgreSQL."""

from __future__ import annotations

from hackboot.catalog import seed_data
from hackboot.sdk import Client
from tests.integration.catalog.conftest import CloudDb, RoleClients, expect_error, unique


def test_seeded_flavors_with_prices_and_filters(admin: Client) -> None:
    flavors = {f["id"]: f for f in admin.flavors.list()}
    assert {f.id for f in seed_data.FLAVORS} <= set(flavors)
    t3 = flavors["t3.micro"]
    assert (t3["vcpus"], t3["memory_mb"], t3["family"], t3["price_eur_hour"]) == (2, 1024, "general", 0.011)
    g4 = flavors["g4.xlarge"]
    assert (g4["vcpus"], g4["memory_mb"], g4["gpu_model"], g4["gpu_count"]) == (4, 16384, "T4", 1)
    assert all(f["price_eur_hour"] is not None for f in flavors.values() if f["id"] in
               {s.id for s in seed_data.FLAVORS})
    assert {f["id"] for f in admin.flavors.list(gpu_model="T4")} == {"GPU-T4", "g4.xlarge"}
    assert {f["id"] for f in admin.flavors.list(family="vps")} == {
        "VPS-NANO", "VPS-STARTER", "VPS-PERFORMANCE", "VPS-BUSINESS", "VPS-ENTERPRISE+"}
    big = admin.flavors.list(min_vcpus=12, gpu=False)
    assert {f["id"] for f in big} >= {"VPS-ENTERPRISE+"} and all(f["vcpus"] >= 12 and f["gpu_count"] == 0
                                                                 for f in big)
    assert all(f["memory_mb"] >= 65536 for f in admin.flavors.list(min_memory_mb=65536))
    assert {f["id"] for f in admin.flavors.list(gpu=True)} >= {"GPU-T4", "GPU-RTX4090", "GPU-A100", "g4.xlarge"}
    # '+' survives the URL
    assert admin.flavors.get("VPS-ENTERPRISE+")["vcpus"] == 16
    expect_error(404, admin.flavors.get, "nope.large")


def test_flavor_pagination_is_stable_and_complete(admin: Client) -> None:
    everything = [f["id"] for f in admin.flavors.list()]
    seen, cursor = [], None
    while True:
        page = admin.get("/v1/flavors", limit=4, **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= 4
        seen += [f["id"] for f in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == everything and len(set(seen)) == len(seen)


def test_only_superusers_create_change_or_delete_flavors(roles: RoleClients, admin: Client) -> None:
    spec = {"family": "general", "vcpus": 1, "memory_mb": 512, "disk_gb": 5}
    for client in (roles.viewer, roles.member, roles.project_admin):
        assert client.flavors.get("t3.small")["id"] == "t3.small"
        expect_error(403, client.flavors.create, unique("x"), **spec)
        expect_error(403, client.flavors.update, "t3.small", description="mine")
        expect_error(403, client.flavors.delete, "t3.small")
    assert admin.flavors.get("t3.small")["active"] is True


def test_create_update_delete_flavor(admin: Client, db: CloudDb) -> None:
    fid = unique("x1").replace("-", ".")
    f = admin.flavors.create(fid, family="gpu", vcpus=6, memory_mb=24576, disk_gb=100, gpu_model="RTX4090",
                             gpu_count=1, description="test", price_eur_hour=0.5)
    assert (f["active"], f["price_eur_hour"], f["gpu_model"]) == (True, 0.5, "RTX4090")
    assert f["id"] in {x["id"] for x in admin.flavors.list(gpu_model="RTX4090")}
    assert admin.prices.list(sku=fid)[0]["amount_eur"] == 0.5
    err = expect_error(409, admin.flavors.create, fid, family="gpu", vcpus=1, memory_mb=512, disk_gb=1)
    assert err.code == "already_exists"
    err = expect_error(422, admin.flavors.create, unique("bad"), family="gpu", vcpus=1, memory_mb=512, disk_gb=1,
                       gpu_model="T4")
    assert "gpu_count" in err.detail
    expect_error(422, admin.post, "/v1/flavors", {"id": "bad id!", "family": "x", "vcpus": 1, "memory_mb": 512,
                                                  "disk_gb": 1})
    expect_error(422, admin.post, "/v1/flavors", {"id": unique("x"), "family": "x", "vcpus": 1, "memory_mb": 512,
                                                  "disk_gb": 1, "ram": 3})  # unknown field
    # sizes are immutable: PATCH only takes active/description
    expect_error(422, admin.patch, f"/v1/flavors/{fid}", {"vcpus": 8})
    assert admin.flavors.update(fid, active=False)["active"] is False
    assert fid not in {x["id"] for x in admin.flavors.list()}
    assert fid in {x["id"] for x in admin.flavors.list(include_inactive=True)}
    admin.flavors.update(fid, active=True, description="back")
    # unused and not from the seed: really deleted, with its price
    result = admin.flavors.delete(fid)
    assert result["outcome"] == "deleted"
    expect_error(404, admin.flavors.get, fid)
    assert admin.prices.list(sku=fid) == []
    assert [e.type for e in db.events(fid)] == ["flavor.created", "flavor.updated", "flavor.updated",
                                                "flavor.deleted"]
    assert all(e.project_id is None for e in db.events(fid))


def test_deleting_a_seeded_flavor_deactivates_it(admin: Client) -> None:
    try:
        result = admin.flavors.delete("t3.large")
        assert result["outcome"] == "deactivated" and "seed" in result["detail"]
        assert admin.flavors.get("t3.large")["active"] is False
        assert "t3.large" not in {f["id"] for f in admin.flavors.list()}
        # its price stays (bills of past usage refer to it) and cannot be removed while it is seeded
        assert admin.prices.list(sku="t3.large")[0]["amount_eur"] == 0.076
    finally:
        admin.flavors.update("t3.large", active=True)


def test_price_list_kinds_filters_and_pagination(admin: Client) -> None:
    prices = admin.prices.list()
    skus = [(p["sku"], p["region_id"] or "") for p in prices]
    assert skus == sorted(skus) and len(set(skus)) == len(skus)
    volume = {p["sku"]: p for p in admin.prices.list(kind="volume")}
    assert set(volume) >= {"volume:ssd-performance", "volume:ssd-standard", "volume:hdd-standard",
                           "volume:archive"}
    assert all(p["unit"] == "GB-month" and p["currency"] == "EUR" for p in volume.values())
    s3 = {p["sku"] for p in admin.prices.list(kind="object_storage")}
    assert s3 >= {"s3:STANDARD", "s3:STANDARD_IA", "s3:GLACIER", "s3:INTELLIGENT_TIERING"}
    flavor_prices = admin.prices.list(kind="flavor")
    assert all(p["unit"] == "hour" for p in flavor_prices)
    network = {p["sku"]: p for p in admin.prices.list(kind="network")}
    assert set(network) >= {"network:floating-ip", "network:nat-gateway"}
    assert all(p["unit"] == "hour" for p in network.values())
    assert [p["sku"] for p in admin.prices.list(sku="s3:GLACIER")] == ["s3:GLACIER"]
    seen, cursor = [], None
    while True:
        page = admin.get("/v1/prices", limit=7, **({"cursor": cursor} if cursor else {}))
        seen += [(p["sku"], p["region_id"] or "") for p in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == skus


def test_regional_override_and_price_edits(admin: Client, roles: RoleClients, db: CloudDb) -> None:
    for client in (roles.viewer, roles.member, roles.project_admin):
        assert client.prices.list(sku="volume:ssd-standard")
        expect_error(403, client.prices.set, "volume:ssd-standard", 1.0)
    base = admin.prices.list(sku="volume:ssd-standard")[0]
    try:
        override = admin.prices.set("volume:ssd-standard", 0.09, region="FRA1", description="Frankfurt power")
        assert (override["region_id"], override["amount_eur"], override["kind"], override["unit"]) == (
            "FRA1", 0.09, "volume", "GB-month")
        fra = {p["sku"]: p for p in admin.prices.list(region="FRA1", kind="volume")}
        assert fra["volume:ssd-standard"]["amount_eur"] == 0.09 and fra["volume:archive"]["region_id"] is None
        par = {p["sku"]: p for p in admin.prices.list(region="PAR1", kind="volume")}
        assert par["volume:ssd-standard"]["amount_eur"] == base["amount_eur"]
        assert len(admin.prices.list(sku="volume:ssd-standard")) == 2
        # PUT is an upsert: the same call updates
        again = admin.prices.set("volume:ssd-standard", 0.095, region="FRA1")
        assert again["id"] == override["id"] and again["amount_eur"] == 0.095
        expect_error(404, admin.prices.set, "volume:ssd-standard", 0.1, region="NOPE1")
        expect_error(422, admin.prices.set, "volume:ssd-standard", 0.1, unit="hour")
        expect_error(422, admin.prices.set, "volume:ssd-standard", -1)
        err = expect_error(404, admin.prices.set, "not-a-flavor", 0.1)
        assert "volume:" in err.detail
        expect_error(404, admin.prices.list, region="NOPE1")
        # seeded and active-flavor list prices cannot be deleted (only re-priced)
        assert expect_error(409, admin.prices.delete, "volume:ssd-standard").code == "price_required"
        assert expect_error(409, admin.prices.delete, "t3.micro").code == "price_required"
        # new storage skus are typed by their prefix
        sku = "volume:" + unique("nvme")
        created = admin.prices.set(sku, 0.2)
        assert (created["kind"], created["unit"], created["region_id"]) == ("volume", "GB-month", None)
        admin.prices.delete(sku)
        assert admin.prices.list(sku=sku) == []
    finally:
        admin.prices.delete("volume:ssd-standard", region="FRA1")
    assert [p["region_id"] for p in admin.prices.list(sku="volume:ssd-standard")] == [None]
    types = [e.type for e in db.events(override["id"])]
    assert types == ["price.created", "price.updated", "price.deleted"]
