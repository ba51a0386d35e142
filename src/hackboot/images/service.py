"""Image rules: visibility and tenancy, uploads, snapshots, built-in images, delete protection.

Life of an image: ``queued`` (metadata only) → ``saving`` (a file is arriving: an upload or an
instance snapshot) → ``active`` (validated, usable) or ``error`` (refused, with the reason in
``status_reason``; an uploaded image may be uploaded again) → ``deleted``.

Images are immutable once active: instances' disks are qcow2 overlays whose backing file is the
image file itself (``image_file``), so its bytes must never change under them. That is also why a
built-in image whose manifest changes gets a *new file* (``<img-id>.<sha12>.qcow2``) and keeps
the old one while instances may still use it.

Slow work (streaming, hashing, ``qemu-img``) always runs outside database transactions.

Settings: ``builtin_images_dir`` (default ``<state_dir>/images/builtin``), ``image_max_bytes``
(64 GiB) and ``image_max_virtual_bytes`` (4 TiB), i.e. ``HACKBOOT_BUILTIN_IMAGES_DIR`` etc.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Select, or_, select, update
from sqlalchemy.orm import Session

from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.core.workers import Loop
from hackboot.events.service import emit
from hackboot.images.models import DISK_FORMATS, Image
from hackboot.images.store import (
    ChecksumMismatch,
    GiB,
    ImageInfo,
    ImageRejected,
    ImageStore,
    ImageTooLarge,
    Limits,
    PartialUpload,
    sha256_file,
)

log = logging.getLogger("hackboot.images")

FREE_SPACE_RESERVE = 256 * 1024 * 1024  # never fill the state disk to the last byte
HEARTBEAT_S = 30.0  # an upload in progress touches updated_at this often
STALE_UPLOAD_S = 600.0  # ...and is declared interrupted after this long without a sign of life
STALE_FILE_S = 3600.0  # age after which a leftover partial or orphan file is removed
EDITABLE = ("name", "visibility", "protected", "min_disk_gb", "min_ram_mb", "os", "os_version")
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class InsufficientStorage(errors.ApiError):
    status = 507
    code = "insufficient_storage"
    title = "Insufficient storage"


# --- the store ----------------------------------------------------------------------------------------



def store() -> ImageStore:
    """The image store of this host (``<state_dir>/images``), with the configured limits."""
    settings = get_settings()
    limits = Limits(max_bytes=settings.image_max_bytes, max_virtual_bytes=settings.image_max_virtual_bytes)
    return ImageStore(settings.state_dir / "images", limits)


def image_file(image: Image) -> Path:
    """Absolute path of the image's disk file on this host (qcow2 backing paths must be absolute).

    Meaningful for ``active`` images. Open it read-only, always with an explicit format
    (``-f`` / ``format=``) equal to ``image.disk_format``: never let QEMU probe it.
    """
    return store().path(image.file_name or f"{image.id}.{image.disk_format}")


# Who may still use an image's file: other services register a check (compute: instances whose disk
# is an overlay on it). Images imports none of them.
InUseCheck = Callable[[Session, str], bool]
_in_use_checks: list[InUseCheck] = []


def register_in_use_check(check: InUseCheck) -> Callable[[], None]:
    """`check(session, image_id)` says whether the image is in use (in the caller's transaction); an image in
    use by any check cannot be deleted, nor a superseded built-in file removed. Returns an unregister."""
    if check not in _in_use_checks:
        _in_use_checks.append(check)

    def unregister() -> None:
        if check in _in_use_checks:
            _in_use_checks.remove(check)

    return unregister


def _in_use(session: Session, image_id: str) -> bool | None:
    """Whether a registered check says the image is in use; None when no check is registered (nobody can say)."""
    checks = list(_in_use_checks)
    if not checks:
        return None
    return any(check(session, image_id) for check in checks)


# --- reading ---------------------------------------------------------------------------------------

def visible_query(project_id: str) -> Select[Any]:
    """Images a project can see: its own and every public one, never deleted ones."""
    return select(Image).where(Image.status != "deleted",
                               or_(Image.project_id == project_id, Image.visibility == "public"))


def get_image(s: Session, p: Principal, image_id: str) -> Image:
    img = s.get(Image, image_id)
    if img is None or img.status == "deleted" or (img.project_id != p.project and img.visibility != "public"):
        raise errors.NotFound(f"Image {image_id} not found")
    return img


def _writable(s: Session, p: Principal, image_id: str) -> Image:
    img = get_image(s, p, image_id)
    if img.project_id != p.project and not p.is_superuser:
        owner = "the platform" if img.project_id is None else "another project"
        raise errors.Forbidden(f"Image {image_id} belongs to {owner}: you may use it but not change it")
    return img


def resolve_image(session: Session, project_id: str, ref: str) -> Image:
    """The ``active`` image `ref` (an id or a name) that `project_id` may boot from.

    Visible images are the project's own and the public ones. By name, active images come first
    and, among them, the project's own win over public ones (a failed upload named "debian" does
    not hide the public "debian"); a name that still matches several images is a Conflict
    (``ambiguous_image``: use the id). Anything else, including an image that exists but is not
    ``active``, raises NotFound. Runs in the caller's transaction.
    """
    base = visible_query(project_id)
    img: Image | None = session.scalar(base.where(Image.id == ref))
    if img is None:
        candidates = list(session.scalars(base.where(Image.name == ref).order_by(Image.id)))
        active = [i for i in candidates if i.status == "active"]
        own_active = [i for i in active if i.project_id == project_id]
        pool = own_active or active or candidates
        if len(pool) > 1:
            raise errors.Conflict(f"Several images are named '{ref}': use the image id "
                                  f"({', '.join(i.id for i in pool[:5])})", code="ambiguous_image")
        img = pool[0] if pool else None
    if img is None:
        raise errors.NotFound(f"Image {ref} not found")
    if img.status != "active":
        why = f": {img.status_reason}" if img.status_reason else ""
        raise errors.NotFound(f"Image {ref} is not active (status {img.status}{why})", code="image_not_active")
    return img


# --- create, update, delete ------------------------------------------------------------------------

def _check_name_free(s: Session, project_id: str | None, name: str, exclude_id: str | None = None) -> None:
    owner = Image.project_id.is_(None) if project_id is None else Image.project_id == project_id
    stmt = select(Image.id).where(owner, Image.name == name, Image.status != "deleted")
    if exclude_id is not None:
        stmt = stmt.where(Image.id != exclude_id)
    if s.scalar(stmt.limit(1)) is not None:
        raise errors.Conflict(f"An image named '{name}' already exists in this project", code="already_exists")


def _public_needs_superuser(p: Principal, visibility: str) -> None:
    if visibility == "public" and not p.is_superuser:
        raise errors.Forbidden("Only cloud administrators (superusers) may make an image public")


def create_image(p: Principal, *, name: str, disk_format: str, visibility: str = "private", os: str = "",
                 os_version: str = "", min_disk_gb: int = 0, min_ram_mb: int = 0,
                 protected: bool = False) -> Image:
    """Register an image's metadata (status ``queued``); its file comes with ``begin_upload``."""
    _public_needs_superuser(p, visibility)
    project_id = p.project
    with session_scope() as s:
        _check_name_free(s, project_id, name)
        quotas.claim(s, project_id, "images", 1)
        img = Image(id=new_id("img"), project_id=project_id, name=name, status="queued", visibility=visibility,
                    disk_format=disk_format, os=os, os_version=os_version, min_disk_gb=min_disk_gb,
                    min_ram_mb=min_ram_mb, protected=protected, source="upload", created_by=p.user_id)
        s.add(img)
        s.flush()
        emit(s, "image.created", resource_type="image", resource_id=img.id, project_id=project_id,
             actor=p.user_id, data={"name": name, "disk_format": disk_format, "visibility": visibility})
        return img


