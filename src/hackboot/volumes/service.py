"""Block storage rules: volumes, attachments, snapshots, backups, backup policies; and the agent-facing half.

The API validates a request, claims quota and placement, writes the desired state (the volume's
``task_state`` + ``task_args``, ``action_seq`` bumped) in one transaction, and answers 202. The
agent of the volume's host (``volumes/agent.py``) does the work and finishes the task with a
compare-and-swap on ``action_seq`` (the same contract as compute's instances).

Placement: a volume lives on one host's storage pool (local qcow2 files), chosen in its zone by
the compute scheduler as a consumer of ``DISK_GB`` (thin provisioning is the host's
``disk_allocation_ratio``). It can therefore be attached only to instances on the same host; the
API says so plainly when they differ.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from hackboot.catalog import service as catalog_service
from hackboot.core import errors, quotas, reconcile
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.crypto import seal, unseal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.workers import Loop
from hackboot.events.service import emit
from hackboot.objectstore import engine as objectstore_engine
from hackboot.objectstore.models import S3Credential
from hackboot.volumes import lifecycle, storage, tiers
from hackboot.volumes.models import (
    AVAILABLE,
    CREATING,
    DELETED,
    ERROR,
    IN_USE,
    BackupCredential,
    BackupPolicy,
    Volume,
    VolumeAttachment,
    VolumeBackup,
    VolumeSnapshot,
)

log = logging.getLogger("hackboot.volumes")
GiB = 1024**3
LIVE_ATTACHMENT = ("attaching", "attached", "detaching")
KEY_CONTEXT = b"volume-key:"
S3_CONTEXT = b"volume-backup-s3:"

# The reconcile channel of volumes (core.reconcile; keys: host ids): `reconcile.notify(KIND, host_id)`
# after committing a change of desired state wakes the host's volume agent at once.
KIND = "volume"


def _emit(s: Session, v: Volume, verb: str, actor: str, **data: Any) -> None:
    emit(s, f"volume.{verb}", resource_type="volume", resource_id=v.id, project_id=v.project_id, actor=actor,
         data={"name": v.name, **data})


def volume_key(v: Volume | VolumeBackup) -> str | None:
    if v.key_sealed is None:
        return None
    return unseal(v.key_sealed, KEY_CONTEXT + v.id.encode()).decode()


def _seal_key(owner_id: str, key: str) -> str:
    return seal(key.encode(), KEY_CONTEXT + owner_id.encode())


# ==================================================================================================
# Volumes
# ==================================================================================================

@dataclass
class CreateRequest:
    name: str
    size_gb: int | None = None
    tier: str = tiers.DEFAULT_TIER
    zone: str | None = None
    encrypted: bool = False
    shareable: bool = False
    description: str = ""
    snapshot: str | None = None
    backup: str | None = None
    image: str | None = None


def _invalid(field_name: str, msg: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(msg, errors=[{"loc": ["body", field_name], "msg": msg}])


def _check_tier(name: str) -> tiers.Tier:
    tier = tiers.all_tiers().get(name)
    if tier is None:
        raise _invalid("tier", f"Unknown tier '{name}': one of {', '.join(tiers.all_tiers())}")
    return tier


def _check_size(size_gb: int, field_name: str = "size_gb") -> None:
    cfg = get_settings()
    if not cfg.volume_min_size_gb <= size_gb <= cfg.volume_max_size_gb:
        raise _invalid(field_name, f"size must be between {cfg.volume_min_size_gb} and {cfg.volume_max_size_gb} GB, "
                                   f"got {size_gb}")


def _zone(s: Session, zone: str | None) -> str:
    from hackboot.catalog.models import Zone
    from hackboot.core.config import get_settings

    zone_id = zone or get_settings().zone
    z = s.get(Zone, zone_id)
    if z is None:
        raise _invalid("zone", f"Zone {zone_id} does not exist")
    catalog_service.placeable_zone(s, z.id)
    return z.id


def _place(s: Session, volume_id: str, project_id: str, zone_id: str, size_gb: int, host_id: str | None) -> str:
    """Claim DISK_GB for the volume on a host of the zone (or on `host_id`: clones stay with their source)."""
    from hackboot.compute import scheduler

    if host_id is not None:
        scheduler.claim_resize(s, volume_id, project_id, host_id, {"DISK_GB": size_gb})
        return host_id
    try:
        placement = scheduler.place(s, scheduler.Request(consumer_id=volume_id, project_id=project_id, vcpus=0,
                                                         memory_mb=0, disk_gb=size_gb, zone_ids=[zone_id]))
    except errors.NoCapacity as exc:
        raise errors.NoCapacity(f"No storage pool in {zone_id} has room for a {size_gb} GB volume: {exc.detail}",
                                code="no_capacity") from None
    return placement.host_id


def _name_free(s: Session, project_id: str, name: str) -> None:
    if s.scalar(select(Volume.id).where(Volume.project_id == project_id, Volume.name == name,
                                        Volume.status != DELETED)):
        raise errors.Conflict(f"A volume named '{name}' already exists in this project", code="already_exists")


def create_volume(p: Principal, req: CreateRequest) -> Volume:
    sources = [x for x in (req.snapshot, req.backup, req.image) if x]
    if len(sources) > 1:
        raise _invalid("snapshot", "Give at most one of snapshot, backup, image")
    tier = _check_tier(req.tier)
    if tier.test_only and not p.is_superuser:
        raise _invalid("tier", f"Tier {tier.name} is for tests")
    if req.shareable and req.encrypted:
        raise _invalid("encrypted", "Shareable volumes are raw block devices shared by several guests and "
                                    "cannot be encrypted")
    if req.shareable and sources:
        raise _invalid("shareable", "Shareable volumes are created blank")
    project = p.project
    vid = new_id("vol")
    with session_scope() as s:
        _name_free(s, project, req.name)
        zone_id = _zone(s, req.zone) if not req.snapshot else ""
        host_hint: str | None = None
        source_type, source_id = "blank", None
        size = req.size_gb
        key: str | None = storage.new_key() if req.encrypted else None
        task_args: dict[str, Any] = {}
        bootable = False
        if req.snapshot:
            snap = get_snapshot(s, p, req.snapshot)
            if snap.status != "available":
                raise errors.Conflict(f"Snapshot {snap.name} is {snap.status}", code="invalid_state")
            src = s.get(Volume, snap.volume_id)
            assert src is not None
            if req.zone and req.zone != src.zone_id:
                raise _invalid("zone", f"A clone lives with its source's data: zone {src.zone_id}, not {req.zone}")
            zone_id, host_hint = src.zone_id, src.host_id
            source_type, source_id = "snapshot", snap.id
            size = max(size or snap.size_gb, snap.size_gb)
            # the clone shares the snapshot's encrypted blocks, so it shares their key
            key = volume_key(src)
            task_args = {"backing": snap.file}
            bootable = src.bootable
        elif req.backup:
            bk = get_backup(s, p, req.backup)
            if bk.status != "available":
                raise errors.Conflict(f"Backup {bk.id} is {bk.status}", code="invalid_state")
            if size is not None and size < bk.volume_size_gb:
                raise _invalid("size_gb", f"The backup is of a {bk.volume_size_gb} GB volume: size must be at "
                                          "least that")
            for member in backup_chain(s, bk):  # the agent checks again when it downloads
                if _bucket_owner(s, member.bucket) not in (None, project):
                    raise _not_owned(member.bucket)
            source_type, source_id = "backup", bk.id
            size = max(size or bk.volume_size_gb, bk.volume_size_gb)
            if bk.encrypted:
                key = storage.new_key()  # restored data is re-encrypted with a key of its own
            task_args = {"backup_id": bk.id}
        elif req.image:
            from hackboot.compute import imagesource

            image = imagesource.resolve(s, project, req.image)
            if image.status != "active":
                raise errors.Conflict(f"Image {image.name} is {image.status}", code="image_not_active")
            min_gb = max(image.min_disk_gb, -(-int(image.virtual_size or 0) // GiB))
            size = max(size or min_gb or 1, min_gb)
            source_type, source_id = "image", image.id
            task_args = {"image_path": str(image.disk_path), "image_format": image.disk_format}
            bootable = True
        if size is None:
            raise _invalid("size_gb", "size_gb is required for a blank volume")
        _check_size(size)
        quotas.claim(s, project, "volumes", 1)
        quotas.claim(s, project, "volume_gb", size)
        host_id = _place(s, vid, project, zone_id, size, host_hint)
        v = Volume(id=vid, project_id=project, name=req.name, description=req.description, zone_id=zone_id,
                   host_id=host_id, size_gb=size, tier=tier.name, encrypted=key is not None,
                   key_sealed=_seal_key(vid, key) if key is not None else None, shareable=req.shareable,
                   bootable=bootable, source_type=source_type, source_id=source_id, task_state=lifecycle.CREATE,
                   task_args=task_args, action_seq=1, status=CREATING, created_by=p.user_id)
        s.add(v)
        s.flush()
        _emit(s, v, "created", p.user_id, size_gb=size, tier=tier.name, zone=zone_id, encrypted=v.encrypted,
              source=source_type, source_id=source_id)
    reconcile.notify(KIND, v.host_id)
    return v


def volume_query(p: Principal, *, status: str | None = None, name: str | None = None, zone: str | None = None,
                 tier: str | None = None) -> Select[Volume]:
    stmt = select(Volume).where(Volume.project_id == p.project)
    stmt = stmt.where(Volume.status == status) if status else stmt.where(Volume.status != DELETED)
    if name:
        stmt = stmt.where(Volume.name == name)
    if zone:
        stmt = stmt.where(Volume.zone_id == zone)
    if tier:
        stmt = stmt.where(Volume.tier == tier)
    return stmt


def get_volume(s: Session, p: Principal, ref: str) -> Volume:
    v = s.get(Volume, ref)
    if v is None or v.project_id != p.project:
        v = s.scalar(select(Volume).where(Volume.project_id == p.project, Volume.name == ref,
                                          Volume.status != DELETED))
    if v is None:
        raise errors.NotFound(f"Volume {ref} not found")
    return v


def attachments_of(s: Session, volume_ids: list[str], live_only: bool = True) -> dict[str, list[VolumeAttachment]]:
    out: dict[str, list[VolumeAttachment]] = {vid: [] for vid in volume_ids}
    if not volume_ids:
        return out
    stmt = select(VolumeAttachment).where(VolumeAttachment.volume_id.in_(volume_ids))
    if live_only:
        stmt = stmt.where(VolumeAttachment.state.in_(LIVE_ATTACHMENT))
    for a in s.scalars(stmt.order_by(VolumeAttachment.created_at)):
        out[a.volume_id].append(a)
    return out


def _start(s: Session, v: Volume, action: str, actor: str, args: dict[str, Any] | None = None,
           verb: str | None = None, **data: Any) -> None:
    during = lifecycle.check(action, v.id, v.status, v.task_state)
    if during is not None:
        v.status = during
    v.task_state = action
    v.task_args = dict(args or {})
    v.action_seq += 1
    v.status_reason = ""
    _emit(s, v, verb or action, actor, **data)


def update_volume(p: Principal, ref: str, *, tier: str | None = None, description: str | None = None) -> Volume:
    """PATCH: the description at once; a new tier is applied by the agent (live on attached volumes)."""
    with session_scope() as s:
        v = get_volume(s, p, ref)
        if description is not None:
            v.description = description
        if tier is not None and tier != v.tier:
            t = _check_tier(tier)
            if t.test_only and not p.is_superuser:
                raise _invalid("tier", f"Tier {t.name} is for tests")
            _start(s, v, lifecycle.RETIER, p.user_id, {"tier": t.name}, verb="tier_changing", tier=t.name,
                   previous=v.tier)
            v.tier = t.name
        host = v.host_id
    reconcile.notify(KIND, host)
    return v


def resize_volume(p: Principal, ref: str, size_gb: int) -> Volume:
    with session_scope() as s:
        v = get_volume(s, p, ref)
        if size_gb < v.size_gb:
            raise errors.Conflict(f"Volumes only grow: {v.name} is {v.size_gb} GB, {size_gb} GB asked "
                                  "(shrinking would cut the file system inside)", code="shrink_not_supported")
        if size_gb == v.size_gb:
            raise errors.Conflict(f"Volume {v.name} is already {size_gb} GB", code="invalid_state")
        _check_size(size_gb)
        if v.shareable and v.status == IN_USE:
            raise errors.Conflict("A shareable volume is resized while detached", code="in_use")
        _start(s, v, lifecycle.RESIZE, p.user_id, {"size_gb": size_gb}, verb="resizing", size_gb=size_gb,
               previous=v.size_gb)
        quotas.claim(s, v.project_id, "volume_gb", size_gb - v.size_gb)
        assert v.host_id is not None
        from hackboot.compute import scheduler

        try:
            scheduler.claim_resize(s, v.id, v.project_id, v.host_id, {"DISK_GB": size_gb})
        except errors.NoCapacity as exc:
            raise errors.NoCapacity(f"The storage pool of volume {v.name} has no room for {size_gb} GB: {exc.detail}",
                                    code="no_capacity") from None
        v.size_gb = size_gb
        host = v.host_id
    reconcile.notify(KIND, host)
    return v


def _dependents(s: Session, v: Volume) -> list[str]:
    """Live volumes cloned from this volume's snapshots (they back onto its files)."""
    snap_ids = list(s.scalars(select(VolumeSnapshot.id).where(VolumeSnapshot.volume_id == v.id)))
    if not snap_ids:
        return []
    return list(s.scalars(select(Volume.name).where(Volume.source_type == "snapshot",
                                                    Volume.source_id.in_(snap_ids), Volume.status != DELETED)))


