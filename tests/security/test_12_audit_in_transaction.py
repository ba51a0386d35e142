"""Finding 12: every acknowledged change has its audit record, even when the server is killed.

A burst of creates (key pairs by a tenant, projects by the admin) runs against a dedicated
cloud; the instant one of them is acknowledged, the server is killed with SIGKILL. After a
restart, every request that was answered with a success has its audit record (matched by the
request id the answer carried), with the right user and status.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.security.conftest import make_tenant
from tests.support import make_cloud

WARM_UP_ACKS = 12  # let the burst run a little, then kill on the next acknowledgement


def test_acknowledged_creates_survive_sigkill_with_their_audit_record(tmp_path: Path) -> None:
    cloud = make_cloud(tmp_path / "audit", HACKBOOT_RUN_LOCAL_AGENT="false")
    cloud.start()
    try:
        tenant = make_tenant(cloud, "member")
        acked: list[tuple[str, str, int, str]] = []  # (request id, user id, status, path)
        lock = threading.Lock()
        killed = threading.Event()

        def burst(token: str, user_id: str, path: str, project: str | None) -> None:
            headers = {"Authorization": f"Bearer {token}"} | ({"X-Hackboot-Project": project} if project else {})
            with httpx.Client(base_url=cloud.url, headers=headers, timeout=10) as http:
                while not killed.is_set():
                    try:
                        resp = http.post(path, json={"name": f"a-{uuid.uuid4().hex[:10]}"})
                    except httpx.TransportError:
                        return
                    if resp.status_code in (200, 201):
                        with lock:
                            acked.append((resp.headers["x-request-id"], user_id, resp.status_code, path))
                            if len(acked) > WARM_UP_ACKS and not killed.is_set():
                                killed.set()
                                cloud.kill()  # right after an acknowledgement, requests still in flight

        admin_id = cloud.admin_client_unscoped().get("/v1/auth/whoami")["user_id"]
        threads = [threading.Thread(target=burst, args=(tenant.token, tenant.user_id, "/v1/keypairs", None))
                   for _ in range(3)]
        threads += [threading.Thread(target=burst, args=(cloud.admin_token, admin_id, "/v1/projects", None))
                    for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert killed.is_set() and len(acked) > WARM_UP_ACKS

        cloud.start()
        engine = create_engine(f"sqlite:///{cloud.state_dir / 'hackboot.db'}")
        with engine.connect() as conn:
            rows = {r[0]: r[1:] for r in conn.execute(text(
                "SELECT request_id, user_id, status_code, method, path FROM audit_log"))}
        engine.dispose()
        missing = [a for a in acked if a[0] not in rows]
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged creates have no audit record"
        for request_id, user_id, status, path in acked:
            assert rows[request_id] == (user_id, status, "POST", path)
    finally:
        cloud.stop()
