"""Hosts that stop sending heartbeats go down, and come back up with the next one.

Runs a dedicated control plane with HACKBOOT_HOST_DOWN_AFTER_S=2 (the shared one uses 30 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from hackboot.core.db import make_engine
from hackboot.events.models import Event
from hackboot.sdk import Client
from tests.integration.catalog.conftest import database_url, unique
from tests.support import Cloud, make_cloud


@pytest.fixture(scope="module")
def fast_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    c = make_cloud(tmp_path_factory.mktemp("liveness"), HACKBOOT_HOST_DOWN_AFTER_S="2",
                   HACKBOOT_RUN_LOCAL_AGENT="false")
    c.start()
    yield c
    c.stop()


def _wait_status(admin: Client, host_id: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        host = admin.hosts.get(host_id)  # type: ignore[attr-defined]
        if host["status"] == status:
            return host  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"host still {host['status']} after {timeout}s"
        time.sleep(0.2)


def _events(cloud: Cloud, host_id: str) -> list[Event]:
    engine = make_engine(database_url(cloud))
    try:
        with Session(engine) as s:
            return list(s.scalars(select(Event).where(Event.resource_id == host_id).order_by(Event.seq)))
    finally:
        engine.dispose()


def test_missing_heartbeats_mark_a_host_down_and_a_heartbeat_brings_it_back(fast_cloud: Cloud) -> None:
    admin = fast_cloud.admin_client_unscoped()
    host = admin.hosts.register(unique("hv"), zone="PAR1-a", vcpus=8, memory_mb=16384, disk_gb=100)  # type: ignore[attr-defined]
    assert host["status"] == "up"
    started = time.monotonic()
    down = _wait_status(admin, host["id"], "down")
    assert time.monotonic() - started >= 1.5  # not before the threshold
    assert "No heartbeat" in down["status_reason"] and "2s" in down["status_reason"]
    assert down["generation"] > host["generation"]  # in-flight claims on it fail their compare-and-swap
    cap = admin.capacity.report(zone="PAR1-a")  # type: ignore[attr-defined]
    assert cap["total"]["hosts"]["down"] >= 1
    beat = admin.hosts.heartbeat(host["id"], {"kernel": "6.1"})  # type: ignore[attr-defined]
    assert beat["status"] == "up"
    up = admin.hosts.get(host["id"])  # type: ignore[attr-defined]
    assert (up["status"], up["status_reason"], up["facts"]) == ("up", "", {"kernel": "6.1"})
    # keep it alive with heartbeats: it stays up past the threshold
    for _ in range(6):
        admin.hosts.heartbeat(host["id"])  # type: ignore[attr-defined]
        time.sleep(0.5)
    assert admin.hosts.get(host["id"])["status"] == "up"  # type: ignore[attr-defined]
    _wait_status(admin, host["id"], "down")
    types = [e.type for e in _events(fast_cloud, host["id"])]
    assert types == ["host.registered", "host.down", "host.up", "host.down"]
    down_event = _events(fast_cloud, host["id"])[1]
    assert down_event.project_id is None and down_event.data["threshold_s"] == 2.0
    # re-registration (an agent restarting) also counts as a heartbeat
    again = admin.hosts.register(host["name"], zone="PAR1-a", vcpus=8, memory_mb=16384, disk_gb=100)  # type: ignore[attr-defined]
    assert again["status"] == "up"
    admin.hosts.delete(host["id"])  # type: ignore[attr-defined]


def test_a_disabled_host_stays_disabled_and_enabling_a_silent_host_leaves_it_down(fast_cloud: Cloud) -> None:
    admin = fast_cloud.admin_client_unscoped()
    host = admin.hosts.register(unique("hv"), zone="PAR1-b", vcpus=8, memory_mb=16384, disk_gb=100)  # type: ignore[attr-defined]
    admin.hosts.disable(host["id"], "maintenance")  # type: ignore[attr-defined]
    time.sleep(3.5)
    assert admin.hosts.get(host["id"])["status"] == "disabled"  # type: ignore[attr-defined]
    enabled = admin.hosts.enable(host["id"])  # type: ignore[attr-defined]
    assert enabled["status"] == "down" and "no recent heartbeat" in enabled["status_reason"]
    assert admin.hosts.heartbeat(host["id"])["status"] == "up"  # type: ignore[attr-defined]
    admin.hosts.delete(host["id"])  # type: ignore[attr-defined]
