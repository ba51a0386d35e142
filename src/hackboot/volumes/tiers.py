"""Storage tiers and the QEMU I/O limits that make them real.

Seed 003 §2.1 ("Storage Tiers") names four tiers and gives IOPS figures for three of them:
SSD Performance 100K+ IOPS, SSD Standard 10K IOPS, HDD Standard 1K IOPS, Archive (cold storage,
optimized for cost, no figure). Prices per GB-month are in the catalog's price list
(``volume:<tier>``). The seed gives no bandwidth, burst or archive figures: those are ours, chosen
like the public clouds' block tiers (a sustained rate, and a burst of about 1.5-2x for a bounded
time so a boot or a restart is not throttled to the floor).

Each tier becomes QEMU throttling on the guest device (``block_set_io_throttle``): ``iops`` and
``bps`` are the sustained limits (reads + writes together), ``iops_max``/``bps_max`` the burst rate
allowed for ``*_max_length`` seconds (QEMU's leaky bucket). The limits apply at attach time and are
changed live when the volume's tier changes (PATCH tier); ``query-block`` shows them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from hackboot.core.config import get_settings

MiB = 1024 * 1024


@dataclass(frozen=True)
class Tier:
    name: str
    description: str
    iops: int
    iops_burst: int
    bps: int  # bytes per second
    bps_burst: int
    burst_seconds: int
    source: str
    test_only: bool = False

    def qmp_limits(self) -> dict[str, int]:
        """Arguments of QMP ``block_set_io_throttle`` (without the device id)."""
        return {
            "iops": self.iops, "iops_rd": 0, "iops_wr": 0,
            "bps": self.bps, "bps_rd": 0, "bps_wr": 0,
            "iops_max": self.iops_burst, "iops_max_length": self.burst_seconds,
            "bps_max": self.bps_burst, "bps_max_length": self.burst_seconds,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("test_only")
        return d


S003 = "seed 003 §2.1 'Storage Tiers'"
OURS = "burst and bandwidth are ours (the seed gives IOPS only)"

TIERS: dict[str, Tier] = {t.name: t for t in (
    Tier("ssd-performance", "NVMe, <1ms latency", 100_000, 150_000, 1000 * MiB, 1500 * MiB, 60,
         f"{S003}: SSD Performance, NVMe-based, <1ms latency, 100K+ IOPS; {OURS}"),
    Tier("ssd-standard", "SSD, <5ms latency", 10_000, 15_000, 250 * MiB, 400 * MiB, 60,
         f"{S003}: SSD Standard, SSD-based, <5ms latency, 10K IOPS; {OURS}"),
    Tier("hdd-standard", "HDD, <10ms latency", 1_000, 2_000, 100 * MiB, 150 * MiB, 30,
         f"{S003}: HDD Standard, HDD-based, <10ms latency, 1K IOPS; {OURS}"),
    Tier("archive", "Cold storage, optimized for cost", 250, 500, 25 * MiB, 50 * MiB, 30,
         f"{S003}: Archive, cold storage, optimized for cost (no figure: 250 IOPS / 25 MiB/s are ours)"),
)}

# A tier slow enough for a TCG guest to saturate: used by tests and benchmarks to show that the
# caps are enforced where the real tiers' caps are above what an emulated guest can reach.
# Only offered with the volume_test_tiers setting (HACKBOOT_VOLUME_TEST_TIERS=1; never in production).
TEST_TIERS: dict[str, Tier] = {t.name: t for t in (
    Tier("test-200iops", "Test tier: 200 IOPS, no burst", 200, 200, 8 * MiB, 8 * MiB, 1,
         "test tier (HACKBOOT_VOLUME_TEST_TIERS=1)", test_only=True),
)}

DEFAULT_TIER = "ssd-standard"


def test_tiers_enabled() -> bool:
    return get_settings().volume_test_tiers


def all_tiers() -> dict[str, Tier]:
    return {**TIERS, **TEST_TIERS} if test_tiers_enabled() else dict(TIERS)


def get(name: str) -> Tier | None:
    return all_tiers().get(name) or TIERS.get(name) or TEST_TIERS.get(name)
