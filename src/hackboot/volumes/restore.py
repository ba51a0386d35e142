"""Restore of a volume backup: its layer files come back from the project's bucket, a place the tenant
can write, so they are treated as hostile until proven otherwise.

1. every object is downloaded into a private scratch directory (root, 0700; files 0600) and checked
   against the size and SHA-256 recorded in the database when the backup was made (never against
   anything stored in the bucket): a swapped object ends the restore before any tool opens it;
2. every layer then passes the image store's own validation (``images.store.validate``, the rule of
   image uploads): qcow2 declared and found, no external data file, no encryption but LUKS with the
   backup's key, virtual size within the volume's; a layer may *name* a backing file, but that name
   is never opened;
3. the chain is assembled here, in the order recorded at backup time (``json:`` with explicit
   ``backing`` nodes), and flattened by ``qemu-img convert`` into a new file, run as the unprivileged
   account under prlimit, reading the layers (group-read, never write) and writing only its output
   directory; the result is handed to root and renamed into the pool in one step.

Step 1 is this module's (:func:`restore_into`, the agent's side); steps 2 and 3 are the storage
driver's ``import_backup`` (for local qcow2 pools: :func:`flatten_layers`). A volume made from an
image goes through the same unprivileged conversion (`image_into`), from a private copy of the
store's file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hackboot.core import privsep
from hackboot.images import store
from hackboot.volumes import backups, storage
from hackboot.volumes.driver import BlockStorageDriver, Fetch, ImportLayer, NoSpace, StorageError
from hackboot.volumes.storage import Pool

GiB = 1024**3
SOURCE_SECRET = "hbsrc"
_IN, _OUT = "in", "out"


def _layers(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object of the chain, bottom first, with its member's bucket, encryption and key."""
    out = []
    for member in info["chain"]:
        if not member.get("bucket_owned", False):
            raise StorageError(f"Restore refused: bucket {member['bucket']} is no longer a bucket of this project")
        for obj in member["objects"]:
            if not obj.get("sha256") or not isinstance(obj.get("bytes"), int):
                raise StorageError(f"Restore refused: backup {member['id']} has no recorded checksum for "
                                   f"{obj.get('key')}")
            out.append({**obj, "bucket": member["bucket"], "encrypted": bool(member.get("encrypted")),
                        "layer_key": member.get("key"), "backup_id": member["id"],
                        "volume_size_gb": int(member.get("volume_size_gb") or 0)})
    if not out:
        raise StorageError("Restore refused: the backup has no layers")
    return out


def _chain_json(names: list[str], secret: str | None) -> dict[str, Any]:
    """Bottom-first file names → one qcow2 node per file, each backing onto the one below, the bottom none."""
    node: dict[str, Any] | None = None
    for name in names:
        d: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": name}, "backing": node}
        if secret:
            d["encrypt"] = {"format": "luks", "key-secret": secret}
        node = d
    assert node is not None
    return node


