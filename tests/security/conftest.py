"""Fixtures for the adversarial tests: hostile tenants on the shared real control plane."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from hackboot.sdk import Client
from tests.support import Cloud


@dataclass
class Tenant:
    """A project with one non-superuser member holding a project-scoped token of `role`."""

    project_id: str
    user_id: str
    username: str
    password: str
    token: str
    role: str
    client: Client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_tenant(cloud: Cloud, role: str = "member") -> Tenant:
    """A fresh project, a fresh user with `role` in it, and a token of that role (made by the admin)."""
    admin = cloud.admin_client_unscoped()
    project = admin.projects.create(unique("sec"))
    password = "correct-horse-" + uuid.uuid4().hex[:8]
    user = admin.users.create(unique("u"), password=password)
    admin.projects.set_member(project["id"], user["id"], role)
    issued = admin.tokens.create(project_id=project["id"], role=role, user_id=user["id"], name="sec")
    return Tenant(project_id=project["id"], user_id=user["id"], username=user["username"], password=password,
                  token=issued["token"], role=role, client=cloud.client(issued["token"]))


@pytest.fixture
def tenant_factory(cloud: Cloud) -> Callable[..., Tenant]:
    """`tenant_factory(role="member")` → a new hostile tenant on the shared SQLite cloud."""
    return lambda role="member": make_tenant(cloud, role)
