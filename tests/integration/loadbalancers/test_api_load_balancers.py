"""Load balancers through the REST API (the SDK) on the real control plane: the VIP made in the subnet, the
listener / pool / member / rule / certificate lifecycle, and every refusal the issue names."""

from __future__ import annotations

import ipaddress
from typing import Any

from tests.integration.loadbalancers.lb_api_helpers import event_types, lb_network
from tests.integration.network.api_helpers import expect_error, project_client, quota, unique
from tests.support import Cloud
from tests.unit.loadbalancers import pki


def test_create_places_a_vip_in_the_subnet_and_a_public_ip_when_internet_facing(cloud: Cloud) -> None:
    c = project_client(cloud)
    vpc, subnet = lb_network(c, 61)
    web = c.security_groups.create(vpc["id"], "lb-web")
    lb = c.load_balancers.create("front", subnet["name"], internet_facing=True, security_groups=[web["id"]],
                                 description="the shop")
    assert lb["id"].startswith("lb-") and lb["status"] == "PENDING" and lb["status_reason"] == ""
    assert lb["vpc_id"] == vpc["id"] and lb["subnet_id"] == subnet["id"] and lb["zone_id"] == "PAR1-a"
    assert ipaddress.IPv4Address(lb["vip"]) in ipaddress.IPv4Network(subnet["cidr"])
    assert lb["public_ip"] is not None and ipaddress.IPv4Address(lb["public_ip"]) in ipaddress.IPv4Network(
        "203.0.113.0/24")
    assert lb["security_group_ids"] == [web["id"]] and lb["host_id"]
    assert lb["desired_version"] > lb["applied_version"] == 0
    # the VIP is an interface of the subnet, attached to the load balancer as its device 0, on its host
    nic = c.network_interfaces.get(lb["network_interface_id"])
    assert nic["private_ip"] == lb["vip"] and nic["instance_id"] == lb["id"] and nic["device_index"] == 0
    assert nic["host_id"] == lb["host_id"] and nic["public_ip"] == lb["public_ip"]
    expect_error(409, c.network_interfaces.delete, nic["id"], code="in_use")  # it goes with the load balancer
    # an internal one: the VPC's default group, no public address
    internal = c.load_balancers.create("internal", subnet["id"])
    default_group = next(g for g in c.security_groups.list(vpc_id=vpc["id"]) if g["is_default"])
    assert internal["public_ip"] is None and internal["security_group_ids"] == [default_group["id"]]
    assert internal["vip"] != lb["vip"]
    # read by id or name, listed with filters
    assert c.load_balancers.get("front")["id"] == lb["id"]
    assert {x["id"] for x in c.load_balancers.list(vpc_id=vpc["id"])} == {lb["id"], internal["id"]}
    assert [x["id"] for x in c.load_balancers.list(name="internal")] == [internal["id"]]
    assert [x["id"] for x in c.load_balancers.list(status="PENDING", subnet_id=subnet["id"])] == sorted(
        [lb["id"], internal["id"]])
    assert quota(c, "load_balancers")["used"] == 2
    assert "load_balancer.created" in event_types(c, lb["id"])
    # a retried create with the same Idempotency-Key is answered with the same load balancer, made once
    key = unique("idem")
    once = c.load_balancers.create("retried", subnet["id"], idempotency_key=key)
    again = c.load_balancers.create("retried", subnet["id"], idempotency_key=key)
    assert again["id"] == once["id"] and len(c.load_balancers.list(name="retried")) == 1
    c.load_balancers.delete(once["id"])
    expect_error(409, c.load_balancers.create, "retried", subnet["id"], code="name_in_use", text="being deleted")
    # names are unique in a project
    expect_error(409, c.load_balancers.create, "front", subnet["id"], code="name_in_use")
    renamed = c.load_balancers.update(lb["id"], name="shop", description="renamed")
    assert renamed["name"] == "shop" and renamed["desired_version"] > lb["desired_version"]
    assert c.load_balancers.update(lb["id"], security_groups=[default_group["id"]])["security_group_ids"] == [
        default_group["id"]]
    # a private subnet of a VPC without an internet gateway cannot take a public address: nothing is left
    private_vpc = c.vpcs.create(unique("vpc"), "10.62.0.0/16")
    private = c.subnets.create(private_vpc["id"], "10.62.1.0/24", zone="PAR1-a")
    expect_error(409, c.load_balancers.create, "exposed", private["id"], internet_facing=True,
                 code="no_internet_route")
    assert c.load_balancers.list(name="exposed") == [] and c.network_interfaces.list(subnet_id=private["id"]) == []
    assert quota(c, "load_balancers")["used"] == 3  # the two, and the retried one until its proxy is gone


