"""The Debian image builder's mirror: the debian_mirror setting, else the host's apt sources."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hackboot.core.config import reset_settings_cache
from hackboot.images.builder import debian
from hackboot.images.builder._common import ImageBuildError

SOURCES = [("http://deb.example.org/debian", ["bookworm", "bookworm-updates"], None),
           ("http://security.example.org/debian-security", ["bookworm-security"], None)]


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("HACKBOOT_DEBIAN_MIRROR", raising=False)
    reset_settings_cache()
    yield
    monkeypatch.undo()
    reset_settings_cache()


def test_host_sources_without_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian, "_apt_sources", lambda: SOURCES)
    mirror = debian.find_mirror()
    assert (mirror.uri, mirror.security_uri) == (SOURCES[0][0], SOURCES[1][0])
    monkeypatch.setattr(debian, "_apt_sources", lambda: [])
    with pytest.raises(ImageBuildError, match="HACKBOOT_DEBIAN_MIRROR"):
        debian.find_mirror()


def test_the_setting_overrides_the_host_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian, "_apt_sources", lambda: SOURCES)
    monkeypatch.setenv("HACKBOOT_DEBIAN_MIRROR", "http://mirror.example.net/debian")
    reset_settings_cache()
    mirror = debian.find_mirror()
    assert (mirror.uri, mirror.security_uri, mirror.keyring) == (
        "http://mirror.example.net/debian", SOURCES[1][0], None)
