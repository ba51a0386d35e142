"""Shared fixtures: one real control plane per test worker (SQLite), and PostgreSQL on demand."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Cloud, Postgres, make_cloud


@pytest.fixture(scope="session")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """A running `hackboot serve` (API + S3 + workers + local agent) shared by the session."""
    state = tmp_path_factory.mktemp("cloud")
    c = make_cloud(state)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL 15 started for the session on 127.0.0.1 and removed afterwards."""
    if not Path("/usr/lib/postgresql/15/bin/postgres").exists():
        pytest.fail("PostgreSQL 15 is not installed: run `make test` (it installs it)")
    pg = Postgres()
    pg.start()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def pg_cloud(tmp_path_factory: pytest.TempPathFactory, postgres: Postgres) -> Iterator[Cloud]:
    """The same control plane on PostgreSQL (no local agent: API tests only)."""
    state = tmp_path_factory.mktemp("pgcloud")
    c = make_cloud(state, postgres.create_database(), HACKBOOT_RUN_LOCAL_AGENT="false")
    c.start()
    yield c
    c.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def any_cloud(request: pytest.FixtureRequest) -> Cloud:
    """Run a test on both database backends."""
    name = "cloud" if request.param == "sqlite" else "pg_cloud"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]

