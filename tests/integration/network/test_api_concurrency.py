"""Concurrent requests against the real server on SQLite and on PostgreSQL: IPAM hands out each address
once, the default VPC is made once, overlapping subnets and per-group rule quotas hold, floating IPs are
distinct."""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hackboot.sdk import ApiError, Client
from tests.integration.network.api_helpers import project_client, quota, vpc_with_subnet
from tests.support import Cloud


def burst(cloud: Cloud, project_id: str, n: int, call: Callable[[Client, int], Any]) -> list[Any]:
    """`call(client, i)` from n threads at once, each with its own connection; results or ApiErrors."""
    clients = [cloud.client(project=project_id) for _ in range(n)]

    def one(i: int) -> Any:
        try:
            return call(clients[i], i)
        except ApiError as exc:
            return exc

    try:
        with ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(one, range(n)))
    finally:
        for client in clients:
            client.close()


def outcome(results: list[Any]) -> Counter[str]:
    return Counter("ok" if not isinstance(r, ApiError) else f"{r.status} {r.code}" for r in results)


def test_50_concurrent_interfaces_on_a_28_get_the_12_free_addresses_once(any_cloud: Cloud) -> None:
    c = project_client(any_cloud)
    _, subnet = vpc_with_subnet(c, "10.50.0.0/16", "10.50.7.0/28")
    results = burst(any_cloud, c.project_id, 50,  # type: ignore[attr-defined]
                    lambda cl, i: cl.network_interfaces.create(subnet["id"]))
    assert outcome(results) == {"ok": 12, "409 subnet_full": 38}, outcome(results)
    made = [r for r in results if not isinstance(r, ApiError)]
    addresses = [r["private_ip"] for r in made]
    assert sorted(addresses, key=ipaddress.ip_address) == [f"10.50.7.{i}" for i in range(3, 15)]
    assert len({r["mac"] for r in made}) == 12
    listed = c.network_interfaces.list(subnet_id=subnet["id"])
    assert sorted(n["id"] for n in listed) == sorted(r["id"] for r in made)
    assert c.subnets.get(subnet["id"])["available_ips"] == 0
    assert quota(c, "network_interfaces")["used"] == 12  # the refused ones claimed nothing


def test_concurrent_first_uses_make_one_default_vpc(any_cloud: Cloud) -> None:
    c = project_client(any_cloud)

    def first_use(cl: Client, i: int) -> Any:
        if i % 2:
            return cl.vpcs.default()["id"]
        return cl.network_interfaces.create(zone="PAR1-b")["vpc_id"]

    results = burst(any_cloud, c.project_id, 12, first_use)  # type: ignore[attr-defined]
    assert not [r for r in results if isinstance(r, ApiError)], results
    assert len(set(results)) == 1
    defaults = c.vpcs.list(is_default=True)
    assert [v["id"] for v in defaults] == [results[0]]
    assert len(c.subnets.list(vpc_id=results[0])) == 3
    assert len(c.security_groups.list(vpc_id=results[0])) == 1
    assert quota(c, "vpcs")["used"] == 1


def test_concurrent_overlapping_subnets_one_wins(any_cloud: Cloud) -> None:
    c = project_client(any_cloud)
    vpc = c.vpcs.create("racy", "10.51.0.0/16")
    cidrs = ["10.51.0.0/24", "10.51.0.0/25", "10.51.0.128/25", "10.51.0.0/23", "10.51.0.64/26"] * 2
    results = burst(any_cloud, c.project_id, len(cidrs),  # type: ignore[attr-defined]
                    lambda cl, i: cl.subnets.create(vpc["id"], cidrs[i]))
    made = [r for r in results if not isinstance(r, ApiError)]
    assert all(r.status == 409 and r.code == "overlapping_cidr" for r in results if isinstance(r, ApiError))
    nets = [ipaddress.ip_network(r["cidr"]) for r in made]
    assert made and all(not a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1:]), nets
    assert len(c.subnets.list(vpc_id=vpc["id"])) == len(made)


def test_a_flood_of_rules_stops_at_the_per_group_quota(any_cloud: Cloud) -> None:
    c = project_client(any_cloud, security_group_rules=10)
    vpc, _ = vpc_with_subnet(c, "10.52.0.0/16", "10.52.1.0/24")
    group = c.security_groups.create(vpc["id"], "flood")  # 1 rule (egress)
    results = burst(any_cloud, c.project_id, 30,  # type: ignore[attr-defined]
                    lambda cl, i: cl.security_groups.add_rule(group["id"], "ingress", "tcp",
                                                              port_min=1000 + i, cidr="0.0.0.0/0"))
    assert outcome(results) == {"ok": 9, "403 quota_exceeded": 21}, outcome(results)
    assert len(c.security_groups.rules(group["id"])) == 10
    # the same rule from many requests at once: one is added, the others are duplicates
    other = c.security_groups.create(vpc["id"], "dups")
    results = burst(any_cloud, c.project_id, 8,  # type: ignore[attr-defined]
                    lambda cl, i: cl.security_groups.add_rule(other["id"], "ingress", "tcp",
                                                              port_min=22, cidr="0.0.0.0/0"))
    assert outcome(results) == {"ok": 1, "409 duplicate_rule": 7}, outcome(results)


def test_concurrent_floating_ips_are_distinct(any_cloud: Cloud) -> None:
    c = project_client(any_cloud, floating_ips=12)
    results = burst(any_cloud, c.project_id, 16,  # type: ignore[attr-defined]
                    lambda cl, i: cl.floating_ips.allocate())
    assert outcome(results) == {"ok": 12, "403 quota_exceeded": 4}, outcome(results)
    addresses = {r["address"] for r in results if not isinstance(r, ApiError)}
    assert len(addresses) == 12
    for fip in c.floating_ips.list():
        c.floating_ips.release(fip["id"])


def test_concurrent_vpcs_of_one_name_make_one(any_cloud: Cloud) -> None:
    c = project_client(any_cloud)
    results = burst(any_cloud, c.project_id, 5,  # type: ignore[attr-defined]
                    lambda cl, i: cl.vpcs.create("same", f"10.{60 + i}.0.0/16"))
    assert outcome(results) == {"ok": 1, "409 already_exists": 4}, outcome(results)
    assert [v["name"] for v in c.vpcs.list()] == ["same"]
    assert quota(c, "vpcs")["used"] == 1  # the refused ones gave their claim back