def test_delete_takes_listeners_pools_members_and_rules_with_it(cloud: Cloud) -> None:
    c = project_client(cloud)
    _, subnet = lb_network(c, 63)
    lb = c.load_balancers.create("gone", subnet["id"])
    pool = c.load_balancers.add_pool(lb["id"], "web")
    c.load_balancers.add_member(lb["id"], pool["id"], 8080, address="10.63.1.50")
    listener = c.load_balancers.add_listener(lb["id"], "http", 80, default_pool=pool["id"])
    c.load_balancers.add_rule(lb["id"], listener["id"], 10, "fixed_response", path_prefix="/ping", body="pong")
    assert [quota(c, r)["used"] for r in ("listeners", "pools", "members")] == [1, 1, 1]
    deleting = c.load_balancers.delete(lb["id"])
    assert deleting["status"] == "DELETING"
    assert c.load_balancers.listeners(lb["id"]) == [] and c.load_balancers.pools(lb["id"]) == []
    assert [quota(c, r)["used"] for r in ("listeners", "pools", "members")] == [0, 0, 0]
    # nothing more is accepted on it; deleting again is harmless
    expect_error(409, c.load_balancers.add_pool, lb["id"], "again", code="deleting")
    assert c.load_balancers.delete(lb["id"])["status"] == "DELETING"
    assert "load_balancer.deleting" in event_types(c, lb["id"])


def test_listeners_ports_protocols_and_limits(cloud: Cloud) -> None:
    c = project_client(cloud)
    _, subnet = lb_network(c, 64)
    lb = c.load_balancers.create("ports", subnet["id"])
    web = c.load_balancers.add_pool(lb["id"], "web", protocol="http")
    db = c.load_balancers.add_pool(lb["id"], "db", protocol="tcp")
    chain_pem, key_pem = pki.server_pem("shop.example.com")
    cert = c.certificates.upload(chain_pem, key_pem, name="shop")
    http = c.load_balancers.add_listener(lb["id"], "http", 80, name="plain", redirect_to_https_port=443,
                                         request_rate_limit=50, connection_limit=1000)
    assert http["id"].startswith("lbl-") and http["redirect_to_https_port"] == 443
    assert http["request_rate_limit"] == 50 and http["idle_timeout_s"] == 60.0
    https = c.load_balancers.add_listener(lb["id"], "https", 443, default_pool="web", certificates=["shop"],
                                          connection_rate_limit=20)
    assert https["certificate_ids"] == [cert["id"]] and https["default_pool_id"] == web["id"]
    tcp = c.load_balancers.add_listener(lb["id"], "tcp", 5432, default_pool=db["id"], idle_timeout_s=600)
    assert tcp["idle_timeout_s"] == 600.0
    # the issue's refusals
    expect_error(409, c.load_balancers.add_listener, lb["id"], "tcp", 80, code="port_in_use")
    expect_error(422, c.load_balancers.add_listener, lb["id"], "udp", 53, text="HAProxy 2.6 does not balance UDP")
    expect_error(422, c.load_balancers.add_listener, lb["id"], "https", 8443, text="at least one certificate")
    expect_error(422, c.load_balancers.add_listener, lb["id"], "http", 8080, certificates=[cert["id"]],
                 text="takes no certificate")
    expect_error(422, c.load_balancers.add_listener, lb["id"], "tcp", 8080, request_rate_limit=5,
                 text="no requests")
    expect_error(422, c.load_balancers.add_listener, lb["id"], "https", 8443, certificates=[cert["id"]],
                 redirect_to_https_port=443, text="Only an http listener")
    expect_error(422, c.load_balancers.add_listener, lb["id"], "tcp", 8080, default_pool=web["id"],
                 text="forwards to tcp pools")
    expect_error(422, c.load_balancers.add_listener, lb["id"], "http", 8080, default_pool=db["id"],
                 text="forwards to http pools")
    expect_error(404, c.load_balancers.add_listener, lb["id"], "http", 8080, default_pool="nope")
    expect_error(404, c.load_balancers.add_listener, lb["id"], "https", 8443, certificates=["nope"])
    expect_error(422, c.load_balancers.add_listener, lb["id"], "http", 0)
    expect_error(422, c.load_balancers.add_listener, lb["id"], "http", 65536)
    assert quota(c, "listeners")["used"] == 3
    # changes: a port clash is a 409 too, limits change, the protocol stays
    expect_error(409, c.load_balancers.update_listener, lb["id"], tcp["id"], port=443, code="port_in_use")
    moved = c.load_balancers.update_listener(lb["id"], tcp["id"], port=15432, connection_limit=10)
    assert moved["port"] == 15432 and moved["connection_limit"] == 10
    expect_error(422, c.load_balancers.update_listener, lb["id"], https["id"], certificates=[],
                 text="at least one certificate")
    listed = c.load_balancers.listeners(lb["id"])
    assert sorted(x["port"] for x in listed) == [80, 443, 15432]
    c.load_balancers.delete_listener(lb["id"], "plain")
    expect_error(404, c.load_balancers.get_listener, lb["id"], http["id"])
    assert quota(c, "listeners")["used"] == 2
    types = event_types(c, lb["id"])
    assert {"load_balancer.listener_created", "load_balancer.listener_updated",
            "load_balancer.listener_deleted"} <= set(types)


