"""Offline block work on guest disks in a throw-away, unprivileged, sandboxed QEMU.

A guest writes its disk, and with a QEMU escape its qcow2 metadata too: the agent must not parse
those files as root (``qemu-img`` as root on a crafted image is a parser bug away from the host).
So creating an overlay, growing a disk and flattening one into a snapshot run in a QEMU with no
guest (``-machine none``) started like the guests themselves: as the unprivileged account, under
the full seccomp sandbox, within ``prlimit`` CPU and memory limits. It is handed file descriptors
(QMP ``add-fd``), never paths, so it reaches exactly the files of the job: disks stay root's,
0600, in directories it cannot enter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from hackboot.compute.qemu import QEMU_BINARY, SANDBOX_OPTS, backing_chain
from hackboot.core.qmpchild import Execute, QmpChild

GiB = 1024**3


class BlockJobError(Exception):
    """The helper QEMU failed to start or a block operation failed; the message is for users."""


def chain_definition(node: str, chain: list[tuple[Path, str]], *, read_only: bool) -> dict[str, Any]:
    """blockdev-add arguments opening ``chain`` (top first, from ``qemu.backing_chain``) explicitly."""

    def layer(i: int) -> dict[str, Any]:
        path, fmt = chain[i]
        d: dict[str, Any] = {"driver": fmt, "node-name": node if i == 0 else f"{node}-b{i}",
                             "read-only": read_only or i > 0,
                             "file": {"driver": "file", "filename": str(path)}}
        if fmt == "qcow2":
            d["backing"] = layer(i + 1) if i + 1 < len(chain) else None
        return d

    return layer(0)


def virtual_size(execute: Execute, node: str, error: type[Exception] = BlockJobError) -> int:
    for n in execute("query-named-block-nodes", {"flat": True}):
        if n.get("node-name") == node:
            return int(n["image"]["virtual-size"])
    raise error(f"block node {node} not found")


class BlockHelper(QmpChild):
    """A QEMU with no guest, for one block operation (use as a context manager).

    Started like the guests (the unprivileged account, the full seccomp sandbox) within ``prlimit``
    limits, through :class:`hackboot.core.qmpchild.QmpChild`: ``execute`` sends QMP commands, and
    ``blockdev-add`` arguments may name files by path (they are opened here and passed as fds,
    read-write unless the node is read-only).
    """

    name = "block helper"
    error = BlockJobError

    def __init__(self, *, address_space: int = 4 * GiB, cpu_seconds: int = 6 * 3600,
                 start_timeout: float = 30.0) -> None:
        super().__init__(unprivileged=True, address_space=address_space, cpu_seconds=cpu_seconds,
                         start_timeout=start_timeout)

    def argv(self, monitor_fd: int) -> list[str]:
        return [shutil.which(QEMU_BINARY) or QEMU_BINARY, "-machine", "none", "-accel", "tcg,tb-size=1",
                "-nodefaults", "-no-user-config", "-display", "none", "-sandbox", SANDBOX_OPTS,
                "-chardev", f"socket,id=qmp,fd={monitor_fd}", "-mon", "chardev=qmp,mode=control"]

    def create_qcow2(self, path: Path, size: int, *, backing: Path | None = None,
                     backing_fmt: str | None = None, node: str = "new") -> str:
        """Create ``path`` (a new, empty file of ours) as a qcow2 image; returns its file node's name.

        A backing file is only recorded in the header, not opened.
        """
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.close(fd)
        file_node = f"{node}-file"
        self.execute("blockdev-add", {"driver": "file", "node-name": file_node, "filename": str(path)})
        options: dict[str, Any] = {"driver": "qcow2", "file": file_node, "size": size}
        if backing is not None:
            options |= {"backing-file": str(backing), "backing-fmt": backing_fmt or "raw"}
        self.run_job("blockdev-create", {"job-id": f"create-{node}", "options": options})
        return file_node


# ---------------------------------------------------------------------------------------------- operations


def create_overlay(out: Path, backing: Path, backing_fmt: str, size: int) -> None:
    """A new qcow2 ``out`` of ``size`` bytes on top of ``backing``.

    The backing chain is opened (read-only, by the helper) first, so a damaged image fails here
    with QEMU's own error rather than at the guest's start.
    """
    try:
        chain = backing_chain(backing, backing_fmt)
    except ValueError as exc:
        raise BlockJobError(str(exc)) from None
    with BlockHelper(cpu_seconds=120) as h:
        h.execute("blockdev-add", chain_definition("base", chain, read_only=True))
        h.create_qcow2(out, size, backing=backing, backing_fmt=backing_fmt)


def grow(disk: Path, size: int) -> None:
    """Grow the qcow2 ``disk`` (not its backing files, which are not opened) to ``size`` if smaller."""
    with BlockHelper(cpu_seconds=600) as h:
        h.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk", "backing": None,
                                   "file": {"driver": "file", "filename": str(disk)}})
        if virtual_size(h.execute, "disk") < size:
            h.execute("block_resize", {"node-name": "disk", "size": size})


def flatten(chain: list[tuple[Path, str]], out: Path, timeout: float = 6 * 3600) -> None:
    """Copy the disk ``chain`` (top first) as guests see it into a new standalone qcow2 ``out``."""
    with BlockHelper() as h:
        h.execute("blockdev-add", chain_definition("src", chain, read_only=True))
        size = virtual_size(h.execute, "src")
        target_file = h.create_qcow2(out, size, node="dst")
        h.execute("blockdev-add", {"driver": "qcow2", "node-name": "dst", "file": target_file})
        h.run_job("blockdev-backup", {"job-id": "flatten", "device": "src", "target": "dst", "sync": "full",
                                      "auto-dismiss": False}, timeout=timeout)
