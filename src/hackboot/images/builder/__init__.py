"""Builders for Hackboot's built-in guest images.

Each image is a bare ext4 root filesystem in a qcow2 (no partition table, no bootloader) plus a
kernel and an initrd, booted with QEMU direct kernel boot (like OpenStack's kernel_id/ramdisk_id
image properties), and a ``<name>.json`` manifest describing how to boot it::

    python -m hackboot.images.builder {tiny|debian-12|all} --out DIR [--force]

Builds are cached: a build is skipped when ``DIR/<name>.json`` exists and records the current
builder version. Outputs are renamed into place only once complete, manifest last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ._common import (
    ImageBuildError,
    build_lock,
    builder_version,
    is_up_to_date,
    manifest_path,
    require_root,
    work_dir,
)

__all__ = ["BUILTIN_IMAGES", "ImageBuildError", "build_image", "builder_version", "is_up_to_date"]

BUILTIN_IMAGES = ("tiny", "debian-12")

log = logging.getLogger("hackboot.images.builder")


def build_image(name: str, out_dir: Path, force: bool = False) -> Path:
    """Build the built-in image ``name`` into ``out_dir`` (or reuse the cached build).

    Returns the path of the manifest ``out_dir/<name>.json``. Needs root. Raises ValueError for an
    unknown name and ImageBuildError when a build step fails (nothing half-built is published).
    """
    if name not in BUILTIN_IMAGES:
        raise ValueError(f"unknown built-in image {name!r}; choose from {', '.join(BUILTIN_IMAGES)}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not force and is_up_to_date(out_dir, name):
        log.info("%s: up to date in %s", name, out_dir)
        return manifest_path(out_dir, name)
    require_root()
    with build_lock(out_dir, name):
        # Someone else may have finished the same build while we waited for the lock.
        if not force and is_up_to_date(out_dir, name):
            return manifest_path(out_dir, name)
        started = time.monotonic()
        log.info("%s: building into %s", name, out_dir)
        with work_dir(out_dir, name) as work:
            if name == "tiny":
                from . import tiny

                manifest = tiny.build(out_dir, work)
            else:
                from . import debian

                manifest = debian.build(out_dir, work)
        log.info("%s: built in %.1f s", name, time.monotonic() - started)
        return manifest
