"""This machine's functions host, started by `hackboot serve` in its main process: the invoker (engine,
limits) behind its unix socket, and the trigger loops beside it."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
from pathlib import Path

import uvicorn

from hackboot.core.config import get_settings
from hackboot.core.workers import Workers
from hackboot.functions import invoker, runtimes, service, triggers

log = logging.getLogger("hackboot.functions")
_listeners: list[socket.socket] = []


def run_dir() -> Path:
    """Where the sandboxes find their bootstrap and code: outside the private state directory (whose parents
    the sandboxes' unprivileged account may not traverse), one per cloud on the machine."""
    state = str(Path(get_settings().state_dir).resolve())
    return Path("/var/tmp/hackboot-functions") / hashlib.sha256(state.encode()).hexdigest()[:16]


def register_runtimes() -> list[str]:
    """Tell the control plane which runtimes this machine has (before the API processes fork)."""
    names = [r.name for r in runtimes.detect()]
    service.register_runtime_source(lambda: list(names))
    return names


def start(workers: Workers) -> uvicorn.Server | None:
    """The invoker and the trigger loops; None (and a warning) when functions cannot run here."""
    settings = get_settings()
    if not settings.functions_enabled:
        return None
    if shutil.which("bwrap") is None:
        log.warning("functions are off on this machine: bubblewrap (bwrap) is not installed")
        return None
    inv = invoker.make_invoker(run_dir(), total=settings.functions_max_concurrency,
                               per_project=settings.functions_project_concurrency)
    invoker.set_local(inv)
    runner = triggers.Runner(workers=settings.functions_max_concurrency)
    for loop in runner.loops(lambda: inv.engine.reap(settings.functions_idle_s)):
        workers.start(loop)
    path = triggers.socket_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a previous run's
    # Bound here so it is private (0600) before anyone can connect (uvicorn would leave it to the umask).
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(512)
    config = uvicorn.Config(invoker.app(inv), fd=listener.fileno(), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    _listeners.append(listener)  # kept open (uvicorn serves from its descriptor)
    return uvicorn.Server(config)


def stop() -> None:
    """Stop the sandboxes and drop the code cache (rebuilt on demand at the next start)."""
    triggers.recorder.flush()
    inv = invoker.local()
    if inv is None:
        return
    invoker.set_local(None)
    inv.close()
    shutil.rmtree(run_dir(), ignore_errors=True)


def flush_records() -> None:
    """Write the invocation records this process still holds (an API process about to exit)."""
    triggers.recorder.flush()
