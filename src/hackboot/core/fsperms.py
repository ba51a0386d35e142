"""Permissions of the state directory: tenant data is readable by the cloud's accounts only.

The database (with small objects inline), the master key, images, disks and object data live
under `state_dir`. Processes of the cloud run with `UMASK`: new files are 0600 and new
directories 0711, traversable but not listable, so the unprivileged guest account can still
reach a file it owns below the state directory by its path, without being able to list or
read anything else. At start, existing entries are tightened the same way: group and other
bits are removed (directories keep their execute bits) and owners are never changed. Files
with several hard links are left alone: their inode may be shared with a file outside the
state directory (built-in images are linked from their build directory). A group granted on
purpose (the unprivileged account's own group) keeps its bits.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import stat
from pathlib import Path

log = logging.getLogger("hackboot.fsperms")

UMASK = 0o066
MARKER = ".permissions"
MARKER_VERSION = "1"
# Always re-checked at start, whatever the marker says: what a leak would matter most for.
SENSITIVE = ("hackboot.db", "hackboot.db-wal", "hackboot.db-shm", "master.key", "initial-admin-password")


def restrict_umask() -> None:
    """Called first thing by processes that write state: files 0600, directories 0711."""
    os.umask(UMASK)


def _shared_gid(unprivileged_user: str) -> int | None:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(unprivileged_user).pw_gid
    with contextlib.suppress(KeyError):
        return grp.getgrnam(unprivileged_user).gr_gid
    return None


def _tighten(path: str, st: os.stat_result, shared_gid: int | None) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        drop = 0o066 if st.st_gid != shared_gid else 0o006  # keep x: traversal to the guest's files
    elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        # A hard link may share its inode with a file outside the state directory (built-in
        # images are linked from their build directory): its mode is not ours to change.
        return
    elif stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        drop = 0o077 if st.st_gid != shared_gid else 0o007
    else:
        return
    if mode & drop:
        try:
            os.chmod(path, mode & ~drop)
        except OSError as exc:  # e.g. a file another process removed meanwhile
            log.debug("cannot tighten %s: %s", path, exc)


def _tighten_tree(root: Path, shared_gid: int | None) -> None:
    stack = [str(root)]
    while stack:
        current = stack.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue  # never follow: a link may point out of the state directory
            _tighten(entry.path, st, shared_gid)
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)


def secure_state_dir(state_dir: Path, unprivileged_user: str = "") -> None:
    """Tighten the state directory and everything in it (the full walk once, then the essentials)."""
    shared_gid = _shared_gid(unprivileged_user) if unprivileged_user else None
    state_dir.mkdir(parents=True, exist_ok=True)
    _tighten(str(state_dir), os.stat(state_dir), shared_gid)
    marker = state_dir / MARKER
    done = marker.exists() and marker.read_text().strip() == MARKER_VERSION
    if not done:
        _tighten_tree(state_dir, shared_gid)
        marker.write_text(MARKER_VERSION + "\n")
        return
    for entry in os.scandir(state_dir):  # top level: files an operator may have copied in since
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                _tighten(entry.path, st, shared_gid)
    for name in SENSITIVE:
        with contextlib.suppress(FileNotFoundError):
            _tighten(str(state_dir / name), os.lstat(state_dir / name), shared_gid)