def update_image(p: Principal, image_id: str, changes: dict[str, Any]) -> Image:
    """Change the editable fields (``EDITABLE``); making an image public needs a superuser."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise errors.ValidationFailed(f"These fields cannot be changed: {', '.join(sorted(unknown))}")
    with session_scope() as s:
        img = _writable(s, p, image_id)
        if changes.get("visibility") == "public" and img.visibility != "public":
            _public_needs_superuser(p, "public")
        if changes.get("visibility") == "private" and img.project_id is None:
            raise errors.ValidationFailed("Platform images belong to no project: they can only be public")
        floor = math.ceil((img.virtual_size_bytes or 0) / GiB)
        if "min_disk_gb" in changes and changes["min_disk_gb"] < floor:
            raise errors.ValidationFailed(f"min_disk_gb cannot be under {floor}: the image's disk is "
                                          f"{img.virtual_size_bytes} bytes")
        if "name" in changes and changes["name"] != img.name:
            _check_name_free(s, img.project_id, changes["name"], exclude_id=img.id)
        applied = {k: v for k, v in changes.items() if getattr(img, k) != v}
        for key, value in applied.items():
            setattr(img, key, value)
        if applied:
            s.flush()
            emit(s, "image.updated", resource_type="image", resource_id=img.id, project_id=img.project_id,
                 actor=p.user_id, data=applied)
        return img


def _own_files(img: Image) -> list[str]:
    """Store files that belong to this image alone (its disk, and its kernel and initrd copies)."""
    names = [img.file_name or f"{img.id}.{img.disk_format}"]
    for path in (img.kernel_path, img.initrd_path):
        if path and Path(path).name.startswith(img.id + "."):
            names.append(Path(path).name)
    return names


def delete_image(p: Principal, image_id: str) -> None:
    """Delete an image: refused (409) while protected, while its file is being written, or in use."""
    with session_scope() as s:
        img = _writable(s, p, image_id)
        if img.protected:
            raise errors.Conflict(f"Image {image_id} is protected: unset 'protected' first", code="image_protected")
        if img.status == "saving":
            raise errors.Conflict(f"Image {image_id} is being written (status saving): try again when it is "
                                  "active or in error", code="image_busy")
        if _in_use(s, image_id):
            raise errors.Conflict(f"Image {image_id} is in use by instances: delete them first",
                                  code="image_in_use")
        img.status = "deleted"
        img.status_reason = ""
        files = _own_files(img)
        if img.project_id is not None:
            quotas.release(s, img.project_id, "images", 1)
        emit(s, "image.deleted", resource_type="image", resource_id=img.id, project_id=img.project_id,
             actor=p.user_id, data={"name": img.name})
    st = store()
    for name in files:  # after the commit; the janitor retries whatever fails here
        try:
            st.remove(name)
        except OSError as exc:
            log.warning("could not remove %s of deleted image %s: %s", name, image_id, exc)


# --- uploads ---------------------------------------------------------------------------------------

class Upload:
    """One streamed upload of an image's file: ``begin_upload`` → ``write``* → ``finish`` | ``abort``.

    ``write`` and ``finish`` do blocking I/O: call them from a worker thread.
    """

    def __init__(self, image_id: str, project_id: str | None, actor: str, partial: PartialUpload) -> None:
        self.image_id = image_id
        self.project_id = project_id
        self.actor = actor
        self.partial = partial
        self.closed = False
        self._last_beat = time.monotonic()

    @property
    def received(self) -> int:
        return self.partial.size

    def write(self, data: bytes) -> None:
        try:
            self.partial.write(data)
        except ImageTooLarge as exc:
            self.abort(exc.reason)
            raise errors.PayloadTooLarge(exc.reason, code="image_too_large") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.abort("The image store ran out of space during the upload")
                raise InsufficientStorage("The image store is full: try again later") from None
            self.abort("The server could not write the upload")
            raise
        if time.monotonic() - self._last_beat > HEARTBEAT_S:
            self._last_beat = time.monotonic()
            with session_scope() as s:
                s.execute(update(Image).where(Image.id == self.image_id, Image.status == "saving")
                          .values(updated_at=utcnow()))

    def finish(self, expected_sha256: str | None = None) -> Image:
        """Validate and publish the file; the image becomes ``active``, or the error says why not."""
        if self.closed:
            raise errors.Conflict("This upload was already closed", code="upload_closed")
        try:
            info = self.partial.finish(expected_sha256)
        except ChecksumMismatch as exc:
            self._close("queued", exc.reason)
            raise errors.ValidationFailed(exc.reason, code=exc.code) from None
        except ImageRejected as exc:
            self._close("error", exc.reason)
            raise errors.ValidationFailed(exc.reason, code=exc.code) from None
        except OSError as exc:
            self._close("queued", "The server could not store the upload")
            if exc.errno == errno.ENOSPC:
                raise InsufficientStorage("The image store is full: try again later") from None
            raise
        except BaseException:
            self._close("queued", "The upload failed on the server: upload the file again")
            raise
        self.closed = True
        return _activate(self.image_id, info, self.partial.final_path.name, self.actor)

    def abort(self, reason: str) -> None:
        """Drop the partial data; the image goes back to ``queued`` with `reason` (idempotent)."""
        if self.closed:
            return
        self.partial.abort()
        self._close("queued", reason)

    def _close(self, status: str, reason: str) -> None:
        self.closed = True
        with session_scope() as s:
            result = s.execute(update(Image).where(Image.id == self.image_id, Image.status == "saving")
                               .values(status=status, status_reason=reason[:500]))
            if result.rowcount:  # type: ignore[attr-defined]
                emit(s, "image.upload_failed", resource_type="image", resource_id=self.image_id,
                     project_id=self.project_id, actor=self.actor, data={"status": status, "reason": reason[:500]})


def begin_upload(p: Principal, image_id: str, content_length: int | None) -> Upload:
    """Start receiving the file of a ``queued`` (or ``error``) image: it becomes ``saving``."""
    st = store()
    if content_length is not None and content_length > st.limits.max_bytes:
        raise errors.PayloadTooLarge(f"The file is {content_length} bytes; images may be at most "
                                     f"{st.limits.max_bytes} bytes", code="image_too_large")
    with session_scope() as s:
        img = _writable(s, p, image_id)
        if img.source != "upload":
            raise errors.Conflict(f"Image {image_id} is a {img.source} image: it takes no upload",
                                  code="image_immutable")
        if img.status == "active":
            raise errors.Conflict(f"Image {image_id} already has its file and images are immutable: "
                                  "create a new image", code="image_immutable")
        if img.status == "saving":
            raise errors.Conflict(f"An upload to image {image_id} is already in progress", code="upload_in_progress")
        disk_format, project_id = img.disk_format, img.project_id
    free = st.free_bytes()
    if free < (content_length or 0) + FREE_SPACE_RESERVE:
        raise InsufficientStorage(f"The image store has {free} bytes free: not enough for this image")
    with session_scope() as s:
        started = s.execute(update(Image).where(Image.id == image_id, Image.status.in_(("queued", "error")))
                            .values(status="saving", status_reason="", updated_at=utcnow()))
        if started.rowcount != 1:  # type: ignore[attr-defined]
            raise errors.Conflict(f"An upload to image {image_id} is already in progress", code="upload_in_progress")
    try:
        partial = st.begin_upload(f"{image_id}.{disk_format}", disk_format)
    except BaseException:
        with session_scope() as s:
            s.execute(update(Image).where(Image.id == image_id, Image.status == "saving")
                      .values(status="queued", status_reason="The server could not start the upload"))
        raise
    return Upload(image_id, project_id, p.user_id, partial)


def _activate(image_id: str, info: ImageInfo, file_name: str, actor: str, **extra: Any) -> Image:
    with session_scope() as s:
        img = s.get(Image, image_id)
        if img is None or img.status != "saving":
            store().remove(file_name)
            raise errors.Conflict(f"Image {image_id} changed while its file was being written", code="conflict")
        img.status, img.status_reason = "active", ""
        img.file_name = file_name
        img.size_bytes, img.virtual_size_bytes, img.sha256 = info.size_bytes, info.virtual_size_bytes, info.sha256
        img.min_disk_gb = max(img.min_disk_gb, math.ceil(info.virtual_size_bytes / GiB))
        for key, value in extra.items():
            setattr(img, key, value)
        s.flush()
        emit(s, "image.active", resource_type="image", resource_id=img.id, project_id=img.project_id, actor=actor,
             data={"sha256": info.sha256, "size_bytes": info.size_bytes,
                   "virtual_size_bytes": info.virtual_size_bytes})
        return img


# --- snapshots (called by compute) -----------------------------------------------------------------

def create_snapshot_record(session: Session, project_id: str, name: str, source_instance_id: str, *,
                           base_image_id: str | None = None, disk_format: str = "qcow2",
                           actor: str = "system") -> Image:
    """Register the image a snapshot of instance `source_instance_id` will fill (status ``saving``).

    Runs in the caller's transaction: claims one unit of the project's ``images`` quota
    (QuotaExceeded otherwise) and refuses a name already used in the project (Conflict). Pass
    `base_image_id` (the image the instance was created from) so the snapshot inherits its OS and
    boot properties (kernel, initrd and cmdline for direct kernel boot, minimum disk and RAM).
    Then produce the file outside the transaction and call ``finish_snapshot`` or ``fail_snapshot``.
    """
    if disk_format not in DISK_FORMATS:
        raise errors.ValidationFailed(f"Unsupported disk format {disk_format!r}")
    _check_name_free(session, project_id, name)
    quotas.claim(session, project_id, "images", 1)
    img = Image(id=new_id("img"), project_id=project_id, name=name, status="saving", visibility="private",
                disk_format=disk_format, source="snapshot", source_instance_id=source_instance_id,
                created_by=actor, min_disk_gb=0, min_ram_mb=0, os="", os_version="", protected=False)
    base = session.get(Image, base_image_id) if base_image_id else None
    if base is not None:
        img.os, img.os_version = base.os, base.os_version
        img.min_disk_gb, img.min_ram_mb = base.min_disk_gb, base.min_ram_mb
        img.kernel_path, img.initrd_path, img.cmdline = base.kernel_path, base.initrd_path, base.cmdline
    session.add(img)
    session.flush()
    emit(session, "image.created", resource_type="image", resource_id=img.id, project_id=project_id, actor=actor,
         data={"name": name, "source": "snapshot", "source_instance_id": source_instance_id})
    return img


def finish_snapshot(image_id: str, produced_file: Path) -> Image:
    """Publish `produced_file` as the snapshot image `image_id`, which becomes ``active``.

    `produced_file` must be a standalone image in the record's disk_format (flatten the instance's
    overlay with ``qemu-img convert -O qcow2``: a file with a backing file is refused like any
    upload). It is validated, hashed and *moved* into the store (copied if on another
    filesystem). Slow: call it outside any transaction, e.g. from a reconciler. On a refused file
    the image goes to ``error`` (via ``fail_snapshot``) and ``store.ImageRejected`` is raised.
    """
    with session_scope(write=False) as s:
        img = s.get(Image, image_id)
        if img is None or img.source != "snapshot":
            raise errors.NotFound(f"Snapshot image {image_id} not found")
        if img.status != "saving":
            raise errors.Conflict(f"Snapshot image {image_id} is {img.status}, not saving", code="image_not_saving")
        disk_format, kernel, initrd = img.disk_format, img.kernel_path, img.initrd_path
    st = store()
    file_name = f"{image_id}.{disk_format}"
    try:
        info = st.import_file(Path(produced_file), file_name, disk_format, move=True)
        # The kernel and initrd the snapshot boots with are its own, so that a built-in image
        # updated later (new kernel) cannot take them away.
        extra: dict[str, Any] = {}
        if kernel:
            extra["kernel_path"] = str(st.link_file(Path(kernel), f"{image_id}.vmlinuz"))
        if initrd:
            extra["initrd_path"] = str(st.link_file(Path(initrd), f"{image_id}.initrd"))
    except ImageRejected as exc:
        fail_snapshot(image_id, exc.reason)
        raise
    except OSError as exc:
        fail_snapshot(image_id, f"The snapshot could not be stored: {exc.strerror or exc}")
        raise
    return _activate(image_id, info, file_name, "system", **extra)


def fail_snapshot(image_id: str, reason: str) -> None:
    """Mark the snapshot image `image_id` ``error`` with `reason` (shown to the user). Idempotent."""
    with session_scope() as s:
        img = s.get(Image, image_id)
        if img is None or img.status not in ("saving", "queued"):
            return
        img.status, img.status_reason = "error", reason[:500]
        emit(s, "image.error", resource_type="image", resource_id=img.id, project_id=img.project_id,
             data={"reason": reason[:500]})


# --- built-in images -------------------------------------------------------------------------------

def builtin_dir() -> Path:
    settings = get_settings()
    return settings.builtin_images_dir or settings.state_dir / "images" / "builtin"


@dataclasses.dataclass(frozen=True)
class BuiltinManifest:
    """A built-in image as the guest image builder describes it (``<name>.json`` beside its files)."""

    name: str
    disk: Path
    disk_format: str
    os: str = ""
    os_version: str = ""
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    min_disk_gb: int = 0
    min_ram_mb: int = 0
    sha256: str | None = None


def read_manifest(path: Path) -> BuiltinManifest:
    """Parse and check a builder manifest; file paths may be relative to its folder. ValueError if bad."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise TypeError("a manifest is a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid image name {name!r}")
    disk_format = data.get("disk_format", "qcow2")
    if disk_format not in DISK_FORMATS:
        raise ValueError(f"unsupported disk_format {disk_format!r}")

    def resolve(key: str, default: str | None = None) -> Path | None:
        value = data.get(key) or default
        if value is None:
            return None
        if not isinstance(value, str):
            raise TypeError(f"'{key}' must be a file path")
        p = Path(value)
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise ValueError(f"'{key}' file {p} does not exist")
        return p.resolve()

    disk = resolve("disk", f"{name}.{disk_format}")
    assert disk is not None
    sha256 = data.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256.lower())):
        raise ValueError("'sha256' must be 64 hexadecimal digits")
    cmdline = data.get("cmdline")
    return BuiltinManifest(
        name=name, disk=disk, disk_format=disk_format, os=str(data.get("os") or "")[:63],
        os_version=str(data.get("version") or data.get("os_version") or "")[:63],
        kernel=resolve("kernel"), initrd=resolve("initrd"),
        cmdline=str(cmdline)[:1024] if cmdline else None,
        min_disk_gb=int(data.get("min_disk_gb") or 0), min_ram_mb=int(data.get("min_ram_mb") or 0),
        sha256=sha256.lower() if sha256 else None)


