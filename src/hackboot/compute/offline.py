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

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPError

from hackboot.compute.qemu import QEMU_BINARY, SANDBOX_OPTS, backing_chain, file_nodes
from hackboot.core.privsep import die_with_parent, limited_argv, unprivileged_account

GiB = 1024**3


class BlockJobError(Exception):
    """The helper QEMU failed to start or a block operation failed; the message is for users."""


def wait_job(execute: Any, job_id: str, timeout: float) -> None:
    """Wait for a manually dismissed block job to conclude; dismiss it; raise its error if any."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["id"]: j for j in execute("query-jobs", None)}
        job = jobs.get(job_id)
        if job is None:
            return
        if job["status"] == "concluded":
            execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise BlockJobError(f"{job['type']} failed: {job['error']}")
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                execute("job-cancel", {"id": job_id, "force": True})
            raise BlockJobError(f"{job['type']} did not finish within {timeout:.0f}s")
        time.sleep(0.05)


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


def virtual_size(execute: Any, node: str) -> int:
    for n in execute("query-named-block-nodes", {"flat": True}):
        if n.get("node-name") == node:
            return int(n["image"]["virtual-size"])
    raise BlockJobError(f"block node {node} not found")


class BlockHelper:
    """A QEMU with no guest, for one block operation (use as a context manager).

    Its QMP monitor is one end of a socket pair (no socket file). ``execute`` sends QMP
    commands; ``blockdev-add`` arguments may name files by path: they are opened here and
    passed as fds (read-write unless the node is read-only).
    """

    def __init__(self, *, address_space: int = 4 * GiB, cpu_seconds: int = 6 * 3600,
                 start_timeout: float = 30.0) -> None:
        self.address_space = address_space
        self.cpu_seconds = cpu_seconds
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Any = None
        self.err: Any = None

    def __enter__(self) -> BlockHelper:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.err = tempfile.TemporaryFile()
        try:
            argv = [shutil.which(QEMU_BINARY) or QEMU_BINARY, "-machine", "none", "-accel", "tcg,tb-size=1",
                    "-nodefaults", "-no-user-config", "-display", "none", "-sandbox", SANDBOX_OPTS,
                    "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"]
            account = unprivileged_account()
            switch: dict[str, Any] = {} if account.is_current else {
                "user": account.uid, "group": account.gid, "extra_groups": []}
            self.proc = subprocess.Popen(
                limited_argv(argv, address_space=self.address_space, cpu_seconds=self.cpu_seconds),
                stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err, close_fds=True,
                pass_fds=(theirs.fileno(),), cwd="/", preexec_fn=die_with_parent, **switch)
        except BaseException:
            ours.close()
            self._cleanup()
            raise
        finally:
            theirs.close()
        try:
            self.qmp = QEMUMonitorProtocol(ours)
            self.qmp.settimeout(self.start_timeout)
            self.qmp.connect()
            self.qmp.settimeout(600)
        except Exception as exc:
            err = self._stderr()
            ours.close()
            self._cleanup()
            raise BlockJobError(f"the block helper did not start: {err or exc}") from None
        return self

    def _stderr(self) -> str:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
        try:
            self.err.seek(0)
            return bytes(self.err.read()).decode(errors="replace").strip()[-400:]
        except (OSError, AttributeError, ValueError):
            return ""

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if command == "blockdev-add" and args:
            args = json.loads(json.dumps(args))
            modes = [os.O_RDONLY] if args.get("read-only") else [os.O_RDWR, os.O_RDONLY]
            for node in file_nodes(args):
                node["filename"] = f"/dev/fdset/{self._add_fds(Path(node['filename']), modes)}"
        try:
            resp = self.qmp.cmd_raw(command, args)
        except (QMPError, OSError, EOFError) as exc:  # it died (a crafted image, a limit hit)
            raise BlockJobError(f"{command}: the block helper failed: {self._stderr() or exc}") from None
        if "error" in resp:
            raise BlockJobError(f"{command} failed: {resp['error'].get('desc', resp['error'])}")
        return resp.get("return")

    def _add_fds(self, path: Path, modes: list[int]) -> int:
        fdset: int | None = None
        for mode in modes:
            fd = os.open(path, mode | os.O_CLOEXEC)
            try:
                self.qmp.send_fd_scm(fd)
                args: dict[str, Any] = {"opaque": f"hackboot:{path}"}
                if fdset is not None:
                    args["fdset-id"] = fdset
                fdset = int(self.execute("add-fd", args)["fdset-id"])
            finally:
                os.close(fd)
        assert fdset is not None
        return fdset

    def run_job(self, command: str, args: dict[str, Any], timeout: float = 6 * 3600) -> None:
        self.execute(command, args)
        wait_job(self.execute, args["job-id"], timeout)

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

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own child, by pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.err is not None:
            self.err.close()
            self.err = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    self.qmp.cmd_raw("quit", None)
                with contextlib.suppress(Exception):
                    self.qmp.close()
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(30)
        finally:
            self._cleanup()


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
