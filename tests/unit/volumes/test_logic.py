"""Pure logic of block storage: tiers -> QEMU limits, the state machine, durations, names, chain definitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from hackboot.core import errors
from hackboot.volumes import lifecycle, storage, tiers
from hackboot.volumes.api import parse_duration


def test_tiers_follow_the_seed_and_map_to_qmp_limits() -> None:
    assert tiers.TIERS["ssd-performance"].iops == 100_000
    assert tiers.TIERS["ssd-standard"].iops == 10_000
    assert tiers.TIERS["hdd-standard"].iops == 1_000
    for t in tiers.TIERS.values():
        limits = t.qmp_limits()
        assert limits["iops_max"] >= limits["iops"] and limits["bps_max"] >= limits["bps"]
        assert limits["iops_max_length"] == t.burst_seconds
    assert "test-200iops" not in tiers.all_tiers() or tiers.test_tiers_enabled()


def test_state_machine() -> None:
    assert lifecycle.check(lifecycle.ATTACH, "vol-x", "available", None) == "attaching"
    assert lifecycle.check(lifecycle.SNAPSHOT, "vol-x", "in-use", None) is None
    with pytest.raises(errors.Conflict) as err:
        lifecycle.check(lifecycle.DELETE, "vol-x", "in-use", None)
    assert err.value.code == "in_use" and "detach" in err.value.detail
    with pytest.raises(errors.Conflict) as err:
        lifecycle.check(lifecycle.RESIZE, "vol-x", "available", "snapshotting")
    assert err.value.code == "task_in_progress"
    with pytest.raises(errors.Conflict):
        lifecycle.check(lifecycle.REVERT, "vol-x", "in-use", None)
    with pytest.raises(errors.NotFound):
        lifecycle.check(lifecycle.ATTACH, "vol-x", "deleted", None)


def test_durations() -> None:
    assert parse_duration("6h", "every") == 21600
    assert parse_duration("7d", "keep") == 7 * 86400
    assert parse_duration("30m", "x") == 1800 and parse_duration(90, "x") == 90
    with pytest.raises(errors.ValidationFailed):
        parse_duration("soon", "every")


def test_names_fit_qemu_limits() -> None:
    vid = "vol-01m80dkvfmvpwrkq0a9r40w1k6"
    assert len(storage.node_name(vid, f"{vid}/f-0123456789ab.qcow2")) <= 31
    assert len(storage.fuse_node(vid)) <= 31
    assert storage.serial_for(vid) == vid[:20]
    assert storage.node_name(vid, "a") != storage.node_name("vol-other", "a")
    args = storage.hotplug_port_args()
    assert args.count("-device") == storage.HOTPLUG_PORTS and "bus=pcie.0" in args[1]


def test_chain_definition_nests_backing_and_keys(tmp_path: Path) -> None:
    pool = storage.Pool(tmp_path)
    (tmp_path / "vol-a").mkdir()
    # two fake qcow2 headers: top backs onto base (relative name)
    def header(backing: str | None) -> bytes:
        import struct

        name = (backing or "").encode()
        h = b"QFI\xfb" + struct.pack(">I", 3) + struct.pack(">QI", 512 if backing else 0, len(name))
        return h.ljust(512, b"\0") + name

    (tmp_path / "vol-a" / "base.qcow2").write_bytes(header(None))
    (tmp_path / "vol-a" / "top.qcow2").write_bytes(header("base.qcow2"))
    assert pool.chain("vol-a/top.qcow2") == ["vol-a/top.qcow2", "vol-a/base.qcow2"]
    assert pool.children_of("vol-a/base.qcow2", ["vol-a/top.qcow2", "vol-a/base.qcow2"]) == ["vol-a/top.qcow2"]
    d = storage.chain_definition(pool, storage.VolumeView("vol-a", "vol-a/top.qcow2", key="SECRETVALUE"))
    assert d["encrypt"] == {"format": "luks", "key-secret": "hbsec-vol-a"} and "SECRETVALUE" not in str(d)
    assert d["backing"]["node-name"] == storage.node_name("vol-a", "vol-a/base.qcow2")
    assert d["backing"]["read-only"] is True and d["backing"]["backing"] is None
    with pytest.raises(storage.StorageError):
        pool.path("../etc/passwd")
