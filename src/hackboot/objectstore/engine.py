"""The object store's metadata engine: caches, group commit, and every transaction of the S3 API.

Durability: a write is acknowledged only after its data is fsynced (blob backend) and its
metadata committed. Metadata writes go through one `GroupCommitter` thread that runs many
requests' operations in a single transaction (a SAVEPOINT each, so one failing operation does not
fail the others) and pays one commit/fsync for all of them: this is what makes durable small PUTs
fast on SQLite, where writers are serialised anyway.

Functions named `tx_*` run inside a write transaction (given the session); `q_*` are reads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import fcntl
import itertools
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import anyio
from sqlalchemy import UnaryExpression, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

import hackboot.identity.models  # noqa: F401 - projects, so the foreign keys to them resolve
from hackboot.core import quotas
from hackboot.core.auth import auth_epoch, forget_cached_tokens
from hackboot.core.config import get_settings
from hackboot.core.crypto import unseal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.errors import QuotaExceeded
from hackboot.events.service import emit
from hackboot.objectstore import checksums
from hackboot.objectstore.models import (
    Blob,
    Bucket,
    ObjectVersion,
    Part,
    S3Credential,
    S3ProjectSettings,
    Upload,
)
from hackboot.objectstore.s3errors import (
    S3Error,
    invalid_version_id,
    method_not_allowed,
    no_such_bucket,
    no_such_key,
    no_such_version,
    precondition_failed,
)
from hackboot.objectstore.storage import BlobBackend, LocalBackend

log = logging.getLogger("hackboot.objectstore")
T = TypeVar("T")
INLINE_MAX = 64 * 1024  # objects up to this size live in their metadata row (one durable write)
SECRET_CONTEXT = b"s3-credential"


# --- backend --------------------------------------------------------------------------------------

_backend: BlobBackend | None = None


def backend() -> BlobBackend:
    global _backend
    if _backend is None:
        _backend = LocalBackend(get_settings().state_dir / "objects")
    return _backend


def reset() -> None:
    """Tests: forget the backend and caches (after changing HACKBOOT_STATE_DIR)."""
    global _backend
    _backend = None
    _creds.clear()
    _buckets.clear()
    _commit_turn.forget()


# --- group commit ---------------------------------------------------------------------------------

_batch = threading.local()


def _quota(s: Session, project_id: str, resource: str, delta: int) -> None:
    """Claim (delta > 0) or release quota; inside a group commit the deltas are summed per project and
    claimed once for the whole batch (a claim costs as much as the rest of a small PUT)."""
    acc = getattr(_batch, "acc", None)
    if acc is not None:
        acc[(project_id, resource)] = acc.get((project_id, resource), 0) + delta
    elif delta > 0:
        quotas.claim(s, project_id, resource, delta)
    elif delta < 0:
        quotas.release(s, project_id, resource, -delta)


class _CommitTurn:
    """Orders the group commits of the S3 processes of this host on SQLite (one writer at a time anyway).

    Without it a process finding the database locked polls with growing sleeps (SQLite's busy handler:
    1, 2, 5, 10 ms…) while its batch waits; a lock file queues it in the kernel and wakes it the moment
    the other process's commit is done. The descriptor is per process (flock belongs to the open file,
    which a fork would share)."""

    def __init__(self) -> None:
        self._fd = -1
        self._pid = -1

    def forget(self) -> None:
        """Tests: the state directory changed; open the lock file there next time."""
        self._pid = -1

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        settings = get_settings()
        if not settings.effective_database_url.startswith("sqlite"):
            yield
            return
        if self._pid != os.getpid():
            try:
                self._fd = os.open(settings.state_dir / "s3-commit.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                   0o600)
            except OSError:  # e.g. a full disk: SQLite's own locking still serialises the writers
                yield
                return
            self._pid = os.getpid()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


_commit_turn = _CommitTurn()


class GroupCommitter:
    MAX_BATCH = 128

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[[Session], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="hb-s3-commit", daemon=True)
                    self._thread.start()

    def submit(self, fn: Callable[[Session], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._ensure()
        self._q.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            while len(batch) < self.MAX_BATCH:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            with _commit_turn():
                self._commit(batch)

    def _commit(self, batch: list[tuple[Callable[[Session], Any], Future[Any]]]) -> None:
        """Run the whole batch in one transaction. Failures are rare (preconditions, quotas): when one
        operation raises, the transaction is rolled back and each operation runs again alone, so no
        operation ever sees another's partial work and every caller gets its own outcome."""
        if len(batch) > 1:
            results: list[Any] = []
            failed = False
            try:
                with session_scope() as s, s.no_autoflush:
                    _batch.acc = {}
                    for fn, _ in batch:
                        results.append(fn(s))
                        # Each operation sees the database, never another's stale ORM objects: drop the
                        # loaded ones. Pending objects (events) stay and are inserted together at commit.
                        for obj in list(s.identity_map.values()):
                            s.expunge(obj)
                    acc, _batch.acc = _batch.acc, None
                    for (project_id, resource), delta in sorted(acc.items()):
                        _quota(s, project_id, resource, delta)
            except Exception:
                failed = True
            finally:
                _batch.acc = None
            if not failed:
                for value, (_, fut) in zip(results, batch, strict=True):
                    fut.set_result(value)
                return
        for fn, fut in batch:
            try:
                with session_scope() as s:
                    value = fn(s)
            except Exception as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(value)


committer = GroupCommitter()


async def write(fn: Callable[[Session], T]) -> T:
    return await asyncio.wrap_future(committer.submit(fn))


def write_sync(fn: Callable[[Session], T]) -> T:
    return committer.submit(fn).result()


def _read_sync(fn: Callable[[Session], T]) -> T:
    with session_scope(write=False) as s:
        return fn(s)


async def read(fn: Callable[[Session], T]) -> T:
    return await anyio.to_thread.run_sync(_read_sync, fn)


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


# --- credentials ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cred:
    id: str
    access_key: str
    secret: str
    project_id: str
    user_id: str
    read_only: bool
    buckets: tuple[str, ...] | None


_creds: dict[str, tuple[Cred | None, float]] = {}
_creds_epoch = {"seen": -1}
CRED_TTL = 10.0


