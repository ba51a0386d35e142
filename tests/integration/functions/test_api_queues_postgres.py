"""The queue service's semantics (tests/unit/functions/test_queues.py) on PostgreSQL: the compare-and-swap
receive under concurrent receivers, dead-lettering and receipts behave there as on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.core.config import get_settings, reset_settings_cache
from hackboot.core.db import dispose_engine
from hackboot.core.migrate import upgrade
from tests.unit.functions.test_queues import (  # noqa: F401  (collected here, on this module's `db`)
    test_a_received_message_is_invisible_until_its_timeout_then_comes_back,
    test_concurrent_receivers_never_share_a_message,
    test_dead_letter_after_max_receives,
    test_delay_and_long_poll,
    test_queue_rules_and_deletion,
    test_receipts_are_opaque_and_unguessable,
    test_retention_drops_old_messages,
    test_visibility_override_change_and_batch,
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
    yield
    dispose_engine()
    monkeypatch.undo()
    reset_settings_cache()
