"""The image store's validation rules, on real images made with qemu-img (no server, no database)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hackboot.images import store
from hackboot.images.store import (
    ChecksumMismatch,
    ImageRejected,
    ImageStore,
    ImageTooLarge,
    Limits,
    sniff_format,
    validate,
)

MiB = 1024 * 1024
LIMITS = Limits(max_bytes=64 * MiB, max_virtual_bytes=1024 * MiB)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed")


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


def random_raw(path: Path, size: int = 3 * MiB) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def good_qcow2(tmp: Path, name: str = "good.qcow2") -> Path:
    raw = random_raw(tmp / f"{name}.src")
    out = tmp / name
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


def test_good_qcow2_and_raw_are_accepted(tmp_path: Path) -> None:
    assert validate(good_qcow2(tmp_path), "qcow2", LIMITS) == 3 * MiB
    assert validate(random_raw(tmp_path / "disk.raw"), "raw", LIMITS) == 3 * MiB
    sparse = tmp_path / "empty-disk.qcow2"
    qemu_img("create", "-f", "qcow2", sparse, "512M")
    assert validate(sparse, "qcow2", LIMITS) == 512 * MiB


def test_qcow2_v2_is_accepted(tmp_path: Path) -> None:
    old = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", old, "16M")
    assert validate(old, "qcow2", LIMITS) == 16 * MiB


def test_backing_file_pointing_at_a_host_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "steal.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", bad, "1M")
    with pytest.raises(ImageRejected) as err:
        validate(bad, "qcow2", LIMITS)
    assert err.value.code == "image_backing_file"
    assert "backing file" in err.value.reason


def test_backing_file_without_format_is_refused(tmp_path: Path) -> None:
    base = good_qcow2(tmp_path, "base.qcow2")
    bad = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", bad)
    with pytest.raises(ImageRejected) as err:
        validate(bad, "qcow2", LIMITS)
    assert err.value.code == "image_backing_file"


def test_external_data_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "datafile.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'},data_file_raw=on", bad, "1M")
    with pytest.raises(ImageRejected) as err:
        validate(bad, "qcow2", LIMITS)
    assert err.value.code == "image_data_file"


def test_qemu_img_info_layer_alone_refuses_backing_and_data_files(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: without the header parser, the qemu-img info checks still refuse them."""
    monkeypatch.setattr(store, "check_qcow2_header", lambda path, **kw: None)
    backing = tmp_path / "steal.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", backing, "1M")
    data = tmp_path / "datafile.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}", data, "1M")
    for bad, code in ((backing, "image_backing_file"), (data, "image_data_file")):
        with pytest.raises(ImageRejected) as err:
            validate(bad, "qcow2", LIMITS)
        assert err.value.code == code


def test_raw_declared_as_qcow2_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as err:
        validate(random_raw(tmp_path / "disk.img"), "qcow2", LIMITS)
    assert err.value.code == "image_format_mismatch"
    assert "not a qcow2 image" in err.value.reason


def test_qcow2_declared_as_raw_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageRejected) as err:
        validate(good_qcow2(tmp_path), "raw", LIMITS)
    assert err.value.code == "image_format_mismatch"
    assert "qcow2" in err.value.reason


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", "vhdx", "vpc", "qed"])
def test_other_formats_declared_as_raw_are_refused(tmp_path: Path, fmt: str) -> None:
    other = tmp_path / f"disk.{fmt}"
    qemu_img("create", "-f", fmt, other, "8M")
    assert sniff_format(other) == fmt
    with pytest.raises(ImageRejected) as err:
        validate(other, "raw", LIMITS)
    assert err.value.code == "image_format_mismatch"


