"""The block storage driver of a host: qcow2 files in a pool, qemu-img, QMP block graphs.

Knows nothing of HTTP, tenants or the database: the agent (``volumes/agent.py``) calls it with
paths, sizes and keys.

Files and chains
----------------
A volume is a tree of qcow2 files in ``<pool>/<volume id>/``; backing references are *relative*
(``f-….qcow2``, or ``../vol-…/f-….qcow2`` for a clone), so a pool can be moved. The volume writes
to its *active* file; every snapshot is a frozen file below it (external snapshots):

    base.qcow2  <-  f-snap1.qcow2  <-  f-active.qcow2          (snapshot "snap1" = base.qcow2 …)

* snapshot: a new empty overlay becomes the active file (``qemu-img create -b … -u`` offline,
  QMP ``blockdev-add`` + ``blockdev-snapshot`` online). No data is copied: constant time.
* clone: the clone's first file is an overlay on the snapshot's frozen file; unchanged blocks are
  shared.
* snapshot delete: the frozen file's data is streamed into each file that backs onto it
  (``block-stream`` with ``base-node`` = its own backing) and the file is removed: chains stay as
  long as the number of live snapshots, never longer.
* revert: a new empty overlay on the snapshot's file becomes active; the old active file goes.

Every multi-step change of the graph goes through QMP: the guest's QEMU when the volume is
attached, otherwise a short-lived ``qemu-storage-daemon`` (same commands, same jobs), so one code
path serves both, and encrypted chains are opened with their key passed as a QMP ``secret``
object (never a command-line argument or a file). ``qemu-img`` is used where no image is open yet
(create, convert into a new file); its key travels through a pipe (``--object
secret,file=/dev/fd/N``), never argv.

Encryption
----------
qcow2 with LUKS (``encrypt.format=luks``, AES-256-XTS). The volume key is a 256-bit random
passphrase that unlocks each file's LUKS key slot. Since the passphrase has 256 bits of entropy,
PBKDF2 stretching adds nothing, so ``iter-time`` is kept short (opening a file would otherwise cost
2 s of CPU per layer).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hackboot.compute.driver import hotplug_port_id
from hackboot.core.qmpchild import QmpChild, wait_job
from hackboot.volumes.driver import (
    BackupExport,
    BlockStorageDriver,
    DetachTimeout,
    Execute,
    ExportedLayer,
    Fault,
    Fetch,
    ImportLayer,
    NoSpace,
    StorageError,
    VolumeView,
    no_fault,
)

__all__ = ["DetachTimeout", "LocalQcow2Driver", "NoSpace", "StorageError", "VolumeView"]

log = logging.getLogger("hackboot.volumes.storage")

GiB = 1024**3
KEY_SECRET_ID = "hbkey"
LUKS_OPTS = "encrypt.format=luks,encrypt.key-secret=hbkey,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts," \
            "encrypt.iter-time=50"
HOTPLUG_PORTS = 8  # hot-plug ports a guest gets for volumes (GuestSpec.hotplug_ports): slot n is port n
VOLUME_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def new_key() -> str:
    """A fresh volume passphrase: 256 random bits, base64url (LUKS passphrases must be UTF-8)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def new_file_name(prefix: str = "f") -> str:
    return f"{prefix}-{secrets.token_hex(6)}.qcow2"


# ------------------------------------------------------------------------------------------ qemu-img

