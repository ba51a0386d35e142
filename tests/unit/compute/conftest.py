"""Unit-test fixtures: a migrated SQLite database in a temp dir, no server process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.core import config, db


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    state = tmp_path_factory.mktemp("computedb")
    saved = {k: os.environ.get(k) for k in ("HACKBOOT_STATE_DIR", "HACKBOOT_DATABASE_URL", "HACKBOOT_CONFIG")}
    os.environ.update({"HACKBOOT_STATE_DIR": str(state), "HACKBOOT_DATABASE_URL": "",
                       "HACKBOOT_CONFIG": str(state / "none.toml")})
    config.reset_settings_cache()
    db.dispose_engine()
    from hackboot.core.migrate import upgrade

    upgrade(config.get_settings().effective_database_url)
    from hackboot.compute import scheduler

    scheduler.clear_cache()
    yield state
    db.dispose_engine()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    config.reset_settings_cache()
