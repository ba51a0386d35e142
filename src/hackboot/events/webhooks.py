"""Webhook delivery: URL rules, the SSRF guard, exponential backoff and a fair sender.

URLs: `parse_target` is the one parser of webhook URLs, used when a webhook is created or
changed (a 422 on any problem) and again by the sender for every attempt (a stored URL that no
longer parses fails its delivery with the reason; it never crashes the sender). Hosts are
read strictly: IDNA names are encoded to their A-labels (UTS #46), hosts that end in a number
are IPv4 addresses in any of the forms `inet_aton` accepts (`0177.0.0.1`, `0x7f.1`, `2130706433`,
`127.1`) and are normalised to a dotted quad, IPv6 literals are compressed. The stored URL is
the normalised one, so what the API shows is where deliveries go.

SSRF guard: `is_forbidden_address` is the one decision of "not a public unicast address"
(loopback, RFC 1918, link-local, CGNAT, multicast, reserved…), including IPv6 forms that
carry an IPv4 address (IPv4-mapped and -compatible, NAT64, 6to4, Teredo), which are judged by
the address they embed. Unless `webhook_allow_private_targets` is on, such literals are refused
at create time, and every address a name resolves to is checked again at send time; the
request goes to that very address (pinned, with the original Host header and TLS server
name), so DNS cannot change between check and use (DNS rebinding).

The sender (a loop, see `service.loops`) keeps a bounded number of attempts in flight on
one asyncio event loop and refills free slots as soon as an attempt ends:

1. it reads which webhooks have due deliveries (`pending`, `next_attempt_at <= now`) and
   hands out free slots round-robin over projects, then over each project's webhooks, within
   limits per webhook and per project, so a project with a large backlog gets one turn like
   any other (fairness);
2. a webhook whose receiver keeps failing (timeouts, refused connections, errors) is isolated:
   one attempt at a time, from a small shared budget of "failing" slots, and after
   consecutive failures it is held back for a growing time (its pending deliveries become due
   later, without spending attempts). A dead endpoint never occupies the slots healthy
   receivers need, and its backlog does not weigh on the scan for due deliveries;
3. each delivery is claimed with one conditional UPDATE guarded by its `attempts` count (a
   generation number): `attempts = attempts + 1, next_attempt_at = now + lease WHERE attempts
   = <seen>`. Two senders (threads, processes or hosts) can never both claim one attempt, and
   a sender that dies mid-request leaves a delivery that is due again once the lease runs out;
4. it POSTs outside any transaction, with a short connect timeout and a hard deadline for the
   whole attempt (DNS, connect, TLS, response), then records the outcome in a new short
   transaction, guarded the same way, with one `webhook_attempts` row per attempt.

Failures (non-2xx, redirects, timeouts, connection errors) retry after
`base * 2**(attempt-1)` seconds, capped, times a jitter factor in [0.75, 1]; after
`webhook_max_attempts` attempts the delivery is `failed`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import idna
from cryptography.exceptions import InvalidTag
from sqlalchemy import func, select, update

from hackboot.core.config import get_settings
from hackboot.core.crypto import unseal
from hackboot.core.db import session_scope, utcnow
from hackboot.core.ids import new_id
from hackboot.events import signing
from hackboot.events.models import Event, Webhook, WebhookAttempt, WebhookDelivery

log = logging.getLogger("hackboot.events.webhooks")

MAX_URL = 2048
EXCERPT_BYTES = 512
LEASE_MARGIN_S = 30.0

# Sender limits (per sender process). Healthy webhooks may use every slot; failing ones share
# FAILING_SLOTS, one attempt each, so dead receivers leave most slots to everyone else.
MAX_IN_FLIGHT = 16
PER_WEBHOOK = 2
PER_PROJECT = 6
FAILING_SLOTS = 4
CONNECT_TIMEOUT_S = 3.0
# A webhook is held back after this many consecutive failures, for backoff_delay(n) capped here.
HOLD_AFTER_FAILURES = 2
HOLD_MAX_S = 120.0
DNS_THREADS = 8

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- addresses ---------------------------------------------------------------------------------------

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 is the last 32 bits
# Never public, whatever they embed: local-use NAT64 (RFC 8215), deprecated site-local, and the
# 6to4 relay anycast (RFC 7526), which Python still counts as global.
_ALWAYS_FORBIDDEN: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.IPv6Network("64:ff9b:1::/48"), ipaddress.IPv6Network("fec0::/10"),
    ipaddress.IPv4Network("192.88.99.0/24"))


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries, and which a packet to it may end up reaching."""
    out: list[ipaddress.IPv4Address] = []
    value = int(addr)
    if addr.ipv4_mapped is not None:
        out.append(addr.ipv4_mapped)
    if value >> 32 == 0:  # IPv4-compatible ::a.b.c.d (deprecated; :: and ::1 are judged on their own)
        out.append(ipaddress.IPv4Address(value))
    if addr in _NAT64:
        out.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr.teredo is not None:
        out.extend(addr.teredo)  # (server, client)
    return out