def get_credential(access_key: str) -> Cred | None:
    # A revocation in any process of this host (API workers are separate processes) bumps the
    # shared auth epoch: drop every cached key then.
    epoch = auth_epoch()
    if epoch != _creds_epoch["seen"]:
        _creds.clear()
        _creds_epoch["seen"] = epoch
    hit = _creds.get(access_key)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    with session_scope(write=False) as s:
        row = s.scalar(select(S3Credential).where(S3Credential.access_key == access_key))
        cred = None
        if row is not None and row.revoked_at is None:
            allowed, read_only = _holder_rights(s, row)
            if allowed:
                cred = Cred(row.id, row.access_key,
                            unseal(row.secret_sealed, SECRET_CONTEXT + row.id.encode()).decode(),
                            row.project_id, row.user_id, row.read_only or read_only,
                            tuple(row.buckets) if row.buckets is not None else None)
    if len(_creds) > 10000:
        _creds.clear()
    _creds[access_key] = (cred, now + CRED_TTL)
    return cred


async def load_credential(access_key: str) -> Cred | None:
    # A cached key is answered on the event loop; a miss reads the database in a worker thread.
    return get_credential(access_key) if access_key in _creds else await blocking(get_credential, access_key)


_service_key_checks: list[Callable[[Session, S3Credential], bool]] = []


def register_service_key_check(check: Callable[[Session, S3Credential], bool]) -> None:
    """Services that hold keys for a project itself register how to recognise them (block storage does)."""
    if check not in _service_key_checks:
        _service_key_checks.append(check)


def _is_service_key(s: Session, row: S3Credential) -> bool:
    """A key a service holds for the project itself, not for a person: block storage's backup key (made
    once, by whichever member first backed up; its secret never leaves the server). The project's
    backups must not stop when that member leaves, so no membership applies to it."""
    return any(check(s, row) for check in _service_key_checks)


def _holder_rights(s: Session, row: S3Credential) -> tuple[bool, bool]:
    """(usable, read_only) from the key's user as they are *now*, like API tokens: a key is refused once its
    user is disabled, deleted or no longer a member of the key's project, and a viewer's key only reads.
    Membership changes bump the shared auth epoch, so every process re-reads this at once."""
    from hackboot.core.auth import ROLE_RANK
    from hackboot.identity.models import Membership, User

    if _is_service_key(s, row):
        return True, False
    user = s.get(User, row.user_id)
    if user is None or user.disabled:
        return False, True
    if user.is_superuser:
        return True, False
    role = s.scalar(select(Membership.role).where(Membership.project_id == row.project_id,
                                                  Membership.user_id == row.user_id))
    if role is None:
        return False, True
    return True, ROLE_RANK.get(role, 0) < ROLE_RANK["member"]


def invalidate_credential(access_key: str) -> None:
    _creds.pop(access_key, None)
    forget_cached_tokens()  # bumps the epoch: the S3 endpoint's process forgets the key too


# --- buckets --------------------------------------------------------------------------------------

@dataclass
class BucketInfo:
    id: str
    name: str
    project_id: str
    region: str
    created_at: dt.datetime
    versioning: str
    object_lock: bool
    lock_default: dict[str, Any] | None
    acl: list[dict[str, str]]
    policy: dict[str, Any] | None
    policy_raw: str | None
    cors: list[dict[str, Any]] | None
    lifecycle: list[dict[str, Any]] | None
    encryption: str | None
    tags: dict[str, str] | None
    public_access_block: dict[str, bool] | None
    project_blocks_public: bool
    object_ownership: str | None = None  # S3 Object Ownership; None: never configured (ACLs enabled)
    owner_name: str = ""  # the owning project's display name

    def blocks(self, setting: str) -> bool:
        if self.project_blocks_public:
            return True
        return bool((self.public_access_block or {}).get(setting, False))

    @property
    def acls_disabled(self) -> bool:
        """Under BucketOwnerEnforced, ACLs neither grant anything nor can be set (S3's "ACLs disabled")."""
        return self.object_ownership == "BucketOwnerEnforced"


_buckets: dict[str, tuple[BucketInfo | None, float]] = {}
BUCKET_TTL = 2.0


def project_blocks_public(s: Session, project_id: str) -> bool:
    row = s.get(S3ProjectSettings, project_id)
    return True if row is None else row.block_public_access


def _bucket_info(s: Session, b: Bucket) -> BucketInfo:
    policy = json.loads(b.policy) if b.policy else None
    return BucketInfo(b.id, b.name, b.project_id, b.region, b.created_at, b.versioning, b.object_lock,
                      b.lock_default, b.acl or [], policy, b.policy, b.cors, b.lifecycle, b.encryption, b.tags,
                      b.public_access_block, project_blocks_public(s, b.project_id), b.object_ownership,
                      project_display_names(s, [b.project_id]).get(b.project_id, b.project_id))


_buckets_epoch: dict[str, tuple[int, int]] = {"seen": (-1, -1)}


def _bucket_epoch_file() -> str:
    return str(get_settings().state_dir / "s3-bucket-epoch")


def bucket_epoch() -> int:
    """Changes whenever a bucket's settings change in any process of this host (the S3 endpoint runs
    in several processes, the REST API in others)."""
    try:
        return os.stat(_bucket_epoch_file()).st_mtime_ns
    except FileNotFoundError:
        return 0


def _bump_bucket_epoch() -> None:
    path = _bucket_epoch_file()
    with open(path, "a"):
        pass
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def get_bucket(name: str) -> BucketInfo | None:
    # The project's public-access switch is flipped through the REST API, maybe in another process:
    # it bumps the shared auth epoch; bucket settings changed by another S3 process bump the bucket
    # epoch. Either way no process keeps serving a bucket under the old settings.
    epoch = (auth_epoch(), bucket_epoch())
    if epoch != _buckets_epoch["seen"]:
        _buckets.clear()
        _buckets_epoch["seen"] = epoch
    hit = _buckets.get(name)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    with session_scope(write=False) as s:
        b = s.scalar(select(Bucket).where(Bucket.name == name))
        info = _bucket_info(s, b) if b is not None else None
    if len(_buckets) > 10000:
        _buckets.clear()
    _buckets[name] = (info, now + BUCKET_TTL)
    return info


