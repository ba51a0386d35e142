"""The S3 endpoint served by several processes: each serves, none keeps a stale view of a setting another
changed, and an acknowledged PUT survives the SIGKILL of the process that answered it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from hackboot.core.config import Settings
from tests.integration.objectstore.conftest import S3Server, new_name, server_env

FRESH = 24  # requests, each on a new connection: the kernel spreads them over the processes


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _fresh_client(srv: S3Server, who: str = "") -> Any:
    """A boto3 client whose every request opens a new connection (no keep-alive pool reuse)."""
    return srv.client(who, max_pool_connections=1, tcp_keepalive=False)


def test_the_default_worker_count_serves(s3server: S3Server, s3: Any, bucket: str) -> None:
    pids = s3server.pids()
    assert len(pids) == Settings().s3_workers >= 2  # one per core (the test machines have 2)
    before = {pid: _cpu_ticks(pid) for pid in pids}
    body = os.urandom(256 * 1024)  # hashing it costs CPU time wherever it lands

    def put(n: int) -> None:
        url = s3.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": f"spread/{n}"})
        for i in range(6):
            assert httpx.put(url, content=body, headers={"connection": "close"}).status_code == 200, i

    threads = [threading.Thread(target=put, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [pid for pid in pids if _cpu_ticks(pid) - before[pid] > 0]
    assert len(busy) == len(pids), f"processes that served nothing: {set(pids) - set(busy)}"


def _versioned_put_ids(srv: S3Server, bucket: str, key: str) -> list[str]:
    ids = []
    for _ in range(FRESH):
        url = srv.client().generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": key})
        r = httpx.put(url, content=b"x", headers={"connection": "close"})
        assert r.status_code == 200, r.text
        ids.append(r.headers.get("x-amz-version-id", "<none>"))
    return ids


def test_a_bucket_setting_changed_in_one_process_holds_in_all_at_once(s3server: S3Server, s3: Any) -> None:
    bucket = new_name()
    s3.create_bucket(Bucket=bucket)
    # every process caches the bucket (unversioned) ...
    assert set(_versioned_put_ids(s3server, bucket, "k")) == {"<none>"}
    # ... then one of them turns versioning on: the very next request to any process sees it
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    ids = _versioned_put_ids(s3server, bucket, "k")
    assert "<none>" not in ids and "null" not in ids and len(set(ids)) == FRESH
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    assert set(_versioned_put_ids(s3server, bucket, "k")) == {"null"}


def test_a_deleted_bucket_is_gone_from_every_process(s3server: S3Server, s3: Any) -> None:
    bucket = new_name()
    s3.create_bucket(Bucket=bucket)
    for _ in range(FRESH):
        assert _fresh_client(s3server).head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    s3.delete_bucket(Bucket=bucket)
    for _ in range(FRESH):  # HEAD answers from the bucket as cached: a stale process would say 200
        url = s3server.client().generate_presigned_url("head_bucket", Params={"Bucket": bucket})
        assert httpx.head(url, headers={"connection": "close"}).status_code == 404


def test_a_policy_granted_in_one_process_is_revoked_in_all(s3server: S3Server, s3: Any) -> None:
    """Another project's read, allowed by a bucket policy, ends for every process when the policy goes."""
    bucket = new_name()
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="doc", Body=b"secret")
    other = s3server.creds["other_project_id"]
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{other}:root"}, "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{bucket}/*"}]}))
    for _ in range(FRESH):
        url = s3server.client("2").generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "doc"})
        assert httpx.get(url, headers={"connection": "close"}).status_code == 200
    s3.delete_bucket_policy(Bucket=bucket)
    for _ in range(FRESH):
        url = s3server.client("2").generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "doc"})
        r = httpx.get(url, headers={"connection": "close"})
        assert r.status_code == 403 and "<Code>AccessDenied</Code>" in r.text, r.text


def _content(key: str, size: int) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@pytest.mark.timeout(300)
def test_sigkill_of_one_worker_keeps_every_acknowledged_put(tmp_path: Path) -> None:
    srv = S3Server(tmp_path / "state", server_env(tmp_path / "state"))
    srv.provision()
    srv.start()
    try:
        srv.client().create_bucket(Bucket="crash")
        victim = srv.pids()[1]  # a forked S3 process, not the one running the background work
        acked: dict[str, int] = {}
        failures: list[str] = []
        stop = threading.Event()
        sizes = [1_000, 80_000, 700_000]

        def uploader(n: int) -> None:
            client = srv.client(connect_timeout=2, read_timeout=20)
            i = 0
            while not stop.is_set():
                key, size = f"w{n}/obj-{i}", sizes[(n + i) % len(sizes)]
                i += 1
                try:
                    client.put_object(Bucket="crash", Key=key, Body=_content(key, size))
                except Exception as exc:  # the killed process's connections break: keep going elsewhere
                    failures.append(f"{key}: {type(exc).__name__}")
                    client = srv.client(connect_timeout=2, read_timeout=20)
                    continue
                acked[key] = size

        threads = [threading.Thread(target=uploader, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        before_kill = len(acked)
        os.kill(victim, signal.SIGKILL)
        time.sleep(3.0)  # the other processes go on serving the same port
        stop.set()
        for t in threads:
            t.join(60)
        assert before_kill > 10, "too few uploads before the kill to test anything"
        assert len(acked) > before_kill + 10, f"uploads stopped after the kill ({failures[:5]})"
        s3 = srv.client()
        for key, size in acked.items():
            assert s3.get_object(Bucket="crash", Key=key)["Body"].read() == _content(key, size), key
    finally:
        srv.stop()
    srv.start()  # a restart cleans what the killed process left half done
    try:
        s3 = srv.client()
        for key, size in acked.items():
            assert s3.get_object(Bucket="crash", Key=key)["Body"].read() == _content(key, size), key
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket="crash")
        for o in (o for p in pages for o in p.get("Contents", [])):  # nothing partial is listed
            assert s3.get_object(Bucket="crash", Key=o["Key"])["Body"].read() == _content(o["Key"], o["Size"])
        assert not list((srv.state_dir / "objects" / "tmp").iterdir())
        db = sqlite3.connect(srv.state_dir / "hackboot.db")
        known = {r[0] for r in db.execute("SELECT id FROM s3_blobs")}
        db.close()
        on_disk = {p.name for p in (srv.state_dir / "objects" / "blobs").glob("*/*")}
        assert on_disk <= known, f"orphan blobs left: {len(on_disk - known)}"
    finally:
        srv.stop()

