"""Pure logic of the events service: signatures, backoff, URL rules, globs, SSE framing, gap handling."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json

import pytest
from sqlalchemy import Column, MetaData, String, Table, select
from sqlalchemy.dialects import sqlite

from hackboot.events import signing, stream
from hackboot.events.service import glob_condition, prefix_condition
from hackboot.events.webhooks import (
    Slots,
    backoff_delay,
    is_forbidden_address,
    parse_ipv4_number,
    parse_target,
    plan,
    validate_url,
)
from hackboot.sdk.events import parse_sse, verify_webhook_signature

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"id":"evt-1","type":"project.created"}'
    sig = signing.signature("whsec_abc", 1767225600, body)
    expected = hmac.new(b"whsec_abc", b"1767225600." + body, hashlib.sha256).hexdigest()
    assert sig == "sha256=" + expected


def test_sdk_verifier_accepts_server_signatures_and_refuses_tampering_and_replays() -> None:
    body = b'{"id":"evt-1"}'
    headers = signing.headers(secret="s3cret", timestamp=1000, body=body, event_type="x.y", delivery_id="whd-1",
                              attempt=1)
    ts, sig = headers["X-Hackboot-Timestamp"], headers["X-Hackboot-Signature"]
    assert verify_webhook_signature("s3cret", body, ts, sig, now=1010)
    assert not verify_webhook_signature("other", body, ts, sig, now=1010)
    assert not verify_webhook_signature("s3cret", body + b" ", ts, sig, now=1010)
    assert not verify_webhook_signature("s3cret", body, "1001", sig, now=1010)  # timestamp is signed too
    assert not verify_webhook_signature("s3cret", body, ts, sig, now=1000 + 301)  # too old: a replay
    assert not verify_webhook_signature("s3cret", body, "not-a-number", sig, now=1010)


def test_backoff_grows_exponentially_with_bounded_jitter_and_a_cap() -> None:
    lo = [backoff_delay(n, base=1.0, cap=3600, rand=lambda: 0.0) for n in range(1, 6)]
    hi = [backoff_delay(n, base=1.0, cap=3600, rand=lambda: 0.999999) for n in range(1, 6)]
    assert lo == [0.75, 1.5, 3.0, 6.0, 12.0]
    assert hi == pytest.approx([1, 2, 4, 8, 16], rel=1e-5)
    # Even the worst jitter keeps each delay longer than the previous one.
    assert all(hi[i] < lo[i + 1] for i in range(4))
    assert backoff_delay(40, base=1.0, cap=3600, rand=lambda: 0.999999) == pytest.approx(3600, rel=1e-5)
    assert backoff_delay(10_000, base=1.0, cap=3600) <= 3600


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                  "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
                                  "224.0.0.1", "255.255.255.255",
                                  # IPv6 forms that embed a private IPv4 address
                                  "::ffff:a9fe:a9fe", "::127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a00:1",
                                  "64:ff9b:1::808:808", "2002:7f00:1::1", "2002:c0a8:101::",
                                  "2001:0:4136:e378:8000:63bf:80ff:fffe", "fec0::1", "192.88.99.1"])
def test_non_public_addresses_are_forbidden(addr: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(addr))


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808",
                                  "2002:808:808::1", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(addr: str) -> None:
    assert not is_forbidden_address(ipaddress.ip_address(addr))


@pytest.mark.parametrize("url,reason", [
    ("ftp://example.com/x", "http:// or https://"),
    ("example.com/hook", "http:// or https://"),
    ("https://", "host"),
    ("https://user:pw@example.com/", "password"),
    ("https://example.com/#frag", "fragment"),
    ("https://example.com:99999/", "valid URL"),
    ("https://exa mple.com/", "spaces"),
    ("http://127.0.0.1:8080/", "non-public"),
    ("http://[::1]/", "non-public"),
    ("http://169.254.169.254/latest/meta-data", "non-public"),
    ("http://localhost/", "non-public"),
    ("https://example.com/" + "a" * 2100, "2048"),
])
def test_bad_webhook_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_url(url, allow_private=False)


@pytest.mark.parametrize("host,addr", [
    ("0177.0.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("0", "0.0.0.0"), ("0x", "0.0.0.0"), ("10.0x10.1", "10.16.0.1"), ("1.2.3.4.", "1.2.3.4"),
    ("0XA.0.0.010", "10.0.0.8"), ("4294967295", "255.255.255.255"),
])
def test_numeric_hosts_are_read_like_inet_aton(host: str, addr: str) -> None:
    assert str(parse_ipv4_number(host)) == addr


@pytest.mark.parametrize("host", ["1.2.3.4.5", "256.0.0.1", "08.0.0.1", "4294967296", "1.16777216",
                                  "example.123", "1..2", "0xg.1"])
def test_hosts_ending_in_a_number_must_be_valid_ipv4(host: str) -> None:
    with pytest.raises(ValueError):
        parse_ipv4_number(host)


def test_domain_names_are_not_numbers() -> None:
    assert parse_ipv4_number("example.com") is None and parse_ipv4_number("1.2.3.example") is None


@pytest.mark.parametrize("url,normalised,host", [
    ("HTTPS://Bücher.Example/a?b", "https://xn--bcher-kva.example/a?b", "xn--bcher-kva.example"),
    ("http://0x7f.1:8080/x", "http://127.0.0.1:8080/x", "127.0.0.1"),
    ("http://[2606:4700:0:0:0:0:0:1]/", "http://[2606:4700::1]/", "2606:4700::1"),
    ("http://ｅｘａｍｐｌｅ.com/", "http://example.com/", "example.com"),
])
def test_urls_are_normalised(url: str, normalised: str, host: str) -> None:
    target = parse_target(url)
    assert (target.url, target.host) == (normalised, host)
    assert validate_url(url, allow_private=True) == normalised


@pytest.mark.parametrize("url", ["http://☃.net/", "http://xn--zz.com/", "http://exa_mple.com/", "http://-a.com/",
                                 "http://a..b/", "http://%41.com/", "http://[fe80::1%25eth0]/",
                                 "http://[127.0.0.1]/", "http://1.2.3.4.5/"])
def test_invalid_hosts_are_refused_even_when_private_targets_are_allowed(url: str) -> None:
    with pytest.raises(ValueError):
        validate_url(url, allow_private=True)


def test_the_length_limit_holds_after_idna_encoding() -> None:
    host = ".".join(["üéà" * 4] * 10)  # 129 characters, 209 once encoded
    url = f"https://{host}/" + "a" * (2030 - len(host))
    assert len(url) <= 2048
    with pytest.raises(ValueError, match="2048"):
        validate_url(url, allow_private=False)


def test_slots_are_shared_round_robin_between_projects_and_webhooks() -> None:
    # Project A has a big backlog on two webhooks, B and C one delivery each.
    due = [("wh-a1", "prj-a", 200), ("wh-a2", "prj-a", 100), ("wh-b", "prj-b", 1), ("wh-c", "prj-c", 1)]
    want = plan(due, Slots(total=6, webhook_limit=2, project_limit=4))
    assert want == {"wh-a1": 2, "wh-a2": 2, "wh-b": 1, "wh-c": 1}
    # Scarce slots: every project gets a turn before any gets a second one.
    assert set(plan(due, Slots(total=3, webhook_limit=2, project_limit=4))) == {"wh-a1", "wh-b", "wh-c"}
    # A failing webhook gets one attempt, from the shared failing budget; a held one none.
    slots = Slots(total=10, webhook_limit=2, failing_limit=1, failing={"wh-a1", "wh-a2"}, held={"wh-c"})
    assert plan(due, slots) == {"wh-a1": 1, "wh-b": 1}
    # In-flight attempts count against the limits.
    busy = Slots(total=10, webhook_limit=2, project_limit=3, webhook_inflight={"wh-a1": 2},
                 project_inflight={"prj-a": 2})
    assert plan(due, busy) == {"wh-a2": 1, "wh-b": 1, "wh-c": 1}


def test_the_first_turn_rotates() -> None:
    due = [("wh-a", "prj-a", 5), ("wh-b", "prj-b", 5), ("wh-c", "prj-c", 5)]
    firsts = {next(iter(plan(due, Slots(total=1), turn))) for turn in range(3)}
    assert firsts == {"wh-a", "wh-b", "wh-c"}


def test_good_webhook_urls_and_private_targets_when_allowed() -> None:
    assert validate_url("https://hooks.example.com/a?b=c", allow_private=False)
    assert validate_url("HTTP://example.com:8443/", allow_private=False)
    assert validate_url("http://127.0.0.1:9/", allow_private=True)
    assert validate_url("http://localhost:9/", allow_private=True)


def _sql(cond: object, dialect: object) -> str:
    return str(select(_T).where(cond).compile(dialect=dialect, compile_kwargs={"literal_binds": True}))  # type: ignore[arg-type]


_T = Table("t", MetaData(), Column("type", String))


def test_globs_become_like_patterns_with_sql_wildcards_escaped() -> None:
    assert "t.type = 'project.created'" in _sql(glob_condition(_T.c.type, "project.created"), sqlite.dialect())
    sql = _sql(glob_condition(_T.c.type, "project.member_*"), sqlite.dialect())
    assert "LIKE 'project.member\\_%' ESCAPE '\\'" in sql.replace("\\\\", "\\")
    assert "LIKE 'a_b%'" in _sql(glob_condition(_T.c.type, "a?b*"), sqlite.dialect())
    assert "LIKE '/v1/a\\_b%'" in _sql(prefix_condition(_T.c.type, "/v1/a_b"), sqlite.dialect()).replace("\\\\", "\\")


def test_sse_messages_round_trip_through_the_sdk_parser() -> None:
    event = {"seq": 42, "id": "evt-1", "type": "project.created", "data": {"note": "two\nlines"}}
    wire = stream.preamble() + stream.message(event) + stream.comment("keepalive") + stream.message(
        event | {"seq": 43})
    messages = list(parse_sse(iter(wire.split("\n"))))
    assert messages[0] == {"retry": str(stream.RETRY_MS)}
    assert messages[1]["id"] == "42" and messages[1]["event"] == "project.created"
    assert json.loads(messages[1]["data"]) == event
    assert messages[2]["id"] == "43"
    assert len(messages) == 3


def test_watermark_advances_over_contiguous_seqs_and_waits_at_young_gaps() -> None:
    now = T0 + dt.timedelta(seconds=100)
    young = now - dt.timedelta(seconds=1)
    old = now - dt.timedelta(seconds=60)
    assert stream.safe_watermark(10, [], now) == 10
    assert stream.safe_watermark(10, [(11, young), (12, young)], now) == 12
    # 12 is missing and 13 is young: 12 may still be committing, so stop before it.
    assert stream.safe_watermark(10, [(11, young), (13, young), (14, young)], now) == 11
    # The event after the gap is older than the grace period: the gap is final (rollback, pruning).
    assert stream.safe_watermark(10, [(11, old), (13, old), (14, young)], now) == 14
    assert stream.safe_watermark(0, [(5000, old)], now) == 5000


def test_last_event_id_parsing() -> None:
    assert stream.parse_last_event_id("17") == 17
    assert stream.parse_last_event_id(" 0 ") == 0
    assert stream.parse_last_event_id("abc") is None
    assert stream.parse_last_event_id("-3") is None
    assert stream.parse_last_event_id(None) is None
