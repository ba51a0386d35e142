"""A QEMU helper process driven over QMP, for one piece of block work, then gone.

Several services start a short-lived QEMU program (a guest-less ``qemu-system-*``, a
``qemu-storage-daemon``) only to run a few QMP commands and block jobs. :class:`QmpChild` is that
process's whole life, shared by all of them:

* its monitor is one end of a socket pair it inherits (no socket file to place, secure or clean up;
  no waiting for one to appear);
* it is killed with the thread that started it (``PR_SET_PDEATHSIG``, :func:`privsep.die_with_parent`),
  so an agent killed mid-job leaves no orphan holding images open;
* optionally it runs as the unprivileged account under ``prlimit`` CPU and memory limits
  (:mod:`hackboot.core.privsep`) and then, since it may not open the host's files itself, the
  ``{"driver": "file", "filename": ...}`` nodes of a ``blockdev-add`` are opened here and handed to
  it as fd sets;
* leaving the ``with`` block quits it (``quit``, then SIGKILL of our own child if it lingers).

Also here, because every QMP user needs them: :func:`wait_job` (follow a block job to its end) and
:func:`file_nodes`. Knows no service.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from qemu.qmp import QMPError

from hackboot.core.privsep import die_with_parent, limited_argv, unprivileged_account

GiB = 1024**3
Execute = Callable[[str, dict[str, Any] | None], Any]


class QmpChildError(Exception):
    """The helper failed to start, died, or a command failed; the message is meant for users."""


def file_nodes(tree: Any) -> list[dict[str, Any]]:
    """The ``{"driver": "file", "filename": <path>}`` nodes of blockdev-add arguments (at any depth)."""
    found: list[dict[str, Any]] = []
    if isinstance(tree, dict):
        name = tree.get("filename")
        if tree.get("driver") == "file" and isinstance(name, str) and not name.startswith("/dev/fdset/"):
            found.append(tree)
        for value in tree.values():
            found += file_nodes(value)
    elif isinstance(tree, list):
        for value in tree:
            found += file_nodes(value)
    return found


def wait_job(execute: Execute, job_id: str, timeout: float,
             error: type[Exception] = QmpChildError) -> None:
    """Wait for a block job started with ``auto-dismiss: false`` to conclude; dismiss it; raise its error.

    A job that outlives ``timeout`` seconds is cancelled. Errors are raised as ``error`` (the caller's
    own exception type, whose message users see).
    """
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["id"]: j for j in execute("query-jobs", None)}
        job = jobs.get(job_id)
        if job is None:
            return
        if job["status"] == "concluded":
            execute("job-dismiss", {"id": job_id})
            if job.get("error"):
                raise error(f"{job['type']} failed: {job['error']}")
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(Exception):
                execute("job-cancel", {"id": job_id, "force": True})
            raise error(f"{job['type']} did not finish within {timeout:.0f}s")
        time.sleep(0.05)


class QmpChild:
    """One helper process (use as a context manager); subclasses say what to run in :meth:`argv`.

    :param unprivileged: run as the unprivileged account (see the module docstring) and pass it the
        files of ``blockdev-add`` file nodes as fds.
    :param address_space, cpu_seconds: ``prlimit`` limits (with ``unprivileged``).
    """

    #: How messages name the process.
    name = "QEMU helper"
    #: The exception raised for failures (a subclass may use its service's own).
    error: type[Exception] = QmpChildError

    def __init__(self, *, unprivileged: bool = False, address_space: int = 4 * GiB, cpu_seconds: int = 6 * 3600,
                 start_timeout: float = 30.0, command_timeout: float = 600.0) -> None:
        self.unprivileged = unprivileged
        self.address_space = address_space
        self.cpu_seconds = cpu_seconds
        self.start_timeout = start_timeout
        self.command_timeout = command_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Any = None
        self.err: IO[bytes] | None = None

    def argv(self, monitor_fd: int) -> list[str]:
        """The command line; its QMP monitor must serve the inherited socket ``monitor_fd``."""
        raise NotImplementedError

    # --- life ---------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.err = tempfile.TemporaryFile()
        try:
            argv = self.argv(theirs.fileno())
            switch: dict[str, Any] = {}
            if self.unprivileged:
                argv = limited_argv(argv, address_space=self.address_space, cpu_seconds=self.cpu_seconds)
                account = unprivileged_account()
                if not account.is_current:
                    switch = {"user": account.uid, "group": account.gid, "extra_groups": []}
            # die_with_parent runs after subprocess switched user (a credential change clears it)
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err,
                                         close_fds=True, pass_fds=(theirs.fileno(),), cwd="/",
                                         preexec_fn=die_with_parent, **switch)
        except OSError as exc:
            ours.close()
            self._cleanup()
            raise self.error(f"the {self.name} did not start: {exc}") from None
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
            self.qmp.settimeout(self.command_timeout)
        except Exception as exc:
            err = self._stderr()
            ours.close()
            self._cleanup()
            raise self.error(f"the {self.name} did not start: {err or exc}") from None
        return self

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

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # our own child, by pid
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.err is not None:
            self.err.close()
            self.err = None

    def _stderr(self) -> str:
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2)
        try:
            assert self.err is not None
            self.err.seek(0)
            return self.err.read().decode(errors="replace").strip()[-400:]
        except (OSError, AssertionError, ValueError):
            return ""

    # --- commands -----------------------------------------------------------------------------------

    def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command; its ``return`` value, or ``error`` with QEMU's message."""
        if command == "blockdev-add" and args and self.unprivileged:
            args = json.loads(json.dumps(args))  # a private copy we can rewrite
            modes = [os.O_RDONLY] if args.get("read-only") else [os.O_RDWR, os.O_RDONLY]
            for node in file_nodes(args):
                node["filename"] = f"/dev/fdset/{self._add_fds(Path(node['filename']), modes)}"
        try:
            resp = self.qmp.cmd_raw(command, args)
        except (QMPError, OSError, EOFError) as exc:  # it died (a crafted image, a limit hit)
            raise self.error(f"{command}: the {self.name} failed: {self._stderr() or exc}") from None
        if "error" in resp:
            raise self.error(f"{command} failed: {resp['error'].get('desc', resp['error'])}")
        return resp.get("return")

    def _add_fds(self, path: Path, modes: list[int]) -> int:
        """Open ``path`` once per mode and hand the fds to the helper as one fd set."""
        fdset: int | None = None
        for mode in modes:
            try:
                fd = os.open(path, mode | os.O_CLOEXEC)
            except OSError as exc:
                raise self.error(f"cannot open {path}: {exc.strerror}") from None
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
        """Start a block job and wait for it to conclude.

        The job must stay until dismissed: ``blockdev-create`` jobs do; others need
        ``"auto-dismiss": False`` in ``args`` (else a failure would go unseen).
        """
        self.execute(command, args)
        wait_job(self.execute, args["job-id"], timeout, self.error)
