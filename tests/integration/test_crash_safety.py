"""Killing the control plane mid-request leaves no half-written resource."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.support import make_cloud


def test_sigkill_during_creates_leaves_only_whole_projects(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path / "crash", HACKBOOT_RUN_LOCAL_AGENT="false")
    cloud.start()
    headers = {"Authorization": f"Bearer {cloud.admin_token}"}
    acknowledged: list[str] = []
    stop = threading.Event()

    def create_many() -> None:
        with httpx.Client(base_url=cloud.url, headers=headers, timeout=5) as http:
            while not stop.is_set():
                name = f"crash-{uuid.uuid4().hex[:10]}"
                try:
                    resp = http.post("/v1/projects", json={"name": name})
                except httpx.TransportError:
                    return
                if resp.status_code == 201:
                    acknowledged.append(resp.json()["id"])

    threads = [threading.Thread(target=create_many) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    cloud.kill()  # SIGKILL while requests are in flight
    stop.set()
    for t in threads:
        t.join()
    assert acknowledged, "no request completed before the kill"

    cloud.start()  # same state dir: migrations are idempotent, admin reused
    engine = create_engine(f"sqlite:///{cloud.state_dir / 'hackboot.db'}")
    with engine.connect() as conn:
        projects = {r[0] for r in conn.execute(text("SELECT id FROM projects"))}
        with_member = {r[0] for r in conn.execute(text("SELECT project_id FROM memberships"))}
        quota_rows = dict(conn.execute(text("SELECT project_id, COUNT(*) FROM quota_usage GROUP BY project_id"))
                          .all())
        events = {r[0] for r in conn.execute(text("SELECT resource_id FROM events WHERE type='project.created'"))}
    engine.dispose()
    # Every acknowledged project survived; every project that exists is whole.
    assert set(acknowledged) <= projects
    for pid in projects:
        assert pid in with_member and pid in events, pid
        assert quota_rows.get(pid, 0) > 0, pid
    cloud.stop()
