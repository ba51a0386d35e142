"""VPCs and subnets through the REST API: CRUD, CIDR validation, overlaps, in-use deletes, the default VPC,
quotas and events."""

from __future__ import annotations

import ipaddress

import httpx

from tests.integration.network.api_helpers import events_of, expect_error, project_client, quota, unique
from tests.support import Cloud


def test_vpc_lifecycle_with_its_default_group_events_and_quota(cloud: Cloud) -> None:
    c = project_client(cloud)
    name = unique("prod")
    vpc = c.vpcs.create(name, "10.0.0.0/16", description="production")
    assert vpc["id"].startswith("vpc-") and vpc["cidr"] == "10.0.0.0/16" and vpc["region_id"] == "PAR1"
    assert vpc["status"] == "pending" and not vpc["is_default"] and not vpc["internet_gateway"]
    assert vpc["desired_version"] > vpc["observed_version"] == 0  # the agents have work to do
    assert vpc["dns_domain"] == f"{name}.internal"
    other = c.vpcs.create(unique("dev"), "10.0.0.0/16")
    assert other["vni"] != vpc["vni"]  # same CIDR is fine (separate networks), never the same VNI
    assert c.vpcs.get(name)["id"] == vpc["id"]
    assert {v["id"] for v in c.vpcs.list()} == {vpc["id"], other["id"]}

    groups = c.security_groups.list(vpc_id=vpc["id"])
    assert [g["name"] for g in groups] == ["default"] and groups[0]["is_default"]
    rules = {(r["direction"], r["protocol"], r["cidr"], r["remote_group_id"]) for r in groups[0]["rules"]}
    assert rules == {("egress", "all", "0.0.0.0/0", None), ("ingress", "all", None, groups[0]["id"])}
    assert quota(c, "vpcs")["used"] == 2

    before = vpc["desired_version"]
    patched = c.vpcs.update(vpc["id"], description="prod!", internet_gateway=True)
    assert patched["internet_gateway"] and patched["description"] == "prod!"
    assert patched["desired_version"] > before
    expect_error(409, c.vpcs.update, other["id"], name=name, code="already_exists")
    expect_error(422, c.vpcs.update, other["id"], name="default")

    c.vpcs.delete(vpc["id"])
    expect_error(404, c.vpcs.get, vpc["id"])
    assert c.security_groups.list(vpc_id=vpc["id"]) == []
    assert quota(c, "vpcs")["used"] == 1
    assert {"network.vpc.created", "network.vpc.updated", "network.vpc.deleted"} <= set(events_of(c, vpc["id"]))
    again = c.vpcs.create(name, "10.0.0.0/16")
    assert again["vni"] not in (vpc["vni"], other["vni"])  # a deleted VPC's VNI is not handed out again


def test_vpc_cidr_and_input_validation(cloud: Cloud) -> None:
    c = project_client(cloud)
    cases = [
        ("8.8.0.0/16", "RFC 1918"), ("172.32.0.0/16", "RFC 1918"), ("10.0.0.0/8", "/16 to /28"),
        ("10.0.0.0/29", "/16 to /28"), ("10.0.0.1/16", "host bits"), ("10.0.0.0", "cidr"),
        ("300.0.0.0/16", "not an IPv4 network"),
    ]
    for cidr, text in cases:
        expect_error(422, c.vpcs.create, unique("bad"), cidr, text=text)
    for cidr in ("192.168.0.0/16", "172.16.5.0/24", "10.1.2.0/28"):
        c.vpcs.create(unique("ok"), cidr)
    expect_error(422, c.vpcs.create, "default", "10.0.0.0/16", text="default")
    expect_error(422, c.vpcs.create, unique("x"), "10.0.0.0/16", region="NOPE1", text="NOPE1")
    expect_error(409, c.vpcs.create, unique("x"), "10.0.0.0/16", region="MAD1",
                 code="region_not_operational")
    headers = {"Authorization": f"Bearer {cloud.admin_token}", "X-Hackboot-Project": c.project_id}  # type: ignore[attr-defined]
    for body in ({"name": "x", "cidr": "10.0.0.0/16", "vni": 5}, {"name": "x"}, {"name": "x", "cidr": 10},
                 {"name": "x", "cidr": "10.0.0.0/16", "internet_gateway": "yes"}):
        r = httpx.post(f"{cloud.url}/v1/vpcs", json=body, headers=headers)
        assert r.status_code == 422 and r.json()["code"] == "validation_failed", r.text
    r = httpx.patch(f"{cloud.url}/v1/vpcs/default", json={"internet_gateway": None}, headers=headers)
    assert r.status_code in (404, 422), r.text


