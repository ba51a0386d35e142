"""IPAM rules as pure logic: which CIDRs a VPC or a subnet may have, reserved addresses, picking, MACs."""

from __future__ import annotations

import ipaddress

import pytest

from hackboot.core import errors
from hackboot.network import ipam

N = ipaddress.IPv4Network
A = ipaddress.IPv4Address


@pytest.mark.parametrize("text, says", [
    ("10.0.0.1/24", "host bits set: the network is 10.0.0.0/24"),
    ("10.0.0.0", "CIDR notation"),
    ("10.0.0.0/33", "not an IPv4 network"),
    ("fd00::/64", "only IPv4"),
    ("010.0.0.0/16", "not an IPv4 network"),
    ("ten/8", "not an IPv4 network"),
])
def test_parse_network_refuses_what_is_not_an_ipv4_network(text: str, says: str) -> None:
    with pytest.raises(errors.ValidationFailed) as err:
        ipam.parse_network(text)
    assert says in err.value.detail
    assert err.value.errors[0]["loc"] == ["body", "cidr"]


def test_parse_network_and_address() -> None:
    assert ipam.parse_network("192.168.4.0/22") == N("192.168.4.0/22")
    assert ipam.parse_address("10.0.0.7") == A("10.0.0.7")
    for bad in ("10.0.0.256", "10.0.0", "::1", "10.0.0.07"):
        with pytest.raises(errors.ValidationFailed):
            ipam.parse_address(bad)


@pytest.mark.parametrize("cidr", ["10.0.0.0/16", "172.16.0.0/16", "172.31.255.240/28", "192.168.0.0/16",
                                  "10.255.255.0/24"])
def test_private_networks_of_16_to_28_make_vpcs(cidr: str) -> None:
    ipam.check_vpc_cidr(N(cidr))


@pytest.mark.parametrize("cidr, says", [
    ("11.0.0.0/16", "RFC 1918"), ("172.32.0.0/16", "RFC 1918"), ("192.169.0.0/16", "RFC 1918"),
    ("100.64.0.0/16", "RFC 1918"), ("10.0.0.0/15", "/16 to /28"), ("10.0.0.0/8", "/16 to /28"),
    ("10.0.0.0/29", "/16 to /28"), ("172.16.0.0/12", "/16 to /28"),
])
def test_other_networks_do_not(cidr: str, says: str) -> None:
    with pytest.raises(errors.ValidationFailed) as err:
        ipam.check_vpc_cidr(N(cidr))
    assert says in err.value.detail


def test_subnets_lie_inside_their_vpc_and_are_28_at_most() -> None:
    vpc = N("10.1.0.0/16")
    ipam.check_subnet_cidr(N("10.1.0.0/16"), vpc)  # the whole VPC is a valid subnet
    ipam.check_subnet_cidr(N("10.1.255.240/28"), vpc)
    with pytest.raises(errors.ValidationFailed, match="not inside"):
        ipam.check_subnet_cidr(N("10.2.0.0/24"), vpc)
    with pytest.raises(errors.ValidationFailed, match="not inside"):
        ipam.check_subnet_cidr(N("10.0.0.0/15"), vpc)
    with pytest.raises(errors.ValidationFailed, match="/28"):
        ipam.check_subnet_cidr(N("10.1.0.0/29"), vpc)


def test_overlaps_are_found_both_ways() -> None:
    others = {"a": "10.0.1.0/24", "b": "10.0.2.0/24", "c": "10.0.4.0/22"}
    assert ipam.overlapping(N("10.0.1.128/25"), others) == ["a"]  # inside one
    assert ipam.overlapping(N("10.0.0.0/22"), others) == ["a", "b"]  # around two
    assert ipam.overlapping(N("10.0.3.0/24"), others) == []  # between
    assert ipam.overlapping(N("10.0.4.0/22"), others) == ["c"]  # the same


def test_a_28_reserves_network_gateway_dns_and_broadcast() -> None:
    lay = ipam.layout(N("10.0.0.16/28"))
    assert (lay.gateway, lay.dns, lay.broadcast) == (A("10.0.0.17"), A("10.0.0.18"), A("10.0.0.31"))
    assert lay.reserved == {A("10.0.0.16"), A("10.0.0.17"), A("10.0.0.18"), A("10.0.0.31")}
    assert lay.capacity == 12
    assert ipam.layout(N("10.0.0.0/16")).capacity == 65536 - 4
    with pytest.raises(ValueError):
        ipam.layout(N("10.0.0.0/29"))


def test_pick_free_takes_the_lowest_free_and_says_when_full() -> None:
    lay = ipam.layout(N("10.0.0.0/28"))
    assert ipam.pick_free(lay, set()) == A("10.0.0.3")
    used = {int(A("10.0.0.3")), int(A("10.0.0.4")), int(A("10.0.0.6"))}
    assert ipam.pick_free(lay, used) == A("10.0.0.5")
    every = {int(A(f"10.0.0.{i}")) for i in range(3, 15)}
    assert len(every) == lay.capacity
    assert ipam.pick_free(lay, every) is None


def test_a_requested_address_is_a_free_unreserved_one_of_the_subnet() -> None:
    lay = ipam.layout(N("10.0.0.0/24"))
    ipam.check_requested(lay, A("10.0.0.200"), set())
    for reserved in ("10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.255"):
        with pytest.raises(errors.ValidationFailed, match="reserved"):
            ipam.check_requested(lay, A(reserved), set())
    with pytest.raises(errors.ValidationFailed, match="not in the subnet"):
        ipam.check_requested(lay, A("10.0.1.5"), set())
    with pytest.raises(errors.Conflict) as err:
        ipam.check_requested(lay, A("10.0.0.9"), {int(A("10.0.0.9"))})
    assert err.value.code == "address_in_use"


def test_macs_are_random_locally_administered_unicast() -> None:
    macs = {ipam.new_mac() for _ in range(2000)}
    assert len(macs) == 2000
    for mac in macs:
        octets = [int(x, 16) for x in mac.split(":")]
        assert len(octets) == 6 and mac == mac.lower()
        assert octets[0] & 0x01 == 0  # unicast
        assert octets[0] & 0x02 == 0x02  # locally administered: never a vendor's address
