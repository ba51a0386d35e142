"""Composes the cloud: REST API, S3 endpoint, background workers, local host agent.

Nothing imports this module; it imports every service's public pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI

from hackboot.catalog import api as catalog_api
from hackboot.catalog import service as catalog_service
from hackboot.compute import api as compute_api
from hackboot.compute import service as compute_service
from hackboot.compute.agent import start_local_agent
from hackboot.core.app import build_app
from hackboot.core.config import get_settings
from hackboot.core.metrics import MetricSource
from hackboot.core.migrate import upgrade
from hackboot.core.privsep import die_with_parent
from hackboot.core.workers import Loop, Workers
from hackboot.events import api as events_api
from hackboot.events import service as events_service
from hackboot.functions import api as functions_api
from hackboot.functions import invoke_api as functions_invoke_api
from hackboot.functions import local as functions_local
from hackboot.functions import service as functions_service
from hackboot.identity import api as identity_api
from hackboot.identity import service as identity_service
from hackboot.images import api as images_api
from hackboot.images import service as images_service
from hackboot.loadbalancers import api as loadbalancers_api
from hackboot.loadbalancers import metrics as loadbalancers_metrics
from hackboot.loadbalancers import service as loadbalancers_service
from hackboot.network import api as network_api
from hackboot.network import service as network_service
from hackboot.objectstore import api as objectstore_api
from hackboot.objectstore import service as objectstore_service
from hackboot.objectstore.s3app import create_s3_app
from hackboot.volumes import api as volumes_api
from hackboot.volumes import service as volumes_service

log = logging.getLogger("hackboot.server")

# Every service's routes, in the order they are matched and documented.
ROUTERS: list[APIRouter] = [identity_api.router, events_api.router, catalog_api.router, compute_api.router,
                            images_api.router, volumes_api.router, network_api.router, loadbalancers_api.router,
                            objectstore_api.router, functions_api.router, functions_api.queue_router,
                            functions_invoke_api.router, functions_invoke_api.urls]
# Idempotent seeds, run at start after migrations.
SEEDS: list[Callable[[], object]] = [catalog_service.seed, images_service.seed]
# Background loops of the control plane (the host agents' reconcilers are started by the agents).
LOOPS: list[Callable[[], list[Loop]]] = [events_service.loops, catalog_service.loops, compute_service.loops,
                                         images_service.loops, volumes_service.loops, network_service.loops,
                                         loadbalancers_service.loops, objectstore_service.loops,
                                         functions_service.loops]


# Services' metrics read from their state when /metrics is scraped.
METRIC_SOURCES: list[MetricSource] = [loadbalancers_metrics.samples]


def routers() -> list[APIRouter]:
    return list(ROUTERS)


def create_app() -> FastAPI:
    return build_app(routers(), metric_sources=METRIC_SOURCES)


def prepare() -> str | None:
    """Migrate, seed the catalog and images, create the admin once. Returns a new admin password or None."""
    settings = get_settings()
    upgrade(settings.effective_database_url)
    for seed in SEEDS:
        seed()
    return identity_service.bootstrap(settings.state_dir)


def background_loops() -> list[Loop]:
    return [loop for service_loops in LOOPS for loop in service_loops()]


def _run(coro: Any) -> None:
    """Run on uvloop when installed (uvicorn[standard] brings it): noticeably faster I/O."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without it, small responses wait for delayed ACKs (40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _fork_api_workers(count: int, sock: socket.socket) -> list[int]:
    """Extra API processes sharing the listening socket: the kernel spreads connections.

    Python runs one request at a time per process (GIL), so one process per core is what
    makes the API use the machine. They fork before any thread starts, and serve HTTP only:
    reconcilers, workers and the S3 endpoint stay in the main process.
    """
    settings = get_settings()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                die_with_parent()
                server = _server(create_app(), settings.api_host, settings.api_port)
                _run(server.serve(sockets=[sock]))
            except BaseException:
                log.exception("API worker failed")
                code = 1
            finally:
                functions_local.flush_records()  # os._exit skips what atexit would do
                os._exit(code)
        pids.append(pid)
    return pids


def _stop_children(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _server(app: Any, host: str, port: int, *, s3: bool = False) -> uvicorn.Server:
    # Request heads are bounded (431) on every port: see core.httpproto.
    from hackboot.core import httpproto

    protocol = httpproto.S3CappedHttpToolsProtocol if s3 else httpproto.CappedHttpToolsProtocol
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, http=protocol,
                            h11_max_incomplete_event_size=httpproto.MAX_HEAD_BYTES)
    return uvicorn.Server(config)


def serve() -> None:
    settings = get_settings()
    from hackboot.core.db import dispose_engine

    dispose_engine()  # no connection may cross a fork
    functions_local.register_runtimes()  # before the fork: every API process validates runtimes the same way
    api_socket = _bind(settings.api_host, settings.api_port)
    children = _fork_api_workers(max(0, settings.api_workers - 1), api_socket)
    workers = Workers()
    if settings.run_workers:
        for loop in background_loops():
            workers.start(loop)
    if settings.run_local_agent:
        start_local_agent(workers)
    api = _server(create_app(), settings.api_host, settings.api_port)
    servers = [api, _server(create_s3_app(), settings.s3_host, settings.s3_port, s3=True)]
    invoker_server = functions_local.start(workers) if settings.run_workers else None
    if invoker_server is not None:  # this machine's function invoker, on its unix socket
        servers.append(invoker_server)

    async def main() -> None:
        # Each uvicorn server catches SIGINT/SIGTERM for itself only: when one stops, stop all.
        tasks = [asyncio.create_task(api.serve(sockets=[api_socket]))]
        tasks += [asyncio.create_task(server.serve()) for server in servers[1:]]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        _run(main())
    finally:
        _stop_children(children)
        workers.stop()
        functions_local.stop()
