"""nftables rulesets of the data plane, rendered as text from the desired state (pure functions).

Two tables, each loaded as one ``nft -f`` transaction that deletes and recreates it, so a change is
atomic and established flows are untouched (conntrack state does not live in the table):

``table inet hb`` in a VPC's router namespace:
  * ``forward`` (policy drop): ``ct state established,related accept`` first, so only a connection's
    first packet is ever classified. Then a verdict map keyed by the input interface jumps to the
    sending port's egress chain, whose accepted packets go on to ``to_dst``: a verdict map keyed by the
    output interface jumps to the receiving port's ingress chain. Packets from the VXLAN device were
    checked for egress on their host; packets from the uplink enter only through a floating IP's DNAT.
  * per port: anti-spoofing (its MAC and IP only), then, for each of its security groups, three set
    lookups — ``addr . proto . port`` (TCP/UDP), ``addr . icmp type`` and ``addr`` (all protocols).
    Every rule of a group, whatever their number, lands in those sets (interval sets, looked up in
    logarithmic time), so a port's chain has 3 × (its groups) rules: 1,000 rules are 3 lookups, not
    1,000 checks. Source-group rules arrive as member IPs and become /32 elements of the same sets.
  * ``prerouting``/``postrouting`` (NAT): floating IPs are DNAT/SNAT maps; a NAT gateway is an SNAT of
    the private subnets' sources to its public IP.
  * flow logs: ``log group 1`` on a port's accept (new connections) and reject points, rate-limited per
    port and direction so a flood cannot drown the log.

``table inet hb_host`` in the host namespace: anti-spoofing on the routers' transit links (a router may
only emit its own public addresses), VXLAN accepted only from known peers, nothing from tenants or the
uplink to the host itself.

Overlapping elements: a concatenated interval set refuses an element that starts inside another, so
:func:`disjoint_elements` rewrites (CIDR, port range) pairs into an equivalent disjoint list. CIDRs are
nested or disjoint; each CIDR keeps only the ranges its enclosing CIDRs do not already allow.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hackboot.network.driver import (
    FloatingIpSpec,
    FlowLogSpec,
    NatSpec,
    PortSpec,
    RemotePort,
    SecurityGroupRule,
    SecurityGroupSpec,
    VpcSpec,
)

ROUTER_TABLE = "hb"
HOST_TABLE = "hb_host"
UPLINK_IF = "up0"  # router side of the transit link to the host namespace
VXLAN_IF = "vx0"
LOG_GROUP = 1
LOG_PREFIX = "hbfl"
LOG_RATE = "limit rate 200/second burst 400 packets"
Net = ipaddress.IPv4Network
Range = tuple[int, int]


# --- interval arithmetic -------------------------------------------------------------------------

def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, non-overlapping, non-adjacent union of inclusive ranges."""
    out: list[Range] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def subtract_ranges(ranges: Sequence[Range], minus: Sequence[Range]) -> list[Range]:
    """`ranges` minus `minus` (both merged)."""
    out: list[Range] = []
    for lo, hi in ranges:
        cur = lo
        for mlo, mhi in minus:
            if mhi < cur or mlo > hi:
                continue
            if mlo > cur:
                out.append((cur, mlo - 1))
            cur = max(cur, mhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    return out


def disjoint_elements(entries: Iterable[tuple[Net, int, int]]) -> list[tuple[Net, list[Range]]]:
    """(CIDR, lo, hi) entries → [(CIDR, ranges)] whose (address, value) points match exactly the same
    pairs, with no two elements overlapping (what a concatenated interval set requires).

    A CIDR lists only the ranges none of its enclosing CIDRs allows: a point inside a nested CIDR is
    matched by the element of the innermost CIDR that allows its value, and by no other.
    """
    own: dict[Net, list[Range]] = {}
    for net, lo, hi in entries:
        own.setdefault(net, []).append((lo, hi))
    cumulative: dict[Net, list[Range]] = {}
    out: list[tuple[Net, list[Range]]] = []
    for net in sorted(own, key=lambda n: (n.prefixlen, int(n.network_address))):
        inherited: list[Range] = []
        for plen in range(net.prefixlen - 1, -1, -1):  # nearest enclosing CIDR already seen
            parent = net.supernet(new_prefix=plen)
            if parent in cumulative:
                inherited = cumulative[parent]
                break
        mine = merge_ranges(own[net])
        cumulative[net] = merge_ranges([*inherited, *mine])
        extra = subtract_ranges(mine, inherited)
        if extra:
            out.append((net, extra))
    return out


# --- security group sets -------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupSets:
    """One group's rules of one direction, as set elements."""

    l4: list[str]  # "addr . proto . port(s)"
    icmp: list[str]  # "addr . type(s)"
    any: list[str]  # "addr"


def _addr(net: Net) -> str:
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _rule_nets(rule: SecurityGroupRule) -> list[Net]:
    nets = [ipaddress.IPv4Network(c, strict=False) for c in rule.cidrs]
    nets += [ipaddress.IPv4Network(f"{ip}/32") for ip in rule.remote_ips]
    return nets


def group_sets(group: SecurityGroupSpec, direction: str) -> GroupSets:
    by_proto: dict[str, list[tuple[Net, int, int]]] = {"tcp": [], "udp": [], "icmp": []}
    any_nets: list[Net] = []
    for rule in group.rules:
        if rule.direction != direction:
            continue
        nets = _rule_nets(rule)
        if rule.protocol == "all":
            any_nets += nets
            continue
        top = 255 if rule.protocol == "icmp" else 65535
        lo = rule.port_min if rule.port_min is not None else 0
        hi = rule.port_max if rule.port_max is not None else top
        by_proto[rule.protocol] += [(n, lo, hi) for n in nets]
    l4 = [f"{_addr(n)} . {proto} . {_span(lo, hi)}"
          for proto in ("tcp", "udp") for n, ranges in disjoint_elements(by_proto[proto]) for lo, hi in ranges]
    icmp = [f"{_addr(n)} . {_span(lo, hi)}" for n, ranges in disjoint_elements(by_proto["icmp"]) for lo, hi in ranges]
    anys = [_addr(n) for n in ipaddress.collapse_addresses(any_nets)]
    return GroupSets(l4, icmp, anys)


# --- rendering helpers ---------------------------------------------------------------------------

def _elements(items: Sequence[str], indent: str = "    ") -> str:
    if not items:
        return ""
    # One element per line keeps huge sets readable and diffs small.
    body = (",\n" + indent + "  ").join(items)
    return f"{indent}elements = {{\n{indent}  {body}\n{indent}}}\n"


def _set(name: str, typ: str, items: Sequence[str], *, interval: bool = False) -> str:
    flags = "    flags interval\n" if interval else ""
    return f"  set {name} {{\n    type {typ}\n{flags}{_elements(items)}  }}\n"


def _map(name: str, typ: str, items: Sequence[str]) -> str:
    return f"  map {name} {{\n    type {typ}\n{_elements(items)}  }}\n"


def _chain(name: str, rules: Sequence[str], hook: str | None = None) -> str:
    head = f"    {hook}\n" if hook else ""
    body = "".join(f"    {r}\n" for r in rules)
    return f"  chain {name} {{\n{head}{body}  }}\n"


def _q(text: str) -> str:
    return '"' + text.replace('"', "") + '"'


def log_prefix(direction: str, action: str, port_id: str) -> str:
    """The NFLOG prefix of a flow-log point: ``hbfl <i|e> <a|r> <port id> ``."""
    return f"{LOG_PREFIX} {direction[0]} {action[0]} {port_id} "


def flow_logged(port_id: str, flow_logs: Sequence[FlowLogSpec]) -> tuple[bool, bool]:
    """(log accepted, log rejected) for a port."""
    acc = rej = False
    for fl in flow_logs:
        if fl.port_ids is None or port_id in fl.port_ids:
            acc |= fl.traffic in ("accept", "all")
            rej |= fl.traffic in ("reject", "all")
    return acc, rej


# --- the router table ----------------------------------------------------------------------------

def render_router(vpc: VpcSpec, ports: Sequence[PortSpec], ifnames: Mapping[str, str],
                  remote_ports: Sequence[RemotePort], groups: Sequence[SecurityGroupSpec],
                  floating_ips: Sequence[FloatingIpSpec], nat: NatSpec | None,
                  flow_logs: Sequence[FlowLogSpec]) -> str:
    """The complete ``table inet hb`` of a VPC's router, as an atomic replace script.

    `ifnames` maps each local port id to its interface in the router namespace.
    """
    used = sorted({g for p in ports for g in p.security_groups})
    by_id = {g.id: g for g in groups}
    gidx = {gid: i for i, gid in enumerate(used)}
    port_ip = {p.id: p.ip for p in ports}
    parts = [f"table inet {ROUTER_TABLE}\n", f"delete table inet {ROUTER_TABLE}\n", f"table inet {ROUTER_TABLE} {{\n"]

    for gid in used:
        i = gidx[gid]
        for direction, d in (("ingress", "in"), ("egress", "out")):
            gs = group_sets(by_id[gid], direction)
            parts.append(_set(f"sg{i}_{d}_l4", "ipv4_addr . inet_proto . inet_service", gs.l4, interval=True))
            parts.append(_set(f"sg{i}_{d}_icmp", "ipv4_addr . icmp_type", gs.icmp, interval=True))
            parts.append(_set(f"sg{i}_{d}_any", "ipv4_addr", gs.any, interval=True))

    parts.append(_set("remote_ips", "ipv4_addr", sorted({r.ip for r in remote_ports}, key=_ipkey)))
    parts.append(_set("port_src", "ifname . ipv4_addr",
                      [f"{_q(ifnames[p.id])} . {p.ip}" for p in ports]))
    parts.append(_set("port_ifs", "ifname", [_q(ifnames[p.id]) for p in ports]))
    fips = sorted(floating_ips, key=lambda f: _ipkey(f.public_ip))
    parts.append(_set("fip_private", "ipv4_addr", sorted({port_ip[f.port_id] for f in fips}, key=_ipkey)))
    nat_src = [_addr(n) for n in ipaddress.collapse_addresses(
        ipaddress.IPv4Network(c) for c in (nat.source_cidrs if nat else ()))]
    parts.append(_set("nat_src", "ipv4_addr", nat_src, interval=True))
    parts.append(_map("fip_in", "ipv4_addr : ipv4_addr", [f"{f.public_ip} : {port_ip[f.port_id]}" for f in fips]))
    parts.append(_map("fip_out", "ipv4_addr : ipv4_addr", [f"{port_ip[f.port_id]} : {f.public_ip}" for f in fips]))
    ordered = sorted(ports, key=lambda p: ifnames[p.id])
    parts.append(_map("from_port", "ifname : verdict",
                      [f"{_q(ifnames[p.id])} : jump o_{ifnames[p.id]}" for p in ordered]))
    parts.append(_map("to_port", "ifname : verdict",
                      [f"{_q(ifnames[p.id])} : jump i_{ifnames[p.id]}" for p in ordered]))

    # Traffic to the router itself: DHCP (sent from 0.0.0.0) and, from a port's own address, DNS and ping.
    parts.append(_chain("input", [
        'iifname "lo" accept',
        "ct state established,related accept",
        "ct state invalid drop",
        "meta nfproto ipv6 drop",
        "iifname @port_ifs udp sport 68 udp dport 67 accept",
        "iifname . ip saddr @port_src jump services",
    ], "type filter hook input priority filter; policy drop;"))
    parts.append(_chain("services", [
        "udp dport 53 accept",
        "tcp dport 53 accept",
        "icmp type echo-request limit rate 100/second burst 200 packets accept",
        "drop",
    ]))
    parts.append(_chain("forward", [
        "ct state established,related accept",
        "ct state invalid drop",
        "meta nfproto ipv6 drop",
        "iifname vmap @from_port",
        f'iifname "{VXLAN_IF}" ip saddr @remote_ips goto to_dst',
        f'iifname "{UPLINK_IF}" ct status dnat goto to_dst',
    ], "type filter hook forward priority filter; policy drop;"))
    parts.append(_chain("to_dst", [
        "oifname vmap @to_port",
        f'oifname "{VXLAN_IF}" accept',
        # Out to the internet only with a public address waiting in postrouting (floating IP or NAT).
        f'oifname "{UPLINK_IF}" ip saddr @fip_private accept',
        f'oifname "{UPLINK_IF}" ip saddr @nat_src accept',
        "drop",
    ]))
    for p in ordered:
        name = ifnames[p.id]
        log_acc, log_rej = flow_logged(p.id, flow_logs)
        idx = [gidx[g] for g in sorted(set(p.security_groups))]
        eg = [f"ether saddr != {p.mac} drop", f"ip saddr != {p.ip} drop"]
        ing = []
        for i in idx:
            eg += [f"ip daddr . meta l4proto . th dport @sg{i}_out_l4 goto o_{name}_ok",
                   f"meta l4proto icmp ip daddr . icmp type @sg{i}_out_icmp goto o_{name}_ok",
                   f"ip daddr @sg{i}_out_any goto o_{name}_ok"]
            ing += [f"ip saddr . meta l4proto . th dport @sg{i}_in_l4 goto i_{name}_ok",
                    f"meta l4proto icmp ip saddr . icmp type @sg{i}_in_icmp goto i_{name}_ok",
                    f"ip saddr @sg{i}_in_any goto i_{name}_ok"]
        for rules, direction in ((eg, "egress"), (ing, "ingress")):
            if log_rej:
                rules.append(f"{LOG_RATE} log prefix {_q(log_prefix(direction, 'reject', p.id))} "
                             f"group {LOG_GROUP} snaplen 64")
            rules.append("drop")
        parts.append(_chain(f"o_{name}", eg))
        parts.append(_chain(f"i_{name}", ing))
        acc_o = [f"{LOG_RATE} log prefix {_q(log_prefix('egress', 'accept', p.id))} group {LOG_GROUP} snaplen 64"]
        acc_i = [f"{LOG_RATE} log prefix {_q(log_prefix('ingress', 'accept', p.id))} group {LOG_GROUP} snaplen 64"]
        parts.append(_chain(f"o_{name}_ok", [*(acc_o if log_acc else []), "goto to_dst"]))
        parts.append(_chain(f"i_{name}_ok", [*(acc_i if log_acc else []), "accept"]))

    post = [f'oifname "{UPLINK_IF}" snat ip to ip saddr map @fip_out']
    if nat is not None:
        post.append(f'oifname "{UPLINK_IF}" ip saddr @nat_src snat ip to {nat.public_ip}')
    parts.append(_chain("prerouting", [f'iifname "{UPLINK_IF}" dnat ip to ip daddr map @fip_in'],
                        "type nat hook prerouting priority dstnat; policy accept;"))
    parts.append(_chain("postrouting", post, "type nat hook postrouting priority srcnat; policy accept;"))
    parts.append("}\n")
    return "".join(parts)


# --- the host table ------------------------------------------------------------------------------

def render_host(*, underlay_if: str, uplink_if: str, transit_prefix: str,
                public_src: Sequence[tuple[str, str]], vxlan_peers: Sequence[str]) -> str:
    """The host namespace's ``table inet hb_host``.

    `public_src`: (transit interface, public IP) pairs — what each router may emit toward the uplink and
    what the uplink may reach; `vxlan_peers`: underlay IPs of the hosts sharing a VPC with this one.
    """
    pairs = sorted(set(public_src), key=lambda t: (t[0], _ipkey(t[1])))
    publics = sorted({ip for _, ip in pairs}, key=_ipkey)
    parts = [f"table inet {HOST_TABLE}\n", f"delete table inet {HOST_TABLE}\n", f"table inet {HOST_TABLE} {{\n",
             _set("public_src", "ifname . ipv4_addr", [f"{_q(i)} . {ip}" for i, ip in pairs]),
             _set("public_ips", "ipv4_addr", publics),
             _set("vxlan_peers", "ipv4_addr", sorted(set(vxlan_peers), key=_ipkey))]
    parts.append(_chain("input", [
        'iifname "lo" accept',
        "ct state established,related accept",
        f'iifname "{underlay_if}" udp dport 4789 ip saddr @vxlan_peers accept',
        f'iifname "{underlay_if}" udp dport 4789 drop',
        f'iifname "{transit_prefix}*" drop',
        f'iifname "{uplink_if}" drop',
    ], "type filter hook input priority filter; policy accept;"))
    parts.append(_chain("forward", [
        "ct state established,related accept",
        "ct state invalid drop",
        "iifname . ip saddr @public_src accept",
        f'iifname "{uplink_if}" ip daddr @public_ips accept',
    ], "type filter hook forward priority filter; policy drop;"))
    parts.append("}\n")
    return "".join(parts)


def _ipkey(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))