def test_pools_members_health_checks_and_in_use_deletes(cloud: Cloud) -> None:
    c = project_client(cloud)
    _, subnet = lb_network(c, 65)
    lb = c.load_balancers.create("pools", subnet["id"])
    check = {"protocol": "http", "path": "/health", "host": "shop.example.com", "expected_codes": "200,204",
             "interval_s": 2, "timeout_s": 1, "healthy_threshold": 2, "unhealthy_threshold": 3}
    web = c.load_balancers.add_pool(lb["id"], "web", algorithm="leastconn", sticky="cookie", health_check=check)
    assert web["id"].startswith("lbp-") and web["health_check"]["expected_codes"] == "200,204"
    assert web["health_check"]["interval_s"] == 2.0 and web["members"] == []
    tcp = c.load_balancers.add_pool(lb["id"], "tcp", protocol="tcp", proxy_protocol=True, sticky="source_ip")
    assert tcp["health_check"] is None and tcp["proxy_protocol"]
    for bad, text in (({"sticky": "cookie"}, "Cookie stickiness"), ({"proxy_protocol": True}, "PROXY protocol")):
        kw: dict[str, Any] = {"protocol": "tcp" if "sticky" in bad else "http", **bad}
        expect_error(422, c.load_balancers.add_pool, lb["id"], unique("bad"), text=text, **kw)
    for bad_check, text in (({"timeout_s": 5, "interval_s": 5}, "less than the interval"),
                            ({"expected_codes": "399-200"}, "is empty"),
                            ({"expected_codes": "2xx"}, None),
                            ({"healthy_threshold": 11}, None),
                            ({"path": "health"}, "is not a path"),
                            ({"host": "*.example.com"}, "not a wildcard")):
        expect_error(422, c.load_balancers.add_pool, lb["id"], unique("bad"),
                     health_check={**check, **bad_check}, text=text)
    expect_error(409, c.load_balancers.add_pool, lb["id"], "web", code="name_in_use")
    # members: an interface of the VPC (its address), or an address of the VPC
    nic = c.network_interfaces.create(subnet["id"], name="web-0")
    by_nic = c.load_balancers.add_member(lb["id"], "web", 8080, network_interface="web-0", weight=10)
    assert by_nic["id"].startswith("lbm-") and by_nic["address"] == nic["private_ip"]
    assert by_nic["network_interface_id"] == nic["id"] and by_nic["health"] == "unknown" and by_nic["weight"] == 10
    by_ip = c.load_balancers.add_member(lb["id"], web["id"], 8080, address="10.65.200.7")
    assert by_ip["network_interface_id"] is None and by_ip["admin_state"] == "enabled"
    expect_error(409, c.load_balancers.add_member, lb["id"], web["id"], 8080, address="10.65.200.7",
                 code="member_exists")
    expect_error(422, c.load_balancers.add_member, lb["id"], web["id"], 8080, address="10.66.0.5",
                 text="outside the VPC")
    expect_error(422, c.load_balancers.add_member, lb["id"], web["id"], 8080, address="192.168.1.1",
                 text="outside the VPC")
    expect_error(422, c.load_balancers.add_member, lb["id"], web["id"], 8080, text="one of them")
    expect_error(422, c.load_balancers.add_member, lb["id"], web["id"], 8080, address="10.65.1.9",
                 network_interface=nic["id"], text="one of them")
    expect_error(422, c.load_balancers.add_member, lb["id"], web["id"], 80, address=lb["vip"], text="its own member")
    _, other_subnet = lb_network(c, 66)
    stranger = c.network_interfaces.create(other_subnet["id"])
    expect_error(422, c.load_balancers.add_member, lb["id"], web["id"], 80, network_interface=stranger["id"],
                 text="another VPC")
    expect_error(422, c.load_balancers.add_member, lb["id"], web["id"], 80, address="10.65.1.9", weight=257)
    # drain and weights
    drained = c.load_balancers.drain_member(lb["id"], web["id"], by_ip["id"])
    assert drained["admin_state"] == "drain"
    assert c.load_balancers.get_member(lb["id"], "web", by_ip["id"]) == drained
    expect_error(404, c.load_balancers.get_member, lb["id"], tcp["id"], by_ip["id"])  # not that pool's
    assert c.load_balancers.update_member(lb["id"], web["id"], by_ip["id"], weight=0)["weight"] == 0
    members = c.load_balancers.members(lb["id"], web["id"])
    assert [(m["id"], m["admin_state"]) for m in members] == [(by_nic["id"], "enabled"), (by_ip["id"], "drain")]
    assert len(c.load_balancers.get_pool(lb["id"], "web")["members"]) == 2
    assert quota(c, "members")["used"] == 2
    # a pool in use by a listener's default or by a rule cannot go
    listener = c.load_balancers.add_listener(lb["id"], "http", 80, default_pool=web["id"])
    expect_error(409, c.load_balancers.delete_pool, lb["id"], web["id"], code="in_use", text=listener["id"])
    c.load_balancers.add_pool(lb["id"], "api")
    rule = c.load_balancers.add_rule(lb["id"], listener["id"], 5, "forward", path_prefix="/api/", pool="api")
    expect_error(409, c.load_balancers.delete_pool, lb["id"], "api", code="in_use", text=rule["id"])
    c.load_balancers.delete_rule(lb["id"], listener["id"], rule["id"])
    c.load_balancers.delete_pool(lb["id"], "api")
    c.load_balancers.delete_listener(lb["id"], listener["id"])
    c.load_balancers.remove_member(lb["id"], web["id"], by_nic["id"])
    c.load_balancers.delete_pool(lb["id"], web["id"])  # with its last member
    assert quota(c, "members")["used"] == 0 and quota(c, "pools")["used"] == 1
    # updates
    updated = c.load_balancers.update_pool(lb["id"], "tcp", algorithm="source", health_check={"protocol": "tcp"})
    assert updated["algorithm"] == "source" and updated["health_check"]["protocol"] == "tcp"
    assert c.load_balancers.update_pool(lb["id"], "tcp", remove_health_check=True)["health_check"] is None
    expect_error(422, c.load_balancers.update_pool, lb["id"], "tcp", sticky="cookie")
    types = set(event_types(c, lb["id"]))
    assert {"load_balancer.pool_created", "load_balancer.member_added", "load_balancer.member_updated",
            "load_balancer.member_removed", "load_balancer.pool_deleted", "load_balancer.pool_updated"} <= types


