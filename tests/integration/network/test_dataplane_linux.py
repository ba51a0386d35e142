"""The data-plane contract against LinuxNetworkDriver: real namespaces, veths, VXLAN, nftables, dnsmasq."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hackboot.network.linux import LinuxNetworkDriver
from tests.integration.network.dataplane_contract import DataplaneContract, DataplaneHarness

MISSING = [tool for tool in ("ip", "bridge", "nft", "dnsmasq", "busybox") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {', '.join(MISSING)} (run `make deps`)"),
    pytest.mark.xdist_group("network-dataplane"),
]


class LinuxHarness(DataplaneHarness):
    def make_driver(self, state_dir: Path) -> LinuxNetworkDriver:
        return LinuxNetworkDriver(state_dir, supervise_interval=0.5)


class TestLinuxDataplane(DataplaneContract):
    @pytest.fixture
    def harness(self) -> DataplaneHarness:
        return LinuxHarness()
