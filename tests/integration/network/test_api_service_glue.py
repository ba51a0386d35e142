"""The functions other parts call, in-process on a fresh database (SQLite and PostgreSQL): compute's
(default subnet, attaching interfaces to instances it validated, placement), the agent's (a VPC's desired
state, observed versions, statuses), the floating IP pool's end, and the migration's quota backfill."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import delete, select

from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope
from hackboot.core.ids import new_id
from hackboot.core.migrate import alembic_config, upgrade
from hackboot.network import service
from hackboot.network.models import NetworkInterface, Vpc


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = "" if request.param == "sqlite" else request.getfixturevalue("postgres").create_database()
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", url)
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    reset_settings_cache()
    dispose_engine()
    upgrade(get_settings().effective_database_url)
    from hackboot.catalog import service as catalog

    catalog.seed()
    yield get_settings().effective_database_url
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


def test_default_subnet_for_compute_and_attaching_interfaces(db: str) -> None:
    p, q = project(), project()
    changed: set[str] = set()
    with session_scope() as s:
        subnet = service.default_subnet(s, p.project, zone="PAR1-b", changed=changed)
        vpc_id, subnet_id = subnet.vpc_id, subnet.id
        assert subnet.zone_id == "PAR1-b" and subnet.public
    assert changed == {vpc_id}  # the caller notifies after its commit
    with session_scope() as s:
        again = service.default_subnet(s, p.project, zone="PAR1-b")
        assert again.id == subnet_id
        assert service.default_subnet(s, p.project).zone_id == "PAR1-a"  # this cloud's default zone
        with pytest.raises(errors.ValidationFailed):
            service.default_subnet(s, p.project, zone="FRA1-a")  # not a zone of the region

    nic = service.create_interface(p, service.InterfaceRequest(subnet=subnet_id))
    other = service.create_interface(p, service.InterfaceRequest(subnet=subnet_id))
    inst = service.InstanceRef(id="i-one", project_id=p.project, zone_id="PAR1-b", host_id="host-1")
    with session_scope() as s:
        with pytest.raises(errors.NotFound):  # another project's instance, or another project's interface
            service.attach_interface(s, p, nic.id, service.InstanceRef("i-x", q.project, "PAR1-b", None))
        with pytest.raises(errors.NotFound):
            service.attach_interface(s, q, nic.id, service.InstanceRef("i-x", q.project, "PAR1-b", None))
        with pytest.raises(errors.Conflict) as err:
            service.attach_interface(s, p, nic.id, service.InstanceRef("i-one", p.project, "PAR1-a", None))
        assert err.value.code == "different_zone"
        changed = set()
        attached = service.attach_interface(s, p, nic.id, inst, changed=changed)
        assert (attached.instance_id, attached.device_index, attached.host_id) == ("i-one", 0, "host-1")
        assert changed == {vpc_id}
        with pytest.raises(errors.Conflict) as err:
            service.attach_interface(s, p, other.id, inst, device_index=0)
        assert err.value.code == "device_index_in_use"
        with pytest.raises(errors.ValidationFailed):
            service.attach_interface(s, p, other.id, inst, device_index=service.MAX_INTERFACES_PER_INSTANCE)
        assert service.attach_interface(s, p, other.id, inst).device_index == 1
        with pytest.raises(errors.Conflict) as err:
            service.attach_interface(s, p, other.id, inst)
        assert err.value.code == "already_attached"
    with pytest.raises(errors.Conflict) as err:
        service.delete_interface(p, nic.id)
    assert err.value.code == "in_use"
    with session_scope() as s:
        assert [n.id for n in service.interfaces_of_instance(s, "i-one")] == [nic.id, other.id]
        assert service.place_interfaces(s, "i-one", "host-2") == 2
    with session_scope() as s:
        assert {n.host_id for n in service.interfaces_of_instance(s, "i-one")} == {"host-2"}
        service.detach_interface(s, p, nic.id)
        with pytest.raises(errors.Conflict):
            service.detach_interface(s, p, nic.id)
    service.delete_interface(p, nic.id)
    with session_scope(write=False) as s:
        assert s.get(NetworkInterface, nic.id) is None


def test_a_zone_opened_after_the_default_vpc_gets_its_default_subnet_on_first_use(db: str) -> None:
    from hackboot.catalog.models import Zone

    p = project()
    with session_scope() as s:
        first = service.default_subnet(s, p.project, zone="PAR1-a")
        vpc_id = first.vpc_id
    with session_scope() as s:
        s.add(Zone(id="PAR1-z", region_id="PAR1"))
    changed: set[str] = set()
    with session_scope() as s:
        made = service.default_subnet(s, p.project, zone="PAR1-z", changed=changed)
        made_id, made_cidr = made.id, made.cidr
        assert made.vpc_id == vpc_id and made.zone_id == "PAR1-z" and made.public
    assert changed == {vpc_id}
    with session_scope(write=False) as s:
        from hackboot.network.models import Subnet

        cidrs = [ipaddress.IPv4Network(c) for c in s.scalars(select(Subnet.cidr).where(Subnet.vpc_id == vpc_id))]
        assert all(not a.overlaps(b) for i, a in enumerate(cidrs) for b in cidrs[i + 1:])
    with session_scope() as s:
        assert service.default_subnet(s, p.project, zone="PAR1-z").id == made_id  # made once
    assert ipaddress.IPv4Network(made_cidr).subnet_of(ipaddress.IPv4Network(service.DEFAULT_VPC_CIDR))


def test_the_agents_view_observed_versions_and_statuses(db: str) -> None:
    p = project()
    vpc = service.create_vpc(p, name="shop", cidr="10.0.0.0/16", internet_gateway=True)
    pub_a = service.create_subnet(p, vpc=vpc.id, cidr="10.0.1.0/24", zone="PAR1-a", public=True)
    pub_b = service.create_subnet(p, vpc=vpc.id, cidr="10.0.2.0/24", zone="PAR1-b", public=True)
    priv_b = service.create_subnet(p, vpc=vpc.id, cidr="10.0.3.0/24", zone="PAR1-b")
    priv_c = service.create_subnet(p, vpc=vpc.id, cidr="10.0.4.0/24", zone="PAR1-c")
    nat_a = service.create_nat_gateway(p, subnet=pub_a.id)
    nat_b = service.create_nat_gateway(p, subnet=pub_b.id)
    web = service.create_group(p, vpc=vpc.id, name="web")
    service.add_rule(p, web.id, service.RuleRequest("ingress", "tcp", 443, None, "0.0.0.0/0"))
    nic = service.create_interface(p, service.InterfaceRequest(subnet=priv_b.id, security_groups=["web"],
                                                               assign_public_ip=True))
    service.create_flow_log(p, resource=nic.id, traffic_type="REJECT")

    state = service.vpc_state(vpc.id)
    assert state is not None
    assert state.dns_domain == "shop.internal" and state.vpc.vni >= service.VNI_MIN
    assert [x.id for x in state.subnets] == sorted([pub_a.id, pub_b.id, priv_b.id, priv_c.id])
    assert state.subnet_nat == {priv_b.id: nat_b.id, priv_c.id: min(nat_a.id, nat_b.id)}  # its zone's first
    assert [n.id for n in state.interfaces] == [nic.id] and state.interface_groups[nic.id] == [web.id]
    assert {g.name for g in state.groups} == {"default", "web"}
    assert sum(r.security_group_id == web.id for r in state.rules) == 2
    assert {f.nat_gateway_id or f.network_interface_id for f in state.floating_ips} == {nat_a.id, nat_b.id, nic.id}
    assert [fl.resource_id for fl in state.flow_logs] == [nic.id]

    pending = {v: (d, o) for v, d, o in service.vpcs_to_reconcile()}
    desired, observed = pending[vpc.id]
    assert observed == 0 and desired > 1
    assert not service.observed(vpc.id, desired + 1)  # a version nobody asked for
    assert service.observed(vpc.id, desired - 1)
    assert service.observed(vpc.id, desired)
    assert not service.observed(vpc.id, desired - 1)  # never backwards
    assert vpc.id not in {v for v, _, _ in service.vpcs_to_reconcile()}
    with session_scope(write=False) as s:
        assert s.get(Vpc, vpc.id).status == "active"  # type: ignore[union-attr]
        assert s.get(NetworkInterface, nic.id).status == "active"  # type: ignore[union-attr]
    service.update_vpc(p, vpc.id, description="changed")
    newer = next(d for v, d, _ in service.vpcs_to_reconcile() if v == vpc.id)
    assert service.observed(vpc.id, newer, error="nft: table missing")
    with session_scope(write=False) as s:
        row = s.get(Vpc, vpc.id)
        assert row is not None and (row.status, row.status_reason) == ("error", "nft: table missing")
    assert service.set_status("network_interface", nic.id, "error", "tap gone")
    with session_scope(write=False) as s:
        assert s.get(NetworkInterface, nic.id).status_reason == "tap gone"  # type: ignore[union-attr]


def test_the_floating_ip_pool_runs_out_with_a_409(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "FLOATING_IP_POOL", "203.0.113.0/29")  # .2-.6: .1 is the upstream router
    p = project()
    with session_scope() as s:
        quotas.set_limit(s, p.project, "floating_ips", 10)
    got = {service.allocate_floating_ip(p).address for _ in range(5)}
    assert got == {f"203.0.113.{i}" for i in range(2, 7)}
    with pytest.raises(errors.Conflict) as err:
        service.allocate_floating_ip(p)
    assert err.value.code == "pool_exhausted"
    with session_scope(write=False) as s:
        assert s.get(quotas.QuotaUsage, (p.project, "floating_ips")).used == 5  # type: ignore[union-attr]


def test_the_migration_gives_existing_projects_the_network_quotas(db: str) -> None:
    p = project()
    with session_scope() as s:
        s.execute(delete(quotas.QuotaUsage).where(quotas.QuotaUsage.project_id == p.project,
                                                  quotas.QuotaUsage.resource.in_(["vpcs", "floating_ips"])))
    dispose_engine()
    cfg = alembic_config(db)
    command.downgrade(cfg, "network@base")
    command.upgrade(cfg, "heads")
    with session_scope(write=False) as s:
        rows = {resource: limit for resource, limit in s.execute(select(
            quotas.QuotaUsage.resource, quotas.QuotaUsage.limit).where(quotas.QuotaUsage.project_id == p.project))}
    assert rows["vpcs"] == 5 and rows["floating_ips"] == 5 and rows["instances"] == quotas.DEFAULT_QUOTAS["instances"]