def test_rules_match_hosts_and_paths_and_answer_forward_redirect_or_fixed(cloud: Cloud) -> None:
    c = project_client(cloud)
    _, subnet = lb_network(c, 67)
    lb = c.load_balancers.create("rules", subnet["id"])
    web = c.load_balancers.add_pool(lb["id"], "web")
    tcp_pool = c.load_balancers.add_pool(lb["id"], "raw", protocol="tcp")
    listener = c.load_balancers.add_listener(lb["id"], "http", 80, default_pool="web")
    forward = c.load_balancers.add_rule(lb["id"], listener["id"], 10, "forward", host="Shop.Example.com",
                                        path_prefix="/api/v1/", pool="web")
    assert forward["id"].startswith("lbr-") and forward["host"] == "shop.example.com"
    assert forward["pool_id"] == web["id"]
    redirect = c.load_balancers.add_rule(lb["id"], listener["id"], 20, "redirect", host="*.old.example.com",
                                         redirect_url="https://new.example.com/moved?from=old", redirect_code=301)
    assert redirect["redirect_code"] == 301
    fixed = c.load_balancers.add_rule(lb["id"], listener["id"], 30, "fixed_response", path_prefix="/health",
                                      status_code=200, content_type="application/json", body='{"ok": true}\n')
    assert fixed["body"] == '{"ok": true}\n'
    assert [r["priority"] for r in c.load_balancers.rules(lb["id"], listener["id"])] == [10, 20, 30]
    assert c.load_balancers.get_rule(lb["id"], listener["id"], redirect["id"]) == redirect
    expect_error(409, c.load_balancers.add_rule, lb["id"], listener["id"], 10, "forward", path_prefix="/x",
                 pool="web", code="priority_in_use")
    expect_error(422, c.load_balancers.add_rule, lb["id"], listener["id"], 11, "forward", path_prefix="/x",
                 pool=tcp_pool["id"], text="forwards to http pools")
    expect_error(422, c.load_balancers.add_rule, lb["id"], listener["id"], 11, "forward", pool="web",
                 text="at least one")
    expect_error(422, c.load_balancers.add_rule, lb["id"], listener["id"], 11, "forward", path_prefix="/x",
                 text="names a pool")
    expect_error(422, c.load_balancers.add_rule, lb["id"], listener["id"], 11, "redirect", path_prefix="/x",
                 text="names a URL")
    expect_error(422, c.load_balancers.add_rule, lb["id"], listener["id"], 11, "fixed_response", path_prefix="/x",
                 body="x" * 1025)
    expect_error(422, c.load_balancers.add_rule, lb["id"], listener["id"], 11, "fixed_response", path_prefix="/x",
                 content_type="text/html; evil")
    tcp_listener = c.load_balancers.add_listener(lb["id"], "tcp", 9000, default_pool="raw")
    expect_error(422, c.load_balancers.add_rule, lb["id"], tcp_listener["id"], 1, "forward", path_prefix="/",
                 pool="web", text="http and https listeners")
    expect_error(404, c.load_balancers.delete_rule, lb["id"], listener["id"], "lbr-nope")
    c.load_balancers.delete_rule(lb["id"], listener["id"], fixed["id"])
    assert len(c.load_balancers.rules(lb["id"], listener["id"])) == 2
    # deleting the listener takes its rules
    c.load_balancers.delete_listener(lb["id"], listener["id"])
    expect_error(404, c.load_balancers.rules, lb["id"], listener["id"])