def delete_volume(p: Principal, ref: str) -> Volume:
    with session_scope() as s:
        v = get_volume(s, p, ref)
        if attachments_of(s, [v.id])[v.id]:
            raise errors.Conflict(f"Volume {v.name} is attached: detach it first", code="in_use")
        clones = _dependents(s, v)
        if clones:
            raise errors.Conflict(f"Volume {v.name} has clones that share its blocks ({', '.join(clones)}): "
                                  "delete them first", code="has_dependents")
        _start(s, v, lifecycle.DELETE, p.user_id, verb="deleting")
        host = v.host_id
    reconcile.notify(KIND, host)
    return v


# --- attachments ------------------------------------------------------------------------------------

def attach_volume(p: Principal, ref: str, instance_ref: str, mode: str | None = None) -> Volume:
    from hackboot.compute import service as compute

    with session_scope() as s:
        v = get_volume(s, p, ref)
        inst = compute.get_instance(s, p, instance_ref)
        if inst.status == "DELETED":
            raise errors.NotFound(f"Instance {instance_ref} not found")
        if inst.status not in ("ACTIVE", "SHUTOFF") or inst.task_state is not None:
            raise errors.Conflict(f"Instance {inst.name} is {inst.status}"
                                  f"{' (' + inst.task_state + ')' if inst.task_state else ''}: volumes attach to "
                                  "ACTIVE or SHUTOFF instances with no task running", code="instance_busy")
        if inst.host_id != v.host_id:
            raise errors.Conflict(f"Volume {v.name} is on another host than instance {inst.name} (volumes are local "
                                  "to a host's storage pool): create the volume in the instance's zone, or clone it",
                                  code="different_host")
        live = attachments_of(s, [v.id])[v.id]
        if any(a.instance_id == inst.id for a in live):
            raise errors.Conflict(f"Volume {v.name} is already attached to {inst.name}", code="already_attached")
        if live and not v.shareable:
            raise errors.Conflict(f"Volume {v.name} is attached to another instance; only volumes created "
                                  "shareable can be attached to several", code="in_use")
        if mode is None:
            mode = "ro" if v.shareable and live else "rw"
        taken = {a.slot for a in s.scalars(select(VolumeAttachment).where(
            VolumeAttachment.instance_id == inst.id, VolumeAttachment.state.in_(LIVE_ATTACHMENT)))}
        free = [i for i in range(storage.HOTPLUG_PORTS) if i not in taken]
        if not free:
            raise errors.Conflict(f"Instance {inst.name} has {storage.HOTPLUG_PORTS} volumes already (the maximum)",
                                  code="too_many_volumes")
        att = VolumeAttachment(id=new_id("vat"), volume_id=v.id, instance_id=inst.id, project_id=v.project_id,
                               host_id=v.host_id, mode=mode, state="attaching", slot=free[0])
        s.add(att)
        s.flush()
        _start(s, v, lifecycle.ATTACH, p.user_id, {"attachment_id": att.id}, verb="attaching",
               instance_id=inst.id, mode=mode)
        host = v.host_id
    reconcile.notify(KIND, host)
    return v


