"""The agent's reconcile logic against the FakeDriver and a real (SQLite) database, no processes."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from hackboot.catalog.models import Allocation, Zone
from hackboot.compute import service
from hackboot.compute.agent import Agent, AgentSettings
from hackboot.compute.fake_driver import FakeDriver, FakeHost
from hackboot.compute.models import Instance
from hackboot.core import errors, quotas
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings
from hackboot.core.db import session_scope


@pytest.fixture(scope="module")
def world(database: Path) -> Iterator[dict[str, object]]:
    from hackboot.catalog import service as catalog
    from hackboot.images.models import Image

    catalog.seed()
    zone = "UA-" + uuid.uuid4().hex[:6]
    project = "prj-" + uuid.uuid4().hex[:10]
    images = get_settings().state_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "unit.qcow2"), "64M"], check=True)
    with session_scope() as s:
        s.add(Zone(id=zone, region_id="PAR1", status="operational"))
        quotas.init_project_quotas(s, project)
        s.add(Image(id="img-unittest", project_id=None, name="unit-img", status="active", visibility="public",
                    disk_format="qcow2", file_name="unit.qcow2", source="upload"))
    principal = Principal(user_id="usr-unit", username="unit", token_id="tok-unit", role="admin", is_superuser=True,
                          project_id=project)
    yield {"zone": zone, "p": principal}


@pytest.fixture()
def agent(world: dict[str, object], tmp_path: Path) -> Iterator[Agent]:
    zone = "UA-" + uuid.uuid4().hex[:6]  # one zone per test: its agent's host is the only one there
    with session_scope() as s:
        s.add(Zone(id=zone, region_id="PAR1", status="operational"))
    world["zone"] = zone
    cfg = AgentSettings(driver="fake", name="fake-" + uuid.uuid4().hex[:6], zone=str(world["zone"]),
                        state_dir=tmp_path, vcpus=4, memory_mb=8192, disk_gb=100, reserved_memory_mb=0,
                        reserved_disk_gb=0, poll_interval=0.1, check_interval=0.5, heartbeat_interval=0.5)
    a = Agent(cfg, driver=FakeDriver(FakeHost()))
    a.probe()
    a.register()
    yield a
    a.stop()


def create(world: dict[str, object], name: str | None = None, **kw: object) -> str:
    req = service.CreateRequest(name=name or "vm-" + uuid.uuid4().hex[:6], flavor=str(kw.pop("flavor", "VPS-NANO")),
                                image="unit-img", zone=str(world["zone"]), **kw)  # type: ignore[arg-type]
    return service.create_instance(world["p"], req).id  # type: ignore[arg-type]


def get(iid: str) -> Instance:
    with session_scope(write=False) as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        return inst


def step(agent: Agent, iid: str) -> None:
    """Run the agent's handler for one instance synchronously."""
    assert agent.host_id is not None
    work = next(w for w in service.assigned(agent.host_id) if w.id == iid)
    agent.handle(work)