def test_certificates_upload_validate_and_never_return_the_key(cloud: Cloud) -> None:
    c = project_client(cloud)
    root, intermediate, leaf = pki.chain("www.example.com", "example.com")
    chain_pem = leaf.cert_pem + intermediate.cert_pem
    cert = c.certificates.upload(chain_pem, leaf.key_pem, name="site")
    assert cert["id"].startswith("cert-") and cert["names"] == ["www.example.com", "example.com"]
    assert cert["subject"] == "CN=www.example.com" and cert["issuer"] == "CN=Test Intermediate CA"
    assert len(cert["fingerprint_sha256"]) == 95 and cert["not_after"] > cert["not_before"]
    assert "key_pem" not in cert and "key_sealed" not in cert and "chain_pem" not in cert
    unnamed = c.certificates.upload(chain_pem, leaf.key_pem)
    assert unnamed["name"] == unnamed["id"]
    assert {x["id"] for x in c.certificates.list()} == {cert["id"], unnamed["id"]}
    assert c.certificates.get("site")["id"] == cert["id"]
    assert quota(c, "certificates")["used"] == 2
    # the issue's 422s: a key that is not the certificate's, a chain out of order, an expired one, a weak key
    expect_error(422, c.certificates.upload, chain_pem, pki.key_pem(pki.ec_key()), text="does not match")
    expect_error(422, c.certificates.upload, leaf.cert_pem + root.cert_pem, leaf.key_pem, text="is not signed by")
    old = pki.issue("old.example.com", not_before=pki.NOW.replace(year=pki.NOW.year - 2),
                    not_after=pki.NOW.replace(year=pki.NOW.year - 1))
    expect_error(422, c.certificates.upload, old.cert_pem, old.key_pem, text="expired")
    weak = pki.issue("weak.example.com", key=pki.rsa_key(1024))
    expect_error(422, c.certificates.upload, weak.cert_pem, weak.key_pem, text="1024 bits")
    expect_error(422, c.certificates.upload, "junk", leaf.key_pem)
    expect_error(409, c.certificates.upload, chain_pem, leaf.key_pem, name="site", code="name_in_use")
    assert quota(c, "certificates")["used"] == 2
    # in use by a listener: 409
    _, subnet = lb_network(c, 68)
    lb = c.load_balancers.create("tls", subnet["id"])
    listener = c.load_balancers.add_listener(lb["id"], "https", 443, certificates=[cert["id"], unnamed["id"]])
    assert listener["certificate_ids"] == [cert["id"], unnamed["id"]]
    expect_error(409, c.certificates.delete, "site", code="in_use")
    c.load_balancers.update_listener(lb["id"], listener["id"], certificates=[unnamed["id"]])
    c.certificates.delete("site")
    expect_error(404, c.certificates.get, cert["id"])
    # the key is in no answer and no event
    everything = str(c.get("/v1/events", resource_id=cert["id"], limit=100)) + str(c.certificates.list())
    key_body = "".join(leaf.key_pem.strip().splitlines()[1:-1])
    assert key_body[:40] not in everything.replace("\\n", "")
    assert {"certificate.uploaded", "certificate.deleted"} <= set(event_types(c, cert["id"]))


