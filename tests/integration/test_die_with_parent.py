"""core.privsep.die_with_parent: a helper dies with the process that started it, even when that one is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

# The middle process: starts a long sleep with die_with_parent, says its pid, then waits to be killed.
MIDDLE = """
import subprocess, sys, time
from hackboot.core.privsep import die_with_parent
child = subprocess.Popen(["sleep", "300"], preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie waiting for init's reap is dead
    except FileNotFoundError:
        return False


def test_a_helper_is_killed_when_its_parent_is_killed() -> None:
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert middle.stdout is not None
        child = int(middle.stdout.readline())
        assert _alive(child)
        middle.kill()
        middle.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the helper outlived the process that started it"
    finally:
        middle.kill()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
