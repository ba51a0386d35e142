"""The load-balancer engine contract against HaproxyDriver: Debian's HAProxy 2.6 in real namespaces."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hackboot.loadbalancers import haproxy_runtime
from hackboot.loadbalancers.driver import LoadBalancerDriver
from hackboot.loadbalancers.haproxy import HaproxyDriver
from tests.integration.loadbalancers.engine_contract import EngineContract, EngineHarness, Processes

MISSING = [tool for tool in ("ip", "haproxy") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {', '.join(MISSING)} (run `make deps`)"),
    pytest.mark.xdist_group("lb-engine"),
]


class HaproxyHarness(EngineHarness):
    def make_driver(self, state_dir: Path) -> HaproxyDriver:
        return HaproxyDriver(state_dir)

    def _procs(self, driver: LoadBalancerDriver, lb_id: str) -> haproxy_runtime.Processes:
        assert isinstance(driver, HaproxyDriver)
        return haproxy_runtime.show_proc(driver.lb_dir(lb_id) / "master.sock")

    def processes(self, driver: LoadBalancerDriver, lb_id: str) -> Processes:
        procs = self._procs(driver, lb_id)
        return Processes(procs.master, procs.workers)

    def all_pids(self, driver: LoadBalancerDriver, lb_id: str) -> set[int]:
        procs = self._procs(driver, lb_id)
        return {procs.master, *procs.workers, *procs.old_workers}


class TestHaproxyEngine(EngineContract):
    @pytest.fixture
    def harness(self) -> EngineHarness:
        return HaproxyHarness()
