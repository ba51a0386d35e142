"""HTTP for block storage: volumes, attachments, snapshots, backups, backup policies, tiers."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import Field, field_validator
from sqlalchemy import select

from hackboot.core import errors
from hackboot.core.auth import Member, Viewer
from hackboot.core.db import session_scope
from hackboot.core.pagination import Page, Pagination, paginate
from hackboot.core.schemas import Body, Description, Name, Out
from hackboot.volumes import service, tiers
from hackboot.volumes.models import STATUSES, BackupPolicy, Volume, VolumeBackup, VolumeSnapshot

router = APIRouter(prefix="/v1", tags=["volumes"])
Ref = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
BucketName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")]
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


MAX_DURATION_S = 2**31 - 1


def parse_duration(value: str | int, field_name: str) -> int:
    """'6h', '7d', '30m', '90s' or seconds (at most MAX_DURATION_S: the column is a 32-bit integer)."""
    if isinstance(value, int):
        seconds = value
    else:
        m = _DURATION.match(value)
        if not m:
            raise errors.ValidationFailed(f"{field_name}: use a duration like 30m, 6h, 7d",
                                          errors=[{"loc": ["body", field_name], "msg": "invalid duration"}])
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION_S:
        raise errors.ValidationFailed(f"{field_name}: at most {MAX_DURATION_S} seconds",
                                      errors=[{"loc": ["body", field_name], "msg": "duration too long"}])
    return seconds


# --- tiers ------------------------------------------------------------------------------------------

class TierOut(Out):
    name: str
    description: str
    iops: int
    iops_burst: int
    bps: int
    bps_burst: int
    burst_seconds: int
    price_eur_gb_month: float | None = None
    source: str


@router.get("/volume-tiers", response_model=list[TierOut], tags=["volumes"])
def list_tiers(p: Viewer) -> list[TierOut]:
    """The storage tiers with their I/O limits (enforced by QEMU) and list price per GB-month."""
    from hackboot.catalog.models import Price

    with session_scope(write=False) as s:
        prices = {sku: amount for sku, amount in s.execute(
            select(Price.sku, Price.amount_eur).where(Price.kind == "volume", Price.region_id.is_(None)))}
    return [TierOut(**t.to_dict(), price_eur_gb_month=prices.get(f"volume:{t.name}"))
            for t in tiers.all_tiers().values()]


# --- volumes ----------------------------------------------------------------------------------------

class VolumeIn(Body):
    name: Name
    size_gb: int | None = Field(None, ge=1, description="Size in GB (GiB); default: the source's size")
    tier: Annotated[str, Field(max_length=32)] = tiers.DEFAULT_TIER
    zone: Annotated[str, Field(max_length=24)] | None = None
    encrypted: bool = Field(False, description="LUKS (AES-256) encryption at rest with a key of its own")
    shareable: bool = Field(False, description="May be attached to several instances (read-only by default)")
    description: Description = ""
    snapshot: Ref | None = Field(None, description="Clone of this snapshot (shares its unchanged blocks)")
    backup: Annotated[str, Field(max_length=50)] | None = Field(None, description="Restore of this backup")
    image: Annotated[str, Field(max_length=63)] | None = Field(None, description="Copy of this image (bootable)")


class AttachmentOut(Out):
    id: str
    instance_id: str
    mode: str
    state: str
    boot: bool
    reason: str
    io_limits: dict[str, int] = Field(default_factory=dict, description="QEMU's throttling (query-block)")
    created_at: dt.datetime
    attached_at: dt.datetime | None


class VolumeOut(Out):
    id: str
    name: str
    description: str
    status: str
    task_state: str | None
    status_reason: str
    size_gb: int
    applied_size_gb: int
    tier: str
    applied_tier: str
    zone_id: str
    host_id: str | None
    encrypted: bool
    shareable: bool
    bootable: bool
    source_type: str
    source_id: str | None
    allocated_bytes: int
    last_backup_at: dt.datetime | None
    attachments: list[AttachmentOut] = Field(default_factory=list)
    created_at: dt.datetime
    updated_at: dt.datetime
    deleted_at: dt.datetime | None


def _out(v: Volume, atts: dict[str, list[Any]]) -> VolumeOut:
    out = VolumeOut.model_validate(v)
    out.attachments = [AttachmentOut.model_validate(a) for a in atts.get(v.id, [])]
    return out


def _one(v: Volume) -> VolumeOut:
    with session_scope(write=False) as s:
        return _out(v, service.attachments_of(s, [v.id]))


@router.post("/volumes", status_code=202, response_model=VolumeOut)
def create_volume(body: VolumeIn, p: Member, response: Response) -> VolumeOut:
    """Create a volume (blank, clone of a snapshot, restore of a backup, or copy of an image); 202 until available."""
    v = service.create_volume(p, service.CreateRequest(**body.model_dump()))
    response.headers["Location"] = f"/v1/volumes/{v.id}"
    return _one(v)


@router.get("/volumes", response_model=Page[VolumeOut])
def list_volumes(p: Viewer, page: Pagination,
                 status: Annotated[Literal[STATUSES] | None, Query()] = None,  # type: ignore[valid-type]
                 name: Annotated[Name | None, Query()] = None,
                 zone: Annotated[str | None, Query(max_length=24)] = None,
                 tier: Annotated[str | None, Query(max_length=32)] = None) -> Page[VolumeOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.volume_query(p, status=status, name=name, zone=zone, tier=tier),
                             Volume.id, page)
        atts = service.attachments_of(s, [r.id for r in rows])
        return Page[VolumeOut](items=[_out(r, atts) for r in rows], next_cursor=nxt)


@router.get("/volumes/{ref}", response_model=VolumeOut)
def get_volume(ref: str, p: Viewer) -> VolumeOut:
    with session_scope(write=False) as s:
        v = service.get_volume(s, p, ref)
        return _out(v, service.attachments_of(s, [v.id]))


class VolumePatch(Body):
    tier: Annotated[str, Field(max_length=32)] | None = Field(None, description="New tier: applied live")
    description: Description | None = None


@router.patch("/volumes/{ref}", status_code=202, response_model=VolumeOut)
def update_volume(ref: str, body: VolumePatch, p: Member) -> VolumeOut:
    return _one(service.update_volume(p, ref, tier=body.tier, description=body.description))


@router.delete("/volumes/{ref}", status_code=202, response_model=VolumeOut)
def delete_volume(ref: str, p: Member) -> VolumeOut:
    """409 while attached or while clones share its blocks."""
    return _one(service.delete_volume(p, ref))


class AttachIn(Body):
    instance_id: Ref = Field(description="Instance id or name")
    mode: Literal["rw", "ro"] | None = Field(None, description="Default rw; ro for further attachments of a "
                                                               "shareable volume unless rw is asked")


@router.post("/volumes/{ref}/attach", status_code=202, response_model=VolumeOut)
def attach(ref: str, body: AttachIn, p: Member) -> VolumeOut:
    """Hot-plug into a running instance (or plug at next start of a stopped one)."""
    return _one(service.attach_volume(p, ref, body.instance_id, body.mode))


class DetachIn(Body):
    instance_id: Ref | None = None
    force: bool = Field(False, description="When the guest does not release the disk in time, cut it off anyway")


@router.post("/volumes/{ref}/detach", status_code=202, response_model=VolumeOut)
def detach(ref: str, p: Member, body: DetachIn | None = None) -> VolumeOut:
    body = body or DetachIn()
    return _one(service.detach_volume(p, ref, body.instance_id, body.force))


class ResizeIn(Body):
    size_gb: int = Field(ge=1)


@router.post("/volumes/{ref}/resize", status_code=202, response_model=VolumeOut)
def resize(ref: str, body: ResizeIn, p: Member) -> VolumeOut:
    """Grow (online when attached: the guest sees the new size). Shrinking is a 409."""
    return _one(service.resize_volume(p, ref, body.size_gb))


class RevertIn(Body):
    snapshot: Ref


@router.post("/volumes/{ref}/revert", status_code=202, response_model=VolumeOut)
def revert(ref: str, body: RevertIn, p: Member) -> VolumeOut:
    """Go back to a snapshot (the volume must be detached)."""
    return _one(service.revert_volume(p, ref, body.snapshot))


# --- snapshots --------------------------------------------------------------------------------------

class SnapshotIn(Body):
    name: Name | None = None


class SnapshotOut(Out):
    id: str
    volume_id: str
    name: str
    kind: str
    status: str
    status_reason: str
    size_gb: int
    created_at: dt.datetime
    expires_at: dt.datetime | None


@router.post("/volumes/{ref}/snapshots", status_code=202, response_model=SnapshotOut)
def create_snapshot(ref: str, p: Member, body: SnapshotIn | None = None) -> SnapshotOut:
    """Instant snapshot (an external qcow2 snapshot: constant time whatever the size)."""
    return SnapshotOut.model_validate(service.create_snapshot(p, ref, body.name if body else None))


@router.get("/volumes/{ref}/snapshots", response_model=Page[SnapshotOut])
def list_volume_snapshots(ref: str, p: Viewer, page: Pagination,
                          kind: Annotated[Literal["user", "backup"] | None, Query()] = None) -> Page[SnapshotOut]:
    with session_scope(write=False) as s:
        v = service.get_volume(s, p, ref)
        rows, nxt = paginate(s, service.snapshot_query(p, v, kind), VolumeSnapshot.id, page)
        return Page[SnapshotOut](items=[SnapshotOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/volume-snapshots", response_model=Page[SnapshotOut])
def list_snapshots(p: Viewer, page: Pagination,
                   kind: Annotated[Literal["user", "backup"] | None, Query()] = None) -> Page[SnapshotOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.snapshot_query(p, None, kind), VolumeSnapshot.id, page)
        return Page[SnapshotOut](items=[SnapshotOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/volumes/{ref}/snapshots/{snap}", response_model=SnapshotOut)
def get_snapshot(ref: str, snap: str, p: Viewer) -> SnapshotOut:
    with session_scope(write=False) as s:
        v = service.get_volume(s, p, ref)
        return SnapshotOut.model_validate(service.get_snapshot(s, p, snap, v))


@router.delete("/volumes/{ref}/snapshots/{snap}", status_code=202, response_model=SnapshotOut)
def delete_snapshot(ref: str, snap: str, p: Member) -> SnapshotOut:
    """Merge the snapshot's data into the files above it (chains never grow without bound), then remove it."""
    return SnapshotOut.model_validate(service.delete_snapshot(p, ref, snap))


