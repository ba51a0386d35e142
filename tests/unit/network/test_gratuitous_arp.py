"""The announcement a host sends on its uplink when it starts answering for a public address."""

from __future__ import annotations

import struct

from hackboot.network.linux import gratuitous_arp


def test_a_broadcast_arp_request_for_the_address_from_the_address() -> None:
    mac = bytes.fromhex("02aabbccddee")
    frame = gratuitous_arp(mac, "203.0.113.9")
    assert len(frame) == 42  # Ethernet header 14 + ARP 28 (the NIC pads it)
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    ip = bytes([203, 0, 113, 9])
    assert frame[22:28] == mac and frame[28:32] == ip, "sender: this host's uplink MAC, the address"
    assert frame[32:38] == b"\x00" * 6 and frame[38:42] == ip, "target: the same address (an announcement)"
