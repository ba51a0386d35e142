"""Compute through the SDK without booting guests, on SQLite and PostgreSQL: key pairs, validation,
placement under concurrency, GPUs, server groups, lifecycle rules (hosts with fake-driver agents)."""

from __future__ import annotations

import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from tests.integration.compute.conftest import FakeAgents, unique
from tests.support import Cloud

_images: dict[str, str] = {}


def project_client(cloud: Cloud, **limits: int) -> Client:
    """A fresh project (admin acting in it) with raised quotas, and a small image it can boot."""
    admin = cloud.admin_client_unscoped()
    project = admin.projects.create(unique("cmp"))  # type: ignore[attr-defined]
    for resource, limit in {"instances": 100, "vcpus": 2000, "ram_mb": 10**8, "gpus": 10, **limits}.items():
        admin.projects.set_quota(project["id"], resource, limit)  # type: ignore[attr-defined]
    client = cloud.client(project=project["id"])
    if cloud.url not in _images:
        with tempfile.TemporaryDirectory() as tmp:
            disk = Path(tmp) / "blank.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
            image = client.images.create_from_file(unique("blank"), disk, visibility="public")  # type: ignore[attr-defined]
        image = client.images.wait(image["id"])  # type: ignore[attr-defined]
        assert image["status"] == "active", image
        _images[cloud.url] = image["id"]
    client.image_id = _images[cloud.url]  # type: ignore[attr-defined]
    return client


def register_host(cloud: Cloud, name: str, zone: str, vcpus: int, memory_mb: int, disk_gb: int,
                  gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    admin = cloud.admin_client_unscoped()
    return admin.post("/v1/hosts", {"name": name, "zone": zone, "vcpus": vcpus, "memory_mb": memory_mb,  # type: ignore[no-any-return]
                                    "disk_gb": disk_gb, "gpus": gpus or []})


def host_usage(cloud: Cloud, name: str) -> dict[str, dict[str, Any]]:
    host = cloud.admin_client_unscoped().get(f"/v1/hosts/{name}")
    return {inv["resource_class"]: inv for inv in host["inventories"]}


def cleanup(cloud: Cloud, client: Client, zone: str, host_specs: list[str], instance_ids: list[str]) -> None:
    """Give the agent-less hosts a fake-driver agent, delete the instances through it, drop the hosts."""
    with FakeAgents(cloud, zone, host_specs):
        for iid in instance_ids:
            inst = client.instances.get(iid)  # type: ignore[attr-defined]
            if inst["status"] != "DELETED" and inst.get("task_state") != "deleting":
                client.instances.delete(iid)  # type: ignore[attr-defined]
        for iid in instance_ids:
            try:
                client.instances.wait_deleted(iid, timeout=60)  # type: ignore[attr-defined]
            except TimeoutError:
                raise AssertionError(f"not deleted: {client.instances.get(iid)}") from None  # type: ignore[attr-defined]
    admin = cloud.admin_client_unscoped()
    for spec in host_specs:
        admin.delete(f"/v1/hosts/{spec.split(':')[0]}")


# --- key pairs -----------------------------------------------------------------------------------------

def test_keypair_generate_import_list_delete(any_cloud: Cloud, tmp_path: Path) -> None:
    client = any_cloud.client()
    name = unique("kp")
    kp = client.keypairs.create(name)  # type: ignore[attr-defined]
    assert kp["key_type"] == "ssh-ed25519" and kp["fingerprint"].startswith("SHA256:")
    key_file = tmp_path / "k"
    key_file.write_text(kp["private_key"])
    key_file.chmod(0o600)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key_file)], capture_output=True, text=True, check=True)
    assert derived.stdout.split()[1] == kp["public_key"].split()[1]  # the private key matches
    listed = client.keypairs.get(name)  # type: ignore[attr-defined]
    assert "private_key" not in listed  # shown once only
    fp = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=kp["public_key"], capture_output=True, text=True)
    assert fp.stdout.split()[1] == kp["fingerprint"]
    with pytest.raises(ApiError) as err:
        client.keypairs.create(name)  # type: ignore[attr-defined]
    assert err.value.status == 409 and err.value.code == "already_exists"

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "mine")], check=True)
    imported = client.keypairs.create(unique("imp"), (tmp_path / "mine.pub").read_text())  # type: ignore[attr-defined]
    assert imported.get("private_key") is None
    with pytest.raises(ApiError) as err:
        client.keypairs.create(unique("bad"), "ssh-ed25519 not-base64 at-all")  # type: ignore[attr-defined]
    assert err.value.status == 422 and "public_key" in err.value.detail
    names = {k["name"] for k in client.keypairs.list()}  # type: ignore[attr-defined]
    assert {name, imported["name"]} <= names
    client.keypairs.delete(name)  # type: ignore[attr-defined]
    with pytest.raises(ApiError) as err:
        client.keypairs.get(name)  # type: ignore[attr-defined]
    assert err.value.status == 404