async def load_bucket_info(name: str) -> BucketInfo | None:
    # A cached bucket is answered on the event loop; a miss reads the database in a worker thread.
    return get_bucket(name) if name in _buckets else await blocking(get_bucket, name)


def cached_bucket(name: str) -> BucketInfo | None:
    """The bucket as last cached, however old, or None: for what must not cost a database read
    (CORS headers added to any answer, errors included)."""
    hit = _buckets.get(name)
    return hit[0] if hit is not None else None


def invalidate_bucket(name: str | None = None) -> None:
    """Call after the change is committed: every process re-reads its buckets on its next request."""
    if name is None:
        _buckets.clear()
    else:
        _buckets.pop(name, None)
    _bump_bucket_epoch()


# --- accounts (projects) as S3 sees them ----------------------------------------------------------

_names: dict[str, tuple[str, float]] = {}
NAME_TTL = 60.0


def project_display_names(s: Session, project_ids: Sequence[str]) -> dict[str, str]:
    """Project id (the S3 canonical user ID) → project name (the S3 display name), cached a minute."""
    from hackboot.identity.models import Project

    now = time.monotonic()
    out: dict[str, str] = {}
    missing = []
    for pid in set(project_ids):
        hit = _names.get(pid)
        if hit is not None and hit[1] > now:
            out[pid] = hit[0]
        else:
            missing.append(pid)
    if missing:
        if len(_names) > 10000:
            _names.clear()
        for pid, name in s.execute(select(Project.id, Project.name).where(Project.id.in_(missing))):
            out[pid] = name
            _names[pid] = (name, now + NAME_TTL)
    return out


def q_resolve_grantees(s: Session, grants: list[dict[str, str]], bucket_owner: str) -> list[dict[str, str]]:
    """Check and resolve the grantees of an ACL being set: a canonical ID must be an existing project
    (else InvalidArgument); an email address resolves to the project of the user having it, looked up
    among the users of the bucket owner's organisation only (so no tenant can probe other organisations'
    addresses), else UnresolvableGrantByEmailAddress. A user in several projects resolves to the one
    they joined first."""
    from hackboot.identity.models import Membership, Project, User

    out = []
    for g in grants:
        email = g.get("email")
        if email is not None:
            org = s.scalar(select(Project.org_id).where(Project.id == bucket_owner))
            user_id = s.scalar(select(User.id).where(func.lower(User.email) == email.lower(), User.org_id == org,
                                                     User.email != "").order_by(User.created_at).limit(1))
            project = None
            if user_id is not None:
                project = s.scalar(select(Membership.project_id).join(Project, Project.id == Membership.project_id)
                                   .where(Membership.user_id == user_id, Project.org_id == org)
                                   .order_by(Membership.created_at, Membership.project_id).limit(1))
            if project is None:
                raise S3Error("UnresolvableGrantByEmailAddress", "The email address you provided does not match "
                                                                 "any account on record.", EmailAddress=email[:254])
            out.append({"grantee": project, "permission": g["permission"]})
            continue
        who = g["grantee"]
        if not who.startswith("http://") and who != bucket_owner and s.get(Project, who) is None:
            raise S3Error("InvalidArgument", "Invalid id", ArgumentName="CanonicalUser/ID", ArgumentValue=who[:100])
        out.append(g)
    return out


def resolve_grantees(grants: list[dict[str, str]], bucket_owner: str) -> list[dict[str, str]]:
    with session_scope(write=False) as s:
        return q_resolve_grantees(s, grants, bucket_owner)


def tx_bucket(s: Session, bucket_id: str) -> Bucket:
    b = s.get(Bucket, bucket_id)
    if b is None:
        raise no_such_bucket()
    return b


def tx_create_bucket(s: Session, name: str, project_id: str, region: str, actor: str, object_lock: bool,
                     acl: list[dict[str, str]] | None, object_ownership: str | None = None) -> Bucket:
    existing = s.scalar(select(Bucket).where(Bucket.name == name))
    if existing is not None:
        if existing.project_id == project_id:
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket succeeded "
                                                     "and you already own it.", BucketName=name)
        raise S3Error("BucketAlreadyExists", "The requested bucket name is not available. The bucket namespace "
                                             "is shared by all users of the system. Please select a different "
                                             "name and try again.", BucketName=name)
    try:
        quotas.claim(s, project_id, "buckets", 1)
    except QuotaExceeded as exc:
        raise S3Error("TooManyBuckets", f"You have attempted to create more buckets than allowed: {exc}") from None
    from hackboot.core.ids import new_id

    b = Bucket(id=new_id("bkt"), name=name, project_id=project_id, region=region, object_lock=object_lock,
               versioning="Enabled" if object_lock else "", acl=acl, object_ownership=object_ownership)
    s.add(b)
    s.flush()
    emit(s, "bucket.created", resource_type="bucket", resource_id=b.id, project_id=project_id, actor=actor,
         data={"name": name, "object_lock": object_lock})
    return b


def tx_delete_bucket(s: Session, bucket_id: str, actor: str) -> None:
    b = tx_bucket(s, bucket_id)
    if s.scalar(select(ObjectVersion.id).where(ObjectVersion.bucket_id == b.id).limit(1)) is not None:
        raise S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty", BucketName=b.name)
    uploads = list(s.scalars(select(Upload.id).where(Upload.bucket_id == b.id)))
    for upload_id in uploads:  # S3 deletes a bucket whose only content is incomplete uploads
        tx_abort_upload(s, b.id, upload_id, None)
    quotas.release(s, b.project_id, "buckets", 1)
    emit(s, "bucket.deleted", resource_type="bucket", resource_id=b.id, project_id=b.project_id, actor=actor,
         data={"name": b.name})
    s.delete(b)


def tx_update_bucket(s: Session, bucket_id: str, **values: Any) -> Bucket:
    b = tx_bucket(s, bucket_id)
    for k, v in values.items():
        setattr(b, k, v)
    return b


# --- blobs ----------------------------------------------------------------------------------------

def _upd(model: Any) -> Any:
    """An UPDATE that does not try to synchronise ORM objects (we never keep them across statements)."""
    return update(model).execution_options(synchronize_session=False)


