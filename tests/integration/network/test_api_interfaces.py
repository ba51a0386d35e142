"""Network interfaces and security groups through the REST API: addresses, MACs, groups, rules, in-use
deletes, quotas."""

from __future__ import annotations

import ipaddress

from tests.integration.network.api_helpers import (
    events_of,
    expect_error,
    project_client,
    quota,
    vpc_with_subnet,
)
from tests.support import Cloud


def test_interface_addresses_macs_and_release(cloud: Cloud) -> None:
    c = project_client(cloud)
    vpc, subnet = vpc_with_subnet(c, "10.30.0.0/16", "10.30.0.0/28")
    default_group = c.security_groups.list(vpc_id=vpc["id"])[0]
    first = c.network_interfaces.create(subnet["id"], name="web-0")
    assert first["id"].startswith("nic-") and first["private_ip"] == "10.30.0.3"  # .0-.2 are reserved
    assert first["security_group_ids"] == [default_group["id"]] and first["vpc_id"] == vpc["id"]
    assert first["status"] == "pending" and first["instance_id"] is None and first["public_ip"] is None
    assert int(first["mac"][:2], 16) & 0x03 == 0x02
    chosen = c.network_interfaces.create(subnet["id"], private_ip="10.30.0.14")
    assert chosen["private_ip"] == "10.30.0.14" and chosen["mac"] != first["mac"]
    expect_error(409, c.network_interfaces.create, subnet["id"], private_ip="10.30.0.14",
                 code="address_in_use")
    for reserved in ("10.30.0.0", "10.30.0.1", "10.30.0.2", "10.30.0.15"):
        expect_error(422, c.network_interfaces.create, subnet["id"], private_ip=reserved,
                     text="reserved")
    expect_error(422, c.network_interfaces.create, subnet["id"], private_ip="10.30.1.5",
                 text="not in the subnet")
    assert c.subnets.get(subnet["id"])["available_ips"] == 10
    assert c.network_interfaces.get("web-0")["id"] == first["id"]

    # fill the subnet: 12 usable addresses, then a clear 409
    made = [c.network_interfaces.create(subnet["id"]) for _ in range(10)]
    addresses = {n["private_ip"] for n in made} | {first["private_ip"], chosen["private_ip"]}
    assert addresses == {f"10.30.0.{i}" for i in range(3, 15)}
    expect_error(409, c.network_interfaces.create, subnet["id"], code="subnet_full")
    # deleting gives the address back
    c.network_interfaces.delete(made[0]["id"])
    again = c.network_interfaces.create(subnet["id"])
    assert again["private_ip"] == made[0]["private_ip"]
    listed = c.network_interfaces.list(subnet_id=subnet["id"])
    assert len(listed) == 12 and len({n["mac"] for n in listed}) == 12
    assert quota(c, "network_interfaces")["used"] == 12
    assert {"network.network_interface.created", "network.network_interface.deleted"} <= set(
        events_of(c, made[0]["id"]))


