"""Finding 2: volume backups must land only in a bucket of the backing-up project.

Bucket names are global: another project can create a bucket first (``backups``, or any name a victim
may use) with a policy admitting everyone, and would then receive the victim's backups, or hand back
objects of its choosing at restore. Backups and restores must check the bucket's owner, and the
default bucket must be the project's own ``hb-backups-<project id>``, made by the service.
"""

from __future__ import annotations

import json
import time
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from hackboot.sdk import ApiError
from tests.security.conftest import Tenant, make_tenant, unique
from tests.support import Cloud


def s3_client(cloud: Cloud, tenant: Tenant) -> Any:
    issued = tenant.client.post("/v1/s3/credentials", {"name": unique("k")})
    return boto3.client("s3", endpoint_url=cloud.s3_url, aws_access_key_id=issued["access_key"],
                        aws_secret_access_key=issued["secret_key"], region_name="PAR1",
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def open_trap(cloud: Cloud, attacker: Tenant, name: str) -> Any:
    """The attacker's bucket `name`, with a policy letting anyone read and write it."""
    attacker.client.put("/v1/s3/public-access-block", {"block_public_access": False})
    s3 = s3_client(cloud, attacker)
    s3.create_bucket(Bucket=name)
    s3.put_bucket_policy(Bucket=name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}]}))
    return s3


def wait_volume(tenant: Tenant, volume_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        v = tenant.client.volumes.get(volume_id)  # type: ignore[attr-defined]
        if v["status"] in ("available", "error") and not v.get("task_state"):
            return v  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, v
        time.sleep(0.3)


def keys(s3: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture
def attacker(cloud: Cloud) -> Tenant:
    return make_tenant(cloud, "admin")  # the admin of its own project: it may open its buckets to everyone


def test_backups_go_only_to_the_projects_own_buckets(cloud: Cloud, attacker: Tenant) -> None:
    victim = make_tenant(cloud, "member")
    trap = unique("backups")
    a_s3 = open_trap(cloud, attacker, trap)
    # the trap really is open to the victim's keys: what the checks below guard against is real
    v_s3 = s3_client(cloud, victim)
    v_s3.put_object(Bucket=trap, Key="probe", Body=b"x")
    a_s3.delete_object(Bucket=trap, Key="probe")

    c = victim.client
    v = wait_volume(victim, c.volumes.create(unique("data"), 1)["id"])  # type: ignore[attr-defined]
    with pytest.raises(ApiError) as err:
        c.volume_backups.create(v["id"], bucket=trap)  # type: ignore[attr-defined]
    assert err.value.status == 404, err.value
    with pytest.raises(ApiError) as err:
        c.backup_policies.create(unique("pol"), bucket=trap)  # type: ignore[attr-defined]
    assert err.value.status == 404, err.value
    assert keys(a_s3, trap) == [] and c.volume_backups.list(volume=v["id"]) == []  # type: ignore[attr-defined]

    # the default bucket is the project's own, made by the service
    b = c.volume_backups.wait(c.volume_backups.create(v["id"])["id"], timeout=180)  # type: ignore[attr-defined]
    assert b["status"] == "available" and b["bucket"] == f"hb-backups-{victim.project_id}", b
    assert all(o["key"] in keys(v_s3, b["bucket"]) for o in b["objects"])
    with pytest.raises(ClientError):
        a_s3.list_objects_v2(Bucket=b["bucket"])

    # an attacker who squats a project's default name gets nothing either: that project's backups are refused
    squatted = make_tenant(cloud, "member")
    open_trap(cloud, attacker, f"hb-backups-{squatted.project_id}")
    sv = wait_volume(squatted, squatted.client.volumes.create(unique("data"), 1)["id"])  # type: ignore[attr-defined]
    with pytest.raises(ApiError) as err:
        squatted.client.volume_backups.create(sv["id"])  # type: ignore[attr-defined]
    assert err.value.status == 404
    assert keys(a_s3, f"hb-backups-{squatted.project_id}") == []


def test_restore_refuses_a_bucket_that_changed_hands(cloud: Cloud, attacker: Tenant) -> None:
    victim = make_tenant(cloud, "member")
    c = victim.client
    v = wait_volume(victim, c.volumes.create(unique("data"), 1)["id"])  # type: ignore[attr-defined]
    bucket = unique("vbk")
    b = c.volume_backups.wait(c.volume_backups.create(v["id"], bucket=bucket)["id"], timeout=180)  # type: ignore[attr-defined]
    assert b["status"] == "available" and b["bucket"] == bucket, b
    # the victim empties and drops the bucket; the attacker takes the name and offers objects under the same keys
    v_s3 = s3_client(cloud, victim)
    for key in keys(v_s3, bucket):
        v_s3.delete_object(Bucket=bucket, Key=key)
    v_s3.delete_bucket(Bucket=bucket)
    a_s3 = open_trap(cloud, attacker, bucket)
    for obj in b["objects"]:
        a_s3.put_object(Bucket=bucket, Key=obj["key"], Body=b"attacker's bytes")
    with pytest.raises(ApiError) as err:
        c.volume_backups.restore(b["id"], unique("back"))  # type: ignore[attr-defined]
    assert err.value.status == 404, err.value
    assert [x for x in c.volumes.list() if x["id"] != v["id"]] == []  # type: ignore[attr-defined]
