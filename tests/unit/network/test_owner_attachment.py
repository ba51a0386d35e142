"""Interfaces owned by something other than an instance (a load balancer's VIP) are realised the way their
owner registered; an instance's stay taps."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hackboot.network import agent
from hackboot.network.driver import Attachment
from hackboot.network.models import NetworkInterface


@pytest.fixture
def registry() -> Iterator[None]:
    saved = dict(agent._owner_attachments)
    yield
    agent._owner_attachments.clear()
    agent._owner_attachments.update(saved)


def nic(owner: str | None) -> NetworkInterface:
    return NetworkInterface(id="nic-1", instance_id=owner)


def test_a_registered_owner_prefix_chooses_the_attachment(registry: None) -> None:
    agent.register_owner_attachment("lbx-", lambda n: Attachment("veth", namespace=f"hb-{n.instance_id}"))
    assert agent.default_attachment(nic("lbx-42")) == Attachment("veth", namespace="hb-lbx-42")
    assert agent.default_attachment(nic("i-42")) == Attachment("tap")
    assert agent.default_attachment(nic(None)) == Attachment("tap")


@pytest.mark.parametrize("prefix", ["i-", "vpc-", "lb"])
def test_instance_prefixes_and_prefixes_without_a_dash_are_refused(registry: None, prefix: str) -> None:
    with pytest.raises(ValueError):
        agent.register_owner_attachment(prefix, lambda n: Attachment("tap"))
