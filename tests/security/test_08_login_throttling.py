"""Finding 8: no login throttling, and unknown usernames answered much faster than known ones.

Runs on its own control plane (two API worker processes, so the counters must be shared between
processes) with a small per-source allowance; the per-source case logs in from 127.0.0.2, a
second loopback address, so it does not lock out the other tests' 127.0.0.1.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.security.conftest import make_tenant
from tests.support import Cloud, make_cloud

SOURCE_FREE_FAILURES = 40


@pytest.fixture(scope="module")
def login_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    c = make_cloud(tmp_path_factory.mktemp("logincloud"), HACKBOOT_RUN_LOCAL_AGENT="false",
                   HACKBOOT_API_WORKERS="2", HACKBOOT_LOGIN_SOURCE_FREE_FAILURES=str(SOURCE_FREE_FAILURES))
    c.start()
    yield c
    c.stop()


def _login(http: httpx.Client, username: str, password: str) -> httpx.Response:
    return http.post("/v1/auth/login", json={"username": username, "password": password})


def _assert_throttled(resp: httpx.Response) -> int:
    assert resp.status_code == 429, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == "too_many_attempts"
    retry = int(resp.headers["retry-after"])
    assert retry >= 1
    return retry


def test_guessing_a_password_is_throttled_with_backoff(login_cloud: Cloud) -> None:
    tenant = make_tenant(login_cloud)
    with httpx.Client(base_url=login_cloud.url, timeout=30) as http:
        codes = [_login(http, tenant.username, f"guess-{i}").status_code for i in range(30)]
        assert 201 not in codes
        assert codes[:5] == [401] * 5  # a few typos are free
        assert codes.count(429) >= 20, codes
        # While locked out, even the right password waits: the lock is on the username.
        retry = _assert_throttled(_login(http, tenant.username, tenant.password))
        time.sleep(retry + 0.2)
        assert _login(http, tenant.username, tenant.password).status_code == 201
        # A success resets the username's counter.
        assert [_login(http, tenant.username, "nope-again").status_code for _ in range(4)] == [401] * 4
        assert _login(http, tenant.username, tenant.password).status_code == 201


def test_unknown_usernames_cost_as_much_as_known_ones(login_cloud: Cloud) -> None:
    users = [make_tenant(login_cloud) for _ in range(3)]
    known: list[float] = []
    unknown: list[float] = []
    with httpx.Client(base_url=login_cloud.url, timeout=30) as http:
        for _ in range(3):  # 3 failures per user: below the per-user allowance
            for user in users:
                for name, sink in ((user.username, known), (f"ghost-{uuid.uuid4().hex[:10]}", unknown)):
                    start = time.perf_counter()
                    assert _login(http, name, "wrong-password").status_code == 401
                    sink.append(time.perf_counter() - start)
        for user in users:  # give the shared source its attempts back
            assert _login(http, user.username, user.password).status_code == 201
    # Both verify one scrypt hash; before, unknown users answered ~15x faster.
    assert statistics.median(unknown) > 0.5 * statistics.median(known), (known, unknown)


def test_a_source_spraying_usernames_is_throttled(login_cloud: Cloud) -> None:
    tenant = make_tenant(login_cloud)
    other_source = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(base_url=login_cloud.url, timeout=30, transport=other_source) as sprayer:
        codes = []
        for i in range(SOURCE_FREE_FAILURES + 5):  # a different username every time
            codes.append(_login(sprayer, f"spray-{i}-{uuid.uuid4().hex[:6]}", "Winter2026!").status_code)
            if codes[-1] == 429:
                break
        assert codes[-1] == 429 and len(codes) <= SOURCE_FREE_FAILURES + 1, codes
        _assert_throttled(_login(sprayer, tenant.username, tenant.password))
    # Other sources are not affected.
    with httpx.Client(base_url=login_cloud.url, timeout=30) as http:
        assert _login(http, tenant.username, tenant.password).status_code == 201
