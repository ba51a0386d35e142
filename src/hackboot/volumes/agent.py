"""The volume reconciler of a host agent, and the hooks compute's agent calls when it spawns a guest.

The compute agent loads this module as one of its extensions (``AgentSettings.extensions``)
and calls :func:`attach`, which registers with it, through its public hooks:

* a start hook, :func:`start`, run once the host is registered: starts the volume reconciler
  that shares the agent's driver (QEMU serves one QMP client per guest: the agent's);
* a spawn hook: :func:`prepare_spec` on every GuestSpec before ``driver.spawn`` asks for the
  hot-plug ports volumes are plugged into (``GuestSpec.hotplug_ports``; slot ``n`` is port ``n``)
  and, when the instance has volumes attached and the compute driver can plug disks, for a paused
  start; :func:`after_spawn` right after ``driver.spawn`` plugs the attached volumes through the
  guest's monitor (their keys as QMP secrets: never on the command line, which QEMU's run dir
  records) while the vCPUs are still stopped, so the guest finds them at boot like any disk, then
  resumes the guest.

Storage goes through the :mod:`hackboot.volumes.driver` contract (:class:`LocalQcow2Driver`), guests
through the compute driver's: volumes are plugged only into guests of a driver with the
``block-graph`` and ``hotplug-disk`` capabilities, reached with ``driver.monitor(instance_id)``.

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

import datetime as dt
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hackboot.compute.driver import Capability
from hackboot.core.config import get_settings
from hackboot.core.reconcile import Reconciler
from hackboot.volumes import lifecycle, service, storage, tiers
from hackboot.volumes.driver import BlockStorageDriver, Execute, StorageError, VolumeView
from hackboot.volumes.service import AttachmentWork, VolumeWork

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


def _view(w: VolumeWork, mode: str = "rw", active: str | None = None, size_gb: int | None = None) -> VolumeView:
    return VolumeView(w.id, w.active_file if active is None else active, w.key, read_only=mode == "ro",
                      size_bytes=(w.size_gb if size_gb is None else size_gb) * GiB,
                      fmt="raw" if w.shareable else "qcow2")


def plugs_disks(driver: Any) -> bool:
    """Whether volumes can be plugged into this compute driver's guests (through their monitor)."""
    caps = driver.capabilities
    return Capability.BLOCK_GRAPH in caps and Capability.HOTPLUG_DISK in caps


def _limits(tier_name: str) -> dict[str, int] | None:
    tier = tiers.get(tier_name)
    return tier.qmp_limits() if tier else None


# ---------------------------------------------------------------------------------------------- hooks