def tx_add_blobs(s: Session, blobs: Sequence[tuple[str, int]]) -> None:
    if blobs:
        s.connection().execute(insert(Blob.__table__), [
            {"id": b, "size": n, "refs": 1, "dead": False, "created_at": utcnow()} for b, n in blobs])


def tx_ref(s: Session, blob_ids: Sequence[str], delta: int) -> list[str]:
    """Change reference counts; return the blobs that became unreferenced (their data goes after commit)."""
    if not blob_ids:
        return []
    counts: dict[str, int] = {}
    for b in blob_ids:
        counts[b] = counts.get(b, 0) + delta
    for b, d in counts.items():
        s.execute(_upd(Blob).where(Blob.id == b).values(refs=Blob.refs + d))
    if delta > 0:
        return []
    dead = list(s.scalars(select(Blob.id).where(Blob.id.in_(list(counts)), Blob.refs <= 0)))
    if dead:
        s.execute(_upd(Blob).where(Blob.id.in_(dead)).values(dead=True))
    return dead


def delete_blob_data(blob_ids: Sequence[str]) -> None:
    be = backend()
    for b in blob_ids:
        try:
            be.delete(b)
        except OSError:
            log.warning("could not delete blob %s (the GC loop retries)", b)


def _segment_blobs(segments: list[list[Any]] | None) -> list[str]:
    return [seg[0] for seg in segments or []]


# --- objects --------------------------------------------------------------------------------------

OBJECT_COLUMNS = (ObjectVersion.id, ObjectVersion.key, ObjectVersion.version_id, ObjectVersion.is_latest,
                  ObjectVersion.delete_marker, ObjectVersion.size, ObjectVersion.etag,
                  ObjectVersion.last_modified, ObjectVersion.storage_class, ObjectVersion.checksum,
                  ObjectVersion.owner)


def new_version_id() -> str:
    # time-ordered prefix so ids sort like S3's (not relied upon: ordering uses the row id)
    return f"{int(time.time() * 1000):013x}" + secrets.token_urlsafe(15).replace("-", "0").replace("_", "1")


@dataclass
class NewObject:
    key: str
    size: int
    etag: str
    storage_class: str = "STANDARD"
    headers: dict[str, str] | None = None
    user_meta: dict[str, str] | None = None
    data: bytes | None = None
    segments: list[list[Any]] | None = None
    parts_count: int = 0
    checksum: dict[str, str] | None = None
    sse: dict[str, str] | None = None
    lock_mode: str | None = None
    lock_until: dt.datetime | None = None
    legal_hold: bool = False
    tags: dict[str, str] | None = None
    acl: list[dict[str, str]] | None = None
    owner: str | None = None  # None: the bucket's project
    new_blobs: list[tuple[str, int]] = field(default_factory=list)  # blobs written for this object
    shared_blobs: list[str] = field(default_factory=list)  # existing blobs it references (copy)


@dataclass
class WriteResult:
    version_id: str
    dead_blobs: list[str]
    last_modified: dt.datetime
    replaced_delete_marker: bool = False


# Hot statements are built once with bind parameters: SQLAlchemy then skips statement construction and
# cache-key generation on every request (that was most of a small PUT's CPU time).
_Q_LATEST = select(ObjectVersion).where(ObjectVersion.bucket_id == bindparam("b"), ObjectVersion.key == bindparam("k"),
                                        ObjectVersion.is_latest.is_(True))
_Q_VERSION = select(ObjectVersion).where(ObjectVersion.bucket_id == bindparam("b"), ObjectVersion.key == bindparam("k"),
                                         ObjectVersion.version_id == bindparam("v"))
_INSERT_VERSION = insert(ObjectVersion)
_DEMOTE = (update(ObjectVersion).where(ObjectVersion.id == bindparam("row_id"))
           .values(is_latest=False, noncurrent_since=bindparam("since"))
           .execution_options(synchronize_session=False))


def _latest(s: Session, bucket_id: str, key: str) -> ObjectVersion | None:
    return s.scalar(_Q_LATEST, {"b": bucket_id, "k": key})


class _Version(Protocol):
    """What the lock and precondition checks read of a version: an ObjectVersion, or a Core row of the hot
    path's selects (same column names)."""

    @property
    def delete_marker(self) -> bool: ...
    @property
    def etag(self) -> str: ...
    @property
    def lock_mode(self) -> str | None: ...
    @property
    def lock_until(self) -> dt.datetime | None: ...
    @property
    def legal_hold(self) -> bool: ...


def check_lock(v: _Version, bypass_governance: bool, now: dt.datetime | None = None) -> None:
    now = now or utcnow()
    if v.legal_hold:
        raise S3Error("AccessDenied", "Access Denied because object protected by object lock (legal hold)")
    locked = v.lock_mode and v.lock_until is not None and v.lock_until > now
    if locked and (v.lock_mode == "COMPLIANCE" or not bypass_governance):
        raise S3Error("AccessDenied", "Access Denied because object protected by object lock")


def _remove_row(s: Session, b: Bucket, v: ObjectVersion) -> list[str]:
    if not v.delete_marker:
        _quota(s, b.project_id, "object_bytes", -v.size)
        _quota(s, b.project_id, "objects", -1)
    s.execute(delete(ObjectVersion).execution_options(synchronize_session=False).where(ObjectVersion.id == v.id))
    return tx_ref(s, _segment_blobs(v.segments), -1)


def _promote_latest(s: Session, bucket_id: str, key: str) -> None:
    nxt = s.scalar(select(ObjectVersion).where(ObjectVersion.bucket_id == bucket_id, ObjectVersion.key == key)
                   .order_by(ObjectVersion.id.desc()).limit(1))
    if nxt is not None:
        s.execute(_upd(ObjectVersion).where(ObjectVersion.id == nxt.id).values(is_latest=True,
                                                                                 noncurrent_since=None))


