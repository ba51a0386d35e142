"""The network agent's options are the `network_*` settings (environment or TOML), explicit values win."""

from __future__ import annotations

import pytest

from hackboot.core.config import get_settings
from hackboot.network.agent import NetworkAgentOptions


@pytest.fixture(autouse=True)
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_are_the_safe_single_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("UNDERLAY_ADDRESS", "UPLINK_ADDRESS", "UPLINK_GATEWAY", "MTU"):
        monkeypatch.delenv(f"HACKBOOT_NETWORK_{name}", raising=False)
    options = NetworkAgentOptions()
    assert options.underlay_address is None and options.uplink_address is None and options.mtu == 1500
    underlay = options.underlay("host-a")
    assert underlay.address is None and underlay.uplink is None


def test_settings_from_the_environment_and_explicit_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HACKBOOT_NETWORK_UNDERLAY_ADDRESS", "192.0.2.11/24")
    monkeypatch.setenv("HACKBOOT_NETWORK_UPLINK_ADDRESS", "198.51.100.11/24")
    monkeypatch.setenv("HACKBOOT_NETWORK_UPLINK_GATEWAY", "198.51.100.1")
    monkeypatch.setenv("HACKBOOT_NETWORK_POLL_INTERVAL_S", "2.5")
    options = NetworkAgentOptions(mtu=9000)
    assert options.underlay_address == "192.0.2.11/24" and options.poll_interval == 2.5 and options.mtu == 9000
    underlay = options.underlay("host-a")
    assert underlay.address == "192.0.2.11/24" and underlay.uplink is not None


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HACKBOOT_NETWORK_MTU", "0")
    with pytest.raises(ValueError, match="network_mtu"):
        get_settings()
