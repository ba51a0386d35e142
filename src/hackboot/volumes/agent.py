"""The volume reconciler of a host agent, and the hooks compute's agent calls when it spawns a guest.

The compute agent loads this module as one of its extensions (``AgentSettings.extensions``)
and calls :func:`attach`, which registers with it, through its public hooks:

* a start hook, :func:`start`, run once the host is registered: starts the volume reconciler
  that shares the agent's driver (QEMU serves one QMP client per guest: the agent's);
* a spawn hook: :func:`prepare_spec` on every GuestSpec before ``driver.spawn`` adds the
  pcie-root-ports volumes are hot-plugged into (q35's root bus is not hot-pluggable) and, when the
  instance has volumes attached, asks for a paused start; :func:`after_spawn` right after
  ``driver.spawn`` plugs the attached volumes over QMP (their keys as QMP secrets: never on the
  command line, which QEMU's run dir records) while the vCPUs are still stopped, so the guest
  finds them at boot like any disk, then resumes the guest.

The reconciler (:class:`VolumeAgent`, on :mod:`hackboot.core.reconcile`'s shared loop) reads the
volumes placed on its host that have a task (``task_state``), works on each in a thread (one task
per volume at a time), and finishes it with a compare-and-swap on ``action_seq``.
Every step is idempotent, so an agent killed mid-attach or mid-snapshot simply
redoes the task after its restart and finds the half-done work (a QMP node already added, an
overlay file already created, a snapshot switch already done) instead of repeating it.
A periodic check re-plugs attached volumes missing from a running guest and releases the
attachments of deleted instances.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hackboot.core import reconcile
from hackboot.core.config import get_settings
from hackboot.core.reconcile import Reconciler
from hackboot.volumes import lifecycle, service, storage, tiers
from hackboot.volumes.service import AttachmentWork, VolumeWork
from hackboot.volumes.storage import Graph, Pool, StorageDaemon, StorageError, VolumeView

log = logging.getLogger("hackboot.volumes.agent")
GiB = 1024**3

_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()
_paused_by_us: set[str] = set()
_local: VolumeAgent | None = None


def fault(point: str) -> None:
    """Fault injection for the crash tests: the volume_crash_at setting (HACKBOOT_VOLUME_CRASH_AT=<point>)
    kills this process there."""
    if get_settings().volume_crash_at == point:
        log.warning("volumes: crashing at %s (volume_crash_at setting)", point)
        os.kill(os.getpid(), signal.SIGKILL)


def lock(key: str) -> threading.RLock:
    """One lock per volume (and per instance for spawns): graph changes never interleave."""
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())


def _view(w: VolumeWork, mode: str = "rw") -> VolumeView:
    return VolumeView(w.id, w.active_file, w.key, read_only=mode == "ro", size_bytes=w.size_gb * GiB,
                      fmt="raw" if w.shareable else "qcow2")


def _limits(tier_name: str) -> dict[str, int] | None:
    tier = tiers.get(tier_name)
    return tier.qmp_limits() if tier else None


# ---------------------------------------------------------------------------------------------- hooks

def prepare_spec(spec: Any) -> Any:
    """Before driver.spawn: hot-plug ports, and a paused start when volumes must be plugged first."""
    spec.extra_args = [*spec.extra_args, *storage.hotplug_port_args()]
    if _local is None:  # no volume reconciler in this process (e.g. unit tests of the compute agent)
        return spec
    try:
        if service.instance_volumes(spec.instance_id) and not spec.start_paused:
            spec.start_paused = True
            _paused_by_us.add(spec.instance_id)
    except Exception:
        log.exception("volumes: cannot list the volumes of %s", spec.instance_id)
    return spec


def after_spawn(driver: Any, spec: Any) -> None:
    """Right after driver.spawn: plug the instance's volumes, then let the vCPUs run."""
    iid = spec.instance_id
    try:
        agent = _local
        if agent is not None and hasattr(driver, "qmp"):
            for w, att in service.instance_volumes(iid):
                try:
                    agent.plug(driver, w, att)
                except Exception as exc:
                    log.warning("volumes: cannot plug %s into %s: %s", w.id, iid, exc)
                    service.finish_attachment(att.id, att.state, f"Not plugged at boot: {exc}")
    finally:
        if iid in _paused_by_us:
            _paused_by_us.discard(iid)
            driver.resume(iid)