def _check_conditions(cur: _Version | None, if_match: str | None, if_none_match: str | None) -> None:
    live = cur if cur is not None and not cur.delete_marker else None
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            raise S3Error("NotImplemented", "A header you provided implies functionality that is not implemented",
                          Header="If-None-Match")
        if live is not None:
            raise precondition_failed(Condition="If-None-Match")
    if if_match is not None:
        if live is None:
            raise no_such_key()
        if not etag_matches(if_match, live.etag):
            raise precondition_failed(Condition="If-Match")


def check_write_conditions(cur: _Version | None, if_match: str | None, if_none_match: str | None) -> None:
    """If-Match / If-None-Match of a write against the key's latest version (None: no version)."""
    _check_conditions(cur, if_match, if_none_match)


def etag_matches(header: str, etag: str) -> bool:
    for item in header.split(","):
        item = item.strip()
        if item == "*" or item.strip('"') == etag.strip('"'):
            return True
    return False


_Q_BUCKET = select(Bucket.id, Bucket.name, Bucket.project_id, Bucket.versioning).where(Bucket.id == bindparam("b"))
_Q_LATEST_CORE = select(ObjectVersion.id, ObjectVersion.version_id, ObjectVersion.delete_marker,
                        ObjectVersion.size, ObjectVersion.etag, ObjectVersion.segments, ObjectVersion.lock_mode,
                        ObjectVersion.lock_until, ObjectVersion.legal_hold).where(
    ObjectVersion.bucket_id == bindparam("b"), ObjectVersion.key == bindparam("k"), ObjectVersion.is_latest.is_(True))
_Q_NULL_CORE = select(ObjectVersion.id, ObjectVersion.version_id, ObjectVersion.delete_marker,
                      ObjectVersion.size, ObjectVersion.etag, ObjectVersion.segments, ObjectVersion.lock_mode,
                      ObjectVersion.lock_until, ObjectVersion.legal_hold).where(
    ObjectVersion.bucket_id == bindparam("b"), ObjectVersion.key == bindparam("k"),
    ObjectVersion.version_id == "null")
_DELETE_ROW = delete(ObjectVersion.__table__).where(ObjectVersion.__table__.c.id == bindparam("row_id"))
_DEMOTE_CORE = update(ObjectVersion.__table__).where(ObjectVersion.__table__.c.id == bindparam("row_id")).values(
    is_latest=False, noncurrent_since=bindparam("since"))
_INSERT_CORE = insert(ObjectVersion.__table__)


def _core_bucket(s: Session, bucket_id: str) -> Any:
    b = s.connection().execute(_Q_BUCKET, {"b": bucket_id}).first()
    if b is None:
        raise no_such_bucket()
    return b


def tx_put_object(s: Session, bucket_id: str, obj: NewObject, actor: str, *, if_match: str | None = None,
                  if_none_match: str | None = None, upload_id: str | None = None) -> WriteResult:
    """Store a new current version (Core statements: this is the hot path of every PUT)."""
    conn = s.connection()
    b = _core_bucket(s, bucket_id)
    cur = conn.execute(_Q_LATEST_CORE, {"b": bucket_id, "k": obj.key}).first()
    _check_conditions(cur, if_match, if_none_match)
    now = utcnow()
    dead: list[str] = []
    removed: list[Any] = []
    if cur is not None and b.versioning == "":
        removed.append(cur)
    if b.versioning == "Suspended":  # the new null version replaces any older null version
        old_null = conn.execute(_Q_NULL_CORE, {"b": bucket_id, "k": obj.key}).first()
        if old_null is not None:
            check_lock(old_null, False, now)
            removed.append(old_null)
    # quotas: claim only the net change (an overwrite of a same-size object claims nothing)
    freed_bytes = sum(r.size for r in removed if not r.delete_marker)
    freed_objects = sum(1 for r in removed if not r.delete_marker)
    delta_bytes, delta_objects = obj.size - freed_bytes, 1 - freed_objects
    _quota(s, b.project_id, "object_bytes", delta_bytes)
    _quota(s, b.project_id, "objects", delta_objects)
    tx_add_blobs(s, obj.new_blobs)
    tx_ref(s, obj.shared_blobs, +1)
    for r in removed:
        conn.execute(_DELETE_ROW, {"row_id": r.id})
        dead += tx_ref(s, _segment_blobs(r.segments), -1)
    if cur is not None and b.versioning != "":
        conn.execute(_DEMOTE_CORE, {"row_id": cur.id, "since": now})
    version_id = new_version_id() if b.versioning == "Enabled" else "null"
    conn.execute(_INSERT_CORE, {
        "bucket_id": bucket_id, "key": obj.key, "version_id": version_id, "is_latest": True, "delete_marker": False,
        "size": obj.size, "etag": obj.etag, "last_modified": now, "storage_class": obj.storage_class,
        "headers": obj.headers, "user_meta": obj.user_meta, "data": obj.data, "segments": obj.segments,
        "parts_count": obj.parts_count, "checksum": obj.checksum, "sse": obj.sse, "lock_mode": obj.lock_mode,
        "lock_until": obj.lock_until, "legal_hold": obj.legal_hold, "tags": obj.tags, "acl": obj.acl,
        "owner": obj.owner, "noncurrent_since": None})
    if upload_id is not None:
        s.execute(delete(Part).where(Part.upload_id == upload_id))
        s.execute(delete(Upload).where(Upload.id == upload_id))
    emit(s, "object.created", resource_type="bucket", resource_id=b.id, project_id=b.project_id, actor=actor,
         data={"bucket": b.name, "key": obj.key[:256], "version_id": version_id, "size": obj.size,
               "etag": obj.etag})
    return WriteResult(version_id, dead, now)


@dataclass
class DeleteResult:
    version_id: str | None
    delete_marker: bool
    dead_blobs: list[str]