def test_truncated_qcow2_is_refused(tmp_path: Path) -> None:
    image = good_qcow2(tmp_path)
    with image.open("r+b") as f:
        f.truncate(image.stat().st_size // 3)
    with pytest.raises(ImageRejected) as err:
        validate(image, "qcow2", LIMITS)
    assert err.value.code == "image_corrupt"


def test_qcow2_marked_corrupt_or_dirty_is_refused(tmp_path: Path) -> None:
    for bit in (1, 0):  # corrupt, dirty
        image = good_qcow2(tmp_path, f"flag{bit}.qcow2")
        with image.open("r+b") as f:
            f.seek(72)
            features = struct.unpack(">Q", f.read(8))[0]
            f.seek(72)
            f.write(struct.pack(">Q", features | (1 << bit)))
        with pytest.raises(ImageRejected) as err:
            validate(image, "qcow2", LIMITS)
        assert err.value.code == "image_corrupt"


def test_qcow2_with_garbage_tables_is_refused(tmp_path: Path) -> None:
    image = good_qcow2(tmp_path)
    with image.open("r+b") as f:
        f.seek(40)  # l1_table_offset: point it past the end of the file
        f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(ImageRejected):
        validate(image, "qcow2", LIMITS)


def test_empty_and_oversized_images_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.raw"
    empty.touch()
    with pytest.raises(ImageRejected, match="empty"):
        validate(empty, "raw", LIMITS)
    huge = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", huge, "2G")  # virtual size over the 1 GiB limit
    with pytest.raises(ImageTooLarge):
        validate(huge, "qcow2", LIMITS)
    with pytest.raises(ImageRejected):
        validate(good_qcow2(tmp_path), "vmdk", LIMITS)


def test_qemu_img_is_always_called_with_an_explicit_format(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = store.run_qemu_img

    def spy(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return real(args, **kw)

    monkeypatch.setattr(store, "run_qemu_img", spy)
    validate(good_qcow2(tmp_path), "qcow2", LIMITS)
    validate(random_raw(tmp_path / "d.raw"), "raw", LIMITS)
    assert [c[0] for c in calls] == ["info", "check", "info"]
    for args in calls:
        assert "-U" not in args and "--force-share" not in args  # the tool works on a file nobody else has
        opts = json.loads(args[-1].removeprefix("json:"))
        assert opts["driver"] in ("qcow2", "raw") and "/" not in opts["file"]["filename"]
        if opts["driver"] == "qcow2":
            assert opts["backing"] is None  # a backing file named by the header is never opened


# --- streaming into the store ------------------------------------------------------------------------

def test_partial_upload_hashes_on_the_fly_writes_holes_and_publishes_atomically(tmp_path: Path) -> None:
    st = ImageStore(tmp_path / "images", LIMITS)
    payload = os.urandom(MiB) + bytes(8 * MiB) + os.urandom(4096)  # a raw disk with a large hole
    upload = st.begin_upload("img-test.raw", "raw")
    for i in range(0, len(payload), 300_000):
        upload.write(payload[i:i + 300_000])
    assert not st.path("img-test.raw").exists()  # nothing visible before finish
    info = upload.finish(hashlib.sha256(payload).hexdigest())
    final = st.path("img-test.raw")
    assert final.read_bytes() == payload
    assert info.sha256 == hashlib.sha256(payload).hexdigest()
    assert info.size_bytes == info.virtual_size_bytes == len(payload)
    assert final.stat().st_blocks * 512 < 4 * MiB  # the zeros became holes
    assert list((tmp_path / "images" / ".tmp").iterdir()) == []


def test_checksum_mismatch_keeps_nothing(tmp_path: Path) -> None:
    st = ImageStore(tmp_path / "images", LIMITS)
    upload = st.begin_upload("img-x.raw", "raw")
    upload.write(os.urandom(MiB))
    with pytest.raises(ChecksumMismatch):
        upload.finish("0" * 64)
    assert not st.path("img-x.raw").exists()
    assert list(st.tmp.iterdir()) == []


def test_refused_upload_keeps_nothing_and_size_limit_applies_while_streaming(tmp_path: Path) -> None:
    st = ImageStore(tmp_path / "images", Limits(max_bytes=2 * MiB, max_virtual_bytes=LIMITS.max_virtual_bytes))
    upload = st.begin_upload("img-q.qcow2", "qcow2")
    upload.write(os.urandom(MiB))  # raw bytes declared qcow2
    with pytest.raises(ImageRejected):
        upload.finish()
    assert list(st.tmp.iterdir()) == [] and not st.path("img-q.qcow2").exists()
    big = st.begin_upload("img-big.raw", "raw")
    big.write(os.urandom(MiB))
    big.write(os.urandom(MiB))
    with pytest.raises(ImageTooLarge):
        big.write(b"x")
    big.abort()
    assert list(st.tmp.iterdir()) == []


def test_import_file_links_or_moves_and_validates(tmp_path: Path) -> None:
    st = ImageStore(tmp_path / "images", LIMITS)
    src = good_qcow2(tmp_path)
    info = st.import_file(src, "img-a.abc.qcow2", "qcow2", move=False)
    assert src.exists() and st.path("img-a.abc.qcow2").samefile(src)  # hard link, source kept
    assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    moved = good_qcow2(tmp_path, "snap.qcow2")
    st.import_file(moved, "img-b.qcow2", "qcow2", move=True)
    assert not moved.exists() and st.path("img-b.qcow2").is_file()
    bad = tmp_path / "bad.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", bad, "1M")
    with pytest.raises(ImageRejected):
        st.import_file(bad, "img-c.qcow2", "qcow2", move=False)
    assert bad.exists() and not st.path("img-c.qcow2").exists()
    with pytest.raises(ChecksumMismatch):
        st.import_file(src, "img-d.qcow2", "qcow2", move=False, expected_sha256="1" * 64)
    assert list(st.tmp.iterdir()) == []


def test_store_paths_are_absolute_and_confined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    st = ImageStore(Path("var/images"))
    assert st.path("img-1.qcow2").is_absolute()
    for bad in ("../x", "a/b", ".tmp"):
        with pytest.raises(ValueError):
            st.path(bad)


# --- built-in image manifests --------------------------------------------------------------------------

def test_read_manifest_resolves_relative_and_absolute_paths(tmp_path: Path) -> None:
    from hackboot.images.service import read_manifest

    folder = tmp_path / "builtin"
    folder.mkdir()
    good_qcow2(folder, "tiny.qcow2")
    (folder / "tiny.vmlinuz").write_bytes(b"kernel")
    (tmp_path / "tiny.initrd").write_bytes(b"initrd")
    manifest = folder / "tiny.json"
    manifest.write_text(json.dumps({
        "name": "tiny", "os": "busybox", "version": "1.35.0", "kernel": "tiny.vmlinuz",
        "initrd": str(tmp_path / "tiny.initrd"), "cmdline": "root=/dev/vda console=ttyS0",
        "disk_format": "qcow2", "min_disk_gb": 1, "min_ram_mb": 128, "sha256": "A" * 64}))
    m = read_manifest(manifest)
    assert m.disk == (folder / "tiny.qcow2").resolve() and m.kernel == (folder / "tiny.vmlinuz").resolve()
    assert m.initrd == (tmp_path / "tiny.initrd").resolve()
    assert (m.os, m.os_version, m.min_disk_gb, m.min_ram_mb, m.sha256) == ("busybox", "1.35.0", 1, 128, "a" * 64)
    manifest.write_text(json.dumps({"name": "tiny", "kernel": "missing.vmlinuz"}))
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({"name": "../etc"}))
    with pytest.raises(ValueError, match="invalid image name"):
        read_manifest(manifest)


# --- the same rule for the layers of a volume backup ---------------------------------------------------

def test_backup_layer_may_name_a_backing_file_but_never_a_data_file(tmp_path: Path) -> None:
    base = good_qcow2(tmp_path, "base.qcow2")
    overlay = tmp_path / "f-top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay)
    assert validate(overlay, "qcow2", LIMITS, layer=True) == 3 * MiB  # the chain is assembled by the restore
    with pytest.raises(ImageRejected) as err:
        validate(overlay, "qcow2", LIMITS)  # an image upload still may not
    assert err.value.code == "image_backing_file"
    data = tmp_path / "datafile.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'},data_file_raw=on", data, "1M")
    with pytest.raises(ImageRejected) as err:
        validate(data, "qcow2", LIMITS, layer=True)
    assert err.value.code == "image_data_file"
    with pytest.raises(ImageTooLarge):
        validate(base, "qcow2", Limits(max_bytes=64 * MiB, max_virtual_bytes=2 * MiB), layer=True)


