"""What compute needs to know about an image, whoever stores it.

The images service (``hackboot.images.service``) owns images: ``resolve_image(session,
project_id, ref)`` and ``image_file(image)``. Compute only needs a small, read-only view of an
image (where its disk is, its format, and the direct-kernel-boot triple), so this module turns an
``Image`` row into :class:`BootImage`.

Until the images service is installed, built-in images are read straight from their build
manifests in ``<state_dir>/images/builtin/*.json`` (what its ``seed()`` registers), so compute can
boot the ``tiny`` image on a fresh checkout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from hackboot.core import errors
from hackboot.core.config import get_settings


@dataclass(frozen=True)
class BootImage:
    id: str
    name: str
    status: str
    disk_path: Path
    disk_format: str
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None
    min_disk_gb: int
    min_ram_mb: int
    virtual_size: int | None = None


def _images_service() -> Any | None:
    try:
        from hackboot.images import service  # type: ignore[attr-defined]
    except ImportError:
        return None
    return service if hasattr(service, "resolve_image") else None


def _path(value: Any) -> Path | None:
    return Path(value) if value else None


def _from_row(image: Any, svc: Any) -> BootImage:
    try:
        disk = Path(svc.image_file(image))
    except Exception:
        disk = Path("/nonexistent")
    return BootImage(
        id=image.id, name=getattr(image, "name", image.id), status=str(getattr(image, "status", "active")),
        disk_path=disk, disk_format=str(getattr(image, "disk_format", "qcow2") or "qcow2"),
        kernel=_path(getattr(image, "kernel_path", None)), initrd=_path(getattr(image, "initrd_path", None)),
        cmdline=getattr(image, "cmdline", None) or None,
        min_disk_gb=int(getattr(image, "min_disk_gb", 0) or 0), min_ram_mb=int(getattr(image, "min_ram_mb", 0) or 0),
        virtual_size=getattr(image, "virtual_size_bytes", None) or getattr(image, "virtual_size", None))


def _builtin_dir() -> Path:
    return get_settings().state_dir / "images" / "builtin"


def _builtin_id(name: str) -> str:
    return "img-builtin" + "".join(ch for ch in name.lower() if ch.isalnum())


def _builtins() -> dict[str, BootImage]:
    found: dict[str, BootImage] = {}
    for manifest in sorted(_builtin_dir().glob("*.json")):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        base = manifest.parent.resolve()

        def rel(key: str, m: dict[str, Any] = m, base: Path = base) -> Path | None:
            return (base / m[key]).resolve() if m.get(key) else None

        image = BootImage(id=_builtin_id(m["name"]), name=m["name"], status="active", disk_path=rel("disk") or base,
                          disk_format=m.get("disk_format", "qcow2"), kernel=rel("kernel"), initrd=rel("initrd"),
                          cmdline=m.get("cmdline"), min_disk_gb=int(m.get("min_disk_gb", 0)),
                          min_ram_mb=int(m.get("min_ram_mb", 0)), virtual_size=m.get("virtual_size"))
        found[image.id] = image
    return found


def resolve(session: Session, project_id: str, ref: str) -> BootImage:
    """An image by id or name that `project_id` may boot; NotFound otherwise."""
    svc = _images_service()
    if svc is not None:
        return _from_row(svc.resolve_image(session, project_id, ref), svc)
    for image in _builtins().values():
        if ref in (image.id, image.name):
            return image
    raise errors.NotFound(f"Image {ref} not found")


def by_id(session: Session, image_id: str) -> BootImage:
    """The image an existing instance was created from (for the agent; no visibility check)."""
    svc = _images_service()
    if svc is not None:
        from hackboot.images.models import Image  # type: ignore[import-not-found]

        image = session.get(Image, image_id)
        if image is None:
            raise errors.NotFound(f"Image {image_id} not found")
        return _from_row(image, svc)
    found = _builtins().get(image_id)
    if found is None:
        raise errors.NotFound(f"Image {image_id} not found")
    return found


def create_snapshot_record(session: Session, project_id: str, name: str, source_instance_id: str, *,
                           base_image_id: str | None = None, actor: str = "system") -> Any:
    svc = _images_service()
    if svc is None or not hasattr(svc, "create_snapshot_record"):
        raise errors.Unavailable("Snapshots need the images service, which is not installed")
    return svc.create_snapshot_record(session, project_id, name, source_instance_id, base_image_id=base_image_id,
                                      actor=actor)


def finish_snapshot(image_id: str, produced_file: Path) -> None:
    svc = _images_service()
    if svc is not None and hasattr(svc, "finish_snapshot"):
        svc.finish_snapshot(image_id, produced_file)


def fail_snapshot(image_id: str, reason: str) -> None:
    svc = _images_service()
    if svc is not None and hasattr(svc, "fail_snapshot"):
        svc.fail_snapshot(image_id, reason)