def seed() -> None:
    """Register the built-in images found in ``builtin_dir()`` (public, platform-owned, protected).

    Idempotent: an unchanged manifest changes nothing; a manifest whose disk sha256 changed
    re-registers the same image (same id and name) with new files; never a duplicate. A bad
    manifest is logged and skipped: it must not stop the cloud from starting.
    """
    directory = builtin_dir()
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.json")):
        try:
            register_builtin(read_manifest(path))
        except (ValueError, TypeError, OSError, ImageRejected) as exc:
            log.error("built-in image manifest %s was not registered: %s", path, exc)
        except Exception:  # one bad built-in image never blocks the start
            log.exception("built-in image manifest %s was not registered", path)


def _find_builtin(s: Session, name: str) -> Image | None:
    return s.scalar(select(Image).where(Image.source == "builtin", Image.project_id.is_(None), Image.name == name,
                                        Image.status != "deleted").order_by(Image.id).limit(1))


def register_builtin(m: BuiltinManifest) -> Image:
    st = store()
    with session_scope(write=False) as s:
        existing = _find_builtin(s, m.name)
    digest = m.sha256 or sha256_file(m.disk)
    meta: dict[str, Any] = {"os": m.os, "os_version": m.os_version, "cmdline": m.cmdline,
                            "min_ram_mb": m.min_ram_mb}
    if existing is not None and existing.status == "active" and existing.sha256 == digest \
            and image_file(existing).is_file():
        with session_scope() as s:  # same disk: only boot metadata may have changed
            img = s.get(Image, existing.id)
            assert img is not None
            changed = {k: v for k, v in meta.items() if getattr(img, k) != v}
            if m.min_disk_gb > img.min_disk_gb:
                changed["min_disk_gb"] = m.min_disk_gb
            for key, value in changed.items():
                setattr(img, key, value)
            if changed:
                emit(s, "image.updated", resource_type="image", resource_id=img.id, project_id=None, data=changed)
            return img
    image_id = existing.id if existing is not None else new_id("img")
    version = digest[:12]
    info = st.import_file(m.disk, f"{image_id}.{version}.{m.disk_format}", m.disk_format, move=False,
                          expected_sha256=digest)
    new_files = {f"{image_id}.{version}.{m.disk_format}"}
    if m.kernel is not None:
        meta["kernel_path"] = str(st.link_file(m.kernel, f"{image_id}.{version}.vmlinuz"))
        new_files.add(f"{image_id}.{version}.vmlinuz")
    else:
        meta["kernel_path"] = None
    if m.initrd is not None:
        meta["initrd_path"] = str(st.link_file(m.initrd, f"{image_id}.{version}.initrd"))
        new_files.add(f"{image_id}.{version}.initrd")
    else:
        meta["initrd_path"] = None
    with session_scope() as s:
        current = _find_builtin(s, m.name)
        if current is not None and current.id != image_id:  # someone else registered it meanwhile
            for name in new_files:
                st.remove(name)
            return current
        img = current
        old_files: list[str] = []
        if img is None:
            img = Image(id=image_id, project_id=None, name=m.name, source="builtin", visibility="public",
                        protected=True, created_by="system", disk_format=m.disk_format)
            s.add(img)
        else:
            old_files = [n for n in _own_files(img) if n not in new_files]
        img.status, img.status_reason, img.disk_format = "active", "", m.disk_format
        img.file_name = f"{image_id}.{version}.{m.disk_format}"
        img.size_bytes, img.virtual_size_bytes, img.sha256 = info.size_bytes, info.virtual_size_bytes, info.sha256
        img.min_disk_gb = max(m.min_disk_gb, math.ceil(info.virtual_size_bytes / GiB))
        for key, value in meta.items():
            setattr(img, key, value)
        s.flush()
        emit(s, "image.registered" if current is None else "image.updated", resource_type="image",
             resource_id=img.id, project_id=None, data={"name": m.name, "sha256": info.sha256})
        in_use = _in_use(s, img.id) if old_files else None
    if in_use is False:  # files of the previous version, unless instances may still back on them
        for name in old_files:
            st.remove(name)
    log.info("built-in image %s registered as %s (sha256 %s)", m.name, img.id, info.sha256)
    return img


