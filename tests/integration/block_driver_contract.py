"""Contract tests for :class:`hackboot.volumes.driver.BlockStorageDriver` implementations.

Written once, run against every block storage driver: subclass :class:`BlockDriverContract` in a
``test_*.py`` module; the ``harness`` fixture parametrises each test over the implementations
(:class:`LocalQcow2Harness` today; a Ceph RBD driver adds its harness to ``HARNESSES`` and must pass
the same tests).

Data is checked the way a guest would see it, without knowing how the driver stores it: written and
read with ``qemu-io`` on the driver's own block-device definition (:meth:`BlockStorageDriver.blockdev`,
its key given as the QMP secret the definition names), and, for volumes plugged into a guest, written
through that guest's virtio device (HMP ``qemu-io`` on the device's backend). The guest is a real TCG
guest of :class:`hackboot.compute.qemu.QemuDriver` with hot-plug ports, booted once per module: the
guest OS takes part in unplugs.
"""

from __future__ import annotations

import abc
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hackboot.volumes.driver import (
    BlockStorageDriver,
    Execute,
    ImportLayer,
    StorageError,
    VolumeView,
)

MiB = 1024**2
SIZE = 64 * MiB


def _secrets(tree: Any) -> set[str]:
    """The ids of the QMP secret objects a block-device definition names (its keys)."""
    found: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "key-secret" and isinstance(v, str):
                found.add(v)
            else:
                found |= _secrets(v)
    elif isinstance(tree, list):
        for v in tree:
            found |= _secrets(v)
    return found


def _without(tree: Any, keys: set[str]) -> Any:
    if isinstance(tree, dict):
        return {k: _without(v, keys) for k, v in tree.items() if k not in keys}
    return tree