def detach_volume(p: Principal, ref: str, instance_ref: str | None = None, force: bool = False) -> Volume:
    from hackboot.compute import service as compute

    with session_scope() as s:
        v = get_volume(s, p, ref)
        live = attachments_of(s, [v.id])[v.id]
        if instance_ref:
            inst = compute.get_instance(s, p, instance_ref)
            live = [a for a in live if a.instance_id == inst.id]
        if not live:
            raise errors.Conflict(f"Volume {v.name} is not attached{' to ' + instance_ref if instance_ref else ''}",
                                  code="not_attached")
        if len(live) > 1:
            raise errors.ValidationFailed(f"Volume {v.name} is attached to several instances: say which",
                                          errors=[{"loc": ["body", "instance_id"], "msg": "required"}])
        att = live[0]
        _start(s, v, lifecycle.DETACH, p.user_id, {"attachment_id": att.id}, verb="detaching",
               instance_id=att.instance_id, force=force)
        att.state = "detaching"
        att.force = force
        host = v.host_id
    reconcile.notify(KIND, host)
    return v


# --- snapshots ---------------------------------------------------------------------------------------

def get_snapshot(s: Session, p: Principal, ref: str, volume: Volume | None = None) -> VolumeSnapshot:
    snap = s.get(VolumeSnapshot, ref)
    if snap is None or snap.project_id != p.project or snap.status == "deleted":
        stmt = select(VolumeSnapshot).where(VolumeSnapshot.project_id == p.project, VolumeSnapshot.name == ref,
                                            VolumeSnapshot.status != "deleted")
        if volume is not None:
            stmt = stmt.where(VolumeSnapshot.volume_id == volume.id)
        found = list(s.scalars(stmt))
        if len(found) > 1:
            raise errors.Conflict(f"Several snapshots are named '{ref}': use the id", code="ambiguous")
        snap = found[0] if found else None
    if snap is None or (volume is not None and snap.volume_id != volume.id):
        raise errors.NotFound(f"Snapshot {ref} not found")
    return snap


def _not_shareable(v: Volume, what: str) -> None:
    if v.shareable:
        raise errors.Conflict(f"{what} is not offered for shareable volumes (raw devices written by several "
                              "guests have no consistent point in time)", code="not_supported")


def create_snapshot(p: Principal, ref: str, name: str | None, kind: str = "user") -> VolumeSnapshot:
    with session_scope() as s:
        v = get_volume(s, p, ref)
        _not_shareable(v, "Snapshots")
        name = name or f"{v.name}-{utcnow().strftime('%Y%m%d%H%M%S')}"
        if s.scalar(select(VolumeSnapshot.id).where(VolumeSnapshot.volume_id == v.id, VolumeSnapshot.name == name,
                                                    VolumeSnapshot.status != "deleted")):
            raise errors.Conflict(f"Volume {v.name} already has a snapshot named '{name}'", code="already_exists")
        snap = _new_snapshot(s, v, name, kind)
        _start(s, v, lifecycle.SNAPSHOT, p.user_id, {"snapshot_id": snap.id, "new_active": snap_new_active(v)},
               verb="snapshotting", snapshot_id=snap.id, snapshot=name)
        host = v.host_id
    reconcile.notify(KIND, host)
    return snap