def test_stats_and_logs_start_empty(cloud: Cloud) -> None:
    c = project_client(cloud)
    _, subnet = lb_network(c, 69)
    lb = c.load_balancers.create("observed", subnet["id"])
    stats = c.load_balancers.stats(lb["id"])
    assert stats == {"load_balancer_id": lb["id"], "updated_at": None, "listeners": {}, "pools": {}, "members": {}}
    assert c.load_balancers.logs(lb["id"]) == []
    assert c.load_balancers.logs(lb["id"], status=500, since="2026-01-01T00:00:00Z") == []


def test_quotas_bound_load_balancers_listeners_pools_members_and_certificates(cloud: Cloud) -> None:
    c = project_client(cloud)
    admin = cloud.admin_client_unscoped()
    project_id = c.project_id  # type: ignore[attr-defined]
    for resource in ("load_balancers", "listeners", "pools", "members", "certificates"):
        admin.projects.set_quota(project_id, resource, 1)
    _, subnet = lb_network(c, 70)
    lb = c.load_balancers.create("one", subnet["id"])
    expect_error(403, c.load_balancers.create, "two", subnet["id"], code="quota_exceeded")
    assert c.load_balancers.list(name="two") == [] and len(c.network_interfaces.list(subnet_id=subnet["id"])) == 1
    pool = c.load_balancers.add_pool(lb["id"], "a")
    expect_error(403, c.load_balancers.add_pool, lb["id"], "b", code="quota_exceeded")
    c.load_balancers.add_member(lb["id"], pool["id"], 80, address="10.70.1.10")
    expect_error(403, c.load_balancers.add_member, lb["id"], pool["id"], 80, address="10.70.1.11",
                 code="quota_exceeded")
    c.load_balancers.add_listener(lb["id"], "http", 80)
    expect_error(403, c.load_balancers.add_listener, lb["id"], "http", 81, code="quota_exceeded")
    chain_pem, key_pem = pki.server_pem("q.example.com")
    c.certificates.upload(chain_pem, key_pem)
    expect_error(403, c.certificates.upload, chain_pem, key_pem, code="quota_exceeded")
