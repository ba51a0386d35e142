"""Contract tests for :class:`hackboot.loadbalancers.driver.LoadBalancerDriver` implementations.

Written once, run against every engine: subclass :class:`EngineContract` in a ``test_*.py`` module and
provide a ``harness`` fixture returning an :class:`EngineHarness` (how to make a driver over a state
directory, and how to see the engine's processes, so a test can tell a reload from a runtime change and
an adoption from a restart).

The world (:mod:`tests.integration.loadbalancers.engine_topology`) is built once per class: an LB
namespace holding the VIP, three backends (b1, b2, b3) and a client, joined by a bridge namespace. Every
test makes its own load balancer(s) with its own driver, and removes them afterwards, failure or not.
Traffic is real (HTTP, TLS, TCP from the client namespace); nothing waits a fixed time for a result:
every wait is a poll with a deadline.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import http.client
import json
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from hackboot.loadbalancers.driver import (
    CertificateSpec,
    HealthCheckSpec,
    InvalidSpec,
    ListenerSpec,
    LoadBalancerDriver,
    LoadBalancerSpec,
    MemberSpec,
    PoolSpec,
    RuleSpec,
)
from hackboot.network import netns
from tests.integration.loadbalancers.engine_topology import (
    CLIENT_IP,
    HTTP_PORT,
    TCP_PORT,
    VIP,
    Response,
    Topology,
    http_get,
    self_signed,
    tcp_exchange,
    tls_probe,
    topology,
    wait_for,
)


@dataclasses.dataclass(frozen=True)
class Processes:
    master: int
    workers: tuple[int, ...]


class EngineHarness(abc.ABC):
    @abc.abstractmethod
    def make_driver(self, state_dir: Path) -> LoadBalancerDriver:
        """A driver over `state_dir` (a second call with the same directory is an agent restart)."""

    @abc.abstractmethod
    def processes(self, driver: LoadBalancerDriver, lb_id: str) -> Processes:
        """The engine's supervising process and its current serving processes for `lb_id`."""

    @abc.abstractmethod
    def all_pids(self, driver: LoadBalancerDriver, lb_id: str) -> set[int]:
        """Every process of `lb_id` (supervisor, current and old workers)."""


def member(topo: Topology, name: str, weight: int = 1, admin: str = "enabled", port: int = HTTP_PORT) -> MemberSpec:
    return MemberSpec(name, topo.backends[name].ip, port, weight, admin)  # type: ignore[arg-type]


FAST_CHECK = HealthCheckSpec("http", "/health", interval_s=0.3, timeout_s=1.0, healthy_threshold=2,
                             unhealthy_threshold=2)


class Engine:
    """One test's driver, its load balancers, and client helpers running in the client namespace."""

    def __init__(self, harness: EngineHarness, topo: Topology, state_dir: Path) -> None:
        self.harness = harness
        self.topo = topo
        self.state_dir = state_dir
        self.driver = harness.make_driver(state_dir)
        self.applied: set[str] = set()

    def apply(self, spec: LoadBalancerSpec) -> None:
        self.applied.add(spec.id)
        self.driver.apply(spec, self.topo.lb_ns)

    def get(self, port: int, path: str = "/", headers: dict[str, str] | None = None) -> Response:
        return self.topo.in_client(lambda: http_get(VIP, port, path, headers))

    def names(self, port: int, count: int, path: str = "/") -> list[str]:
        """The backends answering `count` requests, each on a fresh connection."""
        def run() -> list[str]:
            return [str(http_get(VIP, port, path).json()["name"]) for _ in range(count)]
        return self.topo.in_client(run)

    def serving(self, port: int = 80) -> bool:
        try:
            return self.get(port).status == 200
        except OSError:
            return False

    def processes(self, lb_id: str) -> Processes:
        return self.harness.processes(self.driver, lb_id)


def spec(lb_id: str, listeners: Sequence[ListenerSpec], pools: Sequence[PoolSpec],
         certificates: Sequence[CertificateSpec] = ()) -> LoadBalancerSpec:
    return LoadBalancerSpec(lb_id, VIP, tuple(listeners), tuple(pools), tuple(certificates))