# --- validation ------------------------------------------------------------------------------------------

def test_create_validation_errors_are_clear(any_cloud: Cloud) -> None:
    client = project_client(any_cloud)
    image = client.image_id  # type: ignore[attr-defined]
    cases = [
        (dict(flavor="VPS-NANO", image=image, user_data="#cloud-config\nruncmd: [oops"), 422, "user_data"),
        (dict(flavor="VPS-NANO", image=image, user_data="x" * (64 * 1024 + 1)), 422, "user_data"),
        (dict(flavor="NO-SUCH", image=image), 422, "Flavor NO-SUCH does not exist"),
        (dict(flavor="VPS-NANO", image="no-such-image"), 404, "no-such-image"),
        (dict(flavor="VPS-NANO", image=image, zone="LON1-a"), 409, "maintenance"),
        (dict(flavor="VPS-NANO", image=image, zone="MAD1-a"), 409, "planned"),
        (dict(flavor="VPS-NANO", image=image, keypair="nope"), 404, "Key pair nope"),
        (dict(flavor="VPS-ENTERPRISE+", image=image, zone="FRA1-a"), 409, "no host"),
    ]
    for kwargs, status, text in cases:
        with pytest.raises(ApiError) as err:
            client.instances.create(unique("bad"), **kwargs)  # type: ignore[attr-defined]
        assert err.value.status == status, (kwargs, err.value)
        assert text in err.value.detail or text in str(err.value.problem), (kwargs, err.value)
    assert client.instances.list() == []  # type: ignore[attr-defined]  # nothing half-written