def test_encrypted_layer_needs_luks_and_its_key(tmp_path: Path) -> None:
    key = "k" * 43
    luks = tmp_path / "luks.qcow2"
    for _attempt in range(5):
        # QEMU calibrates PBKDF2 on the thread's CPU time and gives up ("Unable to get accurate CPU usage")
        # when the clock's granularity shows 0 ms: a measurement hazard, retried as volumes/storage.py does.
        made = subprocess.run(["qemu-img", "create", "-q", "--object", f"secret,id=s0,data={key}", "-f", "qcow2",
                               "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", str(luks),
                               "4M"], capture_output=True, text=True, check=False)
        if made.returncode == 0 or "accurate CPU usage" not in made.stderr:
            break
    assert made.returncode == 0, made.stderr
    assert validate(luks, "qcow2", LIMITS, layer=True, encrypted=True, key=key) == 4 * MiB
    with pytest.raises(ImageRejected) as err:
        validate(luks, "qcow2", LIMITS, layer=True)  # not expected to be encrypted
    assert err.value.code == "image_encrypted"
    with pytest.raises(ImageRejected):
        validate(luks, "qcow2", LIMITS, layer=True, encrypted=True, key="wrong" * 8)
    with pytest.raises(ImageRejected) as err:
        validate(good_qcow2(tmp_path), "qcow2", LIMITS, layer=True, encrypted=True, key=key)
    assert err.value.code == "image_encrypted"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to the unprivileged account")