def test_build_stop_start_reboot_delete(world: dict[str, object], agent: Agent) -> None:
    iid = create(world)
    assert get(iid).status == "BUILDING"
    step(agent, iid)
    inst = get(iid)
    assert (inst.status, inst.task_state, inst.power_state) == ("ACTIVE", None, "running")
    assert inst.ssh_port and inst.ssh_host == "127.0.0.1"
    assert set(inst.timings) >= {"created", "scheduled", "picked", "disk_ready", "seed_ready", "qemu_started"}
    disk = agent.disk_path(iid)
    info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(disk)], capture_output=True,
                          text=True, check=True).stdout
    assert '"backing-filename"' in info and '"virtual-size": 21474836480' in info  # overlay, flavor-sized
    assert agent.seed_path(iid).exists()

    service.instance_action(world["p"], iid, "stop")  # type: ignore[arg-type]
    with pytest.raises(errors.Conflict) as err:
        service.instance_action(world["p"], iid, "start")  # type: ignore[arg-type]
    assert err.value.code == "task_in_progress"
    step(agent, iid)
    assert (get(iid).status, get(iid).power_state, get(iid).ssh_port) == ("SHUTOFF", "shutoff", None)
    with pytest.raises(errors.Conflict) as err:
        service.instance_action(world["p"], iid, "reboot")  # type: ignore[arg-type]
    assert err.value.code == "invalid_state" and "SHUTOFF" in err.value.detail

    service.instance_action(world["p"], iid, "start")  # type: ignore[arg-type]
    step(agent, iid)
    assert get(iid).status == "ACTIVE"
    service.instance_action(world["p"], iid, "reboot", hard=True)  # type: ignore[arg-type]
    assert get(iid).status == "REBOOTING"
    step(agent, iid)
    assert get(iid).status == "ACTIVE"

    service.delete_instance(world["p"], iid)  # type: ignore[arg-type]
    step(agent, iid)
    inst = get(iid)
    assert inst.status == "DELETED" and inst.deleted_at is not None
    assert not agent.disk_dir(iid).exists()
    assert agent.driver.state(iid).value == "missing"
    with session_scope(write=False) as s:
        assert list(s.scalars(select(Allocation).where(Allocation.consumer_id == iid))) == []


def test_a_delete_that_keeps_failing_is_retried_and_says_why(world: dict[str, object], agent: Agent,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    iid = create(world)
    step(agent, iid)
    service.delete_instance(world["p"], iid)  # type: ignore[arg-type]

    def stuck(w: object) -> None:
        raise RuntimeError("disk directory is busy")

    monkeypatch.setattr(agent, "delete", stuck)
    threshold = agent.reconciler.failure_threshold
    for attempt in range(1, threshold + 1):
        agent.reconciler._run_reconcile(iid)  # what the reconciler's pool runs, without waiting for backoff
        inst = get(iid)
        assert inst.status != "DELETED" and inst.task_state == "deleting"
        if attempt < threshold:
            assert "failed attempts" not in inst.status_reason
    assert inst.status_reason == f"Retrying after {threshold} failed attempts: RuntimeError: disk directory is busy"
    monkeypatch.undo()
    agent.reconciler._run_reconcile(iid)
    assert get(iid).status == "DELETED"


def test_spawn_failure_is_a_visible_error(world: dict[str, object], agent: Agent) -> None:
    iid = create(world)
    agent.driver.host.fail_next_spawn = "could not open disk image: Permission denied"
    step(agent, iid)
    inst = get(iid)
    assert inst.status == "ERROR" and inst.task_state is None
    assert "Permission denied" in inst.status_reason
    # from ERROR, a start retries the build; delete always works
    service.instance_action(world["p"], iid, "start")  # type: ignore[arg-type]
    step(agent, iid)
    assert get(iid).status == "ACTIVE"
    service.delete_instance(world["p"], iid)  # type: ignore[arg-type]
    step(agent, iid)
    assert get(iid).status == "DELETED"


def test_resize_grows_the_disk_and_rechecks_capacity(world: dict[str, object], agent: Agent) -> None:
    iid = create(world)
    step(agent, iid)
    service.instance_action(world["p"], iid, "resize", flavor="VPS-STARTER")  # type: ignore[arg-type]
    assert get(iid).status == "RESIZING"
    step(agent, iid)
    inst = get(iid)
    assert (inst.status, inst.flavor_id, inst.vcpus, inst.memory_mb) == ("ACTIVE", "VPS-STARTER", 2, 4096)
    info = subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(agent.disk_path(iid))],
                          capture_output=True, text=True, check=True).stdout
    assert '"virtual-size": 85899345920' in info  # 80 GB
    with pytest.raises(errors.NoCapacity) as err:  # the host has 4 vCPUs
        service.instance_action(world["p"], iid, "resize", flavor="VPS-BUSINESS")  # type: ignore[arg-type]
    assert "VCPU" in err.value.detail or "MEMORY" in err.value.detail or "DISK" in err.value.detail
    with pytest.raises(errors.Conflict) as err:
        service.instance_action(world["p"], iid, "resize", flavor="VPS-NANO")  # type: ignore[arg-type]
    assert err.value.code == "disk_shrink"
    service.delete_instance(world["p"], iid)  # type: ignore[arg-type]
    step(agent, iid)