# --- backups ----------------------------------------------------------------------------------------

class BackupIn(Body):
    bucket: BucketName | None = Field(None, description="A bucket of this project (default: hb-backups-<project "
                                                         "id>, created when missing)")
    kind: Literal["auto", "full", "incremental"] = "auto"


class BackupOut(Out):
    id: str
    volume_id: str
    volume_name: str
    policy_id: str | None
    kind: str
    parent_id: str | None
    status: str
    status_reason: str
    endpoint: str
    bucket: str
    prefix: str
    objects: list[dict[str, Any]]
    size_bytes: int
    volume_size_gb: int
    encrypted: bool
    point_in_time: dt.datetime | None
    rpo_seconds: float | None
    duration_seconds: float | None
    created_at: dt.datetime
    completed_at: dt.datetime | None
    expires_at: dt.datetime | None


@router.post("/volumes/{ref}/backups", status_code=202, response_model=BackupOut)
def create_backup(ref: str, p: Member, body: BackupIn | None = None) -> BackupOut:
    """Back up to the project's S3 bucket: full, or incremental (the layers written since the last backup)."""
    body = body or BackupIn()
    return BackupOut.model_validate(service.create_backup(p, ref, bucket=body.bucket, kind=body.kind))


@router.get("/volume-backups", response_model=Page[BackupOut])
def list_backups(p: Viewer, page: Pagination, volume: Annotated[str | None, Query(max_length=63)] = None,
                 status: Annotated[str | None, Query(max_length=16)] = None) -> Page[BackupOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.backup_query(p, volume, status), VolumeBackup.id, page)
        return Page[BackupOut](items=[BackupOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/volume-backups/{backup_id}", response_model=BackupOut)
def get_backup(backup_id: str, p: Viewer) -> BackupOut:
    with session_scope(write=False) as s:
        return BackupOut.model_validate(service.get_backup(s, p, backup_id))


@router.delete("/volume-backups/{backup_id}", status_code=202, response_model=BackupOut)
def delete_backup(backup_id: str, p: Member) -> BackupOut:
    return BackupOut.model_validate(service.delete_backup(p, backup_id))


class RestoreIn(Body):
    name: Name
    size_gb: int | None = Field(None, ge=1)
    tier: Annotated[str, Field(max_length=32)] | None = None
    zone: Annotated[str, Field(max_length=24)] | None = None


@router.post("/volume-backups/{backup_id}/restore", status_code=202, response_model=VolumeOut)
def restore(backup_id: str, body: RestoreIn, p: Member, response: Response) -> VolumeOut:
    """Restore into a new volume."""
    v = service.restore_backup(p, backup_id, body.name, size_gb=body.size_gb, tier=body.tier, zone=body.zone)
    response.headers["Location"] = f"/v1/volumes/{v.id}"
    return _one(v)


# --- backup policies --------------------------------------------------------------------------------

class PolicyIn(Body):
    name: Name
    every: str | int = Field("6h", description="Interval: 30m, 6h, 1d… (seed: every 6 h)")
    keep_local: str | int = Field("7d", description="Local backup points kept (seed: 7 days)")
    keep_remote: str | int = Field("30d", description="Remote backups kept (seed: 30 days)")
    bucket: BucketName | None = Field(None, description="A bucket of this project (default: hb-backups-<project "
                                                         "id>, created when missing)")
    volumes: list[Ref] | None = Field(None, max_length=500, description="Volumes covered (default: all)")
    full_every: int | None = Field(None, ge=1, le=1000, description="A full backup after this many incrementals")

    @field_validator("every", "keep_local", "keep_remote")
    @classmethod
    def _duration(cls, v: str | int) -> str | int:
        if isinstance(v, str) and not _DURATION.match(v):
            raise ValueError("use a duration like 30m, 6h, 7d")
        return v


class PolicyOut(Out):
    id: str
    name: str
    every_s: int
    keep_local_s: int
    keep_remote_s: int
    bucket: str
    full_every: int
    volume_ids: list[str] | None
    enabled: bool
    last_run_at: dt.datetime | None
    created_at: dt.datetime


@router.post("/backup-policies", status_code=201, response_model=PolicyOut, tags=["volumes"])
def create_policy(body: PolicyIn, p: Member) -> PolicyOut:
    """A schedule run by the control plane: backups every `every`, local points kept `keep_local`,
    remote copies `keep_remote`; each backup records its RPO."""
    pol = service.create_policy(p, body.name, every_s=parse_duration(body.every, "every"),
                                keep_local_s=parse_duration(body.keep_local, "keep_local"),
                                keep_remote_s=parse_duration(body.keep_remote, "keep_remote"),
                                bucket=body.bucket, volumes=body.volumes, full_every=body.full_every)
    return PolicyOut.model_validate(pol)


@router.get("/backup-policies", response_model=Page[PolicyOut], tags=["volumes"])
def list_policies(p: Viewer, page: Pagination) -> Page[PolicyOut]:
    with session_scope(write=False) as s:
        rows, nxt = paginate(s, service.policy_query(p), BackupPolicy.id, page)
        return Page[PolicyOut](items=[PolicyOut.model_validate(r) for r in rows], next_cursor=nxt)


@router.get("/backup-policies/{ref}", response_model=PolicyOut, tags=["volumes"])
def get_policy(ref: str, p: Viewer) -> PolicyOut:
    with session_scope(write=False) as s:
        return PolicyOut.model_validate(service.get_policy(s, p, ref))


@router.delete("/backup-policies/{ref}", status_code=204, tags=["volumes"])
def delete_policy(ref: str, p: Member) -> Response:
    service.delete_policy(p, ref)
    return Response(status_code=204)
