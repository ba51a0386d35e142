"""Floating IPs, NAT gateways and flow logs through the REST API; flow records written by the agent-side
function (in this process, into the running cloud's database) and queried with filters."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.core.config import reset_settings_cache
from hackboot.core.db import dispose_engine
from tests.integration.network.api_helpers import events_of, expect_error, project_client, quota, vpc_with_subnet
from tests.support import Cloud

POOL = ipaddress.ip_network("203.0.113.0/24")


@pytest.fixture
def cloud_db(cloud: Cloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's service functions on the running cloud's database (as the local agent uses them)."""
    url = cloud.env.get("HACKBOOT_DATABASE_URL") or f"sqlite:///{cloud.state_dir / 'hackboot.db'}"
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", url)
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    reset_settings_cache()
    dispose_engine()
    yield
    dispose_engine()
    monkeypatch.undo()
    reset_settings_cache()


def test_floating_ip_allocate_attach_detach_release(cloud: Cloud) -> None:
    c = project_client(cloud, floating_ips=3)
    vpc, public = vpc_with_subnet(c, "10.40.0.0/16", "10.40.1.0/24", public=True)
    private = c.subnets.create(vpc["id"], "10.40.2.0/24")
    web = c.network_interfaces.create(public["id"])
    app = c.network_interfaces.create(private["id"])

    fip = c.floating_ips.allocate(description="web")
    address = ipaddress.ip_address(fip["address"])
    assert address in POOL and str(address) not in ("203.0.113.0", "203.0.113.1", "203.0.113.255")
    assert fip["region_id"] == "PAR1" and fip["network_interface_id"] is None
    assert c.floating_ips.get(fip["address"])["id"] == fip["id"]
    before = c.vpcs.get(vpc["id"])["desired_version"]
    attached = c.floating_ips.attach(fip["id"], web["id"])
    assert attached["network_interface_id"] == web["id"] and attached["vpc_id"] == vpc["id"]
    assert c.vpcs.get(vpc["id"])["desired_version"] > before
    assert c.network_interfaces.get(web["id"])["public_ip"] == fip["address"]
    assert c.floating_ips.attach(fip["id"], web["id"])["id"] == fip["id"]  # idempotent
    second = c.floating_ips.allocate()
    assert second["address"] != fip["address"]
    expect_error(409, c.floating_ips.attach, fip["id"], app["id"], code="already_attached")
    expect_error(409, c.floating_ips.attach, second["id"], web["id"], code="already_attached")
    # a private subnet reaches the internet only through the VPC's internet gateway
    expect_error(409, c.floating_ips.attach, second["id"], app["id"], code="no_internet_route")
    c.vpcs.update(vpc["id"], internet_gateway=True)
    c.floating_ips.attach(second["id"], app["id"])
    expect_error(409, c.vpcs.update, vpc["id"], internet_gateway=False, code="in_use")
    expect_error(409, c.floating_ips.release, fip["id"], code="in_use")
    c.floating_ips.detach(second["id"])
    c.vpcs.update(vpc["id"], internet_gateway=False)
    expect_error(409, c.floating_ips.detach, second["id"], code="not_attached")
    assert [f["id"] for f in c.floating_ips.list(attached=True)] == [fip["id"]]

    c.floating_ips.allocate()
    expect_error(403, c.floating_ips.allocate, code="quota_exceeded")
    expect_error(409, c.floating_ips.allocate, region="MAD1", code="region_not_operational")
    # an interface deleted with a floating IP it did not bring: the address is detached, not released
    c.network_interfaces.delete(web["id"])
    kept = c.floating_ips.get(fip["id"])
    assert kept["network_interface_id"] is None and kept["vpc_id"] is None
    c.floating_ips.release(fip["id"])
    expect_error(404, c.floating_ips.get, fip["id"])
    assert quota(c, "floating_ips")["used"] == 2
    assert events_of(c, fip["id"]) == ["network.floating_ip.allocated", "network.floating_ip.attached",
                                       "network.floating_ip.detached", "network.floating_ip.released"]


def test_floating_ips_and_nat_gateways_have_hourly_list_prices(cloud: Cloud) -> None:
    prices = {p["sku"]: p for p in cloud.client().get("/v1/prices", limit=1000)["items"]}
    fip, nat = prices["network:floating-ip"], prices["network:nat-gateway"]
    assert (fip["kind"], fip["unit"], nat["unit"]) == ("network", "hour", "hour")
    assert 0 < fip["amount_eur"] < nat["amount_eur"]


def test_nat_gateways(cloud: Cloud) -> None:
    c = project_client(cloud)
    vpc, public = vpc_with_subnet(c, "10.41.0.0/16", "10.41.1.0/24", public=True)
    private = c.subnets.create(vpc["id"], "10.41.2.0/24", zone="PAR1-b")
    expect_error(409, c.nat_gateways.create, private["id"], code="subnet_not_public")
    nat = c.nat_gateways.create(public["id"], name="out")
    assert nat["id"].startswith("nat-") and nat["vpc_id"] == vpc["id"] and nat["status"] == "pending"
    assert nat["private_ip"] == "10.41.1.3" and ipaddress.ip_address(nat["public_ip"]) in POOL
    fip = c.floating_ips.get(nat["floating_ip_id"])
    assert fip["nat_gateway_id"] == nat["id"]
    expect_error(409, c.floating_ips.release, fip["id"], code="in_use")
    expect_error(409, c.floating_ips.detach, fip["id"], code="in_use")
    expect_error(409, c.subnets.update, public["id"], public=False, code="in_use")
    expect_error(409, c.subnets.delete, public["id"], code="in_use")
    assert c.subnets.get(public["id"])["available_ips"] == 251

    own = c.floating_ips.allocate()
    nat2 = c.nat_gateways.create(public["id"], floating_ip=own["address"])
    assert nat2["public_ip"] == own["address"]
    expect_error(409, c.nat_gateways.create, public["id"], floating_ip=own["id"], code="in_use")
    assert {n["id"] for n in c.nat_gateways.list(vpc_id=vpc["id"])} == {nat["id"], nat2["id"]}

    c.nat_gateways.delete(nat["id"])
    expect_error(404, c.floating_ips.get, fip["id"])  # allocated for it: released
    c.nat_gateways.delete(nat2["id"])
    assert c.floating_ips.get(own["id"])["nat_gateway_id"] is None  # the project's: kept
    assert c.subnets.get(public["id"])["available_ips"] == 252
    assert events_of(c, nat["id"]) == ["network.nat_gateway.created", "network.nat_gateway.deleted"]
    c.subnets.delete(public["id"])