class BlockHarness(abc.ABC):
    """What differs between backends: how to make one, name layers, and a scratch place for files."""

    name: str
    driver: BlockStorageDriver

    def __init__(self) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="hbbs-", dir="/tmp"))
        self.created: set[str] = set()

    def new_volume_id(self) -> str:
        vid = f"vol-{uuid.uuid4().hex[:24]}"
        self.created.add(vid)
        return vid

    @abc.abstractmethod
    def layer_name(self, volume_id: str) -> str:
        """A fresh layer name for the volume, as the service would choose it."""

    def close(self) -> None:
        for vid in self.created:
            try:
                self.driver.delete(vid)
            except Exception as e:  # best-effort cleanup
                print(f"cleanup of {vid} failed: {e!r}")
        shutil.rmtree(self.scratch, ignore_errors=True)

    # ---- looking at data from the outside

    def _qemu(self, tool: str, view: VolumeView, *args: str) -> str:
        definition = self.driver.blockdev(view)
        if tool == "qemu-img":  # `info` opens the top node alone, and refuses options it does not use
            definition = _without(definition, {"cache", "aio", "backing"})
        objects = [a for sid in _secrets(definition) for a in ("--object", f"secret,id={sid},data={view.key}")]
        # qemu-img takes its options after the subcommand
        lead = [tool, args[0]] if tool == "qemu-img" else [tool]
        argv = [*lead, *objects, *args[len(lead) - 1:], "json:" + json.dumps(definition)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, (argv[0], proc.stdout, proc.stderr)
        return proc.stdout

    def write(self, view: VolumeView, byte: int, offset: int, length: int = 64 * 1024) -> None:
        out = self._qemu("qemu-io", view, "-c", f"write -P {byte} {offset} {length}")
        assert "wrote" in out, out

    def holds(self, view: VolumeView, byte: int, offset: int, length: int = 64 * 1024) -> bool:
        """Whether the volume reads back `byte` over the range (read-only, sharing locks with no one)."""
        ro = VolumeView(view.volume_id, view.active, view.key, True, view.size_bytes, view.fmt)
        out = self._qemu("qemu-io", ro, "-r", "-c", f"read -P {byte} {offset} {length}")
        return "Pattern verification failed" not in out and "read " in out

    def virtual_size(self, view: VolumeView) -> int:
        return int(json.loads(self._qemu("qemu-img", view, "info", "--output=json"))["virtual-size"])


class LocalQcow2Harness(BlockHarness):
    name = "local-qcow2"

    def __init__(self) -> None:
        super().__init__()
        from hackboot.volumes.storage import LocalQcow2Driver, new_file_name

        self._new_file_name = new_file_name
        self.driver = LocalQcow2Driver(self.scratch / "pool")

    def layer_name(self, volume_id: str) -> str:
        return f"{volume_id}/{self._new_file_name()}"


HARNESSES: dict[str, Callable[[], BlockHarness]] = {"local-qcow2": LocalQcow2Harness}


# --------------------------------------------------------------------------- a guest to plug volumes into


@dataclass
class Guest:
    driver: Any  # a QemuDriver
    instance_id: str
    execute: Execute
    state_dir: Path

    def write(self, device: str, byte: int, offset: int, length: int = 64 * 1024) -> None:
        """Write through the guest's own virtio device (its BlockBackend, throttling and all)."""
        backend = f"/machine/peripheral/{device}/virtio-backend"
        out = self.execute("human-monitor-command",
                           {"command-line": f'qemu-io -d {backend} "write -P {byte} {offset} {length}"'})
        assert not out.strip(), out  # errors come back here; the tool's own report goes to QEMU's log

    def sees_size(self, device: str) -> int:
        for blk in self.execute("query-block", None):
            if blk.get("qdev") == f"/machine/peripheral/{device}/virtio-backend":
                return int(blk["inserted"]["image"]["virtual-size"])
        raise AssertionError(f"{device} not plugged")


@pytest.fixture(scope="module")
def block_guest() -> Iterator[Guest]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from driver_contract import READY, qemu_test_assets, wait_console

    from hackboot.compute.driver import GuestSpec
    from hackboot.compute.qemu import QemuDriver

    assets = qemu_test_assets()
    state = Path(tempfile.mkdtemp(prefix="hbbg-", dir="/tmp"))
    driver = QemuDriver(state)
    spec = GuestSpec(str(uuid.uuid4()), "blockguest", 1, 192, kernel=assets.kernel, initrd=assets.initrd,
                     cmdline="console=ttyS0 panic=-1", hotplug_ports=8, accel="tcg")
    try:
        driver.spawn(spec)
        wait_console(driver, spec.instance_id, READY, timeout=120)
        yield Guest(driver, spec.instance_id, driver.monitor(spec.instance_id), state)
    finally:
        driver.destroy(spec.instance_id)
        driver.close()
        shutil.rmtree(state, ignore_errors=True)


# --------------------------------------------------------------------------- the tests


class BlockDriverContract:
    """Behaviour every BlockStorageDriver must have. Subclass in a test module."""

    @pytest.fixture(params=sorted(HARNESSES))
    def harness(self, request: pytest.FixtureRequest) -> Iterator[BlockHarness]:
        h = HARNESSES[request.param]()
        try:
            yield h
        finally:
            h.close()

    @staticmethod
    def view(h: BlockHarness, vid: str, active: str, key: str | None = None, size: int = SIZE) -> VolumeView:
        return VolumeView(vid, active, key, size_bytes=size)

    # ---- volumes

    def test_create_list_delete(self, harness: BlockHarness) -> None:
        d = harness.driver
        vid = harness.new_volume_id()
        active = d.create(vid, SIZE)
        assert d.create(vid, SIZE) == active  # idempotent: a retried create finds the volume
        assert vid in d.volumes()
        view = self.view(harness, vid, active)
        assert harness.virtual_size(view) == SIZE
        assert harness.holds(view, 0, 0)  # a new volume reads zeroes
        assert 0 <= d.allocated_bytes(vid) < SIZE  # thin
        assert d.free_bytes() > 0
        assert d.layers(vid, active) == [active]
        d.delete(vid)
        d.delete(vid)  # idempotent
        assert vid not in d.volumes()
        for bad in ("..", "../x", "a/b", ""):
            with pytest.raises(StorageError):
                d.create(bad, SIZE)
            with pytest.raises(StorageError):
                d.delete(bad)

    @pytest.mark.parametrize("encrypted", [False, True])
    def test_snapshot_clone_revert_and_delete_snapshot_offline(self, harness: BlockHarness, encrypted: bool) -> None:
        from hackboot.volumes.storage import new_key

        d = harness.driver
        key = new_key() if encrypted else None
        vid = harness.new_volume_id()
        base = d.create(vid, SIZE, key=key)
        harness.write(self.view(harness, vid, base, key), 0x41, 0)
        definition = json.dumps(d.blockdev(self.view(harness, vid, base, key)))
        assert key is None or key not in definition  # the definition names the key, never holds it

        s1 = harness.layer_name(vid)
        d.snapshot(self.view(harness, vid, base, key), s1)
        d.snapshot(self.view(harness, vid, base, key), s1)  # idempotent
        v = self.view(harness, vid, s1, key)
        harness.write(v, 0x42, 0)
        assert harness.holds(v, 0x42, 0) and d.layers(vid, s1) == [s1, base]

        clone_id = harness.new_volume_id()
        clone = d.clone(clone_id, base, SIZE, key=key)
        assert harness.holds(self.view(harness, clone_id, clone, key), 0x41, 0)  # the snapshot's data
        assert d.allocated_bytes(clone_id) < d.allocated_bytes(vid)  # shared, not copied

        back = harness.layer_name(vid)
        d.revert(self.view(harness, vid, s1, key), base, back)
        d.revert(self.view(harness, vid, s1, key), base, back)  # idempotent
        assert harness.holds(self.view(harness, vid, back, key), 0x41, 0)
        d.drop_layer(s1)
        d.drop_layer(s1)

        harness.write(self.view(harness, vid, back, key), 0x43, 64 * 1024)
        d.delete(clone_id)  # (the service refuses to delete a snapshot that clones sit on)
        d.delete_snapshot(self.view(harness, vid, back, key), base)
        d.delete_snapshot(self.view(harness, vid, back, key), base)  # idempotent
        v = self.view(harness, vid, back, key)
        assert harness.holds(v, 0x41, 0) and harness.holds(v, 0x43, 64 * 1024)
        assert d.layers(vid, back) == [back]
        d.delete_snapshot(v, back)  # the active layer is never removed
        assert harness.holds(v, 0x41, 0)

    def test_resize_offline(self, harness: BlockHarness) -> None:
        d = harness.driver
        vid = harness.new_volume_id()
        active = d.create(vid, SIZE)
        harness.write(self.view(harness, vid, active), 0x44, 0)
        d.resize(self.view(harness, vid, active), 2 * SIZE)
        v = self.view(harness, vid, active, size=2 * SIZE)
        assert harness.virtual_size(v) == 2 * SIZE and harness.holds(v, 0x44, 0)
        raw_id = harness.new_volume_id()
        raw = d.create(raw_id, SIZE, shareable=True)
        rv = VolumeView(raw_id, raw, None, size_bytes=SIZE, fmt="raw")
        d.resize(rv, 2 * SIZE)
        assert harness.virtual_size(rv) == 2 * SIZE

    def test_create_from_image(self, harness: BlockHarness) -> None:
        raw = harness.scratch / "image.raw"
        raw.write_bytes(b"\x45" * (128 * 1024) + b"\0" * (1024**2 - 128 * 1024))
        image = harness.scratch / "image.qcow2"
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
        for key in (None, "k" * 43):
            vid = harness.new_volume_id()
            active = harness.driver.create_from_image(vid, image, "qcow2", SIZE, key=key)
            v = self.view(harness, vid, active, key)
            assert harness.virtual_size(v) == SIZE  # grown to the volume's size
            assert harness.holds(v, 0x45, 0, 128 * 1024) and harness.holds(v, 0, 128 * 1024)

    def test_backup_export_and_import(self, harness: BlockHarness) -> None:
        from hackboot.volumes.storage import new_key

        d = harness.driver
        key = new_key()
        vid = harness.new_volume_id()
        base = d.create(vid, SIZE, key=key)
        harness.write(self.view(harness, vid, base, key), 0x51, 0)
        s1 = harness.layer_name(vid)
        d.snapshot(self.view(harness, vid, base, key), s1)
        bucket = harness.scratch / "bucket"
        bucket.mkdir()
        stored: dict[str, tuple[Path, int]] = {}

        def upload(point: str, since: str | None) -> tuple[bool, list[ImportLayer]]:
            out = []
            with d.export_backup(vid, point, since) as exp:
                for layer in exp.layers:
                    copy = bucket / uuid.uuid4().hex
                    shutil.copyfile(layer.path, copy)
                    assert layer.size == copy.stat().st_size and len(layer.sha256) == 64
                    stored[layer.name] = (copy, layer.size)
                    out.append(ImportLayer(label=layer.name, size=layer.size, encrypted=True, key=key,
                                           volume_size_bytes=SIZE))
                return exp.incremental, out

        incremental, full = upload(base, None)
        assert not incremental and [la.label for la in full] == [base]
        harness.write(self.view(harness, vid, s1, key), 0x52, 64 * 1024)
        s2 = harness.layer_name(vid)
        d.snapshot(self.view(harness, vid, s1, key), s2)
        incremental, incr = upload(s1, base)
        assert incremental and [la.label for la in incr] == [s1]  # only what changed since the last point

        def fetch(layer: ImportLayer, dest: Path) -> None:
            shutil.copyfile(stored[layer.label][0], dest)

        restored_key = new_key()  # restored data is encrypted with a key of its own
        rid = harness.new_volume_id()
        active = d.import_backup(rid, full + incr, SIZE, key=restored_key, fetch=fetch)
        v = self.view(harness, rid, active, restored_key)
        assert harness.holds(v, 0x51, 0) and harness.holds(v, 0x52, 64 * 1024)
        assert d.layers(rid, active) == [active]  # flattened
        older = harness.new_volume_id()
        v = self.view(harness, older, d.import_backup(older, full, SIZE, key=None, fetch=fetch))
        assert harness.holds(v, 0x51, 0) and harness.holds(v, 0, 64 * 1024)

        def tampered(layer: ImportLayer, dest: Path) -> None:
            dest.write_bytes(b"not a disk image" * 1000)

        bad = harness.new_volume_id()
        with pytest.raises(StorageError, match="not an acceptable disk image"):
            d.import_backup(bad, full, SIZE, key=None, fetch=tampered)
        assert bad not in d.volumes()  # nothing half-made is left

        def refused(layer: ImportLayer, dest: Path) -> None:
            raise StorageError("Restore refused: changed in its bucket")

        with pytest.raises(StorageError, match="changed in its bucket"):
            d.import_backup(bad, full, SIZE, key=None, fetch=refused)
        assert bad not in d.volumes()

    # ---- volumes in a guest

    @pytest.mark.qemu
    def test_attach_online_snapshot_resize_merge_detach(self, harness: BlockHarness, block_guest: Guest) -> None:
        from hackboot.volumes.storage import new_key

        d, g = harness.driver, block_guest.execute
        key = new_key()
        vid = harness.new_volume_id()
        base = d.create(vid, SIZE, key=key)
        limits = {"iops": 500, "iops_rd": 0, "iops_wr": 0, "iops_max": 750, "iops_max_length": 10,
                  "bps": 50 * MiB, "bps_rd": 0, "bps_wr": 0, "bps_max": 75 * MiB, "bps_max_length": 10}
        dev = d.attach(g, self.view(harness, vid, base, key), 7, limits)
        assert d.attach(g, self.view(harness, vid, base, key), 7, limits) == dev  # idempotent
        assert d.plugged(g, vid)
        applied = d.io_limits(g, vid)
        assert {k: applied[k] for k in ("iops", "iops_max", "iops_max_length", "bps", "bps_max")} == \
            {k: limits[k] for k in ("iops", "iops_max", "iops_max_length", "bps", "bps_max")}
        d.set_limits(g, vid, {**limits, "iops": 900, "iops_max": 1000})
        assert d.io_limits(g, vid)["iops"] == 900
        block_guest.write(dev, 0x61, 0)

        s1 = harness.layer_name(vid)
        d.snapshot(self.view(harness, vid, base, key), s1, guest=g)  # the guest switches, keeps running
        d.snapshot(self.view(harness, vid, base, key), s1, guest=g)  # idempotent
        block_guest.write(dev, 0x62, 64 * 1024)
        assert d.plugged(g, vid) and d.layers(vid, s1) == [s1, base]

        clone_id = harness.new_volume_id()  # the frozen layer can be cloned while the volume is in use
        clone = d.clone(clone_id, base, SIZE, key=key)
        cv = self.view(harness, clone_id, clone, key)
        assert harness.holds(cv, 0x61, 0) and harness.holds(cv, 0, 64 * 1024)

        d.resize(self.view(harness, vid, s1, key), 2 * SIZE, guest=g)
        assert block_guest.sees_size(dev) == 2 * SIZE  # the guest is told at once

        s2 = harness.layer_name(vid)
        d.snapshot(self.view(harness, vid, s1, key, 2 * SIZE), s2, guest=g)
        d.delete_snapshot(self.view(harness, vid, s2, key, 2 * SIZE), s1, guest=g)  # merged in the guest
        assert d.layers(vid, s2) == [s2, base]

        d.detach(g, self.view(harness, vid, s2, key, 2 * SIZE), timeout=60)
        d.detach(g, self.view(harness, vid, s2, key, 2 * SIZE), timeout=60)  # idempotent
        assert not d.plugged(g, vid) and d.io_limits(g, vid) == {}
        v = self.view(harness, vid, s2, key, 2 * SIZE)
        assert harness.virtual_size(v) == 2 * SIZE
        assert harness.holds(v, 0x61, 0) and harness.holds(v, 0x62, 64 * 1024)
        d.delete(clone_id)
        d.delete_snapshot(v, base)  # offline now
        assert d.layers(vid, s2) == [s2] and harness.holds(v, 0x61, 0) and harness.holds(v, 0x62, 64 * 1024)

    @pytest.mark.qemu
    def test_attach_failure_leaves_the_guest_as_it_was(self, harness: BlockHarness, block_guest: Guest) -> None:
        d, g = harness.driver, block_guest.execute
        vid = harness.new_volume_id()
        active = d.create(vid, SIZE)
        nodes = {n["node-name"] for n in g("query-named-block-nodes", {"flat": True})}
        with pytest.raises(Exception):  # noqa: B017 - the hypervisor's own error
            d.attach(g, self.view(harness, vid, active), 99)  # no such port
        assert not d.plugged(g, vid)
        assert {n["node-name"] for n in g("query-named-block-nodes", {"flat": True})} == nodes