def snap_new_active(v: Volume) -> str:
    return f"{v.id}/{storage.new_file_name()}"


def _new_snapshot(s: Session, v: Volume, name: str, kind: str) -> VolumeSnapshot:
    if kind == "user":
        quotas.claim(s, v.project_id, "snapshots", 1)
    snap = VolumeSnapshot(id=new_id("snap"), project_id=v.project_id, volume_id=v.id, name=name, kind=kind,
                          status="creating", file=v.active_file, size_gb=v.size_gb)
    s.add(snap)
    s.flush()
    return snap


def snapshot_query(p: Principal, volume: Volume | None = None, kind: str | None = None):  # type: ignore[no-untyped-def]
    stmt = select(VolumeSnapshot).where(VolumeSnapshot.project_id == p.project, VolumeSnapshot.status != "deleted")
    if volume is not None:
        stmt = stmt.where(VolumeSnapshot.volume_id == volume.id)
    if kind:
        stmt = stmt.where(VolumeSnapshot.kind == kind)
    return stmt


def delete_snapshot(p: Principal, ref: str, snap_ref: str) -> VolumeSnapshot:
    with session_scope() as s:
        v = get_volume(s, p, ref)
        snap = get_snapshot(s, p, snap_ref, v)
        if snap.status not in ("available", "error"):
            raise errors.Conflict(f"Snapshot {snap.name} is {snap.status}", code="invalid_state")
        clones = list(s.scalars(select(Volume.name).where(Volume.source_type == "snapshot",
                                                          Volume.source_id == snap.id, Volume.status != DELETED)))
        if clones:
            raise errors.Conflict(f"Snapshot {snap.name} has clones sharing its blocks ({', '.join(clones)}): "
                                  "delete them first", code="has_dependents")
        _start(s, v, lifecycle.DELETE_SNAPSHOT, p.user_id, {"snapshot_id": snap.id}, verb="snapshot_deleting",
               snapshot_id=snap.id, snapshot=snap.name)
        snap.status = "deleting"
        host = v.host_id
    reconcile.notify(KIND, host)
    return snap


def revert_volume(p: Principal, ref: str, snap_ref: str) -> Volume:
    with session_scope() as s:
        v = get_volume(s, p, ref)
        snap = get_snapshot(s, p, snap_ref, v)
        if snap.status != "available":
            raise errors.Conflict(f"Snapshot {snap.name} is {snap.status}", code="invalid_state")
        if snap.size_gb != v.size_gb:
            raise errors.Conflict(f"Snapshot {snap.name} was taken at {snap.size_gb} GB and the volume is now "
                                  f"{v.size_gb} GB: clone it instead (volume create --from-snapshot)",
                                  code="size_changed")
        _start(s, v, lifecycle.REVERT, p.user_id, {"snapshot_id": snap.id, "new_active": snap_new_active(v)},
               verb="reverting", snapshot_id=snap.id, snapshot=snap.name)
        host = v.host_id
    reconcile.notify(KIND, host)
    return v


# --- backups -----------------------------------------------------------------------------------------

def _own_endpoint() -> str:
    from hackboot.core.config import get_settings

    settings = get_settings()
    return f"http://{settings.s3_host}:{settings.s3_port}"


def backup_endpoint() -> str:
    endpoint = get_settings().volume_backup_endpoint
    if endpoint:
        return endpoint.rstrip("/")
    return _own_endpoint()


def ensure_backup_credential(project_id: str, user_id: str) -> None:
    """The project's S3 key for backups, created once through the objectstore service layer."""
    with session_scope(write=False) as s:
        if s.get(BackupCredential, project_id) is not None:
            return
    from hackboot.objectstore import service as objectstore

    issued = objectstore.create_credential(project_id, user_id, name="volume-backups", actor=user_id)
    with session_scope() as s:
        if s.get(BackupCredential, project_id) is None:
            s.add(BackupCredential(project_id=project_id, credential_id=issued.credential.id,
                                   access_key=issued.credential.access_key,
                                   secret_sealed=seal(issued.secret_key.encode(), S3_CONTEXT + project_id.encode())))


def _is_backup_key(s: Session, credential: S3Credential) -> bool:
    """The project's backup key is the service's, not its creator's: membership does not apply to it."""
    link = s.get(BackupCredential, credential.project_id)
    return link is not None and link.credential_id == credential.id


objectstore_engine.register_service_key_check(_is_backup_key)


def backup_credential(project_id: str) -> tuple[str, str] | None:
    with session_scope(write=False) as s:
        row = s.get(BackupCredential, project_id)
        if row is None:
            return None
        return row.access_key, unseal(row.secret_sealed, S3_CONTEXT + project_id.encode()).decode()


def default_backup_bucket(project_id: str) -> str:
    """The project's own backup bucket. S3 bucket names are global: a fixed name (``backups``) would be
    whoever's created it first, so the default carries the project id (lowercase, a valid S3 name)."""
    return f"hb-backups-{project_id}".lower()[:63]


def _bucket_owner(s: Session, name: str) -> str | None:
    """The project owning the bucket `name` in this cloud's object store (None: no such bucket)."""
    from hackboot.objectstore.models import Bucket

    return s.scalar(select(Bucket.project_id).where(Bucket.name == name))


def _not_owned(name: str) -> errors.NotFound:
    return errors.NotFound(f"Bucket {name} is not a bucket of this project: backups go only to the project's own "
                           "buckets (bucket names are global; leave the bucket out to use hb-backups-<project id>)",
                           code="bucket_not_found")


def check_backup_bucket(project_id: str, name: str) -> None:
    """Refuse a backup bucket that exists in this cloud's object store and is another project's.

    Checked when a policy names it, at each backup and at each restore: the backup's objects are read
    and written with the project's key, which another project's bucket policy may also admit.
    """
    with session_scope(write=False) as s:
        owner = _bucket_owner(s, name)
    if owner is not None and owner != project_id:
        raise _not_owned(name)