# --- background work -------------------------------------------------------------------------------

def janitor_step() -> None:
    """Reconcile the store with the database; safe to run any time, on any schedule.

    * an upload with no sign of life for ``STALE_UPLOAD_S`` (its server died) goes back to queued;
    * partial files older than ``STALE_FILE_S`` are removed;
    * files of deleted (or never recorded) images are removed, and superseded versions of built-in
      images once compute says no instance uses the image.
    """
    cutoff = utcnow() - dt.timedelta(seconds=STALE_UPLOAD_S)
    with session_scope() as s:
        s.execute(update(Image).where(Image.status == "saving", Image.source == "upload",
                                      Image.updated_at < cutoff)
                  .values(status="queued", status_reason="The upload was interrupted (the server stopped or the "
                                                         "client went away): upload the file again"))
    st = store()
    if not st.root.is_dir():
        return
    now = time.time()
    if st.tmp.is_dir():
        for part in st.tmp.iterdir():
            if part.is_file() and now - part.stat().st_mtime > STALE_FILE_S:
                part.unlink(missing_ok=True)
    files = [f for f in st.root.iterdir() if f.is_file() and f.name.startswith("img-")
             and now - f.stat().st_ctime > STALE_FILE_S]
    if not files:
        return
    ids = sorted({f.name.split(".", 1)[0] for f in files})
    with session_scope(write=False) as s:
        rows: dict[str, Image] = {}
        for i in range(0, len(ids), 500):
            rows.update({r.id: r for r in s.scalars(select(Image).where(Image.id.in_(ids[i:i + 500])))})
        superseded_in_use: dict[str, bool | None] = {}
        for f in files:
            img = rows.get(f.name.split(".", 1)[0])
            if img is None or img.status == "deleted":
                log.info("removing orphan image file %s", f.name)
                f.unlink(missing_ok=True)
            elif img.source == "builtin" and f.name not in _current_files(img):
                if img.id not in superseded_in_use:
                    superseded_in_use[img.id] = _in_use(s, img.id)
                if superseded_in_use[img.id] is False:
                    log.info("removing superseded built-in image file %s", f.name)
                    f.unlink(missing_ok=True)


def _current_files(img: Image) -> set[str]:
    names = {img.file_name or f"{img.id}.{img.disk_format}"}
    names.update(Path(p).name for p in (img.kernel_path, img.initrd_path) if p)
    return names


def loops() -> list[Loop]:
    return [Loop("images-janitor", janitor_step, 60.0)]
