"""The sender pins the address it checked yet still verifies TLS against the URL's host name."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hackboot.core.config import reset_settings_cache
from hackboot.events.webhooks import Claim, Sender


@pytest.fixture
def tls_receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[int, Path, list[str]]]:
    """An HTTPS receiver on 127.0.0.1 with a self-signed certificate for `localhost` only."""
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("HACKBOOT_WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
    reset_settings_cache()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hosts.append(self.headers["host"])
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], tmp_path / "cert.pem", hosts
    server.shutdown()
    server.server_close()
    monkeypatch.undo()
    reset_settings_cache()


def test_pinned_https_delivery_verifies_the_host_name(tls_receiver: tuple[int, Path, list[str]]) -> None:
    port, ca, hosts = tls_receiver
    sender = Sender(verify=ssl.create_default_context(cafile=str(ca)))
    try:
        ok = sender.send(Claim(delivery_id="whd-1", attempt=1, url=f"https://localhost:{port}/hook", secret="s",
                               event_type="t.x", body=b"{}"))
        assert ok.ok and ok.status_code == 204
        assert hosts == [f"localhost:{port}"]  # connected to the pinned address, Host header kept
        # Same address, but a name the certificate does not cover: refused.
        bad = sender.send(Claim(delivery_id="whd-2", attempt=1, url=f"https://127.0.0.1:{port}/hook", secret="s",
                                event_type="t.x", body=b"{}"))
        assert not bad.ok and "CERTIFICATE_VERIFY_FAILED" in bad.error
    finally:
        sender.close()


def test_private_targets_are_refused_at_send_time_unless_allowed(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("HACKBOOT_WEBHOOK_ALLOW_PRIVATE_TARGETS", "false")
    reset_settings_cache()
    sender = Sender()
    try:
        # A name that resolves to loopback (as a DNS-rebinding host would): nothing is sent.
        for url in ("http://localhost:9/x", "http://127.0.0.1:9/x", "http://[::1]:9/x"):
            out = sender.send(Claim(delivery_id="whd-1", attempt=1, url=url, secret="s", event_type="t",
                                    body=b"{}"))
            assert not out.ok and out.permanent and "public" in out.error, (url, out)
    finally:
        sender.close()
        monkeypatch.undo()
        reset_settings_cache()
