"""Helpers of the control-plane tests of load balancers (the REST API through the SDK)."""

from __future__ import annotations

from typing import Any

from hackboot.sdk import Client
from tests.integration.network.api_helpers import unique


def lb_network(client: Client, second_octet: int, *, public: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """A VPC 10.<n>.0.0/16 with an internet gateway and a subnet 10.<n>.1.0/24 in PAR1-a (the local host's)."""
    vpc = client.vpcs.create(unique("vpc"), f"10.{second_octet}.0.0/16", internet_gateway=True)
    subnet = client.subnets.create(vpc["id"], f"10.{second_octet}.1.0/24", zone="PAR1-a", public=public,
                                   name=unique("sn"))
    return vpc, subnet


def event_types(client: Client, resource_id: str) -> list[str]:
    page = client.get("/v1/events", resource_id=resource_id, limit=500)
    return [e["type"] for e in page["items"]]


def events(client: Client, resource_id: str) -> list[dict[str, Any]]:
    page = client.get("/v1/events", resource_id=resource_id, limit=500)
    return list(page["items"])