def test_security_groups_of_an_interface(cloud: Cloud) -> None:
    c = project_client(cloud)
    vpc, subnet = vpc_with_subnet(c, "10.31.0.0/16", "10.31.1.0/24")
    other_vpc, _ = vpc_with_subnet(c, "10.32.0.0/16", "10.32.1.0/24")
    web = c.security_groups.create(vpc["id"], "web", description="front")
    assert [(r["direction"], r["cidr"]) for r in web["rules"]] == [("egress", "0.0.0.0/0")]  # deny in, allow out
    db = c.security_groups.create(vpc["id"], "db")
    foreign = c.security_groups.create(other_vpc["id"], "web")  # same name, another VPC: fine
    expect_error(409, c.security_groups.create, vpc["id"], "web", code="already_exists")

    nic = c.network_interfaces.create(subnet["id"], security_groups=["web", db["id"], "web"])
    assert nic["security_group_ids"] == sorted([web["id"], db["id"]])
    expect_error(422, c.network_interfaces.create, subnet["id"], security_groups=[foreign["id"]],
                 text="another VPC")
    expect_error(404, c.network_interfaces.create, subnet["id"], security_groups=["sg-nope"])
    updated = c.network_interfaces.update(nic["id"], security_groups=[db["id"]])
    assert updated["security_group_ids"] == [db["id"]]
    assert c.network_interfaces.update(nic["id"], security_groups=[])["security_group_ids"] == []
    c.network_interfaces.update(nic["id"], security_groups=[web["id"]])

    err = expect_error(409, c.security_groups.delete, web["id"], code="in_use")
    assert nic["id"] in err.detail
    c.security_groups.add_rule(db["id"], "ingress", "tcp", port_min=5432, remote_group=web["id"])
    c.network_interfaces.update(nic["id"], security_groups=[db["id"]])
    err = expect_error(409, c.security_groups.delete, web["id"], code="in_use")
    assert db["id"] in err.detail  # a rule of db names web
    default = next(g for g in c.security_groups.list(vpc_id=vpc["id"]) if g["is_default"])
    expect_error(409, c.security_groups.delete, default["id"], code="default_group")
    expect_error(409, c.security_groups.update, default["id"], name="x", code="default_group")
    err = expect_error(409, c.vpcs.delete, vpc["id"], code="in_use")
    assert web["id"] in err.detail and db["id"] in err.detail

    c.network_interfaces.delete(nic["id"])
    c.security_groups.delete(db["id"])
    c.security_groups.delete(web["id"])
    assert quota(c, "security_groups")["used"] == 1  # foreign
    assert "network.security_group.deleted" in events_of(c, web["id"])


def test_rule_validation_duplicates_and_deletion(cloud: Cloud) -> None:
    c = project_client(cloud)
    vpc, _ = vpc_with_subnet(c, "10.33.0.0/16", "10.33.1.0/24")
    other_vpc, _ = vpc_with_subnet(c, "10.34.0.0/16", "10.34.1.0/24")
    g = c.security_groups.create(vpc["id"], "app")
    ssh = c.security_groups.add_rule(g["id"], "ingress", "tcp", port_min=22, cidr="198.51.100.0/24")
    assert (ssh["port_min"], ssh["port_max"], ssh["cidr"], ssh["remote_group_id"]) == (22, 22, "198.51.100.0/24", None)
    rng = c.security_groups.add_rule(g["id"], "ingress", "udp", port_min=5000, port_max=5100,
                                      cidr="10.33.0.0/16")
    assert (rng["port_min"], rng["port_max"]) == (5000, 5100)
    every = c.security_groups.add_rule(g["id"], "ingress", "tcp", cidr="0.0.0.0/0")
    assert (every["port_min"], every["port_max"]) == (1, 65535)
    icmp = c.security_groups.add_rule(g["id"], "ingress", "icmp", remote_group="app")
    assert icmp["remote_group_id"] == g["id"] and icmp["port_min"] is None

    expect_error(409, c.security_groups.add_rule, g["id"], "ingress", "tcp", port_min=22, port_max=22,
                 cidr="198.51.100.0/24", code="duplicate_rule")
    expect_error(409, c.security_groups.add_rule, g["id"], "ingress", "tcp", port_min=1, port_max=65535,
                 cidr="0.0.0.0/0", code="duplicate_rule")
    c.security_groups.add_rule(g["id"], "egress", "tcp", port_min=22, cidr="198.51.100.0/24")
    bad = [
        (dict(direction="ingress", protocol="icmp", port_min=8, cidr="0.0.0.0/0"), 422, "tcp and udp"),
        (dict(direction="ingress", protocol="tcp", port_min=90, port_max=80, cidr="0.0.0.0/0"), 422, "above"),
        (dict(direction="ingress", protocol="tcp", port_min=80), 422, "exactly one peer"),
        (dict(direction="ingress", protocol="tcp", cidr="10.0.0.0/8", remote_group=g["id"]), 422, "exactly one"),
        (dict(direction="ingress", protocol="tcp", cidr="10.0.0.1/8"), 422, "host bits"),
        (dict(direction="ingress", protocol="gre", cidr="10.0.0.0/8"), 422, None),
        (dict(direction="sideways", protocol="tcp", cidr="10.0.0.0/8"), 422, None),
        (dict(direction="ingress", protocol="tcp", port_min=0, cidr="10.0.0.0/8"), 422, None),
        (dict(direction="ingress", protocol="tcp", port_min=70000, cidr="10.0.0.0/8"), 422, None),
        (dict(direction="ingress", protocol="tcp", remote_group="sg-nope"), 404, None),
    ]
    for body, status, text in bad:
        expect_error(status, c.post, f"/v1/security-groups/{g['id']}/rules", body, text=text)
    foreign = c.security_groups.list(vpc_id=other_vpc["id"])[0]
    expect_error(422, c.security_groups.add_rule, g["id"], "ingress", "all", remote_group=foreign["id"],
                 text="another VPC")
    assert len(c.security_groups.rules(g["id"])) == 6

    before = c.vpcs.get(vpc["id"])["desired_version"]
    c.security_groups.delete_rule(g["id"], ssh["id"])
    assert c.vpcs.get(vpc["id"])["desired_version"] > before
    assert ssh["id"] not in {r["id"] for r in c.security_groups.rules(g["id"])}
    expect_error(404, c.security_groups.delete_rule, g["id"], ssh["id"])
    expect_error(404, c.security_groups.delete_rule, foreign["id"], rng["id"])
    # the rule is gone, so adding it again works
    c.security_groups.add_rule(g["id"], "ingress", "tcp", port_min=22, cidr="198.51.100.0/24")
    assert {"network.security_group.rule_added", "network.security_group.rule_removed"} <= set(events_of(c, g["id"]))