def attach(compute_agent: Any) -> None:
    """Register this module's hooks with a compute agent (it calls this when loading its extensions)."""
    compute_agent.register_spawn_hook(prepare_spec, after_spawn)
    compute_agent.register_start_hook(start)


def start(compute_agent: Any) -> VolumeAgent:
    """Start the volume reconciler of this host (called by the compute agent once registered)."""
    global _local
    agent = VolumeAgent(compute_agent)
    agent.start()
    _local = agent
    return agent


def local_volume_agent() -> VolumeAgent | None:
    return _local


# ---------------------------------------------------------------------------------------------- reconciler

class VolumeAgent(Reconciler):
    """The volumes of one host with a task → :meth:`handle`; :meth:`check` as the periodic resync."""

    kind = "volume"

    def __init__(self, compute_agent: Any) -> None:
        self.cfg = get_settings()
        super().__init__(stop=compute_agent.stopping, workers=self.cfg.volume_workers,
                         poll_interval=self.cfg.volume_poll_interval_s,
                         resync_interval=self.cfg.volume_check_interval_s,
                         name="volumes")
        self.compute = compute_agent
        self.pool = Pool(Path(compute_agent.state_dir) / "volumes")
        self.run_dir = Path(compute_agent.state_dir) / "qsd"
        self.host_name = compute_agent.name
        self._listed: dict[str, VolumeWork] = {}

    @property
    def host_id(self) -> str:
        return str(self.compute.host_id)

    @property
    def driver(self) -> Any:
        return self.compute.driver

    def start(self) -> None:
        self.scope = self.host_id
        reconcile.bridge(self.kind, service.on_change)
        super().start()

    def list_ids(self) -> Iterable[str]:
        works = service.host_volumes(self.host_id, busy_only=True)
        self._listed = {w.id: w for w in works}
        return [w.id for w in works]

    def reconcile(self, object_id: str) -> None:
        w = self._listed.pop(object_id, None)
        if w is None:
            w = next((v for v in service.host_volumes(self.host_id, busy_only=True) if v.id == object_id), None)
        if w is not None:
            self.handle(w)

    def resync(self) -> None:
        self.check()

    # --- guests ---------------------------------------------------------------------------------

    def guest(self, instance_id: str) -> Graph | None:
        """The QMP graph of a running guest of this host (None when it is not running)."""
        if not hasattr(self.driver, "qmp"):
            return None
        try:
            state = str(self.driver.state(instance_id).value)
        except Exception:
            return None
        if state not in ("running", "paused"):
            return None
        driver = self.driver
        return Graph(lambda cmd, args: driver.qmp(instance_id, cmd, args))

    def online_graph(self, w: VolumeWork) -> Graph | None:
        """The guest whose QEMU has this volume open now, if any (else work happens offline)."""
        for att in w.attachments:
            if att.state in ("attached", "detaching"):
                g = self.guest(att.instance_id)
                if g is not None and storage.device_id(w.id) in g.devices():
                    return g
        return None

    def plug(self, driver: Any, w: VolumeWork, att: AttachmentWork) -> None:
        g = Graph(lambda cmd, args: driver.qmp(att.instance_id, cmd, args))
        with lock(w.id):
            g.attach(self.pool, _view(w, att.mode), att.slot, _limits(w.tier))
            service.finish_attachment(att.id, att.state, io_limits=g.io_limits(w.id))

    # --- dispatch -------------------------------------------------------------------------------

    def handle(self, w: VolumeWork) -> None:
        task = w.task_state
        handlers = {
            lifecycle.CREATE: self.create, lifecycle.ATTACH: self.attach, lifecycle.DETACH: self.detach,
            lifecycle.SNAPSHOT: self.snapshot, lifecycle.DELETE_SNAPSHOT: self.delete_snapshot,
            lifecycle.REVERT: self.revert, lifecycle.RESIZE: self.resize, lifecycle.RETIER: self.retier,
            lifecycle.BACKUP: self.backup, lifecycle.DELETE: self.delete,
        }
        fn = handlers.get(task or "")
        if fn is None:
            return
        try:
            fn(w)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, StorageError) else f"{type(exc).__name__}: {exc}"
            reason = f"{reason} (host {self.host_name})"
            log.warning("volumes: %s of %s failed: %s", task, w.id, reason)
            self._fail(w, reason)

    def _fail(self, w: VolumeWork, reason: str) -> None:
        args = w.task_args
        if w.task_state == lifecycle.SNAPSHOT and args.get("snapshot_id"):
            service.finish_snapshot(args["snapshot_id"], "error", reason)
        if w.task_state == lifecycle.DELETE_SNAPSHOT and args.get("snapshot_id"):
            service.finish_snapshot(args["snapshot_id"], "error", reason)
        if w.task_state == lifecycle.BACKUP and args.get("backup_id"):
            service.finish_backup(args["backup_id"], status="error", reason=reason)
        if w.task_state == lifecycle.ATTACH and args.get("attachment_id"):
            service.finish_attachment(args["attachment_id"], "error", reason)
        if w.task_state == lifecycle.DETACH and args.get("attachment_id"):
            service.finish_attachment(args["attachment_id"], "attached", reason)
        if w.task_state == lifecycle.DELETE:
            service.finish(w.id, w.action_seq, error=reason, status="error")
            return
        service.finish(w.id, w.action_seq, error=reason)

    # --- create ---------------------------------------------------------------------------------

    def create(self, w: VolumeWork) -> None:
        rel = f"{w.id}/base.qcow2" if not w.shareable else f"{w.id}/base.raw"
        args = w.task_args
        size = w.size_gb * GiB
        try:
            if not self.pool.path(rel).exists():
                if "backing" in args:
                    self.pool.create(rel, size, key=w.key, backing=args["backing"])
                elif "image_path" in args:
                    from hackboot.volumes.restore import image_into

                    image_into(self.pool, rel, Path(args["image_path"]), args.get("image_format", "qcow2"), size,
                               key=w.key, work_name=f"image-{w.id}")
                elif "backup_id" in args:
                    self.restore(w, rel, args["backup_id"])
                else:
                    self.pool.create(rel, size, key=w.key, fmt="raw" if w.shareable else "qcow2")
        except Exception:
            self.pool.remove(rel)  # never a half-made volume
            raise
        service.finish(w.id, w.action_seq, event="created", active_file=rel, applied_size_gb=w.size_gb,
                       applied_tier=w.tier, allocated_bytes=self.pool.allocated_bytes([rel]))

    def restore(self, w: VolumeWork, rel: str, backup_id: str) -> None:
        """The backup's layers come from the tenant's bucket: verified and validated (see `restore.py`)."""
        from hackboot.volumes.restore import restore_into

        info = service.backup_work(backup_id)
        if info is None or not info["chain"]:
            raise StorageError(f"Backup {backup_id} is not available")
        if info["credential"] is None:
            raise StorageError("The project has no S3 key for backups")
        restore_into(self.pool, rel, info, w.size_gb * GiB, key=w.key, work_name=f"restore-{w.id}")

    # --- attach / detach ------------------------------------------------------------------------

    def _attachment(self, w: VolumeWork) -> AttachmentWork | None:
        aid = w.task_args.get("attachment_id")
        found = [a for a in w.attachments if a.id == aid]
        if found:
            return found[0]
        fresh = service.volume_work(w.id)
        return next((a for a in (fresh.attachments if fresh else []) if a.id == aid), None)

    def attach(self, w: VolumeWork) -> None:
        att = self._attachment(w)
        if att is None:
            service.finish(w.id, w.action_seq, error="The attachment request disappeared")
            return
        limits: dict[str, int] | None = None
        if att.instance_status in ("ACTIVE",):
            with lock(att.instance_id):
                g = self.guest(att.instance_id)
                if g is not None:
                    try:
                        with lock(w.id):
                            g.attach(self.pool, _view(w, att.mode), att.slot, _limits(w.tier))
                            fault("attach:after-device-add")
                            limits = g.io_limits(w.id)
                    except Exception:
                        with contextlib.suppress(Exception):
                            if storage.device_id(w.id) not in g.devices():
                                g.close_chain(w.id, self.pool.chain(w.active_file))
                        raise
        # a stopped instance gets the volume plugged when it starts (after_spawn)
        service.finish_attachment(att.id, "attached", io_limits=limits)
        service.finish(w.id, w.action_seq, event="attached")

    def detach(self, w: VolumeWork) -> None:
        att = self._attachment(w)
        if att is None:
            service.finish(w.id, w.action_seq, error="The attachment disappeared")
            return
        g = self.guest(att.instance_id)
        if g is not None:
            with lock(w.id):
                files = self.pool.chain(w.active_file) if w.active_file else []
                g.detach(w.id, files, self.cfg.volume_detach_timeout_s, force=att.force)
        service.finish_attachment(att.id, "detached", "forced" if att.force else "")
        service.finish(w.id, w.action_seq, event="detached")

    # --- snapshots ------------------------------------------------------------------------------

    def _snapshot_step(self, w: VolumeWork, snapshot_id: str, new_active: str) -> None:
        frozen = w.snapshot_files.get(snapshot_id) or w.active_file
        with lock(w.id):
            g = self.online_graph(w)
            plan = storage.SnapshotPlan(w.id, frozen, new_active, w.key, w.applied_size_gb * GiB)
            storage.snapshot(self.pool, plan, g, fault)
        fault("snapshot:after-switch")
        service.checkpoint(w.id, w.action_seq, active_file=new_active)
        service.finish_snapshot(snapshot_id, "available")

    def snapshot(self, w: VolumeWork) -> None:
        self._snapshot_step(w, w.task_args["snapshot_id"], w.task_args["new_active"])
        service.finish(w.id, w.action_seq, event="snapshotted")

    def _volume_files(self, w: VolumeWork) -> list[str]:
        d = self.pool.root / w.id
        return sorted(f"{w.id}/{p.name}" for p in d.glob("*.qcow2")) if d.is_dir() else []

    def _merge_away(self, w: VolumeWork, frozen: str, g: Graph | None) -> None:
        """Stream `frozen` into every file of the volume that backs onto it; then the file can go."""
        live = self.pool.chain(w.active_file)
        for child in self.pool.children_of(frozen, self._volume_files(w)):
            if g is not None and child in live:
                storage.stream_into(self.pool, w.id, child, frozen, w.key, g, w.active_file)
                with contextlib.suppress(Exception):  # a node we added ourselves stays until deleted
                    g.x("blockdev-del", {"node-name": storage.node_name(w.id, frozen)})
            else:
                with StorageDaemon(self.run_dir) as d:
                    d.open_chain(self.pool, VolumeView(w.id, child, w.key))
                    storage.stream_into(self.pool, w.id, child, frozen, w.key, d, child)

    def delete_snapshot(self, w: VolumeWork) -> None:
        sid = w.task_args["snapshot_id"]
        frozen = w.snapshot_files.get(sid)
        if frozen and frozen != w.active_file and self.pool.path(frozen).exists():
            with lock(w.id):
                g = self.online_graph(w)
                self._merge_away(w, frozen, g)
                if not self.pool.children_of(frozen, self._volume_files(w)):
                    self.pool.remove(frozen)
        service.finish_snapshot(sid, "deleted")
        service.finish(w.id, w.action_seq, event="snapshot_deleted",
                       allocated_bytes=self.pool.allocated_bytes(self._volume_files(w)))

    def revert(self, w: VolumeWork) -> None:
        sid, new_active = w.task_args["snapshot_id"], w.task_args["new_active"]
        frozen = w.snapshot_files[sid]
        with lock(w.id):
            if w.active_file != new_active:
                if not self.pool.path(new_active).exists():
                    self.pool.create(new_active, w.applied_size_gb * GiB, key=w.key, backing=frozen)
                old = w.active_file
                service.checkpoint(w.id, w.action_seq, active_file=new_active)
                if old not in w.snapshot_files.values():
                    self.pool.remove(old)
        service.finish(w.id, w.action_seq, event="reverted")

    # --- resize / tier --------------------------------------------------------------------------

    def resize(self, w: VolumeWork) -> None:
        size = int(w.task_args["size_gb"]) * GiB
        with lock(w.id):
            g = self.online_graph(w)
            if g is not None:
                storage.resize(self.pool, _view(w), size, g)
            elif w.shareable:
                storage._run(["qemu-img", "resize", "-q", "-f", "raw", str(self.pool.path(w.active_file)),
                              str(size)], "Cannot grow the volume")
            else:
                with StorageDaemon(self.run_dir) as d:
                    d.open_chain(self.pool, _view(w))
                    storage.resize(self.pool, _view(w), size, d)
        service.finish(w.id, w.action_seq, event="resized", applied_size_gb=int(w.task_args["size_gb"]))

    def retier(self, w: VolumeWork) -> None:
        tier = w.task_args.get("tier", w.tier)
        limits = _limits(tier)
        for att in w.attachments:
            if att.state != "attached":
                continue
            g = self.guest(att.instance_id)
            if g is not None and limits and storage.device_id(w.id) in g.devices():
                g.set_limits(w.id, limits)
                service.finish_attachment(att.id, att.state, io_limits=g.io_limits(w.id))
        service.finish(w.id, w.action_seq, event="tier_changed", applied_tier=tier)

    # --- backups --------------------------------------------------------------------------------

    def backup(self, w: VolumeWork) -> None:
        from hackboot.volumes.backups import S3

        started = time.monotonic()
        args = w.task_args
        bid, sid = args["backup_id"], args["snapshot_id"]
        point = dt.datetime.now(dt.UTC)
        self._snapshot_step(w, sid, args["new_active"])
        frozen = w.snapshot_files.get(sid) or w.active_file
        info = service.backup_work(bid)
        if info is None:
            raise StorageError(f"Backup {bid} disappeared")
        if info["credential"] is None:
            raise StorageError("The project has no S3 key for backups")
        if not info["bucket_owned"]:
            raise StorageError(f"Bucket {info['bucket']} is not a bucket of this project: backup refused")
        chain = self.pool.chain(frozen)  # top first
        kind = "full"
        if info["parent_point"] and info["parent_point"] in chain:
            chain = chain[:chain.index(info["parent_point"])]
            kind = "incremental"
        s3 = S3(info["endpoint"], *info["credential"])
        s3.ensure_bucket(info["bucket"])
        objects = []
        for rel in reversed(chain):  # bottom first
            path = self.pool.path(rel)
            key = f"{info['prefix']}/{rel}"
            s3.upload(info["bucket"], key, path, {"volume": w.id, "backup": bid, "kind": kind})
            objects.append({"key": key, "file": rel, "bytes": path.stat().st_size,
                            "sha256": storage.file_sha256(path)})
        total = sum(o["bytes"] for o in objects)
        service.finish_backup(bid, status="available", objects=objects, size_bytes=total, point_in_time=point,
                              duration=time.monotonic() - started, kind=kind)
        service.finish(w.id, w.action_seq, event="backed_up")

    # --- delete ---------------------------------------------------------------------------------

    def delete(self, w: VolumeWork) -> None:
        with lock(w.id):
            self.pool.remove_volume_dir(w.id)
        service.finish_delete(w.id, w.action_seq)

    # --- periodic check -------------------------------------------------------------------------

    def check(self) -> None:
        service.mark_gone_attachments(self.host_id)
        for w in service.host_volumes(self.host_id):
            if w.task_state is not None:
                continue
            for att in w.attachments:
                if att.state != "attached" or att.instance_status != "ACTIVE":
                    continue
                with lock(att.instance_id):
                    g = self.guest(att.instance_id)
                    if g is None or storage.device_id(w.id) in g.devices():
                        continue
                    log.info("volumes: %s missing from running %s: plugging it again", w.id, att.instance_id)
                    try:
                        with lock(w.id):
                            g.attach(self.pool, _view(w, att.mode), att.slot, _limits(w.tier))
                    except Exception as exc:
                        log.warning("volumes: cannot re-plug %s: %s", w.id, exc)
