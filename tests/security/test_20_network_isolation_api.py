"""Network isolation through the API: a tenant cannot see, change, delete or use another tenant's VPCs,
subnets, interfaces, security groups, rules, floating IPs, NAT gateways or flow logs (each a 404, never
a 403 that would confirm it exists), cannot reach them by name either, and a viewer changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from hackboot.sdk import ApiError
from tests.integration.compute.conftest import builtin_images, vm_cloud  # noqa: F401  (fixtures)
from tests.security.conftest import Tenant, make_tenant, unique
from tests.support import Cloud


def refused(status: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args, **kwargs)
    assert err.value.status == status, (fn, args, kwargs, err.value.problem)
    return err.value


@pytest.fixture
def victim(tenant_factory: Callable[..., Tenant]) -> tuple[Tenant, dict[str, dict[str, Any]]]:
    """A tenant with one of every network resource."""
    t = tenant_factory("member")
    c: Any = t.client
    vpc = c.vpcs.create("secret", "10.77.0.0/16", internet_gateway=True)
    subnet = c.subnets.create(vpc["id"], "10.77.1.0/24", name="dmz", public=True)
    group = c.security_groups.create(vpc["id"], "db")
    rule = c.security_groups.add_rule(group["id"], "ingress", "tcp", port_min=5432, cidr="10.77.0.0/16")
    nic = c.network_interfaces.create(subnet["id"], name="db-0", security_groups=[group["id"]])
    fip = c.floating_ips.allocate()
    spare = c.floating_ips.allocate()
    c.floating_ips.attach(fip["id"], nic["id"])
    nat = c.nat_gateways.create(subnet["id"], name="out")
    flow = c.flow_logs.create(vpc["id"], name="audit")
    return t, {"vpc": vpc, "subnet": subnet, "group": group, "rule": rule, "nic": nic, "fip": fip, "spare": spare,
               "nat": nat, "flow": flow}


def test_another_tenants_network_is_invisible_and_untouchable(
        tenant_factory: Callable[..., Tenant], victim: tuple[Tenant, dict[str, dict[str, Any]]]) -> None:
    owner, r = victim
    attacker = tenant_factory("member")
    a: Any = attacker.client
    # nothing of theirs in any list, by id or by filter
    assert a.vpcs.list() == [] and a.subnets.list(vpc_id=r["vpc"]["id"]) == []
    assert a.network_interfaces.list(vpc_id=r["vpc"]["id"]) == [] and a.security_groups.list() == []
    assert a.floating_ips.list() == [] and a.nat_gateways.list() == [] and a.flow_logs.list() == []
    # every read, change and delete of theirs, by id and by name: 404
    for group, refs in ((a.vpcs, [r["vpc"]["id"], "secret"]), (a.subnets, [r["subnet"]["id"], "dmz"]),
                        (a.network_interfaces, [r["nic"]["id"], "db-0"]), (a.security_groups, [r["group"]["id"]]),
                        (a.floating_ips, [r["fip"]["id"], r["fip"]["address"]]), (a.nat_gateways, [r["nat"]["id"]]),
                        (a.flow_logs, [r["flow"]["id"]])):
        for ref in refs:
            refused(404, group.get, ref)
            refused(404, group.delete, ref)
    refused(404, a.vpcs.update, r["vpc"]["id"], internet_gateway=False)
    refused(404, a.subnets.update, r["subnet"]["id"], public=False)
    refused(404, a.network_interfaces.update, r["nic"]["id"], security_groups=[])
    refused(404, a.security_groups.update, r["group"]["id"], description="mine")
    refused(404, a.security_groups.rules, r["group"]["id"])
    refused(404, a.security_groups.add_rule, r["group"]["id"], "ingress", "all", cidr="0.0.0.0/0")
    refused(404, a.security_groups.delete_rule, r["group"]["id"], r["rule"]["id"])
    refused(404, a.floating_ips.detach, r["fip"]["id"])
    refused(404, a.floating_ips.update, r["fip"]["id"], description="mine")
    refused(404, a.flow_logs.records, r["flow"]["id"])

    # using theirs from the attacker's own resources: 404 as well
    refused(404, a.subnets.create, r["vpc"]["id"], "10.77.9.0/24")
    refused(404, a.security_groups.create, r["vpc"]["id"], "evil")
    refused(404, a.network_interfaces.create, r["subnet"]["id"])  # a port on their subnet
    refused(404, a.network_interfaces.create, r["subnet"]["id"], private_ip="10.77.1.200")
    refused(404, a.nat_gateways.create, r["subnet"]["id"])
    refused(404, a.flow_logs.create, r["vpc"]["id"])
    refused(404, a.flow_logs.create, r["nic"]["id"])
    own_vpc = a.vpcs.create("mine", "10.77.0.0/16", internet_gateway=True)
    own_subnet = a.subnets.create(own_vpc["id"], "10.77.1.0/24", public=True)
    own_group = a.security_groups.create(own_vpc["id"], "web")
    refused(404, a.network_interfaces.create, own_subnet["id"], security_groups=[r["group"]["id"]])
    own_nic = a.network_interfaces.create(own_subnet["id"])
    refused(404, a.network_interfaces.update, own_nic["id"], security_groups=[r["group"]["id"]])
    refused(404, a.security_groups.add_rule, own_group["id"], "ingress", "all", remote_group=r["group"]["id"])
    refused(404, a.floating_ips.attach, r["spare"]["id"], own_nic["id"])  # their address to my port
    refused(404, a.floating_ips.attach, r["spare"]["address"], own_nic["id"])
    mine = a.floating_ips.allocate()
    refused(404, a.floating_ips.attach, mine["id"], r["nic"]["id"])  # my address to their port
    refused(404, a.nat_gateways.create, own_subnet["id"], floating_ip=r["spare"]["id"])

    # and the owner's network is as it was
    o: Any = owner.client
    assert o.vpcs.get(r["vpc"]["id"])["internet_gateway"] is True
    assert o.network_interfaces.get(r["nic"]["id"])["security_group_ids"] == [r["group"]["id"]]
    assert o.network_interfaces.get(r["nic"]["id"])["public_ip"] == r["fip"]["address"]
    assert o.floating_ips.get(r["spare"]["id"])["network_interface_id"] is None
    assert len(o.security_groups.rules(r["group"]["id"])) == 2
    assert o.flow_logs.get(r["flow"]["id"])["resource_id"] == r["vpc"]["id"]


def test_a_viewer_changes_nothing(tenant_factory: Callable[..., Tenant]) -> None:
    owner = tenant_factory("member")
    o: Any = owner.client
    vpc = o.vpcs.create("net", "10.78.0.0/16")
    subnet = o.subnets.create(vpc["id"], "10.78.1.0/24")
    viewer_token = owner.client.post("/v1/tokens", {"project_id": owner.project_id, "role": "viewer",
                                                    "name": "ro"})["token"]
    from hackboot.sdk import Client

    v: Any = Client(owner.client.url, viewer_token)
    assert [x["id"] for x in v.vpcs.list()] == [vpc["id"]]  # a viewer sees
    refused(403, v.vpcs.create, "x", "10.79.0.0/16")
    refused(403, v.vpcs.default)
    refused(403, v.vpcs.delete, vpc["id"])
    refused(403, v.subnets.create, vpc["id"], "10.78.2.0/24")
    refused(403, v.network_interfaces.create, subnet["id"])
    refused(403, v.security_groups.create, vpc["id"], "g")
    refused(403, v.floating_ips.allocate)
    refused(403, v.flow_logs.create, vpc["id"])
    assert o.network_interfaces.list() == [] and len(o.vpcs.list()) == 1


@pytest.mark.qemu
def test_instance_interface_endpoints_are_scoped_and_checked(vm_cloud: Cloud) -> None:  # noqa: F811
    """GET/POST/DELETE /v1/instances/{id}/network-interfaces: another project gets 404, a viewer 403, bad
    input 422, and nothing changes."""
    owner, intruder = make_tenant(vm_cloud, "member"), make_tenant(vm_cloud, "member")
    o: Any = owner.client
    x: Any = intruder.client
    inst = o.instances.create(unique("nicsec"), flavor="VPS-NANO", image="tiny")
    path = f"/v1/instances/{inst['id']}/network-interfaces"
    [primary] = o.get(path)
    assert primary["device_index"] == 0
    spare = o.network_interfaces.create(primary["subnet_id"])
    foreign_vpc = x.vpcs.create("net", "10.77.0.0/16")
    foreign = x.network_interfaces.create(x.subnets.create(foreign_vpc["id"], "10.77.1.0/24")["id"])

    refused(404, x.get, path)
    refused(404, x.post, path, {"network_interface": foreign["id"]})
    refused(404, x.delete, f"{path}/{primary['id']}")
    refused(404, o.post, path, {"network_interface": foreign["id"]})  # another project's interface

    from hackboot.sdk import Client

    viewer_token = o.post("/v1/tokens", {"project_id": owner.project_id, "role": "viewer", "name": "ro"})["token"]
    v: Any = Client(o.url, viewer_token)
    assert [n["id"] for n in v.get(path)] == [primary["id"]]  # a viewer sees
    refused(403, v.post, path, {"network_interface": spare["id"]})
    refused(403, v.delete, f"{path}/{spare['id']}")

    refused(422, o.post, path, {"network_interface": spare["id"], "device_index": 0})  # 0 is the primary's
    refused(422, o.post, path, {"network_interface": spare["id"], "unknown": 1})
    refused(422, o.post, path, {})
    assert [n["id"] for n in o.get(path)] == [primary["id"]]
    assert o.network_interfaces.get(spare["id"])["instance_id"] is None
    assert x.network_interfaces.get(foreign["id"])["instance_id"] is None
    o.instances.delete(inst["id"])