def tx_delete_object(s: Session, bucket_id: str, key: str, version_id: str | None, actor: str, *,
                     bypass_governance: bool = False, if_match: str | None = None) -> DeleteResult:
    b = tx_bucket(s, bucket_id)
    now = utcnow()
    if version_id is not None:
        v = s.scalar(select(ObjectVersion).where(ObjectVersion.bucket_id == bucket_id, ObjectVersion.key == key,
                                                 ObjectVersion.version_id == version_id))
        if v is None:
            if version_id != "null" and not valid_version_id(version_id):
                raise invalid_version_id("versionId")
            return DeleteResult(version_id, False, [])
        if if_match is not None and not etag_matches(if_match, v.etag):
            raise precondition_failed()
        check_lock(v, bypass_governance, now)
        dead = _remove_row(s, b, v)
        if v.is_latest:
            _promote_latest(s, bucket_id, key)
        _emit_deleted(s, b, key, version_id, actor, v.delete_marker)
        return DeleteResult(version_id, v.delete_marker, dead)
    cur = _latest(s, bucket_id, key)
    if if_match is not None:
        if cur is None or cur.delete_marker:
            raise no_such_key()
        if not etag_matches(if_match, cur.etag):
            raise precondition_failed()
    if b.versioning == "":
        if cur is None:
            return DeleteResult(None, False, [])
        check_lock(cur, bypass_governance, now)
        dead = _remove_row(s, b, cur)
        _emit_deleted(s, b, key, None, actor, False)
        return DeleteResult(None, False, dead)
    dead = []
    if cur is not None:
        s.execute(_upd(ObjectVersion).where(ObjectVersion.id == cur.id).values(is_latest=False,
                                                                                 noncurrent_since=now))
    marker_id = new_version_id() if b.versioning == "Enabled" else "null"
    if b.versioning == "Suspended":
        old_null = s.scalar(select(ObjectVersion).where(ObjectVersion.bucket_id == bucket_id,
                                                        ObjectVersion.key == key, ObjectVersion.version_id == "null"))
        if old_null is not None:
            check_lock(old_null, bypass_governance, now)
            dead += _remove_row(s, b, old_null)
    s.execute(insert(ObjectVersion).values(bucket_id=bucket_id, key=key, version_id=marker_id, is_latest=True,
                                           delete_marker=True, size=0, etag="", last_modified=now))
    _emit_deleted(s, b, key, marker_id, actor, True)
    return DeleteResult(marker_id, True, dead)


def valid_version_id(v: str) -> bool:
    return 10 <= len(v) <= 40 and v.replace("-", "").replace("_", "").isalnum()


def _emit_deleted(s: Session, b: Bucket, key: str, version_id: str | None, actor: str, marker: bool) -> None:
    emit(s, "object.deleted", resource_type="bucket", resource_id=b.id, project_id=b.project_id, actor=actor,
         data={"bucket": b.name, "key": key[:256], "version_id": version_id, "delete_marker": marker})


_Q_LATEST_FULL = select(ObjectVersion.__table__).where(
    ObjectVersion.bucket_id == bindparam("b"), ObjectVersion.key == bindparam("k"), ObjectVersion.is_latest.is_(True))
_Q_VERSION_FULL = select(ObjectVersion.__table__).where(
    ObjectVersion.bucket_id == bindparam("b"), ObjectVersion.key == bindparam("k"),
    ObjectVersion.version_id == bindparam("v"))
_reader: tuple[Any, Any] | None = None


def _read_engine() -> Any:
    global _reader
    from hackboot.core.db import get_engine

    base = get_engine()
    if _reader is None or _reader[0] is not base:
        _reader = (base, base.execution_options(sqlite_begin="DEFERRED"))
    return _reader[1]


def version_row(bucket_id: str, key: str, version_id: str | None) -> ObjectVersion | None:
    """One version as a read-only row, Core only: GET's hot path.

    Typed as the model because the row (a select of the whole table) has every column attribute of it;
    it is read only, though, with no relationships: callers never assign to it or add it to a session.
    """
    with _read_engine().connect() as conn:
        if version_id is None:
            row = conn.execute(_Q_LATEST_FULL, {"b": bucket_id, "k": key}).first()
        else:
            row = conn.execute(_Q_VERSION_FULL, {"b": bucket_id, "k": key, "v": version_id}).first()
    return cast("ObjectVersion | None", row)


async def get_version_row(bucket_id: str, key: str, version_id: str | None) -> ObjectVersion | None:
    # SQLite point reads take microseconds and never wait on writers (WAL): a thread hop would cost
    # more than the read. A networked database is read from a worker thread.
    if _read_engine().dialect.name == "sqlite":
        return version_row(bucket_id, key, version_id)
    return await blocking(version_row, bucket_id, key, version_id)


def q_get_version(s: Session, bucket_id: str, key: str, version_id: str | None) -> ObjectVersion | None:
    if version_id is None:
        return s.scalar(_Q_LATEST, {"b": bucket_id, "k": key})
    return s.scalar(_Q_VERSION, {"b": bucket_id, "k": key, "v": version_id})


def tx_update_version(s: Session, bucket_id: str, key: str, version_id: str | None,
                      fn: Callable[[ObjectVersion], dict[str, Any]]) -> ObjectVersion:
    v = q_get_version(s, bucket_id, key, version_id)
    if v is None or (v.delete_marker and version_id is None):
        if version_id is not None:
            raise no_such_version(key, version_id)
        raise no_such_key(Key=key)
    if v.delete_marker:
        raise method_not_allowed({"x-amz-delete-marker": "true"})
    values = fn(v)
    if values:
        s.execute(_upd(ObjectVersion).where(ObjectVersion.id == v.id).values(**values))
        for k, val in values.items():
            setattr(v, k, val)
    return v


# --- listing --------------------------------------------------------------------------------------

