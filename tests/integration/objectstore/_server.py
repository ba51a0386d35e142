"""Run the S3 endpoint (its `s3_workers` processes) and the object-storage REST API, as `hackboot serve` does.

usage: python -m tests.integration.objectstore._server S3_PORT API_PORT   (env: HACKBOOT_STATE_DIR …)
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn

from hackboot.core import prefork
from hackboot.core.app import build_app
from hackboot.core.config import get_settings
from hackboot.core.workers import Workers
from hackboot.identity.api import router as identity_router
from hackboot.objectstore.api import router
from hackboot.objectstore.serve import fork_s3_workers, s3_server
from hackboot.objectstore.service import loops


def provision() -> None:
    """Migrate, bootstrap, and issue credentials through the service layer; print them as JSON."""
    import json

    from sqlalchemy import select

    from hackboot.core.auth import Principal
    from hackboot.core.config import get_settings
    from hackboot.core.db import session_scope
    from hackboot.core.migrate import upgrade
    from hackboot.identity import service as identity
    from hackboot.identity.models import Project, User
    from hackboot.objectstore import service

    settings = get_settings()
    upgrade(settings.effective_database_url)
    identity.bootstrap(settings.state_dir)
    with session_scope(write=False) as s:
        admin = s.scalar(select(User).where(User.username == "admin"))
        project = s.scalar(select(Project).where(Project.name == "default"))
        assert admin is not None and project is not None
        admin_id, project_id = admin.id, project.id
    p = Principal(user_id=admin_id, username="admin", token_id="", role="admin", is_superuser=True, project_id=None)
    other = identity.create_project(p, "other", "second project", None)
    token = identity.create_token(p, project_id=project_id, role="admin", name="tests", user_id=None,
                                  expires_in_hours=24)
    main_cred = service.create_credential(project_id, admin_id, name="main")
    other_cred = service.create_credential(other.id, admin_id, name="other")
    ro = service.create_credential(project_id, admin_id, name="ro", read_only=True)
    limited = service.create_credential(project_id, admin_id, name="limited", buckets=["limited-bucket"])
    out = {"project_id": project_id, "user_id": admin_id, "other_project_id": other.id, "token": token.secret,
           "ak": main_cred.credential.access_key, "sk": main_cred.secret_key,
           "ak2": other_cred.credential.access_key, "sk2": other_cred.secret_key,
           "ak_ro": ro.credential.access_key, "sk_ro": ro.secret_key,
           "ak_lim": limited.credential.access_key, "sk_lim": limited.secret_key}
    print("PROVISIONED " + json.dumps(out))


def main() -> None:
    if sys.argv[1] == "provision":
        provision()
        return
    s3_port, api_port = int(sys.argv[1]), int(sys.argv[2])
    # As `hackboot serve`: the S3 processes fork before any thread starts; background work stays here.
    s3_socket = prefork.bind("127.0.0.1", s3_port)
    children = fork_s3_workers(s3_socket, get_settings().s3_workers)
    workers = Workers()
    for loop in loops():
        workers.start(loop)
    servers = [
        s3_server("127.0.0.1", s3_port),
        uvicorn.Server(uvicorn.Config(build_app([identity_router, router]), host="127.0.0.1", port=api_port,
                                      log_level="warning", access_log=False)),
    ]

    async def run() -> None:
        tasks = [asyncio.create_task(servers[0].serve(sockets=[s3_socket])), asyncio.create_task(servers[1].serve())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        prefork.run(run())
    finally:
        prefork.stop_children(children)
        workers.stop()


if __name__ == "__main__":
    main()
