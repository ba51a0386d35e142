"""A small world for load-balancer engine tests and the benchmark, all in ``hb-`` namespaces.

A "switch" namespace holds a bridge; every other namespace has an ``eth0`` whose veth peer is a port of
that bridge (each pair is created directly between two of our namespaces: nothing in the root one):

    <prefix>-lb   10.77.0.10/24   the load balancer's namespace (the VIP is on eth0)
    <prefix>-b1…  10.77.0.21…     backends: HTTP on :8000, PROXY-protocol-aware TCP on :9000
    <prefix>-cl   10.77.0.100/24  the client

Backends answer HTTP with a JSON object naming themselves (and echoing the path, Host and the
X-Forwarded-* headers), ``GET /slow/<seconds>`` after that long; ``GET /health`` answers 500 while
the backend's fail flag is set (:meth:`Topology.set_failing`). The TCP port answers one line,
``<name> proxy=<ip>:<port>`` when the connection began with a PROXY v2 header (``proxy=none``
otherwise), then echoes.

Clients run on threads that entered the client namespace (:func:`hackboot.network.netns.in_thread`), so
the sockets they open live there.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hackboot.network import netns

T = TypeVar("T")
SUBNET_PREFIX = "10.77.0."
VIP = "10.77.0.10"
CLIENT_IP = "10.77.0.100"
HTTP_PORT = 8000
TCP_PORT = 9000

# An asyncio backend (fast enough to benchmark a proxy in front of it): argv = name, flag file.
BACKEND = r"""
import asyncio, json, os, struct, sys
name, flag = sys.argv[1], sys.argv[2]
SIG = b"\r\n\r\n\x00\r\nQUIT\n"