def ensure_backup_bucket(project_id: str, name: str, actor: str) -> None:
    """The bucket a backup goes to: the project's own, created for the project when missing."""
    from hackboot.objectstore import engine
    from hackboot.objectstore.s3buckets import validate_bucket_name
    from hackboot.objectstore.s3errors import S3Error

    try:
        validate_bucket_name(name)
    except S3Error:
        raise _invalid("bucket", f"'{name}' is not a valid S3 bucket name") from None
    check_backup_bucket(project_id, name)
    if backup_endpoint() != _own_endpoint():
        return  # an external S3 service: its buckets are not ours to create (the agent asks it)
    try:
        with session_scope() as s:
            if _bucket_owner(s, name) is None:
                engine.tx_create_bucket(s, name, project_id, get_settings().volume_backup_region, actor, False, None)
    except S3Error as exc:
        if exc.code == "TooManyBuckets":
            raise errors.QuotaExceeded(f"Cannot create the backup bucket {name}: {exc.message}") from None
        if exc.code != "BucketAlreadyExists":
            raise
    engine.invalidate_bucket(name)
    check_backup_bucket(project_id, name)  # another project won a race to create it


def _last_backup(s: Session, volume_id: str) -> VolumeBackup | None:
    return s.scalar(select(VolumeBackup).where(VolumeBackup.volume_id == volume_id,
                                               VolumeBackup.status == "available")
                    .order_by(VolumeBackup.point_in_time.desc()).limit(1))


def _chain_length(s: Session, backup: VolumeBackup) -> int:
    n, cur = 0, backup
    while cur.kind == "incremental" and cur.parent_id and n < 10_000:
        parent = s.get(VolumeBackup, cur.parent_id)
        if parent is None:
            break
        n, cur = n + 1, parent
    return n


def create_backup(p: Principal, ref: str, *, bucket: str | None = None, kind: str = "auto",
                  policy: BackupPolicy | None = None) -> VolumeBackup:
    """Start a backup: a point-in-time snapshot (instant) then the layers since the last backup to S3.

    The bucket (default: the project's ``hb-backups-<project id>``) must be the project's own.
    """
    if kind not in ("auto", "full", "incremental"):
        raise _invalid("kind", "kind is auto, full or incremental")
    project = p.project
    bucket = policy.bucket if policy is not None else (bucket or default_backup_bucket(project))
    with session_scope(write=False) as s:
        get_volume(s, p, ref)  # another project's volume: 404 before anything is created
    ensure_backup_bucket(project, bucket, p.user_id)
    ensure_backup_credential(project, p.user_id)
    now = utcnow()
    with session_scope() as s:
        v = get_volume(s, p, ref)
        _not_shareable(v, "Backups")
        last = _last_backup(s, v.id)
        parent: VolumeBackup | None = None
        if kind in ("auto", "incremental") and last is not None:
            point = s.get(VolumeSnapshot, last.snapshot_id) if last.snapshot_id else None
            limit = policy.full_every if policy is not None else get_settings().volume_max_chain_incrementals
            if point is not None and point.status == "available" and (
                    kind == "incremental" or _chain_length(s, last) < limit):
                parent = last
        if kind == "incremental" and parent is None:
            raise errors.Conflict(f"Volume {v.name} has no usable previous backup to build on: take a full one",
                                  code="no_base_backup")
        bid = new_id("bkp")
        snap = _new_snapshot(s, v, f"backup-{bid}", "backup")
        keep_local = dt.timedelta(seconds=policy.keep_local_s) if policy else dt.timedelta(days=7)
        keep_remote = dt.timedelta(seconds=policy.keep_remote_s) if policy else dt.timedelta(days=30)
        snap.expires_at = now + keep_local
        key = volume_key(v)
        backup = VolumeBackup(
            id=bid, project_id=project, volume_id=v.id, volume_name=v.name, policy_id=policy.id if policy else None,
            kind="incremental" if parent else "full", parent_id=parent.id if parent else None, snapshot_id=snap.id,
            status="creating", endpoint=backup_endpoint(), bucket=bucket,
            prefix=f"hackboot-volume-backups/{v.id}/{bid}", volume_size_gb=v.size_gb, tier=v.tier,
            encrypted=v.encrypted, key_sealed=_seal_key(bid, key) if key else None, expires_at=now + keep_remote)
        s.add(backup)
        s.flush()
        _start(s, v, lifecycle.BACKUP, p.user_id, {"backup_id": bid, "snapshot_id": snap.id,
                                                    "new_active": snap_new_active(v)},
               verb="backing_up", backup_id=bid, kind=backup.kind)
        host = v.host_id
    reconcile.notify(KIND, host)
    return backup


def get_backup(s: Session, p: Principal, ref: str) -> VolumeBackup:
    b = s.get(VolumeBackup, ref)
    if b is None or b.project_id != p.project or b.status == "deleted":
        raise errors.NotFound(f"Backup {ref} not found")
    return b


def backup_query(p: Principal, volume: str | None = None, status: str | None = None):  # type: ignore[no-untyped-def]
    stmt = select(VolumeBackup).where(VolumeBackup.project_id == p.project)
    stmt = stmt.where(VolumeBackup.status == status) if status else stmt.where(VolumeBackup.status != "deleted")
    if volume:
        stmt = stmt.where((VolumeBackup.volume_id == volume) | (VolumeBackup.volume_name == volume))
    return stmt


def backup_chain(s: Session, b: VolumeBackup) -> list[VolumeBackup]:
    """The backups to download to restore `b`: its full ancestor first."""
    chain = [b]
    while chain[-1].parent_id:
        parent = s.get(VolumeBackup, chain[-1].parent_id)
        if parent is None or parent.status != "available":
            raise errors.Conflict(f"Backup {b.id} depends on {chain[-1].parent_id}, which is gone",
                                  code="broken_chain")
        chain.append(parent)
    return list(reversed(chain))


def delete_backup(p: Principal, ref: str) -> VolumeBackup:
    with session_scope() as s:
        b = get_backup(s, p, ref)
        children = list(s.scalars(select(VolumeBackup.id).where(VolumeBackup.parent_id == b.id,
                                                                VolumeBackup.status.in_(("creating", "available")))))
        if children:
            raise errors.Conflict(f"Backup {b.id} is the base of incremental backups ({', '.join(children)}): "
                                  "delete them first", code="has_dependents")
        if b.status == "creating":
            raise errors.Conflict(f"Backup {b.id} is still being made", code="invalid_state")
        b.status = "deleting"
        emit(s, "volume.backup_deleting", resource_type="volume_backup", resource_id=b.id, project_id=b.project_id,
             actor=p.user_id, data={"volume_id": b.volume_id})
    return b


def restore_backup(p: Principal, ref: str, name: str, *, size_gb: int | None = None, tier: str | None = None,
                   zone: str | None = None) -> Volume:
    with session_scope(write=False) as s:
        b = get_backup(s, p, ref)
        backup_chain(s, b)
        tier = tier or b.tier or tiers.DEFAULT_TIER
    return create_volume(p, CreateRequest(name=name, size_gb=size_gb, tier=tier, zone=zone, backup=b.id,
                                          encrypted=b.encrypted))


