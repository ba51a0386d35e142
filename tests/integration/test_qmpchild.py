"""The shared QMP helper process (core/qmpchild.py) as compute's block helper and volumes' storage daemon use it:
a monitor on an inherited socket pair, the unprivileged account with files passed as fds, errors with QEMU's
own words, a clean exit, and death with the thread that started it (no orphan holding images open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hackboot.compute.offline import BlockHelper, BlockJobError
from hackboot.core.privsep import unprivileged_account
from hackboot.core.qmpchild import QmpChild
from hackboot.volumes.storage import StorageDaemon, StorageError

SRC = Path(__file__).resolve().parents[2] / "src"


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting for a parent that is not us
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("helper", [BlockHelper, StorageDaemon])
def test_helper_runs_commands_and_quits(helper: type[QmpChild]) -> None:
    with helper() as h:
        assert h.proc is not None
        pid = h.proc.pid
        assert h.execute("query-version", None)["qemu"]["major"] >= 7
        with pytest.raises(helper.error, match=r"blockdev-del failed: .*nosuchnode"):
            h.execute("blockdev-del", {"node-name": "nosuchnode"})
    assert h.proc.poll() is not None and _gone(pid)


def test_block_helper_is_unprivileged_and_gets_files_as_fds(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    os.chmod(disk, 0o600)  # root's: the helper could not open it by name
    with BlockHelper(cpu_seconds=60) as h:
        assert h.proc is not None
        uid = int(next(ln for ln in Path(f"/proc/{h.proc.pid}/status").read_text().splitlines()
                       if ln.startswith("Uid:")).split()[1])
        assert uid == unprivileged_account().uid
        h.execute("blockdev-add", {"driver": "qcow2", "node-name": "d", "read-only": True,
                                   "file": {"driver": "file", "filename": str(disk)}})
        files = [n["image"]["filename"] for n in h.execute("query-named-block-nodes", {"flat": True})]
        assert files and all(f.startswith("/dev/fdset/") for f in files)
        with pytest.raises(BlockJobError, match="cannot open"):
            h.execute("blockdev-add", {"driver": "raw", "node-name": "x",
                                       "file": {"driver": "file", "filename": str(tmp_path / "missing")}})


def test_a_helper_that_cannot_start_says_why() -> None:
    class Broken(StorageDaemon):
        def argv(self, monitor_fd: int) -> list[str]:
            return ["qemu-storage-daemon", "--no-such-option"]

    with pytest.raises(StorageError, match=r"storage daemon did not start: .*no-such-option"), Broken():
        pass


CHILD = textwrap.dedent("""
    import sys, time
    from hackboot.volumes.storage import StorageDaemon
    from hackboot.compute.offline import BlockHelper
    with StorageDaemon() as d, BlockHelper(cpu_seconds=60) as b:
        print(d.proc.pid, b.proc.pid, flush=True)
        time.sleep(600)
""")


def test_helpers_die_with_the_process_that_started_them() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    agent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert agent.stdout is not None
        pids = [int(p) for p in agent.stdout.readline().split()]
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
        agent.send_signal(signal.SIGKILL)  # the agent dies without cleaning up
        agent.wait(30)
        assert all(_gone(p) for p in pids), "a helper outlived the agent that started it"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