def test_rules_per_group_quota(cloud: Cloud) -> None:
    c = project_client(cloud, security_group_rules=5)
    vpc, _ = vpc_with_subnet(c, "10.35.0.0/16", "10.35.1.0/24")
    g = c.security_groups.create(vpc["id"], "busy")
    for port in range(1, 5):  # with the egress rule every group starts with: 5 rules
        c.security_groups.add_rule(g["id"], "ingress", "tcp", port_min=port, cidr="0.0.0.0/0")
    expect_error(403, c.security_groups.add_rule, g["id"], "ingress", "tcp", port_min=99, cidr="0.0.0.0/0",
                 code="quota_exceeded", text="per group is 5")
    q = quota(c, "security_group_rules")
    assert (q["limit"], q["used"]) == (5, 5)  # used: the rules of the project's fullest group
    # the limit is per group: another group has room of its own
    other = c.security_groups.create(vpc["id"], "other")
    c.security_groups.add_rule(other["id"], "ingress", "tcp", port_min=99, cidr="0.0.0.0/0")
    rule = c.security_groups.rules(g["id"])[-1]
    c.security_groups.delete_rule(g["id"], rule["id"])
    c.security_groups.add_rule(g["id"], "ingress", "tcp", port_min=99, cidr="0.0.0.0/0")


def test_interface_with_a_public_ip_and_the_default_vpc(cloud: Cloud) -> None:
    c = project_client(cloud)
    nic = c.network_interfaces.create(assign_public_ip=True)
    default = c.vpcs.get("default")
    assert nic["vpc_id"] == default["id"]
    subnet = c.subnets.get(nic["subnet_id"])
    assert subnet["zone_id"] == "PAR1-a" and ipaddress.ip_address(nic["private_ip"]) in ipaddress.ip_network(
        subnet["cidr"])
    assert ipaddress.ip_address(nic["public_ip"]) in ipaddress.ip_network("203.0.113.0/24")
    fip = c.floating_ips.get(nic["floating_ip_id"])
    assert fip["network_interface_id"] == nic["id"] and fip["vpc_id"] == default["id"]
    assert quota(c, "floating_ips")["used"] == 1
    c.network_interfaces.delete(nic["id"])
    expect_error(404, c.floating_ips.get, fip["id"])  # allocated with it, released with it
    assert quota(c, "floating_ips")["used"] == 0
    # a private subnet without an internet gateway cannot hold a public address
    _, private = vpc_with_subnet(c, "10.36.0.0/16", "10.36.1.0/24", zone="PAR1-b")
    expect_error(409, c.network_interfaces.create, private["id"], assign_public_ip=True,
                 code="no_internet_route")
    assert c.network_interfaces.list(subnet_id=private["id"]) == []
    assert quota(c, "floating_ips")["used"] == 0
    expect_error(422, c.network_interfaces.create, private["id"], zone="PAR1-b")
    expect_error(422, c.network_interfaces.create, zone="NOPE-a")
