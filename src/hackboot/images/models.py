"""Images: the disks instances boot from (uploads, snapshots of instances, built-in images)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from hackboot.core.db import Base, utcnow

STATUSES = ("queued", "saving", "active", "error", "deleted")
VISIBILITIES = ("private", "public")
DISK_FORMATS = ("qcow2", "raw")
SOURCES = ("upload", "builtin", "snapshot")


class Image(Base):
    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # None for the platform's own public images (the built-ins).
    project_id: Mapped[str | None] = mapped_column(ForeignKey("projects.id"), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(63), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    status_reason: Mapped[str] = mapped_column(String(500), default="")
    visibility: Mapped[str] = mapped_column(String(16), default="private", index=True)
    disk_format: Mapped[str] = mapped_column(String(8))
    os: Mapped[str] = mapped_column(String(63), default="")
    os_version: Mapped[str] = mapped_column(String(63), default="")
    min_disk_gb: Mapped[int] = mapped_column(Integer, default=0)
    min_ram_mb: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    virtual_size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Direct kernel boot (OpenStack's kernel_id/ramdisk_id idea): absolute host paths, set only by
    # the platform (built-ins, and snapshots of instances booted from them), never by users.
    kernel_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    initrd_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    cmdline: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    source: Mapped[str] = mapped_column(String(16), default="upload")
    source_instance_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    # Name of the disk file inside the image store (see images/store.py); None until there is one.
    file_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_by: Mapped[str] = mapped_column(String(40), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def direct_kernel_boot(self) -> bool:
        return self.kernel_path is not None