def _tool(args: list[str], what: str, cwd: Path, secrets: dict[str, str], size_bytes: int) -> str:
    budget = 600 + 120 * max(1, size_bytes // GiB)  # CPU seconds: generous, but not unbounded
    for attempt in range(4):
        try:
            proc = store.run_qemu_img(args, cwd=cwd, secrets=secrets, address_space=4 * GiB, cpu_seconds=budget,
                                      timeout=6 * 3600)
        except store.ImageRejected as exc:
            raise StorageError(f"{what}: {exc.reason}") from None
        if proc.returncode == 0:
            return proc.stdout
        msg = (proc.stderr or proc.stdout).strip()[-400:]
        # QEMU's LUKS PBKDF calibration measures CPU time and fails when a busy host gives it none
        if "accurate CPU usage" in msg and attempt < 3:
            time.sleep(0.2)
            continue
        if "No space left on device" in msg:
            raise NoSpace(f"{what}: No space left on device ({msg})")
        raise StorageError(f"{what}: {msg}")
    raise AssertionError("unreachable")


def _flatten(scratch: Path, inputs: list[str], source: dict[str, Any], secrets: dict[str, str], dst: Path,
             size_bytes: int, *, key: str | None, limit: int) -> None:
    """`qemu-img convert` the `source` node (over the files `inputs`, relative to `scratch`) into a new
    qcow2 at `dst`, as the unprivileged account: it may enter `scratch`, read the inputs (group read,
    never write) and write only its own outbox; the result becomes root's and is renamed into place."""
    account = privsep.unprivileged_account()
    outbox = scratch / _OUT
    outbox.mkdir(mode=0o700)
    if not account.is_current:
        for d in (scratch, scratch / _IN):
            os.chown(d, 0, account.gid)
            os.chmod(d, 0o710)
        for n in inputs:
            os.chown(scratch / n, 0, account.gid)
            os.chmod(scratch / n, 0o640)
        os.chown(outbox, account.uid, account.gid)
    out = f"{_OUT}/volume.qcow2"
    argv = ["convert", "-q", "-O", "qcow2", *(["-o", storage.LUKS_OPTS] if key is not None else []),
            "json:" + json.dumps(source), out]
    if key is not None:
        secrets = {**secrets, storage.KEY_SECRET_ID: key}
    _tool(argv, "Cannot copy into the volume", scratch, secrets, limit)
    out_opts: dict[str, Any] = {"driver": "qcow2", "file": {"driver": "file", "filename": out}}
    if key is not None:
        out_opts["encrypt"] = {"format": "luks", "key-secret": storage.KEY_SECRET_ID}
    own_key = {storage.KEY_SECRET_ID: key} if key is not None else {}
    info_out = json.loads(_tool(["info", "--output=json", "json:" + json.dumps(out_opts)],
                                "Cannot read the new volume", scratch, {}, limit))
    if int(info_out.get("virtual-size", 0)) < size_bytes:
        _tool(["resize", "-q", "json:" + json.dumps(out_opts), str(size_bytes)], "Cannot grow the volume",
              scratch, own_key, limit)
    produced = scratch / out
    st = produced.lstat()
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        raise StorageError("Cannot copy into the volume: the output is not a plain file")
    if not account.is_current:  # root's from here on, like every file of the pool
        os.chown(produced, 0, 0)
    os.chmod(produced, 0o600)
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.replace(produced, dst)


def import_layers(info: dict[str, Any]) -> list[tuple[ImportLayer, dict[str, Any]]]:
    """The backup's layers (bottom first) as the driver imports them, each with its object in the bucket."""
    return [(ImportLayer(label=f"layer {obj['key']} of backup {obj['backup_id']}", size=obj["bytes"],
                         encrypted=obj["encrypted"], key=obj["layer_key"],
                         volume_size_bytes=obj["volume_size_gb"] * GiB), obj) for obj in _layers(info)]


def bucket_fetcher(info: dict[str, Any], objects: dict[str, dict[str, Any]]) -> Fetch:
    """``fetch(layer, dest)`` for the driver: the layer's object, checked against the size and SHA-256 the
    database recorded at backup time (``objects``: layer label -> object)."""
    s3 = backups.S3(info["endpoint"], *info["credential"])

    def fetch(layer: ImportLayer, dest: Path) -> None:
        obj = objects[layer.label]
        try:
            backups.download_verified(s3, obj["bucket"], obj["key"], dest, sha256=obj["sha256"], size=obj["bytes"])
        except backups.BackupTampered as exc:
            raise StorageError(f"Restore refused: backup {obj['backup_id']} was changed in its bucket "
                               f"({exc})") from None

    return fetch


def flatten_layers(pool: Pool, rel: str, layers: Sequence[ImportLayer], size_bytes: int, *, key: str | None,
                   fetch: Fetch, work_name: str) -> None:
    """Fetch `layers` (bottom first) into a private scratch directory, validate each as a qcow2 layer and
    flatten them into the new pool file `rel` (encrypted with `key` when given)."""
    if not layers:
        raise StorageError("Restore refused: the backup has no layers")
    limit = max(size_bytes, max(layer.volume_size_bytes for layer in layers))
    with storage.scratch_dir(pool, work_name) as scratch:
        inbox = scratch / _IN
        inbox.mkdir(mode=0o700)
        names: list[str] = []
        for i, layer in enumerate(layers):
            name = f"layer-{i:03d}.qcow2"
            fetch(layer, inbox / name)
            try:
                store.validate(inbox / name, "qcow2", store.Limits(max_bytes=layer.size, max_virtual_bytes=limit),
                               layer=i > 0, encrypted=layer.encrypted, key=layer.key)
            except store.ImageRejected as exc:
                raise StorageError(f"Restore refused: {layer.label} is not an acceptable disk image: "
                                   f"{exc.reason}") from None
            names.append(f"{_IN}/{name}")
        src_key = layers[-1].key
        source = _chain_json(names, SOURCE_SECRET if src_key else None)
        _flatten(scratch, names, source, {SOURCE_SECRET: src_key} if src_key else {}, pool.path(rel), size_bytes,
                 key=key, limit=limit)


def restore_into(driver: BlockStorageDriver, volume_id: str, info: dict[str, Any], size_bytes: int, *,
                 key: str | None) -> str:
    """A new volume from the backup described by `info` (``service.backup_work``): its objects are downloaded
    and verified here, validated and flattened by the storage driver (encrypted with `key` when given).
    Returns the volume's active layer; raises StorageError with a reason for the user."""
    pairs = import_layers(info)
    fetch = bucket_fetcher(info, {layer.label: obj for layer, obj in pairs})
    return driver.import_backup(volume_id, [layer for layer, _ in pairs], size_bytes, key=key, fetch=fetch)


def image_into(pool: Pool, rel: str, image: Path, disk_format: str, size_bytes: int, *, key: str | None,
               work_name: str) -> None:
    """A new volume from a store image (tenant-uploaded, validated at upload): converted by the same
    unprivileged `qemu-img`, from a private copy (the store's file, maybe a running guest's backing file,
    is never handed to that account)."""
    if disk_format not in store.FORMATS:
        raise StorageError(f"Unsupported image format {disk_format!r}")
    with storage.scratch_dir(pool, work_name) as scratch:
        inbox = scratch / _IN
        inbox.mkdir(mode=0o700)
        copy = inbox / "image"
        try:
            shutil.copyfile(image, copy)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise NoSpace(f"Cannot copy the image: No space left on device ({exc})") from None
            raise StorageError(f"Cannot read the image: {exc.strerror}") from None
        name = f"{_IN}/image"
        limit = max(size_bytes, copy.stat().st_size)
        source = json.loads(store.image_opts(name, disk_format).removeprefix("json:"))
        _flatten(scratch, [name], source, {}, pool.path(rel), size_bytes, key=key, limit=limit)
