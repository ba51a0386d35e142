"""The agent's side of the control plane, in-process on a fresh SQLite database: the desired state of a host's
load balancers as engine specs, the compare-and-swap of applied versions, host placement, member health with
its events, stats, bounded access logs, and the end of a deletion (the VIP released)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from hackboot.catalog.models import Host
from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope
from hackboot.core.ids import new_id
from hackboot.core.migrate import upgrade
from hackboot.events.models import Event
from hackboot.loadbalancers import desired, driver, service
from hackboot.loadbalancers.models import AccessLogRecord, LoadBalancer
from hackboot.network import service as network
from hackboot.network.models import FloatingIp, NetworkInterface
from tests.unit.loadbalancers import pki


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", "")
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    reset_settings_cache()
    dispose_engine()
    upgrade(get_settings().effective_database_url)
    from hackboot.catalog import service as catalog

    catalog.seed()
    yield
    dispose_engine()
    monkeypatch.undo()
    reset_settings_cache()


def project() -> Principal:
    from hackboot.identity.models import Organisation, Project

    with session_scope() as s:
        org = Organisation(id=new_id("org"), name=new_id("o"))
        s.add(org)
        s.flush()
        prj = Project(id=new_id("prj"), org_id=org.id, name="p", description="")
        s.add(prj)
        s.flush()
        quotas.init_project_quotas(s, prj.id)
    return Principal(user_id=new_id("usr"), username="u", token_id="tok", role="admin", is_superuser=False,
                     project_id=prj.id)


def host(zone: str = "PAR1-a", status: str = "up") -> str:
    host_id = new_id("host")
    with session_scope() as s:
        s.add(Host(id=host_id, name=host_id, zone_id=zone, status=status))
    return host_id


def subnet_of(p: Principal, octet: int) -> str:
    vpc = network.create_vpc(p, name=f"v{octet}", cidr=f"10.{octet}.0.0/16", internet_gateway=True)
    return network.create_subnet(p, vpc=vpc.id, cidr=f"10.{octet}.1.0/24", zone="PAR1-a", public=True).id


def events_of(resource_id: str, type_: str) -> list[Event]:
    with session_scope(write=False) as s:
        return list(s.scalars(select(Event).where(Event.resource_id == resource_id, Event.type == type_)
                              .order_by(Event.id)))


def test_hosts_are_chosen_up_in_the_zone_and_least_loaded(db: None) -> None:
    p = project()
    sub = subnet_of(p, 10)
    with pytest.raises(errors.NoCapacity, match="No host is up in zone PAR1-a"):
        service.create_lb(p, name="nowhere", subnet=sub)
    with session_scope(write=False) as s:  # nothing was left of it
        assert s.scalar(select(func.count()).select_from(NetworkInterface)) == 0
    host("PAR1-b")
    host("PAR1-a", status="down")
    first, second = sorted([host(), host()])
    placed = [service.create_lb(p, name=f"lb{i}", subnet=sub).host_id for i in range(4)]
    assert placed == [first, second, first, second]


def test_desired_state_of_a_host_as_engine_specs(db: None) -> None:
    p = project()
    h = host()
    sub = subnet_of(p, 11)
    lb = service.create_lb(p, name="web", subnet=sub, internet_facing=True)
    assert desired.to_reconcile(h) == [lb.id]
    chain_pem, key_pem = pki.server_pem("shop.example.com", "www.shop.example.com")
    cert = service.upload_certificate(p, chain_pem=chain_pem, key_pem=key_pem)
    web = service.create_pool(p, lb.id, name="web", sticky="cookie", health_check={
        "protocol": "http", "path": "/health", "expected_codes": "200", "interval_s": 2, "timeout_s": 1})
    raw = service.create_pool(p, lb.id, name="raw", protocol="tcp", proxy_protocol=True)
    nic = network.create_interface(p, network.InterfaceRequest(subnet=sub))
    m1 = service.add_member(p, lb.id, web.id, service.MemberRequest(port=8080, network_interface=nic.id, weight=3))
    m2 = service.add_member(p, lb.id, web.id, service.MemberRequest(port=8080, address="10.11.1.200",
                                                                    admin_state="drain"))
    m3 = service.add_member(p, lb.id, raw.id, service.MemberRequest(port=5432, address="10.11.2.9"))
    https = service.create_listener(p, lb.id, service.ListenerRequest(
        protocol="https", port=443, default_pool=web.id, certificates=[cert.id], request_rate_limit=100))
    http = service.create_listener(p, lb.id, service.ListenerRequest(protocol="http", port=80,
                                                                     redirect_to_https_port=443))
    tcp = service.create_listener(p, lb.id, service.ListenerRequest(protocol="tcp", port=5432, default_pool="raw",
                                                                     connection_limit=50))
    rule = service.create_rule(p, lb.id, https.id, service.RuleRequest(
        priority=5, action="fixed_response", path_prefix="/ping", body="pong", status_code=200))

    state = desired.desired_for_host(h)
    assert state.deleting == () and [d.id for d in state.load_balancers] == [lb.id]
    d = state.load_balancers[0]
    assert d == desired.desired(lb.id)
    with session_scope(write=False) as s:
        row = s.get(LoadBalancer, lb.id)
        assert row is not None and d.version == row.desired_version
        vip_nic = s.get(NetworkInterface, row.network_interface_id)
        assert vip_nic is not None and d.mac == vip_nic.mac and d.network_interface_id == vip_nic.id
    assert d.prefix_len == 24 and d.gateway_ip == "10.11.1.1"
    spec = d.spec
    assert spec.id == lb.id and spec.vip == lb.vip
    pools = {x.id: x for x in spec.pools}
    assert [x.id for x in spec.pools] == sorted(pools) and set(pools) == {web.id, raw.id}
    assert pools[web.id] == driver.PoolSpec(
        id=web.id, protocol="http", algorithm="roundrobin", sticky="cookie", proxy_protocol=False,
        health_check=driver.HealthCheckSpec(protocol="http", path="/health", expected_codes="200", interval_s=2.0,
                                            timeout_s=1.0),
        members=tuple(sorted((driver.MemberSpec(id=m1.id, address=nic.private_ip, port=8080, weight=3),
                              driver.MemberSpec(id=m2.id, address="10.11.1.200", port=8080, admin_state="drain")),
                             key=lambda m: m.id)))
    assert pools[raw.id] == driver.PoolSpec(id=raw.id, protocol="tcp", proxy_protocol=True,
                                            members=(driver.MemberSpec(id=m3.id, address="10.11.2.9", port=5432),))
    by_port = {x.port: x for x in spec.listeners}
    assert [x.port for x in spec.listeners] == [80, 443, 5432]
    assert by_port[443] == driver.ListenerSpec(
        id=https.id, protocol="https", port=443, default_pool_id=web.id, certificate_ids=(cert.id,),
        request_rate_limit=100, rules=(driver.RuleSpec(id=rule.id, priority=5, action="fixed_response",
                                                       path_prefix="/ping", body="pong"),))
    assert by_port[80].redirect_to_https_port == 443 and by_port[80].id == http.id
    assert by_port[5432].connection_limit == 50 and by_port[5432].id == tcp.id
    # the certificate unsealed for the engine, with the names it serves
    assert spec.certificates == (driver.CertificateSpec(id=cert.id, chain_pem=cert.chain_pem, key_pem=key_pem,
                                                        names=("shop.example.com", "www.shop.example.com")),)
    # the key is sealed at rest
    assert "PRIVATE KEY" not in cert.key_sealed and key_pem not in cert.key_sealed


def test_mark_applied_is_a_compare_and_swap(db: None) -> None:
    p = project()
    h = host()
    lb = service.create_lb(p, name="cas", subnet=subnet_of(p, 12))
    seen = desired.desired(lb.id)
    assert seen is not None
    service.create_pool(p, lb.id, name="later")  # a change while the agent applied `seen`
    assert desired.mark_applied(lb.id, seen.version) is False  # stale: nothing recorded
    assert desired.to_reconcile(h) == [lb.id]
    current = desired.desired(lb.id)
    assert current is not None and current.version == seen.version + 1
    assert desired.mark_applied(lb.id, current.version, error="haproxy -c: bad thing") is True
    with session_scope(write=False) as s:
        row = s.get(LoadBalancer, lb.id)
        assert row is not None and row.status == "ERROR" and row.status_reason == "haproxy -c: bad thing"
        assert row.applied_version == 0
    assert desired.mark_applied(lb.id, current.version) is True
    with session_scope(write=False) as s:
        row = s.get(LoadBalancer, lb.id)
        assert row is not None and (row.status, row.status_reason, row.applied_version) == (
            "ACTIVE", "", current.version)
    assert desired.to_reconcile(h) == []
    statuses = [e.data["status"] for e in events_of(lb.id, "load_balancer.status_changed")]
    assert statuses == ["ERROR", "ACTIVE"]
    assert desired.mark_applied("lb-missing", 1) is False


def test_member_health_is_recorded_with_an_event_on_change_only(db: None) -> None:
    p = project()
    host()
    lb = service.create_lb(p, name="health", subnet=subnet_of(p, 13))
    pool = service.create_pool(p, lb.id, name="web")
    a = service.add_member(p, lb.id, pool.id, service.MemberRequest(port=80, address="10.13.1.10"))
    b = service.add_member(p, lb.id, pool.id, service.MemberRequest(port=80, address="10.13.1.11"))
    assert service.record_health(lb.id, {a.id: ("up", "Layer7 check passed"), b.id: ("down", "Layer4 timeout"),
                                         "lbm-unknown": ("up", "")}) == 2
    assert service.record_health(lb.id, {a.id: ("up", "Layer7 check passed again")}) == 0  # no change
    assert service.record_health(lb.id, {a.id: ("unchecked", "")}) == 1
    with session_scope(write=False) as s:
        from hackboot.loadbalancers.models import Member

        rows = {m.id: (m.health, m.health_reason) for m in s.scalars(select(Member))}
    assert rows == {a.id: ("unknown", ""), b.id: ("down", "Layer4 timeout")}
    changes = [(e.data["member_id"], e.data["previous"], e.data["health"])
               for e in events_of(lb.id, "load_balancer.member_health_changed")]
    assert sorted(changes[:2]) == sorted([(a.id, "unknown", "up"), (b.id, "unknown", "down")])
    assert changes[2:] == [(a.id, "up", "unknown")]
    with pytest.raises(ValueError):
        service.record_health(lb.id, {a.id: ("sideways", "")})
    # another load balancer's members are not touched through this one
    other = service.create_lb(p, name="other", subnet=subnet_of(p, 14))
    assert service.record_health(other.id, {b.id: ("up", "")}) == 0


def test_stats_snapshot_and_bounded_access_logs(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    p = project()
    host()
    lb = service.create_lb(p, name="logs", subnet=subnet_of(p, 15))
    snapshot = service.stats_to_json(driver.Stats(listeners={"lbl-1": driver.Counters(requests=5, errors=1)},
                                                  members={"lbm-1": driver.Counters(bytes_out=99)}))
    assert service.record_stats(lb.id, snapshot) and not service.record_stats("lb-missing", snapshot)
    with session_scope(write=False) as s:
        row = service.get_stats(s, s.get(LoadBalancer, lb.id))  # type: ignore[arg-type]
        assert row is not None and row.stats["listeners"]["lbl-1"]["requests"] == 5
        assert row.stats["members"]["lbm-1"]["bytes_out"] == 99 and row.stats["pools"] == {}
    monkeypatch.setattr(service, "ACCESS_LOG_KEEP", 5)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    records = [driver.AccessLogRecord(cursor=i, time=start + dt.timedelta(seconds=i), listener_id="lbl-1",
                                      client=f"10.0.0.1:{1000 + i}", pool_id="lbp-1", member_id="lbm-1",
                                      method="GET", path=f"/{i}", status=200 if i % 2 else 503, duration_ms=i,
                                      bytes_out=10 * i) for i in range(8)]
    assert service.append_logs(lb.id, records) == 8
    with session_scope(write=False) as s:
        kept = list(s.scalars(select(AccessLogRecord).order_by(AccessLogRecord.id)))
        assert [r.path for r in kept] == ["/3", "/4", "/5", "/6", "/7"]  # the newest ACCESS_LOG_KEEP
        lb_row = s.get(LoadBalancer, lb.id)
        assert lb_row is not None
        errors_only = list(s.scalars(service.log_query(lb_row, status=503)))
        assert [r.path for r in errors_only] == ["/4", "/6"]
        recent = list(s.scalars(service.log_query(lb_row, since=start + dt.timedelta(seconds=6))))
        assert [r.path for r in recent] == ["/6", "/7"]
    assert service.append_logs("lb-missing", records) == 0
    # retention: records older than the retention are purged
    assert service.purge_access_logs(now=start + dt.timedelta(days=service.ACCESS_LOG_RETENTION_DAYS,
                                                              seconds=5)) == 2
    with session_scope(write=False) as s:
        assert [r.path for r in s.scalars(select(AccessLogRecord).order_by(AccessLogRecord.id))] == [
            "/5", "/6", "/7"]


def test_finish_delete_releases_the_vip_its_public_ip_and_quota(db: None) -> None:
    p = project()
    h = host()
    lb = service.create_lb(p, name="bye", subnet=subnet_of(p, 16), internet_facing=True)
    pool = service.create_pool(p, lb.id, name="web")
    service.add_member(p, lb.id, pool.id, service.MemberRequest(port=80, address="10.16.1.10"))
    service.record_stats(lb.id, {"listeners": {}})
    assert service.finish_delete(lb.id) is False  # not being deleted
    service.delete_lb(p, lb.id)
    state = desired.desired_for_host(h)
    assert state.load_balancers == () and state.deleting == (lb.id,)
    assert desired.desired(lb.id) is None and desired.to_reconcile(h) == [lb.id]
    seen_version = lb.desired_version
    assert desired.mark_applied(lb.id, seen_version + 1) is False  # a DELETING one is never marked ACTIVE
    with session_scope(write=False) as s:
        assert s.scalar(select(func.count()).select_from(FloatingIp)) == 1
    assert service.finish_delete(lb.id) is True
    assert service.finish_delete(lb.id) is False  # idempotent
    with session_scope(write=False) as s:
        assert s.get(LoadBalancer, lb.id) is None and s.get(NetworkInterface, lb.network_interface_id) is None
        assert s.scalar(select(func.count()).select_from(FloatingIp)) == 0
        usage = {q.resource: q.used for q in quotas.usage(s, p.project)}
    assert [usage[r] for r in ("load_balancers", "pools", "members", "network_interfaces", "floating_ips")] == [
        0, 0, 0, 0, 0]
    assert desired.desired_for_host(h) == desired.HostDesired((), ())
    assert [e.type for e in events_of(lb.id, "load_balancer.deleted")] == ["load_balancer.deleted"]


def test_deletions_on_a_removed_host_are_finished_by_the_backstop(db: None) -> None:
    p = project()
    h = host()
    kept = service.create_lb(p, name="kept", subnet=subnet_of(p, 17))
    orphan = service.create_lb(p, name="orphan", subnet=subnet_of(p, 18))
    assert orphan.host_id == kept.host_id == h
    service.delete_lb(p, orphan.id)
    assert service.finish_deletes_of_removed_hosts() == 0  # its host is there: its agent finishes it
    with session_scope() as s:
        row = s.get(Host, h)
        assert row is not None
        s.delete(row)
    assert service.finish_deletes_of_removed_hosts() == 1
    with session_scope(write=False) as s:
        assert s.get(LoadBalancer, orphan.id) is None
        assert s.get(LoadBalancer, kept.id) is not None  # not being deleted: left alone


def test_the_migration_gives_existing_projects_the_load_balancer_quotas(db: None) -> None:
    from alembic import command

    from hackboot.core.migrate import alembic_config

    p = project()
    with session_scope() as s:
        s.query(quotas.QuotaUsage).filter(quotas.QuotaUsage.project_id == p.project,
                                          quotas.QuotaUsage.resource.in_(["load_balancers", "members"])).delete()
    dispose_engine()
    cfg = alembic_config(get_settings().effective_database_url)
    command.downgrade(cfg, "loadbalancers@base")
    with session_scope(write=False) as s:
        assert not {q.resource for q in quotas.usage(s, p.project)} & {"listeners", "certificates"}
    command.upgrade(cfg, "heads")
    with session_scope(write=False) as s:
        limits = {q.resource: q.limit for q in quotas.usage(s, p.project)}
    assert {r: limits[r] for r in ("load_balancers", "listeners", "pools", "members", "certificates")} == {
        r: quotas.DEFAULT_QUOTAS[r] for r in ("load_balancers", "listeners", "pools", "members", "certificates")}
