"""Finding 11 (S3 side): with the state directory full, S3 PUT *and DELETE* answered 500 and tenants could
not free space. Now: writes are refused with 507 InsufficientStorage before anything is written, ENOSPC
in the middle of a write is a 507 with the partial data removed, deletes (object, multi-delete, abort
multipart) still commit (a reserve file is released for the metadata), and the service recovers alone.

A dedicated cloud runs in a private mount namespace whose state directory is a small tmpfs (the test's
own mounts are untouched; the mount goes away with the process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from hackboot.sdk import Client
from tests.security._s3 import boto, bucket_name, raw_exchange, s3_key, sign_unsigned_payload, status_of
from tests.security.conftest import make_tenant
from tests.support import Cloud, make_cloud, wait_http

MiB = 1024 * 1024
TMPFS_SIZE = 96 * MiB
MIN_FREE = 8 * MiB
RESERVE = 4 * MiB


@pytest.fixture(scope="module")
def small_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    base = tmp_path_factory.mktemp("diskfull")
    state = base / "state"
    c = make_cloud(state, HACKBOOT_MIN_FREE_BYTES=str(MIN_FREE), HACKBOOT_DISK_RESERVE_BYTES=str(RESERVE),
                   HACKBOOT_RUN_LOCAL_AGENT="false")
    c.log_path = base / "server.log"
    script = 'mount -t tmpfs -o size="$1",mode=0700 tmpfs "$2" && exec "$3" -m hackboot.cli.main serve'
    with open(c.log_path, "ab") as log:
        c.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                                   str(TMPFS_SIZE), str(state), sys.executable], env=c.env, cwd=base,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(c.url + "/readyz", 90, c.proc)
        c.admin_password = inside(c, "initial-admin-password").read_text().strip()
        with Client(c.url) as anon:
            issued = anon.auth.login("admin", c.admin_password)  # type: ignore[attr-defined]
        c.admin_token = issued["token"]
        yield c
    finally:
        c.stop()


def inside(c: Cloud, name: str) -> Path:
    """A path of the cloud's state directory as its own mount namespace sees it."""
    assert c.proc is not None
    return Path(f"/proc/{c.proc.pid}/root") / str(c.state_dir).lstrip("/") / name


def free(c: Cloud) -> int:
    st = os.statvfs(inside(c, "."))
    return st.f_bavail * st.f_frsize


def code(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    return str(exc.value.response["Error"]["Code"]), int(exc.value.response["ResponseMetadata"]["HTTPStatusCode"])


def fill(c: Cloud, name: str) -> None:
    """Another consumer of the same disk takes every byte left."""
    fd = os.open(inside(c, name), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (MiB, 4096):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_disk_full_s3(small_cloud: Cloud) -> None:
    c = small_cloud
    tenant = make_tenant(c)
    key = s3_key(tenant)
    s3 = boto(c, key)
    bucket = bucket_name("full")
    s3.create_bucket(Bucket=bucket)
    assert inside(c, "disk-reserve").exists()

    up = s3.create_multipart_upload(Bucket=bucket, Key="mp.bin")
    s3.upload_part(Bucket=bucket, Key="mp.bin", UploadId=up["UploadId"], PartNumber=1, Body=b"p" * (5 * MiB))

    # Tenants fill the disk: refused with 507 before the write once too little would be left.
    stored: list[str] = []
    with pytest.raises(ClientError) as exc:
        for i in range(40):
            s3.put_object(Bucket=bucket, Key=f"big-{i}", Body=os.urandom(8 * MiB))
            stored.append(f"big-{i}")
    assert code(exc) == ("InsufficientStorage", 507)
    assert len(stored) >= 4

    # Now something else takes the last byte: the disk is completely full.
    fill(c, "filler")
    assert free(c) < MiB
    for body in (b"tiny", os.urandom(MiB)):
        with pytest.raises(ClientError) as exc:
            s3.put_object(Bucket=bucket, Key="more", Body=body)
        assert code(exc) == ("InsufficientStorage", 507)
    with pytest.raises(ClientError) as exc:
        s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": stored[0]})
    assert code(exc) == ("InsufficientStorage", 507)

    # Deletes still work on the full disk, so tenants can free space themselves.
    s3.delete_object(Bucket=bucket, Key=stored.pop())
    out = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": stored.pop()}, {"Key": stored.pop()}]})
    assert len(out.get("Deleted", [])) == 2 and not out.get("Errors")
    s3.abort_multipart_upload(Bucket=bucket, Key="mp.bin", UploadId=up["UploadId"])
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert listed == set(stored)

    # The freed space serves writes again, with no operator, and the reserve comes back.
    deadline = time.monotonic() + 20
    while not inside(c, "disk-reserve").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert inside(c, "disk-reserve").exists()
    time.sleep(1.2)  # free-space readings are cached for a second
    s3.put_object(Bucket=bucket, Key="after", Body=b"back in business")
    assert s3.get_object(Bucket=bucket, Key="after")["Body"].read() == b"back in business"

    # A body of unknown length that outgrows the disk: ENOSPC mid-write is a 507, and nothing is left behind.
    before = free(c)
    path = f"/{bucket}/streamed.bin"
    headers = sign_unsigned_payload(c, key, "PUT", path, {"transfer-encoding": "chunked"})
    head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    piece = b"%x\r\n" % MiB + b"z" * MiB + b"\r\n"
    answer, sent = raw_exchange(c.s3_port, head.encode(), iter([piece] * ((before // MiB) + 16)))
    assert status_of(answer) == 507 and b"InsufficientStorage" in answer, answer[:400]
    assert sent < before + 16 * MiB
    time.sleep(0.5)
    assert not [p for p in os.listdir(inside(c, "objects/tmp")) if p.endswith(".part")]
    assert free(c) >= before - MiB
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="streamed.bin")
    s3.put_object(Bucket=bucket, Key="after-2", Body=b"still fine")


