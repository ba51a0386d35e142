"""The agent's side of the control plane (tests/unit/loadbalancers/test_desired.py) on PostgreSQL: row locks,
compare-and-swap updates and the VIP's release behave there as on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine
from hackboot.core.migrate import upgrade
from tests.unit.loadbalancers.test_desired import (  # noqa: F401  (collected here, on this module's `db`)
    test_deletions_on_a_removed_host_are_finished_by_the_backstop,
    test_desired_state_of_a_host_as_engine_specs,
    test_finish_delete_releases_the_vip_its_public_ip_and_quota,
    test_hosts_are_chosen_up_in_the_zone_and_least_loaded,
    test_mark_applied_is_a_compare_and_swap,
    test_member_health_is_recorded_with_an_event_on_change_only,
    test_stats_snapshot_and_bounded_access_logs,
    test_the_migration_gives_existing_projects_the_load_balancer_quotas,
)


@pytest.fixture
def db(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    url = request.getfixturevalue("postgres").create_database()
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", url)
    monkeypatch.setenv("HACKBOOT_CONFIG", str(tmp_path / "none.toml"))
    reset_settings_cache()
    dispose_engine()
    upgrade(get_settings().effective_database_url)
    from hackboot.catalog import service as catalog

    catalog.seed()
    yield
    dispose_engine()
    monkeypatch.undo()
    reset_settings_cache()
