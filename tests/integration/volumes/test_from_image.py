"""A volume made from an image: converted by the unprivileged qemu-img, same bytes as the image."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hackboot.sdk import Client
from tests.integration.volumes.conftest import unique
from tests.support import Cloud


def raw_digest(path: Path, fmt: str, length: int, tmp: Path) -> str:
    out = tmp / f"{path.name}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(out)], check=True,
                   capture_output=True)
    with out.open("r+b") as f:
        f.truncate(length)
    return subprocess.run(["sha256sum", str(out)], check=True, capture_output=True, text=True).stdout.split()[0]


def test_volume_from_image_has_the_images_bytes(vc: Client, vol_cloud: Cloud, tmp_path: Path) -> None:
    image = vc.images.list(name="tiny")[0]  # type: ignore[attr-defined]
    v = vc.volumes.wait(vc.volumes.create(unique("boot"), image=image["id"])["id"], timeout=300)  # type: ignore[attr-defined]
    assert v["status"] == "available" and v["bootable"], v
    pool = vol_cloud.state_dir / "agent" / "volumes"
    files = list((pool / v["id"]).glob("*.qcow2"))
    assert len(files) == 1 and files[0].stat().st_uid == 0 and files[0].stat().st_mode & 0o077 == 0
    stored = next((vol_cloud.state_dir / "images").glob(f"{image['id']}*.{image['disk_format']}"))
    size = int(image["virtual_size_bytes"])
    assert raw_digest(files[0], "qcow2", size, tmp_path) == raw_digest(stored, image["disk_format"], size, tmp_path)
    assert not list((pool / ".scratch").glob(f"*{v['id']}*"))  # the private copy is gone
    vc.volumes.delete(v["id"])  # type: ignore[attr-defined]
