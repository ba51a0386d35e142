"""Helpers of the control-plane tests of VPC networking (the REST API through the SDK)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from hackboot.sdk import ApiError, Client
from tests.support import Cloud


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def project_client(cloud: Cloud, **limits: int) -> Client:
    """A fresh project (its quotas as a new project gets them, raised by `limits`), the admin acting in it."""
    admin = cloud.admin_client_unscoped()
    project = admin.projects.create(unique("net"))
    for resource, limit in limits.items():
        admin.projects.set_quota(project["id"], resource, limit)
    client = cloud.client(project=project["id"])
    client.project_id = project["id"]  # type: ignore[attr-defined]
    return client


def expect_error(status: int, fn: Callable[..., Any], *args: Any, code: str | None = None, text: str | None = None,
                 **kwargs: Any) -> ApiError:
    """Call fn; it must fail with `status` (and `code`, and `text` in the detail)."""
    with pytest.raises(ApiError) as err:
        fn(*args, **kwargs)
    assert err.value.status == status, err.value.problem
    if code is not None:
        assert err.value.code == code, err.value.problem
    if text is not None:
        assert text in err.value.detail, err.value.problem
    return err.value


def quota(client: Client, resource: str) -> dict[str, Any]:
    admin = client
    rows = admin.projects.quotas(client.project_id)  # type: ignore[attr-defined]
    return next(q for q in rows if q["resource"] == resource)


def vpc_with_subnet(client: Client, cidr: str = "10.20.0.0/16", subnet_cidr: str = "10.20.1.0/24", *,
                    public: bool = False, internet_gateway: bool = False,
                    zone: str = "PAR1-a") -> tuple[dict[str, Any], dict[str, Any]]:
    vpc = client.vpcs.create(unique("vpc"), cidr, internet_gateway=internet_gateway)
    subnet = client.subnets.create(vpc["id"], subnet_cidr, zone=zone, public=public)
    return vpc, subnet


def events_of(client: Client, resource_id: str) -> list[str]:
    page = client.get("/v1/events", resource_id=resource_id, limit=200)
    return [e["type"] for e in page["items"]]