# --- policies ----------------------------------------------------------------------------------------

def create_policy(p: Principal, name: str, *, every_s: int, keep_local_s: int, keep_remote_s: int,
                  bucket: str | None = None, volumes: list[str] | None = None,
                  full_every: int | None = None) -> BackupPolicy:
    if every_s < 60:
        raise _invalid("every", "every must be at least 1 minute")
    if keep_local_s < every_s:
        raise _invalid("keep_local", "keep-local must be at least one interval (or the base of the next "
                                     "incremental would be gone)")
    if keep_remote_s < keep_local_s:
        raise _invalid("keep_remote", "keep-remote must be at least keep-local")
    bucket = bucket or default_backup_bucket(p.project)
    ensure_backup_bucket(p.project, bucket, p.user_id)
    with session_scope() as s:
        if s.scalar(select(BackupPolicy.id).where(BackupPolicy.project_id == p.project, BackupPolicy.name == name,
                                                  BackupPolicy.deleted_at.is_(None))):
            raise errors.Conflict(f"A backup policy named '{name}' exists", code="already_exists")
        ids = None
        if volumes:
            ids = [get_volume(s, p, ref).id for ref in volumes]
        pol = BackupPolicy(id=new_id("bpol"), project_id=p.project, name=name, every_s=every_s,
                           keep_local_s=keep_local_s, keep_remote_s=keep_remote_s, bucket=bucket,
                           full_every=full_every or get_settings().volume_max_chain_incrementals, volume_ids=ids,
                           created_by=p.user_id)
        s.add(pol)
        s.flush()
        emit(s, "backup_policy.created", resource_type="backup_policy", resource_id=pol.id, project_id=p.project,
             actor=p.user_id, data={"name": name, "every_s": every_s, "bucket": bucket})
    return pol


def get_policy(s: Session, p: Principal, ref: str) -> BackupPolicy:
    pol = s.get(BackupPolicy, ref)
    if pol is None or pol.project_id != p.project or pol.deleted_at is not None:
        pol = s.scalar(select(BackupPolicy).where(BackupPolicy.project_id == p.project, BackupPolicy.name == ref,
                                                  BackupPolicy.deleted_at.is_(None)))
    if pol is None:
        raise errors.NotFound(f"Backup policy {ref} not found")
    return pol


def policy_query(p: Principal):  # type: ignore[no-untyped-def]
    return select(BackupPolicy).where(BackupPolicy.project_id == p.project, BackupPolicy.deleted_at.is_(None))


def delete_policy(p: Principal, ref: str) -> None:
    with session_scope() as s:
        pol = get_policy(s, p, ref)
        pol.deleted_at = utcnow()
        pol.enabled = False
        emit(s, "backup_policy.deleted", resource_type="backup_policy", resource_id=pol.id, project_id=p.project,
             actor=p.user_id)


def _system(project_id: str, user_id: str) -> Principal:
    return Principal(user_id=user_id or "system", username="backup-scheduler", token_id="", role="admin",
                     is_superuser=False, project_id=project_id)


def run_policies(now: dt.datetime | None = None) -> list[str]:
    """Start the backups that are due (the scheduler loop). Returns the started backup ids."""
    now = now or utcnow()
    started: list[str] = []
    with session_scope(write=False) as s:
        pols = list(s.scalars(select(BackupPolicy).where(BackupPolicy.enabled.is_(True),
                                                         BackupPolicy.deleted_at.is_(None))))
        due: list[tuple[BackupPolicy, str]] = []
        for pol in pols:
            stmt = select(Volume).where(Volume.project_id == pol.project_id, Volume.status.in_((AVAILABLE, IN_USE)),
                                        Volume.shareable.is_(False))
            if pol.volume_ids:
                stmt = stmt.where(Volume.id.in_(pol.volume_ids))
            for v in s.scalars(stmt):
                if v.task_state is not None:
                    continue
                last = s.scalar(select(func.max(VolumeBackup.created_at)).where(
                    VolumeBackup.volume_id == v.id, VolumeBackup.policy_id == pol.id,
                    VolumeBackup.status.in_(("creating", "available"))))
                if last is None or (now - last).total_seconds() >= pol.every_s:
                    due.append((pol, v.id))
    for pol, vid in due:
        try:
            b = create_backup(_system(pol.project_id, pol.created_by), vid, policy=pol)
            started.append(b.id)
        except errors.ApiError as exc:
            log.info("policy %s: backup of %s not started: %s", pol.name, vid, exc.detail)
        with session_scope() as s:
            row = s.get(BackupPolicy, pol.id)
            if row is not None:
                row.last_run_at = now
    return started


def enforce_retention(now: dt.datetime | None = None) -> dict[str, int]:
    """Local backup points past keep-local are merged away; remote backups past keep-remote are deleted
    (a full backup stays while an unexpired incremental still builds on it)."""
    now = now or utcnow()
    local = remote = 0
    with session_scope(write=False) as s:
        expired_points = list(s.scalars(select(VolumeSnapshot).where(
            VolumeSnapshot.kind == "backup", VolumeSnapshot.status == "available",
            VolumeSnapshot.expires_at.is_not(None), VolumeSnapshot.expires_at < now)))
        latest: dict[str, str | None] = {}
        for snap in expired_points:
            if snap.volume_id not in latest:
                last = _last_backup(s, snap.volume_id)
                latest[snap.volume_id] = last.snapshot_id if last else None
        candidates = [(sn.project_id, sn.volume_id, sn.id) for sn in expired_points
                      if latest.get(sn.volume_id) != sn.id]
        expired = list(s.scalars(select(VolumeBackup).where(VolumeBackup.status == "available",
                                                            VolumeBackup.expires_at < now)))
        keep: set[str] = set()
        for b in s.scalars(select(VolumeBackup).where(VolumeBackup.status.in_(("available", "creating")),
                                                      (VolumeBackup.expires_at >= now) |
                                                      VolumeBackup.expires_at.is_(None))):
            cur: VolumeBackup | None = b
            while cur is not None and cur.parent_id:
                keep.add(cur.parent_id)
                cur = s.get(VolumeBackup, cur.parent_id)
        remote_ids = [(b.project_id, b.id) for b in expired if b.id not in keep]
    for project_id, vid, sid in candidates:
        try:
            delete_snapshot(_system(project_id, "system"), vid, sid)
            local += 1
        except errors.ApiError:
            pass  # busy: next round
    for _project_id, bid in remote_ids:
        with session_scope() as s:
            expired_backup = s.get(VolumeBackup, bid)
            if expired_backup is not None and expired_backup.status == "available":
                expired_backup.status = "deleting"
                remote += 1
    return {"local": local, "remote": remote}