def test_qemu_img_runs_unprivileged_and_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    from hackboot.core.privsep import unprivileged_account

    image = good_qcow2(tmp_path)
    image.chmod(0o600)
    before = image.stat()
    with store.tool_access(image) as (cwd, name):
        proc = store.run_qemu_img(["info", "--output=json", store.image_opts(name, "qcow2")], cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        # the account may read the file but not change it
        probe = subprocess.run(["sh", "-c", f"cat {name} >/dev/null && ! (echo x >> {name}) 2>/dev/null"],
                               cwd=cwd, user=unprivileged_account().uid, group=unprivileged_account().gid,
                               extra_groups=[], capture_output=True, check=False)
        assert probe.returncode == 0, probe.stderr
    # without that access, the tool (not root) cannot open the root-only file at all
    proc = store.run_qemu_img(["info", "--output=json", store.image_opts(image.name, "qcow2")], cwd=tmp_path)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr
    after = image.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tool-")] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another account")
def test_import_of_a_file_written_by_another_account_takes_a_private_copy(tmp_path: Path) -> None:
    """A snapshot written by an unprivileged QEMU: whoever holds it open cannot change what was validated."""
    from hackboot.core.privsep import unprivileged_account

    account = unprivileged_account()
    st = ImageStore(tmp_path / "images", LIMITS)
    snap = good_qcow2(tmp_path, "snap.qcow2")
    os.chown(snap, account.uid, account.gid)
    with snap.open("r+b") as writer:  # the other account's handle, kept open across the import
        st.import_file(snap, "img-s.qcow2", "qcow2", move=True)
        stored = st.path("img-s.qcow2")
        assert not snap.exists() and stored.stat().st_uid == 0
        before = stored.read_bytes()
        writer.seek(0)
        writer.write(b"\0" * 512)
        writer.flush()
        assert stored.read_bytes() == before  # a different inode
    # a link planted where the snapshot should be is refused, not followed
    other = good_qcow2(tmp_path, "other-tenant.qcow2")
    link = tmp_path / "planted.qcow2"
    link.symlink_to(other)
    with pytest.raises(ImageRejected, match="symbolic link"):
        st.import_file(link, "img-l.qcow2", "qcow2", move=True)
    assert other.exists() and not st.path("img-l.qcow2").exists()