def test_flavor_larger_than_any_host_is_refused_at_create(any_cloud: Cloud) -> None:
    client = project_client(any_cloud)
    zone = "FRA1-a"
    name = unique("small")
    register_host(any_cloud, name, zone, vcpus=4, memory_mb=8192, disk_gb=100)
    try:
        with pytest.raises(ApiError) as err:
            client.instances.create(unique("big"), flavor="VPS-BUSINESS", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
        assert err.value.status == 409 and err.value.code == "flavor_too_large"
        assert "VCPU 8 > largest host's 4" in err.value.detail
    finally:
        any_cloud.admin_client_unscoped().delete(f"/v1/hosts/{name}")


# --- placement -------------------------------------------------------------------------------------------

def test_50_concurrent_creates_place_exactly_40(any_cloud: Cloud) -> None:
    client = project_client(any_cloud)
    zone = "FRA1-c"
    hosts = [unique("cap") for _ in range(4)]
    for h in hosts:  # 4 x 10 vCPUs: room for exactly 40 VPS-NANO (1 vCPU, 1 GB, 20 GB)
        register_host(any_cloud, h, zone, vcpus=10, memory_mb=100_000, disk_gb=10_000)
    project = client.http.headers["X-Hackboot-Project"]

    def create(i: int) -> tuple[str, Any]:
        with any_cloud.client(project=project) as c:
            try:
                inst = c.instances.create(f"burst-{i}", flavor="VPS-NANO", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
                return "ok", inst
            except ApiError as exc:
                return "err", exc

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(create, range(50)))
    placed = [r for kind, r in results if kind == "ok"]
    refused = [r for kind, r in results if kind == "err"]
    try:
        assert len(placed) == 40, [str(e) for e in refused]
        assert len(refused) == 10
        for exc in refused:
            assert exc.status == 409 and exc.code == "no_capacity", exc
            assert "No capacity" in exc.detail and "VCPU" in exc.detail
        assert all(i["status"] == "BUILDING" and i["host_name"] in hosts for i in placed)
        total = 0
        for h in hosts:
            usage = host_usage(any_cloud, h)
            for inv in usage.values():
                assert inv["used"] <= inv["allocatable"], (h, inv)  # never an overcommit
            total += usage["VCPU"]["used"]
        assert total == 40
        quota = {q["resource"]: q["used"] for q in any_cloud.admin_client_unscoped().projects.quotas(project)}  # type: ignore[attr-defined]
        assert quota["instances"] == 40 and quota["vcpus"] == 40  # refused requests claimed nothing
    finally:
        cleanup(any_cloud, client, zone, [f"{h}:10:100000:10000" for h in hosts], [i["id"] for i in placed])
    quota = {q["resource"]: q["used"] for q in any_cloud.admin_client_unscoped().projects.quotas(project)}  # type: ignore[attr-defined]
    assert quota["instances"] == 0 and quota["vcpus"] == 0 and quota["ram_mb"] == 0


def test_gpu_flavors_go_to_gpu_hosts_with_pci_addresses(any_cloud: Cloud) -> None:
    client = project_client(any_cloud)
    zone = "AMS1-c"
    plain, gpu = unique("plain"), unique("a100")
    addrs = ["0000:81:00.0", "0000:c1:00.0"]
    register_host(any_cloud, plain, zone, vcpus=64, memory_mb=512_000, disk_gb=8000)
    register_host(any_cloud, gpu, zone, vcpus=64, memory_mb=512_000, disk_gb=8000,
                  gpus=[{"model": "A100", "count": 2, "pci_addresses": addrs}])
    made: list[str] = []
    try:
        for _ in range(2):
            inst = client.instances.create(unique("gpu"), flavor="GPU-A100", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
            made.append(inst["id"])
            assert inst["host_name"] == gpu and inst["gpu_model"] == "A100" and len(inst["gpu_pci_addresses"]) == 1
        got = sorted(client.instances.get(i)["gpu_pci_addresses"][0] for i in made)  # type: ignore[attr-defined]
        assert got == addrs  # each GPU handed out once
        with pytest.raises(ApiError) as err:
            client.instances.create(unique("gpu"), flavor="GPU-A100", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
        assert err.value.code == "no_capacity" and "GPU:A100" in err.value.detail
        with pytest.raises(ApiError) as err:
            client.instances.create(unique("t4"), flavor="GPU-T4", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
        assert err.value.code == "flavor_too_large" and "GPU:T4" in err.value.detail
        inst = client.instances.create(unique("cpu"), flavor="VPS-NANO", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
        made.append(inst["id"])
        assert inst["host_name"] == plain  # GPU hosts are kept for GPU work
        gpu_inv = host_usage(any_cloud, gpu)["GPU:A100"]
        assert gpu_inv["used"] == 2 and sorted(gpu_inv["devices_in_use"]) == addrs
    finally:
        cleanup(any_cloud, client, zone, [f"{plain}:64:512000:8000", f"{gpu}:64:512000:8000:A100={','.join(addrs)}"],
                made)
    assert host_usage_or_none(any_cloud, gpu) is None


def host_usage_or_none(cloud: Cloud, name: str) -> Any:
    try:
        return host_usage(cloud, name)
    except ApiError as exc:
        assert exc.status == 404
        return None


def test_server_groups_affinity_and_anti_affinity(any_cloud: Cloud) -> None:
    client = project_client(any_cloud)
    zone = "AMS1-b"
    hosts = [unique("sg") for _ in range(3)]
    for h in hosts:
        register_host(any_cloud, h, zone, vcpus=8, memory_mb=32_000, disk_gb=1000)
    apart = client.server_groups.create(unique("apart"), "anti-affinity")  # type: ignore[attr-defined]
    together = client.server_groups.create(unique("together"), "affinity")  # type: ignore[attr-defined]
    made: list[str] = []
    try:
        spread = set()
        for _ in range(3):
            inst = client.instances.create(unique("a"), flavor="VPS-NANO", image=client.image_id, zone=zone,  # type: ignore[attr-defined]
                                           server_group=apart["name"])
            made.append(inst["id"])
            spread.add(inst["host_name"])
        assert spread == set(hosts)
        with pytest.raises(ApiError) as err:
            client.instances.create(unique("a"), flavor="VPS-NANO", image=client.image_id, zone=zone,  # type: ignore[attr-defined]
                                    server_group=apart["id"])
        assert err.value.code == "no_capacity" and "anti-affinity" in err.value.detail
        same = set()
        for _ in range(3):
            inst = client.instances.create(unique("t"), flavor="VPS-NANO", image=client.image_id, zone=zone,  # type: ignore[attr-defined]
                                           server_group=together["id"])
            made.append(inst["id"])
            same.add(inst["host_name"])
        assert len(same) == 1
        assert len(client.server_groups.get(apart["id"])["members"]) == 3  # type: ignore[attr-defined]
        with pytest.raises(ApiError) as err:
            client.server_groups.delete(apart["id"])  # type: ignore[attr-defined]
        assert err.value.code == "in_use"
    finally:
        cleanup(any_cloud, client, zone, [f"{h}:8:32000:1000" for h in hosts], made)
    client.server_groups.delete(apart["id"])  # type: ignore[attr-defined]
    client.server_groups.delete(together["id"])  # type: ignore[attr-defined]


def test_lifecycle_rules_with_a_fake_driver_agent(any_cloud: Cloud) -> None:
    """The real agent code (FakeDriver) against the real server: transitions, resize, delete frees all."""
    client = project_client(any_cloud)
    zone = "FRA1-b"
    host = unique("life")
    project = client.http.headers["X-Hackboot-Project"]
    with FakeAgents(any_cloud, zone, [f"{host}:4:16384:500"]):
        inst = client.instances.create(unique("vm"), flavor="VPS-NANO", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
        inst = client.instances.wait(inst["id"], timeout=30)  # type: ignore[attr-defined]
        assert inst["status"] == "ACTIVE" and inst["ssh_port"] and inst["power_state"] == "running"
        with pytest.raises(ApiError) as err:
            client.instances.start(inst["id"])  # type: ignore[attr-defined]
        assert err.value.status == 409 and err.value.code == "invalid_state"
        assert "Cannot start instance" in err.value.detail and "ACTIVE" in err.value.detail
        client.instances.stop(inst["id"])  # type: ignore[attr-defined]
        inst = client.instances.wait(inst["id"], ("SHUTOFF",), timeout=30)  # type: ignore[attr-defined]
        assert inst["status"] == "SHUTOFF" and inst["ssh_port"] is None
        with pytest.raises(ApiError) as err:
            client.instances.stop(inst["id"])  # type: ignore[attr-defined]
        assert err.value.code == "invalid_state"
        with pytest.raises(ApiError) as err:
            client.instances.resize(inst["id"], "VPS-BUSINESS")  # type: ignore[attr-defined]  # 8 vCPU > 4
        assert err.value.status == 409 and err.value.code == "no_capacity"
        client.instances.resize(inst["id"], "VPS-STARTER")  # type: ignore[attr-defined]
        inst = client.instances.wait(inst["id"], ("SHUTOFF",), timeout=30)  # type: ignore[attr-defined]
        assert (inst["flavor_id"], inst["vcpus"], inst["disk_gb"]) == ("VPS-STARTER", 2, 80)
        assert host_usage(any_cloud, host)["VCPU"]["used"] == 2
        client.instances.start(inst["id"])  # type: ignore[attr-defined]
        client.instances.wait(inst["id"], timeout=30)  # type: ignore[attr-defined]
        client.instances.reboot(inst["id"])  # type: ignore[attr-defined]
        assert client.instances.wait(inst["id"], timeout=30)["status"] == "ACTIVE"  # type: ignore[attr-defined]
        client.instances.delete(inst["id"])  # type: ignore[attr-defined]
        with pytest.raises(ApiError) as err:
            client.instances.delete(inst["id"])  # type: ignore[attr-defined]
        assert err.value.status in (404, 409)
        assert client.instances.wait_deleted(inst["id"])["status"] == "DELETED"  # type: ignore[attr-defined]
        usage = host_usage(any_cloud, host)
        assert all(v["used"] == 0 for v in usage.values())
        quota = {q["resource"]: q["used"] for q in any_cloud.admin_client_unscoped().projects.quotas(project)}  # type: ignore[attr-defined]
        assert quota["instances"] == 0 and quota["vcpus"] == 0
        events = client.get("/v1/events", resource_id=inst["id"], limit=100)
        kinds = {e["type"] for e in events["items"]}
        assert {"instance.created", "instance.active", "instance.stop", "instance.shutoff", "instance.resize",
                "instance.resized", "instance.start", "instance.reboot", "instance.delete",
                "instance.deleted"} <= kinds, kinds
        assert client.instances.list(name=inst["name"]) == []  # type: ignore[attr-defined]
    any_cloud.admin_client_unscoped().delete(f"/v1/hosts/{host}")


def test_other_projects_instances_are_404(any_cloud: Cloud) -> None:
    client = project_client(any_cloud)
    zone = "FRA1-a"
    host = unique("ten")
    register_host(any_cloud, host, zone, vcpus=2, memory_mb=4096, disk_gb=100)
    inst = client.instances.create(unique("mine"), flavor="VPS-NANO", image=client.image_id, zone=zone)  # type: ignore[attr-defined]
    try:
        other = project_client(any_cloud)
        for call in (lambda: other.instances.get(inst["id"]), lambda: other.instances.stop(inst["id"]),  # type: ignore[attr-defined]
                     lambda: other.instances.delete(inst["id"])):  # type: ignore[attr-defined]
            with pytest.raises(ApiError) as err:
                call()
            assert err.value.status == 404
        with pytest.raises(ApiError) as err:  # BUILDING with a task running
            client.instances.reboot(inst["id"])  # type: ignore[attr-defined]
        assert err.value.status == 409
    finally:
        cleanup(any_cloud, client, zone, [f"{host}:2:4096:100"], [inst["id"]])
