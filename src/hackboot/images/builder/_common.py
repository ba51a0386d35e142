"""Shared plumbing for the image builders: commands, caching, atomic outputs, disk images."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger("hackboot.images.builder")

#: Bump when the output format changes in a way the content hash below cannot see.
BUILDER_SERIES = "1"

MiB = 1024 * 1024
GiB = 1024 * MiB

_PACKAGE = __name__.rsplit(".", 1)[0]


class ImageBuildError(RuntimeError):
    """A build step failed; the message says which and why."""


def data_file(name: str) -> str:
    """Text of a file shipped next to this module (init scripts, configs)."""
    return resources.files(_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def builder_version(image: str) -> str:
    """Version string recorded in manifests and compared for cache hits.

    It hashes this package's code and the data files of ``image`` (``<image>-*`` / ``<image>.py``
    with ``debian-12`` mapping to the ``debian`` files), so editing an init script invalidates
    the cached image automatically instead of relying on someone remembering to bump a number.
    """
    family = image.split("-", 1)[0]
    root = resources.files(_PACKAGE)
    digest = hashlib.sha256()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        name = entry.name
        if not entry.is_file() or name.endswith((".pyc", ".pyo")):
            continue
        shared = name in ("_common.py", "__init__.py")
        if shared or name.startswith(f"{family}-") or name == f"{family}.py":
            digest.update(name.encode() + b"\0" + entry.read_bytes() + b"\0")
    return f"{BUILDER_SERIES}+{digest.hexdigest()[:12]}"


def run(cmd: Sequence[str | os.PathLike[str]], *, what: str | None = None, **kwargs: Any) -> str:
    """Run a command, return its stdout; raise ImageBuildError with its output tail on failure."""
    args = [str(c) for c in cmd]
    log.debug("running: %s", " ".join(args))
    try:
        proc: subprocess.CompletedProcess[str] = subprocess.run(args, capture_output=True, text=True, check=False,
                                                                **kwargs)
    except FileNotFoundError:
        raise ImageBuildError(f"{args[0]}: command not found") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise ImageBuildError(f"{what or args[0]} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def require_root() -> None:
    # File ownership inside the images must be root's and debootstrap needs real root anyway.
    if os.geteuid() != 0:
        raise ImageBuildError("building guest images needs root (file ownership, debootstrap)")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageBuildError(f"missing tools: {', '.join(missing)} (see the hackboot install docs)")


def dpkg_version(package: str) -> str:
    """Installed version of a Debian package; ImageBuildError if it is not installed."""
    try:
        out = run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package])
    except ImageBuildError:
        out = ""
    status, _, version = out.partition(" ")
    if status != "installed":
        raise ImageBuildError(f"Debian package {package!r} is not installed (apt-get install {package})")
    return version


def upstream_version(debian_version: str) -> str:
    """'1:1.35.0-4+deb12u1' -> '1.35.0'."""
    version = debian_version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- caching and atomic outputs --------------------------------------------------------------


def manifest_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.json"


def is_up_to_date(out_dir: Path, name: str) -> bool:
    """True if a complete build of ``name`` with the current builder version is in ``out_dir``.

    The manifest is renamed into place last, so its presence means every artifact was renamed
    before it; sizes are re-checked so a truncated copy of a file is not taken for a good one.
    """
    path = manifest_path(out_dir, name)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("builder_version") != builder_version(name):
        return False
    try:
        for key in ("disk", "kernel", "initrd"):
            if not (out_dir / manifest[key]).is_file():
                return False
        disk: Path = out_dir / manifest["disk"]
        size: object = manifest["size"]  # whatever the JSON holds: only the same number matches
        return disk.stat().st_size == size
    except (KeyError, TypeError):
        return False


@contextlib.contextmanager
def build_lock(out_dir: Path, name: str) -> Iterator[None]:
    """Serialise builds of the same image into the same directory (parallel tests, two CLIs)."""
    lock_path = out_dir / f".{name}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def work_dir(out_dir: Path, name: str) -> Iterator[Path]:
    """A scratch directory on the output filesystem (so final renames are atomic), always removed.

    Leftovers of killed builds (``.build-<name>-*``) are removed first; the caller holds the lock.
    """
    for stale in out_dir.glob(f".build-{name}-*"):
        safe_rmtree(stale)
    path = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=out_dir))
    try:
        yield path
    finally:
        safe_rmtree(path)


def publish(files: dict[Path, Path], manifest: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Rename finished artifacts into ``out_dir``, then the manifest last (the "done" marker)."""
    target = manifest_path(out_dir, name)
    target.unlink(missing_ok=True)  # from here until the end, the old build is not "complete"
    for src, dst in files.items():
        os.replace(src, dst)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target)
    return target


