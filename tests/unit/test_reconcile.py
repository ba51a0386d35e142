"""The shared reconcile loop (core/reconcile.py): busy set, wake-ups, backoff, resync."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from hackboot.core import reconcile
from hackboot.core.reconcile import ChangeNotifier, Reconciler


class Recorder(Reconciler):
    kind = "thing"
    id_prefix = "t-"

    def __init__(self, ids: Iterable[str] = (), **kw: object) -> None:
        super().__init__(change_notifier=kw.pop("change_notifier", ChangeNotifier()), **kw)  # type: ignore[arg-type]
        self.ids = list(ids)
        self.calls: list[tuple[str, float]] = []
        self.running: dict[str, int] = {}
        self.max_concurrent: dict[str, int] = {}
        self.delay = 0.0
        self.fail: set[str] = set()
        self.reported: list[tuple[str, str, int]] = []
        self.resyncs = 0
        self.guard = threading.Lock()
        self.listed = 0
        self.consume = True  # a reconciled object needs no more work (as a finished task)

    def list_ids(self) -> Iterable[str]:
        self.listed += 1
        return list(self.ids)

    def reconcile(self, object_id: str) -> None:
        with self.guard:
            self.running[object_id] = self.running.get(object_id, 0) + 1
            self.max_concurrent[object_id] = max(self.max_concurrent.get(object_id, 0), self.running[object_id])
            self.calls.append((object_id, time.monotonic()))
        try:
            time.sleep(self.delay)
            if object_id in self.fail:
                raise RuntimeError(f"cannot do {object_id}")
            if self.consume and object_id in self.ids:
                self.ids.remove(object_id)
        finally:
            with self.guard:
                self.running[object_id] -= 1

    def resync(self) -> None:
        self.resyncs += 1

    def report_failure(self, object_id: str, reason: str, failures: int) -> None:
        self.reported.append((object_id, reason, failures))

    def count(self, object_id: str) -> int:
        with self.guard:
            return sum(1 for i, _ in self.calls if i == object_id)


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


@pytest.fixture
def running() -> Iterator[list[Recorder]]:
    started: list[Recorder] = []
    yield started
    for r in started:
        r.stop()


def test_kind_is_required() -> None:
    class NoKind(Reconciler):
        pass

    with pytest.raises(TypeError):
        NoKind()


def test_busy_set_never_runs_one_object_twice_at_once(running: list[Recorder]) -> None:
    r = Recorder(["t-1", "t-2"], workers=4, poll_interval=0.01)
    r.delay = 0.05
    r.consume = False
    running.append(r)
    r.start()
    for _ in range(50):  # hammer it with wake-ups and direct submissions
        r.wake()
        r.wake("t-1")
        r.submit("t-1")
        time.sleep(0.005)
    wait_for(lambda: r.count("t-1") >= 3 and r.count("t-2") >= 3)
    assert r.max_concurrent["t-1"] == 1
    assert r.max_concurrent["t-2"] == 1


def test_submit_refuses_a_busy_object() -> None:
    r = Recorder(workers=2)
    gate = threading.Event()
    try:
        assert r.submit("t-1", gate.wait, 5)
        assert r.is_busy("t-1")
        assert not r.submit("t-1")
        assert r.submit("t-2", lambda: None)
        gate.set()
        wait_for(lambda: not r.is_busy("t-1"))
        assert r.submit("t-1", lambda: None)
    finally:
        gate.set()
        r.stop()


def test_wake_up_latency_is_far_below_the_poll_interval(running: list[Recorder]) -> None:
    notifier = ChangeNotifier()
    r = Recorder(poll_interval=30.0, scope="h-1", change_notifier=notifier)
    running.append(r)
    r.start()
    wait_for(lambda: r.listed >= 1)
    time.sleep(0.05)
    r.ids = ["t-9"]
    sent = time.monotonic()
    notifier.notify("thing", "h-1", sockets=False, database=False)
    wait_for(lambda: r.count("t-9") == 1, timeout=2.0)
    assert r.calls[0][1] - sent < 0.5


def test_targeted_wake_up_reconciles_that_object_without_listing(running: list[Recorder]) -> None:
    notifier = ChangeNotifier()
    r = Recorder(poll_interval=30.0, scope="h-1", change_notifier=notifier)
    running.append(r)
    r.start()
    wait_for(lambda: r.listed >= 1)
    time.sleep(0.05)
    notifier.notify("thing", "t-5", sockets=False, database=False)  # not in list_ids(): reached by its id
    wait_for(lambda: r.count("t-5") == 1, timeout=2.0)
    time.sleep(0.1)
    listed = r.listed
    # other kinds, other scopes: ignored
    notifier.notify("other", None, sockets=False, database=False)
    notifier.notify("thing", "h-2", sockets=False, database=False)
    time.sleep(0.1)
    assert r.listed == listed


def test_a_targeted_wake_up_while_the_object_is_busy_reconciles_it_again(running: list[Recorder]) -> None:
    notifier = ChangeNotifier()
    r = Recorder(poll_interval=30.0, scope="h-1", change_notifier=notifier)
    r.delay = 0.3
    running.append(r)
    r.start()
    wait_for(lambda: r.listed >= 1)
    notifier.notify("thing", "t-7", sockets=False, database=False)
    wait_for(lambda: r.is_busy("t-7"))
    # The object changes again while it is reconciled (its work may have read the state before the change);
    # list_ids() does not list it, so only the targeted wake-up can bring it back.
    notifier.notify("thing", "t-7", sockets=False, database=False)
    wait_for(lambda: r.count("t-7") == 2, timeout=3.0)


def test_wake_up_through_the_datagram_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             running: list[Recorder]) -> None:
    monkeypatch.setattr(reconcile, "wake_dir", lambda: tmp_path / "wake")
    receiver, sender = ChangeNotifier(), ChangeNotifier()  # two processes, as far as they know
    stop = threading.Event()
    try:
        assert receiver.listen_socket("agent-a", stop)
        r = Recorder(poll_interval=30.0, scope="h-1", change_notifier=receiver)
        running.append(r)
        r.start()
        wait_for(lambda: r.listed >= 1)
        r.ids = ["t-3"]
        sender.notify("thing", "h-1", database=False)
        wait_for(lambda: r.count("t-3") == 1, timeout=3.0)
    finally:
        stop.set()


def test_backoff_and_status_reason_after_repeated_failures(running: list[Recorder]) -> None:
    r = Recorder(["t-1"], poll_interval=0.01, base_backoff=0.1, max_backoff=0.4, failure_threshold=3)
    r.fail.add("t-1")
    running.append(r)
    r.start()
    wait_for(lambda: r.count("t-1") >= 5, timeout=5.0)
    times = [t for i, t in r.calls if i == "t-1"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.38  # 0.1, 0.2, 0.4 …
    assert gaps[3] < 0.8  # … capped at max_backoff
    assert r.reported[0] == ("t-1", "cannot do t-1", 3)
    assert [n for _, _, n in r.reported][:2] == [3, 4]
    # wake-ups do not bypass the backoff
    r.wake()
    r.wake("t-1")
    assert r.failures("t-1") >= 4
    r.fail.clear()
    wait_for(lambda: r.failures("t-1") == 0, timeout=3.0)


def test_failures_of_other_work_do_not_count(running: list[Recorder]) -> None:
    r = Recorder()

    def boom() -> None:
        raise ValueError("no")

    try:
        assert r.submit("t-1", boom)
        wait_for(lambda: not r.is_busy("t-1"))
        assert r.failures("t-1") == 0
    finally:
        r.stop()


def test_periodic_resync_and_poll(running: list[Recorder]) -> None:
    r = Recorder(["t-1"], poll_interval=0.05, resync_interval=0.05)
    r.consume = False
    running.append(r)
    r.start()
    wait_for(lambda: r.resyncs >= 3 and r.count("t-1") >= 3, timeout=3.0)


def test_a_failing_list_does_not_kill_the_loop(running: list[Recorder]) -> None:
    class Flaky(Recorder):
        def list_ids(self) -> Iterable[str]:
            self.listed += 1
            if self.listed < 3:
                raise OSError("database is away")
            return ["t-1"]

    r = Flaky(poll_interval=0.02)
    running.append(r)
    r.start()
    wait_for(lambda: r.count("t-1") >= 1, timeout=3.0)


def test_stop_refuses_new_work() -> None:
    r = Recorder(["t-1"])
    r.stop()
    assert not r.submit("t-1")


def test_listener_errors_do_not_reach_the_notifier() -> None:
    n = ChangeNotifier()
    seen: list[str | None] = []

    def bad(key: str | None) -> None:
        raise RuntimeError("listener bug")

    n.subscribe("thing", bad)
    unsubscribe = n.subscribe("thing", seen.append)
    n.notify("thing", "t-1", sockets=False, database=False)
    unsubscribe()
    n.notify("thing", "t-2", sockets=False, database=False)
    assert seen == ["t-1"]


def test_channel_names_are_safe() -> None:
    assert reconcile.channel("instance") == "hackboot_instance"
    assert reconcile.channel("load-balancer") == "hackboot_load_balancer"
