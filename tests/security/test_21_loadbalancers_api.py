"""Load balancers through the API against hostile tenants: another project's load balancers, listeners, pools,
members, rules, certificates, subnets and interfaces are 404 (never a 403 that would confirm they exist), a
viewer changes nothing, values that would change the meaning of the HAProxy configuration they end in are
refused with a 422 (and nothing is written), and a certificate's private key appears in no answer and no
event."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from tests.security.conftest import Tenant
from tests.unit.loadbalancers import pki


def refused(status: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args, **kwargs)
    assert err.value.status == status, (fn, args, kwargs, err.value.problem)
    return err.value


def _network(c: Any, octet: int) -> tuple[dict[str, Any], dict[str, Any]]:
    vpc = c.vpcs.create("lbnet", f"10.{octet}.0.0/16", internet_gateway=True)
    return vpc, c.subnets.create(vpc["id"], f"10.{octet}.1.0/24", name="lbsub", public=True)


@pytest.fixture
def victim(tenant_factory: Callable[..., Tenant]) -> tuple[Tenant, dict[str, Any]]:
    """A tenant with one load balancer fully configured, and the PEM key of its certificate."""
    t = tenant_factory("member")
    c: Any = t.client
    vpc, subnet = _network(c, 81)
    chain_pem, key_pem = pki.server_pem("victim.example.com")
    cert = c.certificates.upload(chain_pem, key_pem, name="victim-cert")
    lb = c.load_balancers.create("victim-lb", subnet["id"], internet_facing=True)
    pool = c.load_balancers.add_pool(lb["id"], "victim-pool")
    backend = c.network_interfaces.create(subnet["id"], name="backend")
    member = c.load_balancers.add_member(lb["id"], pool["id"], 8080, network_interface=backend["id"])
    listener = c.load_balancers.add_listener(lb["id"], "https", 443, name="victim-https", default_pool=pool["id"],
                                             certificates=[cert["id"]])
    rule = c.load_balancers.add_rule(lb["id"], listener["id"], 1, "forward", path_prefix="/", pool=pool["id"])
    return t, {"vpc": vpc, "subnet": subnet, "cert": cert, "lb": lb, "pool": pool, "member": member,
               "listener": listener, "rule": rule, "backend": backend, "key_pem": key_pem, "chain_pem": chain_pem}


def test_another_tenants_load_balancers_are_invisible_and_untouchable(
        tenant_factory: Callable[..., Tenant], victim: tuple[Tenant, dict[str, Any]]) -> None:
    owner, r = victim
    attacker = tenant_factory("member")
    a: Any = attacker.client
    lb, pool, listener = r["lb"]["id"], r["pool"]["id"], r["listener"]["id"]
    version = owner.client.load_balancers.get(lb)["desired_version"]
    assert a.load_balancers.list() == [] and a.certificates.list() == []
    for ref in (lb, "victim-lb"):
        refused(404, a.load_balancers.get, ref)
        refused(404, a.load_balancers.update, ref, description="mine")
        refused(404, a.load_balancers.delete, ref)
        refused(404, a.load_balancers.stats, ref)
        refused(404, a.load_balancers.logs, ref)
        refused(404, a.load_balancers.listeners, ref)
        refused(404, a.load_balancers.pools, ref)
        refused(404, a.load_balancers.add_pool, ref, "evil")
        refused(404, a.load_balancers.add_listener, ref, "http", 8080)
    refused(404, a.load_balancers.get_pool, lb, pool)
    refused(404, a.load_balancers.update_pool, lb, pool, algorithm="source")
    refused(404, a.load_balancers.delete_pool, lb, pool)
    refused(404, a.load_balancers.members, lb, pool)
    refused(404, a.load_balancers.add_member, lb, pool, 22, address="10.81.1.66")
    refused(404, a.load_balancers.drain_member, lb, pool, r["member"]["id"])
    refused(404, a.load_balancers.remove_member, lb, pool, r["member"]["id"])
    refused(404, a.load_balancers.get_listener, lb, listener)
    refused(404, a.load_balancers.update_listener, lb, listener, port=8443)
    refused(404, a.load_balancers.delete_listener, lb, listener)
    refused(404, a.load_balancers.rules, lb, listener)
    refused(404, a.load_balancers.add_rule, lb, listener, 2, "fixed_response", path_prefix="/x")
    refused(404, a.load_balancers.delete_rule, lb, listener, r["rule"]["id"])
    for ref in (r["cert"]["id"], "victim-cert"):
        refused(404, a.certificates.get, ref)
        refused(404, a.certificates.delete, ref)
    # the load balancer is no instance: its VIP cannot be taken through the instance endpoints
    refused(404, a.get, f"/v1/instances/{lb}/network-interfaces")
    refused(404, a.network_interfaces.get, r["lb"]["network_interface_id"])

    # their subnet, pool, certificate or interfaces from the attacker's own load balancer: 404 as well
    refused(404, a.load_balancers.create, "evil", r["subnet"]["id"])
    refused(404, a.load_balancers.create, "evil", "lbsub")
    _, own_subnet = _network(a, 81)
    mine = a.load_balancers.create("mine", own_subnet["id"])
    own_pool = a.load_balancers.add_pool(mine["id"], "p")
    refused(404, a.load_balancers.add_listener, mine["id"], "http", 80, default_pool=pool)
    refused(404, a.load_balancers.add_listener, mine["id"], "https", 443, certificates=[r["cert"]["id"]])
    refused(404, a.load_balancers.add_member, mine["id"], own_pool["id"], 8080, network_interface=r["backend"]["id"])
    refused(404, a.load_balancers.add_member, mine["id"], own_pool["id"], 8080,
            network_interface=r["lb"]["network_interface_id"])
    refused(404, a.load_balancers.add_member, mine["id"], pool, 8080, address="10.81.1.9")  # their pool, my LB

    # and the owner's load balancer is as it was
    o: Any = owner.client
    got = o.load_balancers.get(lb)
    assert got["status"] == "PENDING" and got["desired_version"] == version and got["description"] == ""
    assert [m["id"] for m in o.load_balancers.members(lb, pool)] == [r["member"]["id"]]
    assert o.load_balancers.members(lb, pool)[0]["admin_state"] == "enabled"
    assert [x["port"] for x in o.load_balancers.listeners(lb)] == [443]
    assert len(o.load_balancers.rules(lb, listener)) == 1 and o.certificates.get(r["cert"]["id"])


def test_a_viewer_changes_nothing(victim: tuple[Tenant, dict[str, Any]]) -> None:
    owner, r = victim
    o: Any = owner.client
    viewer_token = o.post("/v1/tokens", {"project_id": owner.project_id, "role": "viewer", "name": "ro"})["token"]
    v: Any = Client(o.url, viewer_token)
    lb, pool, listener = r["lb"]["id"], r["pool"]["id"], r["listener"]["id"]
    assert [x["id"] for x in v.load_balancers.list()] == [lb]  # a viewer sees
    assert v.load_balancers.stats(lb)["load_balancer_id"] == lb and v.certificates.list()
    refused(403, v.load_balancers.create, "x", r["subnet"]["id"])
    refused(403, v.load_balancers.update, lb, description="x")
    refused(403, v.load_balancers.delete, lb)
    refused(403, v.load_balancers.add_pool, lb, "x")
    refused(403, v.load_balancers.delete_pool, lb, pool)
    refused(403, v.load_balancers.add_member, lb, pool, 80, address="10.81.1.77")
    refused(403, v.load_balancers.drain_member, lb, pool, r["member"]["id"])
    refused(403, v.load_balancers.remove_member, lb, pool, r["member"]["id"])
    refused(403, v.load_balancers.add_listener, lb, "http", 80)
    refused(403, v.load_balancers.delete_listener, lb, listener)
    refused(403, v.load_balancers.add_rule, lb, listener, 9, "fixed_response", path_prefix="/x")
    refused(403, v.load_balancers.delete_rule, lb, listener, r["rule"]["id"])
    refused(403, v.certificates.upload, r["chain_pem"], r["key_pem"])
    refused(403, v.certificates.delete, r["cert"]["id"])
    assert o.load_balancers.get(lb)["status"] == "PENDING" and len(o.load_balancers.members(lb, pool)) == 1
    assert len(o.certificates.list()) == 1


INJECTIONS = ['/a b', '/a"b', "/a'b", "/a\nb", "/a\rb", "/a\tb", "/a#b", "/a${X}", "/a\\b", "/a%zz", "a",
              "/a\x00b", "/a\x7fb", "/ä"]
BAD_HOSTS = ["a b.example.com", 'a".example.com', "example.com\nuse_backend x", "ex$ample.com", "-a.example.com",
             "*", "a.*.example.com", "exa_mple.com", "a" * 64 + ".com", "a..b", "a.b.", "é.example.com"]
BAD_URLS = ["ftp://example.com/", "//example.com/", "https://exa mple.com/", 'https://example.com/"x',
            "https://example.com/\nx", "https://user:pw@example.com/", "https://example.com/${X}",
            "javascript:alert(1)", "https://example.com/a#b c", "https://*.example.com/", "http://example.com:99999/"]


def test_configuration_injection_is_refused_and_nothing_is_written(victim: tuple[Tenant, dict[str, Any]]) -> None:
    owner, r = victim
    c: Any = owner.client
    lb, listener, pool = r["lb"]["id"], r["listener"]["id"], r["pool"]["id"]
    before = c.load_balancers.get(lb)["desired_version"]
    for path in INJECTIONS:
        refused(422, c.load_balancers.add_rule, lb, listener, 50, "forward", path_prefix=path, pool=pool)
        refused(422, c.load_balancers.update_pool, lb, pool, health_check={"protocol": "http", "path": path})
    for host in BAD_HOSTS:
        refused(422, c.load_balancers.add_rule, lb, listener, 50, "forward", host=host, pool=pool)
        refused(422, c.load_balancers.update_pool, lb, pool, health_check={"protocol": "http", "host": host})
    for url in BAD_URLS:
        refused(422, c.load_balancers.add_rule, lb, listener, 50, "redirect", path_prefix="/old", redirect_url=url)
    for content_type in ["text/html\nx-evil: 1", "text/html; x=\"y\"", "text plain", "text/", "a/b c"]:
        refused(422, c.load_balancers.add_rule, lb, listener, 50, "fixed_response", path_prefix="/f",
                content_type=content_type)
    for body in ["a\rb", "a\x00b", "a\x1bb", "x" * 1025, "é" * 513]:
        refused(422, c.load_balancers.add_rule, lb, listener, 50, "fixed_response", path_prefix="/f", body=body)
    for codes in ["200 || 1", "200;", "2000", "099", "200-", "200,,204", "600"]:
        refused(422, c.load_balancers.update_pool, lb, pool, health_check={"protocol": "http",
                                                                             "expected_codes": codes})
    for name in ["a b", 'a"b', "a\nb", "-a", "a" * 64, "a/b", "a#b", ""]:
        refused(422, c.load_balancers.add_pool, lb, name)
        refused(422, c.load_balancers.add_listener, lb, "http", 8081, name=name)
        refused(422, c.load_balancers.create, name, r["subnet"]["id"])
        refused(422, c.certificates.upload, r["chain_pem"], r["key_pem"], name=name)
    # a fixed response body with quotes and new lines is data, not configuration: it is kept as it is
    ok = c.load_balancers.add_rule(lb, listener, 60, "fixed_response", path_prefix="/f",
                                   content_type="application/json; charset=utf-8", body='{"a": "b"}\n')
    assert ok["body"] == '{"a": "b"}\n'
    # only that one rule was written
    assert [x["priority"] for x in c.load_balancers.rules(lb, listener)] == [1, 60]
    assert c.load_balancers.get(lb)["desired_version"] == before + 1
    assert [p["name"] for p in c.load_balancers.pools(lb)] == ["victim-pool"]
    assert c.load_balancers.get_pool(lb, pool)["health_check"] is None


def test_the_private_key_is_never_returned(victim: tuple[Tenant, dict[str, Any]]) -> None:
    owner, r = victim
    c: Any = owner.client
    key_lines = r["key_pem"].strip().splitlines()[1:-1]
    seen = [c.certificates.get(r["cert"]["id"]), c.certificates.list(), c.load_balancers.get(r["lb"]["id"]),
            c.load_balancers.listeners(r["lb"]["id"]), c.get("/v1/events", limit=1000),
            c.get("/v1/events", resource_id=r["cert"]["id"]), c.get("/v1/audit", limit=1000)
            if _audit_allowed(c) else {}]
    text = str(seen)
    for line in key_lines:
        assert line not in text
    assert "PRIVATE KEY" not in text


def _audit_allowed(c: Any) -> bool:
    try:
        c.get("/v1/audit", limit=1)
    except ApiError:
        return False
    return True