def prepare_spec(spec: Any) -> Any:
    """Before driver.spawn: hot-plug ports, and a paused start when volumes must be plugged first."""
    spec.hotplug_ports += storage.HOTPLUG_PORTS  # ports 0..7: a volume's slot is its port
    if _local is None or not plugs_disks(_local.driver):  # no volume reconciler here, or nothing to plug
        return spec
    try:
        if service.instance_volumes(spec.instance_id) and not spec.start_paused \
                and Capability.PAUSED_START in _local.driver.capabilities:
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
        if agent is not None and plugs_disks(driver):
            for w, att in service.instance_volumes(iid):
                try:
                    agent.plug(driver.monitor(iid), w, att)
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

    def __init__(self, compute_agent: Any, storage_driver: BlockStorageDriver | None = None) -> None:
        self.cfg = get_settings()
        super().__init__(stop=compute_agent.stopping, workers=self.cfg.volume_workers,
                         poll_interval=self.cfg.volume_poll_interval_s,
                         resync_interval=self.cfg.volume_check_interval_s,
                         name="volumes")
        self.compute = compute_agent
        state_dir = Path(compute_agent.state_dir)
        self.storage: BlockStorageDriver = storage_driver or storage.LocalQcow2Driver(state_dir / "volumes")
        self.host_name = compute_agent.name
        self._listed: dict[str, VolumeWork] = {}
        self._orphans: set[str] = set()

    @property
    def host_id(self) -> str:
        return str(self.compute.host_id)

    @property
    def driver(self) -> Any:
        return self.compute.driver

    def start(self) -> None:
        self.scope = self.host_id
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

    def guest(self, instance_id: str) -> Execute | None:
        """The monitor of a running guest of this host (None when it is not running, or its driver
        cannot plug disks)."""
        driver = self.driver
        if not plugs_disks(driver):
            return None
        try:
            state = str(driver.state(instance_id).value)
        except Exception:
            return None
        if state not in ("running", "paused"):
            return None
        monitor: Execute = driver.monitor(instance_id)
        return monitor

    def online_graph(self, w: VolumeWork) -> Execute | None:
        """The monitor of the guest whose QEMU has this volume open now, if any (else work happens offline)."""
        for att in w.attachments:
            if att.state in ("attached", "detaching"):
                g = self.guest(att.instance_id)
                if g is not None and self.storage.plugged(g, w.id):
                    return g
        return None

    def plug(self, guest: Execute, w: VolumeWork, att: AttachmentWork) -> None:
        with lock(w.id):
            self.storage.attach(guest, _view(w, att.mode), att.slot, _limits(w.tier))
            service.finish_attachment(att.id, att.state, io_limits=self.storage.io_limits(guest, w.id))

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
        args = w.task_args
        size = w.size_gb * GiB
        if "backing" in args:
            active = self.storage.clone(w.id, args["backing"], size, key=w.key)
        elif "image_path" in args:
            active = self.storage.create_from_image(w.id, Path(args["image_path"]), args.get("image_format", "qcow2"),
                                                    size, key=w.key)
        elif "backup_id" in args:
            active = self.restore(w, args["backup_id"])
        else:
            active = self.storage.create(w.id, size, key=w.key, shareable=w.shareable)
        service.finish(w.id, w.action_seq, event="created", active_file=active, applied_size_gb=w.size_gb,
                       applied_tier=w.tier, allocated_bytes=self.storage.allocated_bytes(w.id))

    def restore(self, w: VolumeWork, backup_id: str) -> str:
        """The backup's layers come from the tenant's bucket: verified and validated (see `restore.py`)."""
        from hackboot.volumes.restore import restore_into

        info = service.backup_work(backup_id)
        if info is None or not info["chain"]:
            raise StorageError(f"Backup {backup_id} is not available")
        if info["credential"] is None:
            raise StorageError("The project has no S3 key for backups")
        return restore_into(self.storage, w.id, info, w.size_gb * GiB, key=w.key)

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
                    with lock(w.id):
                        self.storage.attach(g, _view(w, att.mode), att.slot, _limits(w.tier))
                        fault("attach:after-device-add")
                        limits = self.storage.io_limits(g, w.id)
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
                self.storage.detach(g, _view(w), self.cfg.volume_detach_timeout_s, force=att.force)
        service.finish_attachment(att.id, "detached", "forced" if att.force else "")
        service.finish(w.id, w.action_seq, event="detached")

    # --- snapshots ------------------------------------------------------------------------------

    def _snapshot_step(self, w: VolumeWork, snapshot_id: str, new_active: str) -> None:
        frozen = w.snapshot_files.get(snapshot_id) or w.active_file
        with lock(w.id):
            g = self.online_graph(w)
            self.storage.snapshot(_view(w, active=frozen, size_gb=w.applied_size_gb), new_active, g, fault)
        fault("snapshot:after-switch")
        service.checkpoint(w.id, w.action_seq, active_file=new_active)
        service.finish_snapshot(snapshot_id, "available")

    def snapshot(self, w: VolumeWork) -> None:
        self._snapshot_step(w, w.task_args["snapshot_id"], w.task_args["new_active"])
        service.finish(w.id, w.action_seq, event="snapshotted")

    def delete_snapshot(self, w: VolumeWork) -> None:
        sid = w.task_args["snapshot_id"]
        frozen = w.snapshot_files.get(sid)
        if frozen:
            with lock(w.id):
                self.storage.delete_snapshot(_view(w), frozen, self.online_graph(w))
        service.finish_snapshot(sid, "deleted")
        service.finish(w.id, w.action_seq, event="snapshot_deleted", allocated_bytes=self.storage.allocated_bytes(w.id))

    def revert(self, w: VolumeWork) -> None:
        sid, new_active = w.task_args["snapshot_id"], w.task_args["new_active"]
        frozen = w.snapshot_files[sid]
        with lock(w.id):
            if w.active_file != new_active:
                self.storage.revert(_view(w, size_gb=w.applied_size_gb), frozen, new_active)
                old = w.active_file
                service.checkpoint(w.id, w.action_seq, active_file=new_active)
                if old not in w.snapshot_files.values():
                    self.storage.drop_layer(old)
        service.finish(w.id, w.action_seq, event="reverted")

    # --- resize / tier --------------------------------------------------------------------------

    def resize(self, w: VolumeWork) -> None:
        size = int(w.task_args["size_gb"]) * GiB
        with lock(w.id):
            self.storage.resize(_view(w), size, self.online_graph(w))
        service.finish(w.id, w.action_seq, event="resized", applied_size_gb=int(w.task_args["size_gb"]))

    def retier(self, w: VolumeWork) -> None:
        tier = w.task_args.get("tier", w.tier)
        limits = _limits(tier)
        for att in w.attachments:
            if att.state != "attached":
                continue
            g = self.guest(att.instance_id)
            if g is not None and limits and self.storage.plugged(g, w.id):
                self.storage.set_limits(g, w.id, limits)
                service.finish_attachment(att.id, att.state, io_limits=self.storage.io_limits(g, w.id))
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
        s3 = S3(info["endpoint"], *info["credential"])
        s3.ensure_bucket(info["bucket"])
        with self.storage.export_backup(w.id, frozen, since=info["parent_point"] or None) as export:
            kind = "incremental" if export.incremental else "full"
            objects = []
            for layer in export.layers:  # bottom first
                key = f"{info['prefix']}/{layer.name}"
                s3.upload(info["bucket"], key, layer.path, {"volume": w.id, "backup": bid, "kind": kind})
                objects.append({"key": key, "file": layer.name, "bytes": layer.size, "sha256": layer.sha256})
        service.finish_backup(bid, status="available", objects=objects, size_bytes=export.total, point_in_time=point,
                              duration=time.monotonic() - started, kind=kind)
        service.finish(w.id, w.action_seq, event="backed_up")

    # --- delete ---------------------------------------------------------------------------------

    def delete(self, w: VolumeWork) -> None:
        with lock(w.id):
            self.storage.delete(w.id)
        service.finish_delete(w.id, w.action_seq)

    # --- periodic check -------------------------------------------------------------------------

    def check(self) -> None:
        service.mark_gone_attachments(self.host_id)
        works = service.host_volumes(self.host_id)
        self._report_orphans({w.id for w in works})
        for w in works:
            if w.task_state is not None:
                continue
            for att in w.attachments:
                if att.state != "attached" or att.instance_status != "ACTIVE":
                    continue
                with lock(att.instance_id):
                    g = self.guest(att.instance_id)
                    if g is None or self.storage.plugged(g, w.id):
                        continue
                    log.info("volumes: %s missing from running %s: plugging it again", w.id, att.instance_id)
                    try:
                        with lock(w.id):
                            self.storage.attach(g, _view(w, att.mode), att.slot, _limits(w.tier))
                    except Exception as exc:
                        log.warning("volumes: cannot re-plug %s: %s", w.id, exc)

    def _report_orphans(self, known: set[str]) -> None:
        """Say once which volumes the storage holds that no row of this host knows (never deleted here:
        a row may be on its way, or the data is an operator's to judge)."""
        try:
            orphans = self.storage.volumes() - known
        except (StorageError, OSError) as exc:
            log.warning("volumes: cannot list the volumes in storage: %s", exc)
            return
        for vid in sorted(orphans - self._orphans):
            log.warning("volumes: %s is in this host's storage but no volume of the host has that id", vid)
        self._orphans = orphans
