"""Regions and zones through the SDK, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from hackboot.catalog import service
from hackboot.core import errors
from hackboot.sdk import Client
from tests.integration.catalog.conftest import CloudDb, RoleClients, expect_error
from tests.support import Cloud


def test_regions_are_seeded_with_their_residency_facts(admin: Client) -> None:
    regions = {r["id"]: r for r in admin.regions.list()}
    assert set(regions) == {"PAR1", "FRA1", "AMS1", "LON1", "MAD1", "MIL1"}
    par = regions["PAR1"]
    assert (par["country"], par["jurisdiction"], par["in_eu"], par["status"]) == ("FR", "EU", True, "operational")
    assert par["peering"].startswith("France-IX") and par["zones"] == ["PAR1-a", "PAR1-b", "PAR1-c"]
    lon = regions["LON1"]
    assert (lon["country"], lon["jurisdiction"], lon["in_eu"]) == ("GB", "UK", False)
    assert "left the EU" in lon["note"]
    assert (regions["MAD1"]["status"], regions["MAD1"]["available_from"]) == ("planned", "2025-Q2")
    assert (regions["MIL1"]["status"], regions["MIL1"]["available_from"]) == ("planned", "2025-Q3")


def test_region_filters_and_pagination(admin: Client) -> None:
    assert {r["id"] for r in admin.regions.list(status="operational")} == {"PAR1", "FRA1", "AMS1"}
    assert [r["id"] for r in admin.regions.list(country="gb")] == ["LON1"]
    assert {r["id"] for r in admin.regions.list(jurisdiction="EU")} == {"PAR1", "FRA1", "AMS1", "MAD1", "MIL1"}
    assert admin.regions.list(status="retired") == []
    seen, cursor, pages = [], None, 0
    while True:
        page = admin.get("/v1/regions", limit=4, **({"cursor": cursor} if cursor else {}))
        seen += [r["id"] for r in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == 2 and seen == sorted(seen) and len(seen) == 6
    err = expect_error(400, admin.get, "/v1/regions", cursor="garbage!")
    assert err.code == "invalid_cursor"
    expect_error(422, admin.get, "/v1/regions", status="closed")


def test_show_region_and_not_found(admin: Client) -> None:
    assert admin.regions.get("AMS1")["city"] == "Amsterdam"
    err = expect_error(404, admin.regions.get, "XXX9")
    assert err.code == "not_found" and "XXX9" in err.detail


def test_zones_list_filters_and_effective_status(admin: Client) -> None:
    zones = admin.zones.list(region="LON1")
    assert [z["id"] for z in zones] == ["LON1-a", "LON1-b"]
    assert all(z["region_status"] == "maintenance" and z["effective_status"] == "maintenance" for z in zones)
    all_zones = admin.zones.list()
    assert len(all_zones) == 13 and {z["region_id"] for z in all_zones} == {"PAR1", "FRA1", "AMS1", "LON1",
                                                                             "MAD1", "MIL1"}
    page = admin.get("/v1/zones", limit=5)
    assert len(page["items"]) == 5 and page["next_cursor"]
    assert admin.zones.get("PAR1-b")["effective_status"] == "operational"
    expect_error(404, admin.zones.get, "PAR1-z")


def test_viewer_member_and_project_admin_cannot_edit_regions(roles: RoleClients) -> None:
    for client in (roles.viewer, roles.member, roles.project_admin):
        assert len(client.regions.list()) == 6  # reading is for everyone
        err = expect_error(403, client.regions.set_status, "PAR1", "maintenance")
        assert err.code == "forbidden"
        expect_error(403, client.zones.set_status, "PAR1-a", "maintenance")
    assert roles.viewer.regions.get("PAR1")["status"] == "operational"


def test_superuser_changes_region_status_and_placement_follows(admin: Client, db: CloudDb) -> None:
    with db.session() as s:
        with pytest.raises(errors.Conflict) as err:
            service.placeable_zone(s, "LON1-a")
        assert err.value.code == "region_not_operational"
        assert "LON1 is in maintenance" in err.value.detail
        with pytest.raises(errors.Conflict) as err:
            service.placeable_zone(s, "MAD1-a")
        assert "MAD1" in err.value.detail and "2025-Q2" in err.value.detail
        with pytest.raises(errors.NotFound):
            service.placeable_zone(s, "NOWHERE-a")
        assert service.placeable_zone(s, "PAR1-a").id == "PAR1-a"
        assert "LON1-a" not in [z.id for z in service.placeable_zones(s)]
    try:
        lon = admin.regions.set_status("LON1", "operational")
        assert (lon["status"], lon["status_reason"]) == ("operational", "")  # a new status clears the reason
        with db.session() as s:
            assert service.placeable_zone(s, "LON1-b").id == "LON1-b"
        assert admin.zones.get("LON1-a")["effective_status"] == "operational"
        # a zone can be taken out on its own
        z = admin.zones.set_status("LON1-b", "maintenance", "rack power work")
        assert (z["status"], z["effective_status"], z["status_reason"]) == ("maintenance", "maintenance",
                                                                             "rack power work")
        with db.session() as s, pytest.raises(errors.Conflict) as err:
            service.placeable_zone(s, "LON1-b")
        assert err.value.code == "zone_not_operational" and "rack power work" in err.value.detail
        expect_error(422, admin.regions.set_status, "LON1", "closed")
    finally:
        admin.zones.set_status("LON1-b", "operational", "")
        restored = admin.regions.set_status("LON1", "maintenance", "Site maintenance (announced without an end date)")
    assert restored["status"] == "maintenance"
    types = [e.type for e in db.events("LON1")]
    assert types.count("region.updated") >= 2
    last = db.events("LON1")[-1]
    assert last.project_id is None and last.data["status"] == {"from": "operational", "to": "maintenance"}


def test_unchanged_patch_emits_no_event(admin: Client, db: CloudDb, any_cloud: Cloud) -> None:
    before = len(db.events("AMS1"))
    admin.regions.set_status("AMS1", "operational")
    assert len(db.events("AMS1")) == before
