"""Composes the cloud: REST API, S3 endpoint, background workers, local host agent.

Nothing imports this module; it imports every service's public pieces.
"""

from __future__ import annotations

import asyncio
import logging
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
from hackboot.core import prefork
from hackboot.core.app import build_app
from hackboot.core.config import get_settings
from hackboot.core.metrics import MetricSource
from hackboot.core.migrate import upgrade
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
from hackboot.objectstore.serve import fork_s3_workers, s3_server
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


def _fork_api_workers(count: int, sock: socket.socket) -> list[int]:
    """Extra API processes sharing the listening socket (see core.prefork). They serve HTTP only:
    reconcilers, workers and the S3 endpoint's background work stay in the main process."""
    settings = get_settings()
    return prefork.fork_servers(count, sock, lambda: _server(create_app(), settings.api_host, settings.api_port),
                                "API", at_exit=functions_local.flush_records)


def _server(app: Any, host: str, port: int) -> uvicorn.Server:
    # Request heads are bounded (431) on every port: see core.httpproto.
    from hackboot.core import httpproto

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, http=httpproto.CappedHttpToolsProtocol,
                            h11_max_incomplete_event_size=httpproto.MAX_HEAD_BYTES)
    return uvicorn.Server(config)


def serve() -> None:
    settings = get_settings()
    from hackboot.core.db import dispose_engine

    dispose_engine()  # no connection may cross a fork
    functions_local.register_runtimes()  # before the fork: every API process validates runtimes the same way
    api_socket = prefork.bind(settings.api_host, settings.api_port)
    s3_socket = prefork.bind(settings.s3_host, settings.s3_port)
    children = _fork_api_workers(max(0, settings.api_workers - 1), api_socket)
    children += fork_s3_workers(s3_socket, settings.s3_workers)
    workers = Workers()
    if settings.run_workers:
        for loop in background_loops():
            workers.start(loop)
    if settings.run_local_agent:
        start_local_agent(workers)
    api = _server(create_app(), settings.api_host, settings.api_port)
    s3 = s3_server(settings.s3_host, settings.s3_port)
    servers = [api, s3]
    invoker_server = functions_local.start(workers) if settings.run_workers else None
    if invoker_server is not None:  # this machine's function invoker, on its unix socket
        servers.append(invoker_server)

    async def main() -> None:
        # Each uvicorn server catches SIGINT/SIGTERM for itself only: when one stops, stop all.
        tasks = [asyncio.create_task(api.serve(sockets=[api_socket])),
                 asyncio.create_task(s3.serve(sockets=[s3_socket]))]
        tasks += [asyncio.create_task(server.serve()) for server in servers[2:]]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        prefork.run(main())
    finally:
        prefork.stop_children(children)
        workers.stop()
        functions_local.stop()