def is_forbidden_address(addr: Address) -> bool:
    """True for anything that is not a public unicast address (loopback, RFC 1918, link-local…),
    including IPv6 addresses that embed such an IPv4 address. The one decision, for create time
    and send time alike."""
    if any(addr in net for net in _ALWAYS_FORBIDDEN if net.version == addr.version):
        return True
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return True  # a zone index only makes sense on a local link
        if addr.ipv4_mapped is not None:  # the packet goes to the IPv4 address itself
            return is_forbidden_address(addr.ipv4_mapped)
        if any(is_forbidden_address(v4) for v4 in embedded_ipv4(addr)):
            return True
    return not addr.is_global or addr.is_multicast


_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")


def is_local_name(host: str) -> bool:
    """Names that only mean something inside a site: never a public webhook receiver."""
    host = host.lower().rstrip(".")
    return host == "localhost" or "." not in host or host.endswith(_LOCAL_SUFFIXES)


# --- URL rules ---------------------------------------------------------------------------------------

_IPV4_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")


def parse_ipv4_number(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address of `host` read the way `inet_aton` (and browsers) read it, or None when
    `host` is a domain name (its last label is not a number). Raises ValueError for hosts that
    end in a number but are not a valid address (`1.2.3.4.5`, `256.1.1.1`, `08.1.1.1`)."""
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels = labels[:-1]  # one trailing dot, as in an absolute name
    if not _IPV4_PART.match(labels[-1]):
        return None
    if len(labels) > 4:
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    parts: list[int] = []
    for label in labels:
        if not _IPV4_PART.match(label):
            raise ValueError(f"{host!r} is not a valid IPv4 address")
        try:
            if label[:2].lower() == "0x":
                parts.append(int(label[2:] or "0", 16))
            elif len(label) > 1 and label[0] == "0":
                parts.append(int(label, 8))
            else:
                parts.append(int(label, 10))
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address ({label!r} is not octal)") from None
    *head, last = parts
    if any(p > 255 for p in head) or last >= 256 ** (5 - len(parts)):
        raise ValueError(f"{host!r} is not a valid IPv4 address (a part is out of range)")
    value = last
    for i, p in enumerate(head):
        value |= p << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


@dataclass(frozen=True)
class Target:
    """A parsed, normalised webhook URL."""

    url: str  # the normalised URL (what is stored and shown)
    scheme: str  # http or https
    host: str  # ASCII: an IDNA A-label name, a dotted quad, or an IPv6 address (no brackets)
    port: int  # the effective port
    netloc: str  # host (bracketed if IPv6) and explicit port: the Host header
    address: Address | None  # set when the host is an IP address


def parse_target(url: str) -> Target:
    """Parse and normalise a webhook URL; ValueError with the reason if it is not acceptable."""
    if len(url) > MAX_URL:
        raise ValueError(f"must be at most {MAX_URL} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        explicit_port = parts.port
        raw_host = parts.hostname or ""
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError("must not include a user name or password; receivers authenticate deliveries "
                         "by their signature")
    if not raw_host:
        raise ValueError("must include a host name")
    if parts.fragment or "#" in url:
        raise ValueError("must not include a #fragment")
    if explicit_port == 0:
        raise ValueError("port must be between 1 and 65535")
    address: Address | None = None
    if ":" in raw_host or "[" in parts.netloc:  # an IPv6 literal (urlsplit checked the brackets)
        if "%" in raw_host:
            raise ValueError("must not include an IPv6 zone index")
        try:
            address = ipaddress.IPv6Address(raw_host)
        except ValueError:
            raise ValueError(f"host [{raw_host}] is not a valid IPv6 address") from None
        host = str(address)
    else:
        try:
            # UTS #46 mapping (case, width), then strict IDNA 2008 with STD3 rules: letters,
            # digits and hyphens only; '%', '_', '\\' and the like are refused.
            host = idna.encode(raw_host, uts46=True, std3_rules=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise ValueError(f"host {raw_host!r} is not a valid host name ({exc})") from None
        if len(host.rstrip(".")) > 253:
            raise ValueError("host name is too long")
        v4 = parse_ipv4_number(host)
        if v4 is not None:
            address, host = v4, str(v4)
    bracketed = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    netloc = bracketed if explicit_port is None else f"{bracketed}:{explicit_port}"
    normalised = urllib.parse.urlunsplit((scheme, netloc, parts.path, parts.query, ""))
    if len(normalised) > MAX_URL:  # A-labels are longer than the names they encode
        raise ValueError(f"must be at most {MAX_URL} characters once its host name is encoded")
    try:
        httpx.URL(normalised)  # the sender's HTTP client must accept it as well
    except (httpx.InvalidURL, ValueError) as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    port = explicit_port or (443 if scheme == "https" else 80)
    return Target(url=normalised, scheme=scheme, host=host, port=port, netloc=netloc, address=address)


def check_target(target: Target, *, allow_private: bool) -> None:
    """ValueError unless the target may receive webhooks before any name lookup."""
    if allow_private:
        return
    if target.address is not None and is_forbidden_address(target.address):
        raise ValueError(f"points at a non-public address ({target.address}); this cloud only delivers "
                         "webhooks to public addresses (operators: setting webhook_allow_private_targets)")
    if target.address is None and is_local_name(target.host):
        raise ValueError(f"points at a non-public host name ({target.host}); this cloud only delivers webhooks to "
                         "public addresses (operators: setting webhook_allow_private_targets)")


def validate_url(url: str, *, allow_private: bool) -> str:
    """The normalised URL if it is an acceptable webhook target; ValueError with the reason."""
    target = parse_target(url)
    check_target(target, allow_private=allow_private)
    return target.url


class TargetRefused(Exception):
    """A permanent delivery failure: retrying cannot help."""


def check_resolved(host: str, addrs: list[Address], *, allow_private: bool) -> Address:
    """The address to connect to; TargetRefused if any address `host` resolved to is forbidden
    (a name with one private address among public ones could be steered to it)."""
    if not addrs:
        raise socket.gaierror(f"no address for {host}")
    if not allow_private:
        bad = [a for a in addrs if is_forbidden_address(a)]
        if bad:
            raise TargetRefused(f"{host} resolves to the non-public address {bad[0]}; only public "
                                "addresses receive webhooks")
    return addrs[0]


def lookup(host: str, port: int) -> list[Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


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


# --- fair scheduling ---------------------------------------------------------------------------------

@dataclass
class Slots:
    """The free sending slots of one claiming round, and who may have them.

    Limits left at None are unlimited. `failing` webhooks get one attempt at a time, from the
    shared `failing_limit`; `held` webhooks get none (their receiver is being left alone)."""

    total: int
    webhook_limit: int | None = None
    project_limit: int | None = None
    failing_limit: int | None = None
    webhook_inflight: dict[str, int] = field(default_factory=dict)
    project_inflight: dict[str, int] = field(default_factory=dict)
    failing_inflight: int = 0
    failing: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)

    def take(self, webhook_id: str, project_id: str) -> bool:
        if self.total <= 0 or webhook_id in self.held:
            return False
        failing = webhook_id in self.failing
        hook_limit = 1 if failing else self.webhook_limit
        if hook_limit is not None and self.webhook_inflight.get(webhook_id, 0) >= hook_limit:
            return False
        if self.project_limit is not None and self.project_inflight.get(project_id, 0) >= self.project_limit:
            return False
        if failing and self.failing_limit is not None and self.failing_inflight >= self.failing_limit:
            return False
        self.webhook_inflight[webhook_id] = self.webhook_inflight.get(webhook_id, 0) + 1
        self.project_inflight[project_id] = self.project_inflight.get(project_id, 0) + 1
        self.failing_inflight += failing
        self.total -= 1
        return True


def plan(due: list[tuple[str, str, int]], slots: Slots, turn: int = 0) -> dict[str, int]:
    """How many deliveries to claim per webhook, given (webhook, project, due count) rows: slots go
    one at a time round-robin over projects, and within a project round-robin over its webhooks;
    `turn` rotates who goes first from one round to the next."""
    by_project: dict[str, list[list[Any]]] = {}
    for webhook_id, project_id, count in sorted(due):
        by_project.setdefault(project_id, []).append([webhook_id, count])
    if not by_project:
        return {}
    projects = sorted(by_project)
    k = turn % len(projects)
    projects = projects[k:] + projects[:k]
    cursor = {p: turn % len(by_project[p]) for p in projects}
    want: dict[str, int] = {}
    progress = True
    while progress and slots.total > 0:
        progress = False
        for project_id in projects:
            hooks = by_project[project_id]
            for i in range(len(hooks)):
                j = (cursor[project_id] + i) % len(hooks)
                webhook_id, left = hooks[j]
                if left > 0 and slots.take(webhook_id, project_id):
                    hooks[j][1] = left - 1
                    want[webhook_id] = want.get(webhook_id, 0) + 1
                    cursor[project_id] = j + 1
                    progress = True
                    break
            if slots.total <= 0:
                break
    return want


# --- claims and outcomes -----------------------------------------------------------------------------

@dataclass
class Claim:
    delivery_id: str
    attempt: int  # the number of this attempt (attempts after the claim)
    url: str = ""
    secret: str = ""
    event_type: str = ""
    body: bytes = b""
    problem: str = ""  # set when the delivery cannot be attempted at all (webhook disabled, event gone)
    webhook_id: str = ""
    project_id: str = ""


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


def claim_due(limit: int, now: dt.datetime | None = None, *, slots: Slots | None = None,
              turn: int = 0) -> list[Claim]:
    """Claim up to `limit` due deliveries, shared fairly between projects and webhooks (`plan`)."""
    now = now or utcnow()
    slots = slots or Slots(total=limit)
    slots.total = min(slots.total, limit)
    due_cond = (WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
    picked: list[tuple[str, str, str, int]] = []
    with session_scope(write=False) as s:
        due = s.execute(
            select(WebhookDelivery.webhook_id, WebhookDelivery.project_id, func.count())
            .where(*due_cond).group_by(WebhookDelivery.webhook_id, WebhookDelivery.project_id)).all()
        want = plan([(str(h), str(p), int(n)) for h, p, n in due], slots, turn)
        for webhook_id, n in want.items():
            rows = s.execute(
                select(WebhookDelivery.id, WebhookDelivery.webhook_id, WebhookDelivery.project_id,
                       WebhookDelivery.attempts)
                .where(WebhookDelivery.webhook_id == webhook_id, *due_cond)
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(n)).all()
            picked.extend((r[0], r[1], r[2], r[3]) for r in rows)
    if not picked:
        return []
    lease = dt.timedelta(seconds=get_settings().webhook_timeout_s + LEASE_MARGIN_S)
    claims: list[Claim] = []
    with session_scope() as s:
        for delivery_id, webhook_id, project_id, attempts in picked:
            result = s.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == "pending",
                       WebhookDelivery.attempts == attempts, WebhookDelivery.next_attempt_at <= now)
                .values(attempts=attempts + 1, next_attempt_at=now + lease, last_attempt_at=now))
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claims.append(Claim(delivery_id=delivery_id, attempt=attempts + 1, webhook_id=webhook_id,
                                    project_id=project_id))
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
        delay = backoff_delay(claim.attempt, base=get_settings().webhook_backoff_base_s,
                              cap=get_settings().webhook_backoff_max_s)
        if outcome.retry_after is not None:
            delay = max(delay, min(outcome.retry_after, get_settings().webhook_backoff_max_s))
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


def defer_webhook(webhook_id: str, until: dt.datetime) -> int:
    """Hold a failing webhook's backlog back until `until` (never earlier than already planned).

    Its deliveries keep their attempts; they just stop being due, so they neither occupy the
    sender nor weigh on the due scan, and every sender (other hosts too) sees the hold."""
    with session_scope() as s:
        result = s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.status == "pending",
                   WebhookDelivery.next_attempt_at < until)
            .values(next_attempt_at=until))
        return int(result.rowcount)  # type: ignore[attr-defined]


# --- the sender --------------------------------------------------------------------------------------

@dataclass
class _Health:
    """What this sender knows of a webhook's receiver."""

    failures: int = 0  # consecutive failed attempts (not counting permanent refusals)
    held_until: float = 0.0  # time.monotonic(): no attempt before


class Sender:
    """Sends due deliveries from one asyncio loop, fairly between projects and webhooks."""

    def __init__(self, verify: ssl.SSLContext | bool = True) -> None:
        self._verify = verify  # TLS verification of receivers (a custom CA context in tests)
        self._health: dict[str, _Health] = {}
        self._hook_inflight: dict[str, int] = {}
        self._project_inflight: dict[str, int] = {}
        self._turn = 0
        # Name lookups block: their own threads, so slow DNS cannot hold up database work.
        self._dns = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="hb-webhook-dns")

    def _new_client(self) -> httpx.AsyncClient:
        timeout_s = get_settings().webhook_timeout_s
        # No keep-alive: requests go to pinned addresses, and a pooled TLS connection must never be
        # reused for another host name that shares the address.
        return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
                                 follow_redirects=False, trust_env=False, verify=self._verify,
                                 limits=httpx.Limits(max_keepalive_connections=0))

    # -- scheduling --

    def _slots(self) -> Slots:
        now = time.monotonic()
        failing = {h for h, st in self._health.items() if st.failures > 0}
        held = {h for h, st in self._health.items() if st.held_until > now}
        return Slots(total=MAX_IN_FLIGHT - sum(self._hook_inflight.values()), webhook_limit=PER_WEBHOOK,
                     project_limit=PER_PROJECT, failing_limit=FAILING_SLOTS,
                     webhook_inflight=dict(self._hook_inflight), project_inflight=dict(self._project_inflight),
                     failing_inflight=sum(n for h, n in self._hook_inflight.items() if h in failing),
                     failing=failing, held=held)

    def _begin(self, claim: Claim) -> None:
        self._hook_inflight[claim.webhook_id] = self._hook_inflight.get(claim.webhook_id, 0) + 1
        self._project_inflight[claim.project_id] = self._project_inflight.get(claim.project_id, 0) + 1

    def _end(self, claim: Claim, outcome: Outcome) -> float:
        """Release the claim's slots and learn from the outcome; the seconds the webhook is now held."""
        for counts, key in ((self._hook_inflight, claim.webhook_id), (self._project_inflight, claim.project_id)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]
        if claim.problem or outcome.permanent:
            return 0.0  # says nothing about the receiver's health
        if outcome.ok:
            self._health.pop(claim.webhook_id, None)
            return 0.0
        health = self._health.setdefault(claim.webhook_id, _Health())
        health.failures += 1
        cap = min(HOLD_MAX_S, get_settings().webhook_backoff_max_s)
        hold = 0.0
        if health.failures >= HOLD_AFTER_FAILURES:
            hold = backoff_delay(health.failures - HOLD_AFTER_FAILURES + 1,
                                 base=get_settings().webhook_backoff_base_s, cap=cap)
        if outcome.retry_after is not None:  # 429/503 Retry-After speaks for the whole receiver
            hold = max(hold, min(outcome.retry_after, cap))
        health.held_until = max(health.held_until, time.monotonic() + hold)
        if len(self._health) > 10_000:  # forget receivers not heard of for a while
            stale = time.monotonic() - HOLD_MAX_S
            self._health = {h: st for h, st in self._health.items() if st.held_until > stale}
        return hold

    def step(self) -> int:
        """Send due deliveries until none is due or in flight. Returns how many were attempted."""
        return asyncio.run(self._run())

    async def _run(self) -> int:
        tick = min(max(get_settings().webhook_poll_interval_s, 0.05), 1.0)
        total = 0
        tasks: set[asyncio.Task[None]] = set()
        async with self._new_client() as client:
            while True:
                slots = self._slots()
                claims: list[Claim] = []
                if slots.total > 0:
                    self._turn += 1
                    claims = await asyncio.to_thread(claim_due, slots.total, slots=slots, turn=self._turn)
                for claim in claims:
                    self._begin(claim)
                    tasks.add(asyncio.create_task(self._deliver(client, claim)))
                total += len(claims)
                if not tasks:
                    return total
                # Refill as soon as an attempt ends, and look for newly due deliveries every tick.
                _, pending = await asyncio.wait(tasks, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
                tasks = set(pending)

    async def _deliver(self, client: httpx.AsyncClient, claim: Claim) -> None:
        outcome = Outcome(ok=False, error="internal error")
        try:
            if claim.problem:
                outcome = Outcome(ok=False, error=claim.problem, permanent=True)
            else:
                outcome = await self._attempt(client, claim)
        except Exception as exc:  # record the failure and retry later: never lose a delivery
            log.exception("webhook delivery %s failed unexpectedly", claim.delivery_id)
            outcome = Outcome(ok=False, error=f"internal error: {type(exc).__name__}")
        hold = 0.0
        try:
            await asyncio.to_thread(record, claim, outcome)
        except Exception:
            log.exception("webhook delivery %s: outcome not recorded; due again after its lease", claim.delivery_id)
        finally:
            hold = self._end(claim, outcome)
        if hold >= 1.0:
            try:
                await asyncio.to_thread(defer_webhook, claim.webhook_id, utcnow() + dt.timedelta(seconds=hold))
            except Exception:
                log.exception("webhook %s: could not defer its backlog", claim.webhook_id)

    def send(self, claim: Claim) -> Outcome:
        """One attempt of `claim`, outside the scheduler (nothing is recorded)."""
        async def once() -> Outcome:
            async with self._new_client() as client:
                return await self._attempt(client, claim)
        return asyncio.run(once())

    # -- one attempt --

    async def _attempt(self, client: httpx.AsyncClient, claim: Claim) -> Outcome:
        timeout_s = get_settings().webhook_timeout_s
        allow_private = get_settings().webhook_allow_private_targets
        started = utcnow()
        t0 = time.monotonic()

        def done(**kw: Any) -> Outcome:
            return Outcome(started_at=started, duration_ms=int((time.monotonic() - t0) * 1000), **kw)

        try:
            # The same rules as at create time: URLs stored before a rule existed fail, with the reason.
            target = parse_target(claim.url)
            check_target(target, allow_private=allow_private)
        except ValueError as exc:
            return done(ok=False, error=f"webhook URL refused: {exc}", permanent=True)
        try:
            # One deadline for the whole attempt: a receiver dripping bytes cannot hold a slot longer.
            async with asyncio.timeout(timeout_s):
                return await self._post(client, claim, target, allow_private, done)
        except TimeoutError:
            return done(ok=False, error=f"timed out after {timeout_s:g}s")

    async def _post(self, client: httpx.AsyncClient, claim: Claim, target: Target, allow_private: bool,
                    done: Callable[..., Outcome]) -> Outcome:
        if target.address is not None:
            addrs: list[Address] = [target.address]
        else:
            try:
                addrs = await asyncio.get_running_loop().run_in_executor(self._dns, lookup, target.host,
                                                                         target.port)
            except (OSError, UnicodeError, ValueError) as exc:
                return done(ok=False, error=f"DNS lookup of {target.host} failed: {exc}")
            if not addrs:
                return done(ok=False, error=f"DNS lookup of {target.host} returned no address")
        try:
            address = check_resolved(target.host, addrs, allow_private=allow_private)  # DNS rebinding
        except TargetRefused as exc:
            return done(ok=False, error=str(exc), permanent=True)
        headers = signing.headers(secret=claim.secret, timestamp=int(time.time()), body=claim.body,
                                  event_type=claim.event_type, delivery_id=claim.delivery_id,
                                  attempt=claim.attempt)
        headers["Host"] = target.netloc
        extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.address is None else {}
        url = httpx.URL(target.url).copy_with(host=str(address))
        try:
            async with client.stream("POST", url, content=claim.body, headers=headers,
                                     extensions=extensions) as resp:
                excerpt = b""
                async for chunk in resp.aiter_bytes():
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
            return done(ok=False, error=f"timed out after {get_settings().webhook_timeout_s:g}s")
        except httpx.TransportError as exc:
            return done(ok=False, error=f"connection failed: {type(exc).__name__}: {exc}"[:500])

    def close(self) -> None:
        self._dns.shutdown(wait=False)
