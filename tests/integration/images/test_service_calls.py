"""The functions compute calls (resolve_image, image_file, snapshots) and the janitor, in-process.

A real SQLite database migrated with Alembic and real qemu-img; no server process.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.core import errors
from hackboot.core.auth import Principal
from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope
from hackboot.core.migrate import upgrade
from hackboot.core.quotas import QuotaUsage
from hackboot.images import service
from hackboot.images.models import Image
from hackboot.images.store import ImageRejected

MiB = 1024 * 1024


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A migrated database in a fresh state dir; yields the default project's id."""
    from hackboot.identity.models import Project
    from hackboot.identity.service import bootstrap

    for key in ("HACKBOOT_DATABASE_URL", "HACKBOOT_BUILTIN_IMAGES_DIR", "HACKBOOT_IMAGE_MAX_BYTES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    reset_settings_cache()
    dispose_engine()
    upgrade(get_settings().effective_database_url)
    bootstrap(get_settings().state_dir)
    with session_scope(write=False) as s:
        project_id = s.query(Project.id).filter(Project.name == "default").scalar()
    yield project_id
    dispose_engine()
    reset_settings_cache()


def _admin(project_id: str) -> Principal:
    return Principal(user_id="usr-test", username="admin", token_id="tok-test", role="admin", is_superuser=True,
                     project_id=project_id)


def _qcow2(path: Path, *extra: str, size: str = "8M") -> Path:
    subprocess.run(["qemu-img", "create", "-f", "qcow2", *extra, str(path), size], check=True, capture_output=True)
    return path


def _builtin(tmp_path: Path) -> Image:
    folder = tmp_path / "builder-out"
    folder.mkdir()
    _qcow2(folder / "tiny.qcow2")
    (folder / "tiny.vmlinuz").write_bytes(b"kernel")
    (folder / "tiny.initrd").write_bytes(b"initrd")
    manifest = service.BuiltinManifest(name="tiny", disk=folder / "tiny.qcow2", disk_format="qcow2", os="busybox",
                                       kernel=folder / "tiny.vmlinuz", initrd=folder / "tiny.initrd",
                                       cmdline="root=/dev/vda", min_ram_mb=64)
    return service.register_builtin(manifest)


def _images_used(project_id: str) -> int:
    with session_scope(write=False) as s:
        row = s.get(QuotaUsage, (project_id, "images"))
        assert row is not None
        return row.used


def test_resolve_image_and_image_file(project: str, tmp_path: Path) -> None:
    tiny = _builtin(tmp_path)
    path = service.image_file(tiny)
    assert path.is_absolute() and path.is_file() and path.parent == (tmp_path / "state" / "images").resolve()
    with session_scope(write=False) as s:
        assert service.resolve_image(s, project, "tiny").id == tiny.id
        assert service.resolve_image(s, project, tiny.id).kernel_path == tiny.kernel_path
        with pytest.raises(errors.NotFound):
            service.resolve_image(s, project, "nope")
        with pytest.raises(errors.NotFound):
            service.resolve_image(s, "prj-someoneelse", "img-doesnotexist")
    queued = service.create_image(_admin(project), name="later", disk_format="raw")
    with session_scope(write=False) as s, pytest.raises(errors.NotFound) as err:
        service.resolve_image(s, project, queued.id)
    assert err.value.code == "image_not_active"
    # Boot properties point at the store's own copies, never at the builder's folder.
    assert tiny.kernel_path and Path(tiny.kernel_path).parent == path.parent
    assert tiny.initrd_path and Path(tiny.initrd_path).read_bytes() == b"initrd"


def test_snapshot_lifecycle(project: str, tmp_path: Path) -> None:
    tiny = _builtin(tmp_path)
    with session_scope() as s:
        snap = service.create_snapshot_record(s, project, "tiny", "i-123", base_image_id=tiny.id)
        assert snap.status == "saving" and snap.source == "snapshot" and snap.project_id == project
        snap_id = snap.id
    assert _images_used(project) == 1
    # What compute does: an overlay on the image, then flattened into a standalone qcow2.
    overlay = _qcow2(tmp_path / "disk.qcow2", "-b", str(service.image_file(tiny)), "-F", "qcow2")
    with pytest.raises(ImageRejected):  # an unflattened overlay names a backing file: refused
        service.finish_snapshot(snap_id, overlay)
    with session_scope(write=False) as s:
        failed = s.get(Image, snap_id)
        assert failed is not None and failed.status == "error" and "backing file" in failed.status_reason

    with session_scope() as s:
        snap2 = service.create_snapshot_record(s, project, "tiny-snap", "i-123", base_image_id=tiny.id)
        snap2_id = snap2.id
    overlay = _qcow2(tmp_path / "disk2.qcow2", "-b", str(service.image_file(tiny)), "-F", "qcow2")
    flat = tmp_path / "flat.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(overlay), str(flat)], check=True)
    done = service.finish_snapshot(snap2_id, flat)
    assert done.status == "active" and done.sha256 and done.virtual_size_bytes == 8 * MiB
    assert not flat.exists() and service.image_file(done).is_file()
    assert (done.os, done.cmdline, done.min_ram_mb) == ("busybox", "root=/dev/vda", 64)
    assert done.kernel_path == str(service.store().path(f"{snap2_id}.vmlinuz"))  # its own copy
    with pytest.raises(errors.Conflict):
        service.finish_snapshot(snap2_id, flat)
    with session_scope(write=False) as s:
        assert service.resolve_image(s, project, "tiny-snap").id == snap2_id
        # The project's failed snapshot named "tiny" does not hide the public built-in "tiny".
        assert service.resolve_image(s, project, "tiny").id == tiny.id
        with pytest.raises(errors.NotFound) as err:
            service.resolve_image(s, project, snap_id)
        assert err.value.code == "image_not_active"
    service.fail_snapshot(snap2_id, "too late")  # no effect on an active image
    with session_scope() as s, pytest.raises(errors.Conflict):  # names are unique within a project
        service.create_snapshot_record(s, project, "tiny-snap", "i-456")
    assert _images_used(project) == 2


def test_quota_claimed_by_snapshot_records(project: str) -> None:
    with session_scope() as s:
        row = s.get(QuotaUsage, (project, "images"))
        assert row is not None
        row.limit = 1
    with session_scope() as s:
        service.create_snapshot_record(s, project, "one", "i-1")
    with session_scope() as s, pytest.raises(errors.QuotaExceeded):
        service.create_snapshot_record(s, project, "two", "i-1")


def test_delete_asks_the_registered_checks_whether_the_image_is_in_use(project: str) -> None:
    admin = _admin(project)
    image = service.create_image(admin, name="busy", disk_format="raw")
    busy = {image.id}
    unregister = service.register_in_use_check(lambda session, image_id: image_id in busy)
    try:
        with pytest.raises(errors.Conflict) as err:
            service.delete_image(admin, image.id)
        assert err.value.code == "image_in_use"
        busy.clear()
        service.delete_image(admin, image.id)  # no check says it is in use any more
    finally:
        unregister()
    with session_scope(write=False) as s:
        gone = s.get(Image, image.id)
        assert gone is not None and gone.status == "deleted"


def test_compute_registers_its_check() -> None:
    from hackboot.compute import service as compute

    assert compute.image_in_use in service._in_use_checks


def test_janitor_requeues_dead_uploads_and_removes_orphans(project: str, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = _admin(project)
    image = service.create_image(admin, name="stuck", disk_format="raw")
    upload = service.begin_upload(admin, image.id, None)
    upload.write(b"\1" * 1024)
    st = service.store()
    orphan = st.path("img-00000000000000000000000000.qcow2")
    orphan.write_bytes(b"left over")
    monkeypatch.setattr(service, "STALE_UPLOAD_S", -1.0)
    monkeypatch.setattr(service, "STALE_FILE_S", -1.0)
    service.janitor_step()
    with session_scope(write=False) as s:
        row = s.get(Image, image.id)
        assert row is not None and row.status == "queued" and "interrupted" in row.status_reason
    assert not orphan.exists()
    assert list(st.tmp.iterdir()) == []  # the dead upload's partial file
    # The interrupted upload, should it wake up, fails instead of publishing anything.
    with pytest.raises((errors.ApiError, OSError)):
        upload.finish()
    with session_scope(write=False) as s:
        row = s.get(Image, image.id)
        assert row is not None and row.status == "queued" and row.file_name is None


def test_seed_reads_the_folder_named_by_the_environment(project: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    _qcow2(folder / "plain.qcow2")
    (folder / "plain.json").write_text(json.dumps({"name": "plain", "os": "debian", "version": "12",
                                                   "disk_format": "qcow2"}))
    from hackboot.core.config import reset_settings_cache

    monkeypatch.setenv("HACKBOOT_BUILTIN_IMAGES_DIR", str(folder))
    reset_settings_cache()
    try:
        service.seed()
        service.seed()
    finally:
        monkeypatch.undo()
        reset_settings_cache()
    with session_scope(write=False) as s:
        rows = list(s.query(Image).filter(Image.name == "plain"))
    assert len(rows) == 1
    plain = rows[0]
    assert (plain.status, plain.visibility, plain.project_id, plain.protected) == ("active", "public", None, True)
    assert (plain.os, plain.os_version, plain.kernel_path, plain.direct_kernel_boot) == ("debian", "12", None, False)
