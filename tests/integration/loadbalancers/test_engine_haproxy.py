"""The load-balancer engine contract against HaproxyDriver: Debian's HAProxy 2.6 in real namespaces."""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hackboot.loadbalancers import haproxy_runtime
from hackboot.loadbalancers.driver import (
    CertificateSpec,
    InvalidSpec,
    ListenerSpec,
    LoadBalancerDriver,
    LoadBalancerSpec,
    PoolSpec,
)
from hackboot.loadbalancers.haproxy import HaproxyDriver, _punch_old
from tests.integration.loadbalancers.engine_contract import EngineContract, EngineHarness, Processes, member
from tests.integration.loadbalancers.engine_topology import (
    VIP,
    Topology,
    http_get,
    self_signed,
    tls_probe,
    topology,
    wait_for,
)

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
        return haproxy_runtime.show_proc(driver.master_socket(lb_id))

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


# --- what is particular to the HAProxy engine ------------------------------------------------------

@pytest.fixture
def world() -> Iterator[Topology]:
    with topology(backends=2) as t:
        yield t


def web_lb(topo: Topology, lb_id: str, certificates: tuple[CertificateSpec, ...] = ()) -> LoadBalancerSpec:
    pool = PoolSpec("web", members=tuple(member(topo, n) for n in ("b1", "b2")))
    listeners = [ListenerSpec("web", "http", 80, "web")]
    if certificates:
        listeners.append(ListenerSpec("tls", "https", 443, "web", certificate_ids=tuple(c.id for c in certificates)))
    return LoadBalancerSpec(lb_id, VIP, tuple(listeners), (pool,), certificates)


def test_files_are_private_keys_stay_out_of_the_config_and_workers_are_unprivileged(
        world: Topology, tmp_path: Path) -> None:
    driver = HaproxyDriver(tmp_path / "state")
    chain, key = self_signed(("a.example.test",))
    try:
        driver.apply(web_lb(world, "lb-files", (CertificateSpec("cert-a", chain, key),)), world.lb_ns)
        d = driver.lb_dir("lb-files")
        run = driver.run_dir("lb-files")
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(run.stat().st_mode) == 0o700
        assert stat.S_IMODE(driver.stats_socket("lb-files").stat().st_mode) == 0o600
        assert stat.S_IMODE(driver.master_socket("lb-files").stat().st_mode) == 0o600
        assert stat.S_IMODE((d / "certs").stat().st_mode) == 0o700
        (cert_file,) = (d / "certs").iterdir()
        assert stat.S_IMODE(cert_file.stat().st_mode) == 0o600 and key.strip() in cert_file.read_text()
        for path in d.rglob("*"):
            if path.is_file() and path.name != "haproxy.pid":  # HAProxy writes that one (0644: a pid)
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
                if path != cert_file:
                    assert "PRIVATE KEY" not in path.read_text(errors="replace"), path
        procs = haproxy_runtime.show_proc(driver.master_socket("lb-files"))
        haproxy_uid = pwd.getpwnam("haproxy").pw_uid
        for worker in procs.workers:
            uids = Path(f"/proc/{worker}/status").read_text().split("Uid:")[1].split("\n")[0].split()
            assert {int(u) for u in uids} == {haproxy_uid}
            if driver.chroot is not None:  # locked in the package's empty directory
                assert os.readlink(f"/proc/{worker}/root") == str(driver.chroot)
        # A new certificate version replaces the old file once the proxy uses it.
        chain2, key2 = self_signed(("a.example.test",))
        driver.apply(web_lb(world, "lb-files", (CertificateSpec("cert-a", chain2, key2),)), world.lb_ns)
        (new_file,) = (d / "certs").iterdir()
        assert new_file != cert_file and key2.strip() in new_file.read_text()
        assert ssl.PEM_cert_to_DER_cert(chain2) == world.in_client(lambda: tls_probe(VIP, 443, "a.example.test"))[1]
        driver.remove("lb-files")
        assert not d.exists() and not run.exists()
    finally:
        driver.remove("lb-files")


def test_refusal_message_names_no_host_path(world: Topology, tmp_path: Path) -> None:
    driver = HaproxyDriver(tmp_path / "state")
    chain, _ = self_signed(("a.example.test",))
    _, other_key = self_signed(("b.example.test",))
    try:
        with pytest.raises(InvalidSpec) as refused:
            driver.apply(web_lb(world, "lb-refused", (CertificateSpec("pair", chain, other_key),)), world.lb_ns)
        assert str(tmp_path) not in str(refused.value) and "certs/pair-" in str(refused.value)
        assert driver.running() == []
    finally:
        driver.remove("lb-refused")
    assert not driver.run_dir("lb-refused").exists() and not driver.lb_dir("lb-refused").exists()


def test_access_log_disk_use_is_bounded(world: Topology, tmp_path: Path) -> None:
    driver = HaproxyDriver(tmp_path / "state", log_keep_bytes=8192)
    try:
        driver.apply(web_lb(world, "lb-logsize"), world.lb_ns)

        def requests(n: int) -> None:
            conn = http.client.HTTPConnection(VIP, 80, timeout=5)
            for i in range(n):
                http_get(VIP, 80, f"/p/{i}", conn=conn)

        world.in_client(lambda: requests(1500))
        log_file = driver.lb_dir("lb-logsize") / "access.log"
        wait_for(lambda: log_file.stat().st_size > 80_000, what="100 kB of records")
        first = driver.access_logs("lb-logsize", limit=10_000)
        size = log_file.stat().st_size
        assert 0 < len(first) < 1500 and first[-1].cursor <= size
        assert first[-1].path == "/p/1499" and first[0].cursor > size - 8192 - 200
        assert log_file.stat().st_blocks * 512 <= 3 * 8192 + 4096  # the start was punched out
        assert [r.path for r in driver.access_logs("lb-logsize", after=first[-2].cursor)] == ["/p/1499"]
        # A cursor from a log that no longer exists (past its end) reads from what is kept.
        assert driver.access_logs("lb-logsize", after=size + 10_000, limit=10_000) == first
        # Unread, the log is bounded by apply too.
        world.in_client(lambda: requests(1500))
        wait_for(lambda: log_file.stat().st_size > size + 80_000, what="100 kB more")
        driver.apply(web_lb(world, "lb-logsize"), world.lb_ns)
        assert log_file.stat().st_blocks * 512 <= 3 * 8192 + 4096
    finally:
        driver.remove("lb-logsize")


def test_old_log_bytes_are_punched_out_offsets_kept(tmp_path: Path) -> None:
    log_file = tmp_path / "haproxy.err"
    lines = b"".join(f"line {i:07d}\n".encode() for i in range(100_000))  # 1.3 MB
    log_file.write_bytes(lines)
    fd = os.open(log_file, os.O_RDWR)
    try:
        _punch_old(fd, 64 << 10)
    finally:
        os.close(fd)
    st = log_file.stat()
    assert st.st_size == len(lines) and st.st_blocks * 512 <= (64 << 10) + 8192
    assert log_file.read_bytes()[-(64 << 10):] == lines[-(64 << 10):]