def allocated(iid: str) -> dict[str, int]:
    with session_scope(write=False) as s:
        return {a.resource_class: a.amount for a in s.scalars(select(Allocation).where(Allocation.consumer_id == iid))}


def quota_used(world: dict[str, object], resource: str) -> int:
    with session_scope(write=False) as s:
        return next(q.used for q in quotas.usage(s, world["p"].project_id) if q.resource == resource)  # type: ignore[attr-defined]


def test_failed_resize_goes_back_to_the_old_flavor(world: dict[str, object], agent: Agent) -> None:
    iid = create(world)
    step(agent, iid)
    vcpus_before, ram_before = quota_used(world, "vcpus"), quota_used(world, "ram_mb")
    service.instance_action(world["p"], iid, "resize", flavor="VPS-STARTER")  # type: ignore[arg-type]
    assert allocated(iid) == {"VCPU": 2, "MEMORY_MB": 4096, "DISK_GB": 80}
    agent.driver.host.fail_next_spawn = "could not allocate guest RAM"
    step(agent, iid)  # the disk grew, then the guest did not start
    inst = get(iid)
    assert (inst.status, inst.task_state, inst.resize_from) == ("ERROR", None, None)
    assert inst.status_reason.startswith("Resize to VPS-STARTER failed, back on VPS-NANO (the disk keeps 80 GB): ")
    assert "could not allocate guest RAM" in inst.status_reason
    assert (inst.flavor_id, inst.vcpus, inst.memory_mb, inst.disk_gb) == ("VPS-NANO", 1, 1024, 80)
    # the new flavor's vCPUs and RAM are released on the host and in the quota; the grown disk stays counted
    assert allocated(iid) == {"VCPU": 1, "MEMORY_MB": 1024, "DISK_GB": 80}
    assert (quota_used(world, "vcpus"), quota_used(world, "ram_mb")) == (vcpus_before, ram_before)
    assert agent.host_id is not None
    with session_scope(write=False) as s:
        assert service.scheduler.host_usage(s, agent.host_id)["VCPU"]["used"] == 1
    service.instance_action(world["p"], iid, "start")  # type: ignore[arg-type]
    step(agent, iid)
    assert get(iid).status == "ACTIVE"
    service.delete_instance(world["p"], iid)  # type: ignore[arg-type]
    step(agent, iid)


def test_failed_resize_keeps_the_new_flavor_when_the_old_one_no_longer_fits(world: dict[str, object],
                                                                            agent: Agent) -> None:
    from hackboot.catalog import service as catalog

    suffix = uuid.uuid4().hex[:4].upper()
    for vcpus in (1, 2, 3):
        catalog.create_flavor(None, id=f"UT-{suffix}-{vcpus}C", family="vps", vcpus=vcpus, memory_mb=1024,
                              disk_gb=10)
    iid = create(world, flavor=f"UT-{suffix}-2C")
    step(agent, iid)
    service.instance_action(world["p"], iid, "resize", flavor=f"UT-{suffix}-1C")  # type: ignore[arg-type]
    other = create(world, flavor=f"UT-{suffix}-3C")  # takes the vCPU the resize gave back: the host has 4
    step(agent, other)
    agent.driver.host.fail_next_spawn = "could not allocate guest RAM"
    step(agent, iid)
    inst = get(iid)
    assert inst.status == "ERROR" and inst.flavor_id == f"UT-{suffix}-1C" and inst.vcpus == 1
    assert inst.status_reason.startswith(f"Resize to UT-{suffix}-1C failed; UT-{suffix}-2C could not be restored (")
    assert "VCPU" in inst.status_reason
    assert allocated(iid)["VCPU"] == 1 and allocated(other)["VCPU"] == 3
    for i in (iid, other):
        service.delete_instance(world["p"], i)  # type: ignore[arg-type]
        step(agent, i)


