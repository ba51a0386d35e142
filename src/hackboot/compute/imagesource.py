"""What compute needs to know about an image: a small read-only view of the images service's rows.

The images service (``hackboot.images.service``) owns images. Compute only needs where an image's
disk is, its format, its minimum sizes and the direct-kernel-boot triple, so this module turns an
``Image`` row into :class:`BootImage` (which the agent can hold without a database session), and
is compute's one way in to images: resolving a reference, and an instance snapshot's life.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from hackboot.core import errors
from hackboot.images import service as images
from hackboot.images.models import Image


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


def _view(image: Image) -> BootImage:
    return BootImage(
        id=image.id, name=image.name, status=image.status, disk_path=images.image_file(image),
        disk_format=image.disk_format or "qcow2",
        kernel=Path(image.kernel_path) if image.kernel_path else None,
        initrd=Path(image.initrd_path) if image.initrd_path else None,
        cmdline=image.cmdline or None, min_disk_gb=image.min_disk_gb or 0, min_ram_mb=image.min_ram_mb or 0,
        virtual_size=image.virtual_size_bytes or None)


def resolve(session: Session, project_id: str, ref: str) -> BootImage:
    """An active image by id or name that `project_id` may boot; NotFound otherwise."""
    return _view(images.resolve_image(session, project_id, ref))


def by_id(session: Session, image_id: str) -> BootImage:
    """The image an existing instance was created from (for the agent; no visibility check)."""
    image = session.get(Image, image_id)
    if image is None:
        raise errors.NotFound(f"Image {image_id} not found")
    return _view(image)


def create_snapshot_record(session: Session, project_id: str, name: str, source_instance_id: str, *,
                           base_image_id: str | None = None, actor: str = "system") -> Image:
    """The `saving` image an instance snapshot will fill (in the caller's transaction)."""
    return images.create_snapshot_record(session, project_id, name, source_instance_id, base_image_id=base_image_id,
                                         actor=actor)


def finish_snapshot(image_id: str, produced_file: Path) -> None:
    """The agent produced the snapshot's file: the images service imports it and activates the image."""
    images.finish_snapshot(image_id, produced_file)


def fail_snapshot(image_id: str, reason: str) -> None:
    images.fail_snapshot(image_id, reason)
