"""Composes the cloud: REST API, S3 endpoint, background workers, local host agent.

Nothing imports this module; it imports every service's public pieces.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI

from hackboot.core.app import build_app
from hackboot.core.config import get_settings
from hackboot.core.workers import Loop, Workers

log = logging.getLogger("hackboot.server")

# Each service exposes `router` in api.py; optional ones are skipped until they exist.
SERVICES = ["identity", "events", "catalog", "compute", "images", "volumes", "objectstore"]


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def routers() -> list[APIRouter]:
    found = []
    for service in SERVICES:
        api = _optional(f"hackboot.{service}.api")
        if api is not None and hasattr(api, "router"):
            found.append(api.router)
    return found


def create_app() -> FastAPI:
    return build_app(routers())


def prepare() -> str | None:
    """Migrate, seed the catalog, create the admin once. Returns a new admin password or None."""
    from hackboot.core.migrate import upgrade
    from hackboot.identity.service import bootstrap

    settings = get_settings()
    upgrade(settings.effective_database_url)
    for service in SERVICES:
        svc = _optional(f"hackboot.{service}.service")
        if svc is not None and hasattr(svc, "seed"):
            svc.seed()
    return bootstrap(settings.state_dir)


def background_loops() -> list[Loop]:
    loops: list[Loop] = []
    for service in SERVICES:
        svc = _optional(f"hackboot.{service}.service")
        if svc is not None and hasattr(svc, "loops"):
            loops.extend(svc.loops())
    return loops


def _server(app: Any, host: str, port: int) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve() -> None:
    settings = get_settings()
    workers = Workers()
    if settings.run_workers:
        for loop in background_loops():
            workers.start(loop)
    if settings.run_local_agent:
        agent = _optional("hackboot.compute.agent")
        if agent is not None and hasattr(agent, "start_local_agent"):
            agent.start_local_agent(workers)
    servers = [_server(create_app(), settings.api_host, settings.api_port)]
    s3 = _optional("hackboot.objectstore.s3app")
    if s3 is not None:
        servers.append(_server(s3.create_s3_app(), settings.s3_host, settings.s3_port))

    async def main() -> None:
        # Each uvicorn server catches SIGINT/SIGTERM for itself only: when one stops, stop all.
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        workers.stop()
