"""The load-balancer engine contract.

A *load-balancer driver* runs the proxies of one host: one proxy per load balancer, inside a network
namespace the caller made and attached to the load balancer's subnet (its VIP is configured on the
namespace's ``eth0``). Like the compute and network drivers it knows nothing of HTTP APIs, the database,
tenants or quotas: the agent's reconciler reads the control plane's rows and hands the driver the complete
desired state of one load balancer as plain frozen dataclasses:

    driver.apply(LoadBalancerSpec(...), namespace="hb-lb-…")  # declarative, idempotent, hitless
    driver.remove(lb_id)                                       # nothing left behind (process, files)
    driver.running()                                           # ids of the load balancers it runs
    driver.health(lb_id)                                       # member id → MemberHealth
    driver.stats(lb_id)                                        # counters per listener / pool / member
    driver.access_logs(lb_id, after=cursor)                    # access log records since a cursor

``apply`` validates the rendered configuration before using it (a spec the engine refuses raises
:class:`InvalidSpec` and leaves the running proxy untouched), and applies a change without failing a
request in flight or a new one (the old processes finish their connections while new ones take over).
A change of member weights or admin state only is applied at runtime, without a reload. A new driver
object over the same host (an agent restart) adopts the proxies that run instead of restarting them.

Errors: :class:`LoadBalancerDriverError` (retry later) and :class:`InvalidSpec` (do not retry: report it).
"""

from __future__ import annotations

import abc
import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

ListenerProtocol = Literal["http", "https", "tcp"]
PoolProtocol = Literal["http", "tcp"]
Algorithm = Literal["roundrobin", "leastconn", "source"]
AdminState = Literal["enabled", "drain", "disabled"]
Health = Literal["up", "down", "drain", "disabled", "unchecked"]


class LoadBalancerDriverError(RuntimeError):
    """The engine could not be brought to the desired state (retry later)."""


class InvalidSpec(LoadBalancerDriverError, ValueError):
    """The desired state cannot be realised (the engine refused the configuration): do not retry."""


# --- desired state -------------------------------------------------------------------------------

@dataclass(frozen=True)
class HealthCheckSpec:
    protocol: Literal["http", "tcp"] = "tcp"
    path: str = "/"  # http: request path (GET)
    host: str | None = None  # http: Host header
    expected_codes: str = "200-399"  # http: "200", "200,204", "200-299"
    interval_s: float = 5.0
    timeout_s: float = 2.0
    healthy_threshold: int = 2  # consecutive successes to come back (rise)
    unhealthy_threshold: int = 3  # consecutive failures to be taken out (fall)


@dataclass(frozen=True)
class MemberSpec:
    id: str
    address: str  # an IPv4 address inside the VPC
    port: int
    weight: int = 1  # 0..256; 0 = no new traffic
    admin_state: AdminState = "enabled"  # drain: existing (and sticky) sessions only; disabled: none


@dataclass(frozen=True)
class PoolSpec:
    id: str
    protocol: PoolProtocol = "http"
    algorithm: Algorithm = "roundrobin"
    members: tuple[MemberSpec, ...] = ()
    health_check: HealthCheckSpec | None = None  # None: members are taken as up
    sticky: Literal["none", "cookie", "source_ip"] = "none"  # cookie: http pools only
    proxy_protocol: bool = False  # tcp pools: send a PROXY protocol v2 header to members


@dataclass(frozen=True)
class RuleSpec:
    """An L7 rule of an http/https listener: the first match by ascending `priority` wins."""

    id: str
    priority: int
    action: Literal["forward", "redirect", "fixed_response"]
    host: str | None = None  # exact name, or "*.example.com"; None: any
    path_prefix: str | None = None  # "/api/"; None: any
    pool_id: str | None = None  # forward
    redirect_url: str | None = None  # redirect: absolute URL or "https://#{host}#{path}" style prefix
    redirect_code: int = 302  # 301 302 303 307 308
    status_code: int = 200  # fixed_response
    content_type: str = "text/plain"
    body: str = ""


@dataclass(frozen=True)
class CertificateSpec:
    """A certificate chain with its private key (both PEM); the engine writes it to a 0600 file."""

    id: str
    chain_pem: str  # leaf first, then intermediates
    key_pem: str
    names: tuple[str, ...] = ()  # DNS names it serves (SNI), from the certificate


@dataclass(frozen=True)
class ListenerSpec:
    id: str
    protocol: ListenerProtocol
    port: int
    default_pool_id: str | None = None  # None with no matching rule: 503 (http) / reset (tcp)
    rules: tuple[RuleSpec, ...] = ()  # http/https only
    certificate_ids: tuple[str, ...] = ()  # https: the first is the default, the others chosen by SNI
    redirect_to_https_port: int | None = None  # http: answer every request with a 301 to https on this port
    connection_limit: int | None = None  # concurrent connections (maxconn)
    connection_rate_limit: int | None = None  # new connections per second per client address: refused over it
    request_rate_limit: int | None = None  # http/https: requests per second per client address: 429 over it
    idle_timeout_s: float = 60.0  # client and server inactivity


@dataclass(frozen=True)
class LoadBalancerSpec:
    id: str
    vip: str  # its address in the subnet (already on the namespace's eth0)
    listeners: tuple[ListenerSpec, ...] = ()
    pools: tuple[PoolSpec, ...] = ()
    certificates: tuple[CertificateSpec, ...] = ()


# --- observed state ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemberHealth:
    member_id: str
    pool_id: str
    status: Health
    reason: str = ""  # the last check's result, e.g. "Layer7 wrong status: 500"


@dataclass(frozen=True)
class Counters:
    requests: int = 0  # http: requests; tcp: sessions
    errors: int = 0  # http: 5xx answered + connection/response errors; tcp: connection errors
    active_connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    response_time_ms: float = 0.0  # average over the last 1024 requests (HAProxy's rtime)


@dataclass(frozen=True)
class Stats:
    listeners: dict[str, Counters] = field(default_factory=dict)  # listener id →
    pools: dict[str, Counters] = field(default_factory=dict)  # pool id →
    members: dict[str, Counters] = field(default_factory=dict)  # member id →


@dataclass(frozen=True)
class AccessLogRecord:
    cursor: int  # increasing; pass the last one seen as `after`
    time: dt.datetime
    listener_id: str
    client: str  # "ip:port"
    pool_id: str | None
    member_id: str | None
    method: str | None  # http only
    path: str | None
    status: int | None
    duration_ms: int
    bytes_out: int


class LoadBalancerDriver(abc.ABC):
    @abc.abstractmethod
    def apply(self, spec: LoadBalancerSpec, namespace: str) -> None:
        """Make the load balancer's proxy run exactly `spec` inside `namespace` (hitless; idempotent)."""

    @abc.abstractmethod
    def remove(self, lb_id: str) -> None:
        """Stop its proxy and remove its files (idempotent)."""

    @abc.abstractmethod
    def running(self) -> list[str]:
        """Ids of the load balancers whose proxy runs on this host."""

    @abc.abstractmethod
    def health(self, lb_id: str) -> dict[str, MemberHealth]:
        """Member id → its health as the proxy sees it now."""

    @abc.abstractmethod
    def stats(self, lb_id: str) -> Stats: ...

    @abc.abstractmethod
    def access_logs(self, lb_id: str, after: int = 0, limit: int = 1000) -> list[AccessLogRecord]: ...

    def close(self) -> None:
        """Forget in-memory state; the proxies keep running (an agent restart adopts them)."""
        return None
