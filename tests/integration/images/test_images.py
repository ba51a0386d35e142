"""Images through the SDK and the CLI against the real server: streaming, validation, tenancy, protection."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from hackboot.sdk import ApiError, Client
from tests.support import Cloud

MiB = 1024 * 1024


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _random_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    return path


def _qcow2(path: Path, *extra: str, size: str = "16M") -> Path:
    subprocess.run(["qemu-img", "create", "-f", "qcow2", *extra, str(path), size], check=True, capture_output=True)
    return path


def _member_client(cloud: Cloud) -> tuple[Client, str]:
    """A plain member (not a superuser) of a fresh project."""
    admin = cloud.admin_client_unscoped()
    project = admin.projects.create(_name("imgproj"))
    user = admin.users.create(_name("imguser"))
    admin.projects.set_member(project["id"], user["id"], "member")
    issued = admin.tokens.create(project_id=project["id"], role="member", user_id=user["id"])
    return cloud.client(issued["token"]), project["id"]


def _store_files(cloud: Cloud, image_id: str) -> list[Path]:
    root = cloud.state_dir / "images"
    found = list(root.glob(f"{image_id}*")) + list((root / ".tmp").glob(f"{image_id}*"))
    return sorted(found)


def test_upload_streams_a_64mib_file_without_growing_server_memory(cloud: Cloud, tmp_path: Path) -> None:
    assert cloud.proc is not None
    client = cloud.client()
    # Warm up first: lazily imported modules and thread pools are not what is measured.
    warm = client.images.create_from_file(_name("warm"), _random_file(tmp_path / "warm.raw", MiB), "raw")
    assert warm["status"] == "active"
    big = _random_file(tmp_path / "big.raw", 64 * MiB)
    sha = _sha256(big)
    image = client.images.create(_name("big"), "raw", os="linux")
    assert image["status"] == "queued" and image["sha256"] is None
    rss_before = _status_kib(cloud.proc.pid, "VmRSS")
    hwm_before = _status_kib(cloud.proc.pid, "VmHWM")
    seen: list[tuple[int, int]] = []
    done = client.images.upload(image["id"], big, progress=lambda d, t: seen.append((d, t)), sha256=sha)
    rss_after = _status_kib(cloud.proc.pid, "VmRSS")
    hwm_after = _status_kib(cloud.proc.pid, "VmHWM")
    assert done["status"] == "active", done
    assert done["sha256"] == sha and done["size_bytes"] == done["virtual_size_bytes"] == 64 * MiB
    assert done["min_disk_gb"] == 1
    assert seen[0] == (0, 64 * MiB) and seen[-1] == (64 * MiB, 64 * MiB) and len(seen) > 10
    # The body was streamed to disk: memory grew by far less than the file's 64 MiB.
    assert rss_after - rss_before < 24 * 1024, (rss_before, rss_after)
    assert hwm_after - hwm_before < 32 * 1024, (hwm_before, hwm_after)
    assert (cloud.state_dir / "images" / f"{image['id']}.raw").stat().st_size == 64 * MiB
    # The download streams it back intact, sha256 checked by the SDK.
    back = client.images.download(image["id"], tmp_path / "back.raw")
    assert _sha256(back) == sha
    assert client.images.get(image["id"])["status"] == "active"


def test_checksum_mismatch_is_refused_and_the_upload_can_be_retried(any_cloud: Cloud, tmp_path: Path) -> None:
    client = any_cloud.client()
    disk = _random_file(tmp_path / "disk.raw", 2 * MiB)
    image = client.images.create(_name("sum"), "raw")
    with pytest.raises(ApiError) as err:
        client.images.upload(image["id"], disk, sha256="0" * 64)
    assert err.value.status == 422 and err.value.code == "checksum_mismatch"
    after = client.images.get(image["id"])
    assert after["status"] == "queued" and "Checksum mismatch" in after["status_reason"]
    assert _store_files(any_cloud, image["id"]) == []  # the temporary data is gone
    done = client.images.upload(image["id"], disk, sha256=_sha256(disk))
    assert done["status"] == "active" and done["status_reason"] == ""


@pytest.mark.parametrize("kind, declared, code", [
    ("backing", "qcow2", "image_backing_file"),
    ("data_file", "qcow2", "image_data_file"),
    ("raw_as_qcow2", "qcow2", "image_format_mismatch"),
    ("qcow2_as_raw", "raw", "image_format_mismatch"),
    ("truncated", "qcow2", "image_corrupt"),
])
def test_dangerous_or_mislabelled_images_are_refused(cloud: Cloud, tmp_path: Path, kind: str, declared: str,
                                                     code: str) -> None:
    if kind == "backing":
        path = _qcow2(tmp_path / "steal.qcow2", "-b", "/etc/passwd", "-F", "raw", size="1M")
    elif kind == "data_file":
        path = _qcow2(tmp_path / "df.qcow2", "-o", f"data_file={tmp_path / 'host.raw'}", size="1M")
    elif kind == "raw_as_qcow2":
        path = _random_file(tmp_path / "disk.raw", MiB)
    elif kind == "qcow2_as_raw":
        path = _qcow2(tmp_path / "disk.qcow2")
    else:
        raw = _random_file(tmp_path / "full.raw", 4 * MiB)
        path = tmp_path / "cut.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 3)
    client = cloud.client()
    image = client.images.create(_name(kind.replace("_", "-")), declared)
    with pytest.raises(ApiError) as err:
        client.images.upload(image["id"], path)
    assert err.value.status == 422 and err.value.code == code, err.value
    after = client.images.get(image["id"])
    assert after["status"] == "error" and after["status_reason"] == err.value.detail
    assert _store_files(cloud, image["id"]) == []
    with pytest.raises(ApiError) as err:
        client.images.download(image["id"], tmp_path / "nothing")
    assert err.value.status == 409


def test_upload_rules(any_cloud: Cloud, tmp_path: Path) -> None:
    client = any_cloud.client()
    qcow = _qcow2(tmp_path / "ok.qcow2")
    image = client.images.create_from_file(_name("once"), qcow)
    assert image["disk_format"] == "qcow2" and image["status"] == "active" and image["virtual_size_bytes"] == 16 * MiB
    with pytest.raises(ApiError) as err:  # images are immutable
        client.images.upload(image["id"], qcow)
    assert err.value.status == 409 and err.value.code == "image_immutable"
    headers = {"Authorization": f"Bearer {any_cloud.admin_token}", "X-Hackboot-Project": any_cloud.project_id}
    queued = client.images.create(_name("ctype"), "raw")
    resp = httpx.put(f"{any_cloud.url}/v1/images/{queued['id']}/file", content=b"x" * 1024,
                     headers=headers | {"content-type": "application/json"})
    assert resp.status_code == 415 and resp.json()["code"] == "unsupported_media_type"
    resp = httpx.put(f"{any_cloud.url}/v1/images/{queued['id']}/file", content=b"x" * 1024,
                     headers=headers | {"content-type": "application/octet-stream", "x-image-sha256": "nothex"})
    assert resp.status_code == 422
    assert client.images.get(queued["id"])["status"] == "queued"
    resp = httpx.post(f"{any_cloud.url}/v1/images", json={"name": _name("bad"), "disk_format": "vmdk"},
                      headers=headers)
    assert resp.status_code == 422 and resp.json()["code"] == "validation_failed"
    with pytest.raises(ApiError) as err:
        client.images.create(image["name"], "raw")
    assert err.value.status == 409 and err.value.code == "already_exists"
    assert client.images.get(image["name"])["id"] == image["id"]  # by name too


def test_private_images_are_invisible_to_other_projects_and_public_ones_are_shared(any_cloud: Cloud,
                                                                                    tmp_path: Path) -> None:
    admin = any_cloud.client()
    image = admin.images.create_from_file(_name("priv"), _qcow2(tmp_path / "p.qcow2"), os="debian")
    member, member_project = _member_client(any_cloud)
    for call in (lambda: member.images.get(image["id"]), lambda: member.images.delete(image["id"]),
                 lambda: member.images.update(image["id"], name="stolen"),
                 lambda: member.images.download(image["id"], tmp_path / "x")):
        with pytest.raises(ApiError) as err:
            call()
        assert err.value.status == 404
    assert image["id"] not in {i["id"] for i in member.images.list()}
    # A member cannot publish; a superuser can, and then every project sees (but cannot change) it.
    mine = member.images.create_from_file(_name("mine"), _random_file(tmp_path / "m.raw", MiB), "raw")
    assert mine["project_id"] == member_project
    with pytest.raises(ApiError) as err:
        member.images.update(mine["id"], visibility="public")
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        member.images.create(_name("pub"), "raw", visibility="public")
    assert err.value.status == 403
    shared = admin.images.update(image["id"], visibility="public")
    assert shared["visibility"] == "public"
    seen = member.images.get(image["id"])
    assert seen["visibility"] == "public" and seen["os"] == "debian"
    assert image["id"] in {i["id"] for i in member.images.list(visibility="public", os="debian")}
    assert member.images.download(image["id"], tmp_path / "shared.qcow2").stat().st_size == image["size_bytes"]
    with pytest.raises(ApiError) as err:
        member.images.update(image["id"], name="mine-now")
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        member.images.delete(image["id"])
    assert err.value.status == 403
    listed = {i["id"] for i in member.images.list()}
    assert {image["id"], mine["id"]} <= listed
    admin.images.update(image["id"], visibility="private")
    with pytest.raises(ApiError) as err:
        member.images.get(image["id"])
    assert err.value.status == 404


def test_delete_protection_and_quota(any_cloud: Cloud, tmp_path: Path) -> None:
    admin = any_cloud.admin_client_unscoped()
    member, project_id = _member_client(any_cloud)

    def used() -> int:
        return next(q["used"] for q in admin.projects.quotas(project_id) if q["resource"] == "images")

    image = member.images.create_from_file(_name("keep"), _qcow2(tmp_path / "k.qcow2"), protected=True)
    assert image["protected"] is True and used() == 1
    with pytest.raises(ApiError) as err:
        member.images.delete(image["id"])
    assert err.value.status == 409 and err.value.code == "image_protected"
    assert member.images.get(image["id"])["status"] == "active"
    with pytest.raises(ApiError) as err:  # a 16 MiB disk needs at least 1 GB
        member.images.update(image["id"], min_disk_gb=0)
    assert err.value.status == 422
    assert member.images.update(image["id"], min_disk_gb=5, protected=False)["min_disk_gb"] == 5
    member.images.delete(image["id"])
    with pytest.raises(ApiError) as err:
        member.images.get(image["id"])
    assert err.value.status == 404
    assert used() == 0
    assert _store_files(any_cloud, image["id"]) == []
    admin.projects.set_quota(project_id, "images", 1)
    member.images.create(_name("one"), "raw")
    with pytest.raises(ApiError) as err:
        member.images.create(_name("two"), "raw")
    assert err.value.status == 403 and err.value.code == "quota_exceeded"


def _cli(cloud: Cloud, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HACKBOOT_")}
    env.update({"HACKBOOT_URL": cloud.url, "HACKBOOT_TOKEN": cloud.admin_token,
                "HACKBOOT_PROJECT": cloud.project_id, "HACKBOOT_CLI_CONFIG": str(tmp_path / "cli.toml"),
                "COLUMNS": "250"})
    return subprocess.run([sys.executable, "-m", "hackboot.cli.main", *args], env=env, capture_output=True, check=False,
                          text=True, timeout=120)


def test_cli_upload_list_show_download_delete(cloud: Cloud, tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "cli.qcow2")
    name = _name("cli")
    done = _cli(cloud, tmp_path, "image", "upload", name, str(disk), "--os", "alpine", "--min-ram", "128",
                "-o", "json")
    assert done.returncode == 0, done.stderr
    image: dict[str, Any] = json.loads(done.stdout)
    assert image["status"] == "active" and image["disk_format"] == "qcow2" and image["sha256"] == _sha256(disk)
    listed = _cli(cloud, tmp_path, "image", "list", "--name", name, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [i["id"] for i in json.loads(listed.stdout)] == [image["id"]]
    table = _cli(cloud, tmp_path, "image", "list")
    assert table.returncode == 0 and name in table.stdout
    shown = _cli(cloud, tmp_path, "image", "show", name, "-o", "yaml")
    assert shown.returncode == 0 and f"id: {image['id']}" in shown.stdout
    dest = tmp_path / "copy.qcow2"
    got = _cli(cloud, tmp_path, "image", "download", name, "--file", str(dest))
    assert got.returncode == 0, got.stderr
    assert _sha256(dest) == image["sha256"]
    updated = _cli(cloud, tmp_path, "image", "update", name, "--protected", "-o", "json")
    assert updated.returncode == 0 and json.loads(updated.stdout)["protected"] is True
    refused = _cli(cloud, tmp_path, "image", "delete", image["id"])
    assert refused.returncode == 5 and "protected" in refused.stderr
    # A refused upload fails with the reason and leaves no image behind.
    bad = _qcow2(tmp_path / "bad.qcow2", "-b", "/etc/passwd", "-F", "raw", size="1M")
    failed = _cli(cloud, tmp_path, "image", "upload", _name("bad"), str(bad), "--format", "qcow2")
    assert failed.returncode == 2 and "backing file" in failed.stderr
    assert _cli(cloud, tmp_path, "image", "update", name, "--unprotected").returncode == 0
    assert _cli(cloud, tmp_path, "image", "delete", name).returncode == 0
    assert json.loads(_cli(cloud, tmp_path, "image", "list", "--name", name, "-o", "json").stdout) == []


def test_an_interrupted_upload_leaves_the_image_queued_and_no_data(cloud: Cloud, tmp_path: Path) -> None:
    import socket
    import time

    client = cloud.client()
    image = client.images.create(_name("cut"), "raw")
    head = (f"PUT /v1/images/{image['id']}/file HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {cloud.admin_token}\r\nX-Hackboot-Project: {cloud.project_id}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {32 * MiB}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", cloud.api_port)) as sock:
        sock.sendall(head + os.urandom(4 * MiB))  # then stall, mid-file
        client.wait_for(lambda: client.images.get(image["id"]), lambda i: i["status"] == "saving", timeout=30)
        with pytest.raises(ApiError) as err:  # one upload at a time
            client.images.upload(image["id"], _random_file(tmp_path / "other.raw", MiB))
        assert err.value.status == 409 and err.value.code == "upload_in_progress"
        with pytest.raises(ApiError) as err:  # nor can it be deleted while its file is being written
            client.images.delete(image["id"])
        assert err.value.status == 409 and err.value.code == "image_busy"
    after = client.wait_for(lambda: client.images.get(image["id"]), lambda i: i["status"] == "queued", timeout=30)
    assert "went away" in after["status_reason"]
    deadline = time.monotonic() + 10
    while _store_files(cloud, image["id"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _store_files(cloud, image["id"]) == []
    assert client.images.upload(image["id"], _random_file(tmp_path / "again.raw", MiB))["status"] == "active"
