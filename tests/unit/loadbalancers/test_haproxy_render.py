"""The HAProxy configuration renderer: what a spec becomes, what it refuses (injection attempts), and that
HAProxy itself accepts the result (``haproxy -c``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hackboot.loadbalancers import haproxy_config, haproxy_runtime
from hackboot.loadbalancers.driver import (
    CertificateSpec,
    HealthCheckSpec,
    InvalidSpec,
    ListenerSpec,
    LoadBalancerSpec,
    MemberSpec,
    PoolSpec,
    RuleSpec,
)
from hackboot.loadbalancers.haproxy import _health
from hackboot.loadbalancers.haproxy_config import parse_access_record, render

LB_DIR = Path("/var/lib/hb-test/lb1")
CHAIN = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def full_spec(chain: str = CHAIN, key: str = KEY, chain_b: str = CHAIN, key_b: str = KEY) -> LoadBalancerSpec:
    hc = HealthCheckSpec("http", "/health", "app.example.com", "200-299,302", 1.5, 0.5, 2, 3)
    web = PoolSpec("web", members=(MemberSpec("m1", "10.0.0.21", 8000, 3),
                                   MemberSpec("m2", "10.0.0.22", 8000, 1, "drain"),
                                   MemberSpec("m3", "10.0.0.23", 8000, 5, "disabled")),
                   health_check=hc, sticky="cookie")
    api = PoolSpec("api", algorithm="leastconn", members=(MemberSpec("a1", "10.0.0.31", 9000),), sticky="source_ip")
    raw = PoolSpec("raw", "tcp", "source", (MemberSpec("t1", "10.0.0.41", 5432),), HealthCheckSpec(),
                   proxy_protocol=True)
    rules = (
        RuleSpec("fixed", 30, "fixed_response", path_prefix="/maintenance", status_code=503,
                 content_type="text/html; charset=utf-8", body="<p>don't \"panic\"\n# not a comment</p>"),
        RuleSpec("to-api", 10, "forward", host="*.api.example.com", path_prefix="/v1/", pool_id="api"),
        RuleSpec("old", 20, "redirect", host="old.example.com", redirect_url="https://new.example.com#{path}?#{query}",
                 redirect_code=308),
    )
    return LoadBalancerSpec(
        "lb1", "10.0.0.10",
        listeners=(ListenerSpec("http", "http", 80, redirect_to_https_port=443),
                   ListenerSpec("https", "https", 443, "web", rules=rules, certificate_ids=("cert-b", "cert-a"),
                                connection_limit=500, connection_rate_limit=20, request_rate_limit=50,
                                idle_timeout_s=30),
                   ListenerSpec("pg", "tcp", 5432, "raw", connection_rate_limit=5)),
        pools=(web, api, raw),
        certificates=(CertificateSpec("cert-a", chain, key, ("a.example.com",)),
                      CertificateSpec("cert-b", chain_b, key_b, ("b.example.com",))))


def section(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(header)
    out = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        out.append(line.strip())
    return out


def test_global_tls_policy_and_stats_socket() -> None:
    text = render(full_spec(), LB_DIR).text
    glob = section(text, "global")
    assert "user haproxy" in glob and "group haproxy" in glob and "maxconn 10000" in glob
    assert f"stats socket '{LB_DIR}/stats.sock' mode 600 level admin" in glob
    assert not any(x.startswith("chroot") for x in glob)
    chrooted = section(render(full_spec(), LB_DIR, Path("/run/s"), chroot=Path("/var/empty")).text, "global")
    assert "chroot '/var/empty'" in chrooted and "stats socket '/run/s/stats.sock' mode 600 level admin" in chrooted
    assert "ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets" in glob
    assert f"ssl-default-bind-ciphersuites {haproxy_config.TLS13_SUITES}" in glob
    ciphers = next(x for x in glob if x.startswith("ssl-default-bind-ciphers "))
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers.split()[1].split(":"))


def test_https_frontend_certificates_rate_limits_and_headers() -> None:
    rendered = render(full_spec(), LB_DIR)
    fe = section(rendered.text, "frontend ln-https")
    bind = next(x for x in fe if x.startswith("bind "))
    # The first certificate of the listener is the default one: it comes first on the bind line.
    crts = re.findall(r"crt '([^']+)'", bind)
    assert [Path(c).name.split("-")[0:2] for c in crts] == [["cert", "b"], ["cert", "a"]]
    assert bind.startswith("bind 10.0.0.10:443 ssl ") and "alpn h2,http/1.1" in bind
    for c in crts:
        rel = str(Path(c).relative_to(LB_DIR))
        assert rel in rendered.secret_files
        assert rendered.files[rel] == (CHAIN + KEY).encode()
    assert "maxconn 500" in fe and "timeout client 30000ms" in fe
    assert "tcp-request connection track-sc0 src" in fe
    assert "tcp-request connection reject if { sc_conn_rate(0) gt 20 }" in fe
    assert "http-request deny deny_status 429 if { sc_http_req_rate(0) gt 50 }" in fe
    assert any(x.startswith("stick-table type ip") and "conn_rate(1s),http_req_rate(1s)" in x for x in fe)
    assert "option forwardfor" in fe and "http-request set-header X-Forwarded-Proto https" in fe
    assert "http-request set-header X-Forwarded-Port %[dst_port]" in fe
    assert "default_backend pl-web" in fe


def test_rules_are_evaluated_in_priority_order() -> None:
    rendered = render(full_spec(), LB_DIR)
    fe = section(rendered.text, "frontend ln-https")
    actions = [x for x in fe if x.startswith(("http-request set-var", "http-request redirect", "http-request return"))]
    assert [a.split()[1] for a in actions] == ["set-var(txn.hb_pool)", "redirect", "return"]
    forward, redirect, fixed = actions
    assert "str(pl-api)" in forward and "-m end '.api.example.com'" in forward and "-m beg '/v1/'" in forward
    # Every rule fires only when no earlier rule chose a pool.
    assert all("!{ var(txn.hb_pool) -m found }" in a for a in actions)
    assert "code 308 location 'https://new.example.com%[path]?%[query]'" in redirect
    assert "-m str 'old.example.com'" in redirect
    assert "status 503 content-type 'text/html; charset=utf-8' file '" in fixed
    body_path = re.search(r"file '([^']+)'", fixed)
    assert body_path is not None
    rel = str(Path(body_path.group(1)).relative_to(LB_DIR))
    assert rendered.files[rel] == b"<p>don't \"panic\"\n# not a comment</p>"
    assert fe.index(forward) < fe.index("use_backend %[var(txn.hb_pool)] if { var(txn.hb_pool) -m found }") \
        < fe.index("default_backend pl-web")


def test_http_to_https_redirect_listener() -> None:
    fe = section(render(full_spec(), LB_DIR).text, "frontend ln-http")
    assert any(x.startswith("http-request redirect code 301 location https://%[req.hdr(host),field(1,:)]%[capture.req.uri]")
               for x in fe)
    assert not any(x.startswith("default_backend") for x in fe)


def test_backends() -> None:
    text = render(full_spec(), LB_DIR).text
    web = section(text, "backend pl-web")
    assert "balance roundrobin" in web and "option httpchk" in web
    assert "http-check send meth GET uri '/health' hdr Host 'app.example.com'" in web
    assert "http-check expect status 200-299,302" in web and "timeout check 500ms" in web
    assert "cookie SRVID insert indirect nocache httponly secure" in web  # only the https listener uses it
    m1, m2, m3 = (x for x in web if x.startswith("server "))
    assert m1.startswith("server m1 10.0.0.21:8000 weight 3 check inter 1500ms rise 2 fall 3 cookie ")
    assert " weight 0 " in m2  # drain: no new clients, sticky ones kept
    assert m3.endswith(" disabled")
    assert haproxy_config.cookie_value("m1") in m1 and "m1" not in m1.split("cookie ")[1]
    api = section(text, "backend pl-api")
    assert "balance leastconn" in api and "stick on src" in api
    assert "server a1 10.0.0.31:9000 weight 1" in api
    raw = section(text, "backend pl-raw")
    assert "mode tcp" in raw and "balance source" in raw
    # The tcp listener's idle timeout (60 s) bounds an established session, a tunnel for HAProxy.
    assert "timeout server 60000ms" in raw and "timeout tunnel 60000ms" in raw
    assert "timeout tunnel 30000ms" in web  # the https listener's 30 s
    assert raw[-1] == ("server t1 10.0.0.41:5432 weight 1 check inter 5000ms rise 2 fall 3 "
                       "send-proxy-v2 check-send-proxy")
    fe = section(text, "frontend ln-pg")
    assert "mode tcp" in fe and "tcp-request connection reject if { sc_conn_rate(0) gt 5 }" in fe
    assert not any("X-Forwarded" in x or "http-request" in x for x in fe)


def test_normalized_spec_separates_runtime_changes_from_structure() -> None:
    spec = full_spec()
    pools = list(spec.pools)
    pools[0] = dataclasses.replace(pools[0], members=tuple(
        dataclasses.replace(m, weight=7, admin_state="enabled") for m in pools[0].members))
    reweighted = dataclasses.replace(spec, pools=tuple(pools))
    assert render(spec, LB_DIR).text != render(reweighted, LB_DIR).text
    n = haproxy_config.normalized
    assert render(n(spec), LB_DIR).text == render(n(reweighted), LB_DIR).text
    pools[0] = dataclasses.replace(pools[0], members=(*pools[0].members, MemberSpec("m4", "10.0.0.24", 8000)))
    grown = dataclasses.replace(spec, pools=tuple(pools))
    assert render(n(spec), LB_DIR).text != render(n(grown), LB_DIR).text


# --- refusals and injection attempts ---------------------------------------------------------------

def with_rule(**fields: object) -> LoadBalancerSpec:
    base = {"id": "r", "priority": 1, "action": "forward", "pool_id": "p"}
    rule = RuleSpec(**{**base, **fields})  # type: ignore[arg-type]
    return LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("l", "http", 80, "p", rules=(rule,)),),
                            pools=(PoolSpec("p", members=(MemberSpec("m", "10.0.0.2", 80),)),))


INJECTIONS = [
    "a.example.com\n    server evil 203.0.113.9:80",
    "x' }  http-request return status 200 if { always_true",
    "x\" }",
    "x # comment",
    "a b",
    "${HOME}",
    "x\\n",
    "x\r\ny",
    "x\x00y",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_host_injection_refused(value: str) -> None:
    with pytest.raises(InvalidSpec):
        render(with_rule(host=value), LB_DIR)


@pytest.mark.parametrize("value", [*INJECTIONS, "/a b", "/a'b", "/a#b", "/a\"b", "/${HOME}", "/a\\b", "no-slash",
                                   "/x\n    server evil 203.0.113.9:80"])
def test_path_injection_refused(value: str) -> None:
    with pytest.raises(InvalidSpec):
        render(with_rule(path_prefix=value), LB_DIR)


@pytest.mark.parametrize("url", [
    "https://x.example.com/%[env(HOME)]",  # a log-format expression reading the proxy's environment
    "https://x.example.com/a b",
    "https://x.example.com/a'b",
    "https://x.example.com/\nserver evil 203.0.113.9:80",
    "https://x.example.com/#{nope}",
    "https://x.example.com/{x}",
    "javascript:alert(1)",
    "//x.example.com/",
    "https://x.example.com/\\",
])
def test_redirect_injection_refused(url: str) -> None:
    with pytest.raises(InvalidSpec):
        render(with_rule(action="redirect", pool_id=None, redirect_url=url), LB_DIR)


@pytest.mark.parametrize("content_type", ["text/plain\nx", "text/plain' if", "text/plain # x", "text", "a/b c",
                                          "text/plain; charset=\"x\""])
def test_content_type_injection_refused(content_type: str) -> None:
    with pytest.raises(InvalidSpec):
        render(with_rule(action="fixed_response", pool_id=None, content_type=content_type), LB_DIR)


def test_body_never_reaches_the_configuration() -> None:
    body = "'\n    server evil 203.0.113.9:80\n# %[env(HOME)] ${HOME} \\"
    rendered = render(with_rule(action="fixed_response", pool_id=None, body=body), LB_DIR)
    assert "evil" not in rendered.text and "HOME" not in rendered.text
    assert body.encode() in rendered.files.values()


@pytest.mark.parametrize("bad_id", ["../etc", "a b", "a\nb", "-x", "", "x" * 65, "a/b", "a'b", "ä"])
def test_ids_refused(bad_id: str) -> None:
    member = MemberSpec(bad_id, "10.0.0.2", 80)
    with pytest.raises(InvalidSpec):
        render(LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", members=(member,)),)), LB_DIR)
    with pytest.raises(InvalidSpec):
        render(LoadBalancerSpec(bad_id, "10.0.0.10"), LB_DIR)


@pytest.mark.parametrize("spec", [
    # member address / port / weight
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", members=(MemberSpec("m", "10.0.0.2 check", 80),)),)),
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", members=(MemberSpec("m", "10.0.0.2", 0),)),)),
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", members=(MemberSpec("m", "10.0.0.2", 80, 257),)),)),
    # health check fields
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", health_check=HealthCheckSpec("http", "/h x")),)),
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", health_check=HealthCheckSpec(
        "http", "/h", host="a.com' hdr X y")),)),
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", health_check=HealthCheckSpec(
        "http", "/h", expected_codes="200 hdr x")),)),
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", "tcp", health_check=HealthCheckSpec("http")),)),
    # vip, pools and listeners that do not fit together
    LoadBalancerSpec("lb", "10.0.0.10:80"),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("l", "http", 80, "nope"),)),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("l", "tcp", 80, "p"),), pools=(PoolSpec("p"),)),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("l", "https", 443, "p"),), pools=(PoolSpec("p"),)),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("l", "https", 443, "p", certificate_ids=("c",)),),
                     pools=(PoolSpec("p"),)),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("a", "http", 80), ListenerSpec("b", "tcp", 80))),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("a", "tcp", 80, request_rate_limit=5),)),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("a", "tcp", 80, redirect_to_https_port=443),)),
    LoadBalancerSpec("lb", "10.0.0.10", listeners=(ListenerSpec("a", "http", 80, connection_rate_limit=0),)),
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", "tcp", sticky="cookie"),)),
    LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec("p", proxy_protocol=True),)),
    LoadBalancerSpec("lb", "10.0.0.10", certificates=(CertificateSpec("c", "not pem", KEY),)),
])
def test_inexpressible_specs_refused(spec: LoadBalancerSpec) -> None:
    with pytest.raises(InvalidSpec):
        render(spec, LB_DIR)


def test_redirect_and_fixed_response_codes() -> None:
    with pytest.raises(InvalidSpec):
        render(with_rule(action="redirect", pool_id=None, redirect_url="https://a.example.com/", redirect_code=305),
               LB_DIR)
    with pytest.raises(InvalidSpec):
        render(with_rule(action="fixed_response", pool_id=None, status_code=101), LB_DIR)


# --- HAProxy's own opinion -------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_rendered_configuration(tmp_path: Path) -> None:
    from tests.integration.loadbalancers.engine_topology import self_signed

    chain_a, key_a = self_signed(("a.example.com",))
    chain_b, key_b = self_signed(("b.example.com",))
    rendered = render(full_spec(chain_a, key_a, chain_b, key_b), tmp_path)
    for rel, data in rendered.files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "haproxy.cfg").write_text(rendered.text)
    (tmp_path / "server-state").write_text(haproxy_runtime.EMPTY_SERVER_STATE)
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stderr
    assert "WARNING" not in check.stderr and "ALERT" not in check.stderr, check.stderr


# --- reading HAProxy's output back -----------------------------------------------------------------

def test_down_servers_state_keeps_only_servers_taken_out() -> None:
    text = ("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight\n"
            "3 pl-web 1 m1 10.0.0.21 2 0 3 3\n"
            "3 pl-web 2 m2 10.0.0.22 0 1 9 9\n"
            "3 pl-web 3 gone 10.0.0.29 0 0 1 1\n"
            "4 ln-x 1 m9 10.0.0.29 0 0 1 1\n")
    out = haproxy_runtime.down_servers_state(text, {"web/m1": 3, "web/m2": 2}, "pl-")
    assert out.splitlines()[2:] == ["3 pl-web 2 m2 10.0.0.22 0 0 2 2"]
    assert haproxy_runtime.down_servers_state("", {}, "pl-") == haproxy_runtime.EMPTY_SERVER_STATE


def test_access_log_records_parse() -> None:
    http = parse_access_record("hblog1 1764547200.042 ln-web 10.77.0.100:41000 pl-p1 m2 GET /a/b 200 3 201\n", 99)
    assert http is not None
    assert (http.cursor, http.listener_id, http.client, http.pool_id, http.member_id) == \
        (99, "web", "10.77.0.100:41000", "p1", "m2")
    assert (http.method, http.path, http.status, http.duration_ms, http.bytes_out) == ("GET", "/a/b", 200, 3, 201)
    assert http.time == dt.datetime(2025, 12, 1, 0, 0, 0, 42000, tzinfo=dt.UTC)
    fixed = parse_access_record("hblog1 1764547200.042 ln-web 10.77.0.100:41000 ln-web <NOSRV> GET / 503 0 99\n", 5)
    assert fixed is not None and fixed.pool_id is None and fixed.member_id is None and fixed.status == 503
    tcp = parse_access_record("hblog1 1764547200.042 ln-pg 10.77.0.100:41000 pl-raw t1 - - - 1500 12\n", 7)
    assert tcp is not None and tcp.method is None and tcp.path is None and tcp.status is None
    assert parse_access_record("[WARNING] (1) : Proxy stopped\n", 1) is None
    assert parse_access_record("hblog1 x ln-web a b c d e f g h\n", 1) is None


@pytest.mark.parametrize(("status", "admin", "check_status", "health"), [
    ("UP", "enabled", "L7OK", "up"),
    ("UP 1/3", "enabled", "L7STS", "up"),  # failing, not taken out yet
    ("UP", "enabled", "INI", "unchecked"),  # HAProxy starts members up before their first check
    ("UP 1/3", "enabled", "* INI", "unchecked"),
    ("no check", "enabled", "", "unchecked"),
    ("DOWN", "enabled", "L4CON", "down"),
    ("DOWN 1/2", "enabled", "L7OK", "down"),  # coming back, not in yet
    ("DRAIN", "enabled", "L7OK", "drain"),
    ("UP", "drain", "L7OK", "drain"),
    ("MAINT", "enabled", "", "disabled"),
    ("UP", "disabled", "L7OK", "disabled"),
])
def test_member_health_from_stats(status: str, admin: str, check_status: str, health: str) -> None:
    assert _health(status, admin, check_status) == health


ODD_VALUES = [
    "/a;b=c/%41@x:y", "/(x)*+,!&~", "/", "*.a-b.example.com", "xn--bcher-kva.example", "a" * 63 + ".example.com",
    "/a b", "/a'b", "/a\"b", "/a#b", "/a\\b", "/${X}", "/a\nb", "/a\tb", "/\x7f", "a.com\n", "*.", "*", ".a.com",
    "A.COM", "a..com", "https://a.example.com/%41", "https://a.example.com/#{host}", "https://a.example.com/#x",
    "text/plain; charset=utf-8", "text/plain;charset=utf-8", "application/vnd.api+json", "text/plain\x00",
]


def shape(text: str) -> list[str]:
    """Each line's first word: what a value that broke out of its word or line would change."""
    return [line.split(maxsplit=1)[0] if line.strip() else "" for line in text.splitlines()]