def test_a_down_host_flags_its_instances_in_a_column_not_by_their_reason_text(world: dict[str, object],
                                                                             agent: Agent) -> None:
    from hackboot.catalog import service as catalog
    from hackboot.catalog.models import Host

    quiet, reporting, lookalike = create(world), create(world), create(world)
    for iid in (quiet, reporting, lookalike):
        step(agent, iid)
    with session_scope() as s:
        host = s.get(Host, agent.host_id)
        assert host is not None
        host.status, name = "down", host.name
    service.reflect_host_health()
    for iid in (quiet, reporting, lookalike):
        inst = get(iid)
        assert inst.host_down_since is not None
        assert inst.status_reason.startswith(f"Host {name} is down (no heartbeat since ")
    since = get(quiet).host_down_since
    service.reflect_host_health()  # idempotent: the flag keeps its time
    assert get(quiet).host_down_since == since
    # the agent reports on one instance before the host is seen up again: its reason stands
    service.finish_task(reporting, get(reporting).action_seq, status="ERROR", power_state="crashed",
                        reason="QEMU exited: signal 9")
    assert get(reporting).host_down_since is None
    catalog.heartbeat(None, str(agent.host_id))
    service.reflect_host_health()
    assert (get(quiet).status_reason, get(quiet).host_down_since) == ("", None)
    assert (get(reporting).status_reason, get(reporting).host_down_since) == ("QEMU exited: signal 9", None)
    assert get(lookalike).host_down_since is None and get(lookalike).status_reason == ""
    # once the host is back, an agent's reason that reads like the host-down one is not the control plane's
    service.finish_task(lookalike, get(lookalike).action_seq, status="ERROR", power_state="crashed",
                        reason=f"Host {name} is down (told by the guest)")
    service.reflect_host_health()
    assert get(lookalike).status_reason == f"Host {name} is down (told by the guest)"
    for iid in (quiet, reporting, lookalike):
        service.delete_instance(world["p"], iid)  # type: ignore[arg-type]
        step(agent, iid)


def test_crash_and_poweroff_are_observed_through_events(world: dict[str, object], agent: Agent) -> None:
    agent._boot()  # subscribe, adopt, start the loops
    iid = create(world)
    deadline = time.monotonic() + 10
    while get(iid).status != "ACTIVE" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert get(iid).status == "ACTIVE"
    agent.driver.simulate_crash(iid)
    deadline = time.monotonic() + 5
    while get(iid).status != "SHUTOFF" and time.monotonic() < deadline:
        time.sleep(0.05)
    inst = get(iid)
    assert inst.status == "SHUTOFF" and "exited unexpectedly" in inst.status_reason
    service.instance_action(world["p"], iid, "start")  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while get(iid).status != "ACTIVE" and time.monotonic() < deadline:
        time.sleep(0.05)
    agent.driver.simulate_guest_poweroff(iid)
    deadline = time.monotonic() + 5
    while get(iid).status != "SHUTOFF" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "powered itself off" in get(iid).status_reason
    service.delete_instance(world["p"], iid)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while get(iid).status != "DELETED" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert get(iid).status == "DELETED"


