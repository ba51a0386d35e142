"""Several processes serving one listening socket: the kernel hands each accepted connection to one of them.

Python runs one request at a time per process (GIL), so one process per core is what makes a server use
the machine. Children are forked before the parent starts any thread (a fork copies only the calling
thread, and a lock another thread held would stay locked in the child forever), serve HTTP only, and
die with the parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn

from hackboot.core.privsep import die_with_parent

log = logging.getLogger("hackboot.prefork")


def run(coro: Coroutine[Any, Any, Any]) -> None:
    """Run on uvloop when installed (uvicorn[standard] brings it): noticeably faster I/O."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, small responses wait for delayed ACKs (40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def fork_servers(count: int, sock: socket.socket, make_server: Callable[[], uvicorn.Server], what: str,
                 at_exit: Callable[[], None] | None = None) -> list[int]:
    """Fork `count` processes that serve `make_server()` on `sock` until stopped; returns their pids."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                die_with_parent()
                run(make_server().serve(sockets=[sock]))
            except BaseException:
                log.exception("%s worker failed", what)
                code = 1
            finally:
                if at_exit is not None:
                    at_exit()  # os._exit skips what atexit would do
                os._exit(code)
        pids.append(pid)
    return pids


def stop_children(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