def purge_deleted_backups() -> int:
    """Remove the S3 objects of backups marked deleting (control plane: it holds the S3 credentials)."""
    from hackboot.volumes import backups as remote

    with session_scope(write=False) as s:
        rows = [(b.id, b.project_id, b.endpoint, b.bucket, [o["key"] for o in b.objects or []])
                for b in s.scalars(select(VolumeBackup).where(VolumeBackup.status == "deleting").limit(50))]
    done = 0
    for bid, project_id, endpoint, bucket, keys in rows:
        cred = backup_credential(project_id)
        with session_scope(write=False) as s:
            owner = _bucket_owner(s, bucket)
        try:
            if owner not in (None, project_id):
                log.warning("backup %s: bucket %s is now another project's: its objects are left alone", bid, bucket)
            elif cred is not None and keys:
                remote.S3(endpoint, *cred).delete(bucket, keys)
        except Exception as exc:
            log.warning("cannot delete objects of backup %s: %s", bid, exc)
            continue
        with session_scope() as s:
            b = s.get(VolumeBackup, bid)
            if b is not None:
                b.status = "deleted"
                b.deleted_at = utcnow()
                emit(s, "volume.backup_deleted", resource_type="volume_backup", resource_id=bid,
                     project_id=project_id, data={"volume_id": b.volume_id})
        done += 1
    return done


def scheduler_step() -> None:
    run_policies()
    enforce_retention()
    purge_deleted_backups()


def loops() -> list[Loop]:
    return [Loop("volume-backup-scheduler", scheduler_step, get_settings().volume_scheduler_interval_s)]


# ==================================================================================================
# The agent-facing half
# ==================================================================================================

@dataclass
class AttachmentWork:
    id: str
    volume_id: str
    instance_id: str
    mode: str
    state: str
    slot: int
    force: bool
    boot: bool
    instance_status: str


@dataclass
class VolumeWork:
    id: str
    name: str
    project_id: str
    status: str
    task_state: str | None
    task_args: dict[str, Any]
    action_seq: int
    size_gb: int
    applied_size_gb: int
    tier: str
    applied_tier: str
    encrypted: bool
    shareable: bool
    key: str | None
    active_file: str
    attachments: list[AttachmentWork] = field(default_factory=list)
    snapshot_files: dict[str, str] = field(default_factory=dict)  # snapshot id -> file


def _instance_statuses(s: Session, ids: set[str]) -> dict[str, str]:
    from hackboot.compute.models import Instance

    if not ids:
        return {}
    return {i: st for i, st in s.execute(select(Instance.id, Instance.status).where(Instance.id.in_(ids)))}


def _work(s: Session, v: Volume, atts: list[VolumeAttachment], statuses: dict[str, str]) -> VolumeWork:
    snaps = {sn.id: sn.file for sn in s.scalars(select(VolumeSnapshot).where(
        VolumeSnapshot.volume_id == v.id, VolumeSnapshot.status.in_(("available", "creating", "deleting"))))}
    return VolumeWork(
        id=v.id, name=v.name, project_id=v.project_id, status=v.status, task_state=v.task_state,
        task_args=dict(v.task_args or {}), action_seq=v.action_seq, size_gb=v.size_gb,
        applied_size_gb=v.applied_size_gb, tier=v.tier, applied_tier=v.applied_tier, encrypted=v.encrypted,
        shareable=v.shareable, key=volume_key(v), active_file=v.active_file, snapshot_files=snaps,
        attachments=[AttachmentWork(a.id, a.volume_id, a.instance_id, a.mode, a.state, a.slot, a.force, a.boot,
                                    statuses.get(a.instance_id, "DELETED")) for a in atts])


def host_volumes(host_id: str, busy_only: bool = False) -> list[VolumeWork]:
    with session_scope(write=False) as s:
        stmt = select(Volume).where(Volume.host_id == host_id, Volume.status != DELETED)
        if busy_only:
            stmt = stmt.where(Volume.task_state.is_not(None))
        vols = list(s.scalars(stmt.order_by(Volume.id)))
        atts = attachments_of(s, [v.id for v in vols])
        statuses = _instance_statuses(s, {a.instance_id for lst in atts.values() for a in lst})
        return [_work(s, v, atts[v.id], statuses) for v in vols]


def volume_work(volume_id: str) -> VolumeWork | None:
    with session_scope(write=False) as s:
        v = s.get(Volume, volume_id)
        if v is None:
            return None
        atts = attachments_of(s, [v.id])
        return _work(s, v, atts[v.id], _instance_statuses(s, {a.instance_id for a in atts[v.id]}))


def instance_volumes(instance_id: str) -> list[tuple[VolumeWork, AttachmentWork]]:
    """Volumes to plug into an instance when its QEMU starts (attaching or attached)."""
    with session_scope(write=False) as s:
        atts = list(s.scalars(select(VolumeAttachment).where(VolumeAttachment.instance_id == instance_id,
                                                             VolumeAttachment.state.in_(("attaching", "attached")))
                              .order_by(VolumeAttachment.slot)))
        out = []
        for a in atts:
            v = s.get(Volume, a.volume_id)
            if v is None or v.status == DELETED:
                continue
            w = _work(s, v, [a], _instance_statuses(s, {instance_id}))
            out.append((w, w.attachments[0]))
        return out


def _settle_status(s: Session, v: Volume) -> str:
    if v.status in (CREATING,) and not v.active_file:
        return ERROR
    live = attachments_of(s, [v.id])[v.id]
    return IN_USE if any(a.state in ("attached", "attaching", "detaching") for a in live) else AVAILABLE


def checkpoint(volume_id: str, action_seq: int, **changes: Any) -> bool:
    """Record progress of a running task (e.g. the new active file after a snapshot switch)."""
    with session_scope() as s:
        v = s.get(Volume, volume_id)
        if v is None or v.action_seq != action_seq:
            return False
        for k, val in changes.items():
            setattr(v, k, val)
        return True


def finish(volume_id: str, action_seq: int, *, error: str | None = None, event: str | None = None,
           status: str | None = None, **changes: Any) -> bool:
    """Close the task (CAS on action_seq): apply `changes`, settle the status, emit the event."""
    with session_scope() as s:
        v = s.get(Volume, volume_id)
        if v is None or v.action_seq != action_seq or v.status == DELETED:
            return False
        task = v.task_state
        for k, val in changes.items():
            setattr(v, k, val)
        v.task_state = None
        v.task_args = {}
        v.status_reason = (error or "")[:500]
        if status is not None:
            v.status = status
        elif error and task == lifecycle.CREATE:
            v.status = ERROR
        else:
            v.status = _settle_status(s, v)
        _emit(s, v, event or (f"{task}_failed" if error else (task or "updated")), "system",
              status=v.status, reason=(error or "")[:500])
        return True