def test_restart_adopts_running_guests_and_removes_orphans(world: dict[str, object], agent: Agent,
                                                          tmp_path: Path) -> None:
    keep, orphan = create(world), create(world)
    step(agent, keep)
    step(agent, orphan)
    fake_host = agent.driver.host
    pid = fake_host.guests[keep].pid
    agent.driver.close()
    # the orphan's instance is deleted while the agent is away (host down: freed at once)
    with session_scope() as s:
        inst = s.get(Instance, orphan)
        assert inst is not None
        service._mark_deleted(s, inst, "test")
    second = Agent(agent.cfg, driver=FakeDriver(fake_host))
    second.probe()
    second.register()
    second.adopt_all()
    assert fake_host.guests[keep].pid == pid and fake_host.guests[keep].alive  # adopted, not restarted
    assert orphan not in fake_host.guests or not fake_host.guests[orphan].alive
    assert not second.disk_dir(orphan).exists()
    second.sync(next(w for w in service.assigned(second.host_id or "") if w.id == keep))
    assert get(keep).status == "ACTIVE"
    service.delete_instance(world["p"], keep)  # type: ignore[arg-type]
    step(second, keep)
    second.stop()


def test_gpu_allocation_reaches_the_qemu_command_line(world: dict[str, object], tmp_path: Path) -> None:
    from hackboot.compute.qemu import RunPaths, build_argv

    cfg = AgentSettings(driver="fake", name="gpu-" + uuid.uuid4().hex[:6], zone=str(world["zone"]),
                        state_dir=tmp_path, vcpus=64, memory_mb=512_000, disk_gb=4000, reserved_memory_mb=0,
                        gpus="A100=0000:81:00.0,0000:82:00.0")
    a = Agent(cfg, driver=FakeDriver(FakeHost()))
    a.probe()
    a.register()
    iid = create(world, flavor="GPU-A100")
    inst = get(iid)
    assert inst.host_id == a.host_id and inst.gpu_model == "A100"
    assert len(inst.gpu_pci_addresses) == 1 and inst.gpu_pci_addresses[0] in ("0000:81:00.0", "0000:82:00.0")
    work = next(w for w in service.assigned(a.host_id or "") if w.id == iid)
    argv = build_argv(a.guest_spec(work, 2222), RunPaths.for_instance(Path("/run/hb"), iid))  # pure: no I/O
    assert f"vfio-pci,host={inst.gpu_pci_addresses[0]}" in " ".join(argv)
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in " ".join(argv)
    service.delete_instance(world["p"], iid)  # type: ignore[arg-type]
    a.handle(next(w for w in service.assigned(a.host_id or "") if w.id == iid))
    a.stop()


def test_create_validation(world: dict[str, object], agent: Agent) -> None:
    p = world["p"]
    with pytest.raises(errors.ValidationFailed) as err:
        service.create_instance(p, service.CreateRequest(name="bad", flavor="VPS-NANO", image="unit-img",  # type: ignore[arg-type]
                                                         zone=str(world["zone"]),
                                                         user_data="#cloud-config\nfoo: [1, 2"))
    assert "not valid YAML" in err.value.detail and err.value.errors[0]["loc"] == ["body", "user_data"]
    with pytest.raises(errors.ValidationFailed):
        create(world, flavor="NOPE")
    with pytest.raises(errors.NoCapacity) as err:
        create(world, flavor="VPS-ENTERPRISE+")  # 16 vCPUs: larger than any host of the zone
    assert err.value.code == "flavor_too_large" and "VCPU 16 > largest host's" in err.value.detail
    with pytest.raises(errors.Conflict) as err:
        service.create_instance(p, service.CreateRequest(name="x", flavor="VPS-NANO", image="unit-img",  # type: ignore[arg-type]
                                                         zone="LON1-a"))
    assert err.value.code == "region_not_operational"
    name = "dup-" + uuid.uuid4().hex[:4]
    iid = create(world, name=name)
    with pytest.raises(errors.Conflict) as err:
        create(world, name=name)
    assert err.value.code == "already_exists"
    service.delete_instance(p, iid)  # type: ignore[arg-type]
    step(agent, iid)
