"""Shared fixtures: one real control plane per test worker (SQLite), and PostgreSQL on demand."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Cloud, Postgres, make_cloud

_namespaces_before: set[str] = set()


def _is_controller(config: pytest.Config) -> bool:
    """The run's own process (xdist workers have `workerinput`), when `make test` asked for the namespace
    backstop: it removes *every* namespace made during the run, so a run beside other runs does without it."""
    return not hasattr(config, "workerinput") and os.environ.get("HACKBOOT_TEST_REMOVE_NAMESPACES") == "1"


_FUNCTION_RUN_ROOT = Path("/var/tmp/hackboot-functions")  # (hackboot.functions.local.run_dir's parent)
_function_dirs_before: set[str] = set()


def _function_dirs() -> set[str]:
    return {p.name for p in _FUNCTION_RUN_ROOT.iterdir()} if _FUNCTION_RUN_ROOT.is_dir() else set()


def pytest_configure(config: pytest.Config) -> None:
    if _is_controller(config):
        from hackboot.network import netns

        _namespaces_before.update(netns.list_ours())
        _function_dirs_before.update(_function_dirs())


def pytest_unconfigure(config: pytest.Config) -> None:
    """Backstop after every worker has finished: remove the ``hb-`` namespaces (and the processes in them:
    dnsmasq, HAProxy, test servers) this run made and a failed or killed test left behind; namespaces that
    existed before the run (a cloud started with `make up`) are left alone."""
    if not _is_controller(config):
        return
    from hackboot.network import netns

    for name in netns.list_ours():
        if name not in _namespaces_before:
            try:
                netns.delete(name)
            except (netns.NetnsError, OSError) as exc:
                print(f"cannot remove namespace {name}: {exc}")
    # The function sandboxes' code caches of servers a test killed (a stopped server removes its own).
    for name in _function_dirs() - _function_dirs_before:
        shutil.rmtree(_FUNCTION_RUN_ROOT / name, ignore_errors=True)


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