@pytest.mark.parametrize("value", ODD_VALUES)
def test_any_value_is_refused_or_stays_inside_its_word(value: str, tmp_path: Path) -> None:
    variants = {
        "host": lambda v: with_rule(host=v),
        "path": lambda v: with_rule(path_prefix=v),
        "redirect": lambda v: with_rule(action="redirect", pool_id=None, redirect_url=v),
        "content type": lambda v: with_rule(action="fixed_response", pool_id=None, content_type=v),
        "check path": lambda v: LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec(
            "p", members=(MemberSpec("m", "10.0.0.2", 80),), health_check=HealthCheckSpec("http", v)),)),
        "check host": lambda v: LoadBalancerSpec("lb", "10.0.0.10", pools=(PoolSpec(
            "p", members=(MemberSpec("m", "10.0.0.2", 80),), health_check=HealthCheckSpec("http", "/", v)),)),
    }
    benign = {"host": "a.example.com", "path": "/a", "redirect": "https://a.example.com/",
              "content type": "text/plain", "check path": "/a", "check host": "a.example.com"}
    for field, make in variants.items():
        baseline = shape(render(make(benign[field]), tmp_path).text)
        try:
            rendered = render(make(value), tmp_path)
        except InvalidSpec:
            continue
        assert shape(rendered.text) == baseline, (field, value)
        words = [w for line in rendered.text.splitlines() for w in re.findall(r"'[^']*'", line)]
        # Accepted: the value is inside one strongly quoted word (a redirect's placeholders are rewritten).
        needle = value.lower().removeprefix("*") if "host" in field else value
        assert any(needle in w for w in words) or field == "redirect", (field, value)
        if shutil.which("haproxy"):
            for rel, data in rendered.files.items():
                (tmp_path / rel).parent.mkdir(exist_ok=True)
                (tmp_path / rel).write_bytes(data)
            (tmp_path / "haproxy.cfg").write_text(rendered.text)
            (tmp_path / "server-state").write_text(haproxy_runtime.EMPTY_SERVER_STATE)
            check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True,
                                   text=True, check=False)
            assert check.returncode == 0, (field, value, check.stderr)