def ordered_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Stable, human-friendly key order for the JSON file."""
    first = (
        "name",
        "os",
        "version",
        "kernel",
        "initrd",
        "cmdline",
        "disk",
        "disk_format",
        "min_disk_gb",
        "min_ram_mb",
        "default_user",
        "sha256",
    )
    return {**{k: manifest[k] for k in first if k in manifest}, **manifest}


def base_manifest(name: str, disk: Path, virtual_size: int) -> dict[str, Any]:
    return {
        "name": name,
        "disk": disk.name,
        "disk_format": "qcow2",
        "size": disk.stat().st_size,
        "virtual_size": virtual_size,
        "min_disk_gb": max(1, math.ceil(virtual_size / GiB)),
        "sha256": sha256_file(disk),
        "builder_version": builder_version(name),
        "built_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "arch": "x86_64",
    }


# --- mounts: never delete through a mount point ------------------------------------------------


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            raw = line.split()[4]
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return points


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    return [p for p in _mount_points() if p == prefix or p.startswith(prefix + "/")]


def unmount_all_under(path: Path) -> None:
    """Unmount whatever a killed debootstrap left mounted (proc, sys, a bind-mounted /dev...)."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def safe_rmtree(path: Path) -> None:
    """rmtree that first unmounts, and refuses if anything is still mounted below ``path``.

    A chroot can contain a bind mount of the host's /dev; deleting through it would be a disaster.
    """
    if not path.exists():
        return
    unmount_all_under(path)
    left = mounts_under(path)
    if left:
        raise ImageBuildError(f"refusing to delete {path}: still mounted: {', '.join(left)}")
    shutil.rmtree(path)


# --- disk images -----------------------------------------------------------------------------


def make_ext4_qcow2(
    root: Path,
    out: Path,
    *,
    size: int,
    label: str,
    compress: bool = False,
    extra_mkfs_args: Sequence[str] = (),
) -> None:
    """Turn the directory ``root`` into a qcow2 holding a bare ext4 filesystem of ``size`` bytes.

    ``mkfs.ext4 -d`` populates the filesystem straight from the directory: no loop device, no
    mount, works in containers. No partition table, so growing the instance disk only needs
    ``resize2fs`` (which both images run at boot).
    """
    if mounts_under(root):
        raise ImageBuildError(f"{root} still has mounts below it: {mounts_under(root)}")
    raw = out.with_name(out.name + ".raw")
    with raw.open("wb") as f:
        f.truncate(size)  # sparse
    try:
        run(
            ["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0", *extra_mkfs_args, "-d", root, raw],
            what="mkfs.ext4",
        )
        convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
        if compress:
            # zstd: ~ as small as zlib but far cheaper to decompress when the guest reads it.
            convert += ["-c", "-o", "compression_type=zstd"]
        run([*convert, raw, out], what="qemu-img convert")
    finally:
        raw.unlink(missing_ok=True)


def write_file(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    path.chmod(mode)


@dataclass(frozen=True)
class BuildResult:
    manifest: Path
    built: bool  # False when the cached build was reused