def test_vpc_quota(cloud: Cloud) -> None:
    c = project_client(cloud, vpcs=2)
    c.vpcs.create(unique("a"), "10.0.0.0/16")
    c.vpcs.create(unique("b"), "10.0.0.0/16")
    expect_error(403, c.vpcs.create, unique("c"), "10.0.0.0/16", code="quota_exceeded")


def test_subnets_inside_the_vpc_without_overlap(cloud: Cloud) -> None:
    c = project_client(cloud)
    vpc = c.vpcs.create(unique("v"), "10.10.0.0/16")
    s1 = c.subnets.create(vpc["id"], "10.10.1.0/24", zone="PAR1-b", name="web", public=True)
    assert (s1["gateway_ip"], s1["dns_ip"], s1["zone_id"], s1["public"]) == ("10.10.1.1", "10.10.1.2", "PAR1-b", True)
    assert s1["available_ips"] == 256 - 4 and s1["status"] == "pending"
    s2 = c.subnets.create(vpc["name"], "10.10.2.0/28")
    assert s2["available_ips"] == 12 and s2["zone_id"] == "PAR1-a" and not s2["public"]
    err = expect_error(409, c.subnets.create, vpc["id"], "10.10.1.128/25", code="overlapping_cidr")
    assert s1["id"] in err.detail
    expect_error(409, c.subnets.create, vpc["id"], "10.10.0.0/20", code="overlapping_cidr")
    expect_error(422, c.subnets.create, vpc["id"], "10.11.0.0/24", text="not inside")
    expect_error(422, c.subnets.create, vpc["id"], "10.10.3.0/29", text="/28")
    expect_error(422, c.subnets.create, vpc["id"], "10.10.3.5/24", text="host bits")
    expect_error(422, c.subnets.create, vpc["id"], "10.10.3.0/24", zone="FRA1-a", text="region")
    expect_error(422, c.subnets.create, vpc["id"], "10.10.3.0/24", zone="XX-z")
    expect_error(404, c.subnets.create, "vpc-nope", "10.10.3.0/24")
    assert {x["id"] for x in c.subnets.list(vpc_id=vpc["id"])} == {s1["id"], s2["id"]}
    assert [x["id"] for x in c.subnets.list(vpc_id=vpc["id"], public=True)] == [s1["id"]]
    assert c.subnets.get("web")["id"] == s1["id"]
    assert c.subnets.update("web", public=False)["public"] is False

    nic = c.network_interfaces.create(s2["id"])
    err = expect_error(409, c.vpcs.delete, vpc["id"], code="in_use")
    assert s1["id"] in err.detail and s2["id"] in err.detail
    err = expect_error(409, c.subnets.delete, s2["id"], code="in_use")
    assert nic["id"] in err.detail
    c.network_interfaces.delete(nic["id"])
    for s in (s1, s2):
        c.subnets.delete(s["id"])
    assert quota(c, "subnets")["used"] == 0
    c.vpcs.delete(vpc["id"])
    assert "network.subnet.deleted" in events_of(c, s1["id"])


def test_default_vpc_is_made_once_with_a_public_subnet_per_zone(cloud: Cloud) -> None:
    c = project_client(cloud)
    vpc = c.vpcs.default()
    assert vpc["is_default"] and vpc["name"] == "default" and vpc["cidr"] == "172.31.0.0/16"
    assert vpc["internet_gateway"]
    assert c.vpcs.default()["id"] == vpc["id"]
    assert c.vpcs.get("default")["id"] == vpc["id"]
    subnets = c.subnets.list(vpc_id=vpc["id"])
    assert sorted(s["zone_id"] for s in subnets) == ["PAR1-a", "PAR1-b", "PAR1-c"]
    nets = [ipaddress.IPv4Network(s["cidr"]) for s in subnets]
    assert all(n.prefixlen == 20 and n.subnet_of(ipaddress.IPv4Network("172.31.0.0/16")) for n in nets)
    assert all(s["public"] for s in subnets)
    # an interface without a subnet goes to the default VPC's subnet of its zone
    nic = c.network_interfaces.create(zone="PAR1-c")
    assert nic["vpc_id"] == vpc["id"]
    assert nic["subnet_id"] == next(s["id"] for s in subnets if s["zone_id"] == "PAR1-c")
    assert quota(c, "vpcs")["used"] == 1
    # another region gets a default VPC of its own
    fra = c.vpcs.default("FRA1")
    assert fra["id"] != vpc["id"] and fra["region_id"] == "FRA1"
    assert len(c.vpcs.list(is_default=True)) == 2