def finish_attachment(att_id: str, state: str, reason: str = "", io_limits: dict[str, int] | None = None) -> None:
    with session_scope() as s:
        a = s.get(VolumeAttachment, att_id)
        if a is None:
            return
        if io_limits is not None:
            a.io_limits = io_limits
        a.state = state
        a.reason = reason[:500]
        if state == "attached":
            a.attached_at = utcnow()
        if state in ("detached", "error"):
            a.detached_at = utcnow()


def finish_snapshot(snapshot_id: str, status: str, reason: str = "") -> None:
    with session_scope() as s:
        snap = s.get(VolumeSnapshot, snapshot_id)
        if snap is None:
            return
        snap.status = status
        snap.status_reason = reason[:500]
        if status == "deleted":
            snap.deleted_at = utcnow()
            if snap.kind == "user":
                quotas.release(s, snap.project_id, "snapshots", 1)
        emit(s, f"volume.snapshot_{status}", resource_type="volume_snapshot", resource_id=snap.id,
             project_id=snap.project_id, data={"volume_id": snap.volume_id, "name": snap.name, "reason": reason})


def finish_backup(backup_id: str, *, status: str, reason: str = "", objects: list[dict[str, Any]] | None = None,
                  size_bytes: int = 0, point_in_time: dt.datetime | None = None, duration: float | None = None,
                  kind: str | None = None) -> None:
    with session_scope() as s:
        b = s.get(VolumeBackup, backup_id)
        if b is None:
            return
        b.status = status
        b.status_reason = reason[:500]
        if kind:
            b.kind = kind
            if kind == "full":
                b.parent_id = None
        if objects is not None:
            b.objects = objects
        b.size_bytes = size_bytes
        if point_in_time is not None:
            b.point_in_time = point_in_time
            prev = s.scalar(select(VolumeBackup).where(
                VolumeBackup.volume_id == b.volume_id, VolumeBackup.status == "available",
                VolumeBackup.id != b.id).order_by(VolumeBackup.point_in_time.desc()).limit(1))
            v = s.get(Volume, b.volume_id)
            since = prev.point_in_time if prev and prev.point_in_time else (v.created_at if v else point_in_time)
            b.rpo_seconds = max(0.0, (point_in_time - since).total_seconds())
            if v is not None and status == "available":
                v.last_backup_at = point_in_time
        b.duration_seconds = duration
        if status in ("available", "error"):
            b.completed_at = utcnow()
        emit(s, f"volume.backup_{'completed' if status == 'available' else status}", resource_type="volume_backup",
             resource_id=b.id, project_id=b.project_id,
             data={"volume_id": b.volume_id, "kind": b.kind, "bytes": size_bytes, "rpo_seconds": b.rpo_seconds,
                   "reason": reason})


def backup_work(backup_id: str) -> dict[str, Any] | None:
    """What the agent needs to upload or restore a backup (its chain, bucket, S3 key)."""
    with session_scope(write=False) as s:
        b = s.get(VolumeBackup, backup_id)
        if b is None:
            return None
        parent_point = None
        if b.parent_id:
            parent = s.get(VolumeBackup, b.parent_id)
            point = s.get(VolumeSnapshot, parent.snapshot_id) if parent and parent.snapshot_id else None
            parent_point = point.file if point is not None and point.status == "available" else None
        chain = []
        try:
            # each member carries its own bucket and the checksums recorded when it was made (the bucket is
            # the tenant's to write: what comes back from it is verified against these before any use)
            chain = [{"id": c.id, "objects": c.objects, "key": volume_key(c), "bucket": c.bucket,
                      "endpoint": c.endpoint, "encrypted": c.encrypted, "volume_size_gb": c.volume_size_gb,
                      "bucket_owned": _bucket_owner(s, c.bucket) in (None, c.project_id)}
                     for c in backup_chain(s, b)] if b.status == "available" else []
        except errors.ApiError:
            chain = []
        bucket_owned = _bucket_owner(s, b.bucket) in (None, b.project_id)
        cred = None
    cred = backup_credential(b.project_id)
    return {"id": b.id, "project_id": b.project_id, "endpoint": b.endpoint, "bucket": b.bucket, "prefix": b.prefix,
            "kind": b.kind, "parent_point": parent_point, "chain": chain, "credential": cred,
            "key": volume_key(b), "bucket_owned": bucket_owned}


def mark_gone_attachments(host_id: str) -> int:
    """Attachments whose instance was deleted: detached (the guest and its devices are gone)."""
    from hackboot.compute.models import Instance

    changed = 0
    with session_scope() as s:
        rows = list(s.execute(select(VolumeAttachment, Instance.status).join(
            Instance, Instance.id == VolumeAttachment.instance_id, isouter=True).where(
            VolumeAttachment.host_id == host_id, VolumeAttachment.state.in_(("attached", "detaching", "error")))))
        for att, inst_status in rows:
            if inst_status in (None, "DELETED"):
                att.state = "detached"
                att.detached_at = utcnow()
                att.reason = "The instance was deleted"
                v = s.get(Volume, att.volume_id)
                if v is not None and v.task_state is None and v.status in (IN_USE,):
                    s.flush()
                    v.status = _settle_status(s, v)
                    _emit(s, v, "detached", "system", instance_id=att.instance_id, reason=att.reason)
                changed += 1
    return changed


def finish_delete(volume_id: str, action_seq: int) -> bool:
    from hackboot.compute import scheduler

    with session_scope() as s:
        v = s.get(Volume, volume_id)
        if v is None or v.action_seq != action_seq:
            return False
        scheduler.free(s, v.id)
        quotas.release(s, v.project_id, "volumes", 1)
        quotas.release(s, v.project_id, "volume_gb", v.size_gb)
        for snap in s.scalars(select(VolumeSnapshot).where(VolumeSnapshot.volume_id == v.id,
                                                           VolumeSnapshot.status != "deleted")):
            snap.status = "deleted"
            snap.deleted_at = utcnow()
            if snap.kind == "user":
                quotas.release(s, v.project_id, "snapshots", 1)
        v.status = DELETED
        v.task_state = None
        v.deleted_at = utcnow()
        v.action_seq += 1
        v.key_sealed = None  # crypto-shredding: the data left on disk (if any) is unreadable
        _emit(s, v, "deleted", "system")
        return True


def boot_volume_for(instance_id: str) -> VolumeWork | None:
    """The volume an instance boots from (attachment with boot=True), for compute's boot-from-volume."""
    for w, a in instance_volumes(instance_id):
        if a.boot:
            return w
    return None
