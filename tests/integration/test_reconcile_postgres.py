"""On PostgreSQL, a change NOTIFYed by one process wakes a reconciler LISTENing in another at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.core import config, db
from hackboot.core.reconcile import ChangeNotifier
from tests.support import Postgres
from tests.unit.test_reconcile import Recorder, wait_for


@pytest.fixture
def pg_url(postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = postgres.create_database()
    monkeypatch.setenv("HACKBOOT_DATABASE_URL", url)
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    config.reset_settings_cache()
    db.dispose_engine()
    yield url
    db.dispose_engine()
    monkeypatch.undo()
    config.reset_settings_cache()


def test_listen_notify_wakes_a_remote_reconciler_without_polling(pg_url: str, tmp_path: Path) -> None:
    notifier = ChangeNotifier()
    r = Recorder(poll_interval=60.0, scope="h-remote", change_notifier=notifier)  # it would poll once a minute
    try:
        r.start()
        time.sleep(1.5)  # the listener connects and LISTENs
        listed = r.listed
        r.ids = ["t-1"]
        # another process (an API worker on another machine, as far as this one knows): NOTIFY only
        code = textwrap.dedent("""
            from hackboot.core.reconcile import notify
            notify("thing", "h-remote", local=False, sockets=False)
        """)
        env = {"HACKBOOT_DATABASE_URL": pg_url, "HACKBOOT_STATE_DIR": str(tmp_path / "other"),
               "PATH": "/usr/bin:/bin"}
        sent = time.monotonic()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
        wait_for(lambda: r.count("t-1") == 1, timeout=10.0)
        assert r.listed > listed
        assert r.calls[0][1] - sent < 10.0
        # an object id travels too
        notifier2 = ChangeNotifier()
        notifier2.notify("thing", "t-7", local=False, sockets=False)
        wait_for(lambda: r.count("t-7") == 1, timeout=5.0)
    finally:
        r.stop()
        notifier.stop_database_listener()
