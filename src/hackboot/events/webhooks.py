"""Webhook delivery: URL rules, the SSRF guard, exponential backoff and the sender.

The sender is a loop (see `service.loops`). Each step:

1. reads due deliveries (`pending`, `next_attempt_at <= now`) in a read transaction;
2. claims each with one conditional UPDATE guarded by its `attempts` count (a generation
   number): `attempts = attempts + 1, next_attempt_at = now + lease WHERE attempts = <seen>`.
   Two senders (threads or processes) can never both claim one attempt, on SQLite or
   PostgreSQL, and a sender that dies mid-request leaves a delivery that is due again once
   the lease runs out;
3. POSTs outside any transaction, then records the outcome in a new short transaction,
   guarded the same way, with one `webhook_attempts` row per attempt (the delivery log).

Failures (non-2xx, redirects, timeouts, connection errors) retry after
`base * 2**(attempt-1)` seconds, capped, times a jitter factor in [0.75, 1]; after
`webhook_max_attempts` attempts the delivery is `failed`. The jitter spreads retries of
deliveries that failed together, while keeping each delivery's delays strictly growing.

SSRF guard: unless `webhook_allow_private_targets` is on, URLs whose host is (or resolves to)
a loopback, private, link-local, CGNAT, multicast or reserved address are refused. The
address is checked at send time, and the request goes to that very address (pinned, with
the original Host header and TLS server name), so DNS cannot change between check and use.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.exceptions import InvalidTag
from sqlalchemy import select, update

from hackboot.core.config import get_settings
from hackboot.core.crypto import unseal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.events import signing
from hackboot.events.config import setting
from hackboot.events.models import Event, Webhook, WebhookAttempt, WebhookDelivery

log = logging.getLogger("hackboot.events.webhooks")

MAX_URL = 2048
BATCH = 50  # deliveries claimed per round
PER_WEBHOOK = 5  # at most this many per webhook per round: one slow receiver cannot starve others
THREADS = 8
EXCERPT_BYTES = 512
LEASE_MARGIN_S = 30.0


# --- URL rules ---------------------------------------------------------------------------------------

def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_forbidden_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for anything that is not a public unicast address (loopback, RFC 1918, link-local…)."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not addr.is_global or addr.is_multicast


def _local_name(host: str) -> bool:
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


def validate_url(url: str, *, allow_private: bool) -> str:
    """Return the URL if it is an acceptable webhook target; raise ValueError with the reason."""
    if len(url) > MAX_URL:
        raise ValueError(f"must be at most {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    host = parts.hostname or ""
    if not host:
        raise ValueError("must include a host name")
    if "@" in parts.netloc:
        raise ValueError("must not include a user name or password; receivers authenticate deliveries "
                         "by their signature")
    if parts.fragment:
        raise ValueError("must not include a #fragment")
    if port == 0:
        raise ValueError("port must be between 1 and 65535")
    addr = _ip(host)
    if not allow_private and ((addr is not None and is_forbidden_address(addr)) or _local_name(host)):
        raise ValueError(f"points at a non-public address ({host}); this cloud only delivers webhooks "
                         "to public addresses (operators: setting webhook_allow_private_targets)")
    return url


class TargetRefused(Exception):
    """A permanent delivery failure: retrying cannot help."""


def resolve(host: str, port: int, *, allow_private: bool) -> str:
    """The address to connect to for `host`; TargetRefused if any of its addresses is forbidden."""
    literal = _ip(host)
    if literal is not None:
        addrs = [literal]
    else:
        if not allow_private and _local_name(host):
            raise TargetRefused(f"{host} is a local name; only public addresses receive webhooks")
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addrs:
            raise socket.gaierror(f"no address for {host}")
    if not allow_private:
        bad = [a for a in addrs if is_forbidden_address(a)]
        if bad:
            raise TargetRefused(f"{host} resolves to the non-public address {bad[0]}; only public "
                                "addresses receive webhooks")
    return str(addrs[0])


# --- backoff -----------------------------------------------------------------------------------------

def backoff_delay(attempt: int, *, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    delay = min(cap, base * (2 ** min(attempt - 1, 62)))
    return float(delay * (0.75 + 0.25 * rand()))


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(int(value.strip())))
    except ValueError:
        return None


# --- payload -----------------------------------------------------------------------------------------

def payload(event: Event) -> dict[str, Any]:
    return {"id": event.id, "type": event.type, "resource_type": event.resource_type,
            "resource_id": event.resource_id, "project_id": event.project_id, "actor": event.actor,
            "data": event.data, "created_at": event.created_at.isoformat()}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, default=str).encode()


# --- the sender --------------------------------------------------------------------------------------

@dataclass
class Claim:
    delivery_id: str
    attempt: int  # the number of this attempt (attempts after the claim)
    url: str = ""
    secret: str = ""
    event_type: str = ""
    body: bytes = b""
    problem: str = ""  # set when the delivery cannot be attempted at all (webhook disabled, event gone)


@dataclass
class Outcome:
    ok: bool
    status_code: int | None = None
    error: str = ""
    excerpt: str = ""
    duration_ms: int = 0
    retry_after: float | None = None
    permanent: bool = False
    started_at: dt.datetime | None = None


class Sender:
    """Claims due deliveries and sends them from a small thread pool."""

    def __init__(self, verify: ssl.SSLContext | bool = True) -> None:
        self._verify = verify  # TLS verification of receivers (a custom CA context in tests)
        self._http: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                timeout = get_settings().webhook_timeout_s
                # No keep-alive: requests go to pinned addresses, and a pooled TLS connection
                # must never be reused for another host name that shares the address.
                self._http = httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False,
                                          verify=self._verify, limits=httpx.Limits(max_keepalive_connections=0))
                self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="hb-webhook")
            return self._http

    def step(self) -> int:
        """One round: send every due delivery (in batches). Returns how many were attempted."""
        self._client()
        assert self._pool is not None
        total = 0
        while True:
            claims = claim_due(BATCH)
            if not claims:
                return total
            list(self._pool.map(self.deliver, claims))
            total += len(claims)
            if len(claims) < BATCH:
                return total

    def deliver(self, claim: Claim) -> Outcome:
        try:
            outcome = Outcome(ok=False, error=claim.problem, permanent=True) if claim.problem else self.send(claim)
        except Exception as exc:  # record the failure and retry later: never lose a delivery
            log.exception("webhook delivery %s failed unexpectedly", claim.delivery_id)
            outcome = Outcome(ok=False, error=f"internal error: {type(exc).__name__}")
        record(claim, outcome)
        return outcome

    def send(self, claim: Claim) -> Outcome:
        client = self._client()
        allow_private = bool(setting("webhook_allow_private_targets"))
        url = httpx.URL(claim.url)
        host = url.host
        started = utcnow()
        t0 = time.monotonic()

        def done(**kw: Any) -> Outcome:
            return Outcome(started_at=started, duration_ms=int((time.monotonic() - t0) * 1000), **kw)

        try:
            address = resolve(host, url.port or (443 if url.scheme == "https" else 80),
                              allow_private=allow_private)
        except TargetRefused as exc:
            return done(ok=False, error=str(exc), permanent=True)
        except (OSError, UnicodeError) as exc:
            return done(ok=False, error=f"DNS lookup of {host} failed: {exc}")
        timestamp = int(time.time())
        headers = signing.headers(secret=claim.secret, timestamp=timestamp, body=claim.body,
                                  event_type=claim.event_type, delivery_id=claim.delivery_id,
                                  attempt=claim.attempt)
        headers["Host"] = url.netloc.decode("ascii")
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        timeout = get_settings().webhook_timeout_s
        try:
            with client.stream("POST", url.copy_with(host=address), content=claim.body, headers=headers,
                               extensions=extensions) as resp:
                excerpt = b""
                for chunk in resp.iter_bytes():
                    excerpt += chunk
                    if len(excerpt) >= EXCERPT_BYTES:
                        break
                text = excerpt[:EXCERPT_BYTES].decode("utf-8", "replace")
                code = resp.status_code
                if 200 <= code < 300:
                    return done(ok=True, status_code=code, excerpt=text)
                if 300 <= code < 400:
                    where = resp.headers.get("location", "")[:200]
                    error = f"HTTP {code}: redirect to {where or '?'} not followed; configure the final URL"
                else:
                    error = f"HTTP {code} {resp.reason_phrase}".strip()
                retry_after = _retry_after(resp.headers.get("retry-after")) if code in (429, 503) else None
                return done(ok=False, status_code=code, error=error, excerpt=text, retry_after=retry_after)
        except httpx.TimeoutException:
            return done(ok=False, error=f"timed out after {timeout:g}s")
        except httpx.TransportError as exc:
            return done(ok=False, error=f"connection failed: {type(exc).__name__}: {exc}"[:500])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._http is not None:
            self._http.close()


def claim_due(limit: int, now: dt.datetime | None = None) -> list[Claim]:
    now = now or utcnow()
    with session_scope(write=False) as s:
        rows = s.execute(
            select(WebhookDelivery.id, WebhookDelivery.webhook_id, WebhookDelivery.attempts)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at).limit(limit * 4)).all()
    per_hook: dict[str, int] = {}
    picked = []
    for delivery_id, webhook_id, attempts in rows:
        if per_hook.get(webhook_id, 0) >= PER_WEBHOOK:
            continue
        per_hook[webhook_id] = per_hook.get(webhook_id, 0) + 1
        picked.append((delivery_id, attempts))
        if len(picked) >= limit:
            break
    if not picked:
        return []
    lease = dt.timedelta(seconds=get_settings().webhook_timeout_s + LEASE_MARGIN_S)
    claims: list[Claim] = []
    with session_scope() as s:
        for delivery_id, attempts in picked:
            result = s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                       WebhookDelivery.attempts == attempts, WebhookDelivery.next_attempt_at <= now)
                .values(attempts=attempts + 1, next_attempt_at=now + lease, last_attempt_at=now))
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claims.append(Claim(delivery_id=delivery_id, attempt=attempts + 1))
    if not claims:
        return []
    with session_scope(write=False) as s:
        rows2 = s.execute(
            select(WebhookDelivery.id, Webhook, Event)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .outerjoin(Event, Event.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id.in_([c.delivery_id for c in claims]))).all()
    found = {row[0]: (row[1], row[2]) for row in rows2}
    max_attempts = get_settings().webhook_max_attempts
    for claim in claims:
        hook, event = found.get(claim.delivery_id, (None, None))
        if claim.attempt > max_attempts:
            # Earlier attempts were claimed but never recorded (the sender died mid-request).
            claim.problem = f"gave up after {max_attempts} attempts (some were interrupted)"
        elif hook is None:
            claim.problem = "webhook deleted"
        elif not hook.enabled:
            claim.problem = "webhook disabled before this delivery was sent; redeliver after enabling it"
        elif event is None:
            claim.problem = "event no longer exists (pruned by retention)"
        else:
            try:
                claim.secret = unseal(hook.secret_sealed, hook.id.encode()).decode()
            except (ValueError, InvalidTag):
                claim.problem = "the signing secret cannot be decrypted (master key changed?): rotate it"
                continue
            claim.url = hook.url
            claim.event_type = event.type
            claim.body = encode(payload(event))
    return claims


def record(claim: Claim, outcome: Outcome, now: dt.datetime | None = None) -> None:
    """Store the attempt and move the delivery on: delivered, failed, or pending with a backoff."""
    now = now or utcnow()
    max_attempts = get_settings().webhook_max_attempts
    values: dict[str, Any] = {"last_status_code": outcome.status_code, "last_error": outcome.error[:500]}
    if outcome.ok:
        values |= {"status": "delivered", "delivered_at": now, "last_error": ""}
    elif outcome.permanent or claim.attempt >= max_attempts:
        values |= {"status": "failed"}
    else:
        delay = backoff_delay(claim.attempt, base=float(setting("webhook_backoff_base_s")),
                              cap=float(setting("webhook_backoff_max_s")))
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, float(setting("webhook_backoff_max_s"))))
        values |= {"next_attempt_at": now + dt.timedelta(seconds=delay)}
    with session_scope() as s:
        result = s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == claim.delivery_id, WebhookDelivery.status == "pending",
                   WebhookDelivery.attempts == claim.attempt)
            .values(**values))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            # Our lease ran out and another sender took over (or the webhook was deleted): theirs wins.
            log.warning("webhook delivery %s attempt %d: outcome not recorded (claimed elsewhere or deleted)",
                        claim.delivery_id, claim.attempt)
            return
        s.add(WebhookAttempt(id=new_id("wha"), delivery_id=claim.delivery_id, attempt=claim.attempt,
                             started_at=outcome.started_at or now, duration_ms=outcome.duration_ms,
                             status_code=outcome.status_code, error=outcome.error[:500],
                             response_excerpt=outcome.excerpt[:EXCERPT_BYTES]))
