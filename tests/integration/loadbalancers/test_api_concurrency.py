"""Load balancers on both databases under concurrent requests: one port, one priority, one name per scope, and
quotas that hold, whatever the interleaving (the load balancer's row is locked by every change)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from hackboot.sdk import ApiError
from tests.integration.loadbalancers.lb_api_helpers import lb_network
from tests.integration.network.api_helpers import project_client, quota
from tests.support import Cloud


@pytest.fixture
def lb_cloud(any_cloud: Cloud) -> Iterator[Cloud]:
    """A cloud with a host up in PAR1-a: the local agent's (SQLite), or one registered for the test (PostgreSQL,
    which runs no agent; too small for any instance, removed afterwards)."""
    admin = any_cloud.admin_client_unscoped()
    if admin.hosts.list(zone="PAR1-a", status="up"):
        yield any_cloud
        return
    host = admin.hosts.register(f"lbhost-{uuid.uuid4().hex[:8]}", zone="PAR1-a", vcpus=1, memory_mb=256, disk_gb=1)
    try:
        yield any_cloud
    finally:
        admin.hosts.delete(host["id"])


def outcomes(calls: list[Callable[[], Any]]) -> list[int]:
    """Run the calls at once; each one's HTTP status (201/202 for a success)."""
    def one(call: Callable[[], Any]) -> int:
        try:
            call()
        except ApiError as e:
            return e.status
        return 200

    with ThreadPoolExecutor(len(calls)) as pool:
        return sorted(pool.map(one, calls))


def test_one_port_one_priority_one_name_under_concurrency(lb_cloud: Cloud) -> None:
    c = project_client(lb_cloud)
    _, subnet = lb_network(c, 72)
    lb = c.load_balancers.create("race", subnet["id"])
    pool = c.load_balancers.add_pool(lb["id"], "web")
    assert outcomes([lambda: c.load_balancers.add_listener(lb["id"], "http", 80)] * 6) == [200] + [409] * 5
    assert [x["port"] for x in c.load_balancers.listeners(lb["id"])] == [80]
    listener = c.load_balancers.listeners(lb["id"])[0]
    assert outcomes([lambda: c.load_balancers.add_rule(lb["id"], listener["id"], 7, "forward", path_prefix="/a",
                                                       pool=pool["id"])] * 6) == [200] + [409] * 5
    assert outcomes([lambda: c.load_balancers.add_member(lb["id"], pool["id"], 80, address="10.72.1.10")] * 6) == [
        200] + [409] * 5
    assert outcomes([lambda: c.load_balancers.create("same", subnet["id"])] * 4) == [200] + [409] * 3
    assert len(c.load_balancers.list(name="same")) == 1
    # the loser's VIP was not left behind: one interface per load balancer
    assert len(c.network_interfaces.list(subnet_id=subnet["id"])) == 2
    assert quota(c, "listeners")["used"] == 1 and quota(c, "members")["used"] == 1
    assert quota(c, "load_balancers")["used"] == 2 and quota(c, "network_interfaces")["used"] == 2


def test_quotas_hold_under_concurrency(lb_cloud: Cloud) -> None:
    c = project_client(lb_cloud)
    admin = lb_cloud.admin_client_unscoped()
    admin.projects.set_quota(c.project_id, "load_balancers", 3)  # type: ignore[attr-defined]
    admin.projects.set_quota(c.project_id, "pools", 2)  # type: ignore[attr-defined]
    _, subnet = lb_network(c, 73)
    names = [f"q{i}" for i in range(6)]
    assert outcomes([lambda n=n: c.load_balancers.create(n, subnet["id"]) for n in names]) == [200] * 3 + [403] * 3
    assert len(c.load_balancers.list()) == 3 and quota(c, "load_balancers")["used"] == 3
    assert len(c.network_interfaces.list(subnet_id=subnet["id"])) == 3
    lb = c.load_balancers.list()[0]
    assert outcomes([lambda n=n: c.load_balancers.add_pool(lb["id"], n) for n in names]) == [200] * 2 + [403] * 4
    assert len(c.load_balancers.pools(lb["id"])) == 2