def next_after(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix` (code point order)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return prefix[:-1] + chr(nxt)
        prefix = prefix[:-1]
    return ""


@dataclass
class Listing:
    contents: list[Any]
    prefixes: list[str]
    truncated: bool
    next_marker: str | None


def q_list_objects(s: Session, bucket_id: str, prefix: str, delimiter: str, after: str | None,
                   max_keys: int, versions: bool = False, version_after_id: int | None = None) -> Listing:
    """Keys in order with common prefixes; `after` is exclusive. O(page) index range scans."""
    base = select(*OBJECT_COLUMNS).where(ObjectVersion.bucket_id == bucket_id)
    if versions:
        order: tuple[UnaryExpression[Any], ...] = (ObjectVersion.key.asc(), ObjectVersion.id.desc())
    else:
        base = base.where(ObjectVersion.is_latest.is_(True), ObjectVersion.delete_marker.is_(False))
        order = (ObjectVersion.key.asc(),)
    upper = next_after(prefix) if prefix else None
    if upper:
        base = base.where(ObjectVersion.key < upper)
    contents: list[Any] = []
    prefixes: list[str] = []
    # cursor: (key, inclusive)
    cursor: tuple[str, bool] | None = None
    pending_version: tuple[str, int] | None = None
    if after is not None:
        rest = after[len(prefix):] if after.startswith(prefix) else None
        if delimiter and rest is not None and delimiter in rest:
            cp = prefix + rest[:rest.index(delimiter) + len(delimiter)]
            if cp == after:
                cursor = (next_after(cp), True)
        if cursor is None:
            if versions and version_after_id is not None:
                pending_version = (after, version_after_id)
            cursor = (after, False)
    if prefix and (cursor is None or cursor[0] < prefix):
        cursor = (prefix, True)
    count = 0
    truncated = False
    last_cp: str | None = None
    if max_keys <= 0:  # as S3: an empty page that is not truncated (there is no marker to go on from)
        return Listing([], [], False, None)
    while True:
        stmt = base
        if pending_version is not None:
            k, vid = pending_version
            stmt = stmt.where(or_(ObjectVersion.key > k, and_(ObjectVersion.key == k, ObjectVersion.id > 0,
                                                               ObjectVersion.id < vid)))
        elif cursor is not None:
            stmt = stmt.where(ObjectVersion.key >= cursor[0] if cursor[1] else ObjectVersion.key > cursor[0])
        want = max_keys - count + 1
        rows = s.execute(stmt.order_by(*order).limit(want)).all()
        if not rows:
            break
        restarted = False
        for row in rows:
            rest = row.key[len(prefix):]
            if delimiter and delimiter in rest:
                cp = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if cp == last_cp:
                    continue
                if count >= max_keys:
                    truncated = True
                    break
                prefixes.append(cp)
                last_cp = cp
                count += 1
                cursor = (next_after(cp), True)
                pending_version = None
                restarted = True
                break
            if count >= max_keys:
                truncated = True
                break
            contents.append(row)
            count += 1
            if versions:
                pending_version = (row.key, row.id)
            cursor = (row.key, False)
        if truncated:
            break
        if not restarted and len(rows) < want:
            break
    next_marker = None
    if truncated:
        next_marker = prefixes[-1] if (prefixes and (not contents or prefixes[-1] > contents[-1].key)) else \
            (contents[-1].key if contents else None)
    return Listing(contents, prefixes, truncated, next_marker)


def q_version_row_id(s: Session, bucket_id: str, key: str, version_id: str) -> int | None:
    return s.scalar(select(ObjectVersion.id).where(ObjectVersion.bucket_id == bucket_id, ObjectVersion.key == key,
                                                   ObjectVersion.version_id == version_id))


@dataclass
class BucketUsage:
    """What a bucket's current objects and noncurrent versions hold (delete markers hold nothing)."""

    objects: int = 0
    bytes: int = 0
    by_class: dict[str, int] = field(default_factory=dict)  # storage class → bytes


def q_bucket_usage(s: Session, bucket_ids: list[str]) -> dict[str, BucketUsage]:
    out = {b: BucketUsage() for b in bucket_ids}
    if not bucket_ids:
        return out
    rows = s.execute(select(ObjectVersion.bucket_id, ObjectVersion.storage_class, func.count(), func.sum(
        ObjectVersion.size)).where(ObjectVersion.bucket_id.in_(bucket_ids), ObjectVersion.delete_marker.is_(False))
        .group_by(ObjectVersion.bucket_id, ObjectVersion.storage_class)).all()
    for bid, cls, n, total in rows:
        u = out[bid]
        u.objects += int(n)
        u.bytes += int(total or 0)
        u.by_class[cls] = u.by_class.get(cls, 0) + int(total or 0)
    return out


# --- multipart ------------------------------------------------------------------------------------

def new_upload_id() -> str:
    return secrets.token_urlsafe(36)


def tx_get_upload(s: Session, bucket_id: str, upload_id: str, key: str | None) -> Upload:
    up = s.get(Upload, upload_id)
    if up is None or up.bucket_id != bucket_id or (key is not None and up.key != key):
        raise S3Error("NoSuchUpload", "The specified upload does not exist. The upload ID may be invalid, or the "
                                      "upload may have been aborted or completed.", UploadId=upload_id)
    return up


def tx_put_part(s: Session, bucket_id: str, upload_id: str, key: str, number: int, size: int, etag: str,
                blob_id: str, checksum: dict[str, str] | None, blob_size: int) -> list[str]:
    tx_get_upload(s, bucket_id, upload_id, key)
    tx_add_blobs(s, [(blob_id, blob_size)])
    dead: list[str] = []
    old = s.get(Part, (upload_id, number))
    if old is not None:
        dead = tx_ref(s, [old.blob_id], -1)
        s.delete(old)
        s.flush()
    s.add(Part(upload_id=upload_id, part_number=number, size=size, etag=etag, blob_id=blob_id, checksum=checksum,
               last_modified=utcnow()))
    return dead


def tx_abort_upload(s: Session, bucket_id: str, upload_id: str, key: str | None) -> list[str]:
    tx_get_upload(s, bucket_id, upload_id, key)
    blobs = list(s.scalars(select(Part.blob_id).where(Part.upload_id == upload_id)))
    s.execute(delete(Part).where(Part.upload_id == upload_id))
    s.execute(delete(Upload).where(Upload.id == upload_id))
    return tx_ref(s, blobs, -1)


def q_parts(s: Session, upload_id: str) -> list[Part]:
    return list(s.scalars(select(Part).where(Part.upload_id == upload_id).order_by(Part.part_number)))


@dataclass(frozen=True)
class PartRef:
    """A part as a CompleteMultipartUpload request names it: number, ETag, checksums sent (algorithm → base64)."""
    number: int
    etag: str
    checksums: dict[str, str] = field(default_factory=dict)


def check_part_list(parts: Sequence[PartRef]) -> None:
    """The part list's own rules, checked before any database work: not empty, numbers ascending."""
    if not parts:
        raise S3Error("MalformedXML", "You must specify at least one part")
    for a, c in itertools.pairwise(parts):
        if c.number <= a.number:
            raise S3Error("InvalidPartOrder", "The list of parts was not in ascending order. The parts list must be "
                                              "specified in order by part number.")


@dataclass(frozen=True)
class CompletionChecks:
    """What a CompleteMultipartUpload request asserts about the result (headers): the object's checksum
    (algorithm, base64), its checksum type, its size. Each is checked when given."""
    checksum: tuple[str, str] | None = None
    checksum_type: str | None = None
    size: int | None = None


def tx_complete_upload(s: Session, bucket_id: str, upload_id: str, key: str, wanted: Sequence[PartRef], actor: str,
                       *, if_match: str | None = None, if_none_match: str | None = None,
                       checks: CompletionChecks = CompletionChecks()) -> tuple[WriteResult, NewObject]:
    """Turn an upload into an object made of the listed parts (no data is copied): every part must exist with
    the ETag given, all but the last be at least `s3_min_part_size`, and carry the upload's checksum algorithm if it
    has one. The ETag is S3's MD5 of the parts' MD5s plus "-<count>"; the checksum is the upload's type: COMPOSITE
    (checksum of the parts' checksums, "-N") or FULL_OBJECT (the parts' CRCs combined into the whole object's).
    Parts not listed are released. The parts' rows and the upload go with the object's commit (tx_put_object)."""
    up = tx_get_upload(s, bucket_id, upload_id, key)
    parts = {p.part_number: p for p in q_parts(s, upload_id)}
    md5s: list[bytes] = []
    digests: list[tuple[bytes, int]] = []
    segments: list[list[Any]] = []
    total = 0
    min_part_size = get_settings().s3_min_part_size  # all parts but the last
    for ref in wanted:  # every part is looked up before any other rule is checked (S3's order of errors)
        p = parts.get(ref.number)
        if p is None or p.etag.strip('"') != ref.etag.strip('"'):
            raise S3Error("InvalidPart", "One or more of the specified parts could not be found. The part may "
                                         "not have been uploaded, or the specified entity tag may not match the "
                                         "part's entity tag.", UploadId=upload_id, PartNumber=str(ref.number),
                          ETag=ref.etag)
    for i, ref in enumerate(wanted):
        n = ref.number
        p = parts[n]
        if i < len(wanted) - 1 and p.size < min_part_size:
            raise S3Error("EntityTooSmall", "Your proposed upload is smaller than the minimum allowed object "
                                            "size.", ProposedSize=str(p.size), MinSizeAllowed=str(min_part_size),
                          PartNumber=str(n), ETag=p.etag)
        if up.checksum_algorithm:
            have = (p.checksum or {}).get(up.checksum_algorithm)
            if have is None:
                raise S3Error("InvalidRequest", f"The upload was created using a {up.checksum_algorithm} checksum. "
                                                f"The complete request must include the checksum for each part. "
                                                f"It was missing for part {n} in the request.")
            sent = ref.checksums.get(up.checksum_algorithm)
            if sent is not None and sent != have:
                raise S3Error("InvalidPart", "The checksum of a part does not match", PartNumber=str(n))
            digests.append((base64.b64decode(have), p.size))
        md5s.append(bytes.fromhex(p.etag.strip('"')))
        # the part's own checksum goes with its segment: GetObjectAttributes and partNumber reads report it
        part_checksum = (p.checksum or {}).get(up.checksum_algorithm) if up.checksum_algorithm else None
        segments.append([p.blob_id, p.size, n] + ([part_checksum] if part_checksum else []))
        total += p.size
    used = {ref.number for ref in wanted}
    unused = [p.blob_id for n, p in parts.items() if n not in used]
    checksum = _multipart_checksum(up, digests)
    _check_completion(checks, checksum, total)
    obj = NewObject(key=key, size=total, etag=checksums.multipart_etag(md5s), storage_class=up.storage_class,
                    headers=up.headers, user_meta=up.user_meta, segments=segments, parts_count=len(segments),
                    checksum=checksum, sse=up.sse, lock_mode=up.lock_mode, lock_until=up.lock_until,
                    legal_hold=up.legal_hold, tags=up.tags, acl=up.acl, owner=up.owner)
    dead = tx_ref(s, unused, -1)
    result = tx_put_object(s, bucket_id, obj, actor, if_match=if_match, if_none_match=if_none_match,
                           upload_id=upload_id)
    result.dead_blobs += dead
    return result, obj


def _multipart_checksum(up: Upload, digests: list[tuple[bytes, int]]) -> dict[str, str] | None:
    alg = up.checksum_algorithm
    if not alg:
        return None
    ck_type = up.checksum_type or checksums.default_checksum_type(alg)
    if ck_type == "FULL_OBJECT":
        return {alg: checksums.full_object(alg, digests), "type": ck_type}
    return {alg: checksums.composite(alg, [d for d, _ in digests]), "type": ck_type}


def _check_completion(checks: CompletionChecks, checksum: dict[str, str] | None, size: int) -> None:
    if checks.size is not None and checks.size != size:
        raise S3Error("InvalidRequest", f"The provided 'x-amz-mp-object-size' header value {checks.size} does not "
                                        f"match what was computed: {size}")
    if checks.checksum_type is not None and (checksum is None or checks.checksum_type != checksum["type"]):
        have = checksum["type"] if checksum else "no checksum"
        raise S3Error("InvalidRequest", f"The upload was created using the {have} checksum mode. The complete "
                                        f"request must use the same checksum mode.")
    if checks.checksum is not None:
        alg, sent = checks.checksum
        if checksum is None or alg not in checksum:
            raise S3Error("InvalidRequest", f"The upload was not created with the {alg.lower()} checksum "
                                            f"algorithm.")
        # a composite checksum may be sent with or without its "-N" suffix
        if sent.split("-")[0] != checksum[alg].split("-")[0]:
            raise S3Error("BadDigest", f"The {alg.lower()} you specified did not match the calculated checksum.")


# --- misc -----------------------------------------------------------------------------------------

def day_seconds() -> float:
    """Length of a lifecycle "day" (setting `s3_lifecycle_day_s`; tests make it a second)."""
    return get_settings().s3_lifecycle_day_s
