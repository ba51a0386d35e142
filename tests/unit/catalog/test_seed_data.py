"""The seed catalog is consistent and says what the seeds say."""

from __future__ import annotations

import itertools
import re

import pytest

from hackboot.catalog import seed_data as d
from hackboot.catalog.models import REGION_STATUSES, Flavor, Price, Region

# seed 003 §1.1 "VM Instance Types": vCPU and RAM, exactly.
SEED_003_TYPES = {
    "t3.micro": (2, 1024), "t3.small": (2, 2048), "t3.medium": (2, 4096), "t3.large": (2, 8192),
    "c5.xlarge": (4, 8192), "m5.2xlarge": (8, 32768), "g4.xlarge": (4, 16384),
}
SEED_000_PRODUCTS = {"VPS-NANO", "VPS-STARTER", "VPS-PERFORMANCE", "VPS-BUSINESS", "VPS-ENTERPRISE+",
                     "GPU-T4", "GPU-RTX4090", "GPU-A100"}
FLAVORS = {f.id: f for f in d.FLAVORS}
REGIONS = {r.id: r for r in d.REGIONS}


def test_every_product_line_of_both_seeds_is_a_flavor() -> None:
    assert set(FLAVORS) == SEED_000_PRODUCTS | set(SEED_003_TYPES)


@pytest.mark.parametrize("flavor_id", sorted(SEED_003_TYPES))
def test_seed_003_instance_types_have_exactly_the_seed_specs(flavor_id: str) -> None:
    f = FLAVORS[flavor_id]
    assert (f.vcpus, f.memory_mb) == SEED_003_TYPES[flavor_id]
    assert flavor_id in f.source and "seed 003" in f.source


def test_g4_xlarge_gets_a_t4_and_gpu_flavors_are_consistent() -> None:
    assert (FLAVORS["g4.xlarge"].gpu_model, FLAVORS["g4.xlarge"].gpu_count) == ("T4", 1)
    assert {(f.id, f.gpu_model) for f in d.FLAVORS if f.id.startswith("GPU-")} == {
        ("GPU-T4", "T4"), ("GPU-RTX4090", "RTX4090"), ("GPU-A100", "A100")}
    for f in d.FLAVORS:
        assert (f.gpu_model is None) == (f.gpu_count == 0), f.id
        assert f.gpu_model is None or f.gpu_model in d.GPU_MODELS, f.id
        assert (f.family == "gpu") == (f.gpu_count > 0), f.id


def test_vps_line_grows_monotonically_and_fits_a_seed_host() -> None:
    vps = [FLAVORS[i] for i in ("VPS-NANO", "VPS-STARTER", "VPS-PERFORMANCE", "VPS-BUSINESS", "VPS-ENTERPRISE+")]
    for small, big in itertools.pairwise(vps):
        assert small.vcpus <= big.vcpus and small.memory_mb < big.memory_mb and small.disk_gb < big.disk_gb
        assert small.price_eur_hour < big.price_eur_hour
    # seed 000 VPS host: 2x EPYC 7543 (128 threads), 512 GB RAM
    assert all(f.vcpus <= 128 and f.memory_mb <= 512 * 1024 for f in vps)


def test_every_flavor_has_exactly_one_global_hourly_price() -> None:
    prices = [p for p in d.all_prices() if p.kind == "flavor"]
    assert sorted(p.sku for p in prices) == sorted(FLAVORS)
    for p in prices:
        assert p.unit == "hour" and p.amount_eur > 0
        assert p.amount_eur == FLAVORS[p.sku].price_eur_hour


def test_storage_price_list_covers_the_tiers_and_classes_of_seed_003() -> None:
    storage = {p.sku: p for p in d.STORAGE_PRICES}
    assert set(storage) == {"volume:ssd-performance", "volume:ssd-standard", "volume:hdd-standard",
                            "volume:archive", "s3:STANDARD", "s3:STANDARD_IA", "s3:GLACIER",
                            "s3:INTELLIGENT_TIERING"}
    for p in storage.values():
        assert p.unit == "GB-month" and p.amount_eur > 0
        assert p.kind == ("volume" if p.sku.startswith("volume:") else "object_storage")
        assert "list price" in p.description and "EUR" in p.description
    tiers = [storage[f"volume:{t}"].amount_eur for t in ("ssd-performance", "ssd-standard", "hdd-standard",
                                                         "archive")]
    assert tiers == sorted(tiers, reverse=True)  # faster costs more
    assert storage["s3:GLACIER"].amount_eur < storage["s3:STANDARD_IA"].amount_eur < storage["s3:STANDARD"].amount_eur
    assert len({p.sku for p in d.all_prices()}) == len(d.all_prices())


def test_regions_say_what_seed_000_says() -> None:
    expected = {  # id: (city, country, status, peering starts with, available_from)
        "PAR1": ("Paris", "FR", "operational", "France-IX", ""),
        "FRA1": ("Frankfurt", "DE", "operational", "DE-CIX", ""),
        "AMS1": ("Amsterdam", "NL", "operational", "AMS-IX", ""),
        "LON1": ("London", "GB", "maintenance", "LINX", ""),
        "MAD1": ("Madrid", "ES", "planned", "ESPANIX", "2025-Q2"),
        "MIL1": ("Milan", "IT", "planned", "MIX", "2025-Q3"),
    }
    assert set(REGIONS) == set(expected)
    for rid, (name, country, status, peering, available) in expected.items():
        r = REGIONS[rid]
        assert (r.name, r.country, r.status, r.available_from) == (name, country, status, available)
        assert r.peering.startswith(peering) and r.status in REGION_STATUSES
        assert "seed 000" in r.source


def test_data_residency_is_stated_truthfully() -> None:
    for r in d.REGIONS:
        in_eu = r.country in d.EU_COUNTRIES
        assert (r.jurisdiction == "EU") == in_eu, r.id
    lon = REGIONS["LON1"]
    assert (lon.country, lon.jurisdiction) == ("GB", "UK")
    assert "left the EU" in lon.note and "adequacy" in lon.note


def test_zones_are_named_after_their_region_and_unique() -> None:
    zones = [z for r in d.REGIONS for z in r.zones]
    assert len(zones) == len(set(zones))
    for r in d.REGIONS:
        assert r.zones and all(re.fullmatch(rf"{r.id}-[a-z]", z) for z in r.zones)
    assert "PAR1-a" in zones  # the default zone of a one-machine cloud (settings.zone)


def _limit(column: object) -> int:
    return int(column.type.length)  # type: ignore[attr-defined]


def test_every_value_fits_its_column() -> None:
    """PostgreSQL enforces VARCHAR lengths (SQLite does not): catch it here."""
    for f in d.FLAVORS:
        assert len(f.id) <= _limit(Flavor.__table__.c.id)
        assert len(f.source) <= _limit(Flavor.__table__.c.source), f.id
        assert len(f.description) <= _limit(Flavor.__table__.c.description), f.id
        assert len(f.family) <= _limit(Flavor.__table__.c.family)
    for p in d.all_prices():
        assert len(p.sku) <= _limit(Price.__table__.c.sku)
        assert len(p.description) <= _limit(Price.__table__.c.description), p.sku
        assert len(p.kind) <= _limit(Price.__table__.c.kind)
    for r in d.REGIONS:
        assert len(r.note) <= _limit(Region.__table__.c.note), r.id
        assert len(r.status_reason) <= _limit(Region.__table__.c.status_reason), r.id
        assert len(r.peering) <= _limit(Region.__table__.c.peering), r.id
