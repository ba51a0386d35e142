"""Built-in images: registered at start from the builder's manifests, public, protected, idempotent."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from hackboot.sdk import ApiError
from tests.support import make_cloud

MiB = 1024 * 1024


def _build_fake_tiny(folder: Path, content: bytes) -> str:
    """What the guest image builder leaves behind: a qcow2, a kernel, an initrd and the manifest."""
    raw = folder / "tiny.raw.src"
    raw.write_bytes(content)
    disk = folder / "tiny.qcow2"
    disk.unlink(missing_ok=True)  # like the builder: a new file replaces the old one
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], check=True)
    raw.unlink()
    sha = hashlib.sha256(disk.read_bytes()).hexdigest()
    (folder / "tiny.vmlinuz").write_bytes(b"not really a kernel " + content[:16])
    (folder / "tiny.initrd").write_bytes(b"not really an initrd")
    (folder / "tiny.json").write_text(json.dumps({
        "name": "tiny", "os": "busybox", "version": "1.35.0", "kernel": "tiny.vmlinuz", "initrd": "tiny.initrd",
        "cmdline": "root=/dev/vda console=ttyS0 quiet", "disk": "tiny.qcow2", "disk_format": "qcow2",
        "min_disk_gb": 1, "min_ram_mb": 128, "sha256": sha, "builder_version": "test-1"}))
    return sha


def test_builtin_images_are_seeded_public_active_and_idempotently(tmp_path: Path) -> None:
    state = tmp_path / "seeded"
    builtin = state / "images" / "builtin"
    builtin.mkdir(parents=True)
    sha1 = _build_fake_tiny(builtin, os.urandom(2 * MiB))
    (builtin / "broken.json").write_text(json.dumps({"name": "broken", "disk": "missing.qcow2"}))
    cloud = make_cloud(state, HACKBOOT_RUN_LOCAL_AGENT="false", HACKBOOT_IMAGE_MAX_BYTES=str(4 * MiB))
    cloud.start()
    try:
        client = cloud.client()
        images = client.images.list(name="tiny")
        assert len(images) == 1
        tiny = images[0]
        assert (tiny["status"], tiny["visibility"], tiny["project_id"], tiny["source"]) == \
            ("active", "public", None, "builtin")
        assert tiny["protected"] and tiny["direct_kernel_boot"] and tiny["sha256"] == sha1
        assert (tiny["os"], tiny["os_version"], tiny["min_ram_mb"], tiny["min_disk_gb"]) == \
            ("busybox", "1.35.0", 128, 1)
        assert tiny["cmdline"] == "root=/dev/vda console=ttyS0 quiet"
        assert client.images.list(name="broken") == []  # a bad manifest is skipped, the cloud starts
        assert "broken.json" in cloud.log()
        stored = sorted(p.name for p in (state / "images").glob(f"{tiny['id']}*"))
        assert stored == [f"{tiny['id']}.{sha1[:12]}.{ext}" for ext in ("initrd", "qcow2", "vmlinuz")]
        # Every project sees it, nobody but a superuser may change it, and it is protected.
        admin = cloud.admin_client_unscoped()
        project = admin.projects.create("other")
        other = cloud.client(project=project["id"])
        assert other.images.get("tiny")["id"] == tiny["id"]
        with pytest.raises(ApiError) as err:
            client.images.delete(tiny["id"])
        assert err.value.status == 409 and err.value.code == "image_protected"
        # The configured size limit applies to uploads (HACKBOOT_IMAGE_MAX_BYTES).
        big = tmp_path / "big.raw"
        big.write_bytes(os.urandom(5 * MiB))
        queued = client.images.create("too-big", "raw")
        with pytest.raises(ApiError) as err:
            client.images.upload(queued["id"], big)
        assert err.value.status == 413 and err.value.code == "image_too_large"
        assert client.images.get(queued["id"])["status"] == "queued"

        # A restart with the same manifest changes nothing.
        cloud.stop()
        cloud.start()
        client = cloud.client()
        again = client.images.list(name="tiny")
        assert [(i["id"], i["sha256"], i["updated_at"]) for i in again] == \
            [(tiny["id"], sha1, tiny["updated_at"])]

        # A rebuilt image (new sha256) is re-registered in place: same id, new file, no duplicate.
        cloud.stop()
        sha2 = _build_fake_tiny(builtin, os.urandom(3 * MiB))
        cloud.start()
        client = cloud.client()
        rebuilt = client.images.list(name="tiny")
        assert len(rebuilt) == 1 and rebuilt[0]["id"] == tiny["id"]
        assert rebuilt[0]["sha256"] == sha2 and rebuilt[0]["virtual_size_bytes"] == 3 * MiB
        assert (state / "images" / f"{tiny['id']}.{sha2[:12]}.qcow2").is_file()
        downloaded = client.images.download(tiny["id"], tmp_path / "tiny.qcow2")
        assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == sha2
    finally:
        cloud.stop()
