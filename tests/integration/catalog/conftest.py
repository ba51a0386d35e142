"""Catalog test helpers: direct database access to a running cloud, tokens with each role, cleanup."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from hackboot.catalog.models import Allocation
from hackboot.core.db import make_engine
from hackboot.events.models import Event
from hackboot.sdk import ApiError, Client
from tests.support import Cloud


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def database_url(cloud: Cloud) -> str:
    return cloud.env.get("HACKBOOT_DATABASE_URL") or f"sqlite:///{cloud.state_dir / 'hackboot.db'}"


@dataclass
class CloudDb:
    """The cloud's own database, opened from the test process (to insert allocations, read events)."""

    engine: Engine
    consumers: set[str] = field(default_factory=set)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s:
            yield s
            s.commit()

    def allocate(self, host_id: str, consumer_id: str, amounts: dict[str, int],
                 devices: dict[str, list[str]] | None = None, project_id: str = "prj-catalogtest") -> None:
        """What the scheduler would write: one row per resource class, and a generation bump."""
        from hackboot.catalog.models import Host

        self.consumers.add(consumer_id)
        with self.session() as s:
            for rc, amount in amounts.items():
                s.add(Allocation(consumer_id=consumer_id, host_id=host_id, resource_class=rc, amount=amount,
                                 project_id=project_id, devices=(devices or {}).get(rc, [])))
            host = s.get(Host, host_id)
            assert host is not None
            host.generation += 1

    def release(self, consumer_id: str) -> None:
        with self.session() as s:
            s.execute(delete(Allocation).where(Allocation.consumer_id == consumer_id))

    def events(self, resource_id: str) -> list[Event]:
        with self.session() as s:
            return list(s.scalars(select(Event).where(Event.resource_id == resource_id).order_by(Event.seq)))


@pytest.fixture
def db(any_cloud: Cloud) -> Iterator[CloudDb]:
    d = CloudDb(make_engine(database_url(any_cloud)))
    yield d
    for consumer in d.consumers:
        d.release(consumer)
    d.engine.dispose()


@pytest.fixture
def admin(any_cloud: Cloud) -> Client:
    return any_cloud.admin_client_unscoped()


@dataclass
class RoleClients:
    viewer: Client
    member: Client
    project_admin: Client  # admin of a project, but not a cloud administrator


def make_role_clients(cloud: Cloud) -> RoleClients:
    admin = cloud.admin_client_unscoped()
    project = admin.projects.create(unique("cat"))  # type: ignore[attr-defined]
    clients = {}
    for role in ("viewer", "member", "admin"):
        user = admin.users.create(unique(role))  # type: ignore[attr-defined]
        admin.projects.set_member(project["id"], user["id"], role)  # type: ignore[attr-defined]
        tok = admin.tokens.create(project_id=project["id"], role=role, user_id=user["id"])  # type: ignore[attr-defined]
        clients[role] = cloud.client(tok["token"])
    return RoleClients(clients["viewer"], clients["member"], clients["admin"])


@pytest.fixture
def roles(any_cloud: Cloud) -> RoleClients:
    return make_role_clients(any_cloud)


@pytest.fixture
def hosts(admin: Client, db: CloudDb) -> Iterator[Callable[..., dict[str, Any]]]:
    """Register test hosts with unique names; they are removed afterwards (allocations first)."""
    made: list[str] = []

    def register(prefix: str = "hv", **kw: Any) -> dict[str, Any]:
        host = admin.hosts.register(unique(prefix), **kw)  # type: ignore[attr-defined]
        made.append(host["id"])
        return host

    yield register
    for consumer in list(db.consumers):
        db.release(consumer)
    for host_id in made:
        try:
            admin.hosts.delete(host_id)  # type: ignore[attr-defined]
        except ApiError as exc:
            if exc.status != 404:
                raise


def expect_error(expected_status: int, fn: Callable[..., Any], /, *args: Any, **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args, **kw)
    assert err.value.status == expected_status, err.value
    return err.value


SessionFactory = Callable[[], AbstractContextManager[Session]]
