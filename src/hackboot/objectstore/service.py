"""Object storage rules for the REST API (S3 credentials, bucket usage) and its background workers."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from functools import partial

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from hackboot.core import diskspace, errors
from hackboot.core.auth import Principal, forget_cached_tokens
from hackboot.core.config import get_settings
from hackboot.core.crypto import seal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.workers import Loop
from hackboot.events.service import emit
from hackboot.objectstore import engine, lifecycle
from hackboot.objectstore.models import Blob, Bucket, S3Credential, S3ProjectSettings, Upload

log = logging.getLogger("hackboot.objectstore")
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ORPHAN_AGE_S = 3600.0
_started_at = time.time()


@dataclass
class IssuedCredential:
    credential: S3Credential
    secret_key: str  # shown once


def _access_key() -> str:
    return "HBK" + "".join(secrets.choice(_ALNUM) for _ in range(17))


def create_credential(project_id: str, user_id: str, *, name: str = "", read_only: bool = False,
                      buckets: list[str] | None = None, actor: str | None = None) -> IssuedCredential:
    secret = secrets.token_urlsafe(30)[:40]
    with session_scope() as s:
        cred_id = new_id("s3k")
        cred = S3Credential(id=cred_id, project_id=project_id, user_id=user_id, name=name, access_key=_access_key(),
                            secret_sealed=seal(secret.encode(), engine.SECRET_CONTEXT + cred_id.encode()),
                            read_only=read_only, buckets=buckets)
        s.add(cred)
        s.flush()
        emit(s, "s3_credential.created", resource_type="s3_credential", resource_id=cred.id, project_id=project_id,
             actor=actor or user_id, data={"access_key": cred.access_key, "read_only": read_only,
                                           "buckets": buckets})
        return IssuedCredential(cred, secret)


def list_credentials(s: Session, p: Principal) -> list[S3Credential]:
    return list(s.scalars(select(S3Credential).where(S3Credential.project_id == p.project,
                                                     S3Credential.revoked_at.is_(None)).order_by(S3Credential.id)))


def revoke_credential(p: Principal, cred_id: str) -> S3Credential:
    with session_scope() as s:
        cred = s.get(S3Credential, cred_id)
        if cred is None or cred.project_id != p.project:
            cred = s.scalar(select(S3Credential).where(S3Credential.access_key == cred_id,
                                                       S3Credential.project_id == p.project))
        if cred is None:
            raise errors.NotFound(f"S3 credential {cred_id} not found")
        if cred.user_id != p.user_id and not p.has_role("admin"):
            raise errors.Forbidden("Only project admins may revoke another user's S3 credentials")
        if cred.revoked_at is None:
            cred.revoked_at = utcnow()
            emit(s, "s3_credential.revoked", resource_type="s3_credential", resource_id=cred.id,
                 project_id=cred.project_id, actor=p.user_id)
    engine.invalidate_credential(cred.access_key)
    return cred


def set_block_public_access(project_id: str, blocked: bool) -> None:
    with session_scope() as s:
        row = s.get(S3ProjectSettings, project_id)
        if row is None:
            s.add(S3ProjectSettings(project_id=project_id, block_public_access=blocked))
        else:
            row.block_public_access = blocked
    engine.invalidate_bucket()
    forget_cached_tokens()  # bumps the shared epoch: the S3 endpoint's process drops its bucket cache too


def get_block_public_access(project_id: str) -> bool:
    with session_scope(write=False) as s:
        return engine.project_blocks_public(s, project_id)


BucketUsage = engine.BucketUsage


def bucket_usage(s: Session, buckets: list[Bucket]) -> dict[str, BucketUsage]:
    return engine.q_bucket_usage(s, [b.id for b in buckets])


def get_bucket(s: Session, p: Principal, name: str) -> Bucket:
    b = s.scalar(select(Bucket).where(Bucket.name == name))
    if b is None or b.project_id != p.project:
        raise errors.NotFound(f"Bucket {name} not found")
    return b


# --- workers --------------------------------------------------------------------------------------

_startup_done = {"done": False}


def startup() -> None:
    """On start: remove data of writes that were never acknowledged (crash), and orphan blobs.

    Runs once per server: the S3 processes forked after it inherit that it ran (emptying `objects/tmp`
    once a sibling is receiving data into it would destroy an upload in flight)."""
    if _startup_done["done"]:
        return
    _startup_done["done"] = True
    diskspace.maintain_reserve()
    removed = engine.backend().cleanup_temp()
    orphans = sweep_orphans(max_age_s=0.0, before=_started_at)
    if removed or orphans:
        log.info("object store start: removed %d temp files and %d orphan blobs", removed, orphans)


def sweep_orphans(max_age_s: float = ORPHAN_AGE_S, before: float | None = None) -> int:
    """Blob files with no row (written, then the process died before the metadata commit)."""
    be = engine.backend()
    now = time.time()
    candidates = [(bid, mtime) for bid, mtime in be.list()
                  if (before is not None and mtime < before) or (before is None and now - mtime > max_age_s)]
    removed = 0
    for i in range(0, len(candidates), 500):
        chunk = candidates[i:i + 500]
        ids = [c[0] for c in chunk]
        with session_scope(write=False) as s:
            known = set(s.scalars(select(Blob.id).where(Blob.id.in_(ids))))
        for bid in ids:
            if bid not in known:
                be.delete(bid)
                removed += 1
    return removed


def gc_step() -> int:
    """Delete the data of unreferenced blobs, then their rows."""
    with session_scope(write=False) as s:
        dead = list(s.scalars(select(Blob.id).where(Blob.dead.is_(True)).limit(1000)))
    if not dead:
        return 0
    engine.delete_blob_data(dead)
    with session_scope() as s:
        s.execute(delete(Blob).where(Blob.id.in_(dead), Blob.dead.is_(True)))
    return len(dead)


def temp_cleanup_step() -> None:
    engine.backend().cleanup_temp(older_than_s=24 * 3600)
    sweep_orphans()
    gc_step()


def multipart_cleanup_step() -> int:
    """Abort uploads older than setting `s3_upload_ttl_days` (7 lifecycle days by default)."""
    ttl_days = get_settings().s3_upload_ttl_days
    import datetime as dt

    cutoff = utcnow() - dt.timedelta(seconds=ttl_days * engine.day_seconds())
    with session_scope(write=False) as s:
        stale = [(u.bucket_id, u.id) for u in s.scalars(select(Upload).where(Upload.created_at < cutoff).limit(500))]
    for bucket_id, upload_id in stale:
        try:
            dead = engine.write_sync(partial(engine.tx_abort_upload, bucket_id=bucket_id, upload_id=upload_id,
                                             key=None))
            engine.delete_blob_data(dead)
        except Exception:
            log.exception("could not abort stale upload %s", upload_id)
    return len(stale)


def loops() -> list[Loop]:
    day = engine.day_seconds()
    lifecycle_interval = max(0.2, min(300.0, day / 4))
    return [
        Loop("s3-lifecycle", lifecycle.run_once, lifecycle_interval),
        Loop("s3-multipart-cleanup", multipart_cleanup_step, max(0.5, min(3600.0, day / 4))),
        Loop("s3-temp-cleanup", temp_cleanup_step, 60.0),
        # the reserve released so deletes could commit on a full disk comes back once they freed space
        Loop("s3-disk-reserve", diskspace.maintain_reserve, 2.0),
    ]
