"""core.auth resolves tokens through the resolver a service registers (identity's), and caches its answers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.core import auth, errors
from hackboot.core.auth import Principal
from hackboot.core.config import reset_settings_cache


@pytest.fixture
def resolvers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[auth.TokenResolver]]:
    """A fresh state dir (the cache's epoch file) and the registered resolver restored afterwards."""
    monkeypatch.setenv("HACKBOOT_STATE_DIR", str(tmp_path))
    reset_settings_cache()
    saved = list(auth._resolver)
    auth._resolver.clear()
    yield auth._resolver
    auth._resolver[:] = saved
    with auth._cache_lock:
        auth._cache.clear()
    reset_settings_cache()


def _principal(project: str | None) -> Principal:
    return Principal(user_id="usr-1", username="ada", token_id="tok-1", role="member", is_superuser=False,
                     project_id=project)


def test_no_resolver_is_a_clear_error(resolvers: list[auth.TokenResolver]) -> None:
    with pytest.raises(RuntimeError, match="no token resolver"):
        auth.authenticate_token("hbk_x")


def test_the_registered_resolver_answers_and_is_cached(resolvers: list[auth.TokenResolver]) -> None:
    calls: list[tuple[str, str | None]] = []

    def resolve(token: str, project: str | None) -> tuple[Principal, dt.datetime | None]:
        calls.append((token, project))
        if token != "hbk_good":
            raise errors.Unauthenticated("Unknown or deleted token", code="invalid_token")
        return _principal(project or "prj-1"), None

    auth.register_token_resolver(resolve)
    assert auth.authenticate_token("hbk_good").project_id == "prj-1"
    assert auth.authenticate_token("hbk_good").project_id == "prj-1"
    assert auth.authenticate_token("hbk_good", "prj-2").project_id == "prj-2"
    assert calls == [("hbk_good", None), ("hbk_good", "prj-2")]  # one call per (token, project)
    with pytest.raises(errors.Unauthenticated):
        auth.authenticate_token("hbk_bad")
    auth.forget_cached_tokens()  # a revocation: the next request asks the resolver again
    auth.authenticate_token("hbk_good")
    assert len(calls) == 4


def test_an_expired_answer_is_not_served_from_the_cache(resolvers: list[auth.TokenResolver]) -> None:
    calls = 0

    def resolve(token: str, project: str | None) -> tuple[Principal, dt.datetime | None]:
        nonlocal calls
        calls += 1
        return _principal("prj-1"), dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)

    auth.register_token_resolver(resolve)
    auth.authenticate_token("hbk_short")
    auth.authenticate_token("hbk_short")
    assert calls == 2


def test_identity_registers_its_resolver_when_imported() -> None:
    from hackboot.identity import principals, service  # noqa: F401 - service imports principals

    assert auth._resolver == [principals.resolve_token]
