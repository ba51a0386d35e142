"""Flow logs: read the packets nftables sends to an NFLOG group, inside one namespace.

The router's rules ``log prefix "hbfl <i|e> <a|r> <port id> " group 1 snaplen 64`` on each port's accept
point (first packet of a connection) and reject point; this module binds a netlink socket to that group
*inside the router namespace* (NFLOG instances are per namespace) and turns each message into a
:class:`FlowRecord`. A plain ``AF_NETLINK`` socket is enough: two messages, a few attributes.

Records wait in a bounded buffer until :meth:`NflogReader.drain`; when it is full the oldest go and are
counted in ``dropped`` (a tenant's flood must not eat the agent's memory).
"""

from __future__ import annotations

import collections
import datetime as dt
import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable

from hackboot.network import netns
from hackboot.network.driver import FlowAction, FlowRecord
from hackboot.network.nft import LOG_PREFIX

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_TIMESTAMP = 3
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
_PROTOS = {1: "icmp", 6: "tcp", 17: "udp"}


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= len(data):
        length, typ = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[typ & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


def _attr(typ: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), typ) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _config_msg(group: int, seq: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                       NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def parse_packet(msg: bytes, vpc_id: str) -> FlowRecord | None:
    """One NFULNL_MSG_PACKET (without its netlink header) → a record, or None if it is not ours."""
    attrs = _attrs(msg, 4)  # after struct nfgenmsg
    prefix = attrs.get(NFULA_PREFIX, b"").rstrip(b"\0").decode(errors="replace").split()
    if len(prefix) != 4 or prefix[0] != LOG_PREFIX:
        return None
    _, d, a, port_id = prefix
    payload = attrs.get(NFULA_PAYLOAD, b"")
    if len(payload) < 20 or payload[0] >> 4 != 4:
        return None
    ihl = (payload[0] & 0x0F) * 4
    total = struct.unpack_from("!H", payload, 2)[0]
    proto = payload[9]
    src, dst = socket.inet_ntoa(payload[12:16]), socket.inet_ntoa(payload[16:20])
    sport = dport = None
    if proto in (6, 17) and len(payload) >= ihl + 4:
        sport, dport = struct.unpack_from("!HH", payload, ihl)
    when = dt.datetime.now(dt.UTC)
    ts = attrs.get(NFULA_TIMESTAMP)
    if ts and len(ts) == 16:
        sec, usec = struct.unpack("!QQ", ts)
        if sec:
            when = dt.datetime.fromtimestamp(sec + usec / 1e6, dt.UTC)
    action: FlowAction = "accept" if a == "a" else "reject"
    return FlowRecord(time=when, vpc_id=vpc_id, port_id=port_id, direction="ingress" if d == "i" else "egress",
                      action=action, protocol=_PROTOS.get(proto, str(proto)), src_ip=src, dst_ip=dst,
                      src_port=sport, dst_port=dport, length=total)


class NflogReader:
    """A thread bound to NFLOG `group` in namespace `namespace`, buffering the VPC's flow records."""

    def __init__(self, namespace: str, vpc_id: str, group: int = 1, capacity: int = 100_000,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.namespace = netns.check_name(namespace)
        self.vpc_id = vpc_id
        self.group = group
        self.dropped = 0
        self._buf: collections.deque[FlowRecord] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._on_error = on_error
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"nflog-{namespace}", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def drain(self) -> list[FlowRecord]:
        with self._lock:
            out = list(self._buf)
            self._buf.clear()
        return out

    def _bind(self) -> socket.socket:
        netns.enter(self.namespace)  # this thread only: the socket belongs to the router's namespace
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.bind((0, 0))
        sock.settimeout(2.0)
        bind = _attr(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND))
        mode = _attr(NFULA_CFG_MODE, struct.pack("!IBB", 128, NFULNL_COPY_PACKET, 0))
        for seq, attrs in ((1, bind), (2, mode)):
            sock.send(_config_msg(self.group, seq, attrs))
            reply = sock.recv(65536)
            _length, typ = struct.unpack_from("=IH", reply, 0)
            if typ == NLMSG_ERROR:
                code = struct.unpack_from("=i", reply, 16)[0]
                if code:
                    raise OSError(-code, f"NFLOG group {self.group} in {self.namespace}: {errno.errorcode.get(-code)}")
        sock.settimeout(0.5)
        return sock

    def _run(self) -> None:
        try:
            sock = self._sock = self._bind()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:  # the kernel dropped messages: count and go on
                        self.dropped += 1
                        continue
                    raise
                self._handle(data)
        except BaseException as exc:
            log.warning("flow log reader of %s stopped: %s", self.namespace, exc)
            if self._on_error:
                self._on_error(exc)
        finally:
            sock.close()

    def _handle(self, data: bytes) -> None:
        offset = 0
        while offset + 16 <= len(data):
            length, typ = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if typ == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                rec = parse_packet(data[offset + 16:offset + length], self.vpc_id)
                if rec is not None:
                    with self._lock:
                        if len(self._buf) == self._buf.maxlen:
                            self.dropped += 1
                        self._buf.append(rec)
            offset += (length + 3) & ~3
