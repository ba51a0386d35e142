"""Rendering one load balancer's HAProxy 2.6 configuration from its spec (pure: no I/O).

Everything a tenant typed that reaches the file goes through a validator first and is then written
*strongly quoted* (``'…'``: HAProxy reads it byte for byte, no escapes, no ``${VAR}`` expansion, no
``#`` comment), so a value can never end its word, its line or its directive. What cannot be expressed
safely is refused with :class:`InvalidSpec` (a quote, a control character, a ``%`` in a redirect target,
which HAProxy would read as a log-format expression). Fixed-response bodies are never inlined: they go
to files next to the configuration (``http-request return … file``), so they may hold anything.

Names in the file derive from ids (``ln-<listener>``, ``pl-<pool>``, servers named by member id), so
statistics and logs map back to ids by stripping the prefix.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hackboot.loadbalancers.driver import (
    AccessLogRecord,
    CertificateSpec,
    HealthCheckSpec,
    InvalidSpec,
    ListenerSpec,
    LoadBalancerSpec,
    MemberSpec,
    PoolSpec,
    RuleSpec,
)

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LISTENER_PREFIX = "ln-"
POOL_PREFIX = "pl-"
# The first word of every access-log line, so the reader can tell records from anything else on stdout.
LOG_MARK = "hblog1"
HTTP_LOG_FORMAT = f"{LOG_MARK} %Ts.%ms %f %ci:%cp %b %s %HM %HPO %ST %Ta %B"
TCP_LOG_FORMAT = f"{LOG_MARK} %Ts.%ms %f %ci:%cp %b %s - - - %Tt %B"

# Mozilla's "intermediate" policy: TLS 1.2 with AEAD ECDHE suites only, TLS 1.3 with its three suites.
TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                 "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")

_HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^(?:\*\.)?{_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
# RFC 3986 path characters, without the ones HAProxy's parser or log-format would read specially.
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~!&()*+,;=:@/%-]*$")
_TOKEN = r"[A-Za-z0-9!#$&^_.+-]+"
_CONTENT_TYPE_RE = re.compile(rf"^{_TOKEN}/{_TOKEN}(?:; ?[A-Za-z0-9_-]+=[A-Za-z0-9_.-]+)*$")
_EXPECTED_CODES_RE = re.compile(r"^[1-5][0-9]{2}(?:-[1-5][0-9]{2})?(?:,[1-5][0-9]{2}(?:-[1-5][0-9]{2})?)*$")
# Redirect targets: an absolute http(s) URL whose characters are all plain URL characters; the
# AWS-style placeholders below are the only dynamic parts.
_URL_RE = re.compile(r"^https?://[A-Za-z0-9._~!&()*+,;=:@/?\[\]{}#-]+$")
REDIRECT_PLACEHOLDERS = {
    "#{host}": "%[req.hdr(host),field(1,:)]",
    "#{path}": "%[path]",
    "#{query}": "%[query]",
    "#{port}": "%[dst_port]",
    "#{protocol}": "%[ssl_fc,iif(https,http)]",
}
CHOSEN_POOL_VAR = "txn.hb_pool"
REDIRECT_CODES = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class RenderedConfig:
    """The configuration text and the side files it names (path relative to the LB's dir → content)."""

    text: str
    files: dict[str, bytes] = field(default_factory=dict)
    secret_files: frozenset[str] = frozenset()  # among `files`: private keys inside (mode 0600)


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise InvalidSpec(f"{kind} id {value!r} is not valid: it must match {ID_RE.pattern}")
    return value


def quote(value: str, what: str) -> str:
    """`value` strongly quoted for HAProxy's parser; refuses what strong quoting cannot carry."""
    if "'" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidSpec(f"{what} {value!r} contains a quote or a control character")
    return f"'{value}'"


def check_host(value: str, what: str = "host") -> str:
    host = value.lower()
    if len(host) > 253 or not _HOST_RE.match(host):
        raise InvalidSpec(f"{what} {value!r} is not a DNS name (or *.suffix)")
    return host


def check_path(value: str, what: str = "path") -> str:
    if len(value) > 1024 or not _PATH_RE.match(value):
        raise InvalidSpec(f"{what} {value!r} must start with / and hold only URL path characters")
    return value


def redirect_location(url: str) -> str:
    """A redirect URL as an HAProxy log-format string: literal except for the #{…} placeholders."""
    if len(url) > 2048 or not _URL_RE.match(url):
        raise InvalidSpec(f"redirect URL {url!r} must be an absolute http(s) URL of plain URL characters "
                          "(percent-escapes and spaces are not accepted)")
    out = url
    for placeholder, expression in REDIRECT_PLACEHOLDERS.items():
        out = out.replace(placeholder, expression)
    leftover = out
    for expression in REDIRECT_PLACEHOLDERS.values():
        leftover = leftover.replace(expression, "")
    if "%" in leftover or "{" in leftover or "}" in leftover:
        raise InvalidSpec(f"redirect URL {url!r} has braces outside the known placeholders "
                          f"({', '.join(REDIRECT_PLACEHOLDERS)})")
    return quote(out, "redirect URL")


def _seconds_ms(value: float, what: str, low: float = 0.01, high: float = 86400.0) -> str:
    if not low <= value <= high:
        raise InvalidSpec(f"{what} must be between {low} and {high} seconds")
    return f"{max(1, round(value * 1000))}ms"


def _positive(value: int | None, what: str, high: int = 10_000_000) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise InvalidSpec(f"{what} must be an integer between 1 and {high}")
    return value


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def cookie_value(member_id: str) -> str:
    """The sticky cookie's value for a member: opaque, so clients do not learn member ids."""
    return hashlib.sha256(member_id.encode()).hexdigest()[:16]


def normalized(spec: LoadBalancerSpec) -> LoadBalancerSpec:
    """`spec` with every member at weight 1, enabled: two specs equal here differ only in what the
    runtime API can change without a reload."""
    pools = tuple(dataclasses.replace(p, members=tuple(dataclasses.replace(m, weight=1, admin_state="enabled")
                                                      for m in p.members)) for p in spec.pools)
    return dataclasses.replace(spec, pools=pools)


def validate(spec: LoadBalancerSpec) -> None:
    """Refuse a spec the renderer cannot express or HAProxy would misread (InvalidSpec)."""
    check_id("load balancer", spec.id)
    try:
        ipaddress.IPv4Address(spec.vip)
    except ValueError as exc:
        raise InvalidSpec(f"vip {spec.vip!r} is not an IPv4 address") from exc
    _unique("listener", (x.id for x in spec.listeners))
    _unique("pool", (p.id for p in spec.pools))
    _unique("certificate", (c.id for c in spec.certificates))
    _unique("listener port", (str(x.port) for x in spec.listeners))
    pools = {p.id: p for p in spec.pools}
    certificates = {c.id for c in spec.certificates}
    for cert in spec.certificates:
        check_id("certificate", cert.id)
        for pem, what in ((cert.chain_pem, "chain"), (cert.key_pem, "key")):
            if "-----BEGIN " not in pem or "\0" in pem:
                raise InvalidSpec(f"certificate {cert.id}: the {what} is not PEM")
    for pool in spec.pools:
        _validate_pool(pool)
    for listener in spec.listeners:
        _validate_listener(listener, pools, certificates)


def _unique(kind: str, values: Iterable[str]) -> None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise InvalidSpec(f"duplicate {kind} {v!r}")
        seen.add(v)


def _validate_pool(pool: PoolSpec) -> None:
    check_id("pool", pool.id)
    if pool.protocol not in ("http", "tcp"):
        raise InvalidSpec(f"pool {pool.id}: protocol {pool.protocol!r} is not http or tcp")
    if pool.algorithm not in ("roundrobin", "leastconn", "source"):
        raise InvalidSpec(f"pool {pool.id}: unknown algorithm {pool.algorithm!r}")
    if pool.sticky not in ("none", "cookie", "source_ip"):
        raise InvalidSpec(f"pool {pool.id}: unknown stickiness {pool.sticky!r}")
    if pool.sticky == "cookie" and pool.protocol != "http":
        raise InvalidSpec(f"pool {pool.id}: cookie stickiness needs an http pool")
    if pool.proxy_protocol and pool.protocol != "tcp":
        raise InvalidSpec(f"pool {pool.id}: the PROXY protocol is for tcp pools")
    _unique(f"member of pool {pool.id}", (m.id for m in pool.members))
    for m in pool.members:
        _validate_member(pool.id, m)
    hc = pool.health_check
    if hc is not None:
        _validate_health_check(pool, hc)


def _validate_member(pool_id: str, m: MemberSpec) -> None:
    check_id("member", m.id)
    try:
        ipaddress.IPv4Address(m.address)
    except ValueError as exc:
        raise InvalidSpec(f"member {m.id}: {m.address!r} is not an IPv4 address") from exc
    if isinstance(m.port, bool) or not isinstance(m.port, int) or not 1 <= m.port <= 65535:
        raise InvalidSpec(f"member {m.id}: port {m.port!r} is out of range")
    if isinstance(m.weight, bool) or not isinstance(m.weight, int) or not 0 <= m.weight <= 256:
        raise InvalidSpec(f"member {m.id}: weight must be between 0 and 256")
    if m.admin_state not in ("enabled", "drain", "disabled"):
        raise InvalidSpec(f"member {m.id}: unknown admin state {m.admin_state!r}")


def _validate_health_check(pool: PoolSpec, hc: HealthCheckSpec) -> None:
    if hc.protocol not in ("http", "tcp"):
        raise InvalidSpec(f"pool {pool.id}: health check protocol {hc.protocol!r} is not http or tcp")
    if hc.protocol == "http":
        if pool.protocol != "http":
            raise InvalidSpec(f"pool {pool.id}: an http health check needs an http pool")
        check_path(hc.path, "health check path")
        if hc.host is not None:
            check_host(hc.host, "health check host")
        if not _EXPECTED_CODES_RE.match(hc.expected_codes):
            raise InvalidSpec(f"pool {pool.id}: expected codes {hc.expected_codes!r} must look like "
                              "200 or 200,204 or 200-399")
    _seconds_ms(hc.interval_s, "health check interval", 0.1, 3600)
    _seconds_ms(hc.timeout_s, "health check timeout", 0.1, 3600)
    _positive(hc.healthy_threshold, "healthy threshold", 100)
    _positive(hc.unhealthy_threshold, "unhealthy threshold", 100)


def _validate_listener(listener: ListenerSpec, pools: dict[str, PoolSpec], certificates: set[str]) -> None:
    check_id("listener", listener.id)
    if listener.protocol not in ("http", "https", "tcp"):
        raise InvalidSpec(f"listener {listener.id}: protocol {listener.protocol!r} is not http, https or tcp")
    if isinstance(listener.port, bool) or not isinstance(listener.port, int) or not 1 <= listener.port <= 65535:
        raise InvalidSpec(f"listener {listener.id}: port {listener.port!r} is out of range")
    wanted = "tcp" if listener.protocol == "tcp" else "http"
    referenced = [listener.default_pool_id] if listener.default_pool_id else []
    referenced += [r.pool_id for r in listener.rules if r.action == "forward" and r.pool_id]
    for pool_id in referenced:
        if pool_id not in pools:
            raise InvalidSpec(f"listener {listener.id}: unknown pool {pool_id!r}")
        if pools[pool_id].protocol != wanted:
            raise InvalidSpec(f"listener {listener.id} ({listener.protocol}) cannot forward to "
                              f"{pools[pool_id].protocol} pool {pool_id}")
    if listener.protocol == "https":
        if not listener.certificate_ids:
            raise InvalidSpec(f"listener {listener.id}: https needs at least one certificate")
    elif listener.certificate_ids:
        raise InvalidSpec(f"listener {listener.id}: certificates are for https listeners")
    for cid in listener.certificate_ids:
        if cid not in certificates:
            raise InvalidSpec(f"listener {listener.id}: unknown certificate {cid!r}")
    if listener.protocol == "tcp":
        if listener.rules:
            raise InvalidSpec(f"listener {listener.id}: rules are for http/https listeners")
        if listener.request_rate_limit is not None:
            raise InvalidSpec(f"listener {listener.id}: request rate limits are for http/https listeners")
    if listener.redirect_to_https_port is not None:
        if listener.protocol != "http":
            raise InvalidSpec(f"listener {listener.id}: only an http listener redirects to https")
        port = listener.redirect_to_https_port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InvalidSpec(f"listener {listener.id}: redirect port {port!r} is out of range")
    _positive(listener.connection_limit, "connection limit")
    _positive(listener.connection_rate_limit, "connection rate limit")
    _positive(listener.request_rate_limit, "request rate limit")
    _seconds_ms(listener.idle_timeout_s, "idle timeout", 1, 86400)
    _unique(f"rule of listener {listener.id}", (r.id for r in listener.rules))
    for rule in listener.rules:
        _validate_rule(listener, rule)


def _validate_rule(listener: ListenerSpec, rule: RuleSpec) -> None:
    check_id("rule", rule.id)
    if isinstance(rule.priority, bool) or not isinstance(rule.priority, int):
        raise InvalidSpec(f"rule {rule.id}: priority must be an integer")
    if rule.host is not None:
        check_host(rule.host)
    if rule.path_prefix is not None:
        check_path(rule.path_prefix, "path prefix")
    if rule.action == "forward":
        if not rule.pool_id:
            raise InvalidSpec(f"rule {rule.id}: forward needs a pool")
    elif rule.action == "redirect":
        if not rule.redirect_url:
            raise InvalidSpec(f"rule {rule.id}: redirect needs a URL")
        redirect_location(rule.redirect_url)
        if rule.redirect_code not in REDIRECT_CODES:
            raise InvalidSpec(f"rule {rule.id}: redirect code must be one of {REDIRECT_CODES}")
    elif rule.action == "fixed_response":
        if isinstance(rule.status_code, bool) or not isinstance(rule.status_code, int) \
                or not 200 <= rule.status_code <= 599:
            raise InvalidSpec(f"rule {rule.id}: status code must be between 200 and 599")
        if not _CONTENT_TYPE_RE.match(rule.content_type) or len(rule.content_type) > 200:
            raise InvalidSpec(f"rule {rule.id}: content type {rule.content_type!r} is not a media type")
        if len(rule.body.encode()) > 64 * 1024:
            raise InvalidSpec(f"rule {rule.id}: the body is over 64 KiB")
    else:
        raise InvalidSpec(f"rule {rule.id}: unknown action {rule.action!r}")


# --- rendering -----------------------------------------------------------------------------------

def certificate_file(cert: CertificateSpec) -> tuple[str, bytes]:
    """The certificate's file (chain then key, as HAProxy wants it): content-addressed, so writing a new
    version never changes what the running proxy would re-read before the reload that uses it."""
    pem = cert.chain_pem.strip() + "\n" + cert.key_pem.strip() + "\n"
    data = pem.encode()
    return f"certs/{cert.id}-{_digest(data)}.pem", data


def body_file(rule: RuleSpec) -> tuple[str, bytes]:
    data = rule.body.encode()
    return f"bodies/{rule.id}-{_digest(data)}.body", data


def render(spec: LoadBalancerSpec, lb_dir: Path, socket_dir: Path | None = None, *,
           global_maxconn: int = 10_000, chroot: Path | None = None) -> RenderedConfig:
    """The HAProxy configuration of `spec`, whose files live in `lb_dir` and its stats socket in
    `socket_dir` (default: `lb_dir`; a unix socket path must be short). Validated first.
    `global_maxconn`: the process's connection ceiling (HAProxy needs two descriptors per connection);
    `chroot`: an empty directory the workers are locked into once configured."""
    socket_dir = socket_dir or lb_dir
    validate(spec)
    files: dict[str, bytes] = {}
    secret: set[str] = set()
    lines = [
        f"# Written by hackboot for load balancer {spec.id}: changes are overwritten.",
        "global",
        "    user haproxy",
        "    group haproxy",
        f"    maxconn {global_maxconn}",
        # Workers parse tenants' traffic: they need no file once the master has read everything.
        *([f"    chroot {quote(str(chroot), 'chroot path')}"] if chroot else []),
        f"    stats socket {quote(str(socket_dir / 'stats.sock'), 'state path')} mode 600 level admin",
        "    stats timeout 30s",
        # Health states carried across a reload (see HaproxyDriver._save_server_state).
        f"    server-state-file {quote(str(lb_dir / 'server-state'), 'state path')}",
        # Records go to the process's stdout, a file the driver reads back (see haproxy.py).
        "    log stdout format raw local0 info",
        # Old workers finish their connections, but not forever.
        "    hard-stop-after 10m",
        f"    ssl-default-bind-ciphersuites {TLS13_SUITES}",
        f"    ssl-default-bind-ciphers {TLS12_CIPHERS}",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        "",
        "defaults",
        "    log global",
        "    load-server-state-from-file global",
        "    option dontlognull",
        "    option redispatch",
        "    retries 3",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-request 10s",
        "    timeout queue 30s",
        "",
    ]
    for cert in spec.certificates:
        rel, data = certificate_file(cert)
        files[rel] = data
        secret.add(rel)
    cert_paths = {c.id: lb_dir / certificate_file(c)[0] for c in spec.certificates}
    pools = {p.id: p for p in spec.pools}
    for listener in spec.listeners:
        lines += _frontend(spec, listener, cert_paths, pools, lb_dir, files)
    for pool in spec.pools:
        timeout = max([x.idle_timeout_s for x in spec.listeners if _uses(x, pool.id)] or [60.0])
        users = [x for x in spec.listeners if _uses(x, pool.id)]
        lines += _backend(pool, timeout, https_only=bool(users) and all(x.protocol == "https" for x in users))
    return RenderedConfig("\n".join(lines) + "\n", files, frozenset(secret))


def _uses(listener: ListenerSpec, pool_id: str) -> bool:
    return listener.default_pool_id == pool_id or any(r.pool_id == pool_id for r in listener.rules)


def _frontend(spec: LoadBalancerSpec, listener: ListenerSpec, cert_paths: dict[str, Path],
              pools: dict[str, PoolSpec], lb_dir: Path, files: dict[str, bytes]) -> list[str]:
    http = listener.protocol in ("http", "https")
    bind = f"    bind {spec.vip}:{listener.port}"
    if listener.protocol == "https":
        # The first certificate is the default; HAProxy picks among them by SNI (their names).
        crts = " ".join(f"crt {quote(str(cert_paths[c]), 'certificate path')}" for c in listener.certificate_ids)
        bind += f" ssl {crts} alpn h2,http/1.1"
    out = [f"frontend {LISTENER_PREFIX}{listener.id}",
           f"    mode {'http' if http else 'tcp'}",
           bind,
           f"    log-format \"{HTTP_LOG_FORMAT if http else TCP_LOG_FORMAT}\"",
           f"    timeout client {_seconds_ms(listener.idle_timeout_s, 'idle timeout', 1, 86400)}"]
    if listener.connection_limit is not None:
        out.append(f"    maxconn {listener.connection_limit}")
    if listener.connection_rate_limit is not None or listener.request_rate_limit is not None:
        stored = ["conn_rate(1s)"] + (["http_req_rate(1s)"] if listener.request_rate_limit is not None else [])
        out += [f"    stick-table type ip size 100k expire 30s store {','.join(stored)}",
                "    tcp-request connection track-sc0 src"]
        if listener.connection_rate_limit is not None:
            out.append("    tcp-request connection reject "
                       f"if {{ sc_conn_rate(0) gt {listener.connection_rate_limit} }}")
        if listener.request_rate_limit is not None:
            out.append("    http-request deny deny_status 429 "
                       f"if {{ sc_http_req_rate(0) gt {listener.request_rate_limit} }}")
    if http:
        proto = "https" if listener.protocol == "https" else "http"
        # On a reload, an old worker answers the next request of an idle keep-alive connection (with
        # "Connection: close") instead of closing it under a client that may be sending on it.
        out += ["    option idle-close-on-response",
                "    option forwardfor",
                f"    http-request set-header X-Forwarded-Proto {proto}",
                "    http-request set-header X-Forwarded-Port %[dst_port]"]
    if listener.redirect_to_https_port is not None:
        port = listener.redirect_to_https_port
        suffix = "" if port == 443 else f":{port}"
        out.append(f"    http-request redirect code 301 location "
                   f"https://%[req.hdr(host),field(1,:)]{suffix}%[capture.req.uri] if {{ req.hdr(host) -m found }}")
        out.append(f"    http-request redirect code 301 location https://{spec.vip}{suffix}%[capture.req.uri]")
    # Rules are all `http-request` actions, in priority order, each guarded by "no rule matched yet":
    # HAProxy runs every http-request rule before any use_backend, so a forward is recorded in a
    # variable here and acted on below, and a redirect after a matching forward does not fire.
    for rule in sorted(listener.rules, key=lambda r: (r.priority, r.id)):
        out += _rule(rule, lb_dir, files)
    if any(r.action == "forward" for r in listener.rules):
        out.append(f"    use_backend %[var({CHOSEN_POOL_VAR})] if {{ var({CHOSEN_POOL_VAR}) -m found }}")
    if listener.default_pool_id is not None:
        out.append(f"    default_backend {POOL_PREFIX}{listener.default_pool_id}")
    out.append("")
    return out


def _rule(rule: RuleSpec, lb_dir: Path, files: dict[str, bytes]) -> list[str]:
    conditions = [f"!{{ var({CHOSEN_POOL_VAR}) -m found }}"]
    if rule.host is not None:
        host = check_host(rule.host)
        if host.startswith("*."):
            conditions.append(f"{{ req.hdr(host),field(1,:),lower -m end {quote(host[1:], 'host')} }}")
        else:
            conditions.append(f"{{ req.hdr(host),field(1,:),lower -m str {quote(host, 'host')} }}")
    if rule.path_prefix is not None:
        conditions.append(f"{{ path -m beg {quote(check_path(rule.path_prefix), 'path prefix')} }}")
    cond = " if " + " ".join(conditions)
    comment = f"    # rule {rule.id} (priority {rule.priority})"
    if rule.action == "forward":
        return [comment, f"    http-request set-var({CHOSEN_POOL_VAR}) str({POOL_PREFIX}{rule.pool_id}){cond}"]
    if rule.action == "redirect":
        assert rule.redirect_url is not None
        return [comment, f"    http-request redirect code {rule.redirect_code} "
                         f"location {redirect_location(rule.redirect_url)}{cond}"]
    rel, data = body_file(rule)
    body = ""
    if data:
        files[rel] = data
        body = f" file {quote(str(lb_dir / rel), 'body path')}"
    return [comment, f"    http-request return status {rule.status_code} "
                     f"content-type {quote(rule.content_type, 'content type')}{body}{cond}"]


def _backend(pool: PoolSpec, idle_timeout_s: float, *, https_only: bool = False) -> list[str]:
    out = [f"backend {POOL_PREFIX}{pool.id}",
           f"    mode {pool.protocol}",
           f"    balance {pool.algorithm}",
           f"    timeout server {_seconds_ms(idle_timeout_s, 'idle timeout', 1, 86400)}",
           # An established TCP session (or an upgraded HTTP one, e.g. a WebSocket) is a tunnel, whose
           # inactivity timeout replaces the client/server ones: the listener's idle timeout too.
           f"    timeout tunnel {_seconds_ms(idle_timeout_s, 'idle timeout', 1, 86400)}"]
    hc = pool.health_check
    check = ""
    if hc is not None:
        out.append(f"    timeout check {_seconds_ms(hc.timeout_s, 'health check timeout', 0.1, 3600)}")
        if hc.protocol == "http":
            send = f"    http-check send meth GET uri {quote(check_path(hc.path), 'health check path')}"
            if hc.host is not None:
                send += f" hdr Host {quote(check_host(hc.host), 'health check host')}"
            out += ["    option httpchk", send, f"    http-check expect status {hc.expected_codes}"]
        check = (f" check inter {_seconds_ms(hc.interval_s, 'health check interval', 0.1, 3600)}"
                 f" rise {hc.healthy_threshold} fall {hc.unhealthy_threshold}")
    if pool.sticky == "cookie":
        # Served only over https: the browser must not send it in clear text either.
        out.append("    cookie SRVID insert indirect nocache httponly" + (" secure" if https_only else ""))
    elif pool.sticky == "source_ip":
        out += ["    stick-table type ip size 200k expire 30m", "    stick on src"]
    for m in pool.members:
        out.append(_server(pool, m, check))
    out.append("")
    return out


def _server(pool: PoolSpec, m: MemberSpec, check: str) -> str:
    # Drain keeps sticky clients and takes no new ones: HAProxy's weight 0; the runtime API sets the
    # same through `state drain` without a reload.
    weight = 0 if m.admin_state == "drain" else m.weight
    line = f"    server {m.id} {m.address}:{m.port} weight {weight}{check}"
    if pool.sticky == "cookie":
        line += f" cookie {cookie_value(m.id)}"
    if pool.proxy_protocol:
        # Checks carry the header too: a member that requires it would otherwise see them as garbage.
        line += " send-proxy-v2" + (" check-send-proxy" if check else "")
    if m.admin_state == "disabled":
        line += " disabled"
    return line


def parse_access_record(line: str, cursor: int) -> AccessLogRecord | None:
    """One line of the access log (written with the formats above) as a record, None if it is not one."""
    words = line.split()
    if len(words) != 11 or words[0] != LOG_MARK or not words[2].startswith(LISTENER_PREFIX):
        return None
    try:
        seconds, _, millis = words[1].partition(".")
        time_ = dt.datetime.fromtimestamp(int(seconds) + int(millis or 0) / 1000, tz=dt.UTC)
        status = int(words[8]) if words[8].lstrip("-").isdigit() else None
        duration = max(0, int(words[9]))
        bytes_out = max(0, int(words[10]))
    except ValueError:
        return None
    backend, server = words[4], words[5]
    pool_id = backend[len(POOL_PREFIX):] if backend.startswith(POOL_PREFIX) else None
    return AccessLogRecord(
        cursor=cursor, time=time_, listener_id=words[2][len(LISTENER_PREFIX):], client=words[3],
        pool_id=pool_id, member_id=server if pool_id and not server.startswith("<") else None,
        method=None if words[6] == "-" else words[6], path=None if words[7] == "-" else words[7],
        status=status if status is not None and status >= 0 else None, duration_ms=duration, bytes_out=bytes_out)