def _run(argv: list[str], what: str, *, key: str | None = None, timeout: float = 3600.0,
         extra_keys: dict[str, str] | None = None) -> str:
    """Run a qemu tool; keys go through pipes named by --object secret,file=/dev/fd/N (never argv)."""
    for attempt in range(4):
        try:
            return _run_once(argv, what, key=key, timeout=timeout, extra_keys=extra_keys)
        except StorageError as exc:
            # QEMU's LUKS PBKDF calibration measures CPU time and fails when a busy host gives it none
            if "accurate CPU usage" not in str(exc) or attempt == 3:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _run_once(argv: list[str], what: str, *, key: str | None = None, timeout: float = 3600.0,
              extra_keys: dict[str, str] | None = None) -> str:
    keys = dict(extra_keys or {})
    if key is not None:
        keys[KEY_SECRET_ID] = key
    fds: list[int] = []
    objects: list[str] = []
    try:
        for secret_id, value in keys.items():
            r, w = os.pipe()
            os.write(w, value.encode())  # a 43-byte passphrase fits any pipe buffer
            os.close(w)
            fds.append(r)
            objects += ["--object", f"secret,id={secret_id},file=/dev/fd/{r},format=raw"]
        # qemu-img takes --object right after the subcommand
        full = [argv[0], argv[1], *objects, *argv[2:]]
        try:
            proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False,
                                  pass_fds=tuple(fds))
        except FileNotFoundError:
            raise StorageError(f"{what}: {argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise StorageError(f"{what}: {argv[0]} timed out after {timeout:.0f}s") from None
    finally:
        for fd in fds:
            os.close(fd)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()[-400:]
        if "No space left on device" in msg:
            raise NoSpace(f"{what}: No space left on device ({msg})")
        raise StorageError(f"{what}: {msg}")
    return proc.stdout


def qcow2_backing(path: Path) -> str | None:
    """The backing file string stored in a qcow2 header (None when there is none)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not size or size > 4096:
                return None
            f.seek(offset)
            return f.read(size).decode(errors="surrogateescape")
    except OSError:
        return None


@dataclass
class Pool:
    """The host's storage pool: ``<root>/<volume id>/<file>``; callers use pool-relative paths."""

    root: Path
    direct_io: bool | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if self.root.resolve() not in p.parents:
            raise StorageError(f"path {rel!r} escapes the storage pool")
        return p

    def rel(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def volume_dir(self, volume_id: str) -> Path:
        d = self.root / volume_id
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def backing_rel(self, rel: str) -> str | None:
        """Pool-relative path of the backing file of `rel` (None at the bottom)."""
        p = self.path(rel)
        b = qcow2_backing(p)
        if not b:
            return None
        target = Path(b) if os.path.isabs(b) else p.parent / b
        return self.rel(target)

    def chain(self, rel: str) -> list[str]:
        """`rel` and its backing files, top first."""
        out = [rel]
        while (b := self.backing_rel(out[-1])) is not None:
            if b in out or len(out) > 256:
                raise StorageError(f"backing loop or chain too long at {b}")
            out.append(b)
        return out

    def children_of(self, rel: str, candidates: list[str]) -> list[str]:
        return [c for c in candidates if self.path(c).exists() and self.backing_rel(c) == rel]

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def uses_direct_io(self) -> bool:
        """Whether O_DIRECT works here (then volumes use cache.direct=on, aio=native)."""
        if self.direct_io is None:
            probe = self.root / ".direct-io-probe"
            try:
                fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
                os.close(fd)
                self.direct_io = True
            except OSError:
                self.direct_io = False
            finally:
                probe.unlink(missing_ok=True)
        return self.direct_io

    # --- file creation (no image open yet: qemu-img) -------------------------------------------

    def create(self, rel: str, size_bytes: int, *, key: str | None = None, backing: str | None = None,
               fmt: str = "qcow2") -> None:
        """Create a thin file atomically (temp name, then rename): never a half-made file."""
        dst = self.path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.unlink(missing_ok=True)
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        opts = []
        if fmt == "qcow2" and key is not None:
            opts.append(LUKS_OPTS)
        if opts:
            argv += ["-o", ",".join(opts)]
        if backing is not None:
            rel_backing = os.path.relpath(self.path(backing), dst.parent)
            argv += ["-b", rel_backing, "-F", "qcow2", "-u"]
        argv += [str(tmp), str(size_bytes)]
        try:
            _run(argv, "Cannot create the volume file", key=key)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def convert_into(self, rel: str, source: Path | str, source_fmt: str, size_bytes: int, *,
                     key: str | None = None, source_key: str | None = None,
                     source_chain_opts: dict[str, Any] | None = None) -> None:
        """Copy an image (or a chain, flattened) into a new thin qcow2 file, then grow it to size."""
        dst = self.path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = dst.with_name(f".{dst.name}.tmp")
        tmp.unlink(missing_ok=True)
        extra: dict[str, str] = {}
        argv = ["qemu-img", "convert", "-q", "-O", "qcow2"]
        opts: list[str] = []
        if key is not None:
            opts.append(LUKS_OPTS)
        if opts:
            argv += ["-o", ",".join(opts)]
        if source_chain_opts is not None:
            if source_key is not None:
                extra["hbsrc"] = source_key
            argv += ["json:" + json.dumps(source_chain_opts)]
        else:
            argv += ["-f", source_fmt, str(source)]
        argv.append(str(tmp))
        try:
            _run(argv, "Cannot copy into the volume", key=key, extra_keys=extra, timeout=6 * 3600)
            virtual = self.virtual_size(tmp)
            if virtual < size_bytes:
                self.resize_file(tmp, size_bytes, key=key)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def virtual_size(self, path: Path) -> int:
        out = _run(["qemu-img", "info", "-U", "--output=json", "-f", "qcow2", str(path)], "Cannot read the file")
        return int(json.loads(out)["virtual-size"])

    def resize_file(self, path: Path, size_bytes: int, *, key: str | None = None) -> None:
        """Grow one qcow2 file with no backing (a freshly converted one); chains go through QMP."""
        if key is None:
            _run(["qemu-img", "resize", "-q", "-f", "qcow2", str(path), str(size_bytes)], "Cannot grow the volume")
        else:
            opts = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)},
                    "encrypt": {"format": "luks", "key-secret": KEY_SECRET_ID}}
            _run(["qemu-img", "resize", "-q", "json:" + json.dumps(opts), str(size_bytes)],
                 "Cannot grow the volume", key=key)

    def allocated_bytes(self, rels: list[str]) -> int:
        total = 0
        for rel in rels:
            with contextlib.suppress(OSError):
                total += os.stat(self.path(rel)).st_blocks * 512
        return total

    def remove(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def remove_volume_dir(self, volume_id: str) -> None:
        shutil.rmtree(self.root / volume_id, ignore_errors=True)


# ------------------------------------------------------------------------------------------ QMP graphs

def node_name(volume_id: str, rel: str) -> str:
    """A QMP node name (<= 31 characters) for one file as opened for one volume."""
    return "hb" + hashlib.sha256(f"{volume_id}:{rel}".encode()).hexdigest()[:20]


def fuse_node(volume_id: str) -> str:
    return "hbu" + hashlib.sha256(volume_id.encode()).hexdigest()[:20]


def device_id(volume_id: str) -> str:
    return f"hbvol-{volume_id}"


def secret_id(volume_id: str) -> str:
    return f"hbsec-{volume_id}"


def serial_for(volume_id: str) -> str:
    """virtio-blk serials hold 20 bytes: the guest sees the volume id's first 20 characters."""
    return volume_id[:20]


def port_id(slot: int) -> str:
    """The guest's hot-plug port a volume in ``slot`` is plugged into (the compute contract names them)."""
    return hotplug_port_id(slot)


def hotplug_port_args() -> list[str]:
    """The QEMU arguments of the ports volumes use (what ``GuestSpec.hotplug_ports = HOTPLUG_PORTS`` adds)."""
    from hackboot.compute.qemu import hotplug_port_args as qemu_port_args

    return qemu_port_args(HOTPLUG_PORTS)


def chain_definition(pool: Pool, v: VolumeView, *, secret: str | None = None, top_read_only: bool | None = None,
                     stop_at: str | None = None) -> dict[str, Any]:
    """blockdev-add arguments for the volume's whole chain (nested; node names for every file).

    ``stop_at``: open the chain down to this file only (its backing is then not opened): used for
    a new overlay, added with ``backing: null`` before ``blockdev-snapshot`` links it.
    """
    files = pool.chain(v.active)
    cache = {"direct": True, "no-flush": False} if pool.uses_direct_io() else {"direct": False, "no-flush": False}
    aio = "native" if pool.uses_direct_io() else "threads"

    def node(i: int) -> dict[str, Any] | None:
        if i >= len(files):
            return None
        rel = files[i]
        ro = (v.read_only if top_read_only is None else top_read_only) if i == 0 else True
        d: dict[str, Any] = {
            "driver": v.fmt if i == 0 else "qcow2", "node-name": node_name(v.volume_id, rel), "read-only": ro,
            "cache": cache, "discard": "unmap",
            "file": {"driver": "file", "filename": str(pool.path(rel)), "aio": aio, "cache": cache},
        }
        if d["driver"] == "qcow2":
            if v.key is not None:
                d["encrypt"] = {"format": "luks", "key-secret": secret or secret_id(v.volume_id)}
            d["backing"] = None if rel == stop_at else node(i + 1)
        return d

    top = node(0)
    assert top is not None
    return top


def qemu_img_chain_opts(pool: Pool, top: str, secret: str | None) -> dict[str, Any]:
    """--image-opts JSON for a (possibly encrypted) chain, for qemu-img convert."""
    files = pool.chain(top)

    def node(i: int) -> dict[str, Any] | None:
        if i >= len(files):
            return None
        d: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": str(pool.path(files[i]))}}
        if secret:
            d["encrypt"] = {"format": "luks", "key-secret": secret}
        nxt = node(i + 1)
        d["backing"] = nxt
        return d

    out = node(0)
    assert out is not None
    return out


class Graph:
    """QMP operations on one QEMU (a guest's, or a storage daemon's): idempotent steps."""

    def __init__(self, execute: Execute) -> None:
        self.x = execute

    def objects(self) -> set[str]:
        try:
            return {o["name"] for o in self.x("qom-list", {"path": "/objects"})}
        except Exception:
            return set()

    def devices(self) -> set[str]:
        return {o["name"] for o in self.x("qom-list", {"path": "/machine/peripheral"})}

    def nodes(self, flat: bool = True) -> dict[str, dict[str, Any]]:
        """The named block nodes; ``flat=False`` also walks each node's backing chain (a real
        ``backing_file_depth``: the flat answer always says 0)."""
        return {n["node-name"]: n for n in self.x("query-named-block-nodes", {"flat": flat})}

    def add_secret(self, sid: str, key: str) -> None:
        if sid in self.objects():
            return
        data = base64.b64encode(key.encode()).decode()
        try:
            self.x("object-add", {"qom-type": "secret", "id": sid, "data": data, "format": "base64"})
        except Exception as exc:
            if "already" not in str(exc) and "uplicate" not in str(exc):
                raise

    def del_object(self, oid: str) -> None:
        with contextlib.suppress(Exception):
            self.x("object-del", {"id": oid})

    def open_chain(self, pool: Pool, v: VolumeView, *, fuse: bool = False) -> str:
        """Open the volume's chain (idempotent); returns the node a device should use."""
        if v.key is not None:
            self.add_secret(secret_id(v.volume_id), v.key)
        top = node_name(v.volume_id, v.active)
        nodes = self.nodes()
        if top not in nodes:
            self.x("blockdev-add", chain_definition(pool, v))
        if not fuse:
            return top
        fname = fuse_node(v.volume_id)
        if fname not in nodes:
            # a pass-through raw node on top: forced detach swaps its child for a null device
            self.x("blockdev-add", {"driver": "raw", "node-name": fname, "file": top, "read-only": v.read_only})
        return fname

    def close_chain(self, volume_id: str, files: list[str]) -> None:
        """blockdev-del every node of the volume that the monitor owns, top first, until none is left."""
        wanted = [fuse_node(volume_id)] + [node_name(volume_id, f) for f in files]
        # A device that just left the QOM tree may release its drive a moment later (finalised
        # asynchronously): "in use" then is not final. Giving up would leave the volume open.
        deadline = time.monotonic() + 10
        while True:
            present = [n for n in wanted if n in self.nodes()]
            if not present:
                break
            progressed = False
            for n in present:
                try:
                    self.x("blockdev-del", {"node-name": n})
                    progressed = True
                except Exception as exc:
                    log.debug("blockdev-del %s: %s", n, exc)
            if time.monotonic() > deadline:
                log.warning("volume %s: block nodes %s are still open after detach", volume_id, present)
                break
            if not progressed:
                if device_id(volume_id) in self.devices():
                    break  # still plugged (a forced detach's null disk): nothing to wait for
                time.sleep(0.1)
        self.del_object(secret_id(volume_id))

    def run_job(self, command: str, args: dict[str, Any], timeout: float = 6 * 3600) -> None:
        """Start a block job, wait for it to conclude, raise its error if any."""
        job_id = args["job-id"]
        with contextlib.suppress(Exception):  # a concluded job left by a crash
            self.x("job-dismiss", {"id": job_id})
        self.x(command, {**args, "auto-dismiss": False})
        wait_job(self.x, job_id, timeout, StorageError)

    # --- attach / detach -----------------------------------------------------------------------

    def attach(self, pool: Pool, v: VolumeView, slot: int, limits: dict[str, int] | None,
               bootindex: int | None = None) -> None:
        dev = device_id(v.volume_id)
        drive = self.open_chain(pool, v, fuse=True)
        if dev not in self.devices():
            args: dict[str, Any] = {"driver": "virtio-blk-pci", "drive": drive, "id": dev,
                                    "serial": serial_for(v.volume_id), "bus": port_id(slot)}
            if v.read_only:
                args["share-rw"] = True
            if bootindex is not None:
                args["bootindex"] = bootindex
            self.x("device_add", args)
        if limits:
            self.set_limits(v.volume_id, limits)

    def set_limits(self, volume_id: str, limits: dict[str, int]) -> None:
        self.x("block_set_io_throttle", {"id": f"/machine/peripheral/{device_id(volume_id)}/virtio-backend",
                                         **limits})

    def io_limits(self, volume_id: str) -> dict[str, int]:
        """The throttling QEMU applies to the volume's device now, as query-block reports it."""
        qdev = f"/machine/peripheral/{device_id(volume_id)}/virtio-backend"
        for blk in self.x("query-block", None):
            if blk.get("qdev") == qdev:
                ins = blk.get("inserted") or {}
                return {k: int(ins[k]) for k in ("iops", "iops_max", "iops_max_length", "bps", "bps_max",
                                                 "bps_max_length", "iops_rd", "iops_wr") if k in ins}
        return {}

    def detach(self, volume_id: str, files: list[str], timeout: float, force: bool = False) -> None:
        dev = device_id(volume_id)
        if dev in self.devices():
            with contextlib.suppress(Exception):  # already pending: keep waiting
                self.x("device_del", {"id": dev})
            deadline = time.monotonic() + timeout
            while dev in self.devices():
                if time.monotonic() > deadline:
                    if not force:
                        raise DetachTimeout(
                            f"The guest did not release the disk within {timeout:.0f}s (is it mounted or in use?); "
                            "unmount it and retry, or detach with force=true")
                    self.fuse_off(volume_id)
                    break
                time.sleep(0.1)
        self.close_chain(volume_id, files)

    def fuse_off(self, volume_id: str) -> None:
        """Forced detach: the device keeps a null disk until the guest lets go; the volume is closed now."""
        fname = fuse_node(volume_id)
        null = "hbz" + fname[3:]
        if null not in self.nodes():
            self.x("blockdev-add", {"driver": "null-co", "node-name": null, "read-zeroes": True})
        self.x("blockdev-reopen", {"options": [{"driver": "raw", "node-name": fname, "file": null}]})


# ------------------------------------------------------------------------------------------ storage daemon

class StorageDaemon(QmpChild):
    """A private ``qemu-storage-daemon`` with a QMP monitor, for graph work on detached volumes.

    Runs as root: the pool's files are root's, 0600 (volumes are written by guests, but their
    qcow2 metadata only through QEMU's own code, as in the guest's process).
    """

    name = "storage daemon"
    error = StorageError

    def argv(self, monitor_fd: int) -> list[str]:
        return ["qemu-storage-daemon", "--chardev", f"socket,id=m,fd={monitor_fd}", "--monitor", "chardev=m"]

    def graph(self) -> Graph:
        return Graph(self.execute)


# ------------------------------------------------------------------------------------------ operations

@dataclass
class SnapshotPlan:
    """Freeze the active file: `new_active` (an empty overlay on it) becomes the active file."""

    volume_id: str
    old_active: str
    new_active: str
    key: str | None
    size_bytes: int


def snapshot(pool: Pool, plan: SnapshotPlan, graph: Graph | None,
             fault: Callable[[str], None] = lambda point: None) -> None:
    """External snapshot, constant time. `graph` is the guest's QEMU when attached, else None.

    Idempotent: re-running after a crash at any point finishes the job.
    """
    if not pool.path(plan.new_active).exists():
        pool.create(plan.new_active, plan.size_bytes, key=plan.key, backing=plan.old_active)
    fault("snapshot:after-overlay")
    if graph is None:
        return
    new_node = node_name(plan.volume_id, plan.new_active)
    old_node = node_name(plan.volume_id, plan.old_active)
    nodes = graph.nodes(flat=False)
    if new_node in nodes and nodes[new_node].get("backing_file_depth", 0) > 0:
        return  # already linked (crash after blockdev-snapshot)
    if new_node not in nodes:
        v = VolumeView(plan.volume_id, plan.new_active, plan.key)
        graph.x("blockdev-add", chain_definition(pool, v, stop_at=plan.new_active))
    fault("snapshot:after-blockdev-add")
    graph.x("blockdev-snapshot", {"node": old_node, "overlay": new_node})


def stream_into(pool: Pool, volume_id: str, child: str, frozen: str, key: str | None, graph: Graph,
                chain_top: str) -> None:
    """Merge `frozen` into `child` (child backs onto frozen): child then backs onto frozen's backing.

    `graph` has the chain whose top is `chain_top` open (the guest's, or a storage daemon's).
    """
    base = pool.backing_rel(frozen)
    args: dict[str, Any] = {"job-id": "hbstream" + secrets.token_hex(4), "device": node_name(volume_id, child)}
    if base is not None:
        args["base-node"] = node_name(volume_id, base)
        args["backing-file"] = os.path.relpath(pool.path(base), pool.path(child).parent)
    graph.run_job("block-stream", args)


def resize(pool: Pool, v: VolumeView, size_bytes: int, graph: Graph) -> None:
    """Grow through the node the device uses (the fuse), so the guest is told of the new capacity."""
    fuse = fuse_node(v.volume_id)
    target = fuse if fuse in graph.nodes() else node_name(v.volume_id, v.active)
    graph.x("block_resize", {"node-name": target, "size": size_bytes})


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * 1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def scratch_dir(pool: Pool, name: str) -> Iterator[Path]:
    d = pool.root / ".scratch" / f"{name}-{secrets.token_hex(4)}"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------ the driver

class LocalQcow2Driver(BlockStorageDriver):
    """:class:`~hackboot.volumes.driver.BlockStorageDriver` over qcow2 files in a local pool.

    ``root``: the pool (``<root>/<volume id>/<file>``). Graph work on a volume no guest has open runs in
    a short-lived :class:`StorageDaemon`.
    """

    def __init__(self, root: Path) -> None:
        self.pool = Pool(Path(root))

    @staticmethod
    def _check_id(volume_id: str) -> str:
        # ids become directory names (and a delete removes one): never a path
        if not isinstance(volume_id, str) or not VOLUME_ID_RE.match(volume_id) or volume_id in (".", ".."):
            raise StorageError(f"invalid volume id {volume_id!r}")
        return volume_id

    def _make(self, rel: str, make: Callable[[], None]) -> str:
        """Create the first layer `rel` with `make` unless it exists; never leave a half-made one."""
        if not self.pool.path(rel).exists():
            try:
                make()
            except BaseException:
                self.pool.remove(rel)
                with contextlib.suppress(OSError):  # a volume that never came to be leaves no directory
                    self.pool.path(rel).parent.rmdir()
                raise
        return rel

    def _volume_files(self, volume_id: str) -> list[str]:
        d = self.pool.root / volume_id
        return sorted(f"{volume_id}/{p.name}" for p in d.glob("*.qcow2")) if d.is_dir() else []

    # --- volumes ----------------------------------------------------------------------------------

    def create(self, volume_id: str, size_bytes: int, *, key: str | None = None, shareable: bool = False) -> str:
        self._check_id(volume_id)
        fmt = "raw" if shareable else "qcow2"
        rel = f"{volume_id}/base.{fmt}"
        return self._make(rel, lambda: self.pool.create(rel, size_bytes, key=key, fmt=fmt))

    def create_from_image(self, volume_id: str, image: Path, image_format: str, size_bytes: int, *,
                          key: str | None = None) -> str:
        from hackboot.volumes.restore import image_into

        rel = f"{self._check_id(volume_id)}/base.qcow2"
        return self._make(rel, lambda: image_into(self.pool, rel, Path(image), image_format, size_bytes, key=key,
                                                  work_name=f"image-{volume_id}"))

    def clone(self, volume_id: str, snapshot_layer: str, size_bytes: int, *, key: str | None = None) -> str:
        rel = f"{self._check_id(volume_id)}/base.qcow2"
        if not self.pool.path(rel).exists() and not self.pool.path(snapshot_layer).is_file():
            raise StorageError("The snapshot's data is not on this host any more")
        return self._make(rel, lambda: self.pool.create(rel, size_bytes, key=key, backing=snapshot_layer))

    def import_backup(self, volume_id: str, layers: Sequence[ImportLayer], size_bytes: int, *, key: str | None,
                      fetch: Fetch) -> str:
        from hackboot.volumes.restore import flatten_layers

        rel = f"{self._check_id(volume_id)}/base.qcow2"
        return self._make(rel, lambda: flatten_layers(self.pool, rel, layers, size_bytes, key=key, fetch=fetch,
                                                      work_name=f"restore-{volume_id}"))

    def delete(self, volume_id: str) -> None:
        self.pool.remove_volume_dir(self._check_id(volume_id))

    def volumes(self) -> set[str]:
        return {d.name for d in self.pool.root.iterdir() if d.is_dir() and VOLUME_ID_RE.match(d.name)}

    def layers(self, volume_id: str, top: str) -> list[str]:
        return self.pool.chain(top)

    def free_bytes(self) -> int:
        return self.pool.free_bytes()

    def allocated_bytes(self, volume_id: str) -> int:
        d = self.pool.root / self._check_id(volume_id)
        files = [f"{volume_id}/{p.name}" for p in d.iterdir() if p.is_file() and not p.name.startswith(".")] \
            if d.is_dir() else []
        return self.pool.allocated_bytes(files)

    # --- snapshots and size -----------------------------------------------------------------------

    def snapshot(self, volume: VolumeView, new_active: str, guest: Execute | None = None,
                 fault: Fault = no_fault) -> None:
        plan = SnapshotPlan(volume.volume_id, volume.active, new_active, volume.key, volume.size_bytes)
        snapshot(self.pool, plan, Graph(guest) if guest is not None else None, fault)

    def _merge_away(self, volume: VolumeView, frozen: str, g: Graph | None) -> None:
        """Stream `frozen` into every file of the volume that backs onto it; then the file can go."""
        vid = volume.volume_id
        live = self.pool.chain(volume.active)
        for child in self.pool.children_of(frozen, self._volume_files(vid)):
            if g is not None and child in live:
                stream_into(self.pool, vid, child, frozen, volume.key, g, volume.active)
                with contextlib.suppress(Exception):  # a node we added ourselves stays until deleted
                    g.x("blockdev-del", {"node-name": node_name(vid, frozen)})
            else:
                with StorageDaemon() as daemon:
                    d = daemon.graph()
                    d.open_chain(self.pool, VolumeView(vid, child, volume.key))
                    stream_into(self.pool, vid, child, frozen, volume.key, d, child)

    def delete_snapshot(self, volume: VolumeView, frozen: str, guest: Execute | None = None) -> None:
        if not frozen or frozen == volume.active or not self.pool.path(frozen).exists():
            return
        self._merge_away(volume, frozen, Graph(guest) if guest is not None else None)
        if not self.pool.children_of(frozen, self._volume_files(volume.volume_id)):
            self.pool.remove(frozen)

    def revert(self, volume: VolumeView, frozen: str, new_active: str) -> None:
        if not self.pool.path(new_active).exists():
            self.pool.create(new_active, volume.size_bytes, key=volume.key, backing=frozen)

    def drop_layer(self, layer: str) -> None:
        self.pool.remove(layer)

    def resize(self, volume: VolumeView, size_bytes: int, guest: Execute | None = None) -> None:
        if guest is not None:
            resize(self.pool, volume, size_bytes, Graph(guest))
        elif volume.fmt == "raw":
            _run(["qemu-img", "resize", "-q", "-f", "raw", str(self.pool.path(volume.active)), str(size_bytes)],
                 "Cannot grow the volume")
        else:
            with StorageDaemon() as daemon:
                d = daemon.graph()
                d.open_chain(self.pool, volume)
                resize(self.pool, volume, size_bytes, d)

    # --- guests -----------------------------------------------------------------------------------

    def blockdev(self, volume: VolumeView) -> dict[str, Any]:
        return chain_definition(self.pool, volume)

    def attach(self, guest: Execute, volume: VolumeView, slot: int, limits: dict[str, int] | None = None,
               bootindex: int | None = None) -> str:
        g = Graph(guest)
        try:
            g.attach(self.pool, volume, slot, limits, bootindex)
        except Exception:
            with contextlib.suppress(Exception):  # not plugged: do not leave the volume open in the guest
                if device_id(volume.volume_id) not in g.devices():
                    g.close_chain(volume.volume_id, self.pool.chain(volume.active))
            raise
        return device_id(volume.volume_id)

    def detach(self, guest: Execute, volume: VolumeView, timeout: float, force: bool = False) -> None:
        files = self.pool.chain(volume.active) if volume.active else []
        Graph(guest).detach(volume.volume_id, files, timeout, force=force)

    def plugged(self, guest: Execute, volume_id: str) -> bool:
        return device_id(volume_id) in Graph(guest).devices()

    def set_limits(self, guest: Execute, volume_id: str, limits: dict[str, int]) -> None:
        Graph(guest).set_limits(volume_id, limits)

    def io_limits(self, guest: Execute, volume_id: str) -> dict[str, int]:
        return Graph(guest).io_limits(volume_id)

    # --- backups ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def export_backup(self, volume_id: str, top: str, since: str | None = None) -> Iterator[BackupExport]:
        chain = self.pool.chain(top)  # top first
        incremental = since is not None and since in chain
        if since is not None and incremental:
            chain = chain[:chain.index(since)]
        layers = []
        for rel in reversed(chain):  # bottom first; frozen files: they do not change while read
            path = self.pool.path(rel)
            layers.append(ExportedLayer(rel, path, path.stat().st_size, file_sha256(path)))
        yield BackupExport(layers, incremental)
