"""The S3 endpoint served by several processes sharing one listening socket.

Why several: a process parses HTTP and drives its hashing threads under one GIL, so one process
cannot use more than about a core; durable PUTs are CPU-bound on a small host.

What makes it safe:
- the start-up cleanup (`service.startup`: empty `objects/tmp`, drop orphan blobs) runs once, in the
  parent, before the fork: run later by a sibling it would destroy uploads in flight;
- the background workers (lifecycle, multipart and temp cleanup) run in the parent only;
- every process commits its own requests' metadata (group commit per process; on SQLite the
  processes take turns through a lock file), and fsyncs data before answering, so an acknowledged
  PUT survives the SIGKILL of any process;
- caches are per process and keyed on shared epochs: the auth epoch (keys, memberships, the public
  access switch) and the bucket epoch (bucket settings), so a change made through one process is
  seen by the next request to any other.
"""

from __future__ import annotations

import socket

import uvicorn

from hackboot.core import prefork
from hackboot.core.db import dispose_engine
from hackboot.objectstore import service
from hackboot.objectstore.s3app import create_s3_app


def s3_server(host: str, port: int) -> uvicorn.Server:
    # Request heads are bounded (431) as on every port: see core.httpproto.
    from hackboot.core import httpproto

    config = uvicorn.Config(create_s3_app(), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, http=httpproto.S3CappedHttpToolsProtocol,
                            h11_max_incomplete_event_size=httpproto.MAX_HEAD_BYTES)
    return uvicorn.Server(config)


def fork_s3_workers(sock: socket.socket, processes: int) -> list[int]:
    """Run the start-up cleanup, then fork `processes - 1` S3 servers on `sock` (the caller serves the
    last one itself, with `s3_server(...).serve(sockets=[sock])`). Call before any thread starts."""
    service.startup()
    dispose_engine()  # no database connection may cross a fork
    host, port = sock.getsockname()[:2]
    return prefork.fork_servers(max(0, processes - 1), sock, lambda: s3_server(host, port), "S3")
