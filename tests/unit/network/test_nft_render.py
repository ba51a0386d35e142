"""The nftables renderer: set elements are exact and disjoint, and rule count does not grow with rules."""

from __future__ import annotations

import ipaddress
import random
import re

from hackboot.network.driver import (
    Attachment,
    FloatingIpSpec,
    FlowLogSpec,
    NatSpec,
    PortSpec,
    SecurityGroupRule,
    SecurityGroupSpec,
    SubnetSpec,
    VpcSpec,
)
from hackboot.network.nft import (
    disjoint_elements,
    group_sets,
    merge_ranges,
    render_host,
    render_router,
    subtract_ranges,
)

N = ipaddress.IPv4Network
VPC = VpcSpec("vpc-1", 7, "10.0.0.0/16", (SubnetSpec("sn-1", "10.0.1.0/24", "10.0.1.1", "10.0.1.2", True),))


def port(i: int, groups: tuple[str, ...] = ("sg-a",)) -> PortSpec:
    return PortSpec(f"eni-{i}", "sn-1", f"02:00:00:00:00:{i:02x}", f"10.0.1.{10 + i}", groups, None,
                    Attachment("veth", "hb-x", "eth0"))


def rules_of(text: str) -> list[str]:
    """Rule lines of the chains (not set elements, not chain headers)."""
    out, in_chain = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("chain "):
            in_chain = True
        elif s == "}":
            in_chain = False
        elif in_chain and s and not s.startswith("type "):
            out.append(s)
    return out


def test_range_helpers() -> None:
    assert merge_ranges([(5, 9), (1, 3), (4, 4), (20, 30), (25, 40)]) == [(1, 9), (20, 40)]
    assert subtract_ranges([(0, 100)], [(10, 20), (50, 60)]) == [(0, 9), (21, 49), (61, 100)]
    assert subtract_ranges([(10, 20)], [(0, 100)]) == []


def test_disjoint_elements_match_exactly_the_same_points() -> None:
    rng = random.Random(7)
    nets = [N("10.0.0.0/8"), N("10.1.0.0/16"), N("10.1.2.0/24"), N("10.1.2.3/32"), N("192.168.0.0/16"),
            N("0.0.0.0/0")]
    entries = []
    for _ in range(60):
        lo = rng.randrange(0, 200)
        entries.append((rng.choice(nets), lo, lo + rng.randrange(0, 40)))
    out = disjoint_elements(entries)
    # Pairwise disjoint: nested CIDRs never share a value.
    for i, (na, ra) in enumerate(out):
        for nb, rb in out[i + 1:]:
            if na.overlaps(nb):
                assert not any(a0 <= b1 and b0 <= a1 for a0, a1 in ra for b0, b1 in rb), (na, nb)
    # Same matches as the input, on probe addresses inside every CIDR.
    probes = [ipaddress.IPv4Address(a) for a in ("10.1.2.3", "10.1.2.4", "10.1.3.1", "10.2.0.1", "192.168.1.1",
                                                   "8.8.8.8")]
    for addr in probes:
        for value in range(0, 260):
            want = any(addr in n and lo <= value <= hi for n, lo, hi in entries)
            got = sum(1 for n, ranges in out if addr in n for lo, hi in ranges if lo <= value <= hi)
            assert got == int(want), (addr, value, got, want)


def test_group_sets_fold_cidrs_and_source_members_into_sets() -> None:
    g = SecurityGroupSpec("sg-a", (
        SecurityGroupRule("ingress", "tcp", 22, 22, cidrs=("10.0.0.0/8",)),
        SecurityGroupRule("ingress", "tcp", 20, 30, cidrs=("10.0.1.0/24",)),
        SecurityGroupRule("ingress", "tcp", 22, 22, remote_ips=("10.0.1.5",)),  # redundant: already allowed
        SecurityGroupRule("ingress", "udp", cidrs=("0.0.0.0/0",)),
        SecurityGroupRule("ingress", "icmp", 8, 8, cidrs=("10.0.0.0/16",)),
        SecurityGroupRule("ingress", "all", remote_ips=("10.0.1.7", "10.0.1.6")),
        SecurityGroupRule("egress", "all", cidrs=("0.0.0.0/0",)),
    ))
    ing = group_sets(g, "ingress")
    assert ing.l4 == ["10.0.0.0/8 . tcp . 22", "10.0.1.0/24 . tcp . 20-21", "10.0.1.0/24 . tcp . 23-30",
                      "0.0.0.0/0 . udp . 0-65535"]
    assert ing.icmp == ["10.0.0.0/16 . 8"]
    assert ing.any == ["10.0.1.6/31"]
    assert group_sets(g, "egress").any == ["0.0.0.0/0"]


def test_thousand_rules_are_set_elements_not_rules() -> None:
    small = SecurityGroupSpec("sg-a", (SecurityGroupRule("ingress", "tcp", 80, 80, cidrs=("10.0.0.0/16",)),))
    big = SecurityGroupSpec("sg-a", tuple(
        SecurityGroupRule("ingress", "tcp", 1000 + i, 1000 + i, cidrs=(f"10.{i // 250}.{i % 250}.0/24",))
        for i in range(1000)))
    ports = [port(i) for i in range(5)]
    ifnames = {p.id: f"p{i:011x}" for i, p in enumerate(ports)}
    a = render_router(VPC, ports, ifnames, [], [small], [], None, [])
    b = render_router(VPC, ports, ifnames, [], [big], [], None, [])
    assert rules_of(a) == rules_of(b), "the chains do not depend on the number of rules"
    assert len(re.findall(r" \. tcp \. ", b)) == 1000, "every rule is a set element"
    assert len(rules_of(b)) < 30 + 12 * len(ports)
    assert "flags interval" in b and "vmap @from_port" in b and "vmap @to_port" in b


def test_port_chains_check_identity_and_groups() -> None:
    p = port(1, ("sg-a", "sg-b"))
    text = render_router(VPC, [p], {p.id: "p00000000001"}, [], [SecurityGroupSpec("sg-a"), SecurityGroupSpec("sg-b")],
                         [FloatingIpSpec("203.0.113.5", p.id)], NatSpec("nat", "203.0.113.9", ("10.0.2.0/24",)),
                         [FlowLogSpec("fl", traffic="reject")])
    assert "ether saddr != 02:00:00:00:00:01 drop" in text and "ip saddr != 10.0.1.11 drop" in text
    assert "@sg0_out_l4" in text and "@sg1_in_any" in text
    assert "203.0.113.5 : 10.0.1.11" in text and "10.0.1.11 : 203.0.113.5" in text
    assert "snat ip to 203.0.113.9" in text
    assert '"hbfl i r eni-1 "' in text and '"hbfl i a eni-1 "' not in text, "only rejects are logged"
    assert text.startswith("table inet hb\ndelete table inet hb\n"), "one atomic replace"


def test_no_group_means_nothing_passes() -> None:
    p = port(1, ())
    text = render_router(VPC, [p], {p.id: "p00000000001"}, [], [], [], None, [])
    chain = text.split("chain i_p00000000001 {")[1].split("}")[0]
    assert chain.split() == ["drop"]


def test_host_table() -> None:
    text = render_host(underlay_if="ul0", uplink_if="wan0", transit_prefix="t",
                       public_src=[("tabc", "203.0.113.5"), ("tabc", "203.0.113.9")], vxlan_peers=["192.0.2.12"])
    assert '"tabc" . 203.0.113.5' in text and "192.0.2.12" in text
    assert 'iifname "t*" drop' in text and "policy drop" in text