def http_lb(topo: Topology, lb_id: str, *members: MemberSpec, pool: PoolSpec | None = None,
            listener: ListenerSpec | None = None) -> LoadBalancerSpec:
    pool = pool or PoolSpec("web", members=members or tuple(member(topo, n) for n in ("b1", "b2")))
    return spec(lb_id, [listener or ListenerSpec("web", "http", 80, pool.id)], [pool])


def near(counts: dict[str, int], expected: dict[str, float], tolerance: float) -> bool:
    return all(abs(counts.get(k, 0) - v) <= tolerance for k, v in expected.items()) and \
        set(counts) <= set(expected)


class EngineContract:
    @pytest.fixture
    def harness(self) -> EngineHarness:
        raise NotImplementedError("a subclass provides the harness fixture")

    @pytest.fixture(scope="class")
    @classmethod
    def topo(cls) -> Iterator[Topology]:
        with topology(backends=3) as t:
            yield t

    @pytest.fixture
    def engine(self, harness: EngineHarness, topo: Topology, tmp_path: Path) -> Iterator[Engine]:
        eng = Engine(harness, topo, tmp_path / "lb-state")
        try:
            yield eng
        finally:
            for lb_id in sorted(eng.applied | set(eng.driver.running())):
                eng.driver.remove(lb_id)
            eng.driver.close()
            for name in topo.backends:
                topo.set_failing(name, False)
                topo.start_backend(name)

    # --- balancing ---------------------------------------------------------------------------------

    def test_round_robin_spreads_evenly(self, engine: Engine, topo: Topology) -> None:
        engine.apply(http_lb(topo, "lb-rr", *(member(topo, n) for n in ("b1", "b2", "b3"))))
        counts = collections.Counter(engine.names(80, 30))
        assert near(counts, {"b1": 10, "b2": 10, "b3": 10}, 2), counts

    def test_weights_are_observed(self, engine: Engine, topo: Topology) -> None:
        engine.apply(http_lb(topo, "lb-weights", member(topo, "b1", 3), member(topo, "b2", 1)))
        counts = collections.Counter(engine.names(80, 40))
        assert near(counts, {"b1": 30, "b2": 10}, 3), counts

    # --- health --------------------------------------------------------------------------------------

    def test_failing_member_is_taken_out_and_comes_back(self, engine: Engine, topo: Topology) -> None:
        pool = PoolSpec("web", members=(member(topo, "b1"), member(topo, "b2")), health_check=FAST_CHECK)
        engine.apply(http_lb(topo, "lb-health", pool=pool))
        wait_for(lambda: {h.status for h in engine.driver.health("lb-health").values()} == {"up"},
                 what="both members up")
        topo.set_failing("b2", True)
        health = wait_for(lambda: (h := engine.driver.health("lb-health")["b2"]).status == "down" and h,
                          what="b2 down")
        assert health.pool_id == "web" and "500" in health.reason, health
        assert engine.driver.health("lb-health")["b1"].status == "up"
        assert set(engine.names(80, 10)) == {"b1"}
        # A change that needs a reload keeps it out: the new processes must not start it as healthy.
        engine.apply(dataclasses.replace(http_lb(topo, "lb-health", pool=pool), listeners=(
            ListenerSpec("web", "http", 80, "web", idle_timeout_s=20),)))
        assert set(engine.names(80, 10)) == {"b1"}
        assert engine.driver.health("lb-health")["b2"].status == "down"
        topo.set_failing("b2", False)
        wait_for(lambda: engine.driver.health("lb-health")["b2"].status == "up", what="b2 back up")
        assert set(engine.names(80, 10)) == {"b1", "b2"}
        # A stopped member is taken out too (nothing listens: the check cannot connect).
        topo.stop_backend("b2")
        stopped = wait_for(lambda: (h := engine.driver.health("lb-health")["b2"]).status == "down" and h,
                           what="stopped b2 down")
        assert stopped.reason, stopped
        assert set(engine.names(80, 6)) == {"b1"}

    def test_drain_and_disable_without_reload(self, engine: Engine, topo: Topology) -> None:
        base = http_lb(topo, "lb-admin", member(topo, "b1"), member(topo, "b2"))
        engine.apply(base)
        before = engine.processes("lb-admin")

        def with_members(*members: MemberSpec) -> LoadBalancerSpec:
            return dataclasses.replace(base, pools=(dataclasses.replace(base.pools[0], members=members),))

        engine.apply(with_members(member(topo, "b1"), member(topo, "b2", admin="drain")))
        assert set(engine.names(80, 8)) == {"b1"}
        assert engine.driver.health("lb-admin")["b2"].status == "drain"
        assert engine.processes("lb-admin") == before  # no reload, no restart
        # A later change that needs a reload keeps what was set at runtime (`with_members` reads `base`).
        base = dataclasses.replace(base, listeners=(dataclasses.replace(base.listeners[0], idle_timeout_s=20),))
        engine.apply(with_members(member(topo, "b1"), member(topo, "b2", admin="drain")))
        after_reload = engine.processes("lb-admin")
        assert after_reload.workers != before.workers
        assert set(engine.names(80, 8)) == {"b1"}
        assert engine.driver.health("lb-admin")["b2"].status == "drain"
        before = after_reload
        engine.apply(with_members(member(topo, "b1"), member(topo, "b2", admin="disabled")))
        assert set(engine.names(80, 8)) == {"b1"}
        assert engine.driver.health("lb-admin")["b2"].status == "disabled"
        engine.apply(with_members(member(topo, "b1", weight=0), member(topo, "b2", weight=2)))
        assert set(engine.names(80, 8)) == {"b2"}
        engine.apply(with_members(member(topo, "b1", weight=1), member(topo, "b2", weight=1)))
        assert set(engine.names(80, 8)) == {"b1", "b2"}
        assert engine.processes("lb-admin") == before  # no reload, no restart

    # --- L7 ----------------------------------------------------------------------------------------

    def test_host_and_path_rules_redirect_and_fixed_response(self, engine: Engine, topo: Topology) -> None:
        rules = (
            RuleSpec("exact-host", 5, "forward", host="b.example.test", pool_id="second"),
            RuleSpec("api", 10, "forward", host="*.api.example.test", path_prefix="/v1/", pool_id="second"),
            RuleSpec("moved", 20, "redirect", path_prefix="/old/", redirect_url="https://new.example.test#{path}",
                     redirect_code=301),
            RuleSpec("maintenance", 30, "fixed_response", path_prefix="/maint", status_code=503,
                     content_type="text/plain; charset=utf-8", body="down for maintenance, isn't it?\n"),
        )
        first = PoolSpec("first", members=(member(topo, "b1"),))
        second = PoolSpec("second", members=(member(topo, "b2"),))
        engine.apply(spec("lb-rules", [ListenerSpec("web", "http", 80, "first", rules=rules)], [first, second]))
        assert engine.get(80, "/v1/users", {"Host": "eu.api.example.test"}).json()["name"] == "b2"
        assert engine.get(80, "/v2/users", {"Host": "eu.api.example.test"}).json()["name"] == "b1"
        assert engine.get(80, "/v1/users", {"Host": "api.example.test"}).json()["name"] == "b1"  # not *.api
        assert engine.get(80, "/", {"Host": "B.example.test:80"}).json()["name"] == "b2"
        moved = engine.get(80, "/old/page?x=1")
        assert moved.status == 301 and moved.headers["location"] == "https://new.example.test/old/page"
        fixed = engine.get(80, "/maint")
        assert (fixed.status, fixed.body) == (503, b"down for maintenance, isn't it?\n")
        assert fixed.headers["content-type"] == "text/plain; charset=utf-8"
        # Priority: the exact-host forward (5) wins over the fixed response (30) for the same request.
        assert engine.get(80, "/maint", {"Host": "b.example.test"}).json()["name"] == "b2"
        seen = engine.get(80, "/anything").json()
        assert (seen["name"], seen["xff"], seen["xfp"]) == ("b1", CLIENT_IP, "http")

    def test_https_tls13_sni_and_redirect(self, engine: Engine, topo: Topology) -> None:
        chain_a, key_a = self_signed(("a.example.test",))
        chain_b, key_b = self_signed(("b.example.test", "*.b.example.test"))
        certs = [CertificateSpec("cert-a", chain_a, key_a, ("a.example.test",)),
                 CertificateSpec("cert-b", chain_b, key_b, ("b.example.test", "*.b.example.test"))]
        pool = PoolSpec("web", members=(member(topo, "b1"),))
        engine.apply(spec("lb-tls", [ListenerSpec("tls", "https", 443, "web", certificate_ids=("cert-a", "cert-b")),
                                     ListenerSpec("plain", "http", 80, redirect_to_https_port=443)],
                          [pool], certs))
        der_a, der_b = ssl.PEM_cert_to_DER_cert(chain_a), ssl.PEM_cert_to_DER_cert(chain_b)
        assert topo.in_client(lambda: tls_probe(VIP, 443, "a.example.test")) == ("TLSv1.3", der_a)
        assert topo.in_client(lambda: tls_probe(VIP, 443, "b.example.test")) == ("TLSv1.3", der_b)
        assert topo.in_client(lambda: tls_probe(VIP, 443, "x.b.example.test")) == ("TLSv1.3", der_b)
        assert topo.in_client(lambda: tls_probe(VIP, 443, "unknown.example.test")) == ("TLSv1.3", der_a)
        assert topo.in_client(lambda: tls_probe(VIP, 443, None))[1] == der_a  # no SNI: the default

        def handshake(version: ssl.TLSVersion) -> str:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.minimum_version = ctx.maximum_version = version
            with socket.create_connection((VIP, 443), timeout=5) as raw, ctx.wrap_socket(raw) as s:
                return str(s.version())

        assert topo.in_client(lambda: handshake(ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"

        def refused(version: ssl.TLSVersion, ciphers: str | None = None) -> bool:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.minimum_version = ctx.maximum_version = version
            if ciphers:
                ctx.set_ciphers(ciphers)
            try:
                with socket.create_connection((VIP, 443), timeout=5) as raw, ctx.wrap_socket(raw):
                    return False
            except ssl.SSLError:
                return True

        # TLS 1.2 only with forward-secret AEAD suites: a static-RSA CBC suite is refused.
        assert topo.in_client(lambda: refused(ssl.TLSVersion.TLSv1_2, "AES128-SHA:AES256-GCM-SHA384"))

        def alpn() -> str | None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            with socket.create_connection((VIP, 443), timeout=5) as raw, ctx.wrap_socket(raw) as s:
                return s.selected_alpn_protocol()

        assert topo.in_client(alpn) == "h2"

        def https_get() -> Any:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            c = http.client.HTTPSConnection(VIP, 443, timeout=5, context=ctx)
            try:
                c.request("GET", "/secure", headers={"Host": "a.example.test"})
                r = c.getresponse()
                return r.status, json.loads(r.read())
            finally:
                c.close()

        status, seen = topo.in_client(https_get)
        assert status == 200 and seen["xfp"] == "https" and seen["xff"] == CLIENT_IP and seen["path"] == "/secure"
        redirect = engine.get(80, "/a/b?c=d", {"Host": "a.example.test"})
        assert redirect.status == 301 and redirect.headers["location"] == "https://a.example.test/a/b?c=d"

    def test_sticky_cookie_keeps_a_client_on_one_member(self, engine: Engine, topo: Topology) -> None:
        pool = PoolSpec("web", members=tuple(member(topo, n) for n in ("b1", "b2", "b3")), sticky="cookie")
        engine.apply(http_lb(topo, "lb-sticky", pool=pool))
        first = engine.get(80)
        cookie = first.headers["set-cookie"].split(";", 1)[0]
        assert cookie.startswith("SRVID=")
        names = {engine.get(80, headers={"Cookie": cookie}).json()["name"] for _ in range(12)}
        pinned = first.json()["name"]
        assert names == {pinned}
        assert len(set(engine.names(80, 6))) > 1  # without the cookie, requests spread
        # Draining the member keeps its sticky clients and takes no new ones.
        drained = dataclasses.replace(pool, members=tuple(
            member(topo, n, admin="drain" if n == pinned else "enabled") for n in ("b1", "b2", "b3")))
        engine.apply(http_lb(topo, "lb-sticky", pool=drained))
        assert {engine.get(80, headers={"Cookie": cookie}).json()["name"] for _ in range(6)} == {pinned}
        assert pinned not in engine.names(80, 8)
        # Disabling it moves them elsewhere.
        disabled = dataclasses.replace(pool, members=tuple(
            member(topo, n, admin="disabled" if n == pinned else "enabled") for n in ("b1", "b2", "b3")))
        engine.apply(http_lb(topo, "lb-sticky", pool=disabled))
        moved = {engine.get(80, headers={"Cookie": cookie}).json()["name"] for _ in range(6)}
        assert pinned not in moved

    def test_rate_limits(self, engine: Engine, topo: Topology) -> None:
        web = PoolSpec("web", members=(member(topo, "b1"),))
        raw = PoolSpec("raw", "tcp", members=(member(topo, "b2", port=TCP_PORT),))
        engine.apply(spec("lb-limits", [ListenerSpec("web", "http", 80, "web", request_rate_limit=5),
                                        ListenerSpec("raw", "tcp", 9000, "raw", connection_rate_limit=5)],
                          [web, raw]))

        def burst_requests() -> collections.Counter[int]:
            c = http.client.HTTPConnection(VIP, 80, timeout=5)
            return collections.Counter(http_get(VIP, 80, conn=c).status for _ in range(40))

        statuses = wait_for(lambda: (s := engine.topo.in_client(burst_requests))[429] and s,
                            what="429 answers", timeout=30)
        assert statuses[200] >= 1, statuses

        def burst_connections() -> tuple[int, int]:
            ok = refused = 0
            for _ in range(40):
                try:
                    greeting, _ = tcp_exchange(VIP, 9000, timeout=3)
                    ok += greeting.startswith("b2")
                    refused += not greeting
                except OSError:
                    refused += 1
            return ok, refused

        ok, refused = wait_for(lambda: (r := engine.topo.in_client(burst_connections))[1] and r,
                               what="refused connections", timeout=30)
        assert ok >= 1 and refused >= 1

    # --- L4 ----------------------------------------------------------------------------------------

    def test_tcp_listener_and_proxy_protocol(self, engine: Engine, topo: Topology) -> None:
        plain = PoolSpec("plain", "tcp", members=(member(topo, "b1", port=TCP_PORT),),
                         health_check=HealthCheckSpec("tcp", interval_s=0.5))
        proxied = PoolSpec("proxied", "tcp", members=(member(topo, "b2", port=TCP_PORT),), proxy_protocol=True,
                           health_check=HealthCheckSpec("tcp", interval_s=0.5))
        engine.apply(spec("lb-tcp", [ListenerSpec("plain", "tcp", 9000, "plain"),
                                     ListenerSpec("proxied", "tcp", 9001, "proxied")], [plain, proxied]))
        greeting, echo = topo.in_client(lambda: tcp_exchange(VIP, 9000, b"hello\n"))
        assert (greeting, echo) == ("b1 proxy=none", b"hello\n")
        greeting, echo = topo.in_client(lambda: tcp_exchange(VIP, 9001, b"hello\n"))
        assert greeting.startswith(f"b2 proxy={CLIENT_IP}:") and echo == b"hello\n", greeting
        wait_for(lambda: {h.status for h in engine.driver.health("lb-tcp").values()} == {"up"},
                 what="tcp checks up")

    def test_connection_limit_queues_the_excess(self, engine: Engine, topo: Topology) -> None:
        raw = PoolSpec("raw", "tcp", members=(member(topo, "b1", port=TCP_PORT),))
        engine.apply(spec("lb-maxconn", [ListenerSpec("raw", "tcp", 9000, "raw", connection_limit=2)], [raw]))

        def exercise() -> tuple[list[str], str, str]:
            held = [socket.create_connection((VIP, 9000), timeout=5) for _ in range(2)]
            greetings = []
            for s in held:
                s.sendall(b"x")
                greetings.append(s.makefile("rb").readline().decode().strip())
            extra = socket.create_connection((VIP, 9000), timeout=5)  # accepted by the kernel, not served
            extra.sendall(b"y")
            extra.settimeout(1.0)
            try:
                early = extra.recv(100).decode()
            except TimeoutError:
                early = ""
            held[0].close()  # a slot frees: the queued connection is served
            extra.settimeout(10)
            late = extra.makefile("rb").readline().decode().strip()
            for s in (*held, extra):
                s.close()
            return greetings, early, late

        greetings, early, late = topo.in_client(exercise)
        assert greetings == ["b1 proxy=none", "b1 proxy=none"]
        assert early == "" and late == "b1 proxy=none"

    def test_idle_tcp_session_is_closed_after_the_idle_timeout(self, engine: Engine, topo: Topology) -> None:
        raw = PoolSpec("raw", "tcp", members=(member(topo, "b1", port=TCP_PORT),))
        engine.apply(spec("lb-idle", [ListenerSpec("raw", "tcp", 9000, "raw", idle_timeout_s=1)], [raw]))

        def idle() -> tuple[str, bytes]:
            with socket.create_connection((VIP, 9000), timeout=5) as s:
                s.sendall(b"x")
                f = s.makefile("rb")
                greeting = f.readline().decode().strip()
                f.read(1)  # the echo
                s.settimeout(30)  # a deadline, not a measure: the proxy closes it well before
                return greeting, s.recv(10)

        assert topo.in_client(idle) == ("b1 proxy=none", b"")

    # --- changes -----------------------------------------------------------------------------------

    def test_invalid_configuration_is_refused_and_the_old_one_serves(self, engine: Engine, topo: Topology) -> None:
        good = http_lb(topo, "lb-invalid")
        engine.apply(good)
        before = engine.processes("lb-invalid")
        chain_a, _ = self_signed(("a.example.test",))
        _, key_b = self_signed(("b.example.test",))
        mismatched = CertificateSpec("mismatch", chain_a, key_b)  # the engine itself must refuse this pair
        bad = spec("lb-invalid", [*good.listeners, ListenerSpec("tls", "https", 443, "web",
                                                                certificate_ids=("mismatch",))],
                   good.pools, [mismatched])
        with pytest.raises(InvalidSpec):
            engine.apply(bad)
        assert engine.processes("lb-invalid") == before
        assert set(engine.names(80, 4)) == {"b1", "b2"}
        with pytest.raises(OSError):
            topo.in_client(lambda: tls_probe(VIP, 443, None, timeout=2))
        engine.apply(good)  # still converges afterwards
        assert engine.processes("lb-invalid") == before

    def test_reloads_under_a_request_loop_fail_nothing(self, engine: Engine, topo: Topology) -> None:
        base = http_lb(topo, "lb-reload", *(member(topo, n) for n in ("b1", "b2", "b3")))
        engine.apply(base)
        stop = threading.Event()
        results: dict[str, collections.Counter[str]] = {"fresh": collections.Counter(),
                                                        "keepalive": collections.Counter()}

        def loop(kind: str) -> None:
            conn = http.client.HTTPConnection(VIP, 80, timeout=10) if kind == "keepalive" else None
            while not stop.is_set():
                try:
                    r = http_get(VIP, 80, conn=conn)
                    results[kind]["ok" if r.status == 200 else f"status {r.status}"] += 1
                except (OSError, http.client.HTTPException) as exc:
                    results[kind][f"error {type(exc).__name__}: {exc}"] += 1
                    if conn is not None:
                        conn.close()

        clients = [threading.Thread(target=lambda k=k: topo.in_client(lambda: loop(k), timeout=300), daemon=True)
                   for k in ("fresh", "keepalive", "fresh")]
        for c in clients:
            c.start()
        generations = [engine.processes("lb-reload").workers]
        try:
            wait_for(lambda: results["fresh"]["ok"] > 5 and results["keepalive"]["ok"] > 5, what="traffic")
            for i in range(10):
                # A structural change each time (a listener's timeout and an extra listener come and go).
                listeners = [dataclasses.replace(base.listeners[0], idle_timeout_s=30 + i)]
                if i % 2 == 0:
                    listeners.append(ListenerSpec("extra", "http", 8080, "web"))
                engine.apply(dataclasses.replace(base, listeners=tuple(listeners)))
                generations.append(engine.processes("lb-reload").workers)
                served = sum(r["ok"] for r in results.values())
                wait_for(lambda s=served: sum(r["ok"] for r in results.values()) > s + 5, what="traffic goes on")
        finally:
            stop.set()
            for c in clients:
                c.join(30)
        assert len(set(generations)) == 11, generations  # every change was a reload
        failures = {k: {e: n for e, n in r.items() if e != "ok"} for k, r in results.items()}
        assert failures == {"fresh": {}, "keepalive": {}}, failures
        assert all(r["ok"] > 10 for r in results.values()), results

    def test_connections_in_flight_survive_a_reload(self, engine: Engine, topo: Topology) -> None:
        web = PoolSpec("web", members=(member(topo, "b1"),))
        raw = PoolSpec("raw", "tcp", members=(member(topo, "b2", port=TCP_PORT),))
        base = spec("lb-inflight", [ListenerSpec("web", "http", 80, "web"), ListenerSpec("raw", "tcp", 9000, "raw")],
                    [web, raw])
        engine.apply(base)
        before = engine.processes("lb-inflight")
        slow: dict[str, Any] = {}

        def slow_request() -> None:
            try:
                slow["response"] = http_get(VIP, 80, "/slow/2", timeout=20)
            except Exception as exc:
                slow["error"] = exc

        session = topo.in_client(lambda: socket.create_connection((VIP, 9000), timeout=10))
        requester = threading.Thread(target=lambda: topo.in_client(slow_request), daemon=True)
        try:
            session.sendall(b"a")
            f = session.makefile("rb")
            assert f.readline().decode().strip() == "b2 proxy=none" and f.read(1) == b"a"
            requester.start()
            wait_for(lambda: engine.driver.stats("lb-inflight").listeners["web"].active_connections >= 1,
                     what="the slow request in flight")
            engine.apply(dataclasses.replace(base, listeners=(
                *base.listeners, ListenerSpec("extra", "http", 8080, "web"))))
            assert engine.processes("lb-inflight").workers != before.workers  # reloaded
            requester.join(30)
            assert "error" not in slow, slow
            assert slow["response"].status == 200 and slow["response"].json()["path"] == "/slow/2"
            session.sendall(b"z")  # the TCP session opened before the reload still flows
            assert f.read(1) == b"z"
        finally:
            session.close()

    # --- lifecycle ---------------------------------------------------------------------------------

    def test_new_driver_adopts_and_remove_leaves_nothing(self, engine: Engine, topo: Topology) -> None:
        lb = http_lb(topo, "lb-adopt")
        engine.apply(lb)
        before = engine.processes("lb-adopt")
        pids = engine.harness.all_pids(engine.driver, "lb-adopt")
        engine.driver.close()
        restarted = engine.harness.make_driver(engine.state_dir)  # an agent restart
        engine.driver = restarted
        assert restarted.running() == ["lb-adopt"]
        engine.apply(lb)
        assert engine.processes("lb-adopt") == before
        assert set(engine.names(80, 4)) == {"b1", "b2"}
        assert set(restarted.health("lb-adopt")) == {"b1", "b2"}
        restarted.remove("lb-adopt")
        assert restarted.running() == []
        assert not [p for p in pids if _alive(p)]
        assert not [p for p in netns.pids(topo.lb_ns) if _alive(p)]
        assert not (engine.state_dir / "lb-adopt").exists()
        restarted.remove("lb-adopt")  # idempotent

    def test_dead_proxy_is_started_again_by_apply(self, engine: Engine, topo: Topology) -> None:
        lb = http_lb(topo, "lb-supervise")
        engine.apply(lb)
        pids = engine.harness.all_pids(engine.driver, "lb-supervise")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: engine.driver.running() == [] and not [p for p in pids if _alive(p)], what="proxy dead")
        engine.apply(lb)
        assert engine.driver.running() == ["lb-supervise"]
        assert not pids & engine.harness.all_pids(engine.driver, "lb-supervise")
        assert set(engine.names(80, 4)) == {"b1", "b2"}

    # --- observation -------------------------------------------------------------------------------

    def test_stats_counters_move(self, engine: Engine, topo: Topology) -> None:
        engine.apply(http_lb(topo, "lb-stats"))
        before = engine.driver.stats("lb-stats")
        engine.names(80, 10)
        after = wait_for(lambda: (s := engine.driver.stats("lb-stats")).listeners["web"].requests
                         >= before.listeners["web"].requests + 10 and s, what="counted requests")
        assert after.pools["web"].requests >= before.pools["web"].requests + 10
        assert sum(after.members[m].requests for m in ("b1", "b2")) >= 10
        assert after.members["b1"].requests >= 5 and after.members["b2"].requests >= 5
        assert after.listeners["web"].bytes_out > before.listeners["web"].bytes_out
        assert after.pools["web"].bytes_in > 0 and after.listeners["web"].errors == 0
        # 5xx answers from a member count as errors (this pool has no health check: b1 stays in).
        topo.set_failing("b1", True)
        statuses = collections.Counter(engine.get(80, "/health").status for _ in range(4))
        assert statuses == {500: 2, 200: 2}, statuses
        errors = wait_for(lambda: (s := engine.driver.stats("lb-stats")).listeners["web"].errors >= 2 and s,
                          what="counted errors")
        assert errors.pools["web"].errors >= 2 and errors.members["b1"].errors >= 2
        assert errors.members["b2"].errors == 0
        # An open connection is an active one.
        conn = topo.in_client(lambda: socket.create_connection((VIP, 80), timeout=5))  # made in the client
        try:
            wait_for(lambda: engine.driver.stats("lb-stats").listeners["web"].active_connections >= 1,
                     what="an active connection")
        finally:
            conn.close()

    def test_access_logs_with_increasing_cursors(self, engine: Engine, topo: Topology) -> None:
        fixed = RuleSpec("teapot", 1, "fixed_response", path_prefix="/teapot", status_code=418)
        pool = PoolSpec("web", members=(member(topo, "b1"), member(topo, "b2")))
        engine.apply(spec("lb-logs", [ListenerSpec("web", "http", 80, "web", rules=(fixed,))], [pool]))
        for i in range(5):
            engine.get(80, f"/page/{i}")
        engine.get(80, "/teapot")
        records = wait_for(lambda: len(r := engine.driver.access_logs("lb-logs")) >= 6 and r, what="6 records")
        assert [r.path for r in records] == [f"/page/{i}" for i in range(5)] + ["/teapot"]
        cursors = [r.cursor for r in records]
        assert cursors == sorted(set(cursors))
        page = records[0]
        assert (page.listener_id, page.pool_id, page.method, page.status) == ("web", "web", "GET", 200)
        assert page.client.startswith(f"{CLIENT_IP}:") and page.member_id in ("b1", "b2")
        assert page.bytes_out > 0 and page.duration_ms >= 0
        assert {r.member_id for r in records[:5]} == {"b1", "b2"}
        teapot = records[-1]
        assert (teapot.status, teapot.pool_id, teapot.member_id) == (418, None, None)
        assert engine.driver.access_logs("lb-logs", after=cursors[-1]) == []
        assert [r.path for r in engine.driver.access_logs("lb-logs", after=cursors[2])] == \
            ["/page/3", "/page/4", "/teapot"]
        assert len(engine.driver.access_logs("lb-logs", limit=2)) == 2
        engine.get(80, "/later")
        newer = wait_for(lambda: engine.driver.access_logs("lb-logs", after=cursors[-1]), what="a newer record")
        assert newer[0].path == "/later" and newer[0].cursor > cursors[-1]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(") ", 1)[1][:1] != "Z"