class Http(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf = t, b""
    def data_received(self, data):
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = (lines[0].split(" ") + ["", ""])[:3]
            hdrs = {}
            for ln in lines[1:]:
                k, _, v = ln.partition(":")
                hdrs[k.strip().lower()] = v.strip()
            n = int(hdrs.get("content-length", "0") or 0)
            self.buf = self.buf[n:]
            status = "200 OK"
            if path == "/health" and os.path.exists(flag):
                status = "500 Internal Server Error"
            body = json.dumps({"name": name, "method": method, "path": path, "host": hdrs.get("host"),
                               "xff": hdrs.get("x-forwarded-for"), "xfp": hdrs.get("x-forwarded-proto"),
                               "cookie": hdrs.get("cookie")}).encode()
            close = hdrs.get("connection", "").lower() == "close"
            answer = (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n" +
                      (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)
            def send(answer=answer, close=close):
                if not self.t.is_closing():
                    self.t.write(answer)
                    if close:
                        self.t.close()
            if path.startswith("/slow/"):  # /slow/<seconds>: an answer that takes that long
                asyncio.get_running_loop().call_later(float(path.split("/")[2]), send)
            else:
                send()
            if close:
                return

class Tcp(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf, self.started = t, b"", False
    def data_received(self, data):
        if self.started:
            self.t.write(data); return
        self.buf += data
        if self.buf.startswith(SIG):
            if len(self.buf) < 16: return
            length = struct.unpack("!H", self.buf[14:16])[0]
            if len(self.buf) < 16 + length: return
            fam = self.buf[13]
            proxy = "local"
            if fam == 0x11:
                src = self.buf[16:20]; sport = struct.unpack("!H", self.buf[24:26])[0]
                proxy = ".".join(map(str, src)) + ":" + str(sport)
            rest = self.buf[16 + length:]
        elif len(self.buf) < len(SIG) and SIG.startswith(self.buf):
            return
        else:
            proxy, rest = "none", self.buf
        self.started = True
        self.t.write(f"{name} proxy={proxy}\n".encode())
        if rest: self.t.write(rest)

async def main():
    loop = asyncio.get_running_loop()
    h = await loop.create_server(Http, "0.0.0.0", 8000, backlog=1024, reuse_address=True)
    t = await loop.create_server(Tcp, "0.0.0.0", 9000, backlog=1024, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@dataclass
class Backend:
    name: str
    ns: str
    ip: str
    flag: Path
    proc: subprocess.Popen[str] | None = None


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Topology:
    prefix: str
    switch: str
    lb_ns: str
    client_ns: str
    backends: dict[str, Backend] = field(default_factory=dict)
    work_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hb-lbt-")))
    vip: str = VIP

    def set_failing(self, name: str, failing: bool) -> None:
        flag = self.backends[name].flag
        if failing:
            flag.write_text("fail")
        else:
            flag.unlink(missing_ok=True)

    def stop_backend(self, name: str) -> None:
        b = self.backends[name]
        if b.proc is not None:
            b.proc.terminate()
            b.proc.wait(10)
            b.proc = None

    def start_backend(self, name: str) -> None:
        b = self.backends[name]
        if b.proc is None:
            b.proc = _start_backend(b)

    def in_client(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        return netns.in_thread(self.client_ns, fn, timeout=timeout)


def _start_backend(b: Backend) -> subprocess.Popen[str]:
    proc = netns.popen(b.ns, [sys.executable, "-u", "-c", BACKEND, b.name, str(b.flag)],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise RuntimeError(f"backend {b.name} did not start: {line!r}")
    return proc


@contextmanager
def topology(backends: int = 3, prefix: str | None = None) -> Iterator[Topology]:
    """Build the world (removed on exit, failure or not)."""
    prefix = prefix or f"hb-lbt{uuid.uuid4().hex[:5]}"
    names = [f"{prefix}-{n}" for n in ("sw", "lb", "cl", *(f"b{i + 1}" for i in range(backends)))]
    topo = Topology(prefix, names[0], names[1], names[2])
    try:
        for n in names:
            netns.create(n)
        netns.ip(topo.switch, "link", "add", "br0", "type", "bridge")
        netns.ip(topo.switch, "link", "set", "br0", "up")
        nodes = [(topo.lb_ns, "lb", VIP), (topo.client_ns, "cl", CLIENT_IP)]
        for i in range(backends):
            nodes.append((names[3 + i], f"b{i + 1}", f"{SUBNET_PREFIX}{21 + i}"))
        for ns, short, ip in nodes:
            netns.veth(ns, "eth0", topo.switch, f"p-{short}")
            netns.ip(topo.switch, "link", "set", f"p-{short}", "master", "br0", "up")
            netns.ip(ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            netns.ip(ns, "link", "set", "eth0", "up")
        for ns, short, ip in nodes[2:]:
            b = Backend(short, ns, ip, topo.work_dir / f"{short}.fail")
            topo.backends[short] = b
            b.proc = _start_backend(b)
        yield topo
    finally:
        for b in topo.backends.values():
            if b.proc is not None:
                b.proc.kill()
                with suppress(subprocess.TimeoutExpired):
                    b.proc.wait(10)
        for n in reversed(names):
            with suppress(Exception):
                netns.delete(n)
        for p in topo.work_dir.glob("*"):
            p.unlink(missing_ok=True)
        with suppress(OSError):
            topo.work_dir.rmdir()


# --- clients (call these inside Topology.in_client) -------------------------------------------------

def http_get(ip: str, port: int, path: str = "/", headers: Mapping[str, str] | None = None,
             timeout: float = 5.0, conn: http.client.HTTPConnection | None = None) -> Response:
    """One GET (on `conn` if given: keep-alive; else a fresh connection closed afterwards)."""
    own = conn is None
    c = conn or http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        c.request("GET", path, headers=dict(headers or {}))
        r = c.getresponse()
        body = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
    finally:
        if own:
            c.close()


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> T:
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        with suppress(Exception):
            last = condition()
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}: last value {last!r}")
        time.sleep(interval)


def tls_probe(ip: str, port: int, server_name: str | None, timeout: float = 5.0) -> tuple[str, bytes]:
    """TLS handshake with SNI `server_name`: (negotiated version, the server certificate's DER)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((ip, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return str(s.version()), der


def tcp_exchange(ip: str, port: int, payload: bytes = b"ping\n", timeout: float = 5.0) -> tuple[str, bytes]:
    """Connect to a backend's TCP service (through the LB): its greeting line and the echo of `payload`."""
    with socket.create_connection((ip, port), timeout=timeout) as s:
        # The backend speaks once it has seen the first bytes (to tell a PROXY header from data).
        s.sendall(payload)
        f = s.makefile("rb")
        greeting = f.readline().decode().strip()
        echo = f.read(len(payload))
        return greeting, echo


def self_signed(names: tuple[str, ...]) -> tuple[str, str]:
    """A self-signed ECDSA certificate for `names` (chain PEM, key PEM)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode())