def test_flow_logs_and_their_records(cloud: Cloud, cloud_db: None) -> None:
    from hackboot.network import service

    c = project_client(cloud)
    vpc, subnet = vpc_with_subnet(c, "10.42.0.0/16", "10.42.1.0/24", public=True)
    a = c.network_interfaces.create(subnet["id"])
    b = c.network_interfaces.create(subnet["id"])
    whole = c.flow_logs.create(vpc["id"], name="all")
    rejects = c.flow_logs.create(b["id"], traffic_type="REJECT")
    by_subnet = c.flow_logs.create(subnet["id"], traffic_type="ACCEPT")
    assert (whole["resource_type"], rejects["resource_type"], by_subnet["resource_type"]) == (
        "vpc", "network_interface", "subnet")
    expect_error(422, c.flow_logs.create, "i-123abc")
    expect_error(404, c.flow_logs.create, "vpc-nope")
    expect_error(422, c.flow_logs.create, vpc["id"], traffic_type="SOME")

    # a day ago (the server's own retention purge must not take them while the test runs)
    t0 = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).replace(second=0, microsecond=0)
    flows = [
        service.Flow(interface_id=a["id"], direction="egress", action="ACCEPT", protocol="tcp",
                     src_addr=a["private_ip"], src_port=40000, dst_addr="198.51.100.7", dst_port=443,
                     packets=10, bytes=4000, start_time=t0),
        service.Flow(interface_id=b["id"], direction="ingress", action="REJECT", protocol="tcp",
                     src_addr="198.51.100.9", src_port=51000, dst_addr=b["private_ip"], dst_port=22,
                     start_time=t0 + dt.timedelta(minutes=5)),
        service.Flow(interface_id=b["id"], direction="ingress", action="ACCEPT", protocol="udp",
                     src_addr=a["private_ip"], src_port=53, dst_addr=b["private_ip"], dst_port=5353,
                     start_time=t0 + dt.timedelta(minutes=10)),
        service.Flow(interface_id="nic-gone", direction="egress", action="ACCEPT", protocol="icmp",
                     src_addr="10.42.1.99", dst_addr="10.42.1.3", start_time=t0),
    ]
    # the VPC's log takes all 3, b's log the reject, the subnet's log the 2 accepts; the unknown port nothing
    assert service.ingest_flows(flows) == 6
    records = c.flow_logs.records(whole["id"])
    assert [r["dst_port"] for r in records] == [443, 22, 5353]
    assert [r["action"] for r in c.flow_logs.records(rejects["id"])] == ["REJECT"]
    assert [r["dst_port"] for r in c.flow_logs.records(by_subnet["id"])] == [443, 5353]

    def ports(**filters: object) -> list[int]:
        return [r["dst_port"] for r in c.flow_logs.records(whole["id"], **filters)]

    assert ports(action="REJECT") == [22]
    assert ports(since=(t0 + dt.timedelta(minutes=5)).isoformat()) == [22, 5353]
    no_offset = (t0 + dt.timedelta(minutes=5)).replace(tzinfo=None).isoformat()
    assert ports(until=no_offset) == [443]  # a time without an offset is UTC
    assert ports(address=a["private_ip"]) == [443, 5353]  # source or destination
    assert ports(port=53) == [5353]
    assert ports(interface_id=a["id"]) == [443]
    assert ports(protocol="udp") == [5353]
    assert ports(address="203.0.113.200") == []
    page = c.get(f"/v1/flow-logs/{whole['id']}/records", limit=2)
    assert len(page["items"]) == 2 and page["next_cursor"]
    expect_error(422, c.get, f"/v1/flow-logs/{whole['id']}/records", since="12")
    expect_error(422, c.get, f"/v1/flow-logs/{whole['id']}/records", action="DROP")

    # deleting the interface takes its flow log; the records go with the retention purge
    c.network_interfaces.delete(b["id"])
    expect_error(404, c.flow_logs.get, rejects["id"])
    assert quota(c, "flow_logs")["used"] == 2
    purged = service.purge_flow_records(now=t0 + dt.timedelta(days=30, minutes=7))
    assert purged >= 1 + 3  # the deleted log's record, and what is older than 30 days (t0, t0 + 5 min) in both
    assert ports() == [5353]
    assert [r["dst_port"] for r in c.flow_logs.records(by_subnet["id"])] == [5353]
    c.flow_logs.delete(whole["id"])
    assert [f["id"] for f in c.flow_logs.list(vpc_id=vpc["id"])] == [by_subnet["id"]]
    assert "network.flow_log.deleted" in events_of(c, whole["id"])
