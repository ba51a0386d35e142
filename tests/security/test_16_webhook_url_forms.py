"""Finding 16: webhook URLs in odd address forms are refused, and the sender never crashes on one.

Private addresses hide behind numeric IPv4 forms (`0177.0.0.1`, `0x7f.1`, `2130706433`, `127.1`)
and IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo); hosts that
are not valid names (bad IDNA, percent-escapes) used to be stored and crashed the sender. The API
must refuse them all with a 422 naming the `url` field; the sender must fail a delivery whose
stored URL is such a form, with a reason, without a stack trace and without connecting anywhere.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.security.conftest import Tenant
from tests.support import Cloud, make_cloud

REFUSED_FORMS = [
    "http://0177.0.0.1/hook",  # octal loopback
    "http://0x7f.1/hook",  # hex, two parts
    "http://2130706433/hook",  # one 32-bit number
    "http://127.1/hook",  # short form
    "http://0/hook",  # 0.0.0.0
    "http://１２７.０.０.１/hook",  # full-width digits (UTS #46 maps them to 127.0.0.1)
    "http://127.0.0.1./hook",  # trailing dot
    "http://0x0a.0.0.1/hook",  # 10.0.0.1
    "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
    "http://[::ffff:a9fe:a9fe]/hook",  # IPv4-mapped metadata address, hex form
    "http://[::127.0.0.1]/hook",  # IPv4-compatible
    "http://[64:ff9b::a9fe:a9fe]/hook",  # NAT64 of 169.254.169.254
    "http://[64:ff9b::7f00:1]/hook",  # NAT64 of 127.0.0.1
    "http://[64:ff9b:1::a00:1]/hook",  # local-use NAT64 prefix
    "http://[2002:7f00:1::1]/hook",  # 6to4 of 127.0.0.1
    "http://[2002:c0a8:101::1]/hook",  # 6to4 of 192.168.1.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook",  # Teredo, client 127.0.0.1
    "http://[fe80::1%25eth0]/hook",  # zone index
    "http://☃.net/hook",  # not a valid IDNA name
    "http://xn--zz.example/hook",  # invalid A-label
    "http://%31%32%37.0.0.1/hook",  # percent-escaped host
    "http://1.2.3.4.5/hook",  # ends in a number but is no IPv4 address
    "http://08.0.0.1/hook",  # not octal
    "http://internal-db/hook",  # single-label name (search domains)
    "http://metadata.google.internal/hook",  # site-local name
]


def _problem(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 422, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    problem: dict[str, Any] = resp.json()
    assert any("url" in e["loc"] for e in problem["errors"]), problem
    return problem


@pytest.fixture
def webhook_admin(tenant_factory: Callable[..., Tenant], cloud: Cloud) -> Iterator[httpx.Client]:
    tenant = tenant_factory("admin")
    with httpx.Client(base_url=cloud.url, headers={"Authorization": f"Bearer {tenant.token}"},
                      timeout=30) as http:
        yield http


def test_odd_address_forms_are_a_422_at_create_and_update(webhook_admin: httpx.Client) -> None:
    http = webhook_admin
    created: list[str] = []
    try:
        # A disabled webhook: nothing is ever sent to it, so this test makes no connection at all.
        base = http.post("/v1/webhooks", json={"url": "https://hooks.example.com/x", "enabled": False})
        assert base.status_code == 201, base.text
        created.append(base.json()["id"])
        for url in REFUSED_FORMS:
            resp = http.post("/v1/webhooks", json={"url": url, "enabled": False})
            if resp.status_code == 201:
                created.append(resp.json()["id"])
            _problem(resp)
            _problem(http.patch(f"/v1/webhooks/{base.json()['id']}", json={"url": url}))
        assert http.get(f"/v1/webhooks/{base.json()['id']}").json()["url"] == "https://hooks.example.com/x"
        # IDNA names are stored in their ASCII form: what the API shows is where deliveries go.
        idn = http.post("/v1/webhooks", json={"url": "https://BÜCHER.example:8443/h?x=1", "enabled": False})
        assert idn.status_code == 201, idn.text
        created.append(idn.json()["id"])
        assert idn.json()["url"] == "https://xn--bcher-kva.example:8443/h?x=1"
    finally:
        for hook_id in created:
            http.delete(f"/v1/webhooks/{hook_id}")


# --- the sender, on a dedicated cloud whose database we can write "legacy" URLs into --------------

@pytest.fixture(scope="module")
def sender_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    # Default SSRF rules (private targets refused); fast polling so the test stays short.
    c = make_cloud(tmp_path_factory.mktemp("wh16"), HACKBOOT_WEBHOOK_POLL_INTERVAL_S="0.1",
                   HACKBOOT_RUN_LOCAL_AGENT="false")
    c.start()
    yield c
    c.stop()


# Stored before create-time checks existed (or by an older version): the sender must cope.
LEGACY_URLS = [
    "http://0177.0.0.1:9/hook",
    "http://☃.net/hook",
    "http://xn--zz.example/hook",
    "http://0x7f.1:9/hook",
    "http://2130706433:9/hook",
]


@pytest.mark.parametrize("legacy_url", LEGACY_URLS)
def test_sender_fails_a_stored_odd_url_with_a_reason_and_no_crash(sender_cloud: Cloud, legacy_url: str) -> None:
    c = sender_cloud.client()
    hook = c.webhooks.create("https://hooks.example.com/legacy", enabled=False)
    db = Path(sender_cloud.state_dir) / "hackboot.db"
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("UPDATE webhooks SET url = ?, enabled = 1 WHERE id = ?", (legacy_url, hook["id"]))
    log_before = len(sender_cloud.log())
    ping = c.webhooks.ping(hook["id"])
    deadline = time.monotonic() + 10
    delivery = c.webhooks.delivery(hook["id"], ping["id"])
    while delivery["status"] == "pending" and time.monotonic() < deadline:
        time.sleep(0.1)
        delivery = c.webhooks.delivery(hook["id"], ping["id"])
    assert delivery["status"] == "failed", delivery  # permanent: retrying cannot help
    assert delivery["attempts"] == 1 and delivery["last_status_code"] is None
    assert "webhook URL refused" in delivery["last_error"] and "internal error" not in delivery["last_error"]
    assert delivery["attempt_log"][0]["error"] == delivery["last_error"]
    new_log = sender_cloud.log()[log_before:]
    assert "Traceback" not in new_log and "failed unexpectedly" not in new_log, new_log[-2000:]
    c.webhooks.delete(hook["id"])
