"""Catalog service rules run in-process against a fresh database (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, String, Table, delete, select

from hackboot.catalog import seed_data, service
from hackboot.catalog.models import Flavor, Price, Region, Zone
from hackboot.core import errors
from hackboot.core.auth import Principal
from hackboot.core.config import reset_settings_cache
from hackboot.core.db import dispose_engine, get_engine, session_scope, utcnow
from hackboot.core.migrate import upgrade
from hackboot.events.models import Event

ADMIN = Principal(user_id="usr-test", username="tester", token_id="tok-test", role="admin", is_superuser=True,
                  project_id=None)


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = "" if request.param == "sqlite" else request.getfixturevalue("postgres").create_database()
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", url)
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("HACKBOOT_HOST_DOWN_AFTER_S", "30")
    reset_settings_cache()
    dispose_engine()
    from hackboot.core.config import get_settings

    upgrade(get_settings().effective_database_url)
    yield request.param
    dispose_engine()
    monkeypatch.undo()
    reset_settings_cache()


def test_seed_is_idempotent_and_never_overwrites_edits(fresh_db: str) -> None:
    first = service.seed()
    assert len(first["regions"]) == 6 and len(first["flavors"]) == len(seed_data.FLAVORS)
    assert len(first["prices"]) == len(seed_data.all_prices())
    assert service.seed() == {"regions": [], "zones": [], "flavors": [], "prices": []}
    # an administrator edits things, removes a price; the next start restores only what is missing
    service.update_region(ADMIN, "LON1", status="operational")
    service.set_price(ADMIN, "VPS-NANO", 0.0099)
    service.update_flavor(ADMIN, "t3.micro", description="edited")
    with session_scope() as s:
        s.execute(delete(Price).where(Price.sku == "s3:GLACIER"))
    again = service.seed()
    assert again == {"regions": [], "zones": [], "flavors": [], "prices": ["s3:GLACIER"]}
    with session_scope(write=False) as s:
        assert s.get(Region, "LON1").status == "operational"  # type: ignore[union-attr]
        assert s.get(Flavor, "t3.micro").description == "edited"  # type: ignore[union-attr]
        assert s.scalar(select(Price.amount_eur).where(Price.sku == "VPS-NANO")) == 0.0099
        assert s.scalar(select(Zone.region_id).where(Zone.id == "MIL1-a")) == "MIL1"
        seeded = list(s.scalars(select(Event).where(Event.type == "catalog.seeded")))
        assert len(seeded) == 2 and seeded[1].data["prices"] == ["s3:GLACIER"]


def test_flavor_references_finds_any_table_with_a_flavor_id(fresh_db: str) -> None:
    service.seed()
    meta = MetaData()
    widgets = Table("catalog_test_widgets", meta, Column("id", String(8), primary_key=True),
                    Column("flavor_id", String(32)))
    meta.create_all(get_engine())
    try:
        with session_scope() as s:
            s.execute(widgets.insert().values(id="w1", flavor_id="t3.small"))
        with session_scope(write=False) as s:
            assert service.flavor_references(s, "t3.small", meta) == {"catalog_test_widgets": 1}
            assert service.flavor_references(s, "t3.micro", meta) == {}
            # without metadata: the database's own tables (instances included), nothing imported
            assert service.flavor_references(s, "t3.small") == {"catalog_test_widgets": 1}
    finally:
        meta.drop_all(get_engine())


def test_a_flavor_in_use_is_deactivated_not_deleted(fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service.seed()
    service.create_flavor(ADMIN, id="custom.1", family="general", vcpus=1, memory_mb=512, disk_gb=5,
                          price_eur_hour=0.01)
    monkeypatch.setattr(service, "flavor_references", lambda s, fid, metadata=None: {"instances": 3})
    result = service.delete_flavor(ADMIN, "custom.1")
    assert result.outcome == "deactivated" and "3 instances" in result.detail
    with session_scope(write=False) as s:
        assert s.get(Flavor, "custom.1").active is False  # type: ignore[union-attr]
        assert s.scalar(select(Price.amount_eur).where(Price.sku == "custom.1")) == 0.01
    monkeypatch.undo()
    assert service.delete_flavor(ADMIN, "custom.1").outcome == "deleted"  # nothing refers to it any more


def test_stale_hosts_go_down_once_and_come_back(fresh_db: str) -> None:
    service.seed()
    view, created = service.register_host(None, name="hv-1", zone_id="PAR1-a", vcpus=8, memory_mb=8192,
                                          disk_gb=10)
    assert created and view.host.status == "up"
    assert service.mark_stale_hosts_down() == []  # fresh
    later = utcnow() + dt.timedelta(seconds=31)
    assert service.mark_stale_hosts_down(now=later) == [view.host.id]
    assert service.mark_stale_hosts_down(now=later) == []  # already down: no second event
    with session_scope(write=False) as s:
        host = service.get_host(s, "hv-1").host
        assert host.status == "down" and "No heartbeat for 31s" in host.status_reason
    assert service.heartbeat(None, "hv-1").status == "up"
    with session_scope(write=False) as s:
        types = list(s.scalars(select(Event.type).where(Event.resource_id == view.host.id).order_by(Event.seq)))
    assert types == ["host.registered", "host.down", "host.up"]
    with session_scope(write=False) as s, pytest.raises(errors.Conflict):
        service.placeable_zone(s, "LON1-a")
    assert [loop.name for loop in service.loops()] == ["catalog-host-liveness"]
